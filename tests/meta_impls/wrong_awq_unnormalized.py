"""awq_scales returns t = mean|x|^a without dividing by √(max t·min t)."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import awq_apply_scales, check_tensor


def awq_scales(w, x, w_bit, group_size, grid=20):
    check_tensor(w, "w", ndim=2)
    check_tensor(x, "x", ndim=2)
    w64, x64 = w.to(torch.float64), x.to(torch.float64)
    stat = x64.abs().mean(dim=0)
    ref = x64 @ w64.T
    best_loss, best = float("inf"), torch.ones_like(stat)
    for i in range(grid):
        t = stat.pow(i / grid).clamp(min=1e-4)
        s = t
        loss = float(((ref - x64 @ awq_apply_scales(w64, s, w_bit, group_size).T) ** 2).sum())
        if loss < best_loss:
            best_loss, best = loss, s
    return best.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
