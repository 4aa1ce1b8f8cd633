"""Audit a compressed checkpoint someone else made against its base model, in one call.

:func:`audit` loads a base model and a candidate (any ``--model`` spec: ``toy``,
a Hugging Face directory — a bitsandbytes-serialized one, one this tool wrote —,
a GGUF file, a hub id in the local cache), checks that the two share a
tokenizer (vocabulary, the ids of a probe string, the chat template) and an
architecture (layout, number of layers, residual width) before anything is
written, and then measures, on the study's stages (so a killed audit resumes):

* the base direction: extraction with its split-half noise floor, selection;
* the candidate's re-extraction and selection: cosine with the base at the
  base source (read against the noise floor there), cosine of the two selected
  directions, source shift;
* necessity and sufficiency of the BASE direction on the candidate (ablating it
  on harmful prompts, adding it at the base source layer on harmless ones),
  next to the same on the base, with exact McNemar tests;
* ASR (vanilla, with a system prompt, the decoding grid) and over-refusal of
  both on held-out prompts, every rate with n and a 95 % Wilson interval and
  every candidate-vs-base difference with an exact McNemar test;
* capability damage: KL(base ‖ candidate) of the next-token distribution and
  the cross-entropy of the base's greedy completions under the candidate;
* with ``repair=True``: AIRD of the candidate with the base direction at the
  base source layer — the strength given (``repair_gain``), else chosen by the
  study's sweep and rule on validation prompts, else (nothing qualifies) the
  paper's α — saved as a checkpoint (``repaired/``) and evaluated the same way.
  The repair keeps the candidate's storage (:func:`~refusal_core.repair.repair_`
  with the compression its checkpoint record names): a pruned candidate keeps its
  zeros (its sweep is the sparsity-preserving arm), a quantized one is put back on
  its grid; a storage that cannot be written again is refused before any work.

It writes ``audit.json`` (strict JSON: no NaN, null instead) and ``report.md``.

Example (the toy against a Wanda checkpoint; about half a minute on a CPU)::

    >>> from refusal_core.audit import AuditConfig, audit            # doctest: +SKIP
    >>> res = audit(AuditConfig(base="toy", compressed="runs/wanda"), "runs/audit")  # doctest: +SKIP
    >>> res.candidate["cosine_at_base_source"]                       # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusal_core import bench as steps
from refusal_core.aird import AirdConfig
from refusal_core.bench import Analysis, BaseDirection, Bench, RepairPlan
from refusal_core.checkpoint import save_checkpoint
from refusal_core.compression import CompressionConfig, method_spec
from refusal_core.errors import IncompatibleModelsError, InvalidArgumentError
from refusal_core.evaluation.engines import EngineName, VllmSettings
from refusal_core.evaluation.judges import check_judge_spec
from refusal_core.model import get_layout, load_model, model_identity, model_record
from refusal_core.repair import recorded_compression
from refusal_core.report import markdown_table
from refusal_core.saving import atomic_write_bytes, settings_key
from refusal_core.selection import SelectionConfig
from refusal_core.stats import finite_or_none, mcnemar
from refusal_core.study.config import AttackSettings, RepairConfig, StudyConfig
from refusal_core.study.report import format_rate
from refusal_core.study.results import MECHANISM_FLAGS, Comparison, EvaluationSummary, MechanismSummary

__all__ = ["AUDIT_FILE", "AuditConfig", "AuditResult", "audit", "check_compatible"]

#: The result file inside the audit directory.
AUDIT_FILE = "audit.json"

#: A string whose token ids both tokenizers must agree on (letters, digits, punctuation, spaces).
PROBE = "Audit probe: How do I bake 12 loaves of bread? Sure, I can't help with that!"


@dataclass(frozen=True)
class AuditConfig:
    """What an audit depends on. The sizes are small so that auditing the toy takes under a minute;
    use the study's sizes (128 / 32 / 64) or more for a real model."""

    #: the base model: 'toy', a local HF directory, a .gguf file or a hub id in the local cache
    base: str = "toy"
    #: the compressed candidate, any spec ``base`` accepts (e.g. a bitsandbytes-serialized directory)
    compressed: str = ""
    #: where both models run: "cpu", "cuda", "cuda:N" or "auto"
    device: str = "cpu"
    #: the models' dtype: "float32", "bfloat16", "float16", or None (float32 on CPU)
    dtype: str | None = None
    #: prompts per class for extraction
    n_train: int = 32
    #: prompts per class for selection and for the repair sweep
    n_val: int = 8
    #: held-out prompts per class for the mechanism and the evaluation
    n_test: int = 16
    #: random half splits of the split-half noise floor
    noise_splits: int = 4
    max_new_tokens: int = 16
    batch_size: int = 32
    seed: int = 0
    #: ASR judge: 'substring' or 'classifier:DIR'
    judge: str = "substring"
    #: also repair the candidate with AIRD (the base direction at the base source layer) and save it
    repair: bool = False
    #: the repair's gain along r/|r| at both projections; None: chosen by the sweep over ``repair_gains``
    repair_gain: float | None = None
    #: gains the sweep tries (beside the paper's α) when ``repair_gain`` is None
    repair_gains: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0)
    #: where the sweep's edits sit (:data:`~refusal_core.study.config.PLACEMENTS`); the audit's
    #: default stays the source block it has always edited (the study sweeps both)
    repair_placements: tuple[str, ...] = ("source-block",)
    #: the paper's α (the fallback when the sweep chooses no edit) and the AIRD flags
    aird: AirdConfig = field(default_factory=AirdConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    #: token ids whose probability is the refusal score (None: the base's default)
    refusal_token_ids: tuple[int, ...] | None = None
    #: who generates the evaluation's completions: "torch" or "vllm" (see StudyConfig.engine)
    engine: EngineName = "torch"
    vllm: VllmSettings = field(default_factory=VllmSettings)

    def __post_init__(self) -> None:
        for name in ("base", "compressed"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InvalidArgumentError(f"{name} must name a model, got {getattr(self, name)!r}")
        if not isinstance(self.repair, bool):
            raise InvalidArgumentError(f"repair must be a bool, got {self.repair!r}")
        g = self.repair_gain
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g)):
            raise InvalidArgumentError(f"repair_gain must be None or a finite number, got {g!r}")
        # The rest is the study's own validation (counts >= 1, device, dtype, judge, gains).
        self.study_config()

    def study_config(self) -> StudyConfig:
        """The bench settings the audit's steps run with: the base as the model, no compression
        method (the candidate is given) and no GCG."""
        return StudyConfig(
            model=self.base,
            device=self.device,
            dtype=self.dtype,
            methods=(),
            n_train=self.n_train,
            n_val=self.n_val,
            n_test=self.n_test,
            noise_splits=self.noise_splits,
            aird=self.aird,
            repair=RepairConfig(
                gains=tuple(self.repair_gains),
                layers=("base",),
                sparse=False,
                placements=tuple(self.repair_placements),
            ),
            selection=self.selection,
            attacks=AttackSettings(gcg_prompts=0, gcg_steps=0),
            zero_shot_tasks=(),
            refusal_token_ids=self.refusal_token_ids,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            seed=self.seed,
            judge=self.judge,
            engine=self.engine,
            vllm=self.vllm,
        )

    def to_dict(self) -> dict[str, Any]:
        return _strict(asdict(self))


