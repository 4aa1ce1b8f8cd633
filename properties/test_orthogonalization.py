"""Properties of weight and embedding orthogonalization (DESIGN.md, "Weight orthogonalization")."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from refusal_core.testing import strategies as rs

from ._checks import ablate64, as64, assert_close, assert_layout, norm, unit64


def _draw_weight(data: st.DataObject) -> tuple[torch.dtype, torch.Tensor, torch.Tensor]:
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    d = data.draw(rs.widths(), label="d (output rows)")
    k = data.draw(st.one_of(st.just(d), rs.widths(1, 12)), label="k (inputs)")
    w = data.draw(rs.tensors((d, k), dtype), label="w")
    r = data.draw(rs.directions(d, dtype), label="r")
    return dtype, w, r


def _draw_embedding(data: st.DataObject) -> tuple[torch.dtype, torch.Tensor, torch.Tensor]:
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    d = data.draw(rs.widths(), label="d")
    vocab = data.draw(st.one_of(st.just(d), rs.widths(1, 16)), label="vocab")
    e = data.draw(rs.tensors((vocab, d), dtype), label="e")
    r = data.draw(rs.directions(d, dtype), label="r")
    return dtype, e, r


@pytest.mark.needs("orthogonalize_weight")
@given(data=st.data())
def test_orthogonalize_weight_leaves_no_component_along_r(impl, data):
    dtype, w, r = _draw_weight(data)
    inputs = {"w": w, "r": r}
    out = impl.orthogonalize_weight(w, r)
    assert_layout("orthogonalize_weight(w, r)", inputs, out, shape=w.shape, dtype=w.dtype)
    along = unit64(r) @ as64(out)
    assert_close(
        "r̂ᵀ orthogonalize_weight(w, r)", inputs, along, torch.zeros_like(along), dtype=dtype, scale=norm(w)
    )


@pytest.mark.needs("orthogonalize_weight")
@given(data=st.data())
def test_orthogonalize_weight_equals_ablating_its_outputs(impl, data):
    dtype, w, r = _draw_weight(data)
    x = data.draw(rs.tensors((3, w.shape[1]), torch.float64), label="x (inputs, float64)")
    inputs = {"w": w, "r": r, "x": x}
    out = impl.orthogonalize_weight(w, r)
    assert_close(
        "x orthogonalize_weight(w, r)ᵀ vs ablate(x wᵀ, r)",
        inputs,
        x @ as64(out).T,
        ablate64(x @ as64(w).T, r),
        dtype=dtype,
        scale=norm(w) * norm(x),
    )


@pytest.mark.needs("orthogonalize_embedding")
@given(data=st.data())
def test_orthogonalize_embedding_leaves_rows_orthogonal_to_r(impl, data):
    dtype, e, r = _draw_embedding(data)
    inputs = {"e": e, "r": r}
    out = impl.orthogonalize_embedding(e, r)
    assert_layout("orthogonalize_embedding(e, r)", inputs, out, shape=e.shape, dtype=e.dtype)
    along = as64(out) @ unit64(r)
    assert_close(
        "orthogonalize_embedding(e, r) r̂", inputs, along, torch.zeros_like(along), dtype=dtype, scale=norm(e)
    )


@pytest.mark.needs("orthogonalize_embedding")
@given(data=st.data())
def test_orthogonalize_embedding_ablates_every_row(impl, data):
    dtype, e, r = _draw_embedding(data)
    assert_close(
        "orthogonalize_embedding(e, r) vs e − (e r̂) r̂ᵀ",
        {"e": e, "r": r},
        impl.orthogonalize_embedding(e, r),
        ablate64(e, r),
        dtype=dtype,
        scale=norm(e),
    )


@pytest.mark.needs("orthogonalize_embedding", "orthogonalize_weight")
@given(data=st.data())
def test_orthogonalize_embedding_is_transposed_weight_orthogonalization(impl, data):
    dtype, e, r = _draw_embedding(data)
    assert_close(
        "orthogonalize_embedding(e, r) vs orthogonalize_weight(eᵀ, r)ᵀ",
        {"e": e, "r": r},
        impl.orthogonalize_embedding(e, r),
        as64(impl.orthogonalize_weight(e.T.contiguous(), r)).T,
        dtype=dtype,
        scale=norm(e),
    )
