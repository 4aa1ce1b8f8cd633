"""int8_quantize truncates toward zero instead of rounding."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor


def int8_quantize(w):
    check_tensor(w, "w", ndim=2)
    wf = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    scale = wf.abs().amax(dim=1) / 127.0
    q = torch.trunc(wf / torch.where(scale > 0, scale, 1.0).unsqueeze(1)).clamp(-127, 127)
    return q.to(torch.int8), scale
