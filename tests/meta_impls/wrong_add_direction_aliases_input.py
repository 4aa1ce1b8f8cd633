"""add_direction returns x itself when coeff is 0 (aliasing its input)."""

from __future__ import annotations

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import add_direction as _reference_add_direction


def add_direction(x, r, coeff):
    if float(coeff) == 0.0:
        return x
    return _reference_add_direction(x, r, coeff)
