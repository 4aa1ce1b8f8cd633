"""Properties of group-wise pseudo-quantization and AWQ scaling (DESIGN.md, "AWQ", "Quantization")."""

from __future__ import annotations

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
    awq_candidates64,
    check,
    first_bad,
    norm,
    pseudo_quantize64,
)


def _draw_groups(data: st.DataObject, *, contains_zero: bool | None):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    rows = data.draw(rs.widths(1, 4), label="rows (out)")
    group_size, n_groups = data.draw(rs.group_layouts(), label="(group_size, n_groups)")
    w_bit = data.draw(st.sampled_from([2, 3, 4, 8]), label="w_bit")
    if contains_zero is None:
        contains_zero = data.draw(st.booleans(), label="every group contains 0")
    w = data.draw(
        rs.grouped_weights(rows, group_size, n_groups, dtype, contains_zero=contains_zero), label="w"
    )
    return dtype, w, w_bit, group_size


def _group_stat(w: torch.Tensor, group_size: int, fn) -> torch.Tensor:
    """A per-group statistic of ``w`` broadcast back to every element."""
    g = as64(w).reshape(-1, group_size)
    return fn(g).expand_as(g).reshape(w.shape)


def _check_within_half_step(op, inputs, out, w, step, dtype, magnitude):
    err = (as64(out) - as64(w)).abs()
    bound = 0.5 * step + tolerance(dtype) * magnitude
    worst = int(torch.argmax(err - bound))
    i, j = divmod(worst, w.shape[1])
    check(
        bool((err <= bound).all()),
        op,
        inputs,
        f"error {float(err[i, j]):.6g} at ({i}, {j}) exceeds half a step ({float(step[i, j]) / 2:.6g})",
    )


@pytest.mark.needs("pseudo_quantize")
@given(data=st.data())
def test_pseudo_quantize_symmetric_round_trip_within_half_step(impl, data):
    dtype, w, w_bit, group_size = _draw_groups(data, contains_zero=None)
    inputs = {"w": w, "w_bit": w_bit, "group_size": group_size, "zero_point": False}
    out = impl.pseudo_quantize(w, w_bit, group_size, zero_point=False)
    assert_layout("pseudo_quantize(w, ..., zero_point=False)", inputs, out, shape=w.shape, dtype=w.dtype)
    absmax = _group_stat(w, group_size, lambda g: g.abs().amax(dim=1, keepdim=True))
    step = absmax.clamp(min=1e-5) / (2 ** (w_bit - 1) - 1)
    _check_within_half_step(
        "pseudo_quantize(w, w_bit, group_size, zero_point=False) vs w", inputs, out, w, step, dtype, absmax
    )


@pytest.mark.needs("pseudo_quantize")
@given(data=st.data())
def test_pseudo_quantize_asymmetric_round_trip_within_half_step_on_groups_with_zero(impl, data):
    dtype, w, w_bit, group_size = _draw_groups(data, contains_zero=True)
    inputs = {"w": w, "w_bit": w_bit, "group_size": group_size, "zero_point": True}
    out = impl.pseudo_quantize(w, w_bit, group_size, zero_point=True)
    assert_layout("pseudo_quantize(w, ..., zero_point=True)", inputs, out, shape=w.shape, dtype=w.dtype)
    spread = _group_stat(w, group_size, lambda g: g.amax(dim=1, keepdim=True) - g.amin(dim=1, keepdim=True))
    step = spread.clamp(min=1e-5) / (2**w_bit - 1)
    _check_within_half_step(
        "pseudo_quantize(w, w_bit, group_size, zero_point=True) vs w (every group contains 0)",
        inputs,
        out,
        w,
        step,
        dtype,
        spread,
    )


@pytest.mark.needs("pseudo_quantize")
@given(data=st.data())
def test_pseudo_quantize_symmetric_is_a_fixed_point(impl, data):
    dtype, w, w_bit, group_size = _draw_groups(data, contains_zero=None)
    inputs = {"w": w, "w_bit": w_bit, "group_size": group_size, "zero_point": False}
    once = impl.pseudo_quantize(w, w_bit, group_size, zero_point=False)
    twice = impl.pseudo_quantize(once, w_bit, group_size, zero_point=False)
    assert_close(
        "pseudo_quantize(pseudo_quantize(w)) vs pseudo_quantize(w), symmetric",
        inputs,
        twice,
        once,
        dtype=dtype,
        scale=norm(w),
    )


def _check_against_formula(op, inputs, out, w, w_bit, group_size, zero_point, dtype):
    """Elementwise agreement with the float64 formula; one step of slack only at a half step."""
    expected, step, ambiguous = pseudo_quantize64(w, w_bit, group_size, zero_point)
    magnitude = _group_stat(w, group_size, lambda g: g.abs().amax(dim=1, keepdim=True)) + step
    err = (as64(out) - expected).abs()
    bound = torch.where(ambiguous, step * (1 + 1e-6), 0.0) + tolerance(dtype) * magnitude
    bad = ~(err <= bound)
    check(
        not bool(bad.any()),
        op,
        inputs,
        "differs from the formula in " + first_bad(bad, got=as64(out), expected=expected, step=step),
    )


@pytest.mark.needs("pseudo_quantize")
@given(data=st.data())
def test_pseudo_quantize_matches_float64_formula(impl, data):
    dtype, w, w_bit, group_size = _draw_groups(data, contains_zero=None)
    zero_point = data.draw(st.booleans(), label="zero_point")
    inputs = {"w": w, "w_bit": w_bit, "group_size": group_size, "zero_point": zero_point}
    out = impl.pseudo_quantize(w, w_bit, group_size, zero_point=zero_point)
    assert_layout("pseudo_quantize", inputs, out, shape=w.shape, dtype=w.dtype)
    _check_against_formula(
        "pseudo_quantize(w, w_bit, group_size, zero_point) vs float64 formula",
        inputs,
        out,
        w,
        w_bit,
        group_size,
        zero_point,
        dtype,
    )


