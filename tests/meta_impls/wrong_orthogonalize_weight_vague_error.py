"""orthogonalize_weight raises the right type but its message names no argument.

The reference's strict rule applies (it declares RAISES_REFUSAL_CORE_ERRORS)."""

from __future__ import annotations

import torch

from refusal_core.errors import ZeroDirectionError
from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import orthogonalize_weight as _reference_orthogonalize_weight

RAISES_REFUSAL_CORE_ERRORS = True


def orthogonalize_weight(w, r):
    if isinstance(r, torch.Tensor) and float(r.to(torch.float64).norm()) <= 1e-8:
        raise ZeroDirectionError("degenerate direction")
    return _reference_orthogonalize_weight(w, r)
