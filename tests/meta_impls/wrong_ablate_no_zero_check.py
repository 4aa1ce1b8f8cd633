"""ablate divides by ‖r‖ without checking it, so a zero r gives NaN instead of an error.

Declares nothing: it is held to the lenient error rule, where returning is still a failure."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)


def ablate(x, r):
    r64, x64 = r.to(torch.float64), x.to(torch.float64)
    if r64.shape[0] != x64.shape[-1] or not bool(torch.isfinite(x64).all() and torch.isfinite(r64).all()):
        raise ValueError("bad x or r")
    u = r64 / r64.norm()
    return (x64 - (x64 @ u).unsqueeze(-1) * u).to(x.dtype)