# ----------------------------------------------------------------------------
# AWQ
# ----------------------------------------------------------------------------


def _check_scales(op, inputs, s, cols):
    check(
        isinstance(s, torch.Tensor) and tuple(s.shape) == (cols,) and s.is_floating_point(),
        op,
        inputs,
        f"must return a floating tensor of shape [{cols}], got {s!r}",
    )
    check(bool(torch.isfinite(s).all() and (s > 0).all()), op, inputs, f"scales must be finite and > 0: {s}")


def _awq_inputs(case: rs.AwqInputs) -> dict:
    return {"w": case.w, "x": case.x, "w_bit": case.w_bit, "group_size": case.group_size, "grid": case.grid}


@pytest.mark.needs("awq_scales", "pseudo_quantize")
@given(data=st.data())
def test_awq_with_grid_one_equals_round_to_nearest(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    case = data.draw(rs.awq_inputs(dtype), label="inputs")
    inputs = {**_awq_inputs(case), "grid": 1}
    s = impl.awq_scales(case.w, case.x, case.w_bit, case.group_size, grid=1)
    _check_scales("awq_scales(..., grid=1)", inputs, s, case.w.shape[1])
    assert_close(
        "awq_scales(..., grid=1) (a = 0) vs all ones",
        inputs,
        s,
        torch.ones(case.w.shape[1]),
        dtype=dtype,
        scale=case.w.shape[1] ** 0.5,
    )
    s64 = as64(s)
    effective = as64(impl.pseudo_quantize((as64(case.w) * s64).to(dtype), case.w_bit, case.group_size)) / s64
    _check_against_formula(
        "Q(w·s)/s with s = awq_scales(..., grid=1) vs round-to-nearest pseudo_quantize(w)",
        inputs,
        effective,
        case.w,
        case.w_bit,
        case.group_size,
        True,
        dtype,
    )


@pytest.mark.needs("awq_scales")
@given(data=st.data())
def test_awq_scaling_is_function_preserving_before_rounding(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    case = data.draw(rs.awq_inputs(dtype), label="inputs")
    inputs = _awq_inputs(case)
    s = impl.awq_scales(case.w, case.x, case.w_bit, case.group_size, grid=case.grid)
    _check_scales("awq_scales", inputs, s, case.w.shape[1])
    s64 = as64(s)
    x_scaled = (as64(case.x) / s64).to(dtype)
    w_scaled = (as64(case.w) * s64).to(dtype)
    assert_close(
        "(x/s)(w·s)ᵀ vs x wᵀ with s = awq_scales(...), both scaled operands in the input dtype",
        inputs,
        as64(x_scaled) @ as64(w_scaled).T,
        as64(case.x) @ as64(case.w).T,
        dtype=dtype,
        scale=norm(case.x) * norm(case.w),
    )


def _matching_candidate(s: torch.Tensor, candidates, dtype) -> int | None:
    """Index of the first candidate within the dtype's tolerance of ``s`` (relative, max over channels)."""
    s64 = as64(s)
    for k, (_, cand, _) in enumerate(candidates):
        if float(((s64 - cand).abs() / cand).max()) <= tolerance(dtype):
            return k
    return None


@pytest.mark.needs("awq_scales")
@given(data=st.data())
def test_awq_scales_picks_the_loss_minimizing_exponent(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    case = data.draw(rs.awq_inputs(dtype, zero_weight=False), label="inputs")
    inputs = _awq_inputs(case)
    s = impl.awq_scales(case.w, case.x, case.w_bit, case.group_size, grid=case.grid)
    _check_scales("awq_scales", inputs, s, case.w.shape[1])
    candidates = awq_candidates64(case.w, case.x, case.w_bit, case.group_size, case.grid)
    k = _matching_candidate(s, candidates, dtype)
    check(
        k is not None,
        "awq_scales",
        inputs,
        f"s = {as64(s).tolist()} is none of the grid's candidates t/√(max t·min t), t = max(mean|x|^a, 1e-4)",
    )
    losses = [loss for _, _, loss in candidates]
    best = min(losses)
    ref_energy = float(((as64(case.x) @ as64(case.w).T) ** 2).sum())
    check(
        losses[k] <= best * (1 + 1e-6) + 1e-12 * ref_energy,
        "awq_scales",
        inputs,
        f"picked a = {candidates[k][0]:g} with loss {losses[k]:.6g}, but a = "
        f"{candidates[losses.index(best)][0]:g} has loss {best:.6g}",
    )


@pytest.mark.needs("awq_scales")
@given(data=st.data())
def test_awq_scales_first_exponent_wins_ties(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    case = data.draw(
        rs.awq_inputs(dtype, zero_weight=True), label="inputs (w = 0: every exponent has loss 0)"
    )
    inputs = _awq_inputs(case)
    s = impl.awq_scales(case.w, case.x, case.w_bit, case.group_size, grid=case.grid)
    _check_scales("awq_scales", inputs, s, case.w.shape[1])
    assert_close(
        "awq_scales with all losses tied vs the first candidate (a = 0: all ones)",
        inputs,
        s,
        torch.ones(case.w.shape[1]),
        dtype=dtype,
        scale=case.w.shape[1] ** 0.5,
    )
