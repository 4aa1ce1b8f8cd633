"""The GPU tier's study runs, shared by ``tests/gpu`` (Llama-2/3 on CUDA) and the CPU tier (tiny models).

A tier is a TOML study config in ``fixtures/gpu/`` (``llama2.toml``,
``llama3.toml``) read by the same reader as ``refusal-core study --config``
(:func:`refusal_core._cli_config.read_config_file` then
:func:`~refusal_core._cli_config.build_config`). A string value ``"env:NAME"``
is a placeholder for a local path given by the environment variable ``NAME``
(or by the ``values`` mapping). :func:`run_tier` applies overrides (the CPU
tier swaps the model for a tiny one, the device for ``cpu`` and the sizes for
small ones), runs :func:`~refusal_core.study.run_study` and returns the
config with ``results.json``'s content; :func:`band_values` reads from the
results what ``fixtures/gpu_expected.json`` holds bands for, and
:func:`check_bands` lists every value outside its band. The GPU tests and the
CPU test call exactly these functions, so the GPU path cannot drift from what
CI runs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_core import _cli_config as cc
from refusal_core.compression import METHODS, method_spec
from refusal_core.errors import InvalidArgumentError

__all__ = [
    "ADVBENCH_ENV",
    "BAND_KEYS",
    "CPU_OVERRIDES",
    "EXPECTED_PATH",
    "FIXTURE_DIR",
    "TIERS",
    "Tier",
    "TierRun",
    "band_values",
    "check_bands",
    "load_expected",
    "load_tier_config",
    "placeholders",
    "quantized_8bit_methods",
    "run_tier",
    "setting_of",
    "tier",
    "tier_file_values",
]

_ROOT = Path(__file__).resolve().parents[2]
#: Where the tier configs are committed.
FIXTURE_DIR = _ROOT / "fixtures" / "gpu"
#: The regression bands (and where each comes from).
EXPECTED_PATH = _ROOT / "fixtures" / "gpu_expected.json"
ADVBENCH_ENV = "REFUSAL_CORE_ADVBENCH_PATH"
PLACEHOLDER = "env:"
#: A study method whose bands in gpu_expected.json are filed under another name.
BAND_KEYS: Mapping[str, str] = {"bnb-int8": "llm-int8"}


def quantized_8bit_methods() -> tuple[str, ...]:
    """Methods whose ASR may not exceed the base model's by more than the file's quantized slack: the
    8-bit quantizers (simulated or real) of the method table, read when called."""
    return tuple(
        name
        for name, config in METHODS.items()
        if method_spec(name).quantizes and method_spec(name).weight_bits(config) == 8
    )


#: :func:`quantized_8bit_methods` at import (the methods registered by then).
QUANTIZED = quantized_8bit_methods()


@dataclass(frozen=True)
class Tier:
    """One model of the GPU tier: its config file, its path variable and its entry in the bands file."""

    name: str
    toml: Path
    env: str
    band_key: str


TIERS: Mapping[str, Tier] = {
    "llama2": Tier("llama2", FIXTURE_DIR / "llama2.toml", "REFUSAL_CORE_LLAMA2_PATH", "llama2-7b-chat"),
    "llama3": Tier("llama3", FIXTURE_DIR / "llama3.toml", "REFUSAL_CORE_LLAMA3_PATH", "llama3-8b-instruct"),
}


@dataclass(frozen=True)
class TierRun:
    """A finished tier run: the resolved config, results.json's content and the run directory."""

    config: Any  # StudyConfig
    results: dict[str, Any]
    out_dir: Path


def _options() -> list[cc.ConfigOption]:
    from refusal_core.study import StudyConfig

    return cc.config_options(StudyConfig)


def _read(path: str | Path) -> dict[str, Any]:
    from refusal_core.study import StudyConfig

    return cc.read_config_file(path, StudyConfig, _options())


def placeholders(path: str | Path) -> dict[str, str]:
    """``{dotted key: variable name}`` of the ``"env:NAME"`` values of the config file at ``path``."""
    return {
        k: v[len(PLACEHOLDER) :]
        for k, v in _read(path).items()
        if isinstance(v, str) and v.startswith(PLACEHOLDER)
    }


