"""The multi-GPU tier config (fixtures/gpu/llama3-70b.toml) on CPU with a tiny model.

Like tests/test_gpu_tier_cpu.py for the one-GPU files: the TOML is read by the study's own config
reader, its model path is swapped for a tiny Llama saved with ``save_pretrained``, the device for
the CPU and the sizes for small ones, and the study runs end to end. The engine is forced to torch
here (the default tier has no vLLM; tox -e vllm runs this file's config with the vLLM engine):
what this checks is that the file parses, that every setting it writes (tensor parallelism over 8
GPUs, vLLM's memory share, accelerate's device map, the paper's methods and α) reaches the study,
and that the pipeline runs with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from refusal_core import _cli_config as cc
from refusal_core.errors import InvalidArgumentError
from refusal_core.testing import gpu_tier
from refusal_core.testing.tiny import tiny_model, tiny_tokenizer

CONFIG = gpu_tier.FIXTURE_DIR / "llama3-70b.toml"
OVERRIDES: dict[str, Any] = {
    **gpu_tier.CPU_OVERRIDES,
    "methods": ("magnitude",),
    "engine": "torch",
}


def test_the_70b_file_asks_for_a_node() -> None:
    written = cc.parse_toml(CONFIG.read_text(encoding="utf-8"), str(CONFIG))
    assert written["engine"] == "vllm", "the multi-GPU tier evaluates with vLLM"
    assert written["vllm"]["tensor_parallel_size"] == 8, written["vllm"]
    assert 0 < written["vllm"]["gpu_memory_utilization"] < 0.6, "room is left for the torch model"
    assert written["device"] == "auto", "the torch stages use accelerate's device map over the GPUs"
    assert written["dtype"] == "bfloat16"
    assert gpu_tier.placeholders(CONFIG) == {
        "model": "REFUSAL_CORE_LLAMA3_70B_PATH",
        "harmful_test": gpu_tier.ADVBENCH_ENV,
    }
    # Llama-3-70B: 64 query heads and 8 KV heads, both split evenly over the tensor-parallel GPUs
    assert 64 % written["vllm"]["tensor_parallel_size"] == 0
    assert 8 % written["vllm"]["tensor_parallel_size"] == 0


def test_the_70b_file_runs_the_study_on_cpu_with_its_settings(tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"
    tiny_model("llama", n_layers=4, d_model=32).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    run = gpu_tier.run_tier(
        CONFIG, tmp_path / "run", values={}, overrides={**OVERRIDES, "model": str(model_dir)}
    )
    settings = run.results["settings"]
    assert settings["engine"] == "torch"
    assert settings["vllm"]["tensor_parallel_size"] == 8, "the file's tensor parallelism reached the study"
    assert settings["vllm"]["gpu_memory_utilization"] == 0.45
    assert settings["dtype"] == "bfloat16"
    assert run.results["model"]["dtype"] == "bfloat16"
    assert settings["aird"]["alpha_attn"] == 0.02
    assert settings["aird"]["alpha_mlp"] == 0.01
    names = [v["name"] for v in run.results["variants"]]
    assert {"base", "magnitude", "magnitude+aird"} <= set(names), names
    base = next(v for v in run.results["variants"] if v["name"] == "base")
    assert "vanilla" in base["evaluation"]["asr"], base["evaluation"]["asr"].keys()


def test_a_bad_vllm_setting_in_the_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(CONFIG.read_text().replace("tensor_parallel_size = 8", "tensor_parallel_size = 0"))
    values = {"REFUSAL_CORE_LLAMA3_70B_PATH": "/m", gpu_tier.ADVBENCH_ENV: "/a.csv"}
    with pytest.raises(InvalidArgumentError, match="tensor_parallel_size"):
        gpu_tier.load_tier_config(bad, values=values, overrides={"device": "cpu"})
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(CONFIG.read_text().replace('engine = "vllm"', 'engine = "tensorrt"'))
    with pytest.raises(InvalidArgumentError, match="engine"):
        gpu_tier.load_tier_config(wrong, values=values, overrides={"device": "cpu"})
