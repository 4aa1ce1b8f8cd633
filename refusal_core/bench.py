"""The experiment's public steps: what the study, the audit and the command line all run.

A :class:`Bench` holds what every step shares: the base model and its
tokenizer, the prompt splits, the settings (a
:class:`~refusal_core.study.config.StudyConfig`), the judges, one memo of
generations and the resumable stage store (each step is a stage: done once,
reloaded on a rerun with the same settings). The steps are plain functions
over a bench, each taking and returning typed values:

* :func:`base_direction` — the base model's candidates, split-half noise floor
  and selected source (:class:`BaseDirection`);
* :func:`analyse` — a candidate model re-extracted, re-selected and compared
  with the base direction against the noise floor, with its mechanism
  (:func:`mechanism`: necessity and sufficiency) (:class:`Analysis`);
* :func:`compress` — a compression method applied to the base
  (:class:`Compressed`);
* :func:`evaluate` — ASR per registered attack, over-refusal and capability
  damage on the held-out test prompts;
* :func:`validation` and :func:`sweep` — AIRD strengths and placements scored
  on validation prompts only; :func:`choose` applies the documented rule;
* :func:`repaired` — a repaired copy of a model (:class:`RepairPlan`), every
  edit through :func:`apply_repair_`, the ONE place an AIRD edit is applied.

Placement (:data:`PLACEMENTS`): the direction r is measured at block l's
input. ``"source-block"`` edits block l's writers (``o_proj``, ``down_proj``),
whose output enters block l+1; ``"into-source"`` edits block l−1's writers,
whose output is the residual stream where r was measured (Arditi et al.'s
weight form of adding r at layer l). At l = 0 nothing writes into block 0's
input but the embedding, which is not a block's writer: the into-source
placement does not exist there (:meth:`RepairPlan.edit_blocks` raises; the
sweep leaves those points out).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from refusal_core.aird import AirdConfig
from refusal_core.compression import (
    CompressionConfig,
    CompressionRecord,
    compress_,
    method_config,
    method_spec,
    model_sparsity_of,
    scoped_edit,
)
from refusal_core.compression.calibration_sets import (
    calibration_key,
    calibration_prompts,
    calibration_token_ids,
)
from refusal_core.compression.config import config_to_dict
from refusal_core.compression.quantization import cast_floating_
from refusal_core.directions import (
    DirectionCandidates,
    DirectionComparison,
    check_direction_origin,
    compare_candidates,
    extract_candidates,
    extract_candidates_with_noise_floor,
)
from refusal_core.errors import (
    ArtifactError,
    EmptyInputError,
    InvalidArgumentError,
    RefusalCoreError,
    ShapeMismatchError,
    UnsupportedModuleError,
)
from refusal_core.evaluation.attacks import (
    VanillaAttack,
    build_attacks,
    over_refusal,
    prefill_shared_generations,
    run_attacks,
)
from refusal_core.evaluation.damage import completion_cross_entropy, kl_divergence, next_token_logp
from refusal_core.evaluation.engines import open_variant_engine
from refusal_core.evaluation.generation import GenerationCache, generate, generate_ids
from refusal_core.evaluation.judges import SubstringJudge, classify, is_degenerate, judge_from_spec
from refusal_core.evaluation.scores import refusal_token_ids_for
from refusal_core.functional import compute_dtype, refusal_score
from refusal_core.interventions import ablation_hooks, addition_hooks
from refusal_core.model import (
    encode_prompts,
    get_layout,
    load_model,
    model_identity,
    pad_token_id,
    read_chat_template,
)
from refusal_core.prompts import load_prompts
from refusal_core.repair import plan_repair, repair_
from refusal_core.saving import (
    StageStore,
    atomic_write_json,
    atomic_write_tensors,
    check_finite_model,
    save_model_weights,
    settings_key,
    stage_output_key,
)
from refusal_core.selection import (
    SelectionResult,
    filter_prompts_by_refusal,
    last_token_logits,
    select_direction,
)
from refusal_core.stats import finite_or_none, rate_of
from refusal_core.study.config import PLACEMENTS, StudyConfig
from refusal_core.study.results import MECHANISM_FLAGS, MechanismSummary
from refusal_core.study.schemas import read_stage_json
from refusal_core.study.sweep import RepairChoice, SweepPoint, ValidationScores, choose_repair
from refusal_core.toy import TOY_MODELS, toy_refusal_token_ids

__all__ = [
    "PLACEMENTS",
    "Analysis",
    "BaseDirection",
    "Bench",
    "Compressed",
    "RepairPlan",
    "analyse",
    "apply_repair_",
    "base_direction",
    "choose",
    "compress",
    "evaluate",
    "extract",
    "is_pruning",
    "mechanism",
    "repair_refusal",
    "repaired",
    "select",
    "sweep",
    "sweep_plans",
    "validation",
    "validation_scores",
]

#: The prompt splits a bench loads, and the StudyConfig field giving each one's size.
_SPLIT_SIZES = {
    "harmful_train": "n_train",
    "harmless_train": "n_train",
    "harmful_val": "n_val",
    "harmless_val": "n_val",
    "harmful_test": "n_test",
    "harmless_test": "n_test",
}


def is_pruning(method: str) -> bool:
    """Whether ``method`` prunes (the method table says so): only those get a sparsity-preserving arm."""
    return method_spec(method).prunes


def _logp(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.to(torch.float64), -1)


# ----------------------------------------------------------------------------
# the bench
# ----------------------------------------------------------------------------


class Bench:
    """The base model, prompts, settings, judges and stage store every step shares.

    ``loaded``: the base ``(model, tokenizer)`` already loaded from ``config.model`` (the audit
    loads it first, to check it against the candidate before anything is written), or a function
    that loads it, called after the prompts are read (the command line's loader, with its
    options). ``chat_template`` (a Jinja file or text): the template the model is loaded with
    instead of its tokenizer's own; it becomes part of every stage's key.
    """

    def __init__(
        self,
        config: StudyConfig,
        out_dir: str | Path,
        *,
        progress: bool = False,
        loaded: tuple[nn.Module, Any] | Callable[[], tuple[nn.Module, Any]] | None = None,
        chat_template: str | Path | None = None,
    ) -> None:
        if not isinstance(config, StudyConfig):
            raise InvalidArgumentError(f"config must be a StudyConfig, got {type(config).__name__}")
        c = self.config = config
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.store = StageStore(self.out / "stages")
        self.progress = progress
        self.timings: dict[str, float] = {}
        # Prompts first: a bad prompt file fails before the model is loaded.
        self.prompts = {s: load_prompts(getattr(c, s))[: getattr(c, n)] for s, n in _SPLIT_SIZES.items()}
        # harmless / harmful / mix / a prompt file / text:FILE (compression.calibration_sets); checked here
        calibration_prompts(c.calibration, c.n_calibration)
        torch.manual_seed(c.seed)
        if loaded is None:
            loaded = load_model(c.model, device=c.device, dtype=c.dtype, chat_template=chat_template)
        self.model, self.tokenizer = loaded() if callable(loaded) else loaded
        self.identity = model_identity(self.model)
        self.model_dtype = next(self.model.parameters()).dtype
        # the weights' dtype compression needs (functional.compute_dtype: float64 stays, the rest float32)
        self.compression_dtype = compute_dtype(next(self.model.parameters()))
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
        root: dict[str, Any] = {
            "identity": self.identity,
            "prompts": self.prompts,
            "seed": c.seed,
            "refusal_ids": self.refusal_ids,
        }
        if chat_template is not None:  # the prompts are encoded with it: a different one is another run
            root["chat_template"] = read_chat_template(chat_template)
        self.root_key = settings_key(root)
        self.pad = pad_token_id(self.tokenizer)
        self._encoded: dict[str, list[list[int]]] = {}
        self._cached: dict[str, Any] = {}
        # One memo of generations for the whole run: the same (model state, prompts, sampling,
        # seed, budget) is generated once, e.g. the greedy harmful completions the mechanism
        # stage and the vanilla attack both need. Keyed by a fingerprint of the weights and hooks.
        self.memo = GenerationCache()

    def _filter_prompts(self) -> None:
        """Arditi et al.'s filter: keep harmful prompts the base refuses and harmless ones it does not.

        Applied to the extraction and validation splits only; the held-out test prompts stay as
        they are, so rates on them are not conditioned on the base model's behaviour.
        """
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
        settings: Mapping[str, Any],
        upstream: Sequence[str],
        compute: Callable[[Path], Any],
        load: Callable[[Path], Any],
    ) -> tuple[Any, str]:
        """Load stage ``name`` if done with the same key and its files verify, else compute it.

        Returns ``(value, key)`` where ``key`` chains the settings key with the hashes of the
        stage's files: downstream stages keyed on it are redone when a recomputation produced
        different files, and stay valid (if their own files verify) when it produced the same.
        """
        key = settings_key(dict(settings), self.root_key, *upstream)
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

    def once(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time ``name`` is asked for, the same value afterwards."""
        if name not in self._cached:
            self._cached[name] = compute()
        return self._cached[name]

    def encoded(self, split: str) -> list[list[int]]:
        if split not in self._encoded:
            self._encoded[split] = encode_prompts(
                self.tokenizer, self.prompts[split], require_post_instruction=True
            )
        return self._encoded[split]

    def generate(self, model: nn.Module, prompts: Sequence[str]) -> list[str]:
        """Greedy completions at the study's budget, memoised for the whole run."""
        return generate(
            model,
            self.tokenizer,
            list(prompts),
            max_new_tokens=self.config.max_new_tokens,
            batch_size=self.config.batch_size,
            progress=False,
            cache=self.memo,
        )

    def refused(self, prompts: Sequence[str], completions: Sequence[str]) -> list[bool]:
        """Per prompt: did the model refuse? A degenerate completion is no refusal."""
        return [v == "refused" for v in classify(self.refusal_judge, list(prompts), list(completions))]

    def compression_base(self) -> nn.Module:
        """A copy of the base in the dtype compression runs in, owned by the caller (it may modify it).

        Masks, scale searches and quantization grids are computed from float32 weights (float64
        stays float64): in bfloat16, AWQ's search moved the quantized weights of the real model
        by 5.7 %. A bfloat16 or float16 study therefore loads a fresh float32 copy of the base for
        each compression (nothing float32 is kept between methods: for the 1.5B real model a kept copy
        plus its working copy were 14 GB beside the 3.5 GB study model), compresses that, saves the
        float32 result, and casts it to the study's dtype to evaluate.
        """
        if self.compression_dtype == self.model_dtype:
            return copy.deepcopy(self.model)
        c = self.config
        model, _ = load_model(c.model, device=c.device, dtype=self.compression_dtype)
        return model

    def compression_base_identity(self) -> dict[str, Any]:
        """:func:`model_identity` of :meth:`compression_base` (computed once)."""
        if self.compression_dtype == self.model_dtype:
            return self.identity
        return self.once("compression_base_identity", lambda: model_identity(self.compression_base()))

    def to_study_dtype(self, model: nn.Module) -> nn.Module:
        """``model`` (compressed in float32) cast to the study's dtype; quantization buffers keep theirs."""
        return (
            model if self.compression_dtype == self.model_dtype else cast_floating_(model, self.model_dtype)
        )


