"""wanda_mask does not check that m divides the width; torch's reshape error leaks.

It declares RAISES_REFUSAL_CORE_ERRORS, so the leaked RuntimeError breaks the strict rule."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import wanda_mask as _reference_wanda_mask

RAISES_REFUSAL_CORE_ERRORS = True


def wanda_mask(w, input_norms, sparsity, n_m=None):
    if n_m is None:
        return _reference_wanda_mask(w, input_norms, sparsity)
    n, m = n_m
    score = w.abs().to(torch.float64) * input_norms.to(torch.float64)
    groups = score.reshape(w.shape[0], -1, m)
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(-1, torch.argsort(groups, dim=-1, stable=True)[..., :n], False)
    return mask.reshape(w.shape)
