"""refusal_score counts only the first refusal id."""

from __future__ import annotations

import torch

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import check_tensor


def refusal_score(logits, refusal_token_ids):
    check_tensor(logits, "logits", min_ndim=1)
    ids = torch.as_tensor(refusal_token_ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("no refusal ids")
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    p = probs[..., ids[0]]
    return torch.log(p + 1e-8) - torch.log(1 - p + 1e-8)
