"""orthogonalize_weight projects the input side: w (I − r̂ r̂ᵀ)."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor, unit_direction


def orthogonalize_weight(w, r):
    check_tensor(w, "w", ndim=2)
    u = unit_direction(r, w.shape[1])
    w64 = w.to(torch.float64)
    return (w64 - torch.outer(w64 @ u, u)).to(w.dtype)