def load_tier_config(
    path: str | Path,
    *,
    values: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """The :class:`~refusal_core.study.StudyConfig` of the config file at ``path``.

    Each ``"env:NAME"`` value becomes ``values[NAME]`` (default: the
    environment) unless ``overrides`` (``{dotted key: value}``, as on the
    command line) sets that key; a placeholder left without a value raises
    :class:`~refusal_core.errors.InvalidArgumentError` naming the variable.
    """
    from refusal_core.study import StudyConfig

    env = os.environ if values is None else values
    given = dict(overrides or {})
    from_file = _read(path)
    for key, name in placeholders(path).items():
        if key in given:
            del from_file[key]
        elif env.get(name):
            from_file[key] = env[name]
        else:
            raise InvalidArgumentError(f"{path}: {key} needs the environment variable {name} (a local path)")
    return cc.build_config(StudyConfig, from_file, given)


def run_tier(
    path: str | Path,
    out_dir: str | Path,
    *,
    values: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> TierRun:
    """Run (or resume) the study of the tier config at ``path`` into ``out_dir``."""
    from refusal_core.study import run_study

    config = load_tier_config(path, values=values, overrides=overrides)
    results = run_study(config, Path(out_dir), progress=progress)
    return TierRun(config=config, results=results.to_dict(), out_dir=Path(out_dir))


def load_expected() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(EXPECTED_PATH.read_text(encoding="utf-8"))
    return data


def _variant(results: Mapping[str, Any], name: str) -> dict[str, Any]:
    for v in results["variants"]:
        if v["name"] == name:
            found: dict[str, Any] = v
            return found
    raise InvalidArgumentError(
        f"results have no variant {name!r}: {[v['name'] for v in results['variants']]}"
    )


def _vanilla_asr(variant: Mapping[str, Any]) -> float:
    return float(variant["evaluation"]["asr"]["vanilla"]["value"])


def band_values(results: Mapping[str, Any]) -> dict[str, Any]:
    """What the bands file constrains, read from a study's results.

    ``{"base": {"asr", "source_layer"}, "methods": {band key: {"cosine_at_base_source", "asr",
    "asr_aird"}}}``: ASR is the plain-request ("vanilla") attack's, ``asr_aird`` that of
    ``<method>+aird`` (the paper's α at the base source layer with the base direction).
    """
    base = _variant(results, "base")
    out: dict[str, Any] = {
        "base": {"asr": _vanilla_asr(base), "source_layer": int(results["base"]["source"][0])},
        "methods": {},
    }
    for method in results["settings"]["methods"]:
        comp, rep = _variant(results, method), _variant(results, f"{method}+aird")
        cos = comp["cosine_at_base_source"]
        out["methods"][BAND_KEYS.get(method, method)] = {
            "cosine_at_base_source": math.nan if cos is None else float(cos),
            "asr": _vanilla_asr(comp),
            "asr_aird": _vanilla_asr(rep),
        }
    return out


def _outside(value: float, entry: Mapping[str, Any], what: str) -> list[str]:
    lo, hi = entry["band"]
    if lo <= value <= hi:  # NaN is outside every band
        return []
    return [f"{what} = {value:.4g} outside the expected band [{lo}, {hi}] ({entry['source']})"]


def check_bands(
    values: Mapping[str, Any], band_key: str, expected: Mapping[str, Any] | None = None
) -> list[str]:
    """Every band of model ``band_key`` in the bands file that ``values`` (from :func:`band_values`)
    misses, and every relation it breaks, as one message each; empty when all hold. A band with no
    measured value is a failure too."""
    spec = load_expected() if expected is None else expected
    model = spec["models"][band_key]
    rel = spec["relations"]
    failures: list[str] = []
    for key, entry in model["base"].items():
        failures += _outside(values["base"][key], entry, f"{band_key} base {key}")
    base_asr = values["base"]["asr"]
    for method, bands in model["methods"].items():
        got = values["methods"].get(method)
        if got is None:
            failures.append(f"{band_key} {method}: not measured (method missing from the tier config)")
            continue
        for key, entry in bands.items():
            failures += _outside(got[key], entry, f"{band_key} {method} {key}")
        limit = rel["aird_max_asr_increase"]
        if not got["asr_aird"] <= got["asr"] + limit["value"]:
            failures.append(
                f"{band_key} {method}: AIRD raised ASR from {got['asr']:.3f} to {got['asr_aird']:.3f} "
                f"({limit['source']})"
            )
        if method in quantized_8bit_methods():
            q = rel["quantized_max_asr_increase_over_base"]
            if not got["asr"] <= base_asr + q["value"]:
                failures.append(
                    f"{band_key} {method}: ASR {got['asr']:.3f} vs base {base_asr:.3f} ({q['source']})"
                )
    return failures


def tier(name: str) -> Tier:
    """The :class:`Tier` called ``name`` ("llama2" or "llama3")."""
    if name not in TIERS:
        raise InvalidArgumentError(f"unknown GPU tier {name!r}; valid: {', '.join(TIERS)}")
    return TIERS[name]


def tier_file_values(path: Path) -> dict[str, Any]:
    """``{dotted key: value}`` as written in a tier TOML (JSON-like: lists stay lists)."""
    flat: dict[str, Any] = {}

    def walk(table: Mapping[str, Any], prefix: str) -> None:
        for k, v in table.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + k] = v

    walk(cc.parse_toml(path.read_text(encoding="utf-8"), str(path)), "")
    return flat


def setting_of(settings: Mapping[str, Any], key: str) -> Any:
    """The value at dotted ``key`` of a results.json ``settings`` tree (``aird.alpha_attn``)."""
    value: Any = settings
    for part in key.split("."):
        value = value[part]
    return value


#: What a CPU run of a tier file changes (tests of the GPU configs on tiny models): the device, the
#: AdvBench file and the sizes. The model is set per run; callers add what their file needs (the
#: torch engine where the file asks for vLLM, which the default tier does not install).
CPU_OVERRIDES: Mapping[str, Any] = {
    "device": "cpu",
    "harmful_test": "harmful_test",
    "n_train": 8,
    "n_val": 4,
    "n_test": 4,
    "n_calibration": 4,
    "noise_splits": 2,
    "max_new_tokens": 3,
    "batch_size": 8,
    "zero_shot_tasks": (),
    "attacks.decoding_temperatures": (1.0,),
    "attacks.decoding_top_ps": (1.0,),
    "attacks.decoding_top_ks": (0,),
    "attacks.decoding_samples": 1,
    "repair.gains": (2.0,),
}
