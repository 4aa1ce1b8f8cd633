"""Selection of the refusal direction among all (layer, position) candidates.

Each candidate ``r = directions[l, i]`` gets three scores (Arditi et al. 2024):

* **bypass** — mean refusal score on harmful validation prompts with ``r``
  ablated everywhere (lower is better: the direction is necessary);
* **induce** — mean refusal score on harmless validation prompts with ``r``
  added at block ``l``'s input (higher means the direction is sufficient);
* **kl** — mean KL(base ‖ ablated) of the last-position next-token
  distributions on harmless prompts (ablation should not disturb them).

Default filters discard ``l ≥ 0.8 L``, ``kl > 0.1`` and ``induce ≤ 0``; the
lowest bypass score among the rest wins. Every threshold is a field of
:class:`SelectionConfig` and every candidate's scores are kept.

Candidates are evaluated many at a time: the prompt batch is repeated once per
candidate and each batch row carries its own direction, and the bypass and KL
forwards share one ablated pass over harmful and harmless prompts together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from refusal_core.activations import batch_inputs, encode_prompts, model_device
from refusal_core.artifacts import load_artifact, save_artifact
from refusal_core.directions import DirectionCandidates
from refusal_core.errors import EmptyInputError, InvalidArgumentError, RefusalCoreError
from refusal_core.functional import MIN_DIRECTION_NORM, REFUSAL_SCORE_EPS, check_refusal_ids, check_tensor
from refusal_core.interventions import ablation_hooks, addition_hooks
from refusal_core.models import get_layout, model_identity

__all__ = [
    "SelectionConfig",
    "SelectionResult",
    "last_token_logits",
    "select_direction",
    "select_direction_naive",
]


@dataclass(frozen=True)
class SelectionConfig:
    """Thresholds and batching of the candidate search (defaults: Arditi et al.)."""

    max_layer_fraction: float = 0.8  # discard candidates with layer >= fraction * L
    kl_threshold: float = 0.1  # discard candidates whose KL exceeds this
    induce_threshold: float = 0.0  # discard candidates whose induce score is <= this
    addition_coeff: float = 1.0  # activation addition x + coeff * r for the induce score
    rows_per_forward: int = 256  # batch rows (candidate x prompt) per forward pass
    system: str | None = None  # system prompt used while scoring, if any
    # Candidate subsets, to bound the cost on large models: only these layers (block indices) and
    # positions (negative token offsets, -P..-1) are scored; the others get NaN scores and never pass.
    # None scores all of them.
    layers: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name, sign in (("layers", 1), ("positions", -1)):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (tuple, list)) or len(value) == 0:
                raise InvalidArgumentError(f"{name} must be None or a non-empty tuple of ints, got {value!r}")
            if any(
                isinstance(v, bool) or not isinstance(v, int) or sign * v < (0 if sign > 0 else 1)
                for v in value
            ):
                what = "block indices >= 0" if sign > 0 else "negative token offsets (-P..-1)"
                raise InvalidArgumentError(f"{name} must hold {what}, got {value!r}")
            if len(set(value)) != len(value):
                raise InvalidArgumentError(f"{name} has duplicates: {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not 0.0 < self.max_layer_fraction <= 1.0:
            raise InvalidArgumentError(
                f"max_layer_fraction must lie in (0, 1], got {self.max_layer_fraction}"
            )
        if self.kl_threshold < 0 or math.isnan(self.kl_threshold):
            raise InvalidArgumentError(f"kl_threshold must be >= 0, got {self.kl_threshold}")
        if self.rows_per_forward < 1:
            raise InvalidArgumentError(f"rows_per_forward must be >= 1, got {self.rows_per_forward}")


@dataclass
class SelectionResult:
    """All candidates' scores and the selected source ``(layer, position index)``.

    Score tensors are ``[L, P]`` float64; ``positions[i]`` is the negative
    token offset of position index ``i``. ``selected`` is None when no
    candidate passed the filters; ``fallback`` then holds the lowest-bypass
    candidate below the layer cut that still passes the induce filter (only the
    KL filter relaxed), or, when none does, the lowest-bypass one below the cut.
    """

    bypass: torch.Tensor
    induce: torch.Tensor
    kl: torch.Tensor
    passed: torch.Tensor
    positions: list[int]
    baseline_harmful: float
    baseline_harmless: float
    selected: tuple[int, int] | None
    fallback: tuple[int, int] | None
    config: dict[str, Any]
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> tuple[int, int]:
        """The selected source, or the unfiltered fallback; raises when neither exists."""
        src = self.selected if self.selected is not None else self.fallback
        if src is None:
            raise RefusalCoreError("no candidate direction is available (all layers were cut)")
        return src

    @property
    def source_position(self) -> int:
        """The selected position as a negative token offset (-P..-1)."""
        return self.positions[self.source[1]]

    def save(self, path: Path) -> None:
        meta = {
            "positions": self.positions,
            "baseline_harmful": self.baseline_harmful,
            "baseline_harmless": self.baseline_harmless,
            "selected": list(self.selected) if self.selected else None,
            "fallback": list(self.fallback) if self.fallback else None,
            "candidates": _candidate_table(self),
        }
        save_artifact(
            Path(path),
            tensors={"bypass": self.bypass, "induce": self.induce, "kl": self.kl, "passed": self.passed},
            meta=meta,
            identity=self.identity,
            settings=self.config,
        )

    @classmethod
    def load(cls, path: Path, *, expect_identity: dict[str, Any] | None = None) -> SelectionResult:
        art = load_artifact(Path(path), expect_identity=expect_identity)
        meta, t = art.meta, art.tensors
        return cls(
            bypass=t["bypass"],
            induce=t["induce"],
            kl=t["kl"],
            passed=t["passed"],
            positions=list(meta["positions"]),
            baseline_harmful=float(meta["baseline_harmful"]),
            baseline_harmless=float(meta["baseline_harmless"]),
            selected=tuple(meta["selected"]) if meta["selected"] else None,
            fallback=tuple(meta["fallback"]) if meta["fallback"] else None,
            config=art.settings,
            identity=art.identity,
        )


def _candidate_table(res: SelectionResult) -> list[dict[str, Any]]:
    rows = []
    n_layers, n_pos = res.bypass.shape
    for layer in range(n_layers):
        for i in range(n_pos):
            rows.append(
                {
                    "layer": layer,
                    "position": res.positions[i],
                    "bypass": float(res.bypass[layer, i]),
                    "induce": float(res.induce[layer, i]),
                    "kl": float(res.kl[layer, i]),
                    "passed": bool(res.passed[layer, i]),
                }
            )
    return rows


# ----------------------------------------------------------------------------
# batched forward helpers
# ----------------------------------------------------------------------------


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


@torch.inference_mode()
def last_token_logits(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Next-token logits after each token-id prompt (left-padded batch): ``[B, vocab]`` float64.

    Position ids count real tokens only, so a prompt's logits do not depend on
    how much padding its batch needs.
    """
    inputs = batch_inputs(prompts, pad_id, model_device(model))
    out = model(**inputs, logits_to_keep=1, use_cache=False)
    return out.logits[:, -1, :].to(torch.float64).cpu()


