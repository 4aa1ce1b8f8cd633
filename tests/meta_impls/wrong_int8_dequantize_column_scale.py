"""int8_dequantize broadcasts the scale along columns instead of rows."""

from __future__ import annotations

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor


def int8_dequantize(q, scale):
    check_tensor(q, "q", ndim=2)
    check_tensor(scale, "scale", ndim=1)
    return q.to(scale.dtype) * scale.unsqueeze(0)
