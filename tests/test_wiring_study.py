"""Wiring of the study and the audit: what keys a stage, which way a comparison runs, which AIRD
config a sweep point applies (issue 20's surviving mutants; /work/notes/wiring.md lists them).

The study checks use the experiment engine's public steps (:class:`~refusal_core.bench.Bench`'s
``root_key``, the ``mechanism`` step, ``sweep_plans`` and ``point_plan``): a whole study per changed
setting would cost minutes, these cost seconds. The audit check runs the public :func:`audit`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from refusal_core.aird import AirdConfig
from refusal_core.audit import AuditConfig, audit
from refusal_core.bench import Bench, point_plan, sweep_plans
from refusal_core.bench import mechanism as mechanism_step
from refusal_core.checkpoint import save_checkpoint
from refusal_core.compression import compress_, method_config
from refusal_core.model import load_model, model_identity
from refusal_core.stats import rate
from refusal_core.study.config import RepairConfig, StudyConfig
from refusal_core.study.sweep import SweepPoint, ValidationScores


def _Run(config: StudyConfig, out: Path, progress: bool) -> Bench:
    return Bench(config, out, progress=progress)


def _sweep_configs(bench: Bench, sparse: bool, base_layer: int, own_layer: int) -> list[tuple]:
    """(strength, layer choice, placement, AIRD config) of every sweep point of one arm."""
    return [
        (s, p, plan.placement, plan.config)
        for s, p, plan in sweep_plans(bench.config, sparse, base_layer, own_layer)
    ]


def _point_config(point: SweepPoint, paper: AirdConfig) -> AirdConfig:
    return point_plan(point, paper).config


def _config(**kw: object) -> StudyConfig:
    base = StudyConfig(
        model="toy",
        methods=("magnitude",),
        n_train=4,
        n_val=2,
        n_test=2,
        n_calibration=2,
        zero_shot_tasks=(),
        max_new_tokens=2,
        batch_size=8,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_the_root_key_changes_with_the_refusal_token_ids(tmp_path: Path) -> None:
    """Every stage's key chains the root key; refusal scores (selection, filters) depend on the
    refusal token ids, so two runs differing only in them must share no stage."""
    a = _Run(_config(refusal_token_ids=(5, 6)), tmp_path / "a", False)
    b = _Run(_config(refusal_token_ids=(5, 7)), tmp_path / "b", False)
    same = _Run(_config(refusal_token_ids=(5, 6)), tmp_path / "c", False)
    assert a.root_key == same.root_key, "the root key must be reproducible for the same settings"
    assert a.root_key != b.root_key, (
        "refusal token ids (5, 6) and (5, 7) give the same root key: selection results scored with "
        "one set would be reused for the other"
    )


@pytest.mark.parametrize("change", [{"max_new_tokens": 3}, {"seed": 1}])
def test_the_mechanism_stage_is_redone_when_its_generations_would_differ(
    change: dict[str, object], tmp_path: Path
) -> None:
    """The mechanism stage generates completions: a new token budget (or seed) must not reuse the
    completions' flags of the old one."""
    out = tmp_path / "run"
    first = _Run(_config(), out, False)
    r = torch.randn(first.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    mechanism_step(first, "base", first.model, r, 1, ["up"])
    k1 = first.store.recorded_key("base/mechanism")
    again = _Run(_config(), out, False)
    mechanism_step(again, "base", again.model, r, 1, ["up"])
    assert again.store.recorded_key("base/mechanism") == k1, "the same settings must reuse the stage"
    changed = _Run(_config(**change), out, False)
    mechanism_step(changed, "base", changed.model, r, 1, ["up"])
    assert changed.store.recorded_key("base/mechanism") != k1, (
        f"mechanism stage kept its key after {change}: stale completions' flags would be reused"
    )


def test_every_point_of_the_sparse_arm_preserves_sparsity(tmp_path: Path) -> None:
    """The sparse arm's points, the paper's α among them, are all applied sparsity-preserving (and the
    dense arm's none), both where the sweep builds them and where a chosen point is re-applied."""
    run = _Run(_config(repair=RepairConfig(gains=(2.0,), layers=("base", "own"))), tmp_path / "run", False)
    paper = run.config.aird
    for sparse in (False, True):
        configs = _sweep_configs(run, sparse, 1, 2)
        strengths = {s for s, *_ in configs}
        assert strengths == {"paper", "gain"}, f"fixture: the sweep has paper and gain points ({strengths})"
        wrong = [(s, p, cfg) for s, p, _, cfg in configs if cfg.preserve_sparsity != sparse]
        assert not wrong, f"sweep_plans(sparse={sparse}): points with preserve_sparsity != {sparse}: {wrong}"
        for strength, gains in (("paper", (1.1, 1.05)), ("gain", (2.0, 2.0))):
            point = SweepPoint(
                strength=strength,
                sparse=sparse,
                placement="base",
                layers=(1,),
                gains=gains,
                alphas=(0.0, 0.0),
                scores=ValidationScores(rate(1, 2), rate(0, 2), 0.0, 0.0, 0.0, "generation"),
            )
            cfg = _point_config(point, paper)
            assert cfg.preserve_sparsity == sparse, (
                f"_point_config({strength}, sparse={sparse}): preserve_sparsity={cfg.preserve_sparsity}"
            )
            if strength == "paper":
                assert (cfg.alpha_attn, cfg.alpha_mlp) == (paper.alpha_attn, paper.alpha_mlp), (
                    f"the paper point must apply the paper's α, got {cfg}"
                )


def test_the_paper_point_is_the_configured_alpha_pair(tmp_path: Path) -> None:
    alphas = AirdConfig(alpha_attn=0.05, alpha_mlp=0.01)
    run = _Run(_config(aird=alphas, repair=RepairConfig(gains=(2.0,))), tmp_path / "run", False)
    paper = [
        cfg
        for s, _, placement, cfg in _sweep_configs(run, True, 1, 1)
        if s == "paper" and placement == "source-block"
    ]
    assert [(c.alpha_attn, c.alpha_mlp, c.preserve_sparsity) for c in paper] == [(0.05, 0.01, True)], (
        f"sparse arm's paper point: {paper}"
    )


# ----------------------------------------------------------------------------
# the audit: candidate against base, not the other way round
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audit_doc(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The toy against itself with 80 % magnitude pruning: its text degenerates, so its refusal
    rates differ from the base's (the orientation of a paired test is visible only then)."""
    d = tmp_path_factory.mktemp("wiring_audit")
    model, tok = load_model("toy")
    identity = model_identity(model)
    compress_(model, method_config("magnitude@0.8"))
    cand = save_checkpoint(
        model, tok, d / "pruned", record={"method": "magnitude@0.8"}, base_identity=identity
    )
    cfg = AuditConfig(base="toy", compressed=str(cand), n_train=16, n_val=4, n_test=8, max_new_tokens=8)
    return audit(cfg, d / "a", progress=False).to_dict()


_MECHANISM = {
    "refused_harmful": "refusal_rate_harmful",
    "refused_ablated": "necessity",
    "refused_added": "sufficiency",
}


def test_audit_compares_the_candidate_against_the_base(audit_doc: dict) -> None:
    """In every paired test ``before`` is the base's rate and ``after`` the candidate's; at least one
    rate of each kind differs between the two here, so a reversed test cannot pass."""
    differing = {"mechanism": 0, "evaluation": 0}
    mech = audit_doc["mechanism"]
    for flag, key in _MECHANISM.items():
        t, b, c = mech["candidate_vs_base"][flag], mech["base"][key], mech["candidate"][key]
        differing["mechanism"] += b["k"] != c["k"]
        assert (t["before"]["k"], t["after"]["k"]) == (b["k"], c["k"]), (
            f"audit mechanism {flag}: test before/after counts {t['before']['k']}/{t['after']['k']}, "
            f"expected base {b['k']} then candidate {c['k']}"
        )
        assert t["difference"] == pytest.approx((c["k"] - b["k"]) / c["n"]), f"{flag}: difference {t}"
    ev, cmp = audit_doc["evaluation"], audit_doc["comparisons"]["candidate_vs_base"]
    pairs = [(f"ASR {a}", t, ev["base"]["asr"][a], ev["candidate"]["asr"][a]) for a, t in cmp["asr"].items()]
    pairs.append(
        ("over-refusal", cmp["over_refusal"], ev["base"]["over_refusal"], ev["candidate"]["over_refusal"])
    )
    for what, t, b, c in pairs:
        differing["evaluation"] += b["k"] != c["k"]
        assert (t["before"]["k"], t["after"]["k"]) == (b["k"], c["k"]), (
            f"audit {what}: test before/after counts {t['before']['k']}/{t['after']['k']}, expected base "
            f"{b['k']} then candidate {c['k']}"
        )
    assert all(differing.values()), f"fixture: base and candidate must differ somewhere ({differing})"
