"""The study pipeline: does compression break the refusal direction, and does AIRD repair it?

Stages, each resumable (see :class:`~refusal_core.saving.StageStore`):

1. ``base/extract`` — candidate directions of the base model (difference in
   means at every block input × post-instruction position);
   ``base/select`` — bypass / induce / KL of every candidate and the selected
   source; the split-half noise floor per site comes from the extraction's own
   forward pass (saved beside the candidates);
   ``base/validation`` — the base model's validation scores (the reference of
   the repair rule).
2. For each compression method ``m``: ``m/compress`` (weights saved),
   ``m/extract``, ``m/select``, and ``m/mechanism`` (necessity and
   sufficiency of the compressed model's own direction).
3. Repair: ``m/sweep`` scores every AIRD strength of the sweep (the paper's α
   and the gains of :class:`~refusal_core.study.config.RepairConfig`) at every
   placement (the source block, or into the source: the block before it), dense
   and, for pruned models, sparsity-preserving, on VALIDATION prompts only, and
   picks one per arm by the documented rule. Three repaired variants are then
   built with the BASE direction (the paper's recipe): ``m+aird`` (the paper's
   α at the base source layer), ``m+aird*`` and, for pruned models,
   ``m+aird-sparse*`` (the chosen strengths). Each is re-extracted and
   re-selected (``v/extract``, ``v/select``, ``v/mechanism``): the mechanism
   after repair.
4. ``eval/<variant>`` — on the held-out test prompts: ASR per attack,
   over-refusal, capability damage (KL and cross-entropy against the base),
   zero-shot accuracy; every rate with its n and Wilson interval, every
   before/after pair with an exact McNemar test.
5. The report: ``results.json``, ``report.md`` and PNG plots; with
   ``save_checkpoints`` the paper-α and chosen repaired variants are saved as
   checkpoints ``from_pretrained`` loads (``checkpoints/<variant>/``).

Every stage is a public step of :mod:`refusal_core.bench` (the audit and the
command line run the same steps); this module only lists them in order and
assembles the typed results.

A stage's key hashes its own settings with its upstream keys, so changing
(say) the repair margins redoes only the choice and what depends on it.
Artifacts are written atomically before a stage is marked done; a killed run
redoes at most the stage it was in.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from refusal_core import bench as steps
from refusal_core.bench import (
    Analysis,
    BaseDirection,
    Bench,
    Compressed,
    RepairPlan,
    default_refusal_token_ids,
)
from refusal_core.checkpoint import read_checkpoint_record, save_checkpoint
from refusal_core.compression import check_methods_available, compress_, method_config
from refusal_core.compression.calibration_sets import calibration_token_ids
from refusal_core.errors import InvalidArgumentError
from refusal_core.model import load_model
from refusal_core.saving import atomic_write_json, settings_key
from refusal_core.selection import SelectionResult
from refusal_core.stats import finite_or_none, mcnemar
from refusal_core.study.config import StudyConfig
from refusal_core.study.report import write_study_report
from refusal_core.study.results import (
    MECHANISM_FLAGS,
    NOT_PAIRED_TESTABLE,
    AsrChange,
    BaseSummary,
    Comparison,
    Comparisons,
    EvaluationSummary,
    MechanismSummary,
    RepairSummary,
    StudyResults,
    SweepSummary,
    VariantResult,
)
from refusal_core.study.sweep import RepairChoice, ValidationScores

__all__ = ["default_refusal_token_ids", "load_variant_model", "run_study", "study_threads"]


@dataclass
class _Measured:
    """What the stages measured so far: per variant its model and upstream keys (for its
    evaluation), its mechanism flags (paired tests), its selection and per-layer cosines (plots)."""

    variants: list[VariantResult] = field(default_factory=list)
    models: dict[str, tuple[nn.Module, list[str]]] = field(default_factory=dict)
    flags: dict[str, dict[str, Any]] = field(default_factory=dict)
    selections: dict[str, SelectionResult] = field(default_factory=dict)
    cosine_by_layer: dict[str, list[float]] = field(default_factory=dict)
    sweeps: dict[str, SweepSummary] = field(default_factory=dict)
    #: the base direction's mechanism flags in each compressed model (``base_direction_mechanism``)
    base_direction_flags: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: variants already evaluated (their models released)
    evaluated: set[str] = field(default_factory=set)

    def analysed(self, name: str, model: nn.Module, upstream: list[str], analysis: Analysis) -> None:
        self.models[name] = (model, upstream)
        assert analysis.mechanism is not None
        self.flags[name] = analysis.mechanism
        self.selections[name] = analysis.selection
        self.cosine_by_layer[name] = analysis.cosine_by_layer


def run_study(config: StudyConfig, out_dir: Path, *, progress: bool = True) -> StudyResults:
    """Run (or resume) the study and write the report into ``out_dir``; returns results.json's content."""
    if not isinstance(config, StudyConfig):
        raise InvalidArgumentError(f"config must be a StudyConfig, got {type(config).__name__}")
    if not config.methods:
        raise InvalidArgumentError("methods is empty; name at least one compression method")
    check_methods_available(config.methods)  # a missing extra fails here, before any model is loaded
    t_start = time.perf_counter()
    bench = Bench(config, Path(out_dir), progress=progress)
    previous = torch.get_num_threads()
    torch.set_num_threads(study_threads(config))
    try:
        return _run_study(bench, t_start, progress)
    finally:
        torch.set_num_threads(previous)


