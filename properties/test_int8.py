"""Properties of absmax int8 quantization and the LLM.int8 matmul (DESIGN.md, "LLM.int8", "Quantization")."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from refusal_core.testing import strategies as rs
from refusal_core.testing.oracle import tolerance

from ._checks import (
    as64,
    assert_close,
    assert_layout,
    check,
    first_bad,
    int8_codes64,
    int8_scale64,
    llm_int8_64,
    norm,
)


def _draw_weight(data: st.DataObject) -> tuple[torch.dtype, torch.Tensor]:
    """A general matrix, some rows possibly all zero."""
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    rows = data.draw(rs.widths(1, 6), label="rows (out)")
    cols = data.draw(rs.widths(1, 12), label="cols (in)")
    w = data.draw(rs.tensors((rows, cols), dtype), label="w")
    zero = data.draw(st.lists(st.booleans(), min_size=rows, max_size=rows), label="all-zero rows")
    return dtype, torch.where(torch.tensor(zero).unsqueeze(1), torch.zeros_like(w), w)


def _quantize(impl, w: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    out = impl.int8_quantize(w)
    check(
        isinstance(out, tuple) and len(out) == 2,
        "int8_quantize(w)",
        inputs,
        f"must return a pair (q, scale), got {type(out).__name__}",
    )
    q, scale = out
    assert_layout("int8_quantize(w) codes q", inputs, q, shape=w.shape, dtype=torch.int8)
    check(
        isinstance(scale, torch.Tensor) and scale.is_floating_point() and tuple(scale.shape) == (w.shape[0],),
        "int8_quantize(w) scale",
        inputs,
        f"scale must be a floating tensor of shape [{w.shape[0]}], got {scale!r}",
    )
    return q, scale


@pytest.mark.needs("int8_quantize")
@given(data=st.data())
def test_int8_quantize_matches_definition(impl, data):
    dtype, w = _draw_weight(data)
    inputs = {"w": w}
    q, scale = _quantize(impl, w, inputs)
    expected_scale = int8_scale64(w)
    assert_close(
        "int8_quantize(w) scale vs row absmax / 127",
        inputs,
        scale,
        expected_scale,
        dtype=dtype,
        scale=norm(expected_scale),
    )
    raw = as64(w) / torch.where(expected_scale > 0, expected_scale, 1.0).unsqueeze(1)
    # two correct implementations may round an exact half step either way
    ambiguous = ((raw - raw.floor()) - 0.5).abs() < 1e-3
    diff = (q.to(torch.int64) - int8_codes64(w).to(torch.int64)).abs()
    bad = (diff > 1) | ((diff == 1) & ~ambiguous)
    check(
        not bool(bad.any()),
        "int8_quantize(w) codes vs round(w / scale)",
        inputs,
        "codes differ in " + first_bad(bad, got=q, expected=int8_codes64(w), w_over_scale=raw),
    )


@pytest.mark.needs("int8_quantize", "int8_dequantize")
@given(data=st.data())
def test_int8_round_trip_within_half_step(impl, data):
    dtype, w = _draw_weight(data)
    inputs = {"w": w}
    q, scale = _quantize(impl, w, inputs)
    back = as64(impl.int8_dequantize(q, scale))
    step = int8_scale64(w).unsqueeze(1)
    err = (back - as64(w)).abs()
    bound = 0.5 * step + tolerance(dtype) * 127 * step
    worst = int(torch.argmax(err - bound))
    i, j = divmod(worst, w.shape[1])
    check(
        bool((err <= bound).all()),
        "int8_dequantize(*int8_quantize(w)) vs w",
        inputs,
        f"error {float(err[i, j]):.6g} at ({i}, {j}) exceeds half a step ({float(step[i, 0]) / 2:.6g}, "
        "step = row absmax / 127)",
    )


@pytest.mark.needs("int8_quantize", "int8_dequantize")
@given(data=st.data())
def test_int8_quantize_dequantize_fixed_point(impl, data):
    dtype, w = _draw_weight(data)
    inputs = {"w": w}
    q, scale = _quantize(impl, w, inputs)
    back = impl.int8_dequantize(q, scale)
    q2, scale2 = _quantize(impl, back, {"w (dequantized)": back})
    differ = int((q2 != q).sum())
    check(
        differ == 0,
        "int8_quantize(int8_dequantize(*int8_quantize(w))) codes vs int8_quantize(w) codes",
        inputs,
        f"re-quantizing moved {differ} codes",
    )
    assert_close(
        "scale after re-quantizing vs original scale",
        inputs,
        scale2,
        scale,
        dtype=dtype,
        scale=norm(scale),
    )


@pytest.mark.needs("int8_dequantize")
@given(data=st.data())
def test_int8_dequantize_matches_formula(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype of scale")
    rows = data.draw(rs.widths(1, 6), label="rows")
    cols = data.draw(rs.widths(1, 12), label="cols")
    q = data.draw(rs.tensors((rows, cols), torch.float64, bound=127.0).map(torch.round), label="q").to(
        torch.int8
    )
    scale = data.draw(rs.tensors((rows,), dtype, bound=1.0).map(torch.abs), label="scale")
    inputs = {"q": q, "scale": scale}
    out = impl.int8_dequantize(q, scale)
    assert_layout("int8_dequantize(q, scale)", inputs, out, shape=q.shape, dtype=scale.dtype)
    assert_close(
        "int8_dequantize(q, scale) vs q·scale per row",
        inputs,
        out,
        as64(q) * as64(scale).unsqueeze(1),
        dtype=dtype,
        scale=127 * norm(scale) * cols**0.5,
    )


# ----------------------------------------------------------------------------
# LLM.int8
# ----------------------------------------------------------------------------


def _draw_friendly(data: st.DataObject):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    lead = data.draw(st.sampled_from([(1,), (3,), (2, 2)]), label="leading shape of x")
    cols = data.draw(rs.widths(1, 10), label="in")
    rows = data.draw(rs.widths(1, 5), label="out")
    tokens = int(torch.Size(lead).numel())
    x = data.draw(rs.int8_friendly_rows(tokens, cols, dtype), label="x (int8-friendly per token)")
    w = data.draw(rs.int8_friendly_rows(rows, cols, dtype), label="w (int8-friendly per row)")
    return dtype, x.reshape(*lead, cols), w


@pytest.mark.needs("llm_int8_linear")
@given(data=st.data())
def test_llm_int8_infinite_threshold_equals_vectorwise_int8(impl, data):
    dtype, x, w = _draw_friendly(data)
    inputs = {"x": x, "w": w, "threshold": math.inf}
    out = impl.llm_int8_linear(x, w, threshold=math.inf)
    assert_layout("llm_int8_linear(x, w, inf)", inputs, out, shape=(*x.shape[:-1], w.shape[0]), dtype=x.dtype)
    assert_close(
        "llm_int8_linear(x, w, inf) vs (per-token int8 x)(per-row int8 w)ᵀ",
        inputs,
        out,
        llm_int8_64(x, w, math.inf),
        dtype=dtype,
        scale=norm(x) * norm(w),
    )


@pytest.mark.needs("llm_int8_linear")
@given(data=st.data())
def test_llm_int8_zero_threshold_equals_dequantized_matmul(impl, data):
    dtype, x, w = _draw_friendly(data)
    x = data.draw(rs.tensors(tuple(x.shape), dtype), label="x (any)")
    inputs = {"x": x, "w": w, "threshold": 0.0}
    w_dq = int8_codes64(w) * int8_scale64(w).unsqueeze(1)
    assert_close(
        "llm_int8_linear(x, w, 0) vs x · dequantized(int8 w)ᵀ",
        inputs,
        impl.llm_int8_linear(x, w, threshold=0.0),
        as64(x) @ w_dq.T,
        dtype=dtype,
        scale=norm(x) * norm(w),
    )


@pytest.mark.needs("llm_int8_linear")
@given(data=st.data())
def test_llm_int8_outlier_decomposition_matches_simulation(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    case = data.draw(rs.llm_int8_inputs(dtype), label="inputs")
    inputs = {
        "x": case.x,
        "w": case.w,
        "threshold": case.threshold,
        "outlier features": case.outliers.tolist(),
    }
    assert_close(
        "llm_int8_linear(x, w, threshold) vs float64 outlier decomposition",
        inputs,
        impl.llm_int8_linear(case.x, case.w, threshold=case.threshold),
        llm_int8_64(case.x, case.w, case.threshold),
        dtype=dtype,
        scale=norm(case.x) * norm(case.w),
    )


@pytest.mark.needs("llm_int8_linear")
@given(data=st.data())
def test_llm_int8_threshold_is_inclusive(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    case = data.draw(rs.llm_int8_inputs(dtype, boundary=True), label="inputs (a feature at |x| = threshold)")
    inputs = {
        "x": case.x,
        "w": case.w,
        "threshold": case.threshold,
        "outlier features": case.outliers.tolist(),
    }
    assert_close(
        "llm_int8_linear(x, w, threshold) with a feature reaching |x| = threshold exactly (an outlier)",
        inputs,
        impl.llm_int8_linear(case.x, case.w, threshold=case.threshold),
        llm_int8_64(case.x, case.w, case.threshold),
        dtype=dtype,
        scale=norm(case.x) * norm(case.w),
    )