@dataclass
class AuditResult:
    """What :func:`audit` found; ``to_dict()`` is ``audit.json``'s content."""

    config: AuditConfig
    identities: dict[str, Any]
    compatibility: dict[str, Any]
    base: dict[str, Any]
    candidate: dict[str, Any]
    mechanism: dict[str, Any]
    evaluation: dict[str, Any]
    comparisons: dict[str, Any]
    repair: dict[str, Any] | None
    timings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return _strict(
            {
                "kind": "refusal_core.audit",
                "settings": self.config.to_dict(),
                "identities": self.identities,
                "compatibility": self.compatibility,
                "base": self.base,
                "candidate": self.candidate,
                "mechanism": self.mechanism,
                "evaluation": self.evaluation,
                "comparisons": self.comparisons,
                "repair": self.repair,
                "timings": self.timings,
                "significance_level": 0.05,
            }
        )


def _strict(obj: Any) -> Any:
    """JSON-able with NaN and infinity as None (strict parsers reject NaN)."""
    if isinstance(obj, float):
        return finite_or_none(obj)
    if isinstance(obj, Mapping):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _strict(obj.tolist())
    return obj


# ----------------------------------------------------------------------------
# compatibility
# ----------------------------------------------------------------------------


def check_compatible(base: tuple[nn.Module, Any], candidate: tuple[nn.Module, Any]) -> dict[str, Any]:
    """Raise :class:`~refusal_core.errors.IncompatibleModelsError` unless the two share a tokenizer and
    an architecture; returns what was compared.

    Tokenizer: the same vocabulary (token → id), the same ids for :data:`PROBE`, the same chat
    template. Architecture: the same layout (model family), number of decoder blocks and residual
    width. A direction and an AIRD edit only transfer between such models.
    """
    (bm, btok), (cm, ctok) = base, candidate
    problems: list[str] = []
    bl, cl = get_layout(bm), get_layout(cm)
    arch = {
        "layout": (bl.spec.family, cl.spec.family),
        "n_layers": (bl.n_layers, cl.n_layers),
        "d_model": (bl.d_model, cl.d_model),
    }
    problems += [f"{k} {a!r} vs {b!r}" for k, (a, b) in arch.items() if a != b]
    # Tokens the models can embed must agree; ids past an embedding (a GGUF converter's extra
    # <|endoftext|>, say) can never reach either model and are only listed.
    rows = min(int(bl.embedding.weight.shape[0]), int(cl.embedding.weight.shape[0]))
    bv, cv = btok.get_vocab(), ctok.get_vocab()
    bin_, cin = {t: i for t, i in bv.items() if i < rows}, {t: i for t, i in cv.items() if i < rows}
    if bin_ != cin:
        diff = sorted(set(bin_.items()) ^ set(cin.items()), key=str)[:3]
        problems.append(f"vocabularies differ ({len(bin_)} vs {len(cin)} embeddable tokens; e.g. {diff})")
    extra = sorted({t for t, i in [*bv.items(), *cv.items()] if i >= rows})
    bp = list(btok(PROBE, add_special_tokens=False)["input_ids"])
    cp = list(ctok(PROBE, add_special_tokens=False)["input_ids"])
    if bp != cp:
        problems.append(f"the probe string tokenizes differently ({bp[:8]}... vs {cp[:8]}...)")
    bt, ct = getattr(btok, "chat_template", None), getattr(ctok, "chat_template", None)
    if bt != ct:
        problems.append("chat templates differ")
    if problems:
        raise IncompatibleModelsError(
            "base and candidate must share a tokenizer and an architecture: " + "; ".join(problems)
        )
    return {
        "layout": bl.spec.family,
        "n_layers": bl.n_layers,
        "d_model": bl.d_model,
        "vocab_size": len(bin_),
        "tokens_past_the_embedding": extra,
        "probe_ids": bp,
        "chat_template_sha256": _sha(bt),
    }


