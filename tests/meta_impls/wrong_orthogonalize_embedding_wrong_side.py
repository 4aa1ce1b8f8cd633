"""orthogonalize_embedding projects the vocabulary side: (I − r̂ r̂ᵀ) e."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor, unit_direction


def orthogonalize_embedding(e, r):
    check_tensor(e, "e", ndim=2)
    u = unit_direction(r, e.shape[0])
    e64 = e.to(torch.float64)
    return (e64 - torch.outer(u, u @ e64)).to(e.dtype)
