"""The study pipeline: does compression break the refusal direction, and does AIRD repair it?

Stages, each resumable (see :class:`~refusal_core.artifacts.StageStore`):

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
   and the gains of :class:`~refusal_core.study.config.RepairConfig`), dense
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
5. The report: ``results.json``, ``report.md`` and PNG plots.

A stage's key hashes its own settings with its upstream keys, so changing
(say) the repair margins redoes only the choice and what depends on it.
Artifacts are written atomically before a stage is marked done; a killed run
redoes at most the stage it was in.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from refusal_core.aird import AirdConfig, apply_aird_
from refusal_core.artifacts import (
    STAGE_JSON_SCHEMAS,
    StageStore,
    atomic_write_json,
    check_finite_model,
    save_model_weights,
    settings_key,
    stage_output_key,
    validate_json,
)
from refusal_core.compression import CompressionRecord, compress_, method_config
from refusal_core.compression.config import config_to_dict
from refusal_core.compression.quantization import cast_floating_
from refusal_core.directions import (
    DirectionCandidates,
    compare_candidates,
    extract_candidates,
    extract_candidates_with_noise_floor,
)
from refusal_core.errors import ArtifactError, EmptyInputError, ShapeMismatchError, UnsupportedModuleError
from refusal_core.evaluation.attacks import (
    DecodingAttack,
    VanillaAttack,
    over_refusal,
    prefill_shared_generations,
)
from refusal_core.evaluation.damage import (
    completion_cross_entropy,
    kl_divergence,
    next_token_logp,
)
from refusal_core.evaluation.engines import open_variant_engine
from refusal_core.evaluation.gcg import GcgAttack
from refusal_core.evaluation.generation import GenerationCache, generate, generate_ids
from refusal_core.evaluation.judges import SubstringJudge, classify, is_degenerate, judge_from_spec
from refusal_core.functional import compute_dtype, refusal_score
from refusal_core.interventions import ablation_hooks, addition_hooks
from refusal_core.model import encode_prompts, load_model, model_identity, pad_token_id
from refusal_core.prompts import load_prompts
from refusal_core.records import read_json
from refusal_core.selection import SelectionResult, last_token_logits, select_direction
from refusal_core.stats import finite_or_none, mcnemar, rate_of
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
from refusal_core.study.sweep import RepairChoice, SweepPoint, ValidationScores, choose_repair

__all__ = ["default_refusal_token_ids", "load_variant_model", "run_study"]


def _is_pruning(method: str) -> bool:
    return hasattr(method_config(method), "sparsity")


# ----------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------


class _Run:
    """State shared by the stages of one study run."""

    def __init__(
        self,
        config: StudyConfig,
        out_dir: Path,
        progress: bool,
        *,
        loaded: tuple[nn.Module, Any] | None = None,
    ) -> None:
        """``loaded``: the base ``(model, tokenizer)`` already loaded from ``config.model`` (the audit
        loads it first to check it against the candidate before anything is written)."""
        self.config = config
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.store = StageStore(self.out / "stages")
        self.progress = progress
        self.timings: dict[str, float] = {}
        c = config
        # Prompts first: a bad prompt file fails before the model is loaded.
        sizes = {
            "harmful_train": c.n_train,
            "harmless_train": c.n_train,
            "harmful_val": c.n_val,
            "harmless_val": c.n_val,
            "harmful_test": c.n_test,
            "harmless_test": c.n_test,
            "calibration": c.n_calibration,
        }
        self.prompts = {split: load_prompts(getattr(c, split))[:n] for split, n in sizes.items()}
        torch.manual_seed(c.seed)
        if loaded is None:
            loaded = load_model(c.model, device=c.device, dtype=c.dtype)
        self.model, self.tokenizer = loaded
        self.identity = model_identity(self.model)
        self.model_dtype = next(self.model.parameters()).dtype
        # the weights' dtype compression needs (functional.compute_dtype: float64 stays, the rest float32)
        self.compression_dtype = compute_dtype(next(self.model.parameters()))
        self._compression_base: nn.Module | None = None
        self.refusal_ids = (
            list(c.refusal_token_ids)
            if c.refusal_token_ids
            else default_refusal_token_ids(c.model, self.tokenizer)
        )
        if c.filter_prompts:
            self._filter_prompts()
        self.judge = judge_from_spec(c.judge, device=c.device, dtype=c.dtype)
        # Refusal rates (over-refusal, necessity, sufficiency) count refusals, so a short but
        # compliant answer must not count as one: no minimum length there.
        self.refusal_judge = SubstringJudge(min_words=1)
        self.root_key = settings_key(
            {
                "identity": self.identity,
                "prompts": self.prompts,
                "seed": c.seed,
                "refusal_ids": self.refusal_ids,
            }
        )
        self._pad = pad_token_id(self.tokenizer)
        self._encoded: dict[str, list[list[int]]] = {}
        self._base_val_logits: torch.Tensor | None = None
        self._base_val_completions: list[list[int]] | None = None
        self._base_test_logp: torch.Tensor | None = None
        # One memo of generations for the whole run: the same (model state, prompts, sampling,
        # seed, budget) is generated once, e.g. the greedy harmful completions the mechanism
        # stage and the vanilla attack both need. Keyed by a fingerprint of the weights and hooks.
        self.memo = GenerationCache()

    def _filter_prompts(self) -> None:
        """Arditi et al.'s filter: keep harmful prompts the base refuses and harmless ones it does not.

        Applied to the extraction and validation splits only; the held-out test prompts stay as
        they are, so rates on them are not conditioned on the base model's behaviour.
        """
        from refusal_core.selection import filter_prompts_by_refusal

        for harmful, harmless in (("harmful_train", "harmless_train"), ("harmful_val", "harmless_val")):
            kept_h, kept_s = filter_prompts_by_refusal(
                self.model,
                self.tokenizer,
                self.prompts[harmful],
                self.prompts[harmless],
                self.refusal_ids,
                batch_size=self.config.batch_size,
            )
            for split, kept in ((harmful, kept_h), (harmless, kept_s)):
                if len(kept) < 2:
                    raise EmptyInputError(
                        f"filter_prompts left {len(kept)} prompt(s) of {split}: too few to continue"
                    )
                self.prompts[split] = kept

    def stage(
        self,
        name: str,
        settings: dict[str, Any],
        upstream: Sequence[str],
        compute: Callable[[Path], Any],
        load: Callable[[Path], Any],
    ) -> tuple[Any, str]:
        """Load stage ``name`` if done with the same key and its files verify, else compute it.

        Returns ``(value, key)`` where ``key`` chains the settings key with the hashes of the
        stage's files: downstream stages keyed on it are redone when a recomputation produced
        different files, and stay valid (if their own files verify) when it produced the same.
        """
        key = settings_key(settings, self.root_key, *upstream)
        d = self.store.stage_dir(name)
        if self.store.recorded_key(name) == key:
            try:
                files = self.store.verify(name, key)
                value = load(d)
                self.timings[name] = self.store.seconds(name)
                return value, stage_output_key(key, files)
            except ArtifactError as exc:  # a damaged artifact is recomputed, never trusted
                tqdm.write(f"refusal_core: stage {name} is damaged ({exc}); recomputing", file=sys.stderr)
        stamps = self.store.file_stamps(name)
        self.store.invalidate(name)
        t0 = time.perf_counter()
        value = compute(d)
        self.timings[name] = round(time.perf_counter() - t0, 3)
        files = self.store.mark_done(name, key, {"seconds": self.timings[name]}, unchanged_since=stamps)
        return value, stage_output_key(key, files)

    def encoded(self, split: str) -> list[list[int]]:
        if split not in self._encoded:
            self._encoded[split] = encode_prompts(
                self.tokenizer, self.prompts[split], require_post_instruction=True
            )
        return self._encoded[split]

    # -- directions ----------------------------------------------------------
    def extract_base(self) -> tuple[DirectionCandidates, torch.Tensor, str]:
        """The base model's candidates and split-half noise floor, from one forward pass."""
        c = self.config

        def compute(d: Path) -> tuple[DirectionCandidates, torch.Tensor]:
            cands, floor = extract_candidates_with_noise_floor(
                self.model,
                self.tokenizer,
                self.prompts["harmful_train"],
                self.prompts["harmless_train"],
                n_splits=c.noise_splits,
                seed=c.seed,
                batch_size=c.batch_size,
                progress=self.progress,
            )
            save_file({"noise_floor": floor.contiguous()}, str(d / "noise.safetensors"))
            cands.save(d / "candidates")
            return cands, floor

        def load(d: Path) -> tuple[DirectionCandidates, torch.Tensor]:
            cands = DirectionCandidates.load(d / "candidates", expect_identity=self.identity)
            return cands, _load_tensor(d / "noise.safetensors", "noise_floor")

        (cands, floor), key = self.stage(
            "base/extract", {"batch_size": c.batch_size, "noise_splits": c.noise_splits}, [], compute, load
        )
        return cands, floor, key

    def extract(
        self, name: str, model: nn.Module, upstream: Sequence[str]
    ) -> tuple[DirectionCandidates, str]:
        def compute(d: Path) -> DirectionCandidates:
            cands = extract_candidates(
                model,
                self.tokenizer,
                self.prompts["harmful_train"],
                self.prompts["harmless_train"],
                batch_size=self.config.batch_size,
                progress=self.progress,
            )
            cands.save(d / "candidates")
            return cands

        ident = model_identity(model)
        return self.stage(
            f"{name}/extract",
            {"batch_size": self.config.batch_size},
            upstream,
            compute,
            lambda d: DirectionCandidates.load(d / "candidates", expect_identity=ident),
        )

    def select(
        self, name: str, model: nn.Module, cands: DirectionCandidates, upstream: Sequence[str]
    ) -> tuple[SelectionResult, str]:
        def compute(d: Path) -> SelectionResult:
            res = select_direction(
                model,
                self.tokenizer,
                cands,
                self.prompts["harmful_val"],
                self.prompts["harmless_val"],
                self.refusal_ids,
                self.config.selection,
                progress=self.progress,
            )
            res.save(d / "selection")
            return res

        ident = model_identity(model)
        return self.stage(
            f"{name}/select",
            asdict(self.config.selection),
            upstream,
            compute,
            lambda d: SelectionResult.load(d / "selection", expect_identity=ident),
        )

    # -- mechanism -----------------------------------------------------------
    def mechanism(
        self, name: str, model: nn.Module, r: torch.Tensor, layer: int, upstream: Sequence[str]
    ) -> tuple[dict[str, Any], str]:
        """Refusal on harmful test prompts as is and with r ablated, and on harmless ones with r added.

        Per-prompt flags are kept (``refused_*``) so that paired tests can be computed later.
        """

        def compute(d: Path) -> dict[str, Any]:
            harmful, harmless = self.prompts["harmful_test"], self.prompts["harmless_test"]
            r_m = r.to(next(model.parameters()).dtype)
            with ablation_hooks(model, r_m):
                abl = self._generate(model, harmful)
            with addition_hooks(model, r_m, 1.0, layer):
                add = self._generate(model, harmless)
            base_h = self._generate(model, harmful)
            out = {
                "refused_harmful": self._refused(harmful, base_h),
                "refused_ablated": self._refused(harmful, abl),
                "refused_added": self._refused(harmless, add),
            }
            atomic_write_json(d / "mechanism.json", out)
            return out

        return self.stage(
            f"{name}/mechanism",
            {"max_new_tokens": self.config.max_new_tokens, "layer": layer},
            upstream,
            compute,
            lambda d: _read_json(d / "mechanism.json"),
        )

    def _generate(self, model: nn.Module, prompts: Sequence[str]) -> list[str]:
        return generate(
            model,
            self.tokenizer,
            list(prompts),
            max_new_tokens=self.config.max_new_tokens,
            batch_size=self.config.batch_size,
            progress=False,
            cache=self.memo,
        )

    def _refused(self, prompts: Sequence[str], completions: Sequence[str]) -> list[bool]:
        """Per prompt: did the model refuse? A degenerate completion is no refusal."""
        return [v == "refused" for v in classify(self.refusal_judge, list(prompts), list(completions))]

    # -- compression ---------------------------------------------------------
    def compression_base(self) -> nn.Module:
        """The base model in the dtype compression runs in: the model itself unless it is low-precision.

        Masks, scale searches and quantization grids are computed from float32 weights (float64
        stays float64): in bfloat16, AWQ's search moved the quantized weights of the real model
        by 5.7 %. A bfloat16 or float16 study therefore loads a float32 copy of the base once,
        compresses that, saves the float32 result, and casts it to the study's dtype to evaluate.
        """
        if self.compression_dtype == self.model_dtype:
            return self.model
        if self._compression_base is None:
            c = self.config
            self._compression_base, _ = load_model(c.model, device=c.device, dtype=self.compression_dtype)
        return self._compression_base

    def _to_study_dtype(self, model: nn.Module) -> nn.Module:
        """``model`` (compressed in float32) cast to the study's dtype; quantization buffers keep theirs."""
        if self.compression_dtype == self.model_dtype:
            return model
        return cast_floating_(model, self.model_dtype)

    def compress(self, method: str) -> tuple[nn.Module, CompressionRecord, str]:
        cfg = method_config(method)
        calibration = encode_prompts(
            self.tokenizer, self.prompts["calibration"], require_post_instruction=True
        )

        def compute(d: Path) -> tuple[nn.Module, CompressionRecord]:
            model = copy.deepcopy(self.compression_base())
            record = compress_(
                model, cfg, calibration, batch_size=self.config.batch_size, progress=self.progress
            )
            save_model_weights(model, d / "weights.safetensors")
            record.save(d / "record")
            return self._to_study_dtype(model), record

        def load(d: Path) -> tuple[nn.Module, CompressionRecord]:
            record = CompressionRecord.load(
                d / "record", expect_identity=model_identity(self.compression_base())
            )
            return self._to_study_dtype(self._restore(cfg, calibration, d / "weights.safetensors")), record

        (model, record), key = self.stage(
            f"{method}/compress",
            {"config": config_to_dict(cfg), "calibration": self.config.calibration},
            [],
            compute,
            load,
        )
        return model, record, key

    def _restore(self, cfg: Any, calibration: list[list[int]], path: Path) -> nn.Module:
        """Rebuild a compressed model from saved weights (re-creating quantized modules if any)."""
        try:
            state = load_file(str(path))
        except Exception as exc:
            raise ArtifactError(f"compressed weights {path} are missing or corrupt: {exc}") from exc
        model = copy.deepcopy(self.compression_base())
        if set(state) != set(model.state_dict()):
            # The method replaced modules (e.g. int8): rebuild the structure, then load the saved values.
            compress_(model, cfg, calibration, batch_size=self.config.batch_size)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ArtifactError(f"compressed weights {path} do not fit the model: {exc}") from exc
        return model

    # -- repair --------------------------------------------------------------
    def repaired(
        self, compressed: nn.Module, r: torch.Tensor, layers: Sequence[int], cfg: AirdConfig
    ) -> tuple[nn.Module, dict[str, Any]]:
        """A copy of ``compressed`` with AIRD (the BASE direction ``r``) applied at each of ``layers``.

        The direction's origin is checked: it must come from the base model this compressed
        model derives from (the study's own base), which is AIRD's recipe.
        """
        model = copy.deepcopy(compressed)
        records: list[dict[str, Any]] = []
        for layer in layers:
            try:
                # r as extracted (float64): AIRD computes in float64 and casts the result once.
                rec = apply_aird_(
                    model,
                    r,
                    layer,
                    cfg,
                    direction_identity=self.identity,
                    model_record={"base_identity": self.identity},
                )
                records.append({**rec.to_dict(), "path": "dense float"})
            except UnsupportedModuleError:
                # Quantized linears: dequantize both edited modules, edit, re-quantize with the same scheme.
                from refusal_core.quantized_edit import apply_aird_quantized_

                qrec = apply_aird_quantized_(model, r, layer, cfg, requantize=True)
                if qrec.aird is None:
                    raise ArtifactError("the quantized AIRD edit returned no AIRD record") from None
                records.append(
                    {
                        **qrec.aird.to_dict(),
                        "path": "dequantize, edit, re-quantize",
                        "quantized_edit": qrec.to_dict(),
                    }
                )
        return model, {"layers": list(layers), "edits": records}

    def sweep_configs(
        self, sparse: bool, base_layer: int, own_layer: int
    ) -> list[tuple[str, str, tuple[int, ...], AirdConfig]]:
        """(strength, placement, layers, config) of every non-identity sweep point of one arm."""
        rc, paper = self.config.repair, self.config.aird
        placements: list[tuple[str, tuple[int, ...]]] = []
        for p in rc.layers:
            layers = {"base": (base_layer,), "own": (own_layer,), "both": (base_layer, own_layer)}[p]
            layers = tuple(dict.fromkeys(layers))  # "both" with equal layers is "base"
            if all(layers != seen for _, seen in placements):
                placements.append((p, layers))
        strengths: list[tuple[str, AirdConfig]] = []
        if rc.include_paper_alpha:
            strengths.append(("paper", replace(paper, preserve_sparsity=sparse)))
        for g in rc.gains:
            strengths.append(
                (
                    "gain",
                    AirdConfig(gain_attn=g, gain_mlp=g, normalize=paper.normalize, preserve_sparsity=sparse),
                )
            )
        return [(s, p, layers, cfg) for p, layers in placements for s, cfg in strengths]

    # -- validation scores ---------------------------------------------------
    def base_val_logits(self) -> torch.Tensor:
        if self._base_val_logits is None:
            self._base_val_logits = last_token_logits(self.model, self.encoded("harmless_val"), self._pad)
        return self._base_val_logits

    def base_val_completions(self) -> list[list[int]]:
        """The base model's greedy completions (ids) of the harmless validation prompts."""
        if self._base_val_completions is None:
            self._base_val_completions = generate_ids(
                self.model,
                self.tokenizer,
                self.encoded("harmless_val"),
                max_new_tokens=self.config.max_new_tokens,
                batch_size=self.config.batch_size,
                progress=False,
            )
        return self._base_val_completions

    def validation_scores(self, model: nn.Module) -> ValidationScores:
        """Scores of ``model`` on the validation prompts (never the test prompts)."""
        harm_ids, safe_ids = self.encoded("harmful_val"), self.encoded("harmless_val")
        lh = last_token_logits(model, harm_ids, self._pad)
        ls = last_token_logits(model, safe_ids, self._pad)
        sh = refusal_score(lh, self.refusal_ids)
        ss = refusal_score(ls, self.refusal_ids)
        kl = float(kl_divergence(_logp(self.base_val_logits()), _logp(ls)).mean())
        completions = self.base_val_completions()
        keep = [i for i, ids in enumerate(completions) if ids]
        ce = completion_cross_entropy(
            model,
            self.tokenizer,
            [safe_ids[i] for i in keep],
            [completions[i] for i in keep],
            batch_size=self.config.batch_size,
        )
        if self.config.repair.generate:
            harmful, harmless = self.prompts["harmful_val"], self.prompts["harmless_val"]
            complied = [bool(v) for v in self.judge.judge(list(harmful), self._generate(model, harmful))]
            over = rate_of(self._refused(harmless, self._generate(model, harmless)))
            source = "generation"
        else:
            complied = [bool(v) for v in (sh <= 0).tolist()]
            over = rate_of([bool(v) for v in (ss > 0).tolist()])
            source = "refusal_score"
        return ValidationScores(
            compliance=rate_of(complied),
            over_refusal=over,
            kl=kl,
            refusal_score_harmful=float(sh.mean()),
            refusal_score_harmless=float(ss.mean()),
            source=source,
            ce=float(ce.mean()) if keep else float("nan"),
            complied=tuple(complied),
        )

    def validation_stage(self, name: str, model: nn.Module, upstream: Sequence[str]) -> ValidationScores:
        def compute(d: Path) -> ValidationScores:
            scores = self.validation_scores(model)
            atomic_write_json(d / "validation.json", scores.to_dict())
            return scores

        value, _ = self.stage(
            f"{name}/validation",
            {
                "max_new_tokens": self.config.max_new_tokens,
                "generate": self.config.repair.generate,
                "judge": self.config.judge,
            },
            upstream,
            compute,
            lambda d: ValidationScores.from_dict(_read_json(d / "validation.json")),
        )
        return value

    def sweep(
        self,
        method: str,
        compressed: nn.Module,
        r_base: torch.Tensor,
        base_layer: int,
        own_layer: int,
        upstream: Sequence[str],
    ) -> tuple[list[SweepPoint], str]:
        arms = (False, True) if (self.config.repair.sparse and _is_pruning(method)) else (False,)
        norm = float(torch.linalg.vector_norm(r_base.to(torch.float64)))

        def compute(d: Path) -> list[SweepPoint]:
            ident = self.validation_scores(compressed)
            points = [SweepPoint("identity", False, "none", (), (1.0, 1.0), (0.0, 0.0), ident)]
            todo = [
                (sparse, *spec)
                for sparse in arms
                for spec in self.sweep_configs(sparse, base_layer, own_layer)
            ]
            bar = tqdm(todo, desc=f"{method} sweep", disable=not self.progress, leave=False)
            for sparse, strength, placement, layers, cfg in bar:
                model, _ = self.repaired(compressed, r_base, layers, cfg)
                points.append(
                    SweepPoint(
                        strength=strength,
                        sparse=sparse,
                        placement=placement,
                        layers=layers,
                        gains=cfg.gains(norm),
                        alphas=cfg.alphas(norm),
                        scores=self.validation_scores(model),
                    )
                )
                del model
            atomic_write_json(d / "sweep.json", {"points": [p.to_dict() for p in points]})
            return points

        # The margins only decide the choice, made from these scores afterwards: not part of the key.
        choice_only = {"max_over_refusal_increase", "max_kl_increase", "significance"}
        repair = {k: v for k, v in asdict(self.config.repair).items() if k not in choice_only}
        settings = {
            "repair": repair,
            "aird": asdict(self.config.aird),
            "max_new_tokens": self.config.max_new_tokens,
            "layers": [base_layer, own_layer],
            "judge": self.config.judge,
        }
        return self.stage(
            f"{method}/sweep",
            settings,
            upstream,
            compute,
            lambda d: [SweepPoint.from_dict(p) for p in _read_json(d / "sweep.json")["points"]],
        )

    # -- evaluation ----------------------------------------------------------
    def attacks(self) -> list[VanillaAttack | DecodingAttack]:
        c = self.config
        return c.attacks.attacks(max_new_tokens=c.max_new_tokens, batch_size=c.batch_size, seed=c.seed)

    def gcg(self) -> GcgAttack:
        c = self.config
        return c.attacks.gcg_attack(max_new_tokens=c.max_new_tokens, batch_size=c.batch_size, seed=c.seed)

    def base_completions(self) -> list[list[int]]:
        """The base model's greedy completions (token ids) of the harmless test prompts."""

        def compute(d: Path) -> list[list[int]]:
            ids = generate_ids(
                self.model,
                self.tokenizer,
                self.encoded("harmless_test"),
                max_new_tokens=self.config.max_new_tokens,
                batch_size=self.config.batch_size,
                progress=False,
            )
            atomic_write_json(d / "completions.json", {"ids": ids})
            return ids

        value, _ = self.stage(
            "base/completions",
            {"max_new_tokens": self.config.max_new_tokens},
            [],
            compute,
            lambda d: [list(map(int, x)) for x in _read_json(d / "completions.json")["ids"]],
        )
        return list(value)

    def evaluate(self, variant: str, model: nn.Module, upstream: Sequence[str]) -> tuple[dict[str, Any], str]:
        c = self.config
        completions = self.base_completions()

        def compute(d: Path) -> dict[str, Any]:
            # A broken model (NaN/inf weights) would give empty completions: refuse it, never report it.
            check_finite_model(model)
            harmful = self.prompts["harmful_test"]
            attacks = self.attacks()
            # vanilla, system-prompt and the decoding grid: one prefill per prompt batch and system prompt,
            # the KV cache forked per sampling configuration (tokens identical to separate runs)
            # with engine "vllm" the variant is saved as a checkpoint and vLLM generates into the memo
            # (same prompt ids, budget, stop ids and sampling settings); GCG's gradients stay in torch
            engine = open_variant_engine(
                c.engine,
                c.vllm,
                model,
                self.tokenizer,
                self.out / "checkpoints" / variant,
                base_identity=self.identity,
                variant=variant,
                seed=c.seed,
            )
            try:
                prefill_shared_generations(
                    model, self.tokenizer, harmful, attacks, self.memo, progress=False, engine=engine
                )
                if engine is not None:  # over-refusal's greedy harmless completions too
                    harmless_attack = VanillaAttack(max_new_tokens=c.max_new_tokens, batch_size=c.batch_size)
                    prefill_shared_generations(
                        model,
                        self.tokenizer,
                        self.prompts["harmless_test"],
                        [harmless_attack],
                        self.memo,
                        progress=False,
                        engine=engine,
                    )
            finally:
                if engine is not None:
                    engine.close()
            results = {
                a.name: a.run(model, self.tokenizer, harmful, self.judge, progress=False, cache=self.memo)
                for a in attacks
            }
            if c.attacks.runs_gcg:
                gcg = self.gcg()
                results[gcg.name] = gcg.run(
                    model, self.tokenizer, harmful[: c.attacks.gcg_prompts], self.judge, progress=False
                )
            for name, res in results.items():
                res.save(d / f"asr_{name}.json")
            refusal = over_refusal(
                model,
                self.tokenizer,
                self.prompts["harmless_test"],
                self.refusal_judge,
                max_new_tokens=c.max_new_tokens,
                batch_size=c.batch_size,
                progress=False,
                cache=self.memo,
            )
            refusal.save(d / "over_refusal.json")
            harmless = self.prompts["harmless_test"]
            harmless_completions = [r.completions[0] for r in refusal.records]
            out = {
                # empty or one-word-repeated output: neither a refusal nor a successful attack
                "degenerate": {
                    "harmless": sum(map(is_degenerate, harmless_completions)),
                    **{
                        name: sum(all(is_degenerate(c) for c in r.completions) for r in res.records)
                        for name, res in results.items()
                    },
                },
                "jailbroken": {
                    name: [bool(r.jailbroken) for r in res.records] for name, res in results.items()
                },
                "asr_per_config": {name: res.config_rates for name, res in results.items()},
                "refused_harmless": self._refused(harmless, harmless_completions),
                "damage": self._damage(model, completions),
                "accuracy": self._zero_shot(model),
            }
            atomic_write_json(d / "evaluation.json", out)
            return out

        settings = {
            "attacks": asdict(c.attacks),
            "max_new_tokens": c.max_new_tokens,
            "tasks": list(c.zero_shot_tasks),
            "judge": c.judge,
        }
        if c.engine != "torch":  # sampled draws differ between engines; torch runs keep their old keys
            settings["engine"] = {"name": c.engine, "dtype": c.vllm.dtype}
        return self.stage(
            f"eval/{variant}", settings, upstream, compute, lambda d: _read_json(d / "evaluation.json")
        )

    def base_test_logp(self) -> torch.Tensor:
        """The base model's next-token log-probabilities after each harmless test prompt, computed once.

        Every variant's KL(base ‖ variant) reads them; the base's own forward is not repeated
        per variant (same batches, so bit-identical to :func:`next_token_kl`).
        """
        if self._base_test_logp is None:
            self._base_test_logp = next_token_logp(
                self.model,
                self.tokenizer,
                list(self.prompts["harmless_test"]),
                batch_size=self.config.batch_size,
            )
        return self._base_test_logp

    def _damage(self, model: nn.Module, completions: list[list[int]]) -> dict[str, Any]:
        """KL(base ‖ model) of next-token distributions and cross-entropy of the base's completions."""
        harmless = list(self.prompts["harmless_test"])
        keep = [i for i, ids in enumerate(completions) if ids]
        logp = next_token_logp(model, self.tokenizer, harmless, batch_size=self.config.batch_size)
        base_logp = self.base_test_logp()
        if logp.shape != base_logp.shape:
            raise ShapeMismatchError(
                f"the variant's next-token distributions have shape {tuple(logp.shape)}, "
                f"the base's {tuple(base_logp.shape)}: they do not share a vocabulary"
            )
        kl = kl_divergence(base_logp, logp)  # KL(base ‖ variant), as next_token_kl(base, variant)
        ce = completion_cross_entropy(
            model,
            self.tokenizer,
            [harmless[i] for i in keep],
            [completions[i] for i in keep],
            batch_size=self.config.batch_size,
        )
        return {
            "kl_per_prompt": [float(v) for v in kl],
            "ce_per_prompt": [float(v) for v in ce],
            "ce_prompts": keep,
        }

    def _zero_shot(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        if not self.config.zero_shot_tasks:
            return {}
        from refusal_core.evaluation.zero_shot import zero_shot_evaluate

        res = zero_shot_evaluate(
            model, self.tokenizer, tasks=list(self.config.zero_shot_tasks), progress=self.progress
        )
        return {
            name: {"accuracy": r.accuracy, "stderr": finite_or_none(r.stderr), "n": r.n_items}
            for name, r in res.items()
        }


def _logp(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.to(torch.float64), -1)


def _point_config(point: SweepPoint, paper: AirdConfig) -> AirdConfig:
    """The AIRD config of a sweep point, in the spelling the sweep used (so the gain is exact)."""
    if point.strength == "paper":
        return replace(paper, preserve_sparsity=point.sparse)
    return AirdConfig(
        gain_attn=point.gains[0],
        gain_mlp=point.gains[1],
        normalize=paper.normalize,
        preserve_sparsity=point.sparse,
    )


def _read_json(path: Path) -> dict[str, Any]:
    data = read_json(path, "stage file")
    validate_json(data, STAGE_JSON_SCHEMAS.get(Path(path).name, {}), path)
    return dict(data)


def default_refusal_token_ids(spec: str, tokenizer: Any) -> list[int]:
    """The refusal token ids the study uses for model ``spec``: the toy's own, else the family's."""
    if spec == "toy":
        from refusal_core.toy import toy_refusal_token_ids

        return list(toy_refusal_token_ids())
    from refusal_core.evaluation.scores import refusal_token_ids_for

    return list(refusal_token_ids_for(tokenizer))


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
        calib = encode_prompts(tok, load_prompts(calibration)[:n_calibration], require_post_instruction=True)
        compress_(m, cfg, calib, batch_size=batch_size)
    return m, tok


# ----------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------


def run_study(config: StudyConfig, out_dir: Path, *, progress: bool = True) -> StudyResults:
    """Run (or resume) the study and write the report into ``out_dir``; returns results.json's content."""
    t_start = time.perf_counter()
    run = _Run(config, Path(out_dir), progress)
    out = run.out
    n_repaired = sum(3 if _is_pruning(m) and config.repair.sparse else 2 for m in config.methods)
    # base: 2 + its evaluation; a method: 3 + its evaluation; a repaired variant: analysis + evaluation
    steps = 3 + 4 * len(config.methods) + 2 * n_repaired
    bar = tqdm(total=steps, desc="study", disable=not progress)

    def step(msg: str) -> None:
        bar.set_postfix_str(msg)
        bar.update(1)

    # 1. base direction --------------------------------------------------------
    base_cands, noise, k_ext = run.extract_base()
    base_sel, k_sel = run.select("base", run.model, base_cands, [k_ext])
    layer, pos_i = base_sel.source
    position = base_sel.positions[pos_i]
    r_base = base_cands.directions[layer, pos_i]
    step(f"base source l={layer} pos={position}")
    base_mech, _ = run.mechanism("base", run.model, r_base, layer, [k_sel])
    base_val = run.validation_stage("base", run.model, [])
    step("base mechanism")

    # What each variant was measured with: its model and upstream keys (for its evaluation), the
    # per-prompt mechanism flags (for the paired tests) and its selection (for the plots).
    models: dict[str, tuple[nn.Module, list[str]]] = {"base": (run.model, [k_sel])}
    flags: dict[str, dict[str, Any]] = {"base": base_mech}
    selections: dict[str, SelectionResult] = {"base": base_sel}
    variants: list[VariantResult] = [
        VariantResult(
            name="base",
            kind="base",
            method=None,
            source=[layer, position],
            source_shift=[0, 0],
            cosine_at_base_source=1.0,
            cosine_selected=1.0,
            filters_passed=base_sel.selected is not None,
            sparsity=_sparsity(run.model),
            mechanism=MechanismSummary.from_flags(base_mech),
        )
    ]
    cosine_by_layer: dict[str, list[float]] = {}
    sweeps: dict[str, SweepSummary] = {}

    def analyse(name: str, model: nn.Module, upstream: list[str]) -> tuple[dict[str, Any], int]:
        """Extract, select, compare with the base and measure the mechanism of one model.

        Returns the analysis fields of its :class:`VariantResult` and its own source layer.
        """
        cands, k_e = run.extract(name, model, upstream)
        sel, k_s = run.select(name, model, cands, [*upstream, k_e])
        m_layer, m_pi = sel.source
        cmp = compare_candidates(
            base_cands,
            cands,
            base_source=(layer, position),
            other_source=(m_layer, sel.positions[m_pi]),
        )
        cmp.save(run.store.stage_dir(f"{name}/extract") / "comparison")
        cosine_by_layer[name] = [float(v) for v in cmp.per_site_cosine[:, pos_i]]
        mech, _ = run.mechanism(name, model, cands.directions[m_layer, m_pi], m_layer, [*upstream, k_s])
        flags[name] = mech
        selections[name] = sel
        fields = {
            "source": [m_layer, sel.positions[m_pi]],
            "source_shift": list(cmp.source_shift) if cmp.source_shift is not None else None,
            "cosine_at_base_source": finite_or_none(cmp.cosine_at_base_source),
            "cosine_selected": finite_or_none(cmp.selected_cosine),
            "filters_passed": sel.selected is not None,
            "mechanism": MechanismSummary.from_flags(mech),
        }
        return fields, m_layer

    # 2. compressed models and 3. their repair ----------------------------------
    for method in config.methods:
        compressed, record, k_c = run.compress(method)
        step(f"{method} compressed")
        info, own_layer = analyse(method, compressed, [k_c])
        step(f"{method} analysed")
        record_dict = record.to_dict()
        variants.append(
            VariantResult(
                name=method,
                kind="compressed",
                method=method,
                compression_config=record_dict.get("config"),
                quantization_error=record_dict.get("quantization_error") or None,
                sparsity=record.sparsity,
                **info,
            )
        )
        models[method] = (compressed, [k_c])

        points, _ = run.sweep(method, compressed, r_base, layer, own_layer, [k_c, k_sel])
        step(f"{method} swept")
        arms = sorted({p.sparse for p in points if p.strength != "identity"})
        choices: dict[str, RepairChoice] = {}
        for sparse in arms:
            arm_points = [p for p in points if p.strength == "identity" or p.sparse == sparse]
            choices["sparse" if sparse else "dense"] = choose_repair(
                arm_points,
                base_val,
                max_over_refusal_increase=config.repair.max_over_refusal_increase,
                max_kl_increase=config.repair.max_kl_increase,
                significance=config.repair.significance,
            )
        sweeps[method] = SweepSummary(points=points, choices=choices)

        plan: list[tuple[str, str, SweepPoint | None]] = [(f"{method}+aird", "paper", None)]
        for arm, choice in choices.items():
            plan.append((f"{method}+aird{'-sparse' if arm == 'sparse' else ''}*", arm, choice.point))
        for name, arm, point in plan:
            layers: tuple[int, ...]
            if point is None:
                cfg, layers, how = config.aird, (layer,), "paper's α at the base source layer"
            elif point.strength == "identity":
                variants.append(
                    VariantResult(
                        name=name,
                        kind="repaired",
                        method=method,
                        repair=RepairSummary(
                            arm=arm,
                            how="no strength improved on the unedited model under the rule",
                            point=point.to_dict(),
                            criterion_met=choices[arm].criterion_met,
                            same_as=method,
                        ),
                    )
                )
                step(f"{name}: no edit chosen")  # nothing to analyse
                step("")  # nor to evaluate
                continue
            else:
                cfg = _point_config(point, config.aird)
                layers, how = point.layers, f"chosen on validation: {point.label}"
            repaired, aird_record = run.repaired(compressed, r_base, layers, cfg)
            k_a = settings_key({"aird": asdict(cfg), "layers": list(layers)}, k_c, k_sel)
            info_r, _ = analyse(name, repaired, [k_a])
            step(f"{name} analysed")
            norm = float(torch.linalg.vector_norm(r_base.to(torch.float64)))
            variants.append(
                VariantResult(
                    name=name,
                    kind="repaired",
                    method=method,
                    sparsity=_sparsity(repaired),
                    repair=RepairSummary(
                        arm=arm,
                        how=how,
                        layers=list(layers),
                        alphas=list(cfg.alphas(norm)),
                        gains=list(cfg.gains(norm)),
                        point=point.to_dict() if point is not None else None,
                        criterion_met=choices[arm].criterion_met if arm in choices else None,
                        record=aird_record,
                    ),
                    **info_r,
                )
            )
            models[name] = (repaired, [k_a])

    # 4. evaluation -------------------------------------------------------------
    evals: dict[str, dict[str, Any]] = {}
    for v in variants:
        if v.same_as:
            continue
        model, upstream = models[v.name]
        evals[v.name], _ = run.evaluate(v.name, model, upstream)
        step(f"evaluated {v.name}")
    bar.close()

    # 5. results and report -----------------------------------------------------
    results = StudyResults(
        model=run.identity,
        settings=config.to_dict(),
        refusal_token_ids=run.refusal_ids,
        base=BaseSummary(
            source=[layer, position],
            source_position=position,
            filters_passed=base_sel.selected is not None,
            noise_floor_at_source=finite_or_none(float(noise[layer, pos_i])),
            direction_norm=float(r_base.norm()),
            validation=base_val,
        ),
        noise_floor=[[finite_or_none(float(x)) for x in row] for row in noise],
        variants=[_evaluated(v, evals, flags) for v in variants],
        sweeps=sweeps,
        saturated_attacks=_saturation(evals["base"]),
        untested_attacks=NOT_PAIRED_TESTABLE,
        significance_level=0.05,
        timings={
            "stages": run.timings,
            # this invocation's wall time; on a resumed run the work of earlier runs is in the stages
            "total_seconds": round(time.perf_counter() - t_start, 3),
            "stage_seconds_all_runs": round(sum(run.timings.values()), 3),
        },
        reproduce=_reproduce_info(),
    )
    write_study_report(
        out,
        results,
        selections=selections,
        cosine_by_layer=cosine_by_layer,
        noise=noise,
        base_position_index=pos_i,
    )
    return results


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
    v: VariantResult, evals: dict[str, dict[str, Any]], flags: dict[str, dict[str, Any]]
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
    if v.kind == "compressed":
        mech_vs_base = {key: mcnemar(flags["base"][key], flags[v.name][key]) for key in MECHANISM_FLAGS}
    return replace(
        v,
        evaluation=EvaluationSummary.from_evaluation(ev),
        comparisons=Comparisons(
            vs_base=vs_base,
            vs_compressed=vs_compressed,
            mechanism_vs_base=mech_vs_base,
            mechanism_vs_compressed=mech_vs_compressed,
        ),
        headline=headline,
    )


def _sparsity(model: nn.Module) -> float:
    from refusal_core.compression import model_sparsity_of

    return float(model_sparsity_of(model)[0])


def _load_tensor(path: Path, key: str) -> torch.Tensor:
    try:
        return load_file(str(path))[key]
    except Exception as exc:
        raise ArtifactError(f"{path} is missing or corrupt: {exc}") from exc
