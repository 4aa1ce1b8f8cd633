"""Work shared between studies: a study without repairs (``repairs=False``), base stages seeded from
another run directory (:func:`refusal_core.frontier.seed_stages`), and pruning masks compared from
saved weights (:func:`refusal_core.compression.calibration_sets.mask_overlap_files`)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from refusal_core.errors import InvalidArgumentError
from refusal_core.frontier import seed_stages
from refusal_core.study import StudyConfig, run_study
from refusal_core.study.config import AttackSettings, RepairConfig

SMALL = StudyConfig(
    model="toy",
    methods=("magnitude",),
    n_train=16,
    n_val=8,
    n_test=8,
    n_calibration=6,
    noise_splits=2,
    max_new_tokens=8,
    batch_size=16,
    zero_shot_tasks=(),
    save_checkpoints=False,
    repair=RepairConfig(gains=(1.25,), include_paper_alpha=False, generate=False),
    attacks=AttackSettings(
        gcg_prompts=0, decoding_temperatures=(1.0,), decoding_top_ps=(1.0,), decoding_top_ks=(0,)
    ),
)


def _stages(run: Path) -> set[str]:
    return {str(p.parent.relative_to(run / "stages")) for p in (run / "stages").rglob("stage.json")}


def _variants(run: Path) -> list[dict]:
    return json.loads((run / "results.json").read_text(encoding="utf-8"))["variants"]


def test_a_study_without_repairs_measures_and_evaluates_the_compressed_model_only(tmp_path: Path) -> None:
    results = run_study(dataclasses.replace(SMALL, repairs=False), tmp_path, progress=False)
    assert [v.name for v in results.variants] == ["base", "magnitude"], "no repaired variant"
    assert results.sweeps == {}, "no AIRD sweep"
    stages = _stages(tmp_path)
    assert not [s for s in stages if "sweep" in s or "aird" in s], f"repair stages ran: {sorted(stages)}"
    assert "base/validation" in stages
    assert {"eval/base", "eval/magnitude"} <= stages, "both variants are evaluated"
    v = results.variant("magnitude")
    assert v.evaluation is not None, "the compressed model is evaluated"
    assert v.comparisons is not None, "the compressed model is tested against the base"
    assert v.evaluation.over_refusal.n == 8
    with pytest.raises(InvalidArgumentError, match="repairs must be a bool"):
        dataclasses.replace(SMALL, repairs="no")


def test_seeded_stages_are_used_only_when_their_keys_verify(tmp_path: Path) -> None:
    cfg = dataclasses.replace(SMALL, repairs=False)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run_study(cfg, a, progress=False)
    seeded = seed_stages(a, b, ("base", "eval/base", ("magnitude", "magnitude")))
    assert {"base/extract", "base/select", "eval/base", "magnitude/compress"} <= set(seeded), seeded
    extract = Path("stages/base/extract/stage.json")
    assert os.stat(a / extract).st_ino == os.stat(b / extract).st_ino, "seeded files are hard links"
    run_study(cfg, b, progress=False)
    # Loaded, not recomputed: the marker (rewritten by every computation) is still the shared inode,
    # and the results equal the source run's.
    for stage in ("base/extract", "base/select", "eval/base", "magnitude/compress"):
        m = Path("stages") / stage / "stage.json"
        assert os.stat(a / m).st_ino == os.stat(b / m).st_ino, f"{stage} was recomputed though it verified"
    assert _variants(a) == _variants(b), "a study resumed from seeded stages reports the same results"
    # Another prompt count is another study: the seeded base stages must not be used.
    other = dataclasses.replace(cfg, n_train=12)
    seed_stages(a, c, ("base", "eval/base"))
    run_study(other, c, progress=False)
    for stage in ("base/extract", "eval/base"):
        m = Path("stages") / stage / "stage.json"
        assert os.stat(a / m).st_ino != os.stat(c / m).st_ino, f"{stage} seeded under other settings was used"
        key_a = json.loads((a / m).read_text())["key"]
        assert json.loads((c / m).read_text())["key"] != key_a
    fresh = tmp_path / "fresh"
    run_study(other, fresh, progress=False)
    assert _variants(c) == _variants(fresh), "a run given mismatched seeds equals a fresh run"
    # the source run is untouched by the other run's recomputation
    run_study(cfg, a, progress=False)
    assert _variants(a) == _variants(b)


def test_mask_overlap_files_equals_mask_overlap_of_the_models(tmp_path: Path) -> None:
    import copy

    from safetensors.torch import save_file

    from refusal_core.compression import MagnitudeConfig, WandaConfig, compress_
    from refusal_core.compression.calibration_sets import (
        calibration_token_ids,
        mask_overlap,
        mask_overlap_files,
    )
    from refusal_core.errors import EmptyInputError, ShapeMismatchError
    from refusal_core.model import load_model

    model, tok = load_model("toy")
    x, y = copy.deepcopy(model), copy.deepcopy(model)
    compress_(x, WandaConfig(sparsity=0.5), calibration_token_ids(tok, "harmless", 6))
    rec = compress_(y, MagnitudeConfig(sparsity=0.5))
    paths = []
    for name, m in (("x", x), ("y", y)):
        paths.append(tmp_path / f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(paths[-1]))
    modules = sorted(rec.module_sparsity)
    got = mask_overlap_files(paths[0], paths[1], modules)
    assert got == mask_overlap(x, y), "streamed overlap equals the models' overlap"
    assert 0.0 < got["jaccard"] < 1.0, "Wanda and magnitude masks differ but overlap"
    # a module's half only: the counts must cover exactly the modules named
    first = modules[:1]
    w0, w1 = x.get_submodule(first[0]).weight == 0, y.get_submodule(first[0]).weight == 0
    part = mask_overlap_files(paths[0], paths[1], first)
    assert part["n_weights"] == w0.numel()
    assert part["jaccard"] == int((w0 & w1).sum()) / int((w0 | w1).sum())
    with pytest.raises(ShapeMismatchError, match="no weight"):
        mask_overlap_files(paths[0], paths[1], ["model.layers.0.nope"])
    with pytest.raises(EmptyInputError):
        mask_overlap_files(paths[0], paths[1], [])


def test_awq_calibration_comparison_reads_scales_from_scale_only_runs(tmp_path: Path) -> None:
    """AWQ's branch of compare_calibrations: the reference set's scales agree with themselves, the
    other set's cosine equals one computed here from two scale-only AWQ runs, and the base is
    extracted once (the second set's base stages are the first set's files)."""
    import copy
    import math

    from refusal_core.compression import quantize_awq_
    from refusal_core.compression.calibration_sets import calibration_token_ids, scale_cosine
    from refusal_core.frontier import compare_calibrations
    from refusal_core.model import load_model

    cfg = dataclasses.replace(SMALL, repairs=False)
    doc = compare_calibrations(cfg, "awq-w4", ["harmless", "harmful"], tmp_path, progress=False)
    ref, other = doc["rows"]
    assert set(ref["vs_reference"]) == {"awq_scale_cosine"}
    assert math.isclose(ref["vs_reference"]["awq_scale_cosine"], 1.0, rel_tol=1e-12), "reference vs itself"
    model, tok = load_model("toy")
    scaled = []
    for spec in ("harmless", "harmful"):
        m = copy.deepcopy(model)
        ids = calibration_token_ids(tok, spec, 6)
        quantize_awq_(m, ids, 4, 128, 20, scale_only=True, batch_size=16)
        scaled.append(m)
    want = scale_cosine(model, scaled[0], scaled[1])
    assert math.isclose(other["vs_reference"]["awq_scale_cosine"], want, rel_tol=1e-9), (other, want)
    assert want < 1.0, "harmful calibration folds other scales"
    assert other["n_sequences"] == 6
    assert other["n_tokens"] == sum(len(x) for x in calibration_token_ids(tok, "harmful", 6))
    marker = Path("stages/base/extract/stage.json")
    inodes = {os.stat(d / marker).st_ino for d in tmp_path.glob("cal-*")}
    assert len(inodes) == 1, "the base was extracted again for the second set"


def test_each_methods_models_are_released_before_the_next_is_compressed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study evaluates a method's variants as soon as the method is done and lets their models go:
    when the next method is compressed, no earlier compressed or repaired model is still alive (a
    real model's frontier that kept every level's until the end peaked at 22 GB for three levels).
    The results equal those of a study that ran each method on its own."""
    import gc
    import weakref

    from refusal_core import bench as steps

    made: list[tuple[str, weakref.ref]] = []
    real_compress, real_repaired = steps.compress, steps.repaired

    def compress(bench, method):  # type: ignore[no-untyped-def]
        gc.collect()
        alive = [name for name, ref in made if ref() is not None]
        assert not alive, f"compressing {method} while earlier models are alive: {alive}"
        out = real_compress(bench, method)
        made.append((method, weakref.ref(out.model)))
        return out

    def repaired(bench, model, r, plan, **kw):  # type: ignore[no-untyped-def]
        out = real_repaired(bench, model, r, plan, **kw)
        made.append(("repaired", weakref.ref(out[0])))
        return out

    monkeypatch.setattr(steps, "compress", compress)
    monkeypatch.setattr(steps, "repaired", repaired)
    cfg = dataclasses.replace(SMALL, methods=("magnitude", "wanda"))
    results = run_study(cfg, tmp_path / "both", progress=False)
    assert [m for m, _ in made].count("repaired") >= 1, "the check must see a repaired model"
    assert {m for m, _ in made} >= {"magnitude", "wanda"}
    monkeypatch.undo()
    alone = run_study(dataclasses.replace(cfg, methods=("wanda",)), tmp_path / "alone", progress=False)
    got = {v.name: v.to_dict() for v in results.variants if v.name.startswith("wanda")}
    want = {v.name: v.to_dict() for v in alone.variants if v.name.startswith("wanda")}
    assert got == want, "evaluating method by method changes no result"
