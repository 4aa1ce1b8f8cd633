"""magnitude_mask prunes one entry too many."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor, pruned_count


def magnitude_mask(w, sparsity):
    check_tensor(w, "w", min_ndim=1)
    k = min(w.numel(), pruned_count(sparsity, w.numel()) + 1)
    mask = torch.ones(w.numel(), dtype=torch.bool)
    mask[torch.argsort(w.abs().reshape(-1), stable=True)[:k]] = False
    return mask.reshape(w.shape)