def _sha(text: str | None) -> str | None:
    import hashlib

    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------
# the audit: the bench's steps on one candidate
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    """The candidate model, its identity and stage key, and the compression its record names."""

    model: nn.Module
    identity: dict[str, Any]
    key: str
    record: dict[str, Any] | None
    method: str | None
    compression: CompressionConfig | None

    @property
    def prunes(self) -> bool:
        """Whether its method prunes: its repair keeps the zeros (the sweep's sparse arm)."""
        return self.method is not None and method_spec(self.method).prunes


def _load_pair(config: AuditConfig) -> tuple[tuple[nn.Module, Any], _Candidate, dict[str, Any]]:
    """Base and candidate loaded and checked compatible (and repairable, with ``repair``)."""
    torch.manual_seed(config.seed)
    base = load_model(config.base, device=config.device, dtype=config.dtype)
    cand_model, cand_tok = load_model(config.compressed, device=config.device, dtype=config.dtype)
    compatibility = check_compatible(base, (cand_model, cand_tok))
    record = model_record(config.compressed)
    method, compression = recorded_compression(record)
    ident = model_identity(cand_model)
    cand = _Candidate(cand_model, ident, settings_key({"candidate": ident}), record, method, compression)
    if config.repair and getattr(cand_model, "hf_quantizer", None) is not None:
        # transformers 5 cannot save a model it loaded through a quantizer again (save_pretrained
        # raises NotImplementedError in the weight conversion), so the repair could not be written.
        raise InvalidArgumentError(
            f"repair: the candidate {config.compressed!r} was loaded through transformers' "
            f"{type(cand_model.hf_quantizer).__name__}, and transformers cannot save such a model again; "
            "audit it without repair, or repair the float model it was quantized from"
        )
    if config.repair:  # a storage that cannot be written again is refused now, in one line
        refusal = steps.repair_refusal(cand_model, 0, method, compression)
        if refusal is not None:
            raise InvalidArgumentError(f"repair: the candidate {config.compressed!r}: {refusal}")
    return base, cand, compatibility


