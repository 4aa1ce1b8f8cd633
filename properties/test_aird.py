"""Properties of the AIRD rank-1 update (DESIGN.md, "AIRD" and "Sparsity-preserving AIRD")."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from refusal_core.testing import strategies as rs

from ._checks import ablate64, as64, assert_close, assert_layout, check, norm, unit64


def _draw(data: st.DataObject, *, sparse: bool = False):
    """dtype, w [d, k], r, normalize, gain g and alpha with α‖r‖² = g (or α = g when normalized)."""
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    d = data.draw(rs.widths(), label="d (output rows)")
    k = data.draw(rs.widths(1, 10), label="k (inputs)")
    w = data.draw(rs.sparse_weights(d, k, dtype) if sparse else rs.tensors((d, k), dtype), label="w")
    r = data.draw(rs.directions(d, dtype), label="r")
    normalize = data.draw(st.booleans(), label="normalize")
    g = data.draw(st.floats(-3.0, 3.0), label="g (α‖r‖², or α when normalized)")
    alpha = g if normalize else g / float(as64(r).norm()) ** 2
    return dtype, w, r, normalize, g, alpha


def _inputs(w, r, alpha, normalize, **more):
    return {"w": w, "r": r, "alpha": alpha, "normalize": normalize, **more}


@pytest.mark.needs("aird_update")
@given(data=st.data())
def test_aird_update_is_rank_one_in_span_of_r(impl, data):
    dtype, w, r, normalize, _, alpha = _draw(data)
    inputs = _inputs(w, r, alpha, normalize)
    out = impl.aird_update(w, r, alpha, normalize=normalize)
    assert_layout("aird_update(w, r, alpha)", inputs, out, shape=w.shape, dtype=w.dtype)
    delta = as64(out) - as64(w)
    # (I − r̂ r̂ᵀ) ΔW = 0 means every column of ΔW lies in span(r): rank ≤ 1
    assert_close(
        "(I − r̂ r̂ᵀ)(aird_update(w, r, alpha) − w)",
        inputs,
        ablate64(delta.T, r),
        torch.zeros_like(delta.T),
        dtype=dtype,
        scale=norm(w) + norm(out),
    )


@pytest.mark.needs("aird_update")
@given(data=st.data())
def test_aird_update_keeps_output_part_orthogonal_to_r(impl, data):
    dtype, w, r, normalize, _, alpha = _draw(data)
    x = data.draw(rs.tensors((3, w.shape[1]), torch.float64), label="x (inputs, float64)")
    inputs = _inputs(w, r, alpha, normalize, x=x)
    out = impl.aird_update(w, r, alpha, normalize=normalize)
    assert_close(
        "ablate(x aird_update(w, r, alpha)ᵀ, r) vs ablate(x wᵀ, r)",
        inputs,
        ablate64(x @ as64(out).T, r),
        ablate64(x @ as64(w).T, r),
        dtype=dtype,
        scale=(norm(w) + norm(out)) * norm(x),
    )


@pytest.mark.needs("aird_update")
@given(data=st.data())
def test_aird_update_with_zero_alpha_is_identity(impl, data):
    dtype, w, r, normalize, _, _ = _draw(data)
    sparse = data.draw(st.booleans(), label="preserve_sparsity")
    inputs = _inputs(w, r, 0.0, normalize, preserve_sparsity=sparse)
    out = impl.aird_update(w, r, 0.0, normalize=normalize, preserve_sparsity=sparse)
    assert_layout("aird_update(w, r, 0)", inputs, out, shape=w.shape, dtype=w.dtype)
    assert_close("aird_update(w, r, 0) vs w", inputs, out, w, dtype=dtype, scale=norm(w))


@pytest.mark.needs("aird_update")
@given(data=st.data())
def test_aird_update_gain_along_r(impl, data):
    dtype, w, r, normalize, g, alpha = _draw(data)
    inputs = _inputs(w, r, alpha, normalize)
    out = impl.aird_update(w, r, alpha, normalize=normalize)
    u = unit64(r)
    gain = 1.0 + (alpha if normalize else alpha * float(as64(r).norm()) ** 2)
    assert_close(
        f"r̂ᵀ aird_update(w, r, alpha) vs (1 + {'α' if normalize else 'α‖r‖²'}) r̂ᵀ w  (gain {gain:.6g})",
        inputs,
        u @ as64(out),
        gain * (u @ as64(w)),
        dtype=dtype,
        scale=(1.0 + abs(g)) * norm(w),
    )


@pytest.mark.needs("aird_update", "orthogonalize_weight")
@given(data=st.data())
def test_aird_update_at_gain_zero_equals_orthogonalize_weight(impl, data):
    dtype, w, r, normalize, _, _ = _draw(data)
    alpha = -1.0 if normalize else -1.0 / float(as64(r).norm()) ** 2
    inputs = _inputs(w, r, alpha, normalize)
    assert_close(
        "aird_update(w, r, α) with α‖r‖² = −1 vs orthogonalize_weight(w, r)",
        inputs,
        impl.aird_update(w, r, alpha, normalize=normalize),
        impl.orthogonalize_weight(w, r),
        dtype=dtype,
        scale=norm(w),
    )


@pytest.mark.needs("aird_update")
@given(data=st.data())
def test_aird_update_sparse_keeps_zero_pattern(impl, data):
    _, w, r, normalize, _, alpha = _draw(data, sparse=True)
    inputs = _inputs(w, r, alpha, normalize, preserve_sparsity=True)
    out = impl.aird_update(w, r, alpha, normalize=normalize, preserve_sparsity=True)
    assert_layout(
        "aird_update(w, r, alpha, preserve_sparsity=True)", inputs, out, shape=w.shape, dtype=w.dtype
    )
    moved = int(((w == 0) & (out != 0)).sum())
    check(
        moved == 0,
        "aird_update(w, r, alpha, preserve_sparsity=True)",
        inputs,
        f"{moved} of the {int((w == 0).sum())} zero entries of w became nonzero",
    )


@pytest.mark.needs("aird_update")
@given(data=st.data())
def test_aird_update_sparse_equals_masked_dense_update(impl, data):
    dtype, w, r, normalize, g, alpha = _draw(data, sparse=True)
    inputs = _inputs(w, r, alpha, normalize)
    dense = as64(impl.aird_update(w, r, alpha, normalize=normalize))
    sparse = impl.aird_update(w, r, alpha, normalize=normalize, preserve_sparsity=True)
    assert_close(
        "aird_update(..., preserve_sparsity=True) vs the dense update where w ≠ 0",
        inputs,
        sparse,
        torch.where(w != 0, dense, 0.0),
        dtype=dtype,
        scale=(1.0 + abs(g)) * norm(w),
    )