def study_threads(config: StudyConfig) -> int:
    """The torch intra-op threads a study runs on: ``config.threads``, else torch's current setting."""
    return torch.get_num_threads() if config.threads is None else config.threads


def _run_study(bench: Bench, t_start: float, progress: bool) -> StudyResults:
    config = bench.config
    n_repaired = (
        sum(3 if steps.is_pruning(m) and config.repair.sparse else 2 for m in config.methods)
        if config.repairs
        else 0
    )
    # base: 2 + its evaluation; a method: 3 + its evaluation; a repaired variant: analysis + evaluation
    per_method = 4 if config.repairs else 3  # compressed, analysed, (swept), evaluated
    bar = tqdm(
        total=3 + per_method * len(config.methods) + 2 * n_repaired, desc="study", disable=not progress
    )

    def step(msg: str) -> None:
        bar.set_postfix_str(msg)
        bar.update(1)

    # 1. the base direction, its mechanism and its validation scores (the repair rule's reference)
    base = steps.base_direction(bench)
    step(f"base source l={base.layer} pos={base.position}")
    measured = _Measured()
    base_val = _measure_base(bench, base, measured)
    step("base mechanism")
    # 2. each compressed model and 3. its repairs; 4. each evaluated on the held-out test prompts
    # as soon as its method is done, then released: one method's models in memory at a time (a real
    # model's frontier held every level's until the end, 22 GB for three 1.5B levels)
    evals: dict[str, dict[str, Any]] = {}
    compressed: Compressed | None = None
    for method in config.methods:
        compressed = None  # the previous method's model goes with its variants
        _evaluate_pending(bench, measured, evals, step)
        compressed = steps.compress(bench, method)
        step(f"{method} compressed")
        own_layer = _measure_compressed(bench, base, compressed, measured)
        step(f"{method} analysed")
        if not config.repairs:
            continue
        refusal = steps.repair_refusal(compressed.model, base.layer, method)
        if refusal is not None:  # its storage cannot be kept through an edit: say so, edit nothing
            summary = RepairSummary("paper", f"repair refused: {refusal}", None, None, same_as=method)
            variant = VariantResult(f"{method}+aird", kind="repaired", method=method, repair=summary)
            measured.variants.append(variant)
            continue
        choices = _sweep_and_choose(bench, base, compressed, own_layer, base_val, measured)
        step(f"{method} swept")
        for name, arm, plan, how in _repair_plans(config, base, method, choices):
            _measure_repaired(bench, base, compressed, measured, name, arm, plan, how, choices)
            step(f"{name} analysed")
    compressed = None
    _evaluate_pending(bench, measured, evals, step)
    bar.close()
    # 5. results and report
    results = _results(bench, base, base_val, measured, evals, time.perf_counter() - t_start)
    write_study_report(
        bench.out,
        results,
        selections=measured.selections,
        cosine_by_layer=measured.cosine_by_layer,
        noise=base.noise,
        base_position_index=base.position_index,
    )
    return results


