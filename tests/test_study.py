"""The study pipeline end to end on a tiny model: artifacts, resume, invalidation, bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from refusal_core.aird import AirdConfig
from refusal_core.errors import InvalidArgumentError, RefusalCoreError
from refusal_core.study import AttackSettings, StudyConfig, run_study
from refusal_core.testing.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama", n_layers=3, d_model=32, seed=3).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _config(model_dir: Path, **kw: object) -> StudyConfig:
    base = StudyConfig(
        model=str(model_dir),
        methods=("magnitude", "llm-int8"),
        n_train=12,
        n_val=4,
        n_test=4,
        n_calibration=8,
        noise_splits=2,
        attacks=AttackSettings(
            decoding_temperatures=(1.0,),
            decoding_top_ps=(1.0,),
            decoding_top_ks=(0,),
            gcg_prompts=2,
            gcg_steps=1,
            gcg_suffix_len=2,
            gcg_topk=4,
            gcg_candidates=4,
        ),
        zero_shot_tasks=("rc_arithmetic",),
        max_new_tokens=4,
        batch_size=16,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def _stage_keys(out: Path) -> dict[str, str]:
    return {
        str(p.parent.relative_to(out / "stages")): json.loads(p.read_text())["key"]
        for p in (out / "stages").rglob("stage.json")
    }


@pytest.fixture(scope="module")
def first_run(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("study")
    results = run_study(_config(tiny_dir), out, progress=False)
    return out, results


def test_study_writes_report_results_and_plots(first_run: tuple[Path, dict]) -> None:
    out, results = first_run
    names = [v["name"] for v in results["variants"]]
    assert names == [
        "base",
        "magnitude",
        "magnitude+aird",
        "magnitude+aird-sparse",
        "llm-int8",
        "llm-int8+aird",
    ], f"variants of a magnitude + llm-int8 study: {names}"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["variants"][0]["name"] == "base", "results.json holds the same variants"
    for v in results["variants"]:
        assert set(v["asr"]) == {"vanilla", "vanilla_system", "decoding", "gcg"}, f"attacks of {v['name']}"
        assert all(0.0 <= a <= 1.0 for a in v["asr"].values()), f"ASR of {v['name']} out of [0, 1]"
        assert 0.0 <= v["over_refusal"] <= 1.0, f"over-refusal of {v['name']}"
        assert set(v["accuracy"]) == {"rc_arithmetic"}, f"zero-shot tasks of {v['name']}"
        assert len(v["source"]) == 2, f"source of {v['name']} is (layer, position)"
    mag = next(v for v in results["variants"] if v["name"] == "magnitude")
    assert mag["sparsity"] == pytest.approx(0.5, abs=1e-6), (
        f"magnitude-50 achieved sparsity {mag['sparsity']}"
    )
    sparse = next(v for v in results["variants"] if v["name"] == "magnitude+aird-sparse")
    assert sparse["sparsity"] == mag["sparsity"], "sparsity-preserving AIRD must not change the sparsity"
    dense = next(v for v in results["variants"] if v["name"] == "magnitude+aird")
    assert dense["sparsity"] < mag["sparsity"], "dense AIRD fills pruned entries of the edited layer"
    report = (out / "report.md").read_text()
    assert "| variant |" in report, "report.md has the variant table"
    assert "magnitude+aird-sparse" in report, "report.md lists every variant"
    for png in ("asr.png", "cosine_by_layer.png", "candidates_base.png", "candidates_magnitude.png"):
        data = (out / "plots" / png).read_bytes()
        assert data.startswith(b"\x89PNG"), f"{png} is a PNG"


def test_rerun_resumes_without_recomputing(first_run: tuple[Path, dict], tiny_dir: Path) -> None:
    out, results = first_run
    before = {p: p.stat().st_mtime_ns for p in (out / "stages").rglob("stage.json")}
    again = run_study(_config(tiny_dir), out, progress=False)
    after = {p: p.stat().st_mtime_ns for p in (out / "stages").rglob("stage.json")}
    assert before == after, "a rerun with the same settings must not redo any stage"
    assert again["variants"] == results["variants"], "a resumed run reports the same results"


def test_changed_setting_invalidates_only_dependent_stages(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _config(tiny_dir, methods=("magnitude",))
    run_study(cfg, out, progress=False)
    keys = _stage_keys(out)
    run_study(replace(cfg, aird=AirdConfig(alpha_attn=0.05, alpha_mlp=0.01)), out, progress=False)
    changed = {k for k, v in _stage_keys(out).items() if keys.get(k) != v}
    assert changed == {"eval/magnitude+aird", "eval/magnitude+aird-sparse"}, (
        f"changing the AIRD alpha must redo only the AIRD evaluations, redid {sorted(changed)}"
    )


def test_interrupted_study_resumes(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import refusal_core.study as study

    out = tmp_path / "run"
    cfg = _config(tiny_dir, methods=("magnitude",))
    real = study.over_refusal
    calls = {"n": 0}

    def dying(*args: object, **kw: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-stage")
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(study, "over_refusal", dying)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, out, progress=False)
    done = _stage_keys(out)
    assert "eval/base" in done, f"stages done at the kill: {sorted(done)}"
    assert "eval/magnitude" not in done, f"stages done at the kill: {sorted(done)}"
    monkeypatch.setattr(study, "over_refusal", real)
    stamp = (out / "stages" / "eval" / "base" / "stage.json").stat().st_mtime_ns
    results = run_study(cfg, out, progress=False)
    assert (out / "stages" / "eval" / "base" / "stage.json").stat().st_mtime_ns == stamp, (
        "the stage finished before the kill is not redone"
    )
    assert [v["name"] for v in results["variants"]][-1] == "magnitude+aird-sparse", (
        "the resumed run completes"
    )


def test_damaged_artifact_is_recomputed(first_run: tuple[Path, dict], tiny_dir: Path) -> None:
    out, results = first_run
    cands = out / "stages" / "base" / "extract" / "candidates.safetensors"
    cands.write_bytes(b"not a safetensors file")
    again = run_study(_config(tiny_dir), out, progress=False)
    assert again["variants"][0]["source"] == results["variants"][0]["source"], "recomputed base source"
    assert cands.read_bytes()[:8] != b"not a sa", "the damaged artifact was rewritten"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"methods": ("wanda-3:4x",)}, "unknown compression method"),
        ({"methods": ()}, "methods is empty"),
        ({"n_train": 0}, "n_train"),
        ({"harmful_train": "/nonexistent/prompts.csv"}, "/nonexistent/prompts.csv"),
        ({"model": "/nonexistent/model"}, "/nonexistent/model"),
    ],
)
def test_bad_input_is_reported_before_anything_is_written(
    tiny_dir: Path, tmp_path: Path, change: dict, needle: str
) -> None:
    out = tmp_path / "run"
    with pytest.raises(RefusalCoreError) as info:
        run_study(_config(tiny_dir, **change), out, progress=False)
    assert needle in str(info.value), f"error for {change} should name {needle!r}: {info.value}"
    assert not (out / "stages").exists() or not any((out / "stages").rglob("stage.json")), (
        "no stage may complete on bad input"
    )


def test_bad_input_keeps_existing_results(first_run: tuple[Path, dict], tiny_dir: Path) -> None:
    out, _ = first_run
    before = (out / "results.json").read_bytes()
    with pytest.raises(InvalidArgumentError):
        run_study(_config(tiny_dir, harmful_test="/nonexistent.jsonl"), out, progress=False)
    assert (out / "results.json").read_bytes() == before, "a failed run must not touch the previous results"
