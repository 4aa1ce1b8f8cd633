"""The MoE GPU tier config (fixtures/gpu/qwen3_moe.toml) run end to end on CPU with a tiny Qwen3-MoE.

The same functions as the dense tiers (refusal_core.testing.gpu_tier) read the TOML through the
study's config reader; the model path is swapped for a tiny Qwen3-MoE saved with ``save_pretrained``,
the device for ``cpu`` and the counts for small ones. Every setting the file makes that the CPU run
does not override must reach the study, and every method must run with its AIRD variant at the base
source layer: a key the study no longer knows, or an MoE path that breaks, fails here without a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from refusal_core.errors import InvalidArgumentError
from refusal_core.testing import gpu_tier
from refusal_core.testing.tiny import MOE_SIZES, tiny_model, tiny_tokenizer

TOML = gpu_tier.FIXTURE_DIR / "qwen3_moe.toml"
ENV = "REFUSAL_CORE_QWEN3_MOE_PATH"
#: What the CPU run changes (as for the dense tiers): device, AdvBench file and sizes.
CPU_OVERRIDES = gpu_tier.CPU_OVERRIDES


_file_values = gpu_tier.tier_file_values
_setting = gpu_tier.setting_of


def test_moe_tier_config_runs_the_study_on_a_tiny_moe(tmp_path: Path) -> None:
    assert gpu_tier.placeholders(TOML) == {"model": ENV, "harmful_test": gpu_tier.ADVBENCH_ENV}, (
        f"{TOML}: the model and AdvBench paths must be placeholders"
    )
    written = _file_values(TOML)
    assert written["device"] == "auto", f"{TOML}: a 61 GB model needs accelerate's device map, got {written}"
    assert written["dtype"] == "bfloat16", written
    model_dir = tmp_path / "tiny-qwen3-moe"
    tiny_model("qwen3_moe", n_layers=4, **MOE_SIZES).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    overrides = {**CPU_OVERRIDES, "model": str(model_dir)}
    run = gpu_tier.run_tier(TOML, tmp_path / "run", values={}, overrides=overrides)
    settings = run.results["settings"]
    kept = {k: v for k, v in written.items() if k not in overrides}
    assert {"methods", "dtype", "aird.alpha_attn", "aird.alpha_mlp", "selection.rows_per_forward"} <= set(
        kept
    )
    for key, value in kept.items():
        assert _setting(settings, key) == value, (
            f"{TOML}: {key} = {value!r}, the study ran with {_setting(settings, key)!r}"
        )
    assert run.results["model"]["model_type"] == "qwen3_moe", run.results["model"]
    assert run.results["model"]["dtype"] == "bfloat16", "the model ran in the file's dtype"
    layer = run.results["base"]["source"][0]
    variants = {v["name"]: v for v in run.results["variants"]}
    for method in written["methods"]:
        assert method in variants, f"{method} ran: {sorted(variants)}"
        rep = variants.get(f"{method}+aird")
        assert rep is not None, f"{method}+aird ran: {sorted(variants)}"
        if method.startswith("awq"):
            # AWQ keeps each expert's scales inside its weights: no edit can be put back on its grid,
            # so the study refuses that repair in one line and edits nothing (repair.plan_repair).
            assert rep["repair"]["how"].startswith("repair refused"), rep["repair"]
            assert "Mixture-of-Experts" in rep["repair"]["how"], rep["repair"]
            assert rep["repair"]["same_as"] == method, rep["repair"]
            continue
        assert rep["repair"]["alphas"] == [written["aird.alpha_attn"], written["aird.alpha_mlp"]], rep[
            "repair"
        ]
        assert rep["repair"]["layers"] == [layer], rep["repair"]


def test_moe_tier_needs_its_model_variable() -> None:
    with pytest.raises(InvalidArgumentError, match=ENV):
        gpu_tier.load_tier_config(TOML, values={gpu_tier.ADVBENCH_ENV: "a.csv"}, overrides={"device": "cpu"})
    cfg = gpu_tier.load_tier_config(
        TOML, values={ENV: "/m", gpu_tier.ADVBENCH_ENV: "/a.csv"}, overrides={"device": "cpu"}
    )
    assert (cfg.model, cfg.methods, cfg.n_calibration) == ("/m", ("wanda", "magnitude", "awq-w4"), 64)
