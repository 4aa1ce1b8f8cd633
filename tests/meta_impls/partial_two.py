"""A minimal outside implementation providing only ``ablate`` and ``cosine_similarity``.

Written without this project's helpers: it raises plain ValueError on bad input (the
lenient error rule applies to it) and must pass every test of its two functions while all
other tests skip, naming the function they need.
"""

from __future__ import annotations

import math

import torch


def _finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} is not finite")


def ablate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    _finite(x, "x")
    _finite(r, "r")
    if r.ndim != 1 or x.shape[-1] != r.shape[0]:
        raise ValueError("r must be 1-D with the width of x")
    n = float(r.double().norm())
    if n <= 1e-8:
        raise ValueError("r has zero norm")
    u = r.double() / n
    x64 = x.double()
    return (x64 - (x64 @ u)[..., None] * u).to(x.dtype)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    _finite(a, "a")
    _finite(b, "b")
    if a.shape != b.shape:
        raise ValueError("a and b differ in shape")
    a64, b64 = a.double().flatten(), b.double().flatten()
    na, nb = float(a64.norm()), float(b64.norm())
    if na <= 1e-8 or nb <= 1e-8:
        raise ValueError("zero vector")
    c = float(a64 @ b64) / (na * nb)
    return max(-1.0, min(1.0, c)) if math.isfinite(c) else c
