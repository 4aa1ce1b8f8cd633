"""wanda_mask scores by |w| alone, ignoring the input norms."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import wanda_mask as _reference_wanda_mask


def wanda_mask(w, input_norms, sparsity, n_m=None):
    _reference_wanda_mask(w, input_norms, sparsity, n_m)
    return _reference_wanda_mask(w, torch.ones_like(input_norms), sparsity, n_m)
