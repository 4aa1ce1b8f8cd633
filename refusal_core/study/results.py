"""The study's results, typed: what ``results.json`` holds, read by attribute.

:class:`StudyResults` is the whole file; each model the study measured is one
:class:`VariantResult` (the base, a compressed model, or a repaired one) with
its :class:`MechanismSummary`, its :class:`EvaluationSummary` on the held-out
test prompts and its paired :class:`Comparisons`. ``to_dict()`` gives the JSON
of ``results.json`` and ``from_dict()`` reads it back; the report, the command
line and the real tier read these objects, never the raw dicts.

Example:
    >>> from refusal_core.stats import rate
    >>> m = MechanismSummary(rate(8, 8), rate(0, 8), rate(6, 8))
    >>> MechanismSummary.from_dict(m.to_dict()) == m, m.necessity.value
    (True, 0.0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from refusal_core._version import code_version
from refusal_core.evaluation.attacks import ATTACKS
from refusal_core.saving import finite_or_null
from refusal_core.stats import MeanDifference, PairedTest, Rate, mcnemar, paired_mean_difference, rate_of
from refusal_core.study.sweep import RepairChoice, SweepPoint, ValidationScores

__all__ = [
    "NOT_PAIRED_TESTABLE",
    "AsrChange",
    "BaseSummary",
    "Comparison",
    "Comparisons",
    "DamageSummary",
    "EvaluationSummary",
    "MechanismSummary",
    "RepairSummary",
    "StudyResults",
    "SweepSummary",
    "VariantResult",
]

#: Attacks whose per-prompt outcomes are not independent given the model (the registry's
#: ``not_paired``): the study's GCG optimizes ONE universal suffix per model, so every prompt's
#: outcome moves with that one suffix and a paired per-prompt test (McNemar) would overstate the
#: evidence. Their rates are reported without a test.
NOT_PAIRED_TESTABLE = {name: spec.not_paired for name, spec in ATTACKS.items() if spec.not_paired}

#: The per-prompt refusal flags of a mechanism stage, in the order they are compared.
MECHANISM_FLAGS = ("refused_harmful", "refused_ablated", "refused_added")


def _tests(d: Mapping[str, Any]) -> dict[str, PairedTest]:
    return {str(k): PairedTest.from_dict(v) for k, v in d.items()}


@dataclass(frozen=True)
class MechanismSummary:
    """Refusal on harmful test prompts as is, with the variant's own direction ablated (necessity:
    low when the direction is necessary), and on harmless ones with it added (sufficiency)."""

    refusal_rate_harmful: Rate
    necessity: Rate
    sufficiency: Rate

    @classmethod
    def from_flags(cls, mech: Mapping[str, Sequence[bool]]) -> MechanismSummary:
        """From a mechanism stage's per-prompt flags (``refused_harmful``, ``_ablated``, ``_added``)."""
        return cls(
            rate_of(mech["refused_harmful"]), rate_of(mech["refused_ablated"]), rate_of(mech["refused_added"])
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "refusal_rate_harmful": self.refusal_rate_harmful.to_dict(),
            "necessity": self.necessity.to_dict(),
            "sufficiency": self.sufficiency.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MechanismSummary:
        return cls(
            Rate.from_dict(d["refusal_rate_harmful"]),
            Rate.from_dict(d["necessity"]),
            Rate.from_dict(d["sufficiency"]),
        )


@dataclass(frozen=True)
class DamageSummary:
    """Mean KL(base ‖ variant) of the next-token distribution and mean cross-entropy (nats/token) of
    the base's completions, over ``n`` harmless test prompts (None: no prompt)."""

    kl_mean: float | None
    ce_mean: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"kl_mean": self.kl_mean, "ce_mean": self.ce_mean, "n": self.n}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DamageSummary:
        kl, ce = d.get("kl_mean"), d.get("ce_mean")
        return cls(None if kl is None else float(kl), None if ce is None else float(ce), int(d["n"]))


