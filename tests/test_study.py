"""The study pipeline end to end on the committed toy model (small counts): artifacts, statistics,
resume, invalidation, wiring, validation/test separation, bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from refusal_core.aird import AirdConfig
from refusal_core.directions import DirectionCandidates
from refusal_core.errors import InvalidArgumentError, RefusalCoreError
from refusal_core.selection import SelectionConfig
from refusal_core.stats import wilson_interval
from refusal_core.study import AttackSettings, RepairConfig, StudyConfig, run_study

SMALL_ATTACKS = AttackSettings(
    decoding_temperatures=(1.0,),
    decoding_top_ps=(1.0,),
    decoding_top_ks=(0,),
    gcg_prompts=2,
    gcg_steps=1,
    gcg_suffix_len=2,
    gcg_topk=4,
    gcg_candidates=4,
)


def _config(**kw: object) -> StudyConfig:
    base = StudyConfig(
        model="toy",
        methods=("magnitude", "llm-int8"),
        n_train=16,
        n_val=8,
        n_test=8,
        n_calibration=8,
        noise_splits=2,
        repair=RepairConfig(gains=(2.0, 5.0), placements=("source-block",)),
        attacks=SMALL_ATTACKS,
        zero_shot_tasks=(),
        max_new_tokens=6,
        batch_size=16,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def _stage_keys(out: Path) -> dict[str, str]:
    return {
        str(p.parent.relative_to(out / "stages")): json.loads(p.read_text())["key"]
        for p in (out / "stages").rglob("stage.json")
    }


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("study")
    results = run_study(_config(zero_shot_tasks=("rc_arithmetic",)), out, progress=False).to_dict()
    return out, results


def _variant(results: dict, name: str) -> dict:
    return next(v for v in results["variants"] if v["name"] == name)


def test_study_writes_variants_report_and_plots(first_run: tuple[Path, dict]) -> None:
    out, results = first_run
    names = [v["name"] for v in results["variants"]]
    assert names == [
        "base",
        "magnitude",
        "magnitude+aird",
        "magnitude+aird*",
        "magnitude+aird-sparse*",
        "llm-int8",
        "llm-int8+aird",
        "llm-int8+aird*",
    ], f"variants of a magnitude + llm-int8 study: {names}"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["variants"] == results["variants"], "results.json holds what run_study returned"
    mag = _variant(results, "magnitude")
    assert mag["sparsity"] == pytest.approx(0.5, abs=1e-6), (
        f"magnitude-50 achieved sparsity {mag['sparsity']}"
    )
    assert _variant(results, "magnitude+aird")["sparsity"] < mag["sparsity"], (
        "dense AIRD fills pruned entries"
    )
    report = (out / "report.md").read_text()
    for needle in ("| variant |", "magnitude+aird-sparse*", "## The AIRD sweep", "McNemar p", "Wilson"):
        assert needle in report, f"report.md lacks {needle!r}"
    for png in (
        "asr.png",
        "cosine_by_layer.png",
        "candidates_base.png",
        "pareto_magnitude.png",
        "pareto_llm_int8.png",
    ):
        assert (out / "plots" / png).read_bytes().startswith(b"\x89PNG"), f"{png} is a PNG"
    assert "NaN" not in (out / "results.json").read_text(), "strict JSON: no NaN"


def test_every_rate_has_its_n_and_wilson_interval(first_run: tuple[Path, dict]) -> None:
    _, results = first_run
    for v in results["variants"]:
        ev = v["evaluation"]
        for name, r in [*ev["asr"].items(), ("over_refusal", ev["over_refusal"])]:
            expected_n = 2 if name == "gcg" else 8
            assert r["n"] == expected_n, f"{v['name']} {name}: n = {r['n']}"
            lo, hi = wilson_interval(r["k"], r["n"])
            assert (r["low"], r["high"]) == (lo, hi), f"{v['name']} {name}: interval is not Wilson's"
            assert r["value"] == r["k"] / r["n"]


def test_rates_and_paired_tests_agree_with_the_per_prompt_records(first_run: tuple[Path, dict]) -> None:
    """Recount from the saved per-prompt ASR files, independently of the study's summary code."""
    out, results = first_run

    def flags(variant: str, attack: str) -> list[bool]:
        data = json.loads((out / "stages" / "eval" / variant / f"asr_{attack}.json").read_text())
        return [bool(r["jailbroken"]) for r in data["records"]]

    for variant in ("magnitude", "llm-int8"):
        v = _variant(results, variant)
        for attack, test in v["comparisons"]["vs_base"]["asr"].items():
            before, after = flags("base", attack), flags(variant, attack)
            b = sum(x and not y for x, y in zip(before, after))
            c = sum(y and not x for x, y in zip(before, after))
            assert (test["b"], test["c"]) == (b, c), f"{variant} vs base, {attack}: discordant counts"
            assert v["evaluation"]["asr"][attack]["k"] == sum(after)
    rep = _variant(results, "magnitude+aird")
    assert set(rep["comparisons"]) >= {"vs_base", "vs_compressed", "mechanism_vs_compressed"}
    h = rep["headline"]["vanilla"]
    assert h["absolute_reduction"] == pytest.approx(h["asr_compressed"] - h["asr_repaired"])