def _candidate_info(base: BaseDirection, analysis: Analysis) -> dict[str, Any]:
    """The candidate's direction against the base's, read against the noise floor at the base source."""
    fields = analysis.variant_fields()
    floor = base.noise_at_source
    cos = fields["cosine_at_base_source"]
    return {
        "source": fields["source"],
        "filters_passed": fields["filters_passed"],
        "source_shift": fields["source_shift"],
        "cosine_at_base_source": cos,
        "cosine_selected": fields["cosine_selected"],
        "noise_floor_at_base_source": finite_or_none(floor),
        "above_noise_floor": None if cos is None or not math.isfinite(floor) else bool(cos > floor),
        "per_layer_cosine_at_base_position": [finite_or_none(v) for v in analysis.cosine_by_layer],
    }


def _repair_plan(
    bench: Bench, config: AuditConfig, base: BaseDirection, cand: _Candidate
) -> tuple[RepairPlan, str, dict[str, Any] | None]:
    """(plan, how, choice): the given gain, else the sweep's choice, else (none qualified) the paper's α.

    A pruned candidate keeps its zeros: every strength is the sparsity-preserving edit.
    """
    paper = replace(config.aird, preserve_sparsity=cand.prunes)
    if config.repair_gain is not None:
        g = float(config.repair_gain)
        cfg = AirdConfig(gain_attn=g, gain_mlp=g, normalize=paper.normalize, preserve_sparsity=cand.prunes)
        return RepairPlan(cfg, (base.layer,)), f"the given gain {g:g}", None
    base_val = steps.validation(bench, "base", bench.model, [])
    points = steps.sweep(
        bench,
        "candidate",
        cand.model,
        base,
        base.layer,
        [cand.key, base.key],
        sparse_arm=cand.prunes,
        method=cand.method,
        compression=cand.compression,
    )
    choice = steps.choose(bench.config, points, base_val)["sparse" if cand.prunes else "dense"]
    if choice.point.strength == "identity":
        how = "the paper's α (no strength of the sweep qualified under the rule)"
        return RepairPlan(paper, (base.layer,)), how, choice.to_dict()
    plan = steps.point_plan(choice.point, config.aird)
    return plan, f"chosen on validation: {choice.point.label}", choice.to_dict()


def _repair(
    bench: Bench,
    config: AuditConfig,
    base: BaseDirection,
    cand: _Candidate,
    measured: dict[str, tuple[dict[str, Any], dict[str, Any]]],
) -> dict[str, Any]:
    """AIRD of the candidate with the base direction, keeping the candidate's storage, measured,
    evaluated and saved as ``repaired/``."""
    plan, how, choice = _repair_plan(bench, config, base, cand)
    repaired, aird_record = steps.repaired(
        bench, cand.model, base.r, plan, method=cand.method, compression=cand.compression
    )
    k_rep = settings_key(plan.key_settings(), cand.key, base.key)
    rep_mech, _ = steps.mechanism(bench, "repaired", repaired, base.r, base.layer, [k_rep])
    ev_rep, _ = steps.evaluate(bench, "repaired", repaired, [k_rep])
    storage = {edit["repair"]["storage"] for edit in aird_record["edits"]}
    record: dict[str, Any] = {
        "operation": "audit --repair",
        "method": f"{cand.method}+aird" if cand.method else "aird",
        "aird": aird_record,
        "source": [base.layer, base.position],
        "candidate": config.compressed,
        "candidate_identity": cand.identity,
        "source_model": config.base,
        "refusal_token_ids": bench.refusal_ids,
    }
    compression = ((cand.record or {}).get("settings") or {}).get("compression")
    if compression:  # the exact config, for a later repair of this checkpoint
        record["compression"] = compression
    if storage == {"dequantized-simulation"}:
        record["format"] = "dequantized-simulation"  # float weights on a simulation's grid
    ckpt = save_checkpoint(
        repaired,
        bench.tokenizer,
        bench.out / "repaired",
        record=record,
        base_identity=bench.identity,
        overwrite=True,
    )
    ev_base, (cand_mech, ev_cand) = measured["base"][1], measured["candidate"]
    return {
        "how": how,
        "method": cand.method,
        "rules": sorted({edit["repair"]["rule"] for edit in aird_record["edits"]}),
        "layer": base.layer,
        "placement": plan.placement,
        "edited_blocks": list(plan.edit_blocks),
        "alphas": list(plan.config.alphas(base.norm)),
        "gains": list(plan.config.gains(base.norm)),
        "choice": choice,
        "record": aird_record,
        "checkpoint": str(ckpt),
        "mechanism": MechanismSummary.from_flags(rep_mech).to_dict(),
        "evaluation": EvaluationSummary.from_evaluation(ev_rep).to_dict(),
        "comparisons": {
            "vs_candidate": Comparison.between(ev_rep, ev_cand, kl=True).to_dict(),
            "vs_base": Comparison.between(ev_rep, ev_base, kl=False).to_dict(),
            "mechanism_vs_candidate": {
                k: mcnemar(cand_mech[k], rep_mech[k]).to_dict() for k in MECHANISM_FLAGS
            },
        },
    }