def _scores_from_logits(logits: torch.Tensor, refusal_ids: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    p = logp[:, refusal_ids].exp().sum(-1)
    return torch.log(p + REFUSAL_SCORE_EPS) - torch.log(1 - p + REFUSAL_SCORE_EPS)


def _kl(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    lp, lq = torch.log_softmax(base_logits, -1), torch.log_softmax(logits, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _run_rows(
    model: nn.Module,
    prompts: list[list[int]],
    directions: torch.Tensor,
    *,
    pad_id: int,
    mode: str,
    layer: int | None,
    coeff: float,
) -> torch.Tensor:
    """Logits for ``prompts`` (one per row) under per-row ``directions [rows, d]``."""
    dtype = next(model.parameters()).dtype
    r = directions.to(dtype)
    if mode == "ablate":
        with ablation_hooks(model, r):
            return last_token_logits(model, prompts, pad_id)
    assert layer is not None
    with addition_hooks(model, r, coeff, layer):
        return last_token_logits(model, prompts, pad_id)


def _usable(r: torch.Tensor) -> bool:
    return float(torch.linalg.vector_norm(r.to(torch.float64))) > MIN_DIRECTION_NORM


def _validate(
    candidates: DirectionCandidates,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_ids: Sequence[int],
) -> torch.Tensor:
    if len(harmful) == 0:
        raise EmptyInputError("harmful validation prompts are empty")
    if len(harmless) == 0:
        raise EmptyInputError("harmless validation prompts are empty")
    check_tensor(candidates.directions, "candidates.directions", ndim=3)
    ids = check_refusal_ids(refusal_ids)  # integers only: 1.7 is not silently id 1
    if ids.numel() == 0:
        raise EmptyInputError("refusal_token_ids is empty")
    return ids


def _scored_sites(candidates: DirectionCandidates, config: SelectionConfig) -> list[tuple[int, int]]:
    """The (layer, position index) sites the config asks to score, in (layer, position) order.

    Raises when a requested layer or position does not exist, before any forward pass.
    """
    n_layers, n_pos = int(candidates.directions.shape[0]), int(candidates.directions.shape[1])
    positions = list(candidates.positions)
    if config.layers is not None and any(layer >= n_layers for layer in config.layers):
        raise InvalidArgumentError(f"config.layers {config.layers} name blocks outside [0, {n_layers})")
    if config.positions is not None and any(p not in positions for p in config.positions):
        raise InvalidArgumentError(
            f"config.positions {config.positions} are not among the candidates' {positions}"
        )
    layers = set(range(n_layers) if config.layers is None else config.layers)
    pos_idx = set(
        range(n_pos) if config.positions is None else (positions.index(p) for p in config.positions)
    )
    return [(layer, i) for layer in range(n_layers) for i in range(n_pos) if layer in layers and i in pos_idx]


def _filters(
    bypass: torch.Tensor, induce: torch.Tensor, kl: torch.Tensor, config: SelectionConfig
) -> tuple[torch.Tensor, tuple[int, int] | None, tuple[int, int] | None]:
    n_layers = bypass.shape[0]
    # DESIGN.md's rule taken literally: discard l >= 0.8 L (Arditi et al.'s code truncates 0.8 L to an
    # int first, which differs when 0.8 L is not whole, e.g. L = 4 keeps layer 3 here).
    layer_ok = torch.arange(n_layers).unsqueeze(1) < config.max_layer_fraction * n_layers
    layer_ok = layer_ok.expand_as(bypass) & ~torch.isnan(bypass)
    passed = layer_ok & (kl <= config.kl_threshold) & (induce > config.induce_threshold)

    def argmin(where: torch.Tensor) -> tuple[int, int] | None:
        if not bool(where.any()):
            return None
        masked = torch.where(where, bypass, torch.full_like(bypass, math.inf))
        flat = int(torch.argmin(masked))  # first minimum in (layer, position) order on ties
        return flat // bypass.shape[1], flat % bypass.shape[1]

    selected = argmin(passed)
    fallback = None
    if selected is None:
        # Relax the KL filter first (small models often exceed it), then the induce filter too.
        fallback = argmin(layer_ok & (induce > config.induce_threshold))
        if fallback is None:
            fallback = argmin(layer_ok)
    return passed, selected, fallback


def select_direction(
    model: nn.Module,
    tokenizer: Any,
    candidates: DirectionCandidates,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    refusal_token_ids: Sequence[int],
    config: SelectionConfig | None = None,
    *,
    progress: bool = False,
) -> SelectionResult:
    """Score every candidate of ``candidates`` and pick the refusal direction (batched)."""
    config = config or SelectionConfig()
    ref_ids = _validate(candidates, harmful_val, harmless_val, refusal_token_ids)
    layout = get_layout(model)
    head = layout.lm_head.weight
    assert isinstance(head, torch.Tensor)
    check_refusal_ids(ref_ids, int(head.shape[0]))  # the logits' vocabulary: no IndexError mid-scoring
    dirs = candidates.directions
    n_layers, n_pos, d = dirs.shape
    if n_layers != layout.n_layers or d != layout.d_model:
        raise InvalidArgumentError(
            f"candidates have shape [L={n_layers}, P={n_pos}, d={d}] but the model has "
            f"L={layout.n_layers}, d={layout.d_model}"
        )
    scored = _scored_sites(candidates, config)
    pad = _pad_id(tokenizer)
    harm = encode_prompts(tokenizer, list(harmful_val), system=config.system)
    safe = encode_prompts(tokenizer, list(harmless_val), system=config.system)
    both = harm + safe
    base_h = last_token_logits(model, harm, pad)
    base_s = last_token_logits(model, safe, pad)

    # Sites with a (numerically) zero direction have no unit vector: block 0 at template
    # positions sees the same tokens in every prompt. They get NaN scores and never pass.
    valid = [layer * n_pos + i for layer, i in scored if _usable(dirs[layer, i])]
    flat = dirs.reshape(n_layers * n_pos, d)
    bypass = torch.full((n_layers * n_pos,), math.nan, dtype=torch.float64)
    kl = torch.full_like(bypass, math.nan)
    induce = torch.full_like(bypass, math.nan)
    bar = tqdm(total=2 * len(valid), desc="select", disable=not progress, leave=False)
    per = max(1, config.rows_per_forward // len(both))
    for start in range(0, len(valid), per):
        chunk = valid[start : start + per]
        rows = [p for _ in chunk for p in both]
        rdirs = flat[chunk].repeat_interleave(len(both), dim=0)
        logits = _run_rows(model, rows, rdirs, pad_id=pad, mode="ablate", layer=None, coeff=0.0)
        logits = logits.reshape(len(chunk), len(both), -1)
        for j, k in enumerate(chunk):
            bypass[k] = _scores_from_logits(logits[j, : len(harm)], ref_ids).mean()
            kl[k] = _kl(base_s, logits[j, len(harm) :]).mean()
        bar.update(len(chunk))

    per = max(1, config.rows_per_forward // len(safe))
    for layer in range(n_layers):
        sites = [k for k in valid if k // n_pos == layer]
        for start in range(0, len(sites), per):
            chunk = sites[start : start + per]
            rows = [p for _ in chunk for p in safe]
            rdirs = flat[chunk].repeat_interleave(len(safe), dim=0)
            logits = _run_rows(
                model, rows, rdirs, pad_id=pad, mode="add", layer=layer, coeff=config.addition_coeff
            )
            scores = _scores_from_logits(logits, ref_ids).reshape(len(chunk), len(safe))
            induce[chunk] = scores.mean(1)
            bar.update(len(chunk))
    bar.close()
    return _result(
        bypass.reshape(n_layers, n_pos),
        induce.reshape(n_layers, n_pos),
        kl.reshape(n_layers, n_pos),
        candidates,
        config,
        float(_scores_from_logits(base_h, ref_ids).mean()),
        float(_scores_from_logits(base_s, ref_ids).mean()),
        model,
    )


def _result(
    bypass: torch.Tensor,
    induce: torch.Tensor,
    kl: torch.Tensor,
    candidates: DirectionCandidates,
    config: SelectionConfig,
    base_h: float,
    base_s: float,
    model: nn.Module,
) -> SelectionResult:
    passed, selected, fallback = _filters(bypass, induce, kl, config)
    return SelectionResult(
        bypass=bypass,
        induce=induce,
        kl=kl,
        passed=passed,
        positions=list(candidates.positions),
        baseline_harmful=base_h,
        baseline_harmless=base_s,
        selected=selected,
        fallback=fallback,
        config=asdict(config),
        identity=model_identity(model),
    )


def select_direction_naive(
    model: nn.Module,
    tokenizer: Any,
    candidates: DirectionCandidates,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    refusal_token_ids: Sequence[int],
    config: SelectionConfig | None = None,
) -> SelectionResult:
    """The same scores, one candidate at a time (three forwards each): the benchmark's baseline
    and the test oracle for :func:`select_direction`."""
    config = config or SelectionConfig()
    ref_ids = _validate(candidates, harmful_val, harmless_val, refusal_token_ids)
    dirs = candidates.directions
    n_layers, n_pos, _ = dirs.shape
    scored = _scored_sites(candidates, config)
    pad = _pad_id(tokenizer)
    harm = encode_prompts(tokenizer, list(harmful_val), system=config.system)
    safe = encode_prompts(tokenizer, list(harmless_val), system=config.system)
    base_h = last_token_logits(model, harm, pad)
    base_s = last_token_logits(model, safe, pad)
    dtype = next(model.parameters()).dtype
    bypass = torch.full((n_layers, n_pos), math.nan, dtype=torch.float64)
    induce = torch.full_like(bypass, math.nan)
    kl = torch.full_like(bypass, math.nan)
    for layer, i in scored:
        if _usable(dirs[layer, i]):
            r = dirs[layer, i].to(dtype)
            with ablation_hooks(model, r):
                lh = last_token_logits(model, harm, pad)
                ls = last_token_logits(model, safe, pad)
            with addition_hooks(model, r, config.addition_coeff, layer):
                la = last_token_logits(model, safe, pad)
            bypass[layer, i] = _scores_from_logits(lh, ref_ids).mean()
            kl[layer, i] = _kl(base_s, ls).mean()
            induce[layer, i] = _scores_from_logits(la, ref_ids).mean()
    return _result(
        bypass,
        induce,
        kl,
        candidates,
        config,
        float(_scores_from_logits(base_h, ref_ids).mean()),
        float(_scores_from_logits(base_s, ref_ids).mean()),
        model,
    )
