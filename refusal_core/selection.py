"""Selection of the refusal direction among all (layer, position) candidates.

Each candidate ``r = directions[l, i]`` gets three scores (Arditi et al. 2024):

* **bypass** — mean refusal score on harmful validation prompts with ``r``
  ablated everywhere (lower is better: the direction is necessary);
* **induce** — mean refusal score on harmless validation prompts with ``r``
  added at block ``l``'s input (higher means the direction is sufficient);
* **kl** — mean KL(base ‖ ablated) of the last-position next-token
  distributions on harmless prompts (ablation should not disturb them).

The filter-and-pick step is :func:`select_from_scores`, with the defaults of
Arditi et al.'s ``select_direction.py``: a candidate is discarded when any of
its scores is NaN, when ``layer >= ⌊0.8·L⌋`` (:func:`layer_cut`), when
``kl > 0.1`` or when ``induce < 0`` (an induce score of exactly 0 is kept);
the lowest bypass score among the rest wins, ties going to the first
candidate in their iteration order (position -P..-1 outer, layer inner). Every
threshold is a field of :class:`SelectionConfig` and every candidate's scores
are kept. Candidates at or beyond the layer cut are never scored (NaN).

Example:
    >>> select_from_scores(
    ...     [
    ...         {"layer": 1, "position": -1, "bypass": -2.0, "induce": 0.0, "kl": 0.1},
    ...         {"layer": 3, "position": -1, "bypass": -9.0, "induce": 5.0, "kl": 0.0},
    ...     ],
    ...     n_layers=4,
    ... )
    (1, -1)

Candidates are evaluated many at a time, each batch row carrying its own
direction. Prompts are grouped by token length so a forward pads little. The
bypass and KL forwards share one ablated pass over harmful and harmless
prompts together (ablation acts from the embedding on, so nothing is reused).
The induce score adds ``r`` at block ``l``'s input, which cannot change the
blocks below ``l``: their outputs come from one clean forward per prompt group
(which also gives the base logits), and each candidate batch runs only blocks
``l..L-1``, the final norm and ``lm_head``. That suffix replays the keyword
arguments (mask, rotary embeddings, position ids) the model passed to each
block in the clean forward; it is checked against the model's own logits on
every group and, should it ever disagree, the induce pass falls back to full
hooked forwards.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from refusal_core.activations import block_input
from refusal_core.directions import DirectionCandidates, check_direction_origin
from refusal_core.errors import EmptyInputError, InvalidArgumentError, RefusalCoreError
from refusal_core.evaluation.generation import forward_last_logits
from refusal_core.evaluation.scores import refusal_scores
from refusal_core.functional import MIN_DIRECTION_NORM, check_refusal_ids, check_tensor, refusal_score
from refusal_core.interventions import ablation_hooks, addition_hooks
from refusal_core.model import (
    ModelLayout,
    check_instructions,
    encode_prompts,
    get_layout,
    model_identity,
    pad_token_id,
)
from refusal_core.saving import finite_or_null, load_artifact, save_artifact

__all__ = [
    "SCORE_KEYS",
    "SelectionConfig",
    "SelectionResult",
    "filter_prompts_by_refusal",
    "last_token_logits",
    "layer_cut",
    "select_direction",
    "select_direction_naive",
    "select_from_scores",
]

#: The keys every row given to :func:`select_from_scores` must carry.
SCORE_KEYS = ("layer", "position", "bypass", "induce", "kl")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class SelectionConfig:
    """Thresholds and batching of the candidate search (defaults: Arditi et al.'s code).

    ``max_layer_fraction`` f discards every layer ``l >= ⌊f·L⌋`` (Arditi et
    al.: ``layer >= int(n_layer * (1.0 - 0.2))``; see :func:`layer_cut`).
    ``kl_threshold`` discards ``kl > threshold`` and ``induce_threshold``
    discards ``induce < threshold``: a score equal to its threshold is kept.
    ``filter_prompts`` (off by default) first drops the harmful validation
    prompts the model does not refuse and the harmless ones it does
    (:func:`filter_prompts_by_refusal`), as Arditi et al.'s pipeline does.
    """

    max_layer_fraction: float = 0.8  # discard candidates with layer >= floor(fraction * L)
    kl_threshold: float = 0.1  # discard candidates whose KL exceeds this
    induce_threshold: float = 0.0  # discard candidates whose induce score is below this
    addition_coeff: float = 1.0  # activation addition x + coeff * r for the induce score
    # Batch rows (candidate x prompt) per forward pass. Small batches stay in cache: on this
    # project's 2-core CPU 32-64 rows beat 256 on the toy and on a 24-layer tiny model.
    rows_per_forward: int = 64
    system: str | None = None  # system prompt used while scoring, if any
    # Candidate subsets, to bound the cost on large models: only these layers (block indices) and
    # positions (negative token offsets, -P..-1) are scored; the others get NaN scores and never pass.
    # None scores all of them (below the layer cut).
    layers: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None  # only these positions (-P..-1) are scored; None: all
    filter_prompts: bool = False  # keep only refused harmful / not refused harmless validation prompts

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
        if not _is_real(self.max_layer_fraction) or not 0.0 < self.max_layer_fraction <= 1.0:
            raise InvalidArgumentError(
                f"max_layer_fraction must lie in (0, 1], got {self.max_layer_fraction!r}"
            )
        if not _is_real(self.kl_threshold) or math.isnan(self.kl_threshold) or self.kl_threshold < 0:
            raise InvalidArgumentError(f"kl_threshold must be a number >= 0, got {self.kl_threshold!r}")
        if not _is_real(self.induce_threshold) or math.isnan(self.induce_threshold):
            raise InvalidArgumentError(f"induce_threshold must be a number, got {self.induce_threshold!r}")
        if not _is_int(self.rows_per_forward) or self.rows_per_forward < 1:
            raise InvalidArgumentError(f"rows_per_forward must be >= 1, got {self.rows_per_forward!r}")
        if not isinstance(self.filter_prompts, bool):
            raise InvalidArgumentError(f"filter_prompts must be a bool, got {self.filter_prompts!r}")


def layer_cut(n_layers: int, max_layer_fraction: float = 0.8) -> int:
    """The number of eligible layers ``⌊f·L⌋``: layers ``0..cut-1`` may be selected.

    Arditi et al. compute ``int(n_layer * 0.8)``; in floating point ``int(L·f)``
    can land one below the exact floor (``int(90 * 0.7) == 62``), so the floor
    is taken of ``f`` read as the decimal it prints as (``Fraction(repr(f))``),
    which equals Arditi's ``int(L * 0.8)`` for their default.

    >>> [layer_cut(n) for n in (4, 5, 32)]
    [3, 4, 25]
    """
    if not _is_int(n_layers) or n_layers < 1:
        raise InvalidArgumentError(f"n_layers must be a positive int, got {n_layers!r}")
    if not _is_real(max_layer_fraction) or not 0.0 < max_layer_fraction <= 1.0:
        raise InvalidArgumentError(f"max_layer_fraction must lie in (0, 1], got {max_layer_fraction!r}")
    return math.floor(Fraction(repr(float(max_layer_fraction))) * int(n_layers))


@dataclass(frozen=True)
class _Scores:
    layer: int
    position: int
    bypass: float
    induce: float
    kl: float


def _check_score_rows(scores: Iterable[Mapping[str, Any]], n_layers: int) -> list[_Scores]:
    if isinstance(scores, (str, bytes, Mapping)) or not isinstance(scores, Iterable):
        raise InvalidArgumentError(
            f"scores must be an iterable of mappings with keys {SCORE_KEYS}, got {type(scores).__name__}"
        )
    if not _is_int(n_layers) or n_layers < 1:
        raise InvalidArgumentError(f"n_layers must be a positive int, got {n_layers!r}")
    rows: list[_Scores] = []
    seen: set[tuple[int, int]] = set()
    for k, row in enumerate(scores):
        if not isinstance(row, Mapping):
            raise InvalidArgumentError(f"scores[{k}] must be a mapping, got {type(row).__name__}")
        missing = [key for key in SCORE_KEYS if key not in row]
        if missing:
            raise InvalidArgumentError(f"scores[{k}] lacks the keys {missing} (needs {SCORE_KEYS})")
        layer, position = row["layer"], row["position"]
        if not _is_int(layer) or not 0 <= int(layer) < n_layers:
            raise InvalidArgumentError(
                f"scores[{k}]['layer'] must be an int in [0, {n_layers}), got {layer!r}"
            )
        if not _is_int(position) or int(position) >= 0:
            raise InvalidArgumentError(
                f"scores[{k}]['position'] must be a negative int (offset from the end), got {position!r}"
            )
        for key in ("bypass", "induce", "kl"):
            if not _is_real(row[key]):
                raise InvalidArgumentError(f"scores[{k}][{key!r}] must be a real number, got {row[key]!r}")
        site = (int(layer), int(position))
        if site in seen:
            raise InvalidArgumentError(f"scores[{k}] repeats the candidate (layer, position) = {site}")
        seen.add(site)
        rows.append(_Scores(site[0], site[1], float(row["bypass"]), float(row["induce"]), float(row["kl"])))
    return rows


def _passes(row: _Scores, cut: int, config: SelectionConfig) -> bool:
    """Arditi et al.'s ``filter_fn`` negated: True when the candidate is kept."""
    if math.isnan(row.bypass) or math.isnan(row.induce) or math.isnan(row.kl):
        return False
    if row.layer >= cut:
        return False
    if row.kl > config.kl_threshold:
        return False
    return not row.induce < config.induce_threshold


def _pick(rows: list[_Scores], n_layers: int, config: SelectionConfig) -> tuple[int, int] | None:
    cut = layer_cut(n_layers, config.max_layer_fraction)
    best: _Scores | None = None
    # Arditi et al. iterate position-outer, layer-inner and stable-sort by -bypass: the first
    # minimum in that order wins a tie, whatever order the rows were given in.
    for row in sorted(rows, key=lambda r: (r.position, r.layer)):
        if _passes(row, cut, config) and (best is None or row.bypass < best.bypass):
            best = row
    return None if best is None else (best.layer, best.position)


def select_from_scores(
    scores: Iterable[Mapping[str, Any]], n_layers: int, config: SelectionConfig | None = None
) -> tuple[int, int] | None:
    """The selected ``(layer, position)`` among scored candidates, or None when none passes.

    ``scores``: one mapping per candidate with keys ``layer`` (block index in
    ``[0, n_layers)``), ``position`` (negative offset from the end, -P..-1),
    ``bypass``, ``induce`` and ``kl`` (real numbers; NaN marks an unscored
    candidate). ``config`` defaults to ``SelectionConfig()`` (Arditi et al.'s
    thresholds); only its ``max_layer_fraction``, ``kl_threshold`` and
    ``induce_threshold`` matter here. The returned position is the negative
    offset. No fallback: relaxing filters is :func:`select_direction`'s job.

    Raises :class:`InvalidArgumentError` for a missing key, a non-numeric
    value, a layer outside ``[0, n_layers)``, a position >= 0 or a candidate
    given twice.
    """
    config = SelectionConfig() if config is None else config
    if not isinstance(config, SelectionConfig):
        raise InvalidArgumentError(f"config must be a SelectionConfig, got {type(config).__name__}")
    return _pick(_check_score_rows(scores, n_layers), n_layers, config)


@dataclass
class SelectionResult:
    """All candidates' scores and the selected source ``(layer, position index)``.

    Score tensors are ``[L, P]`` float64; ``positions[i]`` is the negative
    token offset of position index ``i``. ``selected`` is None when no
    candidate passed the filters; ``fallback`` then holds the lowest-bypass
    candidate below the layer cut that still passes the induce filter (only the
    KL filter relaxed), or, when none does, the lowest-bypass one below the cut.
    Candidates at or beyond the cut, outside ``config.layers`` / ``positions``
    or with a zero direction are not scored: their scores are NaN.
    ``n_harmful_val`` / ``n_harmless_val`` count the validation prompts scored
    (after ``filter_prompts``, when that option is on).
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
    n_harmful_val: int = 0
    n_harmless_val: int = 0

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

    def site(self, index: tuple[int, int] | None) -> list[int] | None:
        """``[layer, position]`` (position as the negative token offset) of a ``(layer, index)`` pair."""
        return None if index is None else [int(index[0]), int(self.positions[index[1]])]

    def save(self, path: Path) -> None:
        meta = {
            "positions": self.positions,
            "baseline_harmful": self.baseline_harmful,
            "baseline_harmless": self.baseline_harmless,
            "selected": list(self.selected) if self.selected else None,
            "fallback": list(self.fallback) if self.fallback else None,
            # For readers: the source as (layer, position -P..-1), and whether the filters chose it.
            "source_site": self.site(self.selected or self.fallback),
            "source_is_fallback": self.selected is None,
            # Unscored candidates (beyond the layer cut, zero directions) are null: strict JSON.
            "candidates": finite_or_null(_candidate_table(self)),
            "n_harmful_val": self.n_harmful_val,
            "n_harmless_val": self.n_harmless_val,
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
            n_harmful_val=int(meta.get("n_harmful_val", 0)),
            n_harmless_val=int(meta.get("n_harmless_val", 0)),
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


def _filters(
    bypass: torch.Tensor,
    induce: torch.Tensor,
    kl: torch.Tensor,
    config: SelectionConfig,
    positions: Sequence[int] | None = None,
) -> tuple[torch.Tensor, tuple[int, int] | None, tuple[int, int] | None]:
    """``(passed [L, P], selected, fallback)`` from ``[L, P]`` score tables, sites as (layer, position index).

    ``positions`` are the negative offsets of the columns (default ``-P..-1``).
    The pick is :func:`select_from_scores`; the fallback relaxes the KL filter
    first, then the induce filter too (small models often exceed the KL bound).
    """
    n_layers, n_pos = bypass.shape
    offsets = list(range(-n_pos, 0)) if positions is None else [int(p) for p in positions]
    table = [
        {
            "layer": layer,
            "position": offsets[i],
            "bypass": float(bypass[layer, i]),
            "induce": float(induce[layer, i]),
            "kl": float(kl[layer, i]),
        }
        for layer in range(n_layers)
        for i in range(n_pos)
    ]
    cut = layer_cut(n_layers, config.max_layer_fraction)
    passed = torch.zeros((n_layers, n_pos), dtype=torch.bool)
    for row in _check_score_rows(table, n_layers):
        passed[row.layer, offsets.index(row.position)] = _passes(row, cut, config)

    def as_index(site: tuple[int, int] | None) -> tuple[int, int] | None:
        return None if site is None else (site[0], offsets.index(site[1]))

    selected = as_index(select_from_scores(table, n_layers, config))
    fallback = None
    if selected is None:
        no_kl = replace(config, kl_threshold=math.inf)
        fallback = as_index(select_from_scores(table, n_layers, no_kl))
        if fallback is None:
            fallback = as_index(
                select_from_scores(table, n_layers, replace(no_kl, induce_threshold=-math.inf))
            )
    return passed, selected, fallback


# ----------------------------------------------------------------------------
# batched forward helpers
# ----------------------------------------------------------------------------

#: A length group grows while padding its prompts to the longest adds at most this share of real tokens.
_PAD_SLACK = 0.1


@torch.inference_mode()
def last_token_logits(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Next-token logits after each token-id prompt (left-padded batch): ``[B, vocab]`` float64.

    Position ids count real tokens only, so a prompt's logits do not depend on
    how much padding its batch needs.
    """
    return forward_last_logits(model, prompts, pad_id).to(torch.float64).cpu()


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


def _length_groups(prompts: Sequence[Sequence[int]], max_size: int) -> list[list[int]]:
    """Prompt indices sorted by token length, cut into consecutive groups of at most ``max_size``.

    A group grows while padding each member to its longest adds at most
    :data:`_PAD_SLACK` of the group's real tokens; equal lengths keep their order.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        n = len(prompts[i])  # the longest so far: the order is ascending
        if current and (len(current) >= max_size or n * (len(current) + 1) > (1 + _PAD_SLACK) * (real + n)):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += n
    if current:
        groups.append(current)
    return groups


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


@dataclass
class _BlockCall:
    """What one decoder block was called with in a clean forward (hidden states kept only where needed)."""

    hidden: torch.Tensor | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _capture_block_calls(
    model: nn.Module,
    layout: ModelLayout,
    prompts: list[list[int]],
    pad_id: int,
    first: int,
    keep_hidden: set[int],
) -> tuple[torch.Tensor, dict[int, _BlockCall]]:
    """One clean forward: its last-token logits and the calls of blocks ``first..L-1``."""
    calls: dict[int, _BlockCall] = {}

    def make_hook(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = block_input(args, kwargs)
            rest = args[1:] if args and isinstance(args[0], torch.Tensor) else args
            others = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls[layer] = _BlockCall(hidden if layer in keep_hidden else None, tuple(rest), others)

        return hook

    handles = [
        layout.blocks[layer].register_forward_pre_hook(make_hook(layer), with_kwargs=True)
        for layer in range(first, layout.n_layers)
    ]
    try:
        logits = last_token_logits(model, prompts, pad_id)
    finally:
        for h in handles:
            h.remove()
    if len(calls) != layout.n_layers - first:
        raise RefusalCoreError(f"captured {len(calls)} of {layout.n_layers - first} block calls")
    return logits, calls


def _repeat_rows(value: Any, n_rows: int, copies: int, memo: dict[int, Any]) -> Any:
    """``value`` with every tensor of batch size ``n_rows`` repeated ``copies`` times along dim 0.

    Row ``c·n_rows + b`` is row ``b`` (candidate-major, as the per-row
    directions are laid out). Tuples, lists and dicts are walked; a tensor
    shared by several blocks (mask, rotary embeddings) is repeated once.
    """
    if isinstance(value, torch.Tensor):
        if copies == 1 or value.ndim < 2 or value.shape[0] != n_rows:
            return value
        if id(value) not in memo:
            memo[id(value)] = value.repeat(copies, *([1] * (value.ndim - 1)))
        return memo[id(value)]
    if isinstance(value, tuple):
        return tuple(_repeat_rows(v, n_rows, copies, memo) for v in value)
    if isinstance(value, list):
        return [_repeat_rows(v, n_rows, copies, memo) for v in value]
    if isinstance(value, dict):
        return {k: _repeat_rows(v, n_rows, copies, memo) for k, v in value.items()}
    return value


def _final_norm(layout: ModelLayout) -> nn.Module | None:
    norm = getattr(layout.inner, "norm", None)
    return norm if isinstance(norm, nn.Module) else None


@torch.inference_mode()
def _suffix_logits(
    layout: ModelLayout,
    calls: dict[int, _BlockCall],
    layer: int,
    n_rows: int,
    copies: int,
    memo: dict[int, Any],
) -> torch.Tensor:
    """Last-token logits ``[copies·n_rows, vocab]`` float64 from block ``layer``'s captured input on.

    Runs blocks ``layer..L-1`` with the arguments they got in the clean
    forward (hooks on those blocks fire as usual), the final norm at the last
    position (it acts per position) and ``lm_head``.
    """
    norm = _final_norm(layout)
    start = calls[layer].hidden
    if norm is None or start is None:
        raise RefusalCoreError(f"no captured input of block {layer} or no final norm to run a suffix")
    h = _repeat_rows(start, n_rows, copies, memo)
    for j in range(layer, layout.n_layers):
        call = calls[j]
        out = layout.blocks[j](
            h,
            *_repeat_rows(call.args, n_rows, copies, memo),
            **_repeat_rows(call.kwargs, n_rows, copies, memo),
        )
        h = out[0] if isinstance(out, tuple) else out
    logits = layout.lm_head(norm(h[:, -1:, :]))
    return logits[:, -1, :].to(torch.float64).cpu()


def _suffix_reproduces(layout: ModelLayout, calls: dict[int, _BlockCall], logits: torch.Tensor) -> bool:
    """Whether replaying the last block from its captured call gives the model's own logits.

    The replay has the shapes of the clean forward, so on a supported family
    the two agree to rounding; a family whose head does more than norm +
    ``lm_head`` (a logit cap or scale) fails here.
    """
    if _final_norm(layout) is None:
        return False
    replay = _suffix_logits(layout, calls, layout.n_layers - 1, logits.shape[0], 1, {})
    if replay.shape != logits.shape:
        return False
    scale = float(logits.abs().max())
    return float((replay - logits).abs().max()) <= 1e-5 * max(scale, 1.0)


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
    """The (layer, position index) sites to score, in (layer, position) order: those the config asks
    for, below the layer cut.

    Raises when a requested layer or position does not exist, or when no
    requested layer lies below the cut, before any forward pass.
    """
    n_layers, n_pos = int(candidates.directions.shape[0]), int(candidates.directions.shape[1])
    positions = list(candidates.positions)
    if config.layers is not None and any(layer >= n_layers for layer in config.layers):
        raise InvalidArgumentError(f"config.layers {config.layers} name blocks outside [0, {n_layers})")
    if config.positions is not None and any(p not in positions for p in config.positions):
        raise InvalidArgumentError(
            f"config.positions {config.positions} are not among the candidates' {positions}"
        )
    cut = layer_cut(n_layers, config.max_layer_fraction)
    layers = {layer for layer in (range(n_layers) if config.layers is None else config.layers) if layer < cut}
    if not layers:
        raise InvalidArgumentError(
            f"no candidate layer lies below the layer cut: max_layer_fraction={config.max_layer_fraction} "
            f"keeps layers 0..{cut - 1} of L={n_layers}, config.layers is {config.layers}"
        )
    pos_idx = set(
        range(n_pos) if config.positions is None else (positions.index(p) for p in config.positions)
    )
    return [(layer, i) for layer in range(n_layers) for i in range(n_pos) if layer in layers and i in pos_idx]


def filter_prompts_by_refusal(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_token_ids: Sequence[int],
    *,
    system: str | None = None,
    batch_size: int = 32,
) -> tuple[list[str], list[str]]:
    """The harmful prompts the model refuses and the harmless ones it does not, order kept.

    Arditi et al.'s pipeline filter: a harmful prompt is kept when its base
    refusal score (:func:`~refusal_core.evaluation.scores.refusal_scores`,
    log-odds of the refusal tokens' next-token probability) is ``> 0``, a
    harmless one when it is ``< 0``. Hooks installed on ``model`` act as usual.
    Either returned list may be empty; the caller decides whether that is an
    error. Raises before any forward pass for empty or non-str prompt lists,
    empty refusal ids or a bad ``batch_size``.
    """
    harm = check_instructions(harmful, "harmful")
    safe = check_instructions(harmless, "harmless")
    if len(list(refusal_token_ids)) == 0:
        raise EmptyInputError("refusal_token_ids is empty")
    if not _is_int(batch_size) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
    ids = list(refusal_token_ids)
    h = refusal_scores(model, tokenizer, harm, ids, system=system, batch_size=batch_size, progress=False)
    s = refusal_scores(model, tokenizer, safe, ids, system=system, batch_size=batch_size, progress=False)
    return (
        [p for p, score in zip(harm, h.tolist()) if score > 0],
        [p for p, score in zip(safe, s.tolist()) if score < 0],
    )


def _validation_prompts(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_ids: Sequence[int],
    config: SelectionConfig,
) -> tuple[list[str], list[str]]:
    if not config.filter_prompts:
        return list(harmful), list(harmless)
    harm, safe = filter_prompts_by_refusal(
        model, tokenizer, harmful, harmless, refusal_ids, system=config.system
    )
    if not harm:
        raise EmptyInputError("filter_prompts left no harmful validation prompt (the model refuses none)")
    if not safe:
        raise EmptyInputError("filter_prompts left no harmless validation prompt (the model refuses all)")
    return harm, safe


def _check_model_matches(
    model: nn.Module,
    candidates: DirectionCandidates,
    *,
    model_record: dict[str, Any] | None = None,
    allow_foreign: bool = False,
) -> ModelLayout:
    """The model's layout, after checking the candidates fit it and come from it.

    Candidates that carry the identity of the model they were extracted from must come from
    ``model`` itself, or from the base that ``model_record["base_identity"]`` names, unless
    ``allow_foreign`` (:func:`~refusal_core.directions.check_direction_origin`).
    """
    layout = get_layout(model)
    n_layers, n_pos, d = candidates.directions.shape
    if n_layers != layout.n_layers or d != layout.d_model:
        raise InvalidArgumentError(
            f"candidates have shape [L={n_layers}, P={n_pos}, d={d}] but the model has "
            f"L={layout.n_layers}, d={layout.d_model}"
        )
    if candidates.model:
        check_direction_origin(
            candidates.model, model, model_record=model_record, allow_foreign=allow_foreign
        )
    return layout


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
    model_record: dict[str, Any] | None = None,
    allow_foreign: bool = False,
) -> SelectionResult:
    """Score every candidate of ``candidates`` and pick the refusal direction (batched).

    Candidates extracted from another model are refused
    (:class:`~refusal_core.errors.ForeignDirectionError`) unless ``model_record`` names their
    model as ``model``'s base or ``allow_foreign`` is set.

    Candidates below the layer cut, inside ``config.layers`` / ``positions``
    and with a nonzero direction are scored on the validation prompts (after
    :func:`filter_prompts_by_refusal` when ``config.filter_prompts``); the
    pick is :func:`select_from_scores`, with the fallback of
    :class:`SelectionResult`. Scores equal :func:`select_direction_naive`'s
    to rounding (bit-identical on the toy and tiny models here); see the
    module docstring for how the work is shared. Emits a ``RuntimeWarning``
    if the block-suffix replay cannot be used for this model and full
    forwards are run instead.

    Raises before any forward pass: :class:`EmptyInputError` for empty prompt
    sets or refusal ids, :class:`InvalidArgumentError` when the candidates do
    not fit the model, a requested layer or position does not exist, or no
    requested layer lies below the cut.
    """
    config = config or SelectionConfig()
    ref_ids = _validate(candidates, harmful_val, harmless_val, refusal_token_ids)
    layout = _check_model_matches(model, candidates, model_record=model_record, allow_foreign=allow_foreign)
    head = layout.lm_head.weight
    if not isinstance(head, torch.Tensor):
        raise InvalidArgumentError("the model's lm_head has no weight tensor")
    check_refusal_ids(ref_ids, int(head.shape[0]))  # the logits' vocabulary: no IndexError mid-scoring
    dirs = candidates.directions
    n_layers, n_pos, d = dirs.shape
    scored = _scored_sites(candidates, config)
    pad = pad_token_id(tokenizer)
    harmful_val, harmless_val = _validation_prompts(
        model, tokenizer, harmful_val, harmless_val, refusal_token_ids, config
    )
    harm = encode_prompts(tokenizer, list(harmful_val), system=config.system)
    safe = encode_prompts(tokenizer, list(harmless_val), system=config.system)
    both = harm + safe
    n_harm = len(harm)
    dtype = next(model.parameters()).dtype
    rows_max = config.rows_per_forward

    # Sites with a (numerically) zero direction have no unit vector: block 0 at template
    # positions sees the same tokens in every prompt. They get NaN scores and never pass.
    valid = [layer * n_pos + i for layer, i in scored if _usable(dirs[layer, i])]
    flat = dirs.reshape(n_layers * n_pos, d)
    bar = tqdm(total=len(valid) * (len(both) + len(safe)), desc="select", disable=not progress, leave=False)

    # induce: one clean forward per length group gives the base logits and every block's call;
    # each candidate batch then runs only the blocks from its own layer on.
    base_s = torch.empty((len(safe), 0), dtype=torch.float64)
    induce_tab = torch.full((len(valid), len(safe)), math.nan, dtype=torch.float64)
    by_layer: dict[int, list[int]] = {}
    for j, k in enumerate(valid):
        by_layer.setdefault(k // n_pos, []).append(j)
    first = min(by_layer) if by_layer else layout.n_layers - 1
    use_suffix = True
    for group in _length_groups(safe, rows_max):
        prompts = [safe[p] for p in group]
        logits, calls = _capture_block_calls(
            model, layout, prompts, pad, first, set(by_layer) | {layout.n_layers - 1}
        )
        if base_s.shape[1] == 0:
            base_s = torch.empty((len(safe), logits.shape[1]), dtype=torch.float64)
        base_s[group] = logits
        if use_suffix and not _suffix_reproduces(layout, calls, logits):
            use_suffix = False
            warnings.warn(
                f"replaying the blocks of {type(model).__name__} does not reproduce its logits; "
                "the induce score falls back to full forward passes",
                RuntimeWarning,
                stacklevel=2,
            )
        per = max(1, rows_max // len(group))
        memo: dict[int, dict[int, Any]] = {}
        cols = torch.as_tensor(group)
        for layer, sites in by_layer.items():
            for chunk in _chunks(sites, per):
                rdirs = flat[[valid[j] for j in chunk]].repeat_interleave(len(group), dim=0).to(dtype)
                if use_suffix:
                    with addition_hooks(model, rdirs, config.addition_coeff, layer):
                        out = _suffix_logits(
                            layout, calls, layer, len(group), len(chunk), memo.setdefault(len(chunk), {})
                        )
                else:
                    rows = [p for _ in chunk for p in prompts]
                    out = _run_rows(
                        model, rows, rdirs, pad_id=pad, mode="add", layer=layer, coeff=config.addition_coeff
                    )
                scores = refusal_score(out, ref_ids).reshape(len(chunk), len(group))
                induce_tab[torch.as_tensor(list(chunk)).unsqueeze(1), cols.unsqueeze(0)] = scores
                bar.update(len(chunk) * len(group))
        del calls, memo

    # bypass and KL: ablated forwards over harmful and harmless prompts together, by length group.
    ablate_tab = torch.full((len(valid), len(both)), math.nan, dtype=torch.float64)
    for group in _length_groups(both, rows_max):
        prompts = [both[p] for p in group]
        cols = torch.as_tensor(group)
        is_harm = cols < n_harm
        per = max(1, rows_max // len(group))
        for chunk in _chunks(range(len(valid)), per):
            rows = [p for _ in chunk for p in prompts]
            rdirs = flat[[valid[j] for j in chunk]].repeat_interleave(len(group), dim=0)
            out = _run_rows(model, rows, rdirs, pad_id=pad, mode="ablate", layer=None, coeff=0.0)
            out = out.reshape(len(chunk), len(group), -1)
            vals = torch.empty((len(chunk), len(group)), dtype=torch.float64)
            vals[:, is_harm] = refusal_score(out[:, is_harm], ref_ids)
            vals[:, ~is_harm] = _kl(base_s[cols[~is_harm] - n_harm], out[:, ~is_harm])
            ablate_tab[torch.as_tensor(list(chunk)).unsqueeze(1), cols.unsqueeze(0)] = vals
            bar.update(len(chunk) * len(group))
    bar.close()

    bypass = torch.full((n_layers * n_pos,), math.nan, dtype=torch.float64)
    kl = torch.full_like(bypass, math.nan)
    induce = torch.full_like(bypass, math.nan)
    if valid:
        idx = torch.as_tensor(valid)
        bypass[idx] = ablate_tab[:, :n_harm].mean(1)
        kl[idx] = ablate_tab[:, n_harm:].mean(1)
        induce[idx] = induce_tab.mean(1)
    base_h = last_token_logits(model, harm, pad)
    return _result(
        bypass.reshape(n_layers, n_pos),
        induce.reshape(n_layers, n_pos),
        kl.reshape(n_layers, n_pos),
        candidates,
        config,
        float(refusal_score(base_h, ref_ids).mean()),
        float(refusal_score(base_s, ref_ids).mean()),
        model,
        (len(harm), len(safe)),
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
    n_val: tuple[int, int],
) -> SelectionResult:
    passed, selected, fallback = _filters(bypass, induce, kl, config, candidates.positions)
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
        n_harmful_val=n_val[0],
        n_harmless_val=n_val[1],
    )


def select_direction_naive(
    model: nn.Module,
    tokenizer: Any,
    candidates: DirectionCandidates,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    refusal_token_ids: Sequence[int],
    config: SelectionConfig | None = None,
    *,
    model_record: dict[str, Any] | None = None,
    allow_foreign: bool = False,
) -> SelectionResult:
    """The same scores, one candidate at a time (three full forwards each): the benchmark's
    baseline and the test oracle for :func:`select_direction`."""
    config = config or SelectionConfig()
    ref_ids = _validate(candidates, harmful_val, harmless_val, refusal_token_ids)
    _check_model_matches(model, candidates, model_record=model_record, allow_foreign=allow_foreign)
    dirs = candidates.directions
    n_layers, n_pos, _ = dirs.shape
    scored = _scored_sites(candidates, config)
    pad = pad_token_id(tokenizer)
    harmful_val, harmless_val = _validation_prompts(
        model, tokenizer, harmful_val, harmless_val, refusal_token_ids, config
    )
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
            bypass[layer, i] = refusal_score(lh, ref_ids).mean()
            kl[layer, i] = _kl(base_s, ls).mean()
            induce[layer, i] = refusal_score(la, ref_ids).mean()
    return _result(
        bypass,
        induce,
        kl,
        candidates,
        config,
        float(refusal_score(base_h, ref_ids).mean()),
        float(refusal_score(base_s, ref_ids).mean()),
        model,
        (len(harm), len(safe)),
    )
