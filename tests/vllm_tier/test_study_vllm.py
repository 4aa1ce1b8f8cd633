"""A small study whose evaluation runs on vLLM (CPU build), against the same study on the torch engine.

The model is a tiny Llama with head size 32 (vLLM's CPU attention rejects 16) saved with
``save_pretrained``; the study runs in float32, where greedy decoding gives identical tokens on
both engines (tests/vllm_tier/test_parity.py). So every greedy-derived result must be equal between the
two runs, variant for variant: vanilla and system-prompt ASR per prompt, over-refusal per prompt,
degenerate counts of those. The decoding grid samples from vLLM's per-request seeded generator,
another random stream than the torch loop's, so there the check is structural (every prompt got
n_samples draws per configuration) and that vLLM's draws are reproducible (a second vLLM run gives
the same ones). Also: vLLM served every evaluated variant, and its per-variant checkpoints are
removed after each evaluation.

The multi-GPU tier config (fixtures/gpu/llama3-70b.toml) then runs on the same tiny model with
its own engine setting (vLLM), tensor parallelism reduced to the one CPU device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm.entrypoints.llm")

from refusal_core.evaluation import engines
from refusal_core.evaluation.results import AsrResult
from refusal_core.study import AttackSettings, RepairConfig, StudyConfig, run_study
from refusal_core.testing import gpu_tier
from refusal_core.testing.tiny import tiny_model, tiny_tokenizer

VLLM = engines.VllmSettings(enforce_eager=True, cpu_kv_cache_gib=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama-h32")
    tiny_model("llama", n_layers=4, d_model=64, n_heads=2, seed=5).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _config(model_dir: Path, engine: str) -> StudyConfig:
    return StudyConfig(
        model=str(model_dir),
        methods=("magnitude",),
        n_train=8,
        n_val=4,
        n_test=6,
        n_calibration=4,
        noise_splits=2,
        max_new_tokens=6,
        batch_size=8,
        zero_shot_tasks=(),
        attacks=AttackSettings(
            decoding_temperatures=(0.7, 1.3),
            decoding_top_ps=(0.9,),
            decoding_top_ks=(0, 40),
            decoding_samples=2,
            gcg_prompts=0,
        ),
        repair=RepairConfig(gains=(2.0,), include_paper_alpha=False),
        engine=engine,  # type: ignore[arg-type]
        vllm=VLLM,
    )


@pytest.fixture(scope="module")
def runs(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], dict[str, Any], Path, list[str]]:
    served: list[str] = []
    original = engines.VllmEngine.__init__

    def spy(self: Any, checkpoint_dir: Any, *args: Any, **kwargs: Any) -> None:
        served.append(Path(checkpoint_dir).name)
        original(self, checkpoint_dir, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(engines.VllmEngine, "__init__", spy)
    try:
        out = tmp_path_factory.mktemp("study")
        torch_res = run_study(_config(model_dir, "torch"), out / "torch", progress=False).to_dict()
        assert served == [], "the torch engine never opens vLLM"
        vllm_res = run_study(_config(model_dir, "vllm"), out / "vllm", progress=False).to_dict()
    finally:
        mp.undo()
    return torch_res, vllm_res, out, served


def _evaluations(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The variants that were evaluated (a repair that chose no edit IS its compressed model: skipped)."""
    return {
        v["name"]: v["evaluation"]
        for v in results["variants"]
        if v.get("evaluation") and not (v.get("repair") or {}).get("same_as")
    }


def test_vllm_served_every_evaluated_variant_and_left_no_checkpoint(runs: Any) -> None:
    torch_res, vllm_res, out, served = runs
    evaluated = sorted(_evaluations(vllm_res))
    assert evaluated == sorted(_evaluations(torch_res)), "the same variants were evaluated"
    assert sorted(served) == evaluated, f"vLLM served {served}, evaluated {evaluated}"
    assert vllm_res["settings"]["engine"] == "vllm"
    leftovers = (
        list((out / "vllm" / "checkpoints").glob("*/*")) if (out / "vllm" / "checkpoints").exists() else []
    )
    assert leftovers == [], f"per-variant checkpoints left behind: {leftovers}"