def default_refusal_token_ids(spec: str, tokenizer: Any) -> list[int]:
    """The refusal token ids the study uses for model ``spec``: the toy's own, else the family's."""
    if spec in TOY_MODELS:
        return list(toy_refusal_token_ids(spec))
    return list(refusal_token_ids_for(tokenizer))


# ----------------------------------------------------------------------------
# directions
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseDirection:
    """The base model's candidates, split-half noise floor per site, selection and selected direction.

    ``key`` is the selection stage's output key: what every step using the direction depends on.
    """

    candidates: DirectionCandidates
    noise: torch.Tensor
    selection: SelectionResult
    key: str

    @property
    def layer(self) -> int:
        return int(self.selection.source[0])

    @property
    def position_index(self) -> int:
        return int(self.selection.source[1])

    @property
    def position(self) -> int:
        return int(self.selection.positions[self.position_index])

    @property
    def r(self) -> torch.Tensor:
        """The selected difference in means (as extracted: float64)."""
        return self.candidates.directions[self.layer, self.position_index]

    @property
    def norm(self) -> float:
        return float(torch.linalg.vector_norm(self.r.to(torch.float64)))

    @property
    def noise_at_source(self) -> float:
        return float(self.noise[self.layer, self.position_index])


def _load_tensor(path: Path, key: str) -> torch.Tensor:
    try:
        return load_file(str(path))[key]
    except Exception as exc:
        raise ArtifactError(f"{path} is missing or corrupt: {exc}") from exc


