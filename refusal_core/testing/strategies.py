"""Hypothesis strategies for the functional-core properties.

Every strategy builds a well-conditioned input *by construction*, never by
filtering: a direction gets one coordinate of magnitude at least ``min_norm``,
a quantization group that must contain 0 gets an exact 0 at a drawn position,
tie-free pruning scores are distinct grid values, int8 inputs sit at least 0.1
of a step away from every rounding boundary, and so on. What each strategy
promises is checked by ``tests/test_strategies.py``.

The strategies return tensors (or small frozen dataclasses whose field names
label their parts); the property tests draw them through ``st.data()`` with a
``label=`` so every value in a falsifying example is named.

Example:
    >>> from hypothesis import given
    >>> @given(directions(4, torch.float32))
    ... def test(r):
    ...     assert float(r.norm()) >= 0.5
    >>> test()
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

__all__ = [
    "FLOAT_DTYPES",
    "AwqInputs",
    "LlmInt8Inputs",
    "activation_sets",
    "awq_inputs",
    "directions",
    "distinct_magnitude_weights",
    "float_dtypes",
    "group_layouts",
    "grouped_weights",
    "int8_friendly_rows",
    "leading_shapes",
    "llm_int8_inputs",
    "logits",
    "n_m_patterns",
    "positive_scalars",
    "refusal_ids",
    "signed_scalars",
    "sparse_weights",
    "sparsities",
    "tensors",
    "tie_free_wanda_inputs",
    "vector_pairs",
    "weight_matrices",
    "widths",
]

#: The dtypes the properties run in; both are exactly representable in float64 references.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)

#: Magnitudes below this become exactly 0 so float32 casts never produce subnormals.
_FLUSH_BELOW = 1e-6

#: Every int8-friendly value lies at least this many steps away from a rounding boundary.
HALF_STEP_MARGIN = 0.1


def float_dtypes(dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> st.SearchStrategy[torch.dtype]:
    """One of ``dtypes`` (default float32 and float64)."""
    return st.sampled_from(dtypes)


def widths(min_value: int = 2, max_value: int = 12) -> st.SearchStrategy[int]:
    """A residual or input width."""
    return st.integers(min_value, max_value)


def leading_shapes(max_dims: int = 2, max_side: int = 4) -> st.SearchStrategy[tuple[int, ...]]:
    """The batch dimensions in front of a width, possibly none: ``()``, ``(3,)``, ``(2, 4)``."""
    return st.lists(st.integers(1, max_side), max_size=max_dims).map(tuple)


def _flush(v: float) -> float:
    return 0.0 if abs(v) < _FLUSH_BELOW else v


def _finite(bound: float) -> st.SearchStrategy[float]:
    return st.floats(-bound, bound, allow_nan=False, allow_infinity=False, allow_subnormal=False).map(_flush)


def _array(shape: tuple[int, ...], elements: st.SearchStrategy[float]) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float64, shape, elements=elements)


def _to_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float64)).to(dtype)


def tensors(
    shape: tuple[int, ...], dtype: torch.dtype, *, bound: float = 10.0
) -> st.SearchStrategy[torch.Tensor]:
    """A finite tensor with entries in ``[-bound, bound]``; tiny magnitudes are flushed to exactly 0."""
    return _array(shape, _finite(bound)).map(lambda a: _to_torch(a, dtype))


@st.composite
def weight_matrices(
    draw: st.DrawFn, rows: int, cols: int, dtype: torch.dtype, *, bound: float = 10.0
) -> torch.Tensor:
    """``[rows, cols]`` whose rows carry their own magnitude (a factor in ``[1e-2, 1e2]``), as
    the rows of trained weights do; so per-row and per-matrix thresholds differ."""
    w = draw(_array((rows, cols), _finite(bound)))
    scales = draw(_array((rows, 1), st.floats(math.log(1e-2), math.log(1e2)).map(math.exp)))
    return _to_torch(w * scales, dtype)


def activation_sets(
    n: int, inner: tuple[int, ...], dtype: torch.dtype, *, bound: float = 10.0
) -> st.SearchStrategy[torch.Tensor]:
    """A set of ``n`` activations, shape ``[n, *inner]`` (``inner`` ends in the width)."""
    return tensors((n, *inner), dtype, bound=bound)


@st.composite
def directions(
    draw: st.DrawFn, d: int, dtype: torch.dtype, *, min_norm: float = 0.5, bound: float = 10.0
) -> torch.Tensor:
    """A direction ``[d]`` with ``‖r‖ ≥ min_norm``.

    By construction: one drawn coordinate gets a magnitude in ``[min_norm, bound]``.
    """
    r = draw(_array((d,), _finite(bound)))
    i = draw(st.integers(0, d - 1))
    big = draw(st.floats(min_norm, bound))
    r[i] = big if draw(st.booleans()) else -big
    return _to_torch(r, dtype)


@st.composite
def vector_pairs(
    draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tensors of ``shape``, both of norm ≥ 0.5, and ``b`` independent of, parallel to,
    antiparallel to, or a slightly perturbed multiple of ``a`` (the cases where a cosine is
    0-ish, exactly ±1 up to rounding, or close to ±1)."""
    n = math.prod(shape)
    a = draw(directions(n, dtype))
    relation = draw(st.sampled_from(["independent", "parallel", "antiparallel", "perturbed"]))
    event(f"vector_pairs: {relation}")
    if relation == "independent":
        b = draw(directions(n, dtype))
    else:
        c = draw(positive_scalars(1e-2, 1e2)) * (-1.0 if relation == "antiparallel" else 1.0)
        b64 = c * a.to(torch.float64)
        if relation == "perturbed":
            b64 = b64 + 1e-3 * abs(c) * draw(tensors((n,), torch.float64, bound=1.0))
        b = b64.to(dtype)
    return a.reshape(shape), b.reshape(shape)


