"""cosine_similarity does not clamp rounding excursions beyond ±1."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor


def cosine_similarity(a, b):
    check_tensor(a, "a", min_ndim=1)
    check_tensor(b, "b", min_ndim=1)
    a64, b64 = a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64)
    return float(torch.dot(a64 / a64.norm(), b64 / b64.norm()))
