"""cosine_similarity returns |cos|."""

from __future__ import annotations

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import cosine_similarity as _reference_cosine_similarity


def cosine_similarity(a, b):
    return abs(_reference_cosine_similarity(a, b))
