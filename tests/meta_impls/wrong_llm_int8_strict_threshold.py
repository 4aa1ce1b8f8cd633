"""llm_int8_linear treats a feature as an outlier only when |x| > threshold (not ≥)."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor


def _int8_rows(t, dtype):
    scale = t.abs().amax(dim=1) / 127.0
    q = torch.round(t / torch.where(scale > 0, scale, 1.0).unsqueeze(1)).clamp(-127, 127)
    return q, scale


def llm_int8_linear(x, w, threshold=6.0):
    check_tensor(x, "x", min_ndim=1)
    check_tensor(w, "w", ndim=2)
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float64)
    qw, sw = _int8_rows(w.to(torch.float64), torch.float64)
    w_dq = qw * sw.unsqueeze(1)
    outlier = (x2.abs() > threshold).any(dim=0)
    regular = torch.where(outlier, 0.0, x2)
    qx, sx = _int8_rows(regular, torch.float64)
    out = (qx @ qw.T) * sx.unsqueeze(1) * sw.unsqueeze(0)
    out = out + x2[:, outlier] @ w_dq[:, outlier].T
    return out.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])
