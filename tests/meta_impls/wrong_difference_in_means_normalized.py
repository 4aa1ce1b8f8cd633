"""difference_in_means returns the unit vector, not the raw difference."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)


def difference_in_means(harmful, harmless):
    diff = harmful.to(torch.float64).mean(0) - harmless.to(torch.float64).mean(0)
    return diff / diff.norm().clamp(min=1e-12)
