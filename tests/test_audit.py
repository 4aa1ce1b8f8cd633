"""``refusal-core audit``: a compressed checkpoint made elsewhere, against its base.

Candidates are made in the tests by the real tools: ``refusal-core compress``
(Wanda, a checkpoint this tool wrote), transformers + bitsandbytes
(``BitsAndBytesConfig(load_in_8bit=True)`` then ``save_pretrained``) and a
GGUF file written with the ``gguf`` package. The mechanism numbers are checked
against an independent computation with the BASE direction, on a candidate
whose own direction is far from the base's (early layers orthogonalized against
it), so an audit that measured the candidate's own direction would fail.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from refusal_core.aird import AirdConfig, apply_aird_
from refusal_core.audit import AUDIT_FILE, AuditConfig, audit
from refusal_core.checkpoint import save_checkpoint
from refusal_core.cli import main
from refusal_core.directions import DirectionCandidates
from refusal_core.errors import IncompatibleModelsError, InvalidArgumentError
from refusal_core.evaluation.generation import generate
from refusal_core.evaluation.judges import SubstringJudge, classify
from refusal_core.interventions import ablation_hooks, addition_hooks
from refusal_core.model import get_layout, load_model, model_identity
from refusal_core.prompts import load_prompts
from refusal_core.selection import SelectionConfig, SelectionResult
from refusal_core.study import DEFAULT_METHODS
from refusal_core.toy import toy_refusal_token_ids

SMALL = ["--n-train", "32", "--n-val", "8", "--n-test", "8", "--max-new-tokens", "12", "--no-progress"]


def _strict_json(path: Path) -> dict[str, Any]:
    def no_constant(name: str) -> None:
        raise AssertionError(f"{path} holds {name}: strict JSON parsers reject it")

    return dict(json.loads(path.read_text(), parse_constant=no_constant))


def _check_rate(r: dict[str, Any], n: int, where: str) -> None:
    assert r["n"] == n, f"{where}: n = {r['n']}, expected {n}"
    assert 0 <= r["low"] <= r["value"] <= r["high"] <= 1, f"{where}: interval {r} does not hold its value"
    assert r["value"] == pytest.approx(r["k"] / n), f"{where}: value is not k/n in {r}"


def _base_direction(out: Path) -> tuple[torch.Tensor, int]:
    stages = out / "stages"
    cands = DirectionCandidates.load(stages / "base" / "extract" / "candidates")
    sel = SelectionResult.load(stages / "base" / "select" / "selection")
    layer, pi = sel.source
    return cands.directions[layer, pi], layer


@pytest.fixture(scope="module")
def wanda_audit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy against a Wanda checkpoint written by ``refusal-core compress``, audited with --repair."""
    d = tmp_path_factory.mktemp("wanda_audit")
    assert (
        main(["compress", "--model", "toy", "--method", "wanda", "--out", str(d / "wanda"), "--no-progress"])
        == 0
    )
    rc = main(
        [
            "audit",
            "--base",
            "toy",
            "--compressed",
            str(d / "wanda"),
            "--repair",
            "--out",
            str(d / "a"),
            *SMALL,
        ]
    )
    assert rc == 0, "audit of the toy against its Wanda checkpoint failed"
    return d / "a"


def test_audit_of_a_wanda_checkpoint_reports_rates_with_intervals_and_tests(wanda_audit: Path) -> None:
    doc = _strict_json(wanda_audit / AUDIT_FILE)
    assert (wanda_audit / "report.md").read_text().startswith("# Audit:")
    assert doc["identities"]["base"]["fingerprint"] != doc["identities"]["candidate"]["fingerprint"]
    for model in ("base", "candidate"):
        for key in ("refusal_rate_harmful", "necessity", "sufficiency"):
            _check_rate(doc["mechanism"][model][key], 8, f"mechanism {model} {key}")
        ev = doc["evaluation"][model]
        assert set(ev["asr"]) == {"vanilla", "vanilla_system", "decoding"}, (
            f"attacks of {model}: {set(ev['asr'])}"
        )
        for name, r in ev["asr"].items():
            _check_rate(r, 8, f"ASR {name} of {model}")
        _check_rate(ev["over_refusal"], 8, f"over-refusal of {model}")
    assert doc["evaluation"]["base"]["damage"]["kl_mean"] == pytest.approx(0.0, abs=1e-9)
    assert doc["evaluation"]["candidate"]["damage"]["kl_mean"] > 1e-4, (
        "Wanda 50 % left the toy's outputs unchanged?"
    )
    cmp = doc["comparisons"]["candidate_vs_base"]
    assert set(cmp["asr"]) == {"vanilla", "vanilla_system", "decoding"}
    assert all(0 <= t["p_value"] <= 1 for t in [*cmp["asr"].values(), cmp["over_refusal"]])
    c = doc["candidate"]
    assert -1 <= c["cosine_at_base_source"] <= 1, c
    assert c["noise_floor_at_base_source"] is not None, c
    assert c["above_noise_floor"] == (c["cosine_at_base_source"] > c["noise_floor_at_base_source"])


