"""Meta-tests of the Hypothesis strategies: each produces what its docstring promises.

The properties rely on these promises (a direction is never near zero, a group contains 0,
int8 codes are unambiguous, pruning scores are tie-free); a strategy that broke one would
make a property fail for the wrong reason, or pass without testing anything.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from refusal_core.testing import strategies as rs

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(data=st.data())
def test_tensors_are_finite_bounded_and_without_tiny_values(data: st.DataObject) -> None:
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    shape = data.draw(st.tuples(rs.widths(1, 5), rs.widths(1, 5)), label="shape")
    t = data.draw(rs.tensors(shape, dtype, bound=3.0), label="t")
    assert t.dtype == dtype, f"tensors gave {t.dtype}{list(t.shape)}"
    assert tuple(t.shape) == shape, f"tensors gave {t.dtype}{list(t.shape)}"
    assert bool(torch.isfinite(t).all()), f"tensors gave a non-finite value: {t}"
    assert float(t.abs().max()) <= 3.0, f"tensors exceeded the bound 3: {t}"
    nonzero = t[t != 0].abs()
    assert not nonzero.numel() or float(nonzero.min()) >= 1e-6 * (1 - 1e-6), f"tiny nonzero value in {t}"


@SETTINGS
@given(data=st.data())
def test_directions_have_norm_bounded_away_from_zero(data: st.DataObject) -> None:
    dtype = data.draw(rs.float_dtypes((torch.float32, torch.float64, torch.bfloat16)), label="dtype")
    d = data.draw(rs.widths(1, 16), label="d")
    min_norm = data.draw(st.sampled_from([0.5, 1e-3, 2.0]), label="min_norm")
    r = data.draw(rs.directions(d, dtype, min_norm=min_norm), label="r")
    assert r.dtype == dtype, f"directions gave {r.dtype}{list(r.shape)}"
    assert tuple(r.shape) == (d,), f"directions gave {r.dtype}{list(r.shape)}"
    assert float(r.to(torch.float64).norm()) >= min_norm * (1 - 1e-2), f"‖r‖ = {float(r.norm())} < {min_norm}"


@SETTINGS
@given(lo=st.sampled_from([1e-3, 1e-2, 0.5]), hi=st.sampled_from([1.0, 10.0, 1e3]), data=st.data())
def test_scalars_stay_in_their_ranges(lo: float, hi: float, data: st.DataObject) -> None:
    p = data.draw(rs.positive_scalars(lo, hi), label="positive")
    assert lo <= p <= hi, f"positive_scalars({lo}, {hi}) gave {p}"
    s = data.draw(rs.signed_scalars(lo, hi), label="signed")
    assert s == 0.0 or lo <= abs(s) <= hi, f"signed_scalars({lo}, {hi}) gave {s}"
    assert 0.0 <= data.draw(rs.sparsities(), label="sparsity") < 1.0, "sparsity outside [0, 1)"


@SETTINGS
@given(data=st.data())
def test_sparse_weights_have_their_zeros_exactly_and_nothing_small(data: st.DataObject) -> None:
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    w = data.draw(rs.sparse_weights(4, 5, dtype), label="w")
    assert bool((w == 0).any()), f"sparse_weights drew no zero: {w}"
    nonzero = w[w != 0].abs()
    assert not nonzero.numel() or float(nonzero.min()) >= 0.1 * (1 - 1e-6), f"a nonzero entry below 0.1: {w}"


def _relative_gaps(values: torch.Tensor) -> float:
    v = torch.sort(values.to(torch.float64).reshape(-1)).values
    if v.numel() < 2:
        return math.inf
    return float(((v[1:] - v[:-1]) / v[1:]).min())


@SETTINGS
@given(data=st.data())
def test_distinct_magnitude_weights_are_tie_free(data: st.DataObject) -> None:
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    shape = data.draw(st.tuples(rs.widths(1, 6), rs.widths(1, 8)), label="shape")
    w = data.draw(rs.distinct_magnitude_weights(shape, dtype), label="w")
    n = w.numel()
    gap = _relative_gaps(w.abs())
    assert gap >= 0.5 / (n + 1.5) * (1 - 1e-4), f"|w| relative gap {gap} below the promised 1/(2n+3): {w}"


@SETTINGS
@given(data=st.data())
def test_tie_free_wanda_inputs_have_distinct_scores_per_row(data: st.DataObject) -> None:
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    rows, cols = data.draw(rs.widths(1, 4), label="rows"), data.draw(rs.widths(1, 8), label="cols")
    w, norms = data.draw(rs.tie_free_wanda_inputs(rows, cols, dtype), label="(w, norms)")
    assert w.shape == (rows, cols), f"shapes {list(w.shape)}, {list(norms.shape)}"
    assert norms.shape == (cols,), f"shapes {list(w.shape)}, {list(norms.shape)}"
    assert float(norms.min()) >= 0.1 * (1 - 1e-6), f"norms {norms}"
    assert float(norms.max()) <= 10 * (1 + 1e-6), f"norms {norms}"
    score = w.abs().to(torch.float64) * norms.to(torch.float64)
    for i in range(rows):
        gap = _relative_gaps(score[i])
        assert gap >= 1e-3 / (cols + 1), f"row {i}: Wanda scores nearly tied (relative gap {gap}): {score[i]}"


@SETTINGS
@given(pattern=rs.n_m_patterns(), layout=rs.group_layouts())
def test_n_m_patterns_and_group_layouts_are_valid(pattern: tuple[int, int], layout: tuple[int, int]) -> None:
    n, m = pattern
    assert m in (2, 4, 8), f"n_m_patterns gave {pattern}"
    assert 1 <= n < m, f"n_m_patterns gave {pattern}"
    group_size, n_groups = layout
    assert group_size in (1, 2, 4, 8), f"group_layouts gave {layout}"
    assert 1 <= n_groups <= 4, f"group_layouts gave {layout}"


@SETTINGS
@given(data=st.data())
def test_grouped_weights_with_zero_have_zero_in_every_group(data: st.DataObject) -> None:
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    group_size, n_groups = data.draw(rs.group_layouts(), label="layout")
    w = data.draw(rs.grouped_weights(3, group_size, n_groups, dtype, contains_zero=True), label="w")
    assert w.shape == (3, group_size * n_groups), f"grouped_weights shape {list(w.shape)}"
    has_zero = (w.reshape(-1, group_size) == 0).any(dim=1)
    assert bool(has_zero.all()), f"groups without an exact 0: {w.reshape(-1, group_size)[~has_zero]}"


@SETTINGS
@given(data=st.data())
def test_grouped_weights_without_zero_stay_within_twice_the_bound(data: st.DataObject) -> None:
    w = data.draw(rs.grouped_weights(2, 4, 2, torch.float64, contains_zero=False, bound=1.0), label="w")
    assert bool(torch.isfinite(w).all()), f"non-finite grouped weights {w}"
    assert float(w.abs().max()) <= 3.0 + 1e-12, f"shifts beyond 2·bound: {w}"


def test_grouped_weights_without_zero_reach_groups_on_one_side_of_zero() -> None:
    strategy = rs.grouped_weights(1, 4, 1, torch.float64, contains_zero=False)
    for side, predicate in (
        ("above", lambda w: bool((w > 0).all())),
        ("below", lambda w: bool((w < 0).all())),
    ):
        found = find(strategy, predicate, settings=settings(max_examples=200, database=None))
        assert predicate(found), f"grouped_weights never drew a group entirely {side} 0"


def _assert_int8_friendly(rows: torch.Tensor, what: str) -> None:
    r64 = rows.to(torch.float64)
    step = r64.abs().amax(dim=1, keepdim=True) / 127
    codes = r64 / torch.where(step > 0, step, 1.0)
    distance = ((codes - codes.floor()) - 0.5).abs()
    margin = float(distance.min()) if codes.numel() else 0.5
    assert margin >= rs.HALF_STEP_MARGIN - 1e-3, (
        f"{what}: a value sits only {margin:.3g} steps from a rounding boundary: {rows}"
    )


@SETTINGS
@given(data=st.data())
def test_int8_friendly_rows_are_away_from_half_steps(data: st.DataObject) -> None:
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    rows = data.draw(rs.int8_friendly_rows(4, 6, dtype), label="rows")
    _assert_int8_friendly(rows, "int8_friendly_rows")
    peak = rows.to(torch.float64).abs().amax(dim=1)
    assert float(peak.max()) <= 10.0 * (1 + 1e-6), f"int8_friendly_rows exceeded max_abs 10: {peak}"


@SETTINGS
@given(data=st.data())
def test_llm_int8_inputs_split_cleanly_at_the_threshold(data: st.DataObject) -> None:
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    boundary = data.draw(st.sampled_from([None, True, False]), label="boundary")
    case = data.draw(rs.llm_int8_inputs(dtype, boundary=boundary), label="case")
    peak = case.x.to(torch.float64).abs().amax(dim=0)
    tau = case.threshold
    assert bool((peak[case.outliers] >= tau).all()), f"an outlier feature below τ={tau}: {peak}"
    assert bool((peak[~case.outliers] < tau).all()), f"a regular feature reaches τ={tau}: {peak}"
    assert bool((~case.outliers).any()), "no regular feature left"
    if boundary:
        assert case.boundary, "boundary=True must report a boundary feature"
        assert bool((peak[case.outliers] == tau).any()), f"no feature at exactly τ={tau}: {peak}"
    _assert_int8_friendly(case.x[:, ~case.outliers], "regular features per token")
    _assert_int8_friendly(case.w, "weight rows")


@SETTINGS
@given(data=st.data())
def test_awq_inputs_are_consistent(data: st.DataObject) -> None:
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    zero = data.draw(st.sampled_from([None, True, False]), label="zero_weight")
    case = data.draw(rs.awq_inputs(dtype, zero_weight=zero), label="case")
    cols = case.w.shape[1]
    assert case.x.shape[1] == cols, f"layout {case}"
    assert cols % case.group_size == 0, f"layout {case}"
    assert float(case.x.abs().mean(dim=0).min()) > 0, "a calibration channel with zero mean |x|"
    if zero is True:
        assert not bool(case.w.any()), "zero_weight=True gave a nonzero w"
    if zero is False:
        assert case.w.dtype == dtype, f"w dtype {case.w.dtype}"


@SETTINGS
@given(data=st.data())
def test_logits_and_refusal_ids(data: st.DataObject) -> None:
    vocab = data.draw(st.integers(2, 10), label="vocab")
    ids = data.draw(rs.refusal_ids(vocab), label="ids")
    assert ids, f"refusal_ids gave {ids}"
    assert len(set(ids)) == len(ids), f"refusal_ids gave {ids}"
    assert all(0 <= i < vocab for i in ids), f"refusal_ids gave {ids}"
    logits = data.draw(rs.logits((2,), vocab, ids, torch.float32), label="logits")
    assert logits.shape == (2, vocab), f"logits {logits}"
    assert bool(torch.isfinite(logits).all()), f"logits {logits}"


@SETTINGS
@given(data=st.data())
def test_vector_pairs_are_nonzero_and_shaped(data: st.DataObject) -> None:
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    shape = data.draw(st.sampled_from([(1,), (4,), (2, 3)]), label="shape")
    a, b = data.draw(rs.vector_pairs(shape, dtype), label="(a, b)")
    for name, v in (("a", a), ("b", b)):
        assert tuple(v.shape) == shape, f"{name} has shape {list(v.shape)}, expected {list(shape)}"
        assert v.dtype == dtype, f"{name} has dtype {v.dtype}"
        assert float(v.to(torch.float64).norm()) >= 0.5 * 1e-2 * (1 - 1e-3), f"{name} is nearly zero: {v}"


def test_vector_pairs_reach_parallel_and_antiparallel() -> None:
    strategy = rs.vector_pairs((3,), torch.float64)

    def cos(pair: tuple[torch.Tensor, torch.Tensor]) -> float:
        a, b = pair
        return float(a @ b / (a.norm() * b.norm()))

    for target in (1.0, -1.0):
        found = find(strategy, lambda p, t=target: abs(cos(p) - t) < 1e-12, settings=settings(database=None))
        assert abs(cos(found) - target) < 1e-12, f"vector_pairs never drew a pair with cosine {target}"


@SETTINGS
@given(data=st.data())
def test_weight_matrices_rows_differ_in_magnitude(data: st.DataObject) -> None:
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    w = data.draw(rs.weight_matrices(3, 4, dtype), label="w")
    assert tuple(w.shape) == (3, 4), f"weight_matrices gave shape {list(w.shape)}"
    assert w.dtype == dtype, f"weight_matrices gave dtype {w.dtype}"
    assert bool(torch.isfinite(w).all()), f"weight_matrices gave a non-finite value: {w}"
    assert float(w.abs().max()) <= 10.0 * 1e2 * (1 + 1e-6), f"weight_matrices exceeded bound·100: {w}"
