"""Properties of the magnitude and Wanda pruning masks (DESIGN.md, "Magnitude pruning", "Wanda")."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from refusal_core.testing import strategies as rs
from refusal_core.testing.oracle import tolerance

from ._checks import as64, assert_layout, check


def _worst_order_violation(score: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(largest pruned score, smallest kept score) of one comparison group (−inf/inf when empty)."""
    pruned = score[~mask]
    kept = score[mask]
    hi = float(pruned.max()) if pruned.numel() else float("-inf")
    lo = float(kept.min()) if kept.numel() else float("inf")
    return hi, lo


def _draw_weight(data: st.DataObject):
    """A 1-D or 2-D weight; 2-D rows get their own magnitude scale, as real weight rows do."""
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    shape = data.draw(
        st.one_of(st.tuples(rs.widths(1, 24)), st.tuples(rs.widths(2, 6), rs.widths(1, 10))), label="shape"
    )
    w = data.draw(
        rs.weight_matrices(*shape, dtype) if len(shape) == 2 else rs.tensors(shape, dtype), label="w"
    )
    s = data.draw(rs.sparsities(), label="sparsity")
    return dtype, w, s


# ----------------------------------------------------------------------------
# magnitude
# ----------------------------------------------------------------------------


@pytest.mark.needs("magnitude_mask")
@given(data=st.data())
def test_magnitude_mask_prunes_exact_count_per_matrix(impl, data):
    _, w, s = _draw_weight(data)
    inputs = {"w": w, "sparsity": s}
    mask = impl.magnitude_mask(w, s)
    assert_layout("magnitude_mask(w, sparsity)", inputs, mask, shape=w.shape, dtype=torch.bool)
    expected = int(s * w.numel())
    pruned = int((~mask).sum())
    check(
        pruned == expected,
        "magnitude_mask(w, sparsity)",
        inputs,
        f"pruned {pruned} entries, expected ⌊s·numel⌋ = {expected}",
    )


@pytest.mark.needs("magnitude_mask")
@given(data=st.data())
def test_magnitude_mask_prunes_only_the_smallest(impl, data):
    _, w, s = _draw_weight(data)
    mask = impl.magnitude_mask(w, s)
    hi, lo = _worst_order_violation(as64(w).abs(), mask)
    check(
        hi <= lo,
        "magnitude_mask(w, sparsity)",
        {"w": w, "sparsity": s},
        f"a pruned |w| = {hi:.6g} exceeds a kept |w| = {lo:.6g}",
    )


@pytest.mark.needs("magnitude_mask")
@given(data=st.data())
def test_magnitude_mask_is_idempotent(impl, data):
    _, w, s = _draw_weight(data)
    pruned_once = w * impl.magnitude_mask(w, s)
    pruned_twice = pruned_once * impl.magnitude_mask(pruned_once, s)
    changed = int((pruned_twice != pruned_once).sum())
    check(
        changed == 0,
        "magnitude_mask applied to w·magnitude_mask(w, s) with the same s",
        {"w": w, "sparsity": s},
        f"pruning again changed {changed} entries; it must only re-select zeros",
    )


# ----------------------------------------------------------------------------
# Wanda
# ----------------------------------------------------------------------------


def _draw_wanda(data: st.DataObject, *, tie_free: bool = False, n_m: bool | None = False):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    rows = data.draw(rs.widths(1, 6), label="rows (out)")
    pattern = None
    if n_m is None:
        n_m = data.draw(st.booleans(), label="use n_m")
    if n_m:
        pattern = data.draw(rs.n_m_patterns(), label="n_m")
        cols = pattern[1] * data.draw(st.integers(1, 3), label="groups per row")
    else:
        cols = data.draw(rs.widths(1, 16), label="cols (in)")
    if tie_free:
        w, norms = data.draw(rs.tie_free_wanda_inputs(rows, cols, dtype), label="(w, input_norms)")
    else:
        w = data.draw(rs.weight_matrices(rows, cols, dtype), label="w")
        norms = data.draw(rs.tensors((cols,), dtype, bound=10.0).map(torch.abs), label="input_norms")
    s = data.draw(rs.sparsities(), label="sparsity")
    return dtype, w, norms, s, pattern


