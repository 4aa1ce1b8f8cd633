"""GPU tier (marker ``gpu``): the study pipeline itself on Llama-2-7B-chat and Llama-3-8B-Instruct.

Each model's study runs from its committed config (``fixtures/gpu/llama2.toml``,
``llama3.toml``: the paper's settings, ``device = "cuda"``, float16 / bfloat16)
through :mod:`refusal_core.testing.gpu_tier`, the same code the CPU tier runs
on a tiny model (``tests/test_gpu_tier_cpu.py``), and its results are checked
against the bands of ``fixtures/gpu_expected.json``. ``test_gpu_tier.py``
checks the same bands from the building blocks, independently of the pipeline.

Environment: ``REFUSAL_CORE_LLAMA2_PATH`` / ``REFUSAL_CORE_LLAMA3_PATH`` (local
HF directories) and ``REFUSAL_CORE_ADVBENCH_PATH`` (``harmful_behaviors.csv``);
``REFUSAL_CORE_GPU_N_ADVBENCH`` caps the AdvBench prompts (n_test);
``REFUSAL_CORE_GPU_OUT`` keeps the run directories (results.json, report.md)
there instead of a temporary directory, so a rerun resumes. Skips, with the
reason, without CUDA or a path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from refusal_core.testing import gpu_tier

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", list(gpu_tier.TIERS))
def test_study_on_llama_within_the_regression_bands(name: str, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available (torch.cuda.is_available() is False)")
    tier = gpu_tier.tier(name)
    for key, env in gpu_tier.placeholders(tier.toml).items():
        value = os.environ.get(env)
        if not value:
            pytest.skip(f"{env} is not set ({key} of {tier.toml.name}; a local path, nothing is downloaded)")
        if not Path(value).exists():
            pytest.skip(f"{env}={value} does not exist")
    overrides: dict[str, Any] = {}
    if os.environ.get("REFUSAL_CORE_GPU_N_ADVBENCH"):
        overrides["n_test"] = int(os.environ["REFUSAL_CORE_GPU_N_ADVBENCH"])
    kept = os.environ.get("REFUSAL_CORE_GPU_OUT")
    out = Path(kept) / f"study-{name}" if kept else tmp_path / "run"
    run = gpu_tier.run_tier(tier.toml, out, overrides=overrides)
    values = gpu_tier.band_values(run.results)
    print(f"{name} study: {json.dumps(values, sort_keys=True)}")
    if kept:
        (Path(kept) / f"study-{name}-bands.json").write_text(
            json.dumps(values, indent=2, sort_keys=True) + "\n"
        )
    failures = gpu_tier.check_bands(values, tier.band_key)
    assert not failures, "\n".join(failures)
