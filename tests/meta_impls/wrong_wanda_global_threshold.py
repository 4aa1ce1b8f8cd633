"""wanda_mask compares scores across the whole matrix instead of per row."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import wanda_mask as _reference_wanda_mask


def wanda_mask(w, input_norms, sparsity, n_m=None):
    if n_m is not None:
        return _reference_wanda_mask(w, input_norms, sparsity, n_m)
    _reference_wanda_mask(w, input_norms, sparsity)
    score = (w.abs().to(torch.float64) * input_norms.to(torch.float64)).reshape(-1)
    mask = torch.ones_like(score, dtype=torch.bool)
    mask[torch.argsort(score, stable=True)[: int(float(sparsity) * score.numel())]] = False
    return mask.reshape(w.shape)
