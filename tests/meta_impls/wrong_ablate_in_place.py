"""ablate edits x in place and returns it."""

from __future__ import annotations

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor, unit_direction


def ablate(x, r):
    check_tensor(x, "x", min_ndim=1)
    u = unit_direction(r, x.shape[-1]).to(x.dtype)
    return x.sub_((x @ u).unsqueeze(-1) * u)
