"""difference_in_means forgets the empty-set check (returns NaN)."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor


def difference_in_means(harmful, harmless):
    check_tensor(harmful, "harmful", min_ndim=2)
    check_tensor(harmless, "harmless", min_ndim=2)
    return harmful.to(torch.float64).mean(0) - harmless.to(torch.float64).mean(0)
