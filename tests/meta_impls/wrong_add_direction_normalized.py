"""add_direction adds coeff·r̂ instead of coeff·r."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor, unit_direction


def add_direction(x, r, coeff):
    check_tensor(x, "x", min_ndim=1)
    u = unit_direction(r, x.shape[-1])
    return (x.to(torch.float64) + float(coeff) * u).to(x.dtype)
