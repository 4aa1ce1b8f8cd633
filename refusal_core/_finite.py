"""``all_finite``: whether a tensor holds no NaN or infinity, at the cost of one reduction.

``torch.isfinite(t).all()`` builds a boolean tensor as large as ``t`` and, for half-precision
inputs on the CPU, converts every element first: on a 1.5 B-parameter bfloat16 model one whole-model
check took about 30 s on a 2-core EPYC, longer than the edit it guarded. ``torch.aminmax`` reduces
in one pass without an intermediate: NaN propagates into both results, +inf into the maximum and
-inf into the minimum, so the two scalars are finite exactly when every element is (measured: the
same answer 100x faster on bfloat16, 70x on float32, one 250 M-element tensor). tests/test_finite.py
pins it against ``torch.isfinite`` on every floating dtype, with NaN and infinities at random places.
"""

from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN, +inf or -inf (integer and bool tensors always; empty ones too).

    Tensors on the meta device have no values and count as finite. Complex tensors use
    ``torch.isfinite`` (no ordering to reduce over).
    """
    if t.device.type == "meta" or t.numel() == 0:
        return True
    if t.is_complex():
        return bool(torch.isfinite(t).all())
    if not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