def _evaluate_pending(
    bench: Bench, measured: _Measured, evals: dict[str, dict[str, Any]], step: Callable[[str], None]
) -> None:
    """Evaluate every variant measured but not yet evaluated, in order, and drop its model (the
    base's stays with the bench); a variant that is its compressed model reads that evaluation."""
    for v in measured.variants:
        if v.name in measured.evaluated:
            continue
        if not v.same_as:
            model, upstream = measured.models.pop(v.name)
            evals[v.name], _ = steps.evaluate(bench, v.name, model, upstream)
            del model
        measured.evaluated.add(v.name)
        step(f"evaluated {v.name}")
    gc.collect()


def _measure_base(bench: Bench, base: BaseDirection, measured: _Measured) -> ValidationScores:
    """The base variant: its own direction's mechanism; returns its validation scores."""
    mech, _ = steps.mechanism(bench, "base", bench.model, base.r, base.layer, [base.key])
    measured.models["base"] = (bench.model, [base.key])
    measured.flags["base"] = mech
    measured.selections["base"] = base.selection
    measured.variants.append(
        VariantResult(
            name="base",
            kind="base",
            method=None,
            source=[base.layer, base.position],
            source_shift=[0, 0],
            cosine_at_base_source=1.0,
            cosine_selected=1.0,
            filters_passed=base.selection.selected is not None,
            sparsity=steps.sparsity(bench.model),
            mechanism=MechanismSummary.from_flags(mech),
        )
    )
    return steps.validation(bench, "base", bench.model, [])


def _measure_compressed(bench: Bench, base: BaseDirection, c: Compressed, measured: _Measured) -> int:
    """A compressed variant re-extracted, compared and its mechanism measured; returns its source layer."""
    analysis = steps.analyse(bench, c.method, c.model, base, [c.key])
    measured.analysed(c.method, c.model, [c.key], analysis)
    base_mech = None
    if bench.config.base_direction_mechanism:
        flags, _ = steps.mechanism(
            bench, f"{c.method}/base-direction", c.model, base.r, base.layer, [c.key, base.key]
        )
        measured.base_direction_flags[c.method] = flags
        base_mech = MechanismSummary.from_flags(flags)
    record = c.record.to_dict()
    measured.variants.append(
        VariantResult(
            name=c.method,
            kind="compressed",
            method=c.method,
            compression_config=record.get("config"),
            quantization_error=record.get("quantization_error") or None,
            sparsity=c.record.sparsity,
            base_direction_mechanism=base_mech,
            **analysis.variant_fields(),
        )
    )
    return analysis.layer


def _sweep_and_choose(
    bench: Bench,
    base: BaseDirection,
    c: Compressed,
    own_layer: int,
    base_val: ValidationScores,
    measured: _Measured,
) -> dict[str, RepairChoice]:
    """The AIRD sweep on validation prompts and the rule's choice per arm (dense, sparse)."""
    sparse_arm = bench.config.repair.sparse and steps.is_pruning(c.method)
    points = steps.sweep(
        bench, c.method, c.model, base, own_layer, [c.key, base.key], sparse_arm=sparse_arm, method=c.method
    )
    choices = steps.choose(bench.config, points, base_val)
    measured.sweeps[c.method] = SweepSummary(points=points, choices=choices)
    return choices