def test_repair_is_aird_with_the_base_direction_saved_as_a_loadable_checkpoint(wanda_audit: Path) -> None:
    from transformers import AutoModelForCausalLM

    doc = _strict_json(wanda_audit / AUDIT_FILE)
    rep = doc["repair"]
    r, layer = _base_direction(wanda_audit)
    assert rep["layer"] == layer == doc["base"]["source"][0]
    repaired = AutoModelForCausalLM.from_pretrained(rep["checkpoint"], local_files_only=True)
    candidate, _ = load_model(doc["settings"]["compressed"])
    lr, lc = get_layout(repaired), get_layout(candidate)
    u = (r / r.norm()).to(torch.float64)
    for i, (name, get) in enumerate((("o_proj", lr.attn_out), ("down_proj", lr.mlp_out))):
        w = (lc.attn_out if name == "o_proj" else lc.mlp_out)(layer).weight.detach().double()
        delta = get(layer).weight.detach().double() - w
        assert delta.norm() > 0, f"the repair left {name} of layer {layer} unchanged"
        # AIRD with the base direction, W + (g - 1) u uᵀ W, on the candidate's nonzero entries only
        # (a Wanda candidate keeps its zeros); float32 storage rounds W' at ~1e-7 of ||W||, another
        # direction (cosine 0.93) leaves ~0.4
        expected = (rep["gains"][i] - 1.0) * torch.outer(u, u @ w) * (w != 0)
        off = delta - expected
        assert off.norm() <= 1e-3 * delta.norm(), (
            f"{name} update is not the base direction's AIRD on the kept entries: "
            f"{float(off.norm()):.3g} of {float(delta.norm()):.3g}"
        )
    for other in range(lr.n_layers):
        if other != layer:
            assert torch.equal(lr.attn_out(other).weight, lc.attn_out(other).weight), f"layer {other} edited"
    _check_rate(rep["evaluation"]["over_refusal"], 8, "over-refusal of the repaired model")
    assert set(rep["comparisons"]["vs_candidate"]["asr"]) == {"vanilla", "vanilla_system", "decoding"}


def test_repair_keeps_the_wanda_candidates_zeros_and_records_its_method(wanda_audit: Path) -> None:
    """``audit --repair`` repairs through the one repair step with the method the candidate's record
    names: a pruned candidate keeps its zero pattern (the repair used to be the plain dense edit,
    method None, which filled the source layer's zeros)."""
    from refusal_core.saving import read_checkpoint_record

    doc = _strict_json(wanda_audit / AUDIT_FILE)
    rep = doc["repair"]
    repaired, _ = load_model(rep["checkpoint"])
    candidate, _ = load_model(doc["settings"]["compressed"])
    lr, lc = get_layout(repaired), get_layout(candidate)
    for layer in range(lc.n_layers):
        for name, w in lc.linears(layer).items():
            kept = lr.linears(layer)[name].weight == 0
            before = int((w.weight == 0).sum())
            assert torch.equal(kept, w.weight == 0), (
                f"layers.{layer}.{name}: zeros {int(kept.sum())} after the repair, {before} before "
                "(the repair must keep the Wanda candidate's zero pattern)"
            )
    assert (rep["method"], rep["rules"]) == ("wanda", ["keep-zeros"]), (
        f"the repair's method and rule: {rep['method']!r}, {rep['rules']}"
    )
    chosen = (rep["choice"] or {}).get("chosen", {"strength": "identity"})
    assert chosen["strength"] == "identity" or chosen["sparse"], f"a dense-arm strength was chosen: {chosen}"
    record = read_checkpoint_record(rep["checkpoint"])
    assert record is not None, "the repaired checkpoint has no record"
    assert record["method"] == "wanda+aird", f"recorded method {record['method']!r}"
    assert record["settings"]["compression"]["config"]["sparsity"] == 0.5, "the candidate's exact config"


