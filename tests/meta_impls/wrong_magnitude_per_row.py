"""magnitude_mask thresholds each row separately instead of the whole matrix."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor


def magnitude_mask(w, sparsity):
    check_tensor(w, "w", min_ndim=1)
    rows = w.reshape(-1, w.shape[-1])
    k = int(float(sparsity) * rows.shape[1])
    mask = torch.ones_like(rows, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.argsort(rows.abs(), dim=1, stable=True)[:, :k], False)
    return mask.reshape(w.shape)
