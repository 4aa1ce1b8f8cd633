"""ablate projects with r as given: x − r rᵀ x."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor, unit_direction


def ablate(x, r):
    check_tensor(x, "x", min_ndim=1)
    unit_direction(r, x.shape[-1])
    r64, x64 = r.to(torch.float64), x.to(torch.float64)
    return (x64 - (x64 @ r64).unsqueeze(-1) * r64).to(x.dtype)