def test_study_saves_repaired_variants_that_transformers_loads(first_run: tuple[Path, dict]) -> None:
    """The paper-α and chosen repaired variants are saved as checkpoints; the paper-α one of magnitude is
    the compressed weights with W + α r rᵀ W on the base source block's writers (recomputed here)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from refusal_core.checkpoint import read_checkpoint_record

    out, results = first_run
    saved = {
        v["name"]: v["repair"]["checkpoint"]
        for v in results["variants"]
        if v["kind"] == "repaired" and not v["repair"].get("same_as")
    }
    assert {"magnitude+aird", "llm-int8+aird"} <= set(saved), f"checkpoints saved: {saved}"
    for name, rel in saved.items():
        assert rel is not None, f"{name}: no checkpoint saved"
        record = read_checkpoint_record(out / rel)
        assert record["method"].endswith("+aird"), f"{name}: checkpoint record {record['method']!r}"
        AutoModelForCausalLM.from_pretrained(out / rel)
    model = AutoModelForCausalLM.from_pretrained(out / saved["magnitude+aird"]).requires_grad_(False)
    compressed = load_file(str(out / "stages" / "magnitude" / "compress" / "weights.safetensors"))
    base = DirectionCandidates.load(out / "stages" / "base" / "extract" / "candidates")
    layer, pos = results["base"]["source"]
    r = base.directions[layer, base.positions.index(pos)].to(torch.float64)
    alphas = _variant(results, "magnitude+aird")["repair"]["alphas"]
    writers = {
        f"model.layers.{layer}.self_attn.o_proj.weight": alphas[0],
        f"model.layers.{layer}.mlp.down_proj.weight": alphas[1],
    }
    for key, tensor in model.state_dict().items():
        want = compressed[key]
        if key in writers:
            w = want.to(torch.float64)
            want = (w + writers[key] * torch.outer(r, r) @ w).to(want.dtype)
        err = float((tensor.to(torch.float64) - want.to(torch.float64)).abs().max())
        assert err < 1e-6, f"saved magnitude+aird: {key} differs from the expected repair by {err:.2e}"


def test_study_applies_the_base_direction_at_the_base_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The paper's recipe: AIRD on the compressed model with the ORIGINAL model's direction and layer."""
    import refusal_core.bench as bench_mod

    calls: list[tuple[torch.Tensor, int]] = []
    real = bench_mod.repair_

    def spy(model, r, layer, config, **kw):  # type: ignore[no-untyped-def]
        calls.append((r.detach().clone(), layer))
        return real(model, r, layer, config, **kw)

    monkeypatch.setattr(bench_mod, "repair_", spy)
    out = tmp_path / "run"
    results = run_study(_config(methods=("wanda",)), out, progress=False).to_dict()
    base = DirectionCandidates.load(out / "stages" / "base" / "extract" / "candidates")
    layer, pos = results["base"]["source"]
    r_base = base.directions[layer, base.positions.index(pos)]
    own = DirectionCandidates.load(out / "stages" / "wanda" / "extract" / "candidates")
    assert calls, "AIRD was never applied"
    for r, at in calls:
        assert at == layer, f"AIRD at layer {at}, the base source is layer {layer}"
        assert torch.equal(r.to(r_base.dtype), r_base), "AIRD must use the base model's direction"
        assert not torch.equal(r.to(r_base.dtype), own.directions[layer, base.positions.index(pos)]), (
            "the direction used is the compressed model's own"
        )


class _Poison(list):
    """A prompt list that fails the test when anything reads it."""

    def _fail(self, *args: object, **kw: object) -> None:
        raise AssertionError("the test split was read while choosing the AIRD strength")

    __iter__ = __getitem__ = __len__ = _fail  # type: ignore[assignment]


