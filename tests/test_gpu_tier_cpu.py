"""The GPU tier's own code on CPU: both tier configs (fixtures/gpu/*.toml) run end to end on a tiny model.

The same functions as ``tests/gpu/test_gpu_study.py`` (refusal_core.testing.gpu_tier) load each
TOML through the study's config reader, swap the Llama path for a tiny Llama saved to a temporary
directory with ``save_pretrained``, set ``device = "cpu"`` and small counts, and run the study. The
results must carry every setting of the file that was not overridden (methods, AIRD α, selection
thresholds, attack budget, dtype...), and the band extraction must find a value for every band of
the model's entry in fixtures/gpu_expected.json. A config that no longer parses, a key the study
no longer knows, or a pipeline change that breaks the GPU path fails here, without a GPU.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from refusal_core.errors import InvalidArgumentError
from refusal_core.testing import gpu_tier
from refusal_core.testing.tiny import tiny_model, tiny_tokenizer

#: What the CPU run changes: the model (set per test), the device, the AdvBench file and the sizes.
CPU_OVERRIDES: dict[str, Any] = {
    **gpu_tier.CPU_OVERRIDES,
    # The tier files evaluate with vLLM (engine = "vllm"), which the default tier does not install:
    # here the torch engine generates, the [vllm] settings still reach the study and are checked like
    # every other setting; the vLLM path of a tier file runs in tox -e vllm (tests/vllm_tier/).
    "engine": "torch",
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", n_layers=4, d_model=32).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


_file_values = gpu_tier.tier_file_values
_setting = gpu_tier.setting_of


@pytest.mark.parametrize("name", list(gpu_tier.TIERS))
def test_tier_config_runs_the_study_on_cpu_with_its_settings(
    name: str, tiny_dir: Path, tmp_path: Path
) -> None:
    tier = gpu_tier.tier(name)
    assert gpu_tier.placeholders(tier.toml) == {
        "model": tier.env,
        "harmful_test": gpu_tier.ADVBENCH_ENV,
    }, f"{tier.toml}: the model and AdvBench paths are placeholders for {tier.env} / {gpu_tier.ADVBENCH_ENV}"
    written = _file_values(tier.toml)
    assert written["device"] == "cuda", written
    assert written["dtype"] in ("float16", "bfloat16"), written
    overrides = {**CPU_OVERRIDES, "model": str(tiny_dir)}
    run = gpu_tier.run_tier(tier.toml, tmp_path / "run", values={}, overrides=overrides)
    settings = run.results["settings"]

    # every setting of the file that the CPU run does not override reached the study
    kept = {k: v for k, v in written.items() if k not in overrides}
    assert {"methods", "dtype", "aird.alpha_attn", "aird.alpha_mlp", "attacks.gcg_steps"} <= set(kept)
    for key, value in kept.items():
        assert _setting(settings, key) == value, (
            f"{tier.toml}: {key} = {value!r}, the study ran with {_setting(settings, key)!r}"
        )
    for key, value in overrides.items():
        want = list(value) if isinstance(value, tuple) else value
        assert _setting(settings, key) == want, f"override {key}"
    assert run.results["model"]["device"] == "cpu", run.results["model"]
    assert run.results["model"]["dtype"] == written["dtype"], "the model ran in the file's dtype"

    # the paper's recipe variant used the file's α at the base source layer
    layer = run.results["base"]["source"][0]
    names = [v["name"] for v in run.results["variants"]]
    for method in written["methods"]:
        assert method in names, f"{method} ran: {names}"
        assert f"{method}+aird" in names, f"{method}+aird ran: {names}"
        rep = next(v for v in run.results["variants"] if v["name"] == f"{method}+aird")
        assert rep["repair"]["alphas"] == [written["aird.alpha_attn"], written["aird.alpha_mlp"]]
        assert rep["repair"]["layers"] == [layer], rep["repair"]
    assert "gcg" not in next(v for v in run.results["variants"] if v["name"] == "base")["evaluation"]["asr"]

    # what the GPU test checks is there: a finite value for every band of this model
    values = gpu_tier.band_values(run.results)
    spec = gpu_tier.load_expected()["models"][tier.band_key]
    assert set(values["methods"]) == set(spec["methods"]), (
        f"{tier.toml} methods {sorted(values['methods'])} vs bands {sorted(spec['methods'])}"
    )
    for key in spec["base"]:
        assert math.isfinite(values["base"][key]), f"base {key}: {values['base'][key]}"
    for method, bands in spec["methods"].items():
        for key in bands:
            v = values["methods"][method][key]
            assert isinstance(v, float), f"{method} {key}: {v!r}"
            assert math.isfinite(v), f"{method} {key}: {v}"
    assert all(isinstance(m, str) for m in gpu_tier.check_bands(values, tier.band_key))


def _values(base_asr: float, method_asr: float, aird_asr: float, cosine: float) -> dict[str, Any]:
    spec = gpu_tier.load_expected()["models"]["llama2-7b-chat"]
    return {
        "base": {"asr": base_asr, "source_layer": 12},
        "methods": {
            m: {"cosine_at_base_source": cosine, "asr": method_asr, "asr_aird": aird_asr}
            for m in spec["methods"]
        },
    }


def test_check_bands_passes_inside_and_names_each_value_outside() -> None:
    assert gpu_tier.check_bands(_values(0.02, 0.05, 0.04, 0.995), "llama2-7b-chat") == []
    low_cos = gpu_tier.check_bands(_values(0.02, 0.05, 0.04, 0.5), "llama2-7b-chat")
    assert len(low_cos) == 2, low_cos  # the two 8-bit methods' bands start at 0.99
    assert all("cosine_at_base_source" in m for m in low_cos), low_cos
    raised = gpu_tier.check_bands(_values(0.02, 0.05, 0.15, 0.995), "llama2-7b-chat")
    assert sum("AIRD raised ASR" in m for m in raised) == 4, raised
    nan = gpu_tier.check_bands(_values(math.nan, 0.05, 0.04, 0.995), "llama2-7b-chat")
    assert any("base asr" in m for m in nan), nan
    missing = _values(0.02, 0.05, 0.04, 0.995)
    del missing["methods"]["wanda"]
    assert gpu_tier.check_bands(missing, "llama2-7b-chat") == [
        "llama2-7b-chat wanda: not measured (method missing from the tier config)"
    ]


def test_a_placeholder_without_its_variable_is_refused(tmp_path: Path) -> None:
    tier = gpu_tier.tier("llama2")
    cpu = {"device": "cpu"}  # StudyConfig refuses "cuda" on a machine without CUDA
    with pytest.raises(InvalidArgumentError, match=tier.env):
        gpu_tier.load_tier_config(tier.toml, values={gpu_tier.ADVBENCH_ENV: "x.csv"}, overrides=cpu)
    paths = {tier.env: "/m", gpu_tier.ADVBENCH_ENV: "/a.csv"}
    cfg = gpu_tier.load_tier_config(tier.toml, values=paths, overrides=cpu)
    assert (cfg.model, cfg.harmful_test, cfg.n_test) == ("/m", "/a.csv", 520)
    bad = tmp_path / "bad.toml"
    bad.write_text(tier.toml.read_text().replace("max_new_tokens", "max_new_token"))
    with pytest.raises(InvalidArgumentError, match="unknown key 'max_new_token'"):
        gpu_tier.load_tier_config(bad, values=paths, overrides=cpu)
