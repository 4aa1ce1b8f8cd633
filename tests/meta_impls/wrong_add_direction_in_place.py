"""add_direction adds into x in place."""

from __future__ import annotations

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor


def add_direction(x, r, coeff):
    check_tensor(x, "x", min_ndim=1)
    check_tensor(r, "r", ndim=1)
    return x.add_(float(coeff) * r.to(x.dtype))
