"""symmetric pseudo_quantize uses max_int = 2^b − 1 (the unsigned range)."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor


def pseudo_quantize(w, w_bit, group_size, zero_point=True):
    check_tensor(w, "w", ndim=2)
    g = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32).reshape(-1, group_size)
    if zero_point:
        max_int = 2**w_bit - 1
        hi, lo = g.amax(dim=1, keepdim=True), g.amin(dim=1, keepdim=True)
        scale = (hi - lo).clamp(min=1e-5) / max_int
        zero = torch.round(-lo / scale).clamp(0, max_int)
        q = (torch.round(g / scale) + zero).clamp(0, max_int)
        out = (q - zero) * scale
    else:
        max_int = 2**w_bit - 1
        scale = g.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / max_int
        out = torch.round(g / scale).clamp(-(2 ** (w_bit - 1)), max_int) * scale
    return out.reshape(w.shape).to(w.dtype)
