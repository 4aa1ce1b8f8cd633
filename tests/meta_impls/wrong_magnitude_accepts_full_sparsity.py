"""magnitude_mask accepts sparsity 1.0 (checks s ≤ 1 instead of s < 1)."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor


def magnitude_mask(w, sparsity):
    check_tensor(w, "w", min_ndim=1)
    s = float(sparsity)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity!r}")
    k = int(s * w.numel())
    mask = torch.ones(w.numel(), dtype=torch.bool)
    mask[torch.argsort(w.abs().reshape(-1), stable=True)[:k]] = False
    return mask.reshape(w.shape)
