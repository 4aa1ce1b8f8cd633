"""ablate adds the projection instead of removing it: x + r̂ r̂ᵀ x."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor, unit_direction


def ablate(x, r):
    check_tensor(x, "x", min_ndim=1)
    u = unit_direction(r, x.shape[-1])
    x64 = x.to(torch.float64)
    return (x64 + (x64 @ u).unsqueeze(-1) * u).to(x.dtype)