def audit(config: AuditConfig, out_dir: str | Path, *, progress: bool = True) -> AuditResult:
    """Run (or resume) the audit of ``config.compressed`` against ``config.base`` into ``out_dir``.

    Both models are loaded and checked (:func:`check_compatible`) before ``out_dir`` is created;
    then ``audit.json`` and ``report.md`` are written there (stages under ``stages/``, the
    repaired checkpoint, with ``repair``, under ``repaired/``).
    """
    if not isinstance(config, AuditConfig):
        raise InvalidArgumentError(f"config must be an AuditConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    check_judge_spec(config.judge, must_exist=True)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"out_dir {str(out)!r} exists and is not a directory")
    base_pair, cand, compatibility = _load_pair(config)
    t_load = time.perf_counter() - t0

    bench = Bench(config.study_config(), out, progress=progress, loaded=base_pair)
    cand_model, k_cand = cand.model, cand.key
    # the base direction with its noise floor and mechanism; the candidate's own direction against it
    base = steps.base_direction(bench)
    if base.selection.selected is None:  # the audit's whole comparison rests on this direction: say so
        logging.getLogger("refusal_core.audit").warning(
            "no candidate direction of the base passed the selection filters; using the fallback "
            "source (layer %d, position %d); report.md marks it with †",
            base.layer,
            base.selection.positions[base.position_index],
        )
    base_mech, _ = steps.mechanism(bench, "base", bench.model, base.r, base.layer, [base.key])
    analysis = steps.analyse(bench, "candidate", cand_model, base, [k_cand], own_mechanism=False)
    # the BASE direction on the candidate: is it still necessary and sufficient there?
    cand_mech, _ = steps.mechanism(bench, "candidate", cand_model, base.r, base.layer, [k_cand, base.key])
    ev_base, _ = steps.evaluate(bench, "base", bench.model, [])
    ev_cand, _ = steps.evaluate(bench, "candidate", cand_model, [k_cand])
    measured = {"base": (base_mech, ev_base), "candidate": (cand_mech, ev_cand)}
    repair_info = _repair(bench, config, base, cand, measured) if config.repair else None

    result = AuditResult(
        config=config,
        identities={"base": bench.identity, "candidate": cand.identity},
        compatibility=compatibility,
        base={
            "source": [base.layer, base.position],
            "filters_passed": base.selection.selected is not None,
            "direction_norm": base.norm,
            "noise_floor_at_source": finite_or_none(base.noise_at_source),
        },
        candidate=_candidate_info(base, analysis),
        mechanism={
            "direction": "the base model's, at the base source",
            "base": MechanismSummary.from_flags(base_mech).to_dict(),
            "candidate": MechanismSummary.from_flags(cand_mech).to_dict(),
            "candidate_vs_base": {k: mcnemar(base_mech[k], cand_mech[k]).to_dict() for k in MECHANISM_FLAGS},
        },
        evaluation={
            "base": EvaluationSummary.from_evaluation(ev_base).to_dict(),
            "candidate": EvaluationSummary.from_evaluation(ev_cand).to_dict(),
        },
        comparisons={"candidate_vs_base": Comparison.between(ev_cand, ev_base, kl=False).to_dict()},
        repair=repair_info,
        timings={
            "load_seconds": round(t_load, 3),
            "stages": dict(bench.timings),
            "total_seconds": round(time.perf_counter() - t0, 3),
        },
    )
    doc = result.to_dict()
    atomic_write_bytes(
        out / AUDIT_FILE, (json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    )
    atomic_write_bytes(out / "report.md", audit_report(doc).encode("utf-8"))
    return result


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------


def audit_report(doc: Mapping[str, Any]) -> str:
    """``report.md`` of an ``audit.json`` document."""
    s, b, c = doc["settings"], doc["base"], doc["candidate"]

    def num(x: Any) -> str:
        return "–" if x is None else f"{float(x):.3f}"

    def p(test: Mapping[str, Any] | None) -> str:
        if not test:
            return "–"
        return f"{test['p_value']:.3g}" + (" *" if test.get("significant") else "")

    variants = [("base", doc["mechanism"]["base"], doc["evaluation"]["base"])]
    variants.append(("candidate", doc["mechanism"]["candidate"], doc["evaluation"]["candidate"]))
    if doc.get("repair"):
        variants.append(("repaired", doc["repair"]["mechanism"], doc["repair"]["evaluation"]))
    attacks = sorted({a for _, _, ev in variants for a in ev["asr"]})
    rows = [
        [
            name,
            format_rate(m["refusal_rate_harmful"]),
            format_rate(m["necessity"]),
            format_rate(m["sufficiency"]),
            *[format_rate(ev["asr"].get(a)) for a in attacks],
            format_rate(ev["over_refusal"]),
            num(ev["damage"]["kl_mean"]),
            num(ev["damage"]["ce_mean"]),
        ]
        for name, m, ev in variants
    ]
    header = [
        "model",
        "harmful refused",
        "… r ablated (necessity)",
        "harmless refused, r added (sufficiency)",
    ]
    header += [f"ASR {a}" for a in attacks]
    header += ["over-refusal", "KL(base‖·)", "CE"]
    cmp = doc["comparisons"]["candidate_vs_base"]
    tests = [[f"ASR {a}", p(cmp["asr"].get(a))] for a in attacks]
    tests.append(["over-refusal", p(cmp["over_refusal"])])
    tests += [[f"mechanism {k}", p(t)] for k, t in doc["mechanism"]["candidate_vs_base"].items()]
    lines = [
        f"# Audit: `{s['compressed']}` against `{s['base']}`",
        "",
        f"Tokenizer and architecture shared ({doc['compatibility']['layout']}, "
        f"{doc['compatibility']['n_layers']} layers, d = {doc['compatibility']['d_model']}).",
        f"Prompts per class: {s['n_train']} extraction, {s['n_val']} selection, {s['n_test']} held-out test.",
        "",
        "## Direction",
        "",
        f"- base source {tuple(b['source'])}"
        + ("" if b["filters_passed"] else " † (fallback: no candidate passed the filters)")
        + f", ‖r‖ = {num(b['direction_norm'])}",
        f"- candidate source {tuple(c['source'])}, shift {c['source_shift']}",
        f"- cosine at the base source {num(c['cosine_at_base_source'])} against a split-half noise floor of "
        f"{num(c['noise_floor_at_base_source'])} there"
        + (
            ""
            if c["above_noise_floor"] is None
            else (" (above)" if c["above_noise_floor"] else " (NOT above)")
        ),
        f"- cosine of the selected directions {num(c['cosine_selected'])}",
        "",
        "## Rates (value [95 % Wilson interval]); the base direction is ablated / added on every model",
        "",
        markdown_table(header, rows),
        "",
        "## Candidate vs base: exact McNemar p (* significant at 0.05)",
        "",
        markdown_table(["quantity", "p"], tests),
    ]
    if doc.get("repair"):
        rep = doc["repair"]
        rc = rep["comparisons"]["vs_candidate"]
        lines += [
            "",
            "## Repair (AIRD with the base direction at the base source layer)",
            "",
            f"- strength: {rep['how']}; gains {[round(g, 4) for g in rep['gains']]}, "
            f"alphas {[round(a, 6) for a in rep['alphas']]}",
            f"- checkpoint: `{rep['checkpoint']}`",
            "",
            markdown_table(
                ["repaired vs candidate", "p"],
                [[f"ASR {a}", p(rc["asr"].get(a))] for a in attacks]
                + [["over-refusal", p(rc["over_refusal"])]],
            ),
        ]
    lines.append("")
    return "\n".join(lines)
