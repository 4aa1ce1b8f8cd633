"""The experiment's public steps (refusal_core.bench): placement of the repair, the default gain grid,
the attack registry read by the study's evaluation, and no private names across modules."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from refusal_core import bench as steps
from refusal_core.aird import AirdConfig
from refusal_core.errors import InvalidArgumentError
from refusal_core.evaluation.attacks import ATTACKS, AttackSpec, Completions, JudgedAttack, register_attack
from refusal_core.evaluation.generation import generate
from refusal_core.model import get_layout
from refusal_core.study import AttackSettings, RepairConfig, StudyConfig

PACKAGE = Path(steps.__file__).parent


def _small(**kw: Any) -> StudyConfig:
    base = StudyConfig(
        methods=(),
        n_train=8,
        n_val=4,
        n_test=4,
        n_calibration=4,
        noise_splits=2,
        zero_shot_tasks=(),
        max_new_tokens=4,
        batch_size=8,
        attacks=AttackSettings(names=("vanilla",)),
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> steps.Bench:
    return steps.Bench(_small(), tmp_path_factory.mktemp("bench"))


# ----------------------------------------------------------------------------
# placement
# ----------------------------------------------------------------------------


def _writers(model: torch.nn.Module, block: int) -> dict[str, torch.Tensor]:
    layout = get_layout(model)
    return {"o_proj": layout.attn_out(block).weight, "down_proj": layout.mlp_out(block).weight}


@pytest.mark.parametrize(("placement", "source", "edited"), [("into-source", 2, 1), ("source-block", 2, 2)])
def test_placement_edits_exactly_the_writers_of_its_block(
    bench: steps.Bench, placement: str, source: int, edited: int
) -> None:
    """into-source for source layer l edits block l−1's o_proj and down_proj by W + α r rᵀ W (checked
    against that formula written here), and nothing else; source-block edits block l."""
    torch.manual_seed(0)
    d = get_layout(bench.model).d_model
    r = torch.randn(d, dtype=torch.float64)
    gain = 3.0
    plan = steps.RepairPlan(AirdConfig(gain_attn=gain, gain_mlp=gain), (source,), placement)
    assert plan.edit_blocks == (edited,), f"{placement} at source {source} edits block {plan.edit_blocks}"
    before = {k: v.detach().clone() for k, v in bench.model.state_dict().items()}
    out, record = steps.repaired(bench, bench.model, r, plan)
    alpha = (gain - 1.0) / float(r @ r)  # gain along r̂ = 1 + α‖r‖² for the raw direction
    want = {}
    for name, w in _writers(bench.model, edited).items():
        w64 = w.detach().to(torch.float64)
        want[name] = (w64 + alpha * torch.outer(r, r) @ w64).to(w.dtype)
    got_writers = _writers(out, edited)
    for name, w in want.items():
        err = float((got_writers[name].detach().double() - w.double()).abs().max())
        assert err < 1e-6, f"{placement}: block {edited} {name} differs from W + α r rᵀ W by {err:.2e}"
    edited_names = {n for n, p in out.named_parameters() if any(p is w for w in got_writers.values())}
    assert len(edited_names) == 2, f"fixture: found the two writers by identity, got {edited_names}"
    for name, tensor in out.state_dict().items():
        if name not in edited_names:
            assert torch.equal(tensor, before[name]), f"{placement} at source {source} also changed {name}"
    assert record["layers"] == [edited], f"the record names the edited block: {record['layers']}"
    for name, tensor in bench.model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"repaired() changed the model it copied ({name})"


def test_into_source_at_layer_zero_does_not_exist(bench: steps.Bench) -> None:
    plan = steps.RepairPlan(AirdConfig(), (0,), "into-source")
    with pytest.raises(InvalidArgumentError, match="layer 0"):
        _ = plan.edit_blocks
    plans = steps.sweep_plans(_small(repair=RepairConfig(gains=(2.0,))), False, 0, 0)
    assert {p.placement for _, _, p in plans} == {"source-block"}, (
        "the sweep at source layer 0 leaves the into-source points out"
    )
    with pytest.raises(InvalidArgumentError, match="placement"):
        steps.RepairPlan(AirdConfig(), (1,), "into-the-void")
    with pytest.raises(InvalidArgumentError, match="placements"):
        RepairConfig(placements=("source-block", "source-block"))


def test_sweep_points_say_where_they_edited(bench: steps.Bench) -> None:
    """Each sweep point of the into-source placement edited block l−1 and reads back as such."""
    from refusal_core.study.sweep import SweepPoint

    plans = steps.sweep_plans(_small(repair=RepairConfig(gains=(2.0,))), True, 3, 3)
    assert [(s, p.placement, p.edit_blocks) for s, _, p in plans] == [
        ("paper", "source-block", (3,)),
        ("gain", "source-block", (3,)),
        ("paper", "into-source", (2,)),
        ("gain", "into-source", (2,)),
    ], "grid order: placement-major, then the paper's α and the gains"
    assert all(p.config.preserve_sparsity for _, _, p in plans), "the sparse arm preserves sparsity"
    scores = steps.validation_scores(bench, bench.model)
    point = SweepPoint("gain", False, "base", (2,), (2.0, 2.0), (0.1, 0.1), scores, edit="into-source")
    again = SweepPoint.from_dict(point.to_dict())
    assert again == point, "a sweep point reads back as written"
    assert again.source_layers == (3,), "an into-source point repairs layer l = block + 1"
    assert steps.point_plan(again, AirdConfig()).edit_blocks == (2,), "a chosen point edits its own block"
    legacy = {k: v for k, v in point.to_dict().items() if k != "edit"}
    assert SweepPoint.from_dict(legacy).edit == "source-block", "sweep files from before placement load"


# ----------------------------------------------------------------------------
# the gain grid
# ----------------------------------------------------------------------------


def test_default_grid_reaches_the_gains_of_the_papers_alpha() -> None:
    """α = 0.02 is a gain of about 3 (gemma-2b-it, ‖r‖ = 10.06) and 15 (qwen-1.8b-chat, ‖r‖ = 26.3)."""
    gains = RepairConfig().gains
    for norm in (10.06, 26.3):
        g = 1 + 0.02 * norm**2
        assert min(gains) < g <= max(gains) * 1.03, f"the grid {gains} does not reach the gain {g:.2f}"
    assert {1.25, 1.5, 2.0, 3.0, 5.0} <= set(gains), "the old grid points stay in the grid"
    assert list(gains) == sorted(gains), "gains in increasing order (ties of the rule go to the weakest)"
    assert RepairConfig().placements == ("source-block", "into-source"), "both placements by default"
    plans = steps.sweep_plans(StudyConfig(), False, 2, 2)
    assert len(plans) == 2 * (1 + len(gains)), "every gain and the paper's α at both placements"


# ----------------------------------------------------------------------------
# the attack registry
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ShoutAttack(JudgedAttack):
    """A new attack: the prompt in capitals, greedy. It declares no shared prefill."""

    max_new_tokens: int = 4
    batch_size: int = 8

    @property
    def name(self) -> str:
        return "shout"

    def completions(
        self, model: Any, tokenizer: Any, instructions: list[str], *, progress: bool, cache: Any
    ) -> tuple[list[Completions], None]:
        upper = [i.upper() for i in instructions]
        texts = generate(
            model,
            tokenizer,
            upper,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            progress=False,
        )
        n = len(instructions)
        return [Completions("shout", list(range(n)), [{"shout": True}] * n, texts)], None


@pytest.fixture
def shout() -> Iterator[AttackSpec]:
    spec = AttackSpec(
        "shout",
        lambda s, *, max_new_tokens, batch_size, seed: _ShoutAttack(max_new_tokens, batch_size),
        shares_prefill=False,
    )
    register_attack(spec)
    try:
        yield spec
    finally:
        del ATTACKS["shout"]


def test_a_registered_attack_runs_in_the_studys_evaluation(shout: AttackSpec, tmp_path: Path) -> None:
    from refusal_core.evaluation.judges import SubstringJudge

    cfg = _small(attacks=AttackSettings(names=("vanilla", "shout", "decoding")))
    b = steps.Bench(cfg, tmp_path / "run")
    ev, _ = steps.evaluate(b, "base", b.model, [])
    assert list(ev["jailbroken"]) == ["vanilla", "shout", "decoding"], (
        f"attacks run: {list(ev['jailbroken'])}"
    )
    direct = _ShoutAttack(cfg.max_new_tokens, cfg.batch_size).run(
        b.model, b.tokenizer, b.prompts["harmful_test"], SubstringJudge(), progress=False
    )
    assert ev["jailbroken"]["shout"] == [r.jailbroken for r in direct.records], (
        "the study's evaluation of the registered attack differs from running it alone"
    )
    assert (tmp_path / "run" / "stages" / "eval" / "base" / "asr_shout.json").is_file()
    with pytest.raises(InvalidArgumentError, match="already registered"):
        register_attack(shout)


def test_a_registered_attack_runs_in_the_evaluate_command(shout: AttackSpec, tmp_path: Path) -> None:
    import json

    from refusal_core.cli import main

    out = tmp_path / "e"
    argv = ["evaluate", "--model", "toy", "--n-test", "2", "--max-new-tokens", "3", "--out", str(out)]
    assert main([*argv, "--attacks", "vanilla,shout", "--no-progress"]) == 0, "evaluate with a new attack"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["asr"]) == {"vanilla", "shout"}, f"attacks evaluated: {sorted(summary['asr'])}"
    assert summary["asr"]["shout"]["n"] == 2, "the new attack's rate carries its n"


def test_unknown_attack_names_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown attack"):
        AttackSettings(names=("vanilla", "telepathy"))
    with pytest.raises(InvalidArgumentError, match="repeat"):
        AttackSettings(names=("vanilla", "vanilla"))


# ----------------------------------------------------------------------------
# module boundaries
# ----------------------------------------------------------------------------


#: The experiment layer: the modules that run the steps (the rest of the package is below them).
EXPERIMENT_LAYER = ("bench.py", "audit.py", "cli.py", "study")


def _is_module(module: str, name: str) -> bool:
    """Whether ``from module import name`` imports a submodule (a private module is the package's own)."""
    d = PACKAGE.joinpath(*module.split(".")[1:])
    return (d / f"{name}.py").is_file() or (d / name / "__init__.py").is_file()


def test_the_experiment_layer_imports_no_private_names() -> None:
    """``from refusal_core.x import _name`` across modules hides coupling (the audit once imported the
    study's ``_Run`` and ``_point_config``)."""
    offenders = []
    paths = [
        p
        for top in EXPERIMENT_LAYER
        for p in sorted(PACKAGE.glob(top if top.endswith(".py") else f"{top}/*.py"))
    ]
    assert len(paths) >= 8, f"fixture: found only {paths}"
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("refusal_core"):
                module = node.module or ""
                private = [
                    a.name
                    for a in node.names
                    if a.name.startswith("_")
                    and not a.name.startswith("__")
                    and not _is_module(module, a.name)
                ]
                if private:
                    offenders.append(f"{path.relative_to(PACKAGE)}: from {module} import {private}")
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


# ----------------------------------------------------------------------------
# the sweep edits the compressed model in place and undoes every point
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "llm-int8"])
def test_sweep_scores_equal_a_repaired_copy_and_leave_the_model_as_it_was(
    tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every sweep point (edited in place, then restored) scores exactly what a repaired deep copy of
    the compressed model scores with the same plan (generation included, so a memo keyed on a stale
    model state would show), and after the sweep, or a sweep that raised half way, the compressed
    model is bit for bit what it was, its module types included."""
    from refusal_core.compression import compress_, method_config
    from refusal_core.compression.calibration_sets import calibration_token_ids
    from refusal_core.model.identity import weights_sha256

    cfg = _small(repair=RepairConfig(gains=(2.0, 8.0)))
    b = steps.Bench(cfg, tmp_path / "b")
    base = steps.base_direction(b)
    model = b.compression_base()
    calibration = calibration_token_ids(b.tokenizer, cfg.calibration, cfg.n_calibration)
    compress_(model, method_config(method), calibration, batch_size=8)
    model = b.to_study_dtype(model)
    sparse = steps.is_pruning(method)
    types = [type(m) for m in model.modules()]
    digest = weights_sha256(model)
    points = steps.sweep(b, method, model, base, base.layer, ["k"], sparse_arm=sparse, method=method)
    assert weights_sha256(model) == digest, "the sweep left an edit in the compressed model"
    assert [type(m) for m in model.modules()] == types, "the sweep left a module replaced"
    arms = (False, True) if sparse else (False,)
    plans = [p for s in arms for _, _, p in steps.sweep_plans(cfg, s, base.layer, base.layer)]
    assert len(points) == len(plans) + 1 >= 5, "one point per plan after the unedited model"
    for point, plan in zip(points[1:], plans, strict=True):
        copy, _ = steps.repaired(b, model, base.r, plan, method=method)
        want = steps.validation_scores(b, copy)
        assert point.scores == want, f"{method} {plan}: in-place sweep {point.scores} != copy {want}"
    assert weights_sha256(model) == digest, "fixture: repaired() copies"

    calls = {"n": 0}
    real_scores = steps.validation_scores

    def failing(bench: steps.Bench, m: torch.nn.Module) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # the second edited point, mid-edit
            raise RuntimeError("interrupted")
        return real_scores(bench, m)

    monkeypatch.setattr(steps, "validation_scores", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        steps.sweep(b, f"{method}-again", model, base, base.layer, ["k2"], sparse_arm=sparse, method=method)
    assert weights_sha256(model) == digest, "a sweep that raised left its edit in the model"
    assert [type(m) for m in model.modules()] == types