def positive_scalars(lo: float = 1e-3, hi: float = 1e3) -> st.SearchStrategy[float]:
    """A positive scalar, log-uniform in ``[lo, hi]``."""
    return st.floats(math.log(lo), math.log(hi)).map(lambda t: min(hi, max(lo, math.exp(t))))


def signed_scalars(lo: float = 1e-3, hi: float = 1e2) -> st.SearchStrategy[float]:
    """0, or a scalar of either sign with magnitude log-uniform in ``[lo, hi]`` (never a tiny nonzero)."""
    return st.one_of(st.just(0.0), positive_scalars(lo, hi), positive_scalars(lo, hi).map(lambda v: -v))


@st.composite
def sparse_weights(
    draw: st.DrawFn, rows: int, cols: int, dtype: torch.dtype, *, bound: float = 10.0
) -> torch.Tensor:
    """A matrix whose zeros are exactly a drawn pattern (at least one zero); every other entry has
    ``|w| ≥ 0.1``."""
    mags = draw(_array((rows, cols), st.floats(0.1, bound)))
    negative = draw(hnp.arrays(np.bool_, (rows, cols)))
    zero = draw(hnp.arrays(np.bool_, (rows, cols)))
    zero.reshape(-1)[draw(st.integers(0, rows * cols - 1))] = True
    w = np.where(zero, 0.0, np.where(negative, -mags, mags))
    event(f"sparse_weights: {int(zero.sum())}/{rows * cols} zeros")
    return _to_torch(w, dtype)


@st.composite
def distinct_magnitude_weights(
    draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype, *, bound: float = 10.0
) -> torch.Tensor:
    """A tensor whose ``|w|`` are pairwise distinct, at least half a grid unit apart (tie-free pruning).

    ``|w|`` is ``(rank + 1 + jitter) · unit`` for a drawn permutation ``rank``, jitter in
    ``[0, 0.5)``, so neighbouring magnitudes differ by at least ``unit / 2`` (a relative gap of
    at least ``1 / (2·numel + 2)``, far above float32 rounding).
    """
    n = math.prod(shape)
    rank = np.array(draw(st.permutations(range(n))), dtype=np.float64)
    jitter = draw(_array((n,), st.floats(0.0, 0.5, exclude_max=True)))
    negative = draw(hnp.arrays(np.bool_, (n,)))
    unit = draw(st.floats(1e-2, 1.0)) * bound / (n + 1)
    mags = (rank + 1.0 + jitter) * unit
    return _to_torch(np.where(negative, -mags, mags).reshape(shape), dtype)


