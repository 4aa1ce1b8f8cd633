"""refusal_score raises a plain ValueError on an empty id list.

It declares RAISES_REFUSAL_CORE_ERRORS, so the strict rule applies and ValueError is not enough."""

from __future__ import annotations

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import refusal_score as _reference_refusal_score

RAISES_REFUSAL_CORE_ERRORS = True


def refusal_score(logits, refusal_token_ids):
    if len(refusal_token_ids) == 0:
        raise ValueError("refusal_token_ids is empty")
    return _reference_refusal_score(logits, refusal_token_ids)