def _score(w: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    return as64(w).abs() * as64(norms)


@pytest.mark.needs("wanda_mask")
@given(data=st.data())
def test_wanda_mask_prunes_exact_count_per_row(impl, data):
    _, w, norms, s, _ = _draw_wanda(data)
    inputs = {"w": w, "input_norms": norms, "sparsity": s}
    mask = impl.wanda_mask(w, norms, s)
    assert_layout("wanda_mask(w, input_norms, sparsity)", inputs, mask, shape=w.shape, dtype=torch.bool)
    expected = int(s * w.shape[1])
    per_row = (~mask).sum(dim=1).tolist()
    check(
        all(p == expected for p in per_row),
        "wanda_mask(w, input_norms, sparsity)",
        inputs,
        f"pruned per row {per_row}, expected ⌊s·in⌋ = {expected} in every row",
    )


@pytest.mark.needs("wanda_mask")
@given(data=st.data())
def test_wanda_mask_prunes_only_the_smallest_scores_per_row(impl, data):
    dtype, w, norms, s, pattern = _draw_wanda(data, n_m=None)
    inputs = {"w": w, "input_norms": norms, "sparsity": s, "n_m": pattern}
    mask = impl.wanda_mask(w, norms, s, n_m=pattern)
    score = _score(w, norms)
    m = pattern[1] if pattern else w.shape[1]
    groups = score.reshape(w.shape[0], -1, m)
    kept = mask.reshape(groups.shape)
    for i in range(groups.shape[0]):
        for g in range(groups.shape[1]):
            hi, lo = _worst_order_violation(groups[i, g], kept[i, g])
            # an implementation may form the products in the input precision: allow its rounding
            check(
                hi <= lo * (1 + tolerance(dtype)),
                "wanda_mask(w, input_norms, sparsity, n_m)",
                inputs,
                f"row {i}, group {g}: a pruned score |w|·norm = {hi:.6g} exceeds a kept one = {lo:.6g}",
            )


@pytest.mark.needs("wanda_mask")
@given(data=st.data())
def test_wanda_mask_is_idempotent(impl, data):
    _, w, norms, s, pattern = _draw_wanda(data, n_m=None)
    norms = norms + 0.1  # a zero norm would tie nonzero weights with the pruned zeros
    once = w * impl.wanda_mask(w, norms, s, n_m=pattern)
    twice = once * impl.wanda_mask(once, norms, s, n_m=pattern)
    changed = int((twice != once).sum())
    check(
        changed == 0,
        "wanda_mask applied to w·wanda_mask(w, ...) with the same arguments",
        {"w": w, "input_norms": norms, "sparsity": s, "n_m": pattern},
        f"pruning again changed {changed} entries; it must only re-select zeros",
    )


@pytest.mark.needs("wanda_mask")
@given(data=st.data())
def test_wanda_mask_n_m_structure(impl, data):
    _, w, norms, s, pattern = _draw_wanda(data, n_m=True)
    inputs = {"w": w, "input_norms": norms, "sparsity": s, "n_m": pattern}
    mask = impl.wanda_mask(w, norms, s, n_m=pattern)
    assert_layout("wanda_mask(..., n_m)", inputs, mask, shape=w.shape, dtype=torch.bool)
    n, m = pattern
    per_group = (~mask).reshape(w.shape[0], -1, m).sum(dim=-1)
    check(
        bool((per_group == n).all()),
        "wanda_mask(w, input_norms, sparsity, n_m)",
        inputs,
        f"pruned per group of {m} consecutive inputs: {per_group.tolist()}, expected exactly {n} in each",
    )


@pytest.mark.needs("wanda_mask", "magnitude_mask")
@given(data=st.data())
def test_wanda_mask_with_equal_input_norms_equals_row_magnitude(impl, data):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    rows = data.draw(rs.widths(1, 6), label="rows (out)")
    cols = data.draw(rs.widths(1, 16), label="cols (in)")
    w = data.draw(rs.distinct_magnitude_weights((rows, cols), dtype), label="w (distinct |w|)")
    c = data.draw(rs.positive_scalars(1e-2, 1e2), label="common input norm c")
    s = data.draw(rs.sparsities(), label="sparsity")
    wanda = impl.wanda_mask(w, torch.full((cols,), c, dtype=dtype), s)
    per_row = torch.stack([impl.magnitude_mask(w[i : i + 1], s)[0] for i in range(rows)])
    differ = int((wanda != per_row).sum())
    check(
        differ == 0,
        "wanda_mask(w, c·1, s) vs magnitude_mask on each row of w",
        {"w": w, "c": c, "sparsity": s},
        f"the masks differ in {differ} entries",
    )


@pytest.mark.needs("wanda_mask")
@given(data=st.data())
def test_wanda_mask_invariant_to_scaling_activations(impl, data):
    dtype, w, norms, s, pattern = _draw_wanda(data, tie_free=True, n_m=None)
    c = data.draw(rs.positive_scalars(1e-2, 1e2), label="activation scale c")
    scaled = (as64(norms) * c).to(dtype)
    differ = int(
        (impl.wanda_mask(w, scaled, s, n_m=pattern) != impl.wanda_mask(w, norms, s, n_m=pattern)).sum()
    )
    check(
        differ == 0,
        "wanda_mask(w, c·input_norms, ...) vs wanda_mask(w, input_norms, ...)",
        {"w": w, "input_norms": norms, "sparsity": s, "n_m": pattern, "c": c},
        f"the masks differ in {differ} entries",
    )
