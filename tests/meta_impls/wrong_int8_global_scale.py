"""int8_quantize uses one absmax scale for the whole matrix (no per-row scale)."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor


def int8_quantize(w):
    check_tensor(w, "w", ndim=2)
    wf = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    scale = (wf.abs().amax() / 127.0).expand(w.shape[0]).clone()
    q = torch.round(wf / scale.clamp(min=1e-30).unsqueeze(1)).clamp(-127, 127)
    return q.to(torch.int8), scale