def test_repair_of_an_awq_candidate_stays_on_its_grid(tmp_path: Path) -> None:
    """An AWQ-w4 candidate repaired by ``audit --repair-gain`` is put back on its 4-bit group grid
    (at most 16 values per group of 128 inputs in the edited writers) and saved as what it is, a
    dequantized simulation (the repair used to be the plain dense edit: up to 128 values a group)."""
    from refusal_core.repair import group_levels
    from refusal_core.saving import read_checkpoint_record

    ckpt = str(tmp_path / "awq")
    assert main(["compress", "--model", "toy", "--method", "awq-w4", "--out", ckpt, "--no-progress"]) == 0
    argv = [
        "audit",
        "--base",
        "toy",
        "--compressed",
        ckpt,
        "--repair-gain",
        "3",
        "--out",
        str(tmp_path / "a"),
    ]
    assert main([*argv, *SMALL]) == 0, "audit --repair-gain of an AWQ checkpoint failed"
    rep = _strict_json(tmp_path / "a" / AUDIT_FILE)["repair"]
    repaired, _ = load_model(rep["checkpoint"])
    layout = get_layout(repaired)
    for name, get in (("o_proj", layout.attn_out), ("down_proj", layout.mlp_out)):
        w = get(rep["layer"]).weight
        levels = group_levels(w, min(128, int(w.shape[1])))
        assert levels <= 16, f"{name} of layer {rep['layer']}: {levels} values in a group, the grid has 16"
    assert (rep["method"], rep["rules"]) == ("awq-w4", ["weight-groups"]), (rep["method"], rep["rules"])
    record = read_checkpoint_record(rep["checkpoint"])
    assert record is not None, "the repaired checkpoint has no record"
    assert (record["format"], record["method"]) == ("dequantized-simulation", "awq-w4+aird"), record


def test_audit_measures_the_base_direction_on_the_candidate(wanda_audit: Path, tmp_path: Path) -> None:
    """Necessity and sufficiency use the BASE direction at the base source layer.

    The candidate has its layers below the base source orthogonalized against the base direction
    (AIRD with gain 0), so its own direction there is far from the base's; the audit's counts must
    equal those computed here with the base direction.
    """
    r, layer = _base_direction(wanda_audit)
    model, tok = load_model("toy")
    base_identity = model_identity(model)
    for below in range(layer):
        apply_aird_(model, r, below, AirdConfig(gain_attn=0.0, gain_mlp=0.0))
    cand_dir = save_checkpoint(
        model, tok, tmp_path / "ortho", record={"method": "ortho-early"}, base_identity=base_identity
    )
    cfg = AuditConfig(base="toy", compressed=str(cand_dir), n_train=32, n_val=8, n_test=8, max_new_tokens=12)
    res = audit(cfg, tmp_path / "a", progress=False)
    assert res.candidate["cosine_at_base_source"] < 0.9, (
        "the test's candidate should have moved its direction"
    )
    harmful, harmless = load_prompts("harmful_test")[:8], load_prompts("harmless_test")[:8]
    judge = SubstringJudge(min_words=1)

    def refused(prompts: list[str], completions: list[str]) -> int:
        return sum(v == "refused" for v in classify(judge, prompts, completions))

    rm = r.to(torch.float32)
    with ablation_hooks(model, rm):
        k_abl = refused(
            harmful, generate(model, tok, harmful, max_new_tokens=12, batch_size=32, progress=False)
        )
    with addition_hooks(model, rm, 1.0, layer):
        k_add = refused(
            harmless, generate(model, tok, harmless, max_new_tokens=12, batch_size=32, progress=False)
        )
    mech = res.mechanism["candidate"]
    assert (mech["necessity"]["k"], mech["sufficiency"]["k"]) == (k_abl, k_add), (
        f"audit's necessity/sufficiency counts {mech['necessity']['k']}/{mech['sufficiency']['k']} are not "
        f"those of the base direction at layer {layer} on the candidate ({k_abl}/{k_add})"
    )


