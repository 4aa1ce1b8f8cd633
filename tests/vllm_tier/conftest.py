"""The vLLM tier (``tox -e vllm``): each module is skipped where vLLM is not installed (the default
tier never has it).

(The directory is not called ``tests/vllm``: pytest puts ``tests/`` on ``sys.path``, where such a
directory would be importable as a namespace package named ``vllm`` and the skip would not happen.)

vLLM's CPU build runs here with its engine core and worker in the test process (see
:mod:`refusal_core.evaluation.engines`), a small KV cache and eager execution, so a test opens an
engine in seconds after the first import.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