def test_greedy_results_are_equal_on_both_engines_in_float32(runs: Any) -> None:
    torch_res, vllm_res, out, _ = runs
    ev_torch, ev_vllm = _evaluations(torch_res), _evaluations(vllm_res)
    for name in ev_torch:
        for attack in ("vanilla", "vanilla_system"):
            a = AsrResult.load(out / "torch" / "stages" / "eval" / name / f"asr_{attack}.json")
            b = AsrResult.load(out / "vllm" / "stages" / "eval" / name / f"asr_{attack}.json")
            assert [r.completions for r in a.records] == [r.completions for r in b.records], (
                f"{name} {attack}: greedy completions differ between torch and vLLM (float32)"
            )
            assert ev_torch[name]["asr"][attack] == ev_vllm[name]["asr"][attack], f"{name} {attack} ASR"
        assert ev_torch[name]["over_refusal"] == ev_vllm[name]["over_refusal"], f"{name} over-refusal"


def test_decoding_grid_draws_are_complete_and_reproducible_on_vllm(
    runs: Any, model_dir: Path, tmp_path: Path
) -> None:
    _, vllm_res, out, _ = runs
    cfg = _config(model_dir, "vllm")
    n_configs = 2 * 1 * 2
    first = AsrResult.load(out / "vllm" / "stages" / "eval" / "base" / "asr_decoding.json")
    assert len(first.records) == cfg.n_test
    for r in first.records:
        assert len(r.completions) == n_configs * cfg.attacks.decoding_samples, r.completions
    # the two samples of one prompt and configuration are separate draws, not one draw copied
    pairs = [
        (r.completions[k], r.completions[k + 1]) for r in first.records for k in range(0, n_configs * 2, 2)
    ]
    assert sum(a != b for a, b in pairs) >= len(pairs) // 2, "n=2 samples are mostly distinct"
    again = run_study(cfg, tmp_path / "again", progress=False)
    assert again.to_dict()["variants"][0]["evaluation"]["asr"] == _evaluations(vllm_res)["base"]["asr"]
    second = AsrResult.load(tmp_path / "again" / "stages" / "eval" / "base" / "asr_decoding.json")
    assert [r.completions for r in second.records] == [r.completions for r in first.records], (
        "vLLM's seeded draws are reproducible run to run"
    )


def test_the_70b_tier_config_runs_with_the_vllm_engine_on_cpu(model_dir: Path, tmp_path: Path) -> None:
    config = gpu_tier.FIXTURE_DIR / "llama3-70b.toml"
    overrides: dict[str, Any] = {
        "model": str(model_dir),
        "device": "cpu",
        "harmful_test": "harmful_test",
        "n_train": 8,
        "n_val": 4,
        "n_test": 4,
        "n_calibration": 4,
        "noise_splits": 2,
        "max_new_tokens": 4,
        "batch_size": 8,
        "zero_shot_tasks": (),
        "methods": ("magnitude",),
        "attacks.decoding_temperatures": (1.0,),
        "attacks.decoding_top_ps": (1.0,),
        "attacks.decoding_top_ks": (0,),
        "repair.gains": (2.0,),
        # one CPU device: no tensor parallelism; eager to start quickly
        "vllm.tensor_parallel_size": 1,
        "vllm.enforce_eager": True,
    }
    run = gpu_tier.run_tier(config, tmp_path / "run", values={}, overrides=overrides)
    settings = run.results["settings"]
    assert settings["engine"] == "vllm", "the file's engine setting was kept"
    assert settings["vllm"]["gpu_memory_utilization"] == 0.45
    assert settings["dtype"] == "bfloat16", "vLLM served the bfloat16 variants"
    base = next(v for v in run.results["variants"] if v["name"] == "base")
    assert {"vanilla", "vanilla_system", "decoding"} <= set(base["evaluation"]["asr"])