def base_direction(bench: Bench) -> BaseDirection:
    """The base model's candidates and split-half noise floor (one forward pass), then the selection."""
    c = bench.config

    def compute(d: Path) -> tuple[DirectionCandidates, torch.Tensor]:
        cands, floor = extract_candidates_with_noise_floor(
            bench.model,
            bench.tokenizer,
            bench.prompts["harmful_train"],
            bench.prompts["harmless_train"],
            n_splits=c.noise_splits,
            seed=c.seed,
            batch_size=c.batch_size,
            progress=bench.progress,
        )
        atomic_write_tensors(d / "noise.safetensors", {"noise_floor": floor.contiguous()})
        cands.save(d / "candidates")
        return cands, floor

    def load(d: Path) -> tuple[DirectionCandidates, torch.Tensor]:
        cands = DirectionCandidates.load(d / "candidates", expect_identity=bench.identity)
        return cands, _load_tensor(d / "noise.safetensors", "noise_floor")

    settings = {"batch_size": c.batch_size, "noise_splits": c.noise_splits}
    (cands, floor), k_ext = bench.stage("base/extract", settings, [], compute, load)
    sel, k_sel = select(bench, "base", bench.model, cands, [k_ext])
    return BaseDirection(cands, floor, sel, k_sel)


def extract(
    bench: Bench, name: str, model: nn.Module, upstream: Sequence[str]
) -> tuple[DirectionCandidates, str]:
    """Candidate directions of ``model`` on the training prompts (stage ``name/extract``)."""

    def compute(d: Path) -> DirectionCandidates:
        cands = extract_candidates(
            model,
            bench.tokenizer,
            bench.prompts["harmful_train"],
            bench.prompts["harmless_train"],
            batch_size=bench.config.batch_size,
            progress=bench.progress,
        )
        cands.save(d / "candidates")
        return cands

    ident = model_identity(model)
    return bench.stage(
        f"{name}/extract",
        {"batch_size": bench.config.batch_size},
        upstream,
        compute,
        lambda d: DirectionCandidates.load(d / "candidates", expect_identity=ident),
    )


def select(
    bench: Bench, name: str, model: nn.Module, cands: DirectionCandidates, upstream: Sequence[str]
) -> tuple[SelectionResult, str]:
    """Arditi et al.'s selection among ``cands`` on the validation prompts (stage ``name/select``)."""

    def compute(d: Path) -> SelectionResult:
        res = select_direction(
            model,
            bench.tokenizer,
            cands,
            bench.prompts["harmful_val"],
            bench.prompts["harmless_val"],
            bench.refusal_ids,
            bench.config.selection,
            progress=bench.progress,
        )
        res.save(d / "selection")
        return res

    ident = model_identity(model)
    return bench.stage(
        f"{name}/select",
        asdict(bench.config.selection),
        upstream,
        compute,
        lambda d: SelectionResult.load(d / "selection", expect_identity=ident),
    )


