"""Properties of the difference in means and the cosine similarity.

DESIGN.md, "Difference in means" and "Comparison".
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from refusal_core.testing import strategies as rs

from ._checks import as64, assert_close, assert_layout, check, is_finite_number, norm


def _rms(acts: torch.Tensor) -> float:
    """‖acts‖ / √n: bounds the norm of the mean over the first axis."""
    return norm(acts) / acts.shape[0] ** 0.5


def _draw_sets(data: st.DataObject, dtype: torch.dtype | None = None):
    dtype = dtype or data.draw(rs.float_dtypes(), label="dtype")
    d = data.draw(rs.widths(1, 8), label="d")
    mid = data.draw(rs.leading_shapes(max_dims=1, max_side=3), label="per-example leading shape")
    n1 = data.draw(st.integers(1, 5), label="n1 (harmful)")
    n2 = data.draw(st.integers(1, 5), label="n2 (harmless)")
    harmful = data.draw(rs.activation_sets(n1, (*mid, d), dtype), label="harmful")
    harmless = data.draw(rs.activation_sets(n2, (*mid, d), dtype), label="harmless")
    return dtype, harmful, harmless


@pytest.mark.needs("difference_in_means")
@given(data=st.data())
def test_difference_in_means_matches_float64_formula(impl, data):
    dtype, a, b = _draw_sets(data)
    inputs = {"harmful": a, "harmless": b}
    out = impl.difference_in_means(a, b)
    assert_layout("difference_in_means", inputs, out, shape=a.shape[1:], dtype=torch.float64)
    assert_close(
        "difference_in_means vs mean(harmful) − mean(harmless)",
        inputs,
        out,
        as64(a).mean(0) - as64(b).mean(0),
        dtype=dtype,
        scale=_rms(a) + _rms(b),
    )


@pytest.mark.needs("difference_in_means")
@given(data=st.data())
def test_difference_in_means_invariant_to_prompt_order(impl, data):
    dtype, a, b = _draw_sets(data)
    pa = data.draw(st.permutations(range(a.shape[0])), label="harmful order")
    pb = data.draw(st.permutations(range(b.shape[0])), label="harmless order")
    assert_close(
        "difference_in_means on reordered prompts vs original order",
        {"harmful": a, "harmless": b, "harmful order": pa, "harmless order": pb},
        impl.difference_in_means(a[list(pa)], b[list(pb)]),
        impl.difference_in_means(a, b),
        dtype=dtype,
        scale=_rms(a) + _rms(b),
    )


@pytest.mark.needs("difference_in_means")
@given(data=st.data())
def test_difference_in_means_invariant_to_common_shift(impl, data):
    dtype, a, b = _draw_sets(data)
    v = data.draw(rs.tensors(tuple(a.shape[1:]), torch.float64), label="shift v")
    assert_close(
        "difference_in_means(harmful + v, harmless + v) vs difference_in_means(harmful, harmless)",
        {"harmful": a, "harmless": b, "v": v},
        impl.difference_in_means((as64(a) + v).to(dtype), (as64(b) + v).to(dtype)),
        impl.difference_in_means(a, b),
        dtype=dtype,
        scale=_rms(a) + _rms(b) + 2 * norm(v),
    )


@pytest.mark.needs("difference_in_means")
@given(data=st.data())
def test_difference_in_means_is_antisymmetric(impl, data):
    dtype, a, b = _draw_sets(data)
    assert_close(
        "difference_in_means(harmless, harmful) vs −difference_in_means(harmful, harmless)",
        {"harmful": a, "harmless": b},
        impl.difference_in_means(b, a),
        -as64(impl.difference_in_means(a, b)),
        dtype=dtype,
        scale=_rms(a) + _rms(b),
    )


@pytest.mark.needs("difference_in_means")
@given(data=st.data())
def test_difference_in_means_is_linear(impl, data):
    dtype, a1, b1 = _draw_sets(data)
    a2 = data.draw(rs.activation_sets(a1.shape[0], tuple(a1.shape[1:]), dtype), label="harmful2")
    b2 = data.draw(rs.activation_sets(b1.shape[0], tuple(b1.shape[1:]), dtype), label="harmless2")
    c1 = data.draw(rs.signed_scalars(1e-3, 4.0), label="c1")
    c2 = data.draw(rs.signed_scalars(1e-3, 4.0), label="c2")
    combined = impl.difference_in_means(
        (c1 * as64(a1) + c2 * as64(a2)).to(dtype), (c1 * as64(b1) + c2 * as64(b2)).to(dtype)
    )
    separate = c1 * as64(impl.difference_in_means(a1, b1)) + c2 * as64(impl.difference_in_means(a2, b2))
    assert_close(
        "difference_in_means(c1·A1 + c2·A2, c1·B1 + c2·B2) vs c1·dim(A1, B1) + c2·dim(A2, B2)",
        {"harmful": a1, "harmless": b1, "harmful2": a2, "harmless2": b2, "c1": c1, "c2": c2},
        combined,
        separate,
        dtype=dtype,
        scale=abs(c1) * (_rms(a1) + _rms(b1)) + abs(c2) * (_rms(a2) + _rms(b2)),
    )


def _draw_pair(data: st.DataObject):
    """dtype, a, b of one shape, both of norm ≥ 0.5; b independent of, parallel or antiparallel to a."""
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    shape = data.draw(st.sampled_from([(1,), (2,), (5,), (12,), (2, 3), (3, 4)]), label="shape")
    a, b = data.draw(rs.vector_pairs(shape, dtype), label="(a, b)")
    return dtype, a, b


def _cos64(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = as64(a).reshape(-1), as64(b).reshape(-1)
    return float(a64 @ b64 / (a64.norm() * b64.norm()))


@pytest.mark.needs("cosine_similarity")
@given(data=st.data())
def test_cosine_similarity_matches_float64_formula(impl, data):
    dtype, a, b = _draw_pair(data)
    inputs = {"a": a, "b": b}
    out = impl.cosine_similarity(a, b)
    check(
        isinstance(out, float), "cosine_similarity(a, b)", inputs, f"returned {type(out).__name__}, not float"
    )
    assert_close(
        "cosine_similarity(a, b) vs aᵀb / (‖a‖‖b‖)",
        inputs,
        torch.tensor(out),
        torch.tensor(_cos64(a, b)),
        dtype=dtype,
        scale=1.0,
    )


@pytest.mark.needs("cosine_similarity")
@given(data=st.data())
def test_cosine_similarity_is_symmetric(impl, data):
    dtype, a, b = _draw_pair(data)
    assert_close(
        "cosine_similarity(b, a) vs cosine_similarity(a, b)",
        {"a": a, "b": b},
        torch.tensor(float(impl.cosine_similarity(b, a))),
        torch.tensor(float(impl.cosine_similarity(a, b))),
        dtype=dtype,
        scale=1.0,
    )


@pytest.mark.needs("cosine_similarity")
@given(data=st.data())
def test_cosine_similarity_is_scale_invariant(impl, data):
    dtype, a, b = _draw_pair(data)
    ca = data.draw(rs.positive_scalars(1e-2, 1e2), label="scale of a")
    cb = data.draw(rs.positive_scalars(1e-2, 1e2), label="scale of b")
    assert_close(
        "cosine_similarity(ca·a, cb·b) vs cosine_similarity(a, b)",
        {"a": a, "b": b, "ca": ca, "cb": cb},
        torch.tensor(float(impl.cosine_similarity((ca * as64(a)).to(dtype), (cb * as64(b)).to(dtype)))),
        torch.tensor(float(impl.cosine_similarity(a, b))),
        dtype=dtype,
        scale=1.0,
    )


@pytest.mark.needs("cosine_similarity")
@given(data=st.data())
def test_cosine_similarity_is_odd_under_negation(impl, data):
    dtype, a, b = _draw_pair(data)
    assert_close(
        "cosine_similarity(−a, b) vs −cosine_similarity(a, b)",
        {"a": a, "b": b},
        torch.tensor(float(impl.cosine_similarity(-a, b))),
        torch.tensor(-float(impl.cosine_similarity(a, b))),
        dtype=dtype,
        scale=1.0,
    )


@pytest.mark.needs("cosine_similarity")
@given(data=st.data())
def test_cosine_similarity_lies_in_unit_interval(impl, data):
    dtype, a, b = _draw_pair(data)
    # parallel pairs are where rounding pushes an unclamped cosine past ±1: try several multiples
    scales = data.draw(
        st.lists(rs.positive_scalars(1e-2, 1e2), min_size=4, max_size=8), label="multiples of a"
    )
    pairs = [("a", "b", a, b), ("a", "a", a, a), ("a", "−a", a, -a)]
    pairs += [("a", f"{c:.6g}·a", a, (c * as64(a)).to(dtype)) for c in scales]
    for name_a, name_b, u, v in pairs:
        out = impl.cosine_similarity(u, v)
        check(
            is_finite_number(out) and -1.0 <= float(out) <= 1.0,
            f"cosine_similarity({name_a}, {name_b})",
            {"a": a, "b": b},
            f"returned {float(out)!r}, outside [−1, 1]",
        )
