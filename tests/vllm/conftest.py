"""The vLLM tier (``tox -e vllm``): skipped where vLLM is not installed (the default tier never has it).

vLLM's CPU build runs here with its engine core and worker in the test process (see
:mod:`refusal_core.evaluation.engines`), a small KV cache and eager execution, so a test opens an
engine in seconds after the first import.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
