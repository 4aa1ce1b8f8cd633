"""aird_update ignores preserve_sparsity (always the dense update)."""

from __future__ import annotations

from refusal_core.functional import *  # noqa: F403  (the reference, with one function replaced below)
from refusal_core.functional import aird_update as _reference_aird_update


def aird_update(w, r, alpha, *, normalize=False, preserve_sparsity=False):
    return _reference_aird_update(w, r, alpha, normalize=normalize)