@st.composite
def tie_free_wanda_inputs(
    draw: st.DrawFn, rows: int, cols: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w [rows, cols], input_norms [cols])`` whose Wanda scores are distinct within every row.

    The scores ``|w[i, j]|·input_norms[j]`` are drawn first as separated grid values per row
    (as in :func:`distinct_magnitude_weights`) and ``w = ± score / input_norms``; norms lie in
    ``[0.1, 10]``.
    """
    norms = draw(_array((cols,), st.floats(0.1, 10.0)))
    scores = np.stack(
        [draw(distinct_magnitude_weights((cols,), torch.float64)).abs().numpy() for _ in range(rows)]
    )
    negative = draw(hnp.arrays(np.bool_, (rows, cols)))
    w = np.where(negative, -1.0, 1.0) * scores / norms
    return _to_torch(w, dtype), _to_torch(norms, dtype)


def sparsities(max_value: float = 0.95) -> st.SearchStrategy[float]:
    """A sparsity in ``[0, max_value]`` (the protocol allows ``[0, 1)``)."""
    return st.one_of(st.sampled_from([0.0, 0.5]), st.floats(0.0, max_value))


def n_m_patterns() -> st.SearchStrategy[tuple[int, int]]:
    """An ``(n, m)`` semi-structured pattern with ``1 ≤ n < m``, ``m`` in {2, 4, 8}."""
    return st.sampled_from([2, 4, 8]).flatmap(lambda m: st.tuples(st.integers(1, m - 1), st.just(m)))


def group_layouts(max_group: int = 8, max_groups: int = 4) -> st.SearchStrategy[tuple[int, int]]:
    """``(group_size, n_groups)``: a width ``group_size · n_groups`` that the group size divides."""
    sizes = [g for g in (1, 2, 4, 8) if g <= max_group]
    return st.tuples(st.sampled_from(sizes), st.integers(1, max_groups))


@st.composite
def grouped_weights(
    draw: st.DrawFn,
    rows: int,
    group_size: int,
    n_groups: int,
    dtype: torch.dtype,
    *,
    contains_zero: bool,
    bound: float = 10.0,
) -> torch.Tensor:
    """``w [rows, group_size·n_groups]`` for group-wise quantization.

    With ``contains_zero`` every group of ``group_size`` consecutive inputs holds an exact 0
    at a drawn position (so asymmetric quantization can represent it to half a step).
    Otherwise each group is drawn to straddle 0, or to lie entirely above or below it
    (shifted by ``bound`` plus up to ``bound``), where the zero point must be clamped.
    """
    g = draw(_array((rows, n_groups, group_size), _finite(bound)))
    if contains_zero:
        where = draw(hnp.arrays(np.int64, (rows, n_groups), elements=st.integers(0, group_size - 1)))
        np.put_along_axis(g, where[..., None], 0.0, axis=-1)
    else:
        side = draw(hnp.arrays(np.int64, (rows, n_groups, 1), elements=st.integers(-1, 1)))
        extra = draw(_array((rows, n_groups, 1), st.floats(0.0, bound)))
        g = g + side * (bound + extra)
        event(f"grouped_weights: {int((side != 0).sum())} of {rows * n_groups} groups on one side of 0")
    return _to_torch(g.reshape(rows, n_groups * group_size), dtype)


@st.composite
def int8_friendly_rows(
    draw: st.DrawFn,
    rows: int,
    cols: int,
    dtype: torch.dtype,
    *,
    max_abs: float = 10.0,
    zero_rows: bool = True,
) -> torch.Tensor:
    """``[rows, cols]`` whose absmax-int8 codes are unambiguous.

    Row ``i`` is ``(code + offset) · step_i`` with integer codes in ``[-127, 127]``, offsets in
    ``[-0.4, 0.4]`` pulled inward at ``±127``, and one drawn entry exactly ``±127 · step_i``,
    so the row absmax is ``127 · step_i`` and every ``value / step`` lies at least 0.1 away
    from a half-integer. With ``zero_rows`` some rows may be entirely 0.
    """
    steps = draw(_array((rows, 1), st.floats(max_abs / 127 / 1000, max_abs / 127)))
    codes = draw(hnp.arrays(np.int64, (rows, cols), elements=st.integers(-127, 127))).astype(np.float64)
    offsets = draw(_array((rows, cols), st.floats(-0.4, 0.4)))
    offsets = np.where(np.abs(codes) == 127, -np.sign(codes) * np.abs(offsets), offsets)
    peak = draw(hnp.arrays(np.int64, (rows, 1), elements=st.integers(0, cols - 1)))
    peak_sign = draw(hnp.arrays(np.bool_, (rows, 1)))
    np.put_along_axis(codes, peak, np.where(peak_sign, 127.0, -127.0), axis=1)
    np.put_along_axis(offsets, peak, 0.0, axis=1)
    values = (codes + offsets) * steps
    if zero_rows:
        zero = draw(hnp.arrays(np.bool_, (rows, 1)))
        values = np.where(zero, 0.0, values)
        if zero.any():
            event("int8_friendly_rows: has an all-zero row")
    return _to_torch(values, dtype)


@dataclass(frozen=True)
class LlmInt8Inputs:
    """Inputs of ``llm_int8_linear`` with an unambiguous outlier split and unambiguous int8 codes.

    ``outliers[j]`` is True for the input features where some token has ``|x| ≥ threshold``;
    in the other features every ``|x| < threshold``, and per token those features are
    int8-friendly (see :func:`int8_friendly_rows`); ``w`` is int8-friendly per row.
    With ``boundary`` one outlier feature reaches exactly ``|x| = threshold``.
    """

    x: torch.Tensor
    w: torch.Tensor
    threshold: float
    outliers: torch.Tensor
    boundary: bool


@st.composite
def llm_int8_inputs(draw: st.DrawFn, dtype: torch.dtype, *, boundary: bool | None = None) -> LlmInt8Inputs:
    """Draw :class:`LlmInt8Inputs`; ``boundary=None`` lets Hypothesis choose whether a feature sits at τ."""
    tokens = draw(st.integers(1, 4))
    cols = draw(st.integers(2, 10))
    rows = draw(st.integers(1, 5))
    threshold = float(torch.tensor(draw(st.floats(1.0, 8.0)), dtype=dtype))
    outliers = draw(hnp.arrays(np.bool_, (cols,)))
    at_boundary = draw(st.booleans()) if boundary is None else boundary
    has_boundary = False
    if at_boundary or outliers.all():
        # a boundary feature needs one outlier; at least one feature must stay regular
        pick = draw(st.integers(0, cols - 1))
        outliers[pick] = True
        outliers[(pick + 1) % cols] = False
    regular = np.flatnonzero(~outliers)
    x = np.zeros((tokens, cols))
    # regular features: int8-friendly per token with absmax 127·step < threshold
    friendly = draw(int8_friendly_rows(tokens, len(regular), torch.float64, max_abs=0.99 * threshold))
    x[:, regular] = friendly.numpy()
    for j in np.flatnonzero(outliers):
        x[:, j] = draw(_array((tokens,), _finite(2 * threshold)))
        t = draw(st.integers(0, tokens - 1))
        extra = 0.0 if at_boundary else draw(st.floats(0.0, 2 * threshold))
        x[t, j] = (threshold + extra) * (1.0 if draw(st.booleans()) else -1.0)
        if at_boundary:
            x[:, j] = np.clip(x[:, j], -threshold, threshold)
            at_boundary, has_boundary = False, True  # one boundary feature is enough
            event("llm_int8_inputs: a feature reaches exactly the threshold")
    w = draw(int8_friendly_rows(rows, cols, dtype, zero_rows=False))
    return LlmInt8Inputs(
        x=_to_torch(x, dtype),
        w=w,
        threshold=threshold,
        outliers=torch.from_numpy(outliers.copy()),
        boundary=has_boundary,
    )


@dataclass(frozen=True)
class AwqInputs:
    """Inputs of ``awq_scales``: ``w [out, in]``, calibration ``x [tokens, in]`` and the grid."""

    w: torch.Tensor
    x: torch.Tensor
    w_bit: int
    group_size: int
    grid: int


@st.composite
def awq_inputs(draw: st.DrawFn, dtype: torch.dtype, *, zero_weight: bool | None = None) -> AwqInputs:
    """Draw :class:`AwqInputs` whose input channels have clearly different mean ``|x|``.

    Each channel of ``x`` is a drawn base times a channel magnitude in ``[0.05, 20]``, so the
    candidate scales differ from one exponent to the next. With ``zero_weight`` ``w`` is all
    zero: every exponent then has loss 0, an exact tie that the first exponent must win.
    """
    group_size, n_groups = draw(group_layouts(max_group=8, max_groups=3))
    cols = group_size * n_groups
    rows = draw(st.integers(1, 4))
    tokens = draw(st.integers(1, 6))
    base = draw(_array((tokens, cols), st.floats(-1.0, 1.0)))
    base[0] = np.where(np.abs(base[0]) < 0.5, 1.0, base[0])  # every channel has a nonzero mean |x|
    magnitude = draw(_array((1, cols), st.floats(0.05, 20.0)))
    use_zero = draw(st.booleans()) if zero_weight is None else zero_weight
    if use_zero:
        w = torch.zeros(rows, cols, dtype=dtype)
        event("awq_inputs: all-zero weight (every exponent ties)")
    else:
        w = draw(tensors((rows, cols), dtype, bound=2.0))
    return AwqInputs(
        w=w,
        x=_to_torch(base * magnitude, dtype),
        w_bit=draw(st.sampled_from([3, 4, 8])),
        group_size=group_size,
        grid=draw(st.sampled_from([1, 2, 4, 5, 10, 20])),
    )


@st.composite
def logits(
    draw: st.DrawFn, lead: tuple[int, ...], vocab: int, ids: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """Logits ``[*lead, vocab]`` in ``[-bound, bound]`` (bound 1, 10 or 50).

    Optionally saturated: the refusal ids are pushed 100 above (or below) the rest, so
    ``p`` rounds to exactly 1 (or lies below 1e-40) in float64.
    """
    bound = draw(st.sampled_from([1.0, 10.0, 50.0]))
    base = draw(_array((*lead, vocab), _finite(bound)))
    shift = draw(st.sampled_from([0.0, 0.0, 100.0, -100.0]))
    if shift:
        base[..., ids] += shift
        event(f"logits: refusal ids shifted by {shift:+g}")
    return _to_torch(base, dtype)


def refusal_ids(vocab: int) -> st.SearchStrategy[list[int]]:
    """Distinct refusal token ids in ``[0, vocab)``, at least one."""
    return st.lists(st.integers(0, vocab - 1), min_size=1, max_size=vocab, unique=True)
