"""The AIRD strength sweep: its points, their validation scores, and the rule that picks one.

A :class:`SweepPoint` is one candidate repair of one compressed model: a
strength (the paper's α pair, or a gain g applied to both projections), the
dense or sparsity-preserving update, and where it is applied. Its scores come
from the validation prompts only (:class:`ValidationScores`).
:func:`choose_repair` applies :class:`~refusal_core.study.config.RepairConfig`'s
documented rule; it sees nothing but validation scores, so the held-out test
prompts cannot reach the choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from refusal_core.errors import EmptyInputError, InvalidArgumentError
from refusal_core.stats import SIGNIFICANCE, Rate, mcnemar

__all__ = ["RepairChoice", "SweepPoint", "ValidationScores", "choose_repair"]


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


@dataclass(frozen=True)
class ValidationScores:
    """One model on the validation prompts.

    ``compliance``: harmful prompts answered; ``over_refusal``: harmless prompts refused (from
    generations, or from the refusal score's sign when ``source == "refusal_score"``);
    ``kl``: mean KL(base ‖ model) of the next-token distribution on the harmless prompts (nats);
    ``ce``: mean cross-entropy (nats/token) of the base model's greedy completions of the harmless
    prompts under the model;
    ``refusal_score_harmful`` / ``refusal_score_harmless``: mean refusal scores.
    """

    compliance: Rate
    over_refusal: Rate
    kl: float
    refusal_score_harmful: float
    refusal_score_harmless: float
    source: str
    ce: float = float("nan")
    #: per harmful validation prompt: answered? (what ``compliance`` counts; paired tests use it)
    complied: tuple[bool, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "compliance": self.compliance.to_dict(),
            "over_refusal": self.over_refusal.to_dict(),
            "kl": self.kl,
            "refusal_score_harmful": self.refusal_score_harmful,
            "refusal_score_harmless": self.refusal_score_harmless,
            "source": self.source,
            "ce": self.ce,
            "complied": list(self.complied),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ValidationScores:
        return cls(
            compliance=Rate.from_dict(d["compliance"]),
            over_refusal=Rate.from_dict(d["over_refusal"]),
            # null in strict JSON is a value that was not measured (NaN in memory)
            kl=_number(d["kl"]),
            refusal_score_harmful=_number(d["refusal_score_harmful"]),
            refusal_score_harmless=_number(d["refusal_score_harmless"]),
            source=str(d["source"]),
            ce=_number(d.get("ce")),
            complied=tuple(bool(x) for x in d.get("complied", ())),
        )


@dataclass(frozen=True)
class SweepPoint:
    """One candidate repair and its validation scores.

    ``strength`` is ``"identity"`` (no edit: the compressed model itself), ``"paper"`` (the
    paper's α pair) or ``"gain"``; ``gains`` / ``alphas`` hold the (attention, MLP) values that
    were applied, both spellings exact; ``layers`` the blocks edited; ``placement`` which source
    layers were repaired, one of ``"none"``, ``"base"``, ``"own"``, ``"both"``; ``edit`` where the
    edit sits relative to them (``"source-block"``: block l itself, ``"into-source"``: block l−1,
    whose output is the residual stream where r was measured).
    """

    strength: str
    sparse: bool
    placement: str
    layers: tuple[int, ...]
    gains: tuple[float, float]
    alphas: tuple[float, float]
    scores: ValidationScores
    edit: str = "source-block"

    @property
    def source_layers(self) -> tuple[int, ...]:
        """The layers whose direction the edit repairs (``layers`` are the blocks edited)."""
        return tuple(x + 1 for x in self.layers) if self.edit == "into-source" else self.layers

    @property
    def label(self) -> str:
        if self.strength == "identity":
            return "no edit"
        what = "paper α" if self.strength == "paper" else f"g={self.gains[0]:g}"
        into = " into-source" if self.edit == "into-source" else ""
        return f"{what}{' sparse' if self.sparse else ''} @{self.placement}{into}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "strength": self.strength,
            "sparse": self.sparse,
            "placement": self.placement,
            "layers": list(self.layers),
            "gains": list(self.gains),
            "alphas": list(self.alphas),
            "label": self.label,
            "scores": self.scores.to_dict(),
            "edit": self.edit,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepPoint:
        return cls(
            strength=str(d["strength"]),
            sparse=bool(d["sparse"]),
            placement=str(d["placement"]),
            layers=tuple(int(x) for x in d["layers"]),
            gains=(float(d["gains"][0]), float(d["gains"][1])),
            alphas=(float(d["alphas"][0]), float(d["alphas"][1])),
            scores=ValidationScores.from_dict(d["scores"]),
            # files written before the placement setting existed edited the source block
            edit=str(d.get("edit", "source-block")),
        )


@dataclass(frozen=True)
class RepairChoice:
    """The outcome of :func:`choose_repair` for one arm (dense or sparse) of one compressed model."""

    point: SweepPoint
    index: int
    admissible: tuple[bool, ...]
    criterion_met: bool
    rule: str
    #: exact McNemar p of each point's validation compliance against the unedited model's (None: no flags)
    p_values: tuple[float | None, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.point.to_dict(),
            "index": self.index,
            "admissible": list(self.admissible),
            "p_values": list(self.p_values),
            "criterion_met": self.criterion_met,
            "rule": self.rule,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RepairChoice:
        return cls(
            point=SweepPoint.from_dict(d["chosen"]),
            index=int(d["index"]),
            admissible=tuple(bool(a) for a in d["admissible"]),
            criterion_met=bool(d["criterion_met"]),
            rule=str(d["rule"]),
            p_values=tuple(None if p is None else float(p) for p in d["p_values"]),
        )


def choose_repair(
    points: Sequence[SweepPoint],
    base: ValidationScores,
    *,
    max_over_refusal_increase: float,
    max_kl_increase: float,
    significance: float | None = SIGNIFICANCE,
) -> RepairChoice:
    """Pick the repair among ``points`` by the rule of :class:`~refusal_core.study.config.RepairConfig`.

    ``points`` must contain exactly one ``"identity"`` point (the compressed model unedited); its
    KL is the reference for the damage margin; ``base`` holds the base model's validation scores
    (the reference for the over-refusal margin). With ``significance`` (default 0.05), an edit
    is only eligible when its validation compliance is lower than the unedited model's by an
    exact McNemar test on the same prompts at that level: a one-prompt difference on a few dozen
    prompts is noise, and choosing on noise would make the held-out evaluation a coin flip.
    ``None`` compares the rates alone.
    """
    pts = list(points)
    if not pts:
        raise EmptyInputError("the sweep has no points")
    identities = [i for i, p in enumerate(pts) if p.strength == "identity"]
    if len(identities) != 1:
        raise InvalidArgumentError(f"the sweep needs exactly one identity point, found {len(identities)}")
    ident = pts[identities[0]]
    or_cap = base.over_refusal.value + max_over_refusal_increase
    kl_cap = ident.scores.kl + max_kl_increase
    # a tiny tolerance so that float noise in KL cannot flip admissibility of the identity itself
    ok = tuple(p.scores.over_refusal.value <= or_cap + 1e-12 and p.scores.kl <= kl_cap + 1e-12 for p in pts)
    p_values: list[float | None] = []
    for p in pts:
        if p is ident or not p.scores.complied or len(p.scores.complied) != len(ident.scores.complied):
            p_values.append(None)
        else:
            p_values.append(mcnemar(ident.scores.complied, p.scores.complied).p_value)
    rule = (
        f"admissible: over-refusal(val) <= base {base.over_refusal.value:.4f} "
        f"+ {max_over_refusal_increase:g} and KL(val) <= unedited {ident.scores.kl:.4f} "
        f"+ {max_kl_increase:g} nats"
        + (
            f"; an edit must lower harmful compliance(val) below the unedited model's with exact "
            f"McNemar p < {significance:g}"
            if significance is not None
            else ""
        )
        + "; then lowest harmful compliance(val), ties to the weakest edit (|g - 1|), then grid order"
    )

    def eligible(i: int) -> bool:
        if not ok[i]:
            return False
        if pts[i] is ident or significance is None:
            return True
        pv = p_values[i]
        better = pts[i].scores.compliance.value < ident.scores.compliance.value
        return better and pv is not None and pv < significance

    candidates = [i for i in range(len(pts)) if eligible(i)]
    if not candidates:
        return RepairChoice(ident, identities[0], ok, False, rule, tuple(p_values))

    def strength(p: SweepPoint) -> float:
        return max(abs(p.gains[0] - 1.0), abs(p.gains[1] - 1.0))

    best = min(candidates, key=lambda i: (pts[i].scores.compliance.value, strength(pts[i]), i))
    return RepairChoice(pts[best], best, ok, True, rule, tuple(p_values))
