"""Differential checks: the implementation under test against the reference on the same inputs.

Skipped when the implementation under test *is* the reference. Tolerances are those of
``refusal_core.testing.oracle.TOLERANCE`` per dtype (norm-relative). Two correct
implementations may accumulate in another precision, round an exact half step the other
way, or break ties between equal scores differently; none of that fails these checks:

* masks are compared only on entries whose score is not tied (within the dtype's
  tolerance) with the pruning threshold of their group, and the pruned counts must agree;
* quantization codes may differ by one step where the value sits at a half step;
* AWQ may pick another exponent if its loss is as low (within 1e-6) as the reference's.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from refusal_core.testing import strategies as rs
from refusal_core.testing.oracle import reference_implementation, tolerance

from ._checks import (
    as64,
    assert_close,
    awq_loss64,
    check,
    check_scores,
    int8_scale64,
    norm,
    pseudo_quantize64,
)

REF = reference_implementation()
WITH_BF16 = (torch.float32, torch.float64, torch.bfloat16)

pytestmark = pytest.mark.differential


def _agree(op: str, inputs: dict, got, want, *, dtype: torch.dtype, scale: float) -> None:
    for name, value in (("implementation", got), ("reference", want)):
        check(isinstance(value, torch.Tensor), op, inputs, f"the {name} returned {type(value).__name__}")
    check(
        got.dtype == want.dtype and got.shape == want.shape,
        op,
        inputs,
        f"implementation returned {got.dtype}{list(got.shape)}, reference {want.dtype}{list(want.shape)}",
    )
    assert_close(
        op + " vs reference", inputs, got, want, dtype=dtype, scale=scale, what="implementation's result"
    )


def _x_r(data, dtypes=WITH_BF16):
    dtype = data.draw(rs.float_dtypes(dtypes), label="dtype")
    d = data.draw(rs.widths(), label="d")
    lead = data.draw(rs.leading_shapes(), label="leading shape of x")
    x = data.draw(rs.tensors((*lead, d), dtype), label="x")
    r = data.draw(rs.directions(d, dtype), label="r")
    return dtype, x, r


@pytest.mark.needs("ablate")
@given(data=st.data())
def test_ablate_agrees_with_reference(impl, data):
    dtype, x, r = _x_r(data)
    _agree("ablate(x, r)", {"x": x, "r": r}, impl.ablate(x, r), REF.ablate(x, r), dtype=dtype, scale=norm(x))


@pytest.mark.needs("add_direction")
@given(data=st.data())
def test_add_direction_agrees_with_reference(impl, data):
    dtype, x, r = _x_r(data)
    c = data.draw(rs.signed_scalars(1e-3, 10.0), label="coeff")
    rows = max(1, x.numel() // x.shape[-1])
    _agree(
        "add_direction(x, r, coeff)",
        {"x": x, "r": r, "coeff": c},
        impl.add_direction(x, r, c),
        REF.add_direction(x, r, c),
        dtype=dtype,
        scale=norm(x) + abs(c) * norm(r) * rows**0.5,
    )


def _w_r(data):
    dtype = data.draw(rs.float_dtypes(WITH_BF16), label="dtype")
    d = data.draw(rs.widths(), label="d")
    k = data.draw(rs.widths(1, 10), label="k")
    w = data.draw(rs.tensors((d, k), dtype), label="w")
    r = data.draw(rs.directions(d, dtype), label="r")
    return dtype, w, r


@pytest.mark.needs("orthogonalize_weight")
@given(data=st.data())
def test_orthogonalize_weight_agrees_with_reference(impl, data):
    dtype, w, r = _w_r(data)
    _agree(
        "orthogonalize_weight(w, r)",
        {"w": w, "r": r},
        impl.orthogonalize_weight(w, r),
        REF.orthogonalize_weight(w, r),
        dtype=dtype,
        scale=norm(w),
    )


@pytest.mark.needs("orthogonalize_embedding")
@given(data=st.data())
def test_orthogonalize_embedding_agrees_with_reference(impl, data):
    dtype, w, r = _w_r(data)
    e = w.T.contiguous()
    _agree(
        "orthogonalize_embedding(e, r)",
        {"e": e, "r": r},
        impl.orthogonalize_embedding(e, r),
        REF.orthogonalize_embedding(e, r),
        dtype=dtype,
        scale=norm(e),
    )


@pytest.mark.needs("aird_update")
@given(data=st.data())
def test_aird_update_agrees_with_reference(impl, data):
    dtype, _, r = _w_r(data)
    w = data.draw(
        rs.sparse_weights(r.shape[0], data.draw(rs.widths(1, 10), label="k"), dtype), label="w (sparse)"
    )
    normalize = data.draw(st.booleans(), label="normalize")
    sparse = data.draw(st.booleans(), label="preserve_sparsity")
    g = data.draw(st.floats(-3.0, 3.0), label="g (α‖r‖², or α when normalized)")
    alpha = g if normalize else g / float(as64(r).norm()) ** 2
    inputs = {"w": w, "r": r, "alpha": alpha, "normalize": normalize, "preserve_sparsity": sparse}
    _agree(
        "aird_update(w, r, alpha, normalize, preserve_sparsity)",
        inputs,
        impl.aird_update(w, r, alpha, normalize=normalize, preserve_sparsity=sparse),
        REF.aird_update(w, r, alpha, normalize=normalize, preserve_sparsity=sparse),
        dtype=dtype,
        scale=(1 + abs(g)) * norm(w),
    )


@pytest.mark.needs("difference_in_means")
@given(data=st.data())
def test_difference_in_means_agrees_with_reference(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    d = data.draw(rs.widths(1, 8), label="d")
    mid = data.draw(rs.leading_shapes(max_dims=1, max_side=3), label="per-example leading shape")
    a = data.draw(
        rs.activation_sets(data.draw(st.integers(1, 5), label="n1"), (*mid, d), dtype), label="harmful"
    )
    b = data.draw(
        rs.activation_sets(data.draw(st.integers(1, 5), label="n2"), (*mid, d), dtype), label="harmless"
    )
    _agree(
        "difference_in_means(harmful, harmless)",
        {"harmful": a, "harmless": b},
        impl.difference_in_means(a, b),
        REF.difference_in_means(a, b),
        dtype=dtype,
        scale=norm(a) / a.shape[0] ** 0.5 + norm(b) / b.shape[0] ** 0.5,
    )


@pytest.mark.needs("cosine_similarity")
@given(data=st.data())
def test_cosine_similarity_agrees_with_reference(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    n = data.draw(rs.widths(1, 12), label="n")
    a, b = data.draw(rs.vector_pairs((n,), dtype), label="(a, b)")
    got, want = impl.cosine_similarity(a, b), REF.cosine_similarity(a, b)
    inputs = {"a": a, "b": b}
    check(
        isinstance(got, float), "cosine_similarity(a, b)", inputs, f"returned {type(got).__name__}, not float"
    )
    assert_close(
        "cosine_similarity(a, b) vs reference",
        inputs,
        torch.tensor(got),
        torch.tensor(want),
        dtype=dtype,
        scale=1.0,
    )


# ----------------------------------------------------------------------------
# masks: compare away from ties at the threshold
# ----------------------------------------------------------------------------


def _check_masks(
    op: str, inputs: dict, got, want, score: torch.Tensor, group: int, dtype: torch.dtype
) -> None:
    """Same pruned count per group; same decision for every entry not tied with the threshold."""
    check(
        isinstance(got, torch.Tensor) and got.dtype == torch.bool and got.shape == want.shape,
        op,
        inputs,
        f"returned {got!r:.80}, expected a bool mask of shape {list(want.shape)}",
    )
    scores = score.reshape(-1, group)
    g, w_ = got.reshape(-1, group), want.reshape(-1, group)
    band = tolerance(dtype)
    for i in range(scores.shape[0]):
        k = int((~w_[i]).sum())
        check(
            int((~g[i]).sum()) == k,
            op,
            inputs,
            f"group {i}: pruned {int((~g[i]).sum())}, the reference pruned {k}",
        )
        if k in (0, group):
            continue
        ordered = torch.sort(scores[i]).values
        lo, hi = float(ordered[k - 1]), float(ordered[k])
        tied = (scores[i] >= lo - band * hi) & (scores[i] <= hi + band * hi) if hi - lo <= band * hi else None
        differ = g[i] != w_[i]
        if tied is not None:
            differ &= ~tied
        check(
            not bool(differ.any()),
            op,
            inputs,
            f"group {i}: {int(differ.sum())} untied entries decided differently from the reference "
            f"(threshold between scores {lo:.6g} and {hi:.6g})",
        )


@pytest.mark.needs("magnitude_mask")
@given(data=st.data())
def test_magnitude_mask_agrees_with_reference(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    shape = data.draw(st.tuples(rs.widths(1, 6), rs.widths(1, 10)), label="shape")
    w = data.draw(rs.weight_matrices(*shape, dtype), label="w")
    s = data.draw(rs.sparsities(), label="sparsity")
    _check_masks(
        "magnitude_mask(w, sparsity)",
        {"w": w, "sparsity": s},
        impl.magnitude_mask(w, s),
        REF.magnitude_mask(w, s),
        as64(w).abs(),
        w.numel(),
        dtype,
    )


@pytest.mark.needs("wanda_mask")
@given(data=st.data())
def test_wanda_mask_agrees_with_reference(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    rows = data.draw(rs.widths(1, 6), label="rows")
    pattern = data.draw(st.one_of(st.none(), rs.n_m_patterns()), label="n_m")
    cols = (
        pattern[1] * data.draw(st.integers(1, 3), label="groups")
        if pattern
        else data.draw(rs.widths(1, 16), label="cols")
    )
    w = data.draw(rs.weight_matrices(rows, cols, dtype), label="w")
    norms = data.draw(rs.tensors((cols,), dtype).map(torch.abs), label="input_norms")
    s = data.draw(rs.sparsities(), label="sparsity")
    _check_masks(
        "wanda_mask(w, input_norms, sparsity, n_m)",
        {"w": w, "input_norms": norms, "sparsity": s, "n_m": pattern},
        impl.wanda_mask(w, norms, s, n_m=pattern),
        REF.wanda_mask(w, norms, s, n_m=pattern),
        as64(w).abs() * as64(norms),
        pattern[1] if pattern else cols,
        dtype,
    )


# ----------------------------------------------------------------------------
# quantization: one step of slack at half steps
# ----------------------------------------------------------------------------


@pytest.mark.needs("int8_quantize")
@given(data=st.data())
def test_int8_quantize_agrees_with_reference(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    shape = data.draw(st.tuples(rs.widths(1, 6), rs.widths(1, 12)), label="shape")
    w = data.draw(rs.tensors(shape, dtype), label="w")
    inputs = {"w": w}
    (q, scale), (q_ref, scale_ref) = impl.int8_quantize(w), REF.int8_quantize(w)
    check(
        q.dtype == torch.int8 and q.shape == w.shape,
        "int8_quantize(w)",
        inputs,
        f"codes are {q.dtype}{list(q.shape)}",
    )
    assert_close(
        "int8_quantize(w) scale vs reference", inputs, scale, scale_ref, dtype=dtype, scale=norm(scale_ref)
    )
    step = int8_scale64(w)
    raw = as64(w) / torch.where(step > 0, step, 1.0).unsqueeze(1)
    half = ((raw - raw.floor()) - 0.5).abs() < 1e-3
    diff = (q.to(torch.int64) - q_ref.to(torch.int64)).abs()
    bad = (diff > 1) | ((diff == 1) & ~half)
    check(
        not bool(bad.any()), "int8_quantize(w) codes vs reference", inputs, f"{int(bad.sum())} codes differ"
    )


@pytest.mark.needs("int8_dequantize")
@given(data=st.data())
def test_int8_dequantize_agrees_with_reference(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype of scale")
    shape = data.draw(st.tuples(rs.widths(1, 6), rs.widths(1, 12)), label="shape")
    q = data.draw(rs.tensors(shape, torch.float64, bound=127.0).map(torch.round), label="q").to(torch.int8)
    scale = data.draw(rs.tensors((shape[0],), dtype, bound=1.0).map(torch.abs), label="scale")
    _agree(
        "int8_dequantize(q, scale)",
        {"q": q, "scale": scale},
        impl.int8_dequantize(q, scale),
        REF.int8_dequantize(q, scale),
        dtype=dtype,
        scale=127 * norm(scale) * shape[1] ** 0.5,
    )


@pytest.mark.needs("llm_int8_linear")
@given(data=st.data())
def test_llm_int8_linear_agrees_with_reference(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    case = data.draw(rs.llm_int8_inputs(dtype), label="inputs (codes away from half steps)")
    threshold = data.draw(st.sampled_from([case.threshold, math.inf]), label="threshold used")
    _agree(
        "llm_int8_linear(x, w, threshold)",
        {"x": case.x, "w": case.w, "threshold": threshold},
        impl.llm_int8_linear(case.x, case.w, threshold=threshold),
        REF.llm_int8_linear(case.x, case.w, threshold=threshold),
        dtype=dtype,
        scale=norm(case.x) * norm(case.w),
    )


@pytest.mark.needs("pseudo_quantize")
@given(data=st.data())
def test_pseudo_quantize_agrees_with_reference(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    rows = data.draw(rs.widths(1, 4), label="rows")
    group_size, n_groups = data.draw(rs.group_layouts(), label="(group_size, n_groups)")
    contains_zero = data.draw(st.booleans(), label="every group contains 0")
    w = data.draw(
        rs.grouped_weights(rows, group_size, n_groups, dtype, contains_zero=contains_zero), label="w"
    )
    w_bit = data.draw(st.sampled_from([2, 3, 4, 8]), label="w_bit")
    zero_point = data.draw(st.booleans(), label="zero_point")
    inputs = {"w": w, "w_bit": w_bit, "group_size": group_size, "zero_point": zero_point}
    got = impl.pseudo_quantize(w, w_bit, group_size, zero_point=zero_point)
    want = REF.pseudo_quantize(w, w_bit, group_size, zero_point=zero_point)
    check(
        got.dtype == want.dtype and got.shape == want.shape,
        "pseudo_quantize",
        inputs,
        f"returned {got.dtype}",
    )
    _, step, ambiguous = pseudo_quantize64(w, w_bit, group_size, zero_point)
    magnitude = as64(w).abs().reshape(-1, group_size).amax(dim=1, keepdim=True).expand(-1, group_size)
    bound = torch.where(ambiguous, step * (1 + 1e-6), 0.0) + tolerance(dtype) * (
        magnitude.reshape(w.shape) + step
    )
    bad = (as64(got) - as64(want)).abs() > bound
    check(
        not bool(bad.any()),
        "pseudo_quantize(w, w_bit, group_size, zero_point) vs reference",
        inputs,
        f"{int(bad.sum())} entries differ by more than rounding allows",
    )


@pytest.mark.needs("awq_scales")
@given(data=st.data())
def test_awq_scales_agrees_with_reference(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    case = data.draw(rs.awq_inputs(dtype), label="inputs")
    inputs = {"w": case.w, "x": case.x, "w_bit": case.w_bit, "group_size": case.group_size, "grid": case.grid}
    got = impl.awq_scales(case.w, case.x, case.w_bit, case.group_size, grid=case.grid)
    want = REF.awq_scales(case.w, case.x, case.w_bit, case.group_size, grid=case.grid)
    check(
        isinstance(got, torch.Tensor) and got.shape == want.shape and bool((got > 0).all()),
        "awq_scales",
        inputs,
        f"returned {got!r:.80}; expected positive scales of shape {list(want.shape)}",
    )
    if float(((as64(got) - as64(want)).abs() / as64(want)).max()) <= tolerance(dtype):
        return
    ref = as64(case.x) @ as64(case.w).T
    loss_got = awq_loss64(case.w, case.x, got, case.w_bit, case.group_size, ref)
    loss_want = awq_loss64(case.w, case.x, want, case.w_bit, case.group_size, ref)
    check(
        loss_got <= loss_want * (1 + 1e-6) + 1e-12 * float((ref**2).sum()),
        "awq_scales vs reference",
        inputs,
        f"picked other scales with loss {loss_got:.6g} > the reference's {loss_want:.6g}",
    )


@pytest.mark.needs("refusal_score")
@given(data=st.data())
def test_refusal_score_agrees_with_reference(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    lead = data.draw(rs.leading_shapes(max_dims=2, max_side=3), label="leading shape")
    vocab = data.draw(st.integers(2, 12), label="vocab")
    ids = data.draw(rs.refusal_ids(vocab), label="refusal_token_ids")
    logits = data.draw(rs.logits(lead, vocab, ids, dtype), label="logits")
    got, want = impl.refusal_score(logits, ids), REF.refusal_score(logits, ids)
    inputs = {"logits": logits, "refusal_token_ids": ids}
    check(
        got.dtype == torch.float64 and got.shape == want.shape,
        "refusal_score",
        inputs,
        f"returned {got.dtype}",
    )
    check_scores("refusal_score(logits, ids) vs reference", inputs, got, as64(want), logits, ids)