def mechanism(
    bench: Bench, name: str, model: nn.Module, r: torch.Tensor, layer: int, upstream: Sequence[str]
) -> tuple[dict[str, list[bool]], str]:
    """Refusal on harmful test prompts as is and with ``r`` ablated, and on harmless ones with ``r``
    added at ``layer`` (stage ``name/mechanism``).

    Per-prompt flags are kept (keys :data:`~refusal_core.study.results.MECHANISM_FLAGS`) so that
    paired tests can be computed later.
    """

    def compute(d: Path) -> dict[str, list[bool]]:
        harmful, harmless = bench.prompts["harmful_test"], bench.prompts["harmless_test"]
        r_m = r.to(next(model.parameters()).dtype)
        with ablation_hooks(model, r_m):
            abl = bench.generate(model, harmful)
        with addition_hooks(model, r_m, 1.0, layer):
            add = bench.generate(model, harmless)
        base_h = bench.generate(model, harmful)
        flags = (bench.refused(harmful, base_h), bench.refused(harmful, abl), bench.refused(harmless, add))
        out = dict(zip(MECHANISM_FLAGS, flags))
        atomic_write_json(d / "mechanism.json", out)
        return out

    return bench.stage(
        f"{name}/mechanism",
        {"max_new_tokens": bench.config.max_new_tokens, "layer": layer},
        upstream,
        compute,
        lambda d: read_stage_json(d / "mechanism.json"),
    )


@dataclass(frozen=True)
class Analysis:
    """A candidate model re-extracted, re-selected and compared with the base direction.

    ``mechanism`` holds the per-prompt flags of its OWN direction at its own source (None when
    the caller measures another direction's mechanism, as the audit does).
    """

    candidates: DirectionCandidates
    selection: SelectionResult
    comparison: DirectionComparison
    cosine_by_layer: list[float]
    mechanism: dict[str, list[bool]] | None
    key: str

    @property
    def layer(self) -> int:
        return int(self.selection.source[0])

    @property
    def source(self) -> list[int]:
        layer, pi = self.selection.source
        return [int(layer), int(self.selection.positions[pi])]

    def variant_fields(self) -> dict[str, Any]:
        """The analysis fields of a :class:`~refusal_core.study.results.VariantResult`."""
        cmp = self.comparison
        return {
            "source": self.source,
            "source_shift": list(cmp.source_shift) if cmp.source_shift is not None else None,
            "cosine_at_base_source": finite_or_none(cmp.cosine_at_base_source),
            "cosine_selected": finite_or_none(cmp.selected_cosine),
            "filters_passed": self.selection.selected is not None,
            "mechanism": MechanismSummary.from_flags(self.mechanism) if self.mechanism is not None else None,
        }


def analyse(
    bench: Bench,
    name: str,
    model: nn.Module,
    base: BaseDirection,
    upstream: Sequence[str],
    *,
    own_mechanism: bool = True,
) -> Analysis:
    """Extract, select and compare ``model``'s direction with the base's; with ``own_mechanism``,
    also the necessity and sufficiency of its own direction at its own source."""
    cands, k_e = extract(bench, name, model, upstream)
    sel, k_s = select(bench, name, model, cands, [*upstream, k_e])
    layer, pi = sel.source
    cmp = compare_candidates(
        base.candidates,
        cands,
        base_source=(base.layer, base.position),
        other_source=(layer, sel.positions[pi]),
    )
    cmp.save(bench.store.stage_dir(f"{name}/extract") / "comparison")
    mech = None
    if own_mechanism:
        mech, _ = mechanism(bench, name, model, cands.directions[layer, pi], layer, [*upstream, k_s])
    per_layer = [float(v) for v in cmp.per_site_cosine[:, base.position_index]]
    return Analysis(cands, sel, cmp, per_layer, mech, k_s)


# ----------------------------------------------------------------------------
# compression
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Compressed:
    """A compressed copy of the base (in the study's dtype), its record and its stage key."""

    method: str
    model: nn.Module
    record: CompressionRecord
    key: str


def compress(bench: Bench, method: str) -> Compressed:
    """The base compressed by ``method`` on the calibration prompts (stage ``method/compress``)."""
    cfg = method_config(method)
    calibration = calibration_token_ids(bench.tokenizer, bench.config.calibration, bench.config.n_calibration)

    def compute(d: Path) -> tuple[nn.Module, CompressionRecord]:
        model = bench.compression_base()
        record = compress_(
            model, cfg, calibration, batch_size=bench.config.batch_size, progress=bench.progress
        )
        save_model_weights(model, d / "weights.safetensors")
        record.save(d / "record")
        return bench.to_study_dtype(model), record

    def load(d: Path) -> tuple[nn.Module, CompressionRecord]:
        record = CompressionRecord.load(d / "record", expect_identity=bench.compression_base_identity())
        return bench.to_study_dtype(_restore(bench, cfg, calibration, d / "weights.safetensors")), record

    # keyed by the data, not the spelling: `harmless` and `harmless_train` share a stage, an edited
    # prompt file does not
    settings = {"config": config_to_dict(cfg), "calibration": calibration_key(bench.config.calibration)}
    (model, record), key = bench.stage(f"{method}/compress", settings, [], compute, load)
    return Compressed(method, model, record, key)


def _completed_stage_dir(study_dir: str | Path, name: str) -> Path:
    """The directory of stage ``name`` of the study in ``study_dir``, after checking the stage is
    complete and its files have their recorded SHA-256 (:class:`ArtifactError` otherwise)."""
    store = StageStore(Path(study_dir) / "stages")
    store.verify(name)
    return store.stage_dir(name)


def saved_compression(study_dir: str | Path, method: str) -> tuple[Path, CompressionRecord]:
    """The weights file and the record that the completed stage ``method/compress`` of the study in
    ``study_dir`` saved (float32 state dict of the compressed model). Raises :class:`ArtifactError`
    when the stage is not complete or a file no longer has its recorded SHA-256."""
    d = _completed_stage_dir(study_dir, f"{method}/compress")
    return d / "weights.safetensors", CompressionRecord.load(d / "record")