def _repair_plans(
    config: StudyConfig, base: BaseDirection, method: str, choices: dict[str, RepairChoice]
) -> list[tuple[str, str, RepairPlan | None, str]]:
    """(variant, arm, plan, how) of each repaired variant: the paper's α at the base source block,
    then each arm's choice (plan None: the rule chose no edit)."""
    out: list[tuple[str, str, RepairPlan | None, str]] = [
        (
            f"{method}+aird",
            "paper",
            RepairPlan(config.aird, (base.layer,)),
            "paper's α at the base source layer",
        )
    ]
    for arm, choice in choices.items():
        name = f"{method}+aird{'-sparse' if arm == 'sparse' else ''}*"
        if choice.point.strength == "identity":
            out.append((name, arm, None, "no strength improved on the unedited model under the rule"))
        else:
            plan = steps.point_plan(choice.point, config.aird)
            out.append((name, arm, plan, f"chosen on validation: {choice.point.label}"))
    return out


def _measure_repaired(
    bench: Bench,
    base: BaseDirection,
    c: Compressed,
    measured: _Measured,
    name: str,
    arm: str,
    plan: RepairPlan | None,
    how: str,
    choices: dict[str, RepairChoice],
) -> None:
    """A repaired variant built, analysed and (with ``save_checkpoints``) saved; no edit: the
    variant is its compressed model."""
    choice = choices.get(arm)
    point = choice.point.to_dict() if choice is not None else None
    criterion = choice.criterion_met if choice is not None else None
    if plan is None:
        summary = RepairSummary(arm=arm, how=how, point=point, criterion_met=criterion, same_as=c.method)
        measured.variants.append(VariantResult(name=name, kind="repaired", method=c.method, repair=summary))
        return
    model, record = steps.repaired(bench, c.model, base.r, plan, method=c.method)
    k_a = settings_key(plan.key_settings(), c.key, base.key)
    analysis = steps.analyse(bench, name, model, base, [k_a])
    measured.analysed(name, model, [k_a], analysis)
    checkpoint = (
        _save_checkpoint(bench, name, model, c, record, [k_a]) if bench.config.save_checkpoints else None
    )
    summary = RepairSummary(
        arm=arm,
        how=how,
        layers=list(plan.edit_blocks),
        alphas=list(plan.config.alphas(base.norm)),
        gains=list(plan.config.gains(base.norm)),
        point=point,
        criterion_met=criterion,
        record=record,
        checkpoint=checkpoint,
    )
    fields = analysis.variant_fields()
    measured.variants.append(
        VariantResult(
            name=name,
            kind="repaired",
            method=c.method,
            sparsity=steps.sparsity(model),
            repair=summary,
            **fields,
        )
    )


def _save_checkpoint(
    bench: Bench, name: str, model: nn.Module, c: Compressed, aird: dict[str, Any], upstream: list[str]
) -> str:
    """``model`` saved under ``checkpoints/<name>/`` (a stage: redone when the model changes or the
    directory is gone); returns its path relative to the run directory."""
    rel = Path("checkpoints") / name
    target = bench.out / rel

    def compute(d: Path) -> str:
        record = {
            "operation": "study",
            "method": f"{c.method}+aird",
            "aird": aird,
            "compression": c.record.to_dict(),
            "source_model": bench.config.model,
            "refusal_token_ids": bench.refusal_ids,
        }
        save_checkpoint(
            model, bench.tokenizer, target, record=record, base_identity=bench.identity, overwrite=True
        )
        atomic_write_json(d / "checkpoint.json", {"path": str(rel)})
        return str(rel)

    def load(d: Path) -> str:
        read_checkpoint_record(target)  # raises ArtifactError when missing or altered: then rewritten
        return str(rel)

    value, _ = bench.stage(f"{name}/checkpoint", {}, upstream, compute, load)
    return str(value)


def _results(
    bench: Bench,
    base: BaseDirection,
    base_val: ValidationScores,
    measured: _Measured,
    evals: dict[str, dict[str, Any]],
    seconds: float,
) -> StudyResults:
    return StudyResults(
        model=bench.identity,
        settings=bench.config.to_dict(),
        refusal_token_ids=bench.refusal_ids,
        base=BaseSummary(
            source=[base.layer, base.position],
            source_position=base.position,
            filters_passed=base.selection.selected is not None,
            noise_floor_at_source=finite_or_none(base.noise_at_source),
            direction_norm=float(base.r.norm()),
            validation=base_val,
        ),
        noise_floor=[[finite_or_none(float(x)) for x in row] for row in base.noise],
        variants=[
            _evaluated(v, evals, measured.flags, measured.base_direction_flags) for v in measured.variants
        ],
        sweeps=measured.sweeps,
        saturated_attacks=_saturation(evals["base"]),
        untested_attacks=NOT_PAIRED_TESTABLE,
        significance_level=0.05,
        timings={
            "stages": bench.timings,
            # this invocation's wall time; on a resumed run the work of earlier runs is in the stages
            "total_seconds": round(seconds, 3),
            "stage_seconds_all_runs": round(sum(bench.timings.values()), 3),
        },
        reproduce=_reproduce_info(),
    )


