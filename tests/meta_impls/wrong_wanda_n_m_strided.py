"""wanda_mask forms N:M groups from strided inputs instead of m consecutive ones."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import wanda_mask as _reference_wanda_mask


def wanda_mask(w, input_norms, sparsity, n_m=None):
    if n_m is None:
        return _reference_wanda_mask(w, input_norms, sparsity)
    _reference_wanda_mask(w, input_norms, sparsity, n_m)
    m, in_f = n_m[1], w.shape[1]
    perm = torch.arange(in_f).reshape(m, in_f // m).T.reshape(-1)  # strided positions side by side
    mask_p = _reference_wanda_mask(w[:, perm], input_norms[perm], sparsity, n_m)
    mask = torch.empty_like(mask_p)
    mask[:, perm] = mask_p
    return mask