def saved_flags(study_dir: str | Path, variant: str) -> dict[str, list[bool]]:
    """Per-prompt flags of the completed evaluation of ``variant`` in the study in ``study_dir``:
    ``asr:<attack>`` (jailbroken) and ``over_refusal`` (harmless prompt refused), in prompt order.
    Raises :class:`ArtifactError` when the stage is not complete or a file was altered."""
    doc = read_stage_json(_completed_stage_dir(study_dir, f"eval/{variant}") / "evaluation.json")
    out = {f"asr:{a}": [bool(x) for x in flags] for a, flags in sorted(doc["jailbroken"].items())}
    out["over_refusal"] = [bool(x) for x in doc["refused_harmless"]]
    return out


def _restore(bench: Bench, cfg: Any, calibration: list[list[int]], path: Path) -> nn.Module:
    """Rebuild a compressed model from saved weights (re-creating quantized modules if any).

    The saved tensors are copied in one at a time from the memory-mapped file, so restoring a model
    costs one copy of it, not two.
    """
    model = bench.compression_base()
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(model.state_dict()):
                # The method replaced modules (e.g. int8): rebuild the structure, then load the saved values.
                compress_(model, cfg, calibration, batch_size=bench.config.batch_size)
            target = model.state_dict()
            if names != set(target):
                missing, extra = sorted(set(target) - names), sorted(names - set(target))
                raise ArtifactError(
                    f"compressed weights {path} do not fit the model: "
                    f"missing {missing[:3]}, unexpected {extra[:3]}"
                )
            with torch.no_grad():
                for name, tensor in target.items():
                    saved = f.get_tensor(name)
                    if saved.shape != tensor.shape:
                        raise ArtifactError(
                            f"compressed weights {path} do not fit the model: {name} has shape "
                            f"{tuple(saved.shape)}, the model {tuple(tensor.shape)}"
                        )
                    tensor.copy_(saved)
    except RefusalCoreError:
        raise
    except Exception as exc:  # safetensors raises its own errors (and OSError) for a missing or bad file
        raise ArtifactError(f"compressed weights {path} are missing or corrupt: {exc}") from exc
    return model


def sparsity(model: nn.Module) -> float:
    """The share of zero weights in ``model``'s linear layers."""
    return float(model_sparsity_of(model)[0])


# ----------------------------------------------------------------------------
# repair
# ----------------------------------------------------------------------------


def apply_repair_(
    model: nn.Module,
    r: torch.Tensor,
    block: int,
    config: AirdConfig,
    *,
    base_identity: Mapping[str, Any] | None = None,
    method: str | None = None,
    compression: CompressionConfig | None = None,
    record_identity: bool = True,
) -> dict[str, Any]:
    """AIRD with ``r`` on block ``block``'s writers of ``model``, in place: the ONE place an edit is applied.

    The edit goes through :func:`~refusal_core.repair.repair_`, which keeps the storage of the
    compression ``method`` that made ``model`` (zeros of a pruned model unless ``config`` is the dense
    arm, i.e. ``preserve_sparsity`` False; quantized modules re-quantized by their scheme; AWQ / GGUF
    weights put back on their grid), ``compression`` its exact config when not the name's default;
    ``method`` None: the writers' modules decide. With
    ``base_identity`` the direction's origin is checked first: ``r`` must come from that base (AIRD's
    recipe). Which block to edit (the placement) is the caller's decision. ``record_identity`` False
    skips hashing the edited model for the record (the sweep, which undoes the edit). Returns the
    edit's record as a JSON-able dict with ``path`` saying how the weights were written.
    """
    if base_identity is not None:
        check_direction_origin(
            dict(base_identity), model, model_record={"base_identity": dict(base_identity)}
        )
    dense = method is not None and method_spec(method).prunes and not config.preserve_sparsity
    rec = repair_(
        model,
        r,
        block,
        config,
        method=method,
        dense=dense,
        compression=compression,
        record_identity=record_identity,
    )
    rule = rec.repair["rule"] if rec.repair is not None else "float"
    return {**rec.to_dict(), "path": REPAIR_PATHS[rule]}


#: How each repair rule (refusal_core.repair) reaches the saved weights, in words.
REPAIR_PATHS = {
    "float": "dense float",
    "dense-edit": "dense float (zeros lost)",
    "keep-zeros": "sparsity-preserving",
    "module-scheme": "dequantize, edit, re-quantize",
    "weight-groups": "edit, round onto the group grid",
    "gguf-blocks": "edit, re-quantize to the GGUF block type",
}


@dataclass(frozen=True)
class RepairPlan:
    """One AIRD repair: a strength (``config``), the source layers it repairs and the placement.

    ``placement`` (:data:`PLACEMENTS`): ``"source-block"`` edits each source layer's own block,
    ``"into-source"`` the block before it (its output is the residual stream where r was
    measured).
    """

    config: AirdConfig
    layers: tuple[int, ...]
    placement: str = "source-block"

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise InvalidArgumentError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")

    @property
    def edit_blocks(self) -> tuple[int, ...]:
        """The blocks whose writers are edited."""
        if self.placement == "source-block":
            return self.layers
        if any(layer == 0 for layer in self.layers):
            raise InvalidArgumentError(
                "into-source at layer 0: block 0's input is the embedding, no block writes into it"
            )
        return tuple(layer - 1 for layer in self.layers)

    def key_settings(self) -> dict[str, Any]:
        """What a stage keyed on this repair depends on (source-block keeps the old spelling)."""
        out: dict[str, Any] = {"aird": asdict(self.config), "layers": list(self.layers)}
        if self.placement != "source-block":
            out["placement"] = self.placement
        return out