def load_variant_model(
    model: str,
    method: str | None,
    calibration: str = "harmless_train",
    n_calibration: int = 64,
    batch_size: int = 32,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for a model spec, compressed in memory with ``method`` when given."""
    m, tok = load_model(model)
    if method:
        cfg = method_config(method)
        calib = calibration_token_ids(tok, calibration, n_calibration)
        compress_(m, cfg, calib, batch_size=batch_size)
    return m, tok


def _reproduce_info() -> dict[str, Any]:
    """What it takes to rerun this: the command line and the versions of what computed it."""
    import importlib.metadata as md
    import platform

    versions: dict[str, str | None] = {}
    for pkg in ("refusal_core", "torch", "transformers", "tokenizers", "safetensors", "scipy", "lm_eval"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "command_line": list(sys.argv),
        "python": platform.python_version(),
        "packages": versions,
        "torch_threads": torch.get_num_threads(),
    }


def _saturation(base_eval: dict[str, Any]) -> dict[str, str]:
    """Attacks whose ASR on the base model is exactly 0 or 1: they cannot show one direction of change."""
    out = {}
    for name, flags in base_eval["jailbroken"].items():
        k = sum(flags)
        if k == 0:
            out[name] = "floor (0 on the base): cannot show a repair lowering it"
        elif k == len(flags):
            out[name] = "ceiling (1 on the base): cannot show compression raising it"
    return out


def _evaluated(
    v: VariantResult,
    evals: dict[str, dict[str, Any]],
    flags: dict[str, dict[str, Any]],
    base_flags: Mapping[str, dict[str, Any]],
) -> VariantResult:
    """``v`` with its test-prompt evaluation and its paired comparisons (a variant that is its
    compressed model reads that model's evaluation)."""
    ev = evals.get(v.same_as or v.name)
    if ev is None:
        return v
    vs_base = vs_compressed = mech_vs_base = mech_vs_compressed = None
    headline = None
    if v.kind != "base":
        vs_base = Comparison.between(ev, evals["base"], kl=False)
    if v.kind == "repaired" and not v.same_as:
        assert v.method is not None
        comp_ev = evals[v.method]
        vs_compressed = Comparison.between(ev, comp_ev, kl=True)
        headline = {
            name: AsrChange.of(evals["base"]["jailbroken"][name], comp_ev["jailbroken"][name], jb)
            for name, jb in ev["jailbroken"].items()
            if name in comp_ev["jailbroken"] and name in evals["base"]["jailbroken"]
        }
        mech_vs_compressed = {
            key: mcnemar(flags[v.method][key], flags[v.name][key]) for key in MECHANISM_FLAGS
        }
    base_dir_vs_base = None
    if v.kind == "compressed":
        mech_vs_base = {key: mcnemar(flags["base"][key], flags[v.name][key]) for key in MECHANISM_FLAGS}
        if v.name in base_flags:
            base_dir_vs_base = {
                key: mcnemar(flags["base"][key], base_flags[v.name][key]) for key in MECHANISM_FLAGS
            }
    return replace(
        v,
        evaluation=EvaluationSummary.from_evaluation(ev),
        comparisons=Comparisons(
            vs_base=vs_base,
            vs_compressed=vs_compressed,
            mechanism_vs_base=mech_vs_base,
            mechanism_vs_compressed=mech_vs_compressed,
            base_direction_mechanism_vs_base=base_dir_vs_base,
        ),
        headline=headline,
    )