@dataclass(frozen=True)
class EvaluationSummary:
    """One variant on the held-out test prompts: ASR per attack, over-refusal, damage, accuracy."""

    asr: dict[str, Rate]
    asr_per_config: dict[str, dict[str, float]]
    over_refusal: Rate
    degenerate: dict[str, int]
    damage: DamageSummary
    accuracy: dict[str, dict[str, Any]]

    @classmethod
    def from_evaluation(cls, ev: Mapping[str, Any]) -> EvaluationSummary:
        """From an evaluation stage's per-prompt record (``jailbroken``, ``refused_harmless``, ...)."""
        kl = [float(v) for v in ev["damage"]["kl_per_prompt"]]
        ce = [float(v) for v in ev["damage"]["ce_per_prompt"]]
        return cls(
            asr={name: rate_of(flags) for name, flags in ev["jailbroken"].items()},
            asr_per_config=ev["asr_per_config"],
            over_refusal=rate_of(ev["refused_harmless"]),
            degenerate=dict(ev["degenerate"]),
            damage=DamageSummary(
                kl_mean=sum(kl) / len(kl) if kl else None,
                ce_mean=sum(ce) / len(ce) if ce else None,
                n=len(kl),
            ),
            accuracy=ev["accuracy"],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "asr": {name: r.to_dict() for name, r in self.asr.items()},
            "asr_per_config": self.asr_per_config,
            "over_refusal": self.over_refusal.to_dict(),
            "degenerate": dict(self.degenerate),
            "damage": self.damage.to_dict(),
            "accuracy": self.accuracy,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvaluationSummary:
        return cls(
            asr={str(k): Rate.from_dict(v) for k, v in d["asr"].items()},
            asr_per_config={str(k): dict(v) for k, v in d.get("asr_per_config", {}).items()},
            over_refusal=Rate.from_dict(d["over_refusal"]),
            degenerate={str(k): int(v) for k, v in d.get("degenerate", {}).items()},
            damage=DamageSummary.from_dict(d["damage"]),
            accuracy={str(k): dict(v) for k, v in d.get("accuracy", {}).items()},
        )


@dataclass(frozen=True)
class Comparison:
    """Paired tests of a variant against a reference model on the same test prompts: exact McNemar
    per attack and for over-refusal, paired bootstrap for KL and CE (None: not tested)."""

    asr: dict[str, PairedTest] = field(default_factory=dict)
    over_refusal: PairedTest | None = None
    kl: MeanDifference | None = None
    ce: MeanDifference | None = None

    @classmethod
    def between(cls, ev: Mapping[str, Any], ref: Mapping[str, Any], *, kl: bool) -> Comparison:
        """``ev`` against ``ref`` (evaluation stages' records). ``kl=False`` skips the KL test: against
        the base, whose KL with itself is 0 on every prompt, any nonzero KL is "significant"."""
        asr: dict[str, PairedTest] = {}
        for name, flags in ev["jailbroken"].items():
            if name in NOT_PAIRED_TESTABLE:
                continue
            if name in ref["jailbroken"] and len(ref["jailbroken"][name]) == len(flags):
                asr[name] = mcnemar(ref["jailbroken"][name], flags)
        damage: dict[str, MeanDifference | None] = {"kl": None, "ce": None}
        for key, field_name in (("kl", "kl_per_prompt"), ("ce", "ce_per_prompt")):
            if key == "kl" and not kl:
                continue
            a, b = ref["damage"][field_name], ev["damage"][field_name]
            if a and len(a) == len(b) and ref["damage"].get("ce_prompts") == ev["damage"].get("ce_prompts"):
                damage[key] = paired_mean_difference(a, b)
        return cls(
            asr=asr,
            over_refusal=mcnemar(ref["refused_harmless"], ev["refused_harmless"]),
            kl=damage["kl"],
            ce=damage["ce"],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "asr": {name: t.to_dict() for name, t in self.asr.items()},
            "over_refusal": None if self.over_refusal is None else self.over_refusal.to_dict(),
            "kl": None if self.kl is None else self.kl.to_dict(),
            "ce": None if self.ce is None else self.ce.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Comparison:
        o, kl, ce = d.get("over_refusal"), d.get("kl"), d.get("ce")
        return cls(
            asr=_tests(d.get("asr", {})),
            over_refusal=None if o is None else PairedTest.from_dict(o),
            kl=None if kl is None else MeanDifference.from_dict(kl),
            ce=None if ce is None else MeanDifference.from_dict(ce),
        )


@dataclass(frozen=True)
class Comparisons:
    """A variant's paired comparisons: compressed against the base, repaired against the base and
    against its unedited compressed model, and the mechanism flags (McNemar per flag)."""

    vs_base: Comparison | None = None
    vs_compressed: Comparison | None = None
    mechanism_vs_base: dict[str, PairedTest] | None = None
    mechanism_vs_compressed: dict[str, PairedTest] | None = None
    #: the base direction's mechanism flags in this model against the base's own (same prompts)
    base_direction_mechanism_vs_base: dict[str, PairedTest] | None = None

    @property
    def reference(self) -> Comparison | None:
        """The comparison a variant's table cells are marked against: vs compressed, else vs base."""
        return self.vs_compressed or self.vs_base

    @property
    def mechanism_reference(self) -> dict[str, PairedTest]:
        return self.mechanism_vs_compressed or self.mechanism_vs_base or {}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.vs_base is not None:
            out["vs_base"] = self.vs_base.to_dict()
        if self.vs_compressed is not None:
            out["vs_compressed"] = self.vs_compressed.to_dict()
        if self.mechanism_vs_compressed is not None:
            out["mechanism_vs_compressed"] = {k: t.to_dict() for k, t in self.mechanism_vs_compressed.items()}
        if self.mechanism_vs_base is not None:
            out["mechanism_vs_base"] = {k: t.to_dict() for k, t in self.mechanism_vs_base.items()}
        if self.base_direction_mechanism_vs_base is not None:
            out["base_direction_mechanism_vs_base"] = {
                k: t.to_dict() for k, t in self.base_direction_mechanism_vs_base.items()
            }
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Comparisons:
        return cls(
            vs_base=Comparison.from_dict(d["vs_base"]) if "vs_base" in d else None,
            vs_compressed=Comparison.from_dict(d["vs_compressed"]) if "vs_compressed" in d else None,
            mechanism_vs_base=_tests(d["mechanism_vs_base"]) if "mechanism_vs_base" in d else None,
            mechanism_vs_compressed=(
                _tests(d["mechanism_vs_compressed"]) if "mechanism_vs_compressed" in d else None
            ),
            base_direction_mechanism_vs_base=(
                _tests(d["base_direction_mechanism_vs_base"])
                if "base_direction_mechanism_vs_base" in d
                else None
            ),
        )


@dataclass(frozen=True)
class AsrChange:
    """The paper's quantities for one attack: ASR of the base, the compressed and the repaired model,
    the absolute and relative reduction, and the share of compression's rise recovered."""

    asr_base: float
    asr_compressed: float
    asr_repaired: float
    absolute_reduction: float
    relative_reduction: float | None
    share_of_rise_recovered: float | None

    @classmethod
    def of(cls, base: Sequence[bool], compressed: Sequence[bool], repaired: Sequence[bool]) -> AsrChange:
        a_b = sum(base) / len(base)
        a_c = sum(compressed) / len(compressed)
        a_r = sum(repaired) / len(repaired)
        rise = a_c - a_b
        return cls(
            asr_base=a_b,
            asr_compressed=a_c,
            asr_repaired=a_r,
            absolute_reduction=a_c - a_r,
            relative_reduction=(a_c - a_r) / a_c if a_c > 0 else None,
            share_of_rise_recovered=(a_c - a_r) / rise if rise > 0 else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "asr_base": self.asr_base,
            "asr_compressed": self.asr_compressed,
            "asr_repaired": self.asr_repaired,
            "absolute_reduction": self.absolute_reduction,
            "relative_reduction": self.relative_reduction,
            "share_of_rise_recovered": self.share_of_rise_recovered,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AsrChange:
        def opt(v: Any) -> float | None:
            return None if v is None else float(v)

        return cls(
            float(d["asr_base"]),
            float(d["asr_compressed"]),
            float(d["asr_repaired"]),
            float(d["absolute_reduction"]),
            opt(d.get("relative_reduction")),
            opt(d.get("share_of_rise_recovered")),
        )


@dataclass(frozen=True)
class RepairSummary:
    """How a repaired variant was made: the sweep arm, the strength and where it edited.

    ``same_as`` names the compressed model when no edit was chosen (the variant IS that model, and
    carries no layers, strengths or edit record). ``checkpoint``: where the study saved the repaired
    model (relative to the run directory), None when it saved none.
    """

    arm: str
    how: str
    point: dict[str, Any] | None
    criterion_met: bool | None
    same_as: str | None = None
    layers: list[int] | None = None
    alphas: list[float] | None = None
    gains: list[float] | None = None
    record: dict[str, Any] | None = None
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "arm": self.arm,
            "how": self.how,
            "point": self.point,
            "criterion_met": self.criterion_met,
        }
        if self.same_as is not None:
            out["same_as"] = self.same_as
        else:
            out |= {"layers": self.layers, "alphas": self.alphas, "gains": self.gains, "record": self.record}
        if self.checkpoint is not None:
            out["checkpoint"] = self.checkpoint
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RepairSummary:
        return cls(
            arm=str(d["arm"]),
            how=str(d["how"]),
            point=d.get("point"),
            criterion_met=d.get("criterion_met"),
            same_as=d.get("same_as"),
            layers=d.get("layers"),
            alphas=d.get("alphas"),
            gains=d.get("gains"),
            record=d.get("record"),
            checkpoint=d.get("checkpoint"),
        )


_ANALYSIS_KEYS = ("source", "source_shift", "cosine_at_base_source", "cosine_selected", "filters_passed")


@dataclass(frozen=True)
class VariantResult:
    """One model the study measured: ``kind`` is ``base``, ``compressed`` or ``repaired``.

    An analysed variant (every one but a repaired variant with ``repair.same_as``) carries its
    re-selected ``source`` (layer, position), the shift from the base source, the cosines with the
    base direction, whether the selection filters passed, its ``sparsity`` and its ``mechanism``.
    """

    name: str
    kind: str
    method: str | None
    source: list[int] | None = None
    source_shift: list[int] | None = None
    cosine_at_base_source: float | None = None
    cosine_selected: float | None = None
    filters_passed: bool | None = None
    sparsity: float | None = None
    mechanism: MechanismSummary | None = None
    #: the base direction's mechanism in this (compressed) model (``base_direction_mechanism`` on)
    base_direction_mechanism: MechanismSummary | None = None
    compression_config: dict[str, Any] | None = None
    quantization_error: dict[str, Any] | None = None
    repair: RepairSummary | None = None
    evaluation: EvaluationSummary | None = None
    comparisons: Comparisons | None = None
    headline: dict[str, AsrChange] | None = None

    @property
    def same_as(self) -> str | None:
        """The compressed model this variant is, when no repair was chosen."""
        return self.repair.same_as if self.repair is not None else None

    @property
    def analysed(self) -> bool:
        return self.same_as is None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "method": self.method}
        if self.kind == "compressed":
            out["compression_config"] = self.compression_config
            out["quantization_error"] = self.quantization_error
        if self.analysed:
            out |= {k: getattr(self, k) for k in _ANALYSIS_KEYS}
            out["sparsity"] = self.sparsity
        if self.repair is not None:
            out["repair"] = self.repair.to_dict()
        if self.mechanism is not None:
            out["mechanism"] = self.mechanism.to_dict()
        if self.base_direction_mechanism is not None:
            out["base_direction_mechanism"] = self.base_direction_mechanism.to_dict()
        if self.evaluation is not None:
            out["evaluation"] = self.evaluation.to_dict()
            out["comparisons"] = (self.comparisons or Comparisons()).to_dict()
        if self.headline is not None:
            out["headline"] = {name: h.to_dict() for name, h in self.headline.items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VariantResult:
        return cls(
            name=str(d["name"]),
            kind=str(d["kind"]),
            method=d.get("method"),
            source=d.get("source"),
            source_shift=d.get("source_shift"),
            cosine_at_base_source=d.get("cosine_at_base_source"),
            cosine_selected=d.get("cosine_selected"),
            filters_passed=d.get("filters_passed"),
            sparsity=d.get("sparsity"),
            mechanism=MechanismSummary.from_dict(d["mechanism"]) if "mechanism" in d else None,
            base_direction_mechanism=(
                MechanismSummary.from_dict(d["base_direction_mechanism"])
                if "base_direction_mechanism" in d
                else None
            ),
            compression_config=d.get("compression_config"),
            quantization_error=d.get("quantization_error"),
            repair=RepairSummary.from_dict(d["repair"]) if "repair" in d else None,
            evaluation=EvaluationSummary.from_dict(d["evaluation"]) if "evaluation" in d else None,
            comparisons=Comparisons.from_dict(d["comparisons"]) if "comparisons" in d else None,
            headline=(
                {str(k): AsrChange.from_dict(h) for k, h in d["headline"].items()}
                if "headline" in d
                else None
            ),
        )


@dataclass(frozen=True)
class BaseSummary:
    """The base model's selected source, its split-half noise floor there, ‖r‖ and validation scores."""

    source: list[int]
    source_position: int
    filters_passed: bool
    noise_floor_at_source: float | None
    direction_norm: float
    validation: ValidationScores

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "source_position": self.source_position,
            "filters_passed": self.filters_passed,
            "noise_floor_at_source": self.noise_floor_at_source,
            "direction_norm": self.direction_norm,
            "validation": self.validation.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BaseSummary:
        nf = d.get("noise_floor_at_source")
        return cls(
            source=[int(x) for x in d["source"]],
            source_position=int(d["source_position"]),
            filters_passed=bool(d["filters_passed"]),
            noise_floor_at_source=None if nf is None else float(nf),
            direction_norm=float(d["direction_norm"]),
            validation=ValidationScores.from_dict(d["validation"]),
        )


@dataclass(frozen=True)
class SweepSummary:
    """One compressed model's AIRD sweep (validation scores of every point) and the choice per arm."""

    points: list[SweepPoint]
    choices: dict[str, RepairChoice]

    def to_dict(self) -> dict[str, Any]:
        return {
            "points": [p.to_dict() for p in self.points],
            "choices": {arm: ch.to_dict() for arm, ch in self.choices.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepSummary:
        return cls(
            points=[SweepPoint.from_dict(p) for p in d["points"]],
            choices={str(arm): RepairChoice.from_dict(ch) for arm, ch in d["choices"].items()},
        )


#: Layout version of results.json: raised when a key changes meaning or goes away.
RESULTS_SCHEMA_VERSION = 1


def results_provenance() -> dict[str, Any]:
    """When and by which code a results.json was written (UTC time, version, git commit if any)."""
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return {"created_utc": now.isoformat(), "refusal_core": code_version()}


@dataclass(frozen=True)
class StudyResults:
    """Everything ``results.json`` holds; ``to_dict()`` is its content."""

    model: dict[str, Any]
    settings: dict[str, Any]
    refusal_token_ids: list[int]
    base: BaseSummary
    noise_floor: list[list[float | None]]
    variants: list[VariantResult]
    sweeps: dict[str, SweepSummary]
    saturated_attacks: dict[str, str]
    untested_attacks: dict[str, str]
    significance_level: float
    timings: dict[str, Any]
    reproduce: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=results_provenance)

    def variant(self, name: str) -> VariantResult:
        """The variant called ``name`` (KeyError naming the known ones otherwise)."""
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"no variant {name!r}; the study has {[v.name for v in self.variants]}")

    def to_dict(self) -> dict[str, Any]:
        # Strict JSON: a value not measured (NaN in memory, e.g. a CE never computed) is written null.
        return finite_or_null(
            {
                "model": self.model,
                "settings": self.settings,
                "refusal_token_ids": self.refusal_token_ids,
                "base": self.base.to_dict(),
                "noise_floor": self.noise_floor,
                "variants": [v.to_dict() for v in self.variants],
                "sweeps": {m: s.to_dict() for m, s in self.sweeps.items()},
                "saturated_attacks": self.saturated_attacks,
                "untested_attacks": self.untested_attacks,
                "significance_level": self.significance_level,
                "timings": self.timings,
                "reproduce": self.reproduce,
                "schema_version": RESULTS_SCHEMA_VERSION,
                "provenance": self.provenance,
            }
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StudyResults:
        return cls(
            model=dict(d["model"]),
            settings=dict(d["settings"]),
            refusal_token_ids=[int(i) for i in d["refusal_token_ids"]],
            base=BaseSummary.from_dict(d["base"]),
            noise_floor=[list(row) for row in d["noise_floor"]],
            variants=[VariantResult.from_dict(v) for v in d["variants"]],
            sweeps={str(m): SweepSummary.from_dict(s) for m, s in d.get("sweeps", {}).items()},
            saturated_attacks=dict(d.get("saturated_attacks", {})),
            untested_attacks=dict(d.get("untested_attacks", {})),
            significance_level=float(d.get("significance_level", 0.05)),
            timings=dict(d.get("timings", {})),
            reproduce=dict(d.get("reproduce", {})),
            provenance=dict(d.get("provenance", {})),
        )