def test_test_prompts_never_reach_the_strength_choice(tmp_path: Path) -> None:
    from refusal_core import bench as steps

    cfg = _config(methods=("magnitude",), repair=RepairConfig(gains=(2.0, 5.0)))
    bench = steps.Bench(cfg, tmp_path / "run")
    compressed = steps.compress(bench, "magnitude")
    bench.prompts["harmful_test"] = _Poison(["x"])
    bench.prompts["harmless_test"] = _Poison(["x"])
    base = steps.base_direction(bench)
    assert base.layer >= 1, "fixture: into-source needs a source layer above 0"
    points = steps.sweep(bench, "magnitude", compressed.model, base, 2, [compressed.key], sparse_arm=True)
    assert len(points) == 1 + 2 * 3 * 2, "identity + (paper, g=2, g=5) x (dense, sparse) x both placements"
    base_val = steps.validation_scores(bench, bench.model)
    assert base_val.kl == 0.0, "the base model's KL against itself"


def test_rerun_resumes_without_recomputing(first_run: tuple[Path, dict]) -> None:
    out, results = first_run
    before = {p: p.stat().st_mtime_ns for p in (out / "stages").rglob("stage.json")}
    again = run_study(_config(zero_shot_tasks=("rc_arithmetic",)), out, progress=False).to_dict()
    after = {p: p.stat().st_mtime_ns for p in (out / "stages").rglob("stage.json")}
    assert before == after, "a rerun with the same settings must not redo any stage"
    assert again["variants"] == results["variants"], "a resumed run reports the same results"
    assert again["timings"]["stage_seconds_all_runs"] == results["timings"]["stage_seconds_all_runs"], (
        "a resumed run reports the compute time of the stages it reused, not only its own"
    )
    assert again["reproduce"]["packages"]["torch"], "the versions that computed the results are recorded"


def test_changed_settings_invalidate_exactly_their_dependants(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _config(methods=("magnitude",))
    run_study(cfg, out, progress=False)
    keys = _stage_keys(out)

    run_study(replace(cfg, aird=AirdConfig(alpha_attn=0.05, alpha_mlp=0.01)), out, progress=False)
    changed = {k for k, v in _stage_keys(out).items() if keys.get(k) != v}
    must = {"magnitude/sweep", "magnitude+aird/extract", "magnitude+aird/mechanism", "eval/magnitude+aird"}
    assert must <= changed, (
        f"changing the paper's α must redo the sweep and the paper variant: {sorted(changed)}"
    )
    untouched = {
        "base/extract",
        "base/select",
        "magnitude/compress",
        "magnitude/extract",
        "eval/base",
        "eval/magnitude",
    }
    assert not (untouched & changed), f"unrelated stages were redone: {sorted(untouched & changed)}"

    keys = _stage_keys(out)
    run_study(replace(cfg, selection=SelectionConfig(kl_threshold=0.2)), out, progress=False)
    changed = {k for k, v in _stage_keys(out).items() if keys.get(k) != v}
    assert {"base/select", "magnitude/select"} <= changed, (
        f"a selection threshold must redo selection: {changed}"
    )
    assert "base/extract" not in changed
    assert "magnitude/compress" not in changed


def test_interrupted_study_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import refusal_core.bench as run_mod

    out = tmp_path / "run"
    cfg = _config(methods=("magnitude",))
    real = run_mod.over_refusal
    calls = {"n": 0}

    def dying(*args: object, **kw: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-stage")
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(run_mod, "over_refusal", dying)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, out, progress=False)
    done = _stage_keys(out)
    assert "eval/base" in done, f"stages done at the kill: {sorted(done)}"
    assert "eval/magnitude" not in done, f"stages done at the kill: {sorted(done)}"
    monkeypatch.setattr(run_mod, "over_refusal", real)
    stamp = (out / "stages" / "eval" / "base" / "stage.json").stat().st_mtime_ns
    results = run_study(cfg, out, progress=False).to_dict()
    assert (out / "stages" / "eval" / "base" / "stage.json").stat().st_mtime_ns == stamp, (
        "the stage finished before the kill is not redone"
    )
    assert [v["name"] for v in results["variants"]][-1] == "magnitude+aird-sparse*", (
        "the resumed run completes"
    )


def test_damaged_artifact_is_recomputed(first_run: tuple[Path, dict]) -> None:
    out, results = first_run
    cands = out / "stages" / "base" / "extract" / "candidates.safetensors"
    cands.write_bytes(b"not a safetensors file")
    again = run_study(_config(zero_shot_tasks=("rc_arithmetic",)), out, progress=False).to_dict()
    assert again["variants"][0]["source"] == results["variants"][0]["source"], "recomputed base source"
    assert cands.read_bytes()[:8] != b"not a sa", "the damaged artifact was rewritten"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"methods": ("wanda-3:4x",)}, "unknown compression method"),
        ({"methods": ()}, "methods is empty"),
        ({"n_train": 0}, "n_train"),
        ({"n_test": -3}, "n_test"),
        ({"harmful_train": "/nonexistent/prompts.csv"}, "/nonexistent/prompts.csv"),
        ({"model": "/nonexistent/model"}, "/nonexistent/model"),
    ],
)
def test_bad_input_is_reported_before_anything_is_written(tmp_path: Path, change: dict, needle: str) -> None:
    out = tmp_path / "run"
    with pytest.raises(RefusalCoreError) as info:
        run_study(_config(**change), out, progress=False)
    assert needle in str(info.value), f"error for {change} should name {needle!r}: {info.value}"
    assert not (out / "stages").exists() or not any((out / "stages").rglob("stage.json")), (
        "no stage may complete on bad input"
    )