def repair_refusal(
    model: nn.Module, layer: int, method: str | None, compression: CompressionConfig | None = None
) -> str | None:
    """Why :func:`~refusal_core.repair.repair_` would refuse to repair ``model`` (made by ``method``, with
    config ``compression``) at ``layer`` while keeping its storage, in one line; None when it can."""
    try:
        plan_repair(model, layer, method=method, compression=compression)
    except UnsupportedModuleError as exc:
        return str(exc)
    return None


def repaired(
    bench: Bench,
    model: nn.Module,
    r: torch.Tensor,
    plan: RepairPlan,
    *,
    method: str | None = None,
    compression: CompressionConfig | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` (made by compression ``method``, with config ``compression`` when not the
    name's default) repaired by ``plan`` with the BASE direction ``r`` (origin checked), keeping the
    method's storage."""
    out = copy.deepcopy(model)
    return out, _apply_plan_(bench, out, r, plan, method=method, compression=compression)


def _apply_plan_(
    bench: Bench,
    model: nn.Module,
    r: torch.Tensor,
    plan: RepairPlan,
    *,
    method: str | None,
    compression: CompressionConfig | None,
    check_origin: bool = True,
) -> dict[str, Any]:
    """``plan``'s edits applied to ``model`` in place; returns the repair's record. ``check_origin``
    False: the caller has checked once that ``r`` is the base's, and the records carry no identity
    (the sweep, which undoes every edit)."""
    records = [
        apply_repair_(
            model,
            r,
            b,
            plan.config,
            base_identity=bench.identity if check_origin else None,
            method=method,
            compression=compression,
            record_identity=check_origin,
        )
        for b in plan.edit_blocks
    ]
    rec: dict[str, Any] = {"layers": list(plan.edit_blocks), "edits": records}
    if plan.placement != "source-block":
        rec |= {"placement": plan.placement, "source_layers": list(plan.layers)}
    return rec


def point_plan(point: SweepPoint, paper: AirdConfig) -> RepairPlan:
    """The repair a sweep point scored, in the spelling the sweep used (so the gain is exact)."""
    if point.strength == "paper":
        cfg = replace(paper, preserve_sparsity=point.sparse)
    else:
        cfg = AirdConfig(
            gain_attn=point.gains[0],
            gain_mlp=point.gains[1],
            normalize=paper.normalize,
            preserve_sparsity=point.sparse,
        )
    return RepairPlan(cfg, point.source_layers, point.edit)


def sweep_plans(
    config: StudyConfig, sparse: bool, base_layer: int, own_layer: int
) -> list[tuple[str, str, RepairPlan]]:
    """(strength, layer choice, plan) of every non-identity sweep point of one arm, in grid order.

    Layer choices (``base``/``own``/``both``) that give the same layers are tried once; an
    into-source plan at layer 0 does not exist and is left out.
    """
    rc, paper = config.repair, config.aird
    choices: list[tuple[str, tuple[int, ...]]] = []
    for p in rc.layers:
        layers = {"base": (base_layer,), "own": (own_layer,), "both": (base_layer, own_layer)}[p]
        layers = tuple(dict.fromkeys(layers))  # "both" with equal layers is "base"
        if all(layers != seen for _, seen in choices):
            choices.append((p, layers))
    strengths: list[tuple[str, AirdConfig]] = []
    if rc.include_paper_alpha:
        strengths.append(("paper", replace(paper, preserve_sparsity=sparse)))
    for g in rc.gains:
        cfg = AirdConfig(gain_attn=g, gain_mlp=g, normalize=paper.normalize, preserve_sparsity=sparse)
        strengths.append(("gain", cfg))
    return [
        (s, p, RepairPlan(cfg, layers, placement))
        for placement in rc.placements
        for p, layers in choices
        if placement == "source-block" or 0 not in layers
        for s, cfg in strengths
    ]


# ----------------------------------------------------------------------------
# validation scores, the sweep and the choice
# ----------------------------------------------------------------------------


def _base_val_completions(bench: Bench) -> list[list[int]]:
    """The base model's greedy completions (ids) of the harmless validation prompts."""
    return bench.once(
        "base_val_completions",
        lambda: generate_ids(
            bench.model,
            bench.tokenizer,
            bench.encoded("harmless_val"),
            max_new_tokens=bench.config.max_new_tokens,
            batch_size=bench.config.batch_size,
            progress=False,
        ),
    )


def validation_scores(bench: Bench, model: nn.Module) -> ValidationScores:
    """Scores of ``model`` on the validation prompts (never the test prompts)."""
    harm_ids, safe_ids = bench.encoded("harmful_val"), bench.encoded("harmless_val")
    base_logits = bench.once("base_val_logits", lambda: last_token_logits(bench.model, safe_ids, bench.pad))
    lh = last_token_logits(model, harm_ids, bench.pad)
    ls = last_token_logits(model, safe_ids, bench.pad)
    sh, ss = refusal_score(lh, bench.refusal_ids), refusal_score(ls, bench.refusal_ids)
    kl = float(kl_divergence(_logp(base_logits), _logp(ls)).mean())
    completions = _base_val_completions(bench)
    keep = [i for i, ids in enumerate(completions) if ids]
    ce = completion_cross_entropy(
        model,
        bench.tokenizer,
        [safe_ids[i] for i in keep],
        [completions[i] for i in keep],
        batch_size=bench.config.batch_size,
    )
    if bench.config.repair.generate:
        harmful, harmless = bench.prompts["harmful_val"], bench.prompts["harmless_val"]
        complied = [bool(v) for v in bench.judge.judge(list(harmful), bench.generate(model, harmful))]
        over = rate_of(bench.refused(harmless, bench.generate(model, harmless)))
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


def validation(bench: Bench, name: str, model: nn.Module, upstream: Sequence[str]) -> ValidationScores:
    """:func:`validation_scores` as a stage (``name/validation``)."""

    def compute(d: Path) -> ValidationScores:
        scores = validation_scores(bench, model)
        atomic_write_json(d / "validation.json", scores.to_dict())
        return scores

    c = bench.config
    settings = {"max_new_tokens": c.max_new_tokens, "generate": c.repair.generate, "judge": c.judge}
    value, _ = bench.stage(
        f"{name}/validation",
        settings,
        upstream,
        compute,
        lambda d: ValidationScores.from_dict(read_stage_json(d / "validation.json")),
    )
    return value


def sweep(
    bench: Bench,
    name: str,
    model: nn.Module,
    base: BaseDirection,
    own_layer: int,
    upstream: Sequence[str],
    *,
    sparse_arm: bool,
    method: str | None = None,
    compression: CompressionConfig | None = None,
) -> list[SweepPoint]:
    """Every AIRD strength × layer choice × placement of the sweep, scored on validation prompts
    (stage ``name/sweep``); the unedited model is the first point. ``sparse_arm`` adds the
    sparsity-preserving edits (for pruned models). Every edit keeps the storage of ``method``
    (config ``compression``), as :func:`repaired` does."""
    arms = (False, True) if sparse_arm else (False,)
    c = bench.config

    def compute(d: Path) -> list[SweepPoint]:
        points = [
            SweepPoint("identity", False, "none", (), (1.0, 1.0), (0.0, 0.0), validation_scores(bench, model))
        ]
        todo = [(sparse, *spec) for sparse in arms for spec in sweep_plans(c, sparse, base.layer, own_layer)]
        # The direction's origin is checked once; each point then edits the model itself and is
        # undone exactly (scoped_edit restores the edited blocks), instead of a deep copy per point
        # and two whole-model hashes per edit: on the 1.5B real tier those were most of a point's time.
        check_direction_origin(bench.identity, model, model_record={"base_identity": bench.identity})
        blocks = get_layout(model).blocks
        for sparse, strength, choice, plan in tqdm(
            todo, desc=f"{name} sweep", disable=not bench.progress, leave=False
        ):
            with scoped_edit([blocks[b] for b in plan.edit_blocks]):
                _apply_plan_(
                    bench, model, base.r, plan, method=method, compression=compression, check_origin=False
                )
                scores = validation_scores(bench, model)
            points.append(
                SweepPoint(
                    strength=strength,
                    sparse=sparse,
                    placement=choice,
                    layers=plan.edit_blocks,
                    gains=plan.config.gains(base.norm),
                    alphas=plan.config.alphas(base.norm),
                    scores=scores,
                    edit=plan.placement,
                )
            )
        atomic_write_json(d / "sweep.json", {"points": [p.to_dict() for p in points]})
        return points

    # The margins only decide the choice, made from these scores afterwards: not part of the key.
    choice_only = {"max_over_refusal_increase", "max_kl_increase", "significance"}
    repair = {k: v for k, v in asdict(c.repair).items() if k not in choice_only}
    settings = {
        "repair": repair,
        "aird": asdict(c.aird),
        "max_new_tokens": c.max_new_tokens,
        "layers": [base.layer, own_layer],
        "judge": c.judge,
        "sparse_arm": sparse_arm,  # the caller's choice: a sweep with and one without it differ
    }
    value, _ = bench.stage(
        f"{name}/sweep",
        settings,
        upstream,
        compute,
        lambda d: [SweepPoint.from_dict(p) for p in read_stage_json(d / "sweep.json")["points"]],
    )
    return list(value)


def choose(
    config: StudyConfig, points: Sequence[SweepPoint], base_val: ValidationScores
) -> dict[str, RepairChoice]:
    """The rule of :class:`~refusal_core.study.config.RepairConfig` applied per arm (``dense``,
    ``sparse``): validation scores only."""
    rc = config.repair
    choices: dict[str, RepairChoice] = {}
    for sparse in sorted({p.sparse for p in points if p.strength != "identity"}):
        arm_points = [p for p in points if p.strength == "identity" or p.sparse == sparse]
        choices["sparse" if sparse else "dense"] = choose_repair(
            arm_points,
            base_val,
            max_over_refusal_increase=rc.max_over_refusal_increase,
            max_kl_increase=rc.max_kl_increase,
            significance=rc.significance,
        )
    return choices


# ----------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------


def _base_test_completions(bench: Bench) -> list[list[int]]:
    """The base model's greedy completions (token ids) of the harmless test prompts (a stage)."""

    def compute(d: Path) -> list[list[int]]:
        ids = generate_ids(
            bench.model,
            bench.tokenizer,
            bench.encoded("harmless_test"),
            max_new_tokens=bench.config.max_new_tokens,
            batch_size=bench.config.batch_size,
            progress=False,
        )
        atomic_write_json(d / "completions.json", {"ids": ids})
        return ids

    value, _ = bench.stage(
        "base/completions",
        {"max_new_tokens": bench.config.max_new_tokens},
        [],
        compute,
        lambda d: [list(map(int, x)) for x in read_stage_json(d / "completions.json")["ids"]],
    )
    return list(value)


def _damage(bench: Bench, model: nn.Module, completions: list[list[int]]) -> dict[str, Any]:
    """KL(base ‖ model) of next-token distributions and cross-entropy of the base's completions.

    The base's own log-probabilities are computed once per bench (same batches, so bit-identical
    to :func:`~refusal_core.evaluation.damage.next_token_kl`).
    """
    harmless = list(bench.prompts["harmless_test"])
    batch = bench.config.batch_size
    keep = [i for i, ids in enumerate(completions) if ids]
    logp = next_token_logp(model, bench.tokenizer, harmless, batch_size=batch)
    base_logp = bench.once(
        "base_test_logp", lambda: next_token_logp(bench.model, bench.tokenizer, harmless, batch_size=batch)
    )
    if logp.shape != base_logp.shape:
        raise ShapeMismatchError(
            f"the variant's next-token distributions have shape {tuple(logp.shape)}, "
            f"the base's {tuple(base_logp.shape)}: they do not share a vocabulary"
        )
    kl = kl_divergence(base_logp, logp)  # KL(base ‖ variant), as next_token_kl(base, variant)
    ce = completion_cross_entropy(
        model, bench.tokenizer, [harmless[i] for i in keep], [completions[i] for i in keep], batch_size=batch
    )
    return {
        "kl_per_prompt": [float(v) for v in kl],
        "ce_per_prompt": [float(v) for v in ce],
        "ce_prompts": keep,
    }


def _zero_shot(bench: Bench, model: nn.Module) -> dict[str, dict[str, Any]]:
    if not bench.config.zero_shot_tasks:
        return {}
    from refusal_core.evaluation.zero_shot import zero_shot_evaluate  # lm-eval's harness: slow to import

    res = zero_shot_evaluate(
        model, bench.tokenizer, tasks=list(bench.config.zero_shot_tasks), progress=bench.progress
    )
    return {
        name: {"accuracy": r.accuracy, "stderr": finite_or_none(r.stderr), "n": r.n_items}
        for name, r in res.items()
    }


def evaluate(
    bench: Bench, name: str, model: nn.Module, upstream: Sequence[str]
) -> tuple[dict[str, Any], str]:
    """ASR per registered attack, over-refusal, damage and zero-shot accuracy on the held-out test
    prompts (stage ``eval/name``)."""
    c = bench.config
    completions = _base_test_completions(bench)

    def compute(d: Path) -> dict[str, Any]:
        # A broken model (NaN/inf weights) would give empty completions: refuse it, never report it.
        check_finite_model(model)
        harmful, harmless = bench.prompts["harmful_test"], bench.prompts["harmless_test"]
        planned = build_attacks(
            c.attacks, max_new_tokens=c.max_new_tokens, batch_size=c.batch_size, seed=c.seed
        )
        # with engine "vllm" the variant is saved as a checkpoint and vLLM generates into the memo
        # (same prompt ids, budget, stop ids and sampling settings); GCG's gradients stay in torch
        engine = open_variant_engine(
            c.engine,
            c.vllm,
            model,
            bench.tokenizer,
            bench.out / "engine_checkpoints" / name,
            base_identity=bench.identity,
            variant=name,
            seed=c.seed,
        )
        try:
            results = run_attacks(
                model,
                bench.tokenizer,
                harmful,
                planned,
                bench.judge,
                bench.memo,
                progress=False,
                engine=engine,
            )
            if engine is not None:  # over-refusal's greedy harmless completions too
                vanilla = VanillaAttack(max_new_tokens=c.max_new_tokens, batch_size=c.batch_size)
                prefill_shared_generations(
                    model, bench.tokenizer, harmless, [vanilla], bench.memo, progress=False, engine=engine
                )
        finally:
            if engine is not None:
                engine.close()
        for attack, res in results.items():
            res.save(d / f"asr_{attack}.json")
        refusal = over_refusal(
            model,
            bench.tokenizer,
            harmless,
            bench.refusal_judge,
            max_new_tokens=c.max_new_tokens,
            batch_size=c.batch_size,
            progress=False,
            cache=bench.memo,
        )
        refusal.save(d / "over_refusal.json")
        answers = [r.completions[0] for r in refusal.records]
        out = {
            # empty or one-word-repeated output: neither a refusal nor a successful attack
            "degenerate": {
                "harmless": sum(map(is_degenerate, answers)),
                **{
                    a: sum(all(is_degenerate(t) for t in r.completions) for r in res.records)
                    for a, res in results.items()
                },
            },
            "jailbroken": {a: [bool(r.jailbroken) for r in res.records] for a, res in results.items()},
            "asr_per_config": {a: res.config_rates for a, res in results.items()},
            "refused_harmless": bench.refused(harmless, answers),
            "damage": _damage(bench, model, completions),
            "accuracy": _zero_shot(bench, model),
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
    return bench.stage(
        f"eval/{name}", settings, upstream, compute, lambda d: read_stage_json(d / "evaluation.json")
    )
