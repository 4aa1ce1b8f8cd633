"""``all_finite`` against ``torch.isfinite(t).all()``: NaN and infinities anywhere, every dtype, views.

The one-reduction check replaced ``torch.isfinite(...).all()`` in every whole-model guard, so it
must give the same answer on every input: tensors near the dtype's largest value (a sum-based check
overflows there), a lone -inf (a check of the maximum alone misses it), NaN at any position of a
vectorised reduction, non-contiguous views, empty, integer and complex tensors.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refusal_core._finite import all_finite

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SPECIALS = [float("nan"), float("inf"), float("-inf")]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(FLOATS))
    n = draw(st.one_of(st.integers(0, 70), st.integers(1000, 5000)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1.0, 1e3, float(torch.finfo(dtype).max) / 2]))
    t = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1).mul(scale).to(dtype)
    for _ in range(draw(st.integers(0, 3))):
        if n:
            t[draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIALS))
    shape = draw(st.sampled_from(["flat", "matrix_t", "strided"]))
    if shape == "matrix_t" and n and n % 2 == 0:
        t = t.reshape(2, n // 2).t()  # a non-contiguous view
    elif shape == "strided":
        t = t[::3]
    return t


@settings(max_examples=300)
@given(tensors())
def test_all_finite_equals_isfinite_all(t: torch.Tensor) -> None:
    assert all_finite(t) == bool(torch.isfinite(t).all())


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("where", [0, 1, 31, 32, 33, 65_535, 1_000_000 - 1])
def test_a_single_special_value_is_found_anywhere_in_a_large_tensor(
    dtype: torch.dtype, special: float, where: int
) -> None:
    t = torch.full((1_000_000,), 0.5, dtype=dtype)
    t[where] = special
    assert not all_finite(t)
    t[where] = float(torch.finfo(dtype).max)  # the largest finite value is finite
    t[where - 1] = -float(torch.finfo(dtype).max)
    assert all_finite(t)


def test_empty_integer_meta_and_complex() -> None:
    assert all_finite(torch.empty(0))
    assert all_finite(torch.tensor([1, 2, 3]))
    assert all_finite(torch.tensor([True, False]))
    assert all_finite(torch.empty(4, device="meta"))
    assert all_finite(torch.tensor([1 + 2j]))
    assert not all_finite(torch.tensor([complex(float("nan"), 0.0)]))
    assert not all_finite(torch.tensor([complex(0.0, float("inf"))]))
    assert all_finite(torch.tensor(3.0))
    assert not all_finite(torch.tensor(float("-inf")))