def test_audit_of_a_bitsandbytes_int8_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model, tok = load_model("toy")
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    q = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "base"), quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    q.save_pretrained(tmp_path / "int8")
    tok.save_pretrained(tmp_path / "int8")
    assert "quantization_config" in json.loads((tmp_path / "int8" / "config.json").read_text())
    cfg = AuditConfig(
        base=str(tmp_path / "base"),
        compressed=str(tmp_path / "int8"),
        n_train=32,
        n_val=8,
        n_test=8,
        max_new_tokens=12,
        refusal_token_ids=tuple(toy_refusal_token_ids()),
    )
    # transformers cannot save a model it loaded through its quantizer: a repair is refused up front
    with pytest.raises(InvalidArgumentError, match="cannot save such a model again"):
        audit(replace(cfg, repair=True), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    audit(cfg, tmp_path / "a", progress=False)
    doc = _strict_json(tmp_path / "a" / AUDIT_FILE)
    assert doc["candidate"]["cosine_at_base_source"] > 0.99, "int8 should keep the toy's direction"
    assert 0 < doc["evaluation"]["candidate"]["damage"]["kl_mean"] < 0.05
    assert doc["repair"] is None


def test_audit_of_a_gguf_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_gguf_cache import write_tiny_gguf

    monkeypatch.setenv("REFUSAL_CORE_CACHE", str(tmp_path / "cache"))
    original, tok = write_tiny_gguf(tmp_path / "tiny.gguf", seed=3)
    original.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    cfg = AuditConfig(
        base=str(tmp_path / "base"),
        compressed=str(tmp_path / "tiny.gguf"),
        n_train=16,
        n_val=4,
        n_test=4,
        selection=SelectionConfig(max_layer_fraction=1.0),  # a 2-block model: keep the last block
    )
    res = audit(cfg, tmp_path / "a", progress=False)
    doc = _strict_json(tmp_path / "a" / AUDIT_FILE)
    assert doc["compatibility"]["layout"] == "qwen2"
    # a float32 GGUF holds the same weights: the same direction, no damage
    assert res.candidate["cosine_at_base_source"] == pytest.approx(1.0, abs=1e-6)
    assert res.candidate["source_shift"] == [0, 0]
    assert doc["evaluation"]["candidate"]["damage"]["kl_mean"] == pytest.approx(0.0, abs=1e-6)


def test_a_different_architecture_is_refused_before_the_out_dir_exists(tmp_path: Path, capsys: Any) -> None:
    from refusal_core.testing.tiny import tiny_model, tiny_tokenizer

    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    out = tmp_path / "out" / "audit"
    rc = main(["audit", "--base", "toy", "--compressed", str(tmp_path / "tiny"), "--out", str(out), *SMALL])
    assert rc == 2
    err = capsys.readouterr().err
    assert "share a tokenizer and an architecture" in err, err
    assert "d_model" in err, err
    assert not (tmp_path / "out").exists(), "a refused audit left its output directory behind"


def test_a_different_chat_template_is_refused_before_the_out_dir_exists(tmp_path: Path) -> None:
    model, tok = load_model("toy")
    tok.chat_template = tok.chat_template.replace("assistant", "helper")
    model.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    with pytest.raises(IncompatibleModelsError, match="chat templates differ"):
        audit(AuditConfig(base="toy", compressed=str(tmp_path / "other")), tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()


def test_study_takes_a_judge_and_refuses_a_bad_one(tmp_path: Path, capsys: Any) -> None:
    from refusal_core.study import StudyConfig

    assert StudyConfig().judge == "substring"
    with pytest.raises(InvalidArgumentError, match="judge must be"):
        StudyConfig(judge="llamaguard")
    out = tmp_path / "run"
    rc = main(["study", "--judge", f"classifier:{tmp_path / 'missing'}", "--out", str(out), "--no-progress"])
    assert rc == 2
    assert "is not a model directory" in capsys.readouterr().err
    assert not out.exists(), "a refused study left its run directory behind"


@pytest.mark.slow
@pytest.mark.parametrize("method", DEFAULT_METHODS)
def test_audit_repair_keeps_every_default_methods_storage(method: str, tmp_path: Path) -> None:
    """``audit --repair-gain`` on a checkpoint of each default method keeps that method's storage:
    the zeros of a pruned candidate, the group grid of an AWQ one, the int8 modules of LLM.int8
    (the per-method checks of the one repair step are tests/test_repair.py's; this is the audit's
    route to it, through the candidate's checkpoint record). About 30 s a method on a CPU."""
    from refusal_core.compression import method_config, method_spec
    from refusal_core.model.simulated import Int8LinearSim
    from refusal_core.repair import group_levels

    ckpt = str(tmp_path / method)
    assert main(["compress", "--model", "toy", "--method", method, "--out", ckpt, "--no-progress"]) == 0
    argv = [
        "audit",
        "--base",
        "toy",
        "--compressed",
        ckpt,
        "--repair-gain",
        "2",
        "--out",
        str(tmp_path / "a"),
    ]
    assert main([*argv, *SMALL]) == 0, f"audit --repair-gain of a {method} checkpoint failed"
    rep = _strict_json(tmp_path / "a" / AUDIT_FILE)["repair"]
    assert rep["method"] == method, f"the repair did not read the candidate's method: {rep['method']!r}"
    repaired, _ = load_model(rep["checkpoint"])
    candidate, _ = load_model(ckpt)
    lr, lc = get_layout(repaired), get_layout(candidate)
    spec, config = method_spec(method), method_config(method)
    for name in ("o_proj", "down_proj"):
        after, before = lr.linears(rep["layer"])[name], lc.linears(rep["layer"])[name]
        if spec.prunes:
            assert torch.equal(after.weight == 0, before.weight == 0), f"{method}: {name} lost its zeros"
        elif isinstance(before, Int8LinearSim):
            assert isinstance(after, Int8LinearSim), f"{method}: {name} is {type(after).__name__} after"
            assert not torch.equal(after.q, before.q), f"{method}: {name}'s int8 codes were not edited"
        else:
            w_bit, group = int(config.w_bit), int(config.group_size)
            levels = group_levels(after.weight, min(group, int(after.weight.shape[1])))
            assert levels <= 2**w_bit, f"{method}: {name} has {levels} values in a group (> 2^{w_bit})"