def test_bad_input_keeps_existing_results(first_run: tuple[Path, dict]) -> None:
    out, _ = first_run
    before = (out / "results.json").read_bytes()
    with pytest.raises(InvalidArgumentError):
        run_study(_config(harmful_test="/nonexistent.jsonl"), out, progress=False)
    assert (out / "results.json").read_bytes() == before, "a failed run must not touch the previous results"


def test_filter_prompts_keeps_what_the_base_refuses_and_leaves_the_test_split(tmp_path: Path) -> None:
    from refusal_core.bench import Bench
    from refusal_core.functional import refusal_score
    from refusal_core.model import encode_prompts
    from refusal_core.selection import last_token_logits

    plain = Bench(_config(), tmp_path / "a")
    filt = Bench(_config(filter_prompts=True), tmp_path / "b")
    assert filt.prompts["harmful_test"] == plain.prompts["harmful_test"], "the test split is never filtered"
    assert filt.root_key != plain.root_key, "filtered prompts are part of every stage key"
    pad = plain.tokenizer.pad_token_id or 0
    for split, sign in (("harmful_train", 1), ("harmless_train", -1), ("harmful_val", 1)):
        kept = filt.prompts[split]
        assert set(kept) <= set(plain.prompts[split]), f"{split}: filtering only removes prompts"
        scores = refusal_score(
            last_token_logits(plain.model, encode_prompts(plain.tokenizer, plain.prompts[split]), pad),
            plain.refusal_ids,
        )
        expected = [p for p, s in zip(plain.prompts[split], scores.tolist()) if sign * s > 0]
        assert kept == expected, (
            f"{split}: kept prompts are those with refusal score sign {sign:+d}, in order"
        )


def test_validation_kl_is_base_against_the_variant(tmp_path: Path) -> None:
    """The repair rule's damage score is mean KL(base ‖ variant) of the last-token distribution on the
    harmless validation prompts: recomputed here from one unpadded forward pass per prompt."""
    from refusal_core import bench as steps

    run = steps.Bench(_config(methods=("magnitude",)), tmp_path / "run")
    compressed = steps.compress(run, "magnitude").model
    forward, reverse = [], []
    with torch.no_grad():
        for ids in run.encoded("harmless_val"):
            x = torch.tensor([ids])
            p = torch.log_softmax(run.model(input_ids=x).logits[0, -1].double(), -1)
            q = torch.log_softmax(compressed(input_ids=x).logits[0, -1].double(), -1)
            forward.append(float((p.exp() * (p - q)).sum()))
            reverse.append(float((q.exp() * (q - p)).sum()))
    want, other = sum(forward) / len(forward), sum(reverse) / len(reverse)
    assert abs(want - other) > 0.05 * want, f"fixture: KL nearly symmetric here ({want}, {other})"
    got = steps.validation_scores(run, compressed).kl
    assert got == pytest.approx(want, rel=1e-6), (
        f"validation KL {got}: KL(base‖variant) is {want}, KL(variant‖base) is {other}"
    )


def test_results_json_reads_back_as_typed_results(first_run: tuple[Path, dict]) -> None:
    """results.json → StudyResults → dict is the same JSON, and the typed fields carry its values."""
    from refusal_core.study import StudyResults

    out, _ = first_run
    on_disk = json.loads((out / "results.json").read_text())
    typed = StudyResults.from_dict(on_disk)
    assert json.loads(json.dumps(typed.to_dict())) == on_disk, "from_dict/to_dict lose or add something"
    rep = typed.variant("magnitude+aird")
    raw = _variant(on_disk, "magnitude+aird")
    assert rep.evaluation is not None, "a repaired variant is evaluated"
    assert rep.comparisons is not None, "a repaired variant has comparisons"
    assert rep.comparisons.vs_compressed is not None, (
        "a repaired variant is compared with its compressed model"
    )
    assert rep.evaluation.asr["vanilla"].k == raw["evaluation"]["asr"]["vanilla"]["k"]
    assert (
        rep.comparisons.vs_compressed.asr["vanilla"].p_value
        == raw["comparisons"]["vs_compressed"]["asr"]["vanilla"]["p_value"]
    )
