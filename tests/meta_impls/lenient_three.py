"""An outside implementation of three functions that gets the math right and validates nothing.

It does not declare RAISES_REFUSAL_CORE_ERRORS, so the project's bad-input policy (the
``bad_input`` tests) does not apply to it: run plainly, the suite must report no failure for
it. Selected with ``-m bad_input`` it is held to the lenient rule, and its zero-direction
ablation (which returns NaN instead of raising) must then fail.
"""

from __future__ import annotations

import torch


def ablate(x, r):
    u = r.double() / r.double().norm()
    x64 = x.double()
    return (x64 - torch.einsum("...d,d->...", x64, u).unsqueeze(-1) * u).to(x.dtype)


def add_direction(x, r, coeff):
    return (x.double() + float(coeff) * r.double()).to(x.dtype)


def cosine_similarity(a, b):
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    c = float(a64 @ b64) / (float(a64.norm()) * float(b64.norm()))
    return max(-1.0, min(1.0, c))
