"""Properties of directional ablation and activation addition (DESIGN.md, "Ablation")."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from refusal_core.testing import strategies as rs

from ._checks import ablate64, as64, assert_close, assert_layout, check, norm, unit64


def _draw_x_r(data: st.DataObject) -> tuple[torch.dtype, torch.Tensor, torch.Tensor]:
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    d = data.draw(rs.widths(), label="d")
    lead = data.draw(rs.leading_shapes(), label="leading shape of x")
    x = data.draw(rs.tensors((*lead, d), dtype), label="x")
    r = data.draw(rs.directions(d, dtype), label="r")
    return dtype, x, r


def _rows(x: torch.Tensor) -> int:
    return max(1, x.numel() // x.shape[-1])


@pytest.mark.needs("ablate")
@given(data=st.data())
def test_ablate_is_idempotent(impl, data):
    dtype, x, r = _draw_x_r(data)
    once = impl.ablate(x, r)
    twice = impl.ablate(once, r)
    assert_close(
        "ablate(ablate(x, r), r) vs ablate(x, r)", {"x": x, "r": r}, twice, once, dtype=dtype, scale=norm(x)
    )


@pytest.mark.needs("ablate")
@given(data=st.data())
def test_ablate_leaves_no_component_along_r(impl, data):
    dtype, x, r = _draw_x_r(data)
    out = impl.ablate(x, r)
    along = as64(out) @ unit64(r)
    assert_close(
        "r̂ᵀ ablate(x, r)", {"x": x, "r": r}, along, torch.zeros_like(along), dtype=dtype, scale=norm(x)
    )


@pytest.mark.needs("ablate")
@given(data=st.data())
def test_ablate_commutes_with_positive_rescaling_of_r(impl, data):
    dtype, x, r = _draw_x_r(data)
    c = data.draw(rs.positive_scalars(), label="c")
    scaled = (as64(r) * c).to(dtype)
    assert_close(
        "ablate(x, c·r) vs ablate(x, r)",
        {"x": x, "r": r, "c": c},
        impl.ablate(x, scaled),
        impl.ablate(x, r),
        dtype=dtype,
        scale=norm(x),
    )


@pytest.mark.needs("ablate")
@given(data=st.data())
def test_ablate_ignores_added_multiples_of_r(impl, data):
    dtype, x, r = _draw_x_r(data)
    c = data.draw(rs.signed_scalars(1e-3, 100.0), label="c")
    shifted = (as64(x) + c * as64(r)).to(dtype)
    assert_close(
        "ablate(x + c·r, r) vs ablate(x, r)",
        {"x": x, "r": r, "c": c},
        impl.ablate(shifted, r),
        impl.ablate(x, r),
        dtype=dtype,
        scale=norm(x) + abs(c) * norm(r) * _rows(x) ** 0.5,
    )


@pytest.mark.needs("ablate")
@given(data=st.data())
def test_ablate_matches_float64_formula(impl, data):
    dtype, x, r = _draw_x_r(data)
    inputs = {"x": x, "r": r}
    out = impl.ablate(x, r)
    assert_layout("ablate(x, r)", inputs, out, shape=x.shape, dtype=x.dtype)
    assert_close("ablate(x, r) vs x − r̂ r̂ᵀ x", inputs, out, ablate64(x, r), dtype=dtype, scale=norm(x))


def _draw_add(data: st.DataObject) -> tuple[torch.dtype, torch.Tensor, torch.Tensor, float]:
    dtype, x, r = _draw_x_r(data)
    c = data.draw(rs.signed_scalars(1e-3, 10.0), label="coeff")
    return dtype, x, r, c


@pytest.mark.needs("add_direction")
@given(data=st.data())
def test_add_direction_matches_float64_formula(impl, data):
    dtype, x, r, c = _draw_add(data)
    inputs = {"x": x, "r": r, "coeff": c}
    out = impl.add_direction(x, r, c)
    assert_layout("add_direction(x, r, coeff)", inputs, out, shape=x.shape, dtype=x.dtype)
    assert_close(
        "add_direction(x, r, coeff) vs x + coeff·r",
        inputs,
        out,
        as64(x) + c * as64(r),
        dtype=dtype,
        scale=norm(x) + abs(c) * norm(r) * _rows(x) ** 0.5,
    )


@pytest.mark.needs("add_direction")
@given(data=st.data())
def test_add_direction_is_additive_in_coeff(impl, data):
    dtype, x, r, c1 = _draw_add(data)
    c2 = data.draw(rs.signed_scalars(1e-3, 10.0), label="coeff2")
    inputs = {"x": x, "r": r, "coeff": c1, "coeff2": c2}
    two_steps = impl.add_direction(impl.add_direction(x, r, c1), r, c2)
    one_step = impl.add_direction(x, r, c1 + c2)
    scale = norm(x) + (abs(c1) + abs(c2)) * norm(r) * _rows(x) ** 0.5
    assert_close(
        "add_direction(add_direction(x, r, c1), r, c2) vs add_direction(x, r, c1 + c2)",
        inputs,
        two_steps,
        one_step,
        dtype=dtype,
        scale=scale,
    )
    check(
        torch.equal(impl.add_direction(x, r, 0.0), x),
        "add_direction(x, r, 0)",
        inputs,
        "coeff 0 must return x unchanged (bit for bit)",
    )
