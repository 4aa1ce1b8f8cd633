"""refusal_core.real: locating and verifying the real tier's GGUF, its study settings and table (no model)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from refusal_core.errors import ArtifactError
from refusal_core.real import (
    GGUF_ENV_VAR,
    REAL_GGUF_NAME,
    REAL_METHODS,
    default_cache_dir,
    default_gguf_path,
    real_comparisons_table,
    real_results_table,
    real_study_config,
    verify_gguf,
)
from refusal_core.stats import mcnemar
from refusal_core.study.config import RepairConfig
from refusal_core.study.results import VariantResult


def test_default_path_and_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(GGUF_ENV_VAR, raising=False)
    assert default_gguf_path() == default_cache_dir() / REAL_GGUF_NAME, "default is the fetch script's cache"
    monkeypatch.setenv(GGUF_ENV_VAR, str(tmp_path / "m.gguf"))
    assert default_gguf_path() == tmp_path / "m.gguf", f"{GGUF_ENV_VAR} overrides the default"


def test_verify_accepts_the_expected_file_and_rejects_others(tmp_path: Path) -> None:
    data = b"GGUF" + bytes(range(256)) * 3
    good = tmp_path / "m.gguf"
    good.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert verify_gguf(good, sha256=digest, size=len(data)) == good, "matching size and hash pass"
    with pytest.raises(ArtifactError, match="does not exist"):
        verify_gguf(tmp_path / "missing.gguf", sha256=digest, size=len(data))
    with pytest.raises(ArtifactError, match="bytes, expected"):
        verify_gguf(good, sha256=digest, size=len(data) + 1)
    flipped = bytearray(data)
    flipped[10] ^= 1
    good.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError, match="sha256"):
        verify_gguf(good, sha256=digest, size=len(data))


def test_study_config_holds_out_64_plus_64_and_scores_a_layer_subset() -> None:
    cfg = real_study_config("/nonexistent/model.gguf")
    assert cfg.methods == REAL_METHODS, f"all six methods by default, got {cfg.methods}"
    assert cfg.n_test >= 64, f"at least 64 held-out prompts per class, got {cfg.n_test}"
    assert cfg.harmful_test != cfg.harmful_train, "test prompts are a split apart from extraction"
    assert cfg.selection.layers is not None, "the real tier scores a subset of layers"
    assert cfg.attacks.gcg_prompts == 0, "GCG is off in the real tier (too slow on 2 cores)"


def test_study_config_extracts_from_enough_prompts_for_a_readable_noise_floor() -> None:
    cfg = real_study_config("/nonexistent/model.gguf")
    assert cfg.n_train >= 128, f"128 + 128 extraction prompts (issue 11), got {cfg.n_train}"
    assert cfg.repair.generate is False, "the real tier scores the AIRD sweep with the refusal score"
    default = RepairConfig().gains
    assert set(cfg.repair.gains) < set(default), "the real sweep's gains are points of the default grid"
    assert max(cfg.repair.gains) == max(default), "up to the gain the paper's α reaches on real models"
    assert cfg.repair.placements == RepairConfig().placements, "both placements"
    assert cfg.repair.include_paper_alpha, "and the paper's α"


def _rate(k: int, n: int) -> dict:
    from refusal_core.stats import rate

    return rate(k, n).to_dict()


NO_DAMAGE = {"kl_mean": None, "ce_mean": None, "n": 0}


def test_results_table_has_one_row_per_variant() -> None:
    results = {
        "variants": [
            {
                "name": "base",
                "source": [14, -1],
                "source_shift": [0, 0],
                "cosine_at_base_source": 1.0,
                "mechanism": {
                    "refusal_rate_harmful": _rate(32, 64),
                    "necessity": _rate(0, 64),
                    "sufficiency": _rate(51, 64),
                },
                "evaluation": {
                    "asr": {"vanilla": _rate(32, 64)},
                    "over_refusal": _rate(0, 64),
                    "damage": NO_DAMAGE,
                },
            },
            {
                "name": "wanda+aird",
                "source": [12, -1],
                "source_shift": [-2, 0],
                "cosine_at_base_source": 0.71234,
                "evaluation": {
                    "asr": {"vanilla": _rate(16, 64)},
                    "over_refusal": _rate(6, 64),
                    "damage": NO_DAMAGE,
                },
                "comparisons": {
                    "vs_compressed": {"asr": {"vanilla": mcnemar([True] * 20, [False] * 20).to_dict()}}
                },
            },
        ]
    }
    variants = [VariantResult.from_dict({"kind": "base", "method": None, **v}) for v in results["variants"]]
    lines = real_results_table(variants).strip().splitlines()
    assert len(lines) == 4, f"header, rule and two rows: {lines}"
    assert "ASR vanilla" in lines[0], f"one ASR column per attack: {lines[0]}"
    assert lines[2].startswith(
        "| base | (14, -1) | (0, 0) | 1.000 | 0.50 [0.38, 0.62] | 0.00 [0.00, 0.06] |"
    ), lines[2]
    assert "| wanda+aird | (12, -1) | (-2, 0) | 0.712 | – | – | – | 0.25 [0.16, 0.37] * |" in lines[3], lines[
        3
    ]


def test_comparisons_table_gives_exact_p_holm_and_the_detectable_change_per_comparison() -> None:
    from scipy.stats import binomtest

    from refusal_core.stats import minimum_detectable_change

    # compressed vs base: 12 prompts newly jailbroken, 2 the other way, on 98 pairs
    before = [False] * 84 + [True] * 14
    after = [False] * 72 + [True] * 12 + [False] * 2 + [True] * 12
    rise = mcnemar(before, after)
    # repair vs compressed: 9 prompts no longer jailbroken, 1 newly
    repaired = [True] + after[1:72] + [False] * 9 + after[81:]
    fall = mcnemar(after, repaired)
    over = mcnemar([False] * 98, [False] * 98)
    comp = {"vs_base": {"asr": {"vanilla": rise.to_dict()}, "over_refusal": over.to_dict()}}
    rep = {
        "vs_base": {"asr": {"vanilla": rise.to_dict()}},
        "vs_compressed": {"asr": {"vanilla": fall.to_dict()}},
    }
    same = {"repair": {"arm": "dense", "how": "no edit", "same_as": "wanda"}, "comparisons": comp}
    variants = [
        VariantResult.from_dict(
            {"name": "wanda", "kind": "compressed", "method": "wanda", "comparisons": comp}
        ),
        VariantResult.from_dict(
            {"name": "wanda+aird", "kind": "repaired", "method": "wanda", "comparisons": rep}
        ),
        VariantResult.from_dict({"name": "wanda+aird*", "kind": "repaired", "method": "wanda", **same}),
    ]
    lines = real_comparisons_table(variants).strip().splitlines()[2:]
    assert len(lines) == 3, (
        f"two rows of wanda, one of its repair against compressed only; no row of the no-edit copy: {lines}"
    )
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    p_rise = binomtest(2, 14, 0.5).pvalue  # independent of refusal_core.stats
    p_fall = binomtest(1, 10, 0.5).pvalue
    assert cells[0][:5] == ["wanda", "base", "ASR vanilla", "0.14 → 0.24 (98)", "2 / 12"], cells[0]
    assert cells[0][5] == f"{p_rise:.2g} *", cells[0]
    # Holm over the three p-values (p_rise, 1.0, p_fall), by hand
    ordered = sorted([p_rise, 1.0, p_fall])
    holm_by_hand = {
        p: min(1.0, max((3 - i) * q for i, q in enumerate(ordered[: ordered.index(p) + 1]))) for p in ordered
    }
    assert cells[0][6].split()[0] == f"{holm_by_hand[p_rise]:.2g}", cells[0]
    assert cells[2][:5] == ["wanda+aird", "compressed", "ASR vanilla", "0.24 → 0.16 (98)", "9 / 1"], cells[2]
    assert cells[2][6].split()[0] == f"{holm_by_hand[p_fall]:.2g}", cells[2]
    # the detectable change: a rise for the compressed model (reverse moves: the 2 that fell), a fall for
    # the repair (reverse moves: the 1 that rose)
    assert cells[0][7] == f"{minimum_detectable_change(98, 2 / 98):.2f}", cells[0]
    assert cells[2][7] == f"{minimum_detectable_change(98, 1 / 98):.2f}", cells[2]
    assert cells[1][2] == "over-refusal", cells[1]
    assert cells[1][7] == f"{minimum_detectable_change(98, 0.0):.2f}", cells[1]


def test_real_tier_uses_bfloat16_exactly_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from refusal_core import real

    for amx, avx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx: v, raising=False)
        want = "bfloat16" if (amx or avx) else "float32"
        got = real.real_study_config("/nonexistent/model.gguf").dtype
        assert got == want, f"AMX {amx}, AVX-512 BF16 {avx}: real tier dtype {got}, expected {want}"
    assert real.real_study_config("/nonexistent/model.gguf", dtype="float16").dtype == "float16"


def test_real_models_are_chosen_by_key_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from refusal_core.errors import InvalidArgumentError
    from refusal_core.real import REAL_MODEL_ENV_VAR, REAL_MODELS, real_model

    monkeypatch.delenv(REAL_MODEL_ENV_VAR, raising=False)
    monkeypatch.delenv(GGUF_ENV_VAR, raising=False)
    assert real_model().key == "qwen2.5-coder-1.5b", "the 1.5B (it refuses) is the default"
    small = REAL_MODELS["qwen2.5-coder-0.5b"]
    assert (small.size, small.sha256[:12]) == (491_400_064, "1d9614638d18"), "the 0.5B's published identity"
    big = REAL_MODELS["qwen2.5-coder-1.5b"]
    assert (big.size, big.sha256[:12], len(big.packages)) == (1_117_320_768, "cc324af070c2", 22)
    assert [big.part_name(7), big.part_name(22)] == ["part07.bin", "part22.bin"]
    monkeypatch.setenv(REAL_MODEL_ENV_VAR, "qwen2.5-coder-0.5b")
    assert real_model().key == "qwen2.5-coder-0.5b", f"{REAL_MODEL_ENV_VAR} chooses the model"
    assert default_gguf_path().name == small.file_name, "the default path follows the chosen model"
    cfg = real_study_config("/nonexistent/model.gguf")
    assert cfg.selection.layers == small.selection_layers, "selection layers follow the chosen model"
    monkeypatch.setenv(REAL_MODEL_ENV_VAR, "llama-70b")
    with pytest.raises(InvalidArgumentError, match="unknown real model"):
        real_model()


def test_selection_layers_lie_below_arditis_cut() -> None:
    from refusal_core.real import REAL_MODELS

    for spec in REAL_MODELS.values():
        cut = int(0.8 * spec.n_layers)
        assert all(0 < layer < cut for layer in spec.selection_layers), (
            f"{spec.key}: selection layers {spec.selection_layers} must lie in (0, floor(0.8 L) = {cut})"
        )


def test_the_real_tier_judges_as_many_tokens_as_the_committed_measurement_supports() -> None:
    """The budget is read off the verdict-length measurement: the smallest budget whose verdicts equal
    the longest's on both classes must not exceed it (a shorter budget would change verdicts)."""
    import json

    from refusal_core.real import REAL_MAX_NEW_TOKENS, REAL_N_TEST

    doc = json.loads(
        (Path(__file__).parent.parent / "fixtures/real_study/qwen1.5b/verdict_length.json").read_text()
    )
    stable = max(
        min(int(b) for b, row in cls["by_budget"].items() if row["changed_vs_longest"] == 0)
        for cls in doc["classes"].values()
    )
    assert stable <= REAL_MAX_NEW_TOKENS, (
        f"verdicts still change below {stable} tokens; budget {REAL_MAX_NEW_TOKENS}"
    )
    cfg = real_study_config("/nonexistent/model.gguf")
    assert (cfg.max_new_tokens, cfg.n_test) == (REAL_MAX_NEW_TOKENS, REAL_N_TEST)
    from refusal_core.stats import minimum_detectable_change

    mdc = minimum_detectable_change(REAL_N_TEST, p_down=0.05)
    assert mdc is not None
    assert mdc <= 0.15, f"n_test {REAL_N_TEST} cannot detect a 15-point change at 80 % power ({mdc:.3f})"
