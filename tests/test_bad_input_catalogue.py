"""The bad-input catalogue: one table of bad calls over the API, each with its error and a
check that nothing was modified or written.

Every row is a :class:`Case`: an id, a callable doing the bad call on a fresh :class:`Env`
(a tiny llama, its tokenizer, tensors, calibration ids, a temporary directory, cached
candidates), and the expected error class. Before the call the environment is snapshotted —
every model tensor bit for bit, the module tree, the hooks, every tensor of the env, every file
under the directory — and after the error the snapshot must be the same. ``setup`` prepares
a row (e.g. writes the corrupted file it then loads) before the snapshot is taken.

Adding a row is one line in :data:`CASES`::

    Case("functional/ablate-int-x", lambda e: F.ablate(e.x.long(), e.r), InvalidArgumentError),

``issue`` tags the case class of issue 10 it covers (1 partial modification, 4 broken model,
6 loose scalars and dtypes); ``tests/conftest.py`` prints the number of cases in the summary.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from refusal_core import functional as F
from refusal_core.aird import AirdConfig, apply_aird_
from refusal_core.artifacts import load_artifact, save_artifact
from refusal_core.compression import METHODS, CompressionRecord, compress_, method_config
from refusal_core.directions import extract_candidates
from refusal_core.errors import (
    ArtifactError,
    EmptyInputError,
    ForeignDirectionError,
    InvalidArgumentError,
    NonFiniteError,
    RefusalCoreError,
    ShapeMismatchError,
    ZeroDirectionError,
)
from refusal_core.evaluation.generation import generate
from refusal_core.evaluation.judges import SubstringJudge, classify, is_degenerate
from refusal_core.interventions import ablation_hooks, addition_hooks, orthogonalize_model_
from refusal_core.model import get_layout, load_model, model_identity
from refusal_core.selection import select_direction
from refusal_core.testing.tiny import tiny_model, tiny_prompts, tiny_tokenizer

# ----------------------------------------------------------------------------
# the environment every row runs in, and its snapshot
# ----------------------------------------------------------------------------


@functools.cache
def _base_model() -> nn.Module:
    return tiny_model("llama", n_layers=2, d_model=32, n_heads=2)


@functools.cache
def _unrelated_model() -> nn.Module:
    """The base model's architecture and width with other weights: a direction from it is foreign."""
    return tiny_model("llama", n_layers=2, d_model=32, n_heads=2, seed=7)


@functools.cache
def _base_candidates() -> Any:
    return extract_candidates(_base_model(), tiny_tokenizer(), tiny_prompts(4), tiny_prompts(4, "harmless"))


@dataclass
class Env:
    """What a row may use; everything is fresh (or a deep copy) per row."""

    tmp: Path
    model: nn.Module = field(default_factory=lambda: copy.deepcopy(_base_model()))
    tok: Any = field(default_factory=tiny_tokenizer)
    x: torch.Tensor = field(default_factory=lambda: torch.linspace(-2.0, 2.0, 96).reshape(3, 32))
    r: torch.Tensor = field(default_factory=lambda: torch.linspace(-1.0, 1.0, 32) + 0.1)
    w: torch.Tensor = field(default_factory=lambda: torch.linspace(-1.0, 1.0, 512).reshape(32, 16))
    logits: torch.Tensor = field(default_factory=lambda: torch.linspace(-3.0, 3.0, 16).reshape(2, 8))
    calib: list[list[int]] = field(default_factory=lambda: [[10, 20, 30, 40], [50, 60, 70]])
    candidates: Any = field(default_factory=lambda: copy.deepcopy(_base_candidates()))

    @property
    def layout(self) -> Any:
        return get_layout(self.model)

    def poison_(self, module: nn.Module, which: str = "weight", value: float = math.nan) -> None:
        """Put ``value`` into ``module.<which>`` (adding a zero bias first if it has none)."""
        if which == "bias" and module.bias is None:
            module.bias = nn.Parameter(torch.zeros(module.out_features))
        with torch.no_grad():
            getattr(module, which).reshape(-1)[-1] = value


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def snapshot(env: Env) -> dict[str, Any]:
    model = env.model
    files = {
        str(p.relative_to(env.tmp)): p.read_bytes() if p.is_file() else None
        for p in sorted(env.tmp.rglob("*"))
    }
    tensors = {k: (v.dtype, tuple(v.shape), _bits(v)) for k, v in model.state_dict(keep_vars=True).items()}
    for name in ("x", "r", "w", "logits"):
        t = getattr(env, name)
        tensors[f"env.{name}"] = (t.dtype, tuple(t.shape), _bits(t))
    tensors["env.candidates.directions"] = (None, None, _bits(env.candidates.directions))
    return {
        "tensors": tensors,
        "modules": [(n, type(m).__name__, id(m)) for n, m in model.named_modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "training": [m.training for m in model.modules()],
        "config": model.config.to_dict(),
        "calib": copy.deepcopy(env.calib),
        "files": files,
    }


def _diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out = []
    for key in before:
        if key == "tensors":
            changed = [k for k in before[key] if after[key].get(k) != before[key][k]]
            added = sorted(set(after[key]) - set(before[key]))
            if changed or added:
                out.append(f"tensors changed {changed[:5]} added {added[:5]}")
        elif before[key] != after[key]:
            out.append(f"{key} changed")
    return out


# ----------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad call: ``call(env)`` must raise ``error`` and leave ``env`` as it was."""

    id: str
    call: Callable[[Env], object]
    error: type[RefusalCoreError]
    issue: str = ""  # issue 10's case class: "1", "4", "6" (or "" for the older classes)
    setup: Callable[[Env], None] | None = None
    known_gap: str = ""  # a known, reported failure: the row runs as a strict xfail until fixed


def _k_bias_1(e: Env) -> None:
    e.poison_(e.layout.linears(1)["k_proj"], "bias")


def _norm_1(e: Env) -> None:
    e.poison_(e.layout.blocks[1].input_layernorm, "weight", math.inf)


def _embedding_column(e: Env) -> None:
    """-inf in column 0 of every embedding row, so every prompt's activations are non-finite."""
    with torch.no_grad():
        e.layout.embedding.weight[:, 0] = -math.inf


def _o_bias_0(e: Env) -> None:
    e.poison_(e.layout.attn_out(0), "bias")


def _saved_artifact(e: Env) -> None:
    save_artifact(e.tmp / "art", tensors={"v": torch.ones(4)}, meta={"kind": "test"})


def _corrupt_json(e: Env) -> None:
    _saved_artifact(e)
    (e.tmp / "art.json").write_text("{ not json")


def _truncate_tensors(e: Env) -> None:
    _saved_artifact(e)
    path = e.tmp / "art.safetensors"
    path.write_bytes(path.read_bytes()[:20])


def _flip_tensor_bit(e: Env) -> None:
    """One bit of the tensor payload flipped: the file still parses, only its hash tells."""
    _saved_artifact(e)
    path = e.tmp / "art.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_json_value(e: Env) -> None:
    """A value of the metadata edited by hand: valid JSON, wrong content hash."""
    import json

    _saved_artifact(e)
    path = e.tmp / "art.json"
    doc = json.loads(path.read_text())
    doc["meta"]["kind"] = "edited"
    path.write_text(json.dumps(doc))


def _compress(name: str, calib: bool = True) -> Callable[[Env], object]:
    return lambda e: compress_(e.model, METHODS[name], e.calib if calib else None)


OVERFLOWING = torch.full((32,), 1.5e308, dtype=torch.float64)


def _saved_checkpoint(e: Env) -> Path:
    from refusal_core.checkpoint import save_checkpoint

    return Path(save_checkpoint(e.model, e.tok, e.tmp / "ckpt", record={"method": None}))


def _relabelled_format(e: Env) -> None:
    """Issue 20: a dense checkpoint's record edited by hand to claim another storage format."""
    import json

    record = _saved_checkpoint(e) / "refusal_core.json"
    doc = json.loads(record.read_text())
    doc["format"] = "dequantized-simulation" if doc["format"] == "dense" else "dense"
    record.write_text(json.dumps(doc, indent=2))


def _text_named_gguf(e: Env) -> None:
    (e.tmp / "model.gguf").write_text("this is a text file, not a GGUF model\n")


def _load_gguf_with_cache_in_tmp(e: Env) -> object:
    """Load the fake .gguf with the conversion cache under the snapshotted folder (a left-behind
    cache folder shows up as a written file)."""
    import os

    from refusal_core.model.loading import CACHE_ENV_VAR

    saved = os.environ.get(CACHE_ENV_VAR)
    os.environ[CACHE_ENV_VAR] = str(e.tmp / "cache")
    try:
        return load_model(str(e.tmp / "model.gguf"))
    finally:
        if saved is None:
            os.environ.pop(CACHE_ENV_VAR, None)
        else:
            os.environ[CACHE_ENV_VAR] = saved


def _not_a_model_dir(e: Env) -> None:
    (e.tmp / "notes").mkdir()
    (e.tmp / "notes" / "readme.txt").write_text("not a model\n")


def _mismatched_shapes(e: Env) -> None:
    """A model directory whose config.json says a wider MLP than its weights have."""
    import json

    e.model.save_pretrained(e.tmp / "mism")
    e.tok.save_pretrained(e.tmp / "mism")
    config = json.loads((e.tmp / "mism" / "config.json").read_text())
    config["intermediate_size"] *= 2
    (e.tmp / "mism" / "config.json").write_text(json.dumps(config))


def _awq_scale(value: float) -> Callable[[Env], object]:
    from refusal_core.compression.quantization import apply_awq_scale_

    def call(e: Env) -> object:
        block = e.layout.blocks[0]
        qkv = [e.layout.linears(0)[n] for n in ("q_proj", "k_proj", "v_proj")]
        return apply_awq_scale_(block.input_layernorm, qkv, torch.full((32,), value, dtype=torch.float64))

    return call


CASES: tuple[Case, ...] = (
    # --- functional core: integer/boolean tensors, loose scalars, ids, overflowing norms (issue 10.6) ---
    Case("functional/ablate-int-x", lambda e: F.ablate(e.x.long(), e.r), InvalidArgumentError, "6"),
    Case("functional/ablate-bool-r", lambda e: F.ablate(e.x, e.r > 0), InvalidArgumentError, "6"),
    Case("functional/ablate-overflowing-norm", lambda e: F.ablate(e.x, OVERFLOWING), NonFiniteError, "6"),
    Case("functional/ablate-zero-r", lambda e: F.ablate(e.x, e.r * 0), ZeroDirectionError),
    Case("functional/ablate-width", lambda e: F.ablate(e.x, e.r[:5]), ShapeMismatchError),
    Case("functional/add-coeff-str", lambda e: F.add_direction(e.x, e.r, "0.1"), InvalidArgumentError, "6"),
    Case("functional/add-coeff-none", lambda e: F.add_direction(e.x, e.r, None), InvalidArgumentError, "6"),
    Case("functional/add-coeff-bool", lambda e: F.add_direction(e.x, e.r, True), InvalidArgumentError, "6"),
    Case(
        "functional/add-coeff-tensor",
        lambda e: F.add_direction(e.x, e.r, torch.tensor([1.0, 2.0])),
        InvalidArgumentError,
        "6",
    ),
    Case("functional/add-coeff-nan", lambda e: F.add_direction(e.x, e.r, math.nan), NonFiniteError),
    Case("functional/aird-alpha-str", lambda e: F.aird_update(e.w, e.r, "0.02"), InvalidArgumentError, "6"),
    Case("functional/aird-alpha-1e40", lambda e: F.aird_update(e.w, e.r, 1e40), NonFiniteError, "4"),
    Case("functional/aird-int-w", lambda e: F.aird_update(e.w.int(), e.r, 0.1), InvalidArgumentError, "6"),
    Case(
        "functional/orth-weight-overflow",
        lambda e: F.orthogonalize_weight(e.w, OVERFLOWING),
        NonFiniteError,
        "6",
    ),
    Case(
        "functional/llm-int8-threshold-none",
        lambda e: F.llm_int8_linear(e.x, e.w.T, None),
        InvalidArgumentError,
        "6",
    ),
    Case(
        "functional/magnitude-sparsity-str", lambda e: F.magnitude_mask(e.w, "0.5"), InvalidArgumentError, "6"
    ),
    Case("functional/magnitude-sparsity-1", lambda e: F.magnitude_mask(e.w, 1.0), InvalidArgumentError),
    Case(
        "functional/wanda-int-norms",
        lambda e: F.wanda_mask(e.w, torch.ones(16, dtype=torch.long), 0.5),
        InvalidArgumentError,
        "6",
    ),
    Case("functional/int8-bool-w", lambda e: F.int8_quantize(e.w > 0), InvalidArgumentError, "6"),
    Case("functional/pseudo-int-w", lambda e: F.pseudo_quantize(e.w.long(), 4, 4), InvalidArgumentError, "6"),
    Case(
        "functional/dim-int-sets",
        lambda e: F.difference_in_means(e.x.long(), e.x.long()),
        InvalidArgumentError,
        "6",
    ),
    Case(
        "functional/cosine-overflow",
        lambda e: F.cosine_similarity(OVERFLOWING, OVERFLOWING),
        NonFiniteError,
        "6",
    ),
    Case("functional/score-id-1.7", lambda e: F.refusal_score(e.logits, [1.7]), InvalidArgumentError, "6"),
    Case(
        "functional/score-id-float-tensor",
        lambda e: F.refusal_score(e.logits, torch.tensor([1.0])),
        InvalidArgumentError,
        "6",
    ),
    Case("functional/score-id-vocab", lambda e: F.refusal_score(e.logits, [8]), InvalidArgumentError, "6"),
    Case("functional/score-ids-empty", lambda e: F.refusal_score(e.logits, []), EmptyInputError),
    # --- compression: validation before mutation, all or nothing (issue 10.1) ---
    Case("compress/int8-nan-k-bias-1", _compress("llm-int8"), NonFiniteError, "1", _k_bias_1),
    Case("compress/wanda-nan-k-bias-1", _compress("wanda"), NonFiniteError, "1", _k_bias_1),
    Case("compress/magnitude-nan-k-bias-1", _compress("magnitude"), NonFiniteError, "1", _k_bias_1),
    Case("compress/awq-nan-k-bias-1", _compress("awq-w8"), NonFiniteError, "1", _k_bias_1),
    Case("compress/bnb-int8-nan-k-bias-1", _compress("bnb-int8"), NonFiniteError, "1", _k_bias_1),
    Case("compress/wanda-inf-norm-1", _compress("wanda"), NonFiniteError, "1", _norm_1),
    Case("compress/int8-inf-norm-1", _compress("llm-int8"), NonFiniteError, "1", _norm_1),
    Case("compress/awq-inf-embedding", _compress("awq-w4"), NonFiniteError, "1", _embedding_column),
    Case(
        "compress/wanda-id-outside-vocab",
        lambda e: compress_(e.model, METHODS["wanda"], [[5, 10**6]]),
        InvalidArgumentError,
        "1",
    ),
    Case("compress/wanda-no-calibration", _compress("wanda", calib=False), InvalidArgumentError),
    Case("compress/config-not-a-config", lambda e: compress_(e.model, "wanda"), InvalidArgumentError),
    Case("compress/sparsity-suffix-1.5", lambda e: method_config("magnitude@1.5"), InvalidArgumentError, "6"),
    # --- AIRD and orthogonalization ---
    Case(
        "aird/nan-o-bias-0",
        lambda e: apply_aird_(e.model, e.r, 0),
        NonFiniteError,
        "1",
        _o_bias_0,
    ),
    Case("aird/inf-norm-elsewhere", lambda e: apply_aird_(e.model, e.r, 0), NonFiniteError, "1", _norm_1),
    Case(
        "aird/alpha-attn-1e40",
        lambda e: apply_aird_(e.model, e.r, 0, AirdConfig(alpha_attn=1e40)),
        NonFiniteError,
        "4",
    ),
    Case(
        "aird/alpha-mlp-1e40-after-o-proj",
        lambda e: apply_aird_(e.model, e.r, 0, AirdConfig(alpha_mlp=1e40)),
        NonFiniteError,
        "1",
    ),
    Case(
        "aird/alpha-str",
        lambda e: apply_aird_(e.model, e.r, 0, AirdConfig(alpha_attn="0.02")),
        InvalidArgumentError,
        "6",
    ),
    Case("aird/layer-out-of-range", lambda e: apply_aird_(e.model, e.r, 2), InvalidArgumentError),
    Case(
        "orthogonalize/nan-k-bias-1",
        lambda e: orthogonalize_model_(e.model, e.r),
        NonFiniteError,
        "1",
        _k_bias_1,
    ),
    Case(
        "orthogonalize/int-r", lambda e: orthogonalize_model_(e.model, e.r.long()), InvalidArgumentError, "6"
    ),
    # --- hooks: nothing registered when the arguments are bad ---
    Case("hooks/ablation-zero-r", lambda e: ablation_hooks(e.model, e.r * 0), ZeroDirectionError),
    Case("hooks/ablation-int-r", lambda e: ablation_hooks(e.model, e.r.long()), InvalidArgumentError, "6"),
    Case("hooks/ablation-overflow-r", lambda e: ablation_hooks(e.model, OVERFLOWING), NonFiniteError, "6"),
    Case(
        "hooks/addition-coeff-str", lambda e: addition_hooks(e.model, e.r, "1", 0), InvalidArgumentError, "6"
    ),
    Case("hooks/addition-layer-9", lambda e: addition_hooks(e.model, e.r, 1.0, 9), InvalidArgumentError),
    # --- directions and selection ---
    Case(
        "extract/empty-harmless",
        lambda e: extract_candidates(e.model, e.tok, tiny_prompts(2), []),
        EmptyInputError,
    ),
    Case(
        "extract/non-str-prompt",
        lambda e: extract_candidates(e.model, e.tok, ["ok", 3], tiny_prompts(2)),
        InvalidArgumentError,
    ),
    Case(
        "extract/nan-embedding",
        lambda e: extract_candidates(e.model, e.tok, tiny_prompts(2), tiny_prompts(2, "harmless")),
        NonFiniteError,
        "4",
        _embedding_column,
    ),
    Case(
        "select/refusal-id-1.7",
        lambda e: select_direction(e.model, e.tok, e.candidates, ["a"], ["b"], [1.7]),
        InvalidArgumentError,
        "6",
    ),
    Case(
        "select/refusal-id-outside-vocab",
        lambda e: select_direction(e.model, e.tok, e.candidates, ["a"], ["b"], [10**6]),
        InvalidArgumentError,
        "6",
    ),
    Case(
        "select/empty-harmful-val",
        lambda e: select_direction(e.model, e.tok, e.candidates, [], ["b"], [11]),
        EmptyInputError,
    ),
    # --- foreign directions (issue 10, item 5): same width, other weights ---
    Case(
        "select/candidates-from-another-model",
        lambda e: select_direction(_unrelated_model(), e.tok, e.candidates, ["a"], ["b"], [11]),
        ForeignDirectionError,
        "5",
    ),
    Case(
        "aird/direction-from-another-model",
        lambda e: apply_aird_(
            e.model,
            e.candidates.directions[1, -1],
            1,
            AirdConfig(),
            direction_identity=model_identity(_unrelated_model()),
        ),
        ForeignDirectionError,
        "5",
    ),
    # --- generation ---
    Case(
        "generate/max-new-tokens-0",
        lambda e: generate(e.model, e.tok, ["hi"], max_new_tokens=0, progress=False),
        InvalidArgumentError,
        "6",
    ),
    Case(
        "generate/max-new-tokens-bool",
        lambda e: generate(e.model, e.tok, ["hi"], max_new_tokens=True, progress=False),
        InvalidArgumentError,
        "6",
    ),
    Case(
        "generate/instructions-str",
        lambda e: generate(e.model, e.tok, "hi", max_new_tokens=2, progress=False),
        InvalidArgumentError,
    ),
    # --- judges ---
    Case("judges/length-mismatch", lambda e: SubstringJudge().judge(["a", "b"], ["x"]), InvalidArgumentError),
    Case("judges/min-words-negative", lambda e: SubstringJudge(min_words=-1), InvalidArgumentError, "6"),
    Case(
        "judges/non-str-completion", lambda e: SubstringJudge().classify(["a"], [None]), InvalidArgumentError
    ),
    Case("judges/is-degenerate-none", lambda e: is_degenerate(None), InvalidArgumentError, "4"),
    Case(
        "judges/classify-length", lambda e: classify(SubstringJudge(), ["a"], []), InvalidArgumentError, "4"
    ),
    # --- artifacts ---
    Case("artifacts/missing", lambda e: load_artifact(e.tmp / "nothing"), ArtifactError),
    Case("artifacts/corrupt-json", lambda e: load_artifact(e.tmp / "art"), ArtifactError, "", _corrupt_json),
    Case(
        "artifacts/flipped-tensor-bit",
        lambda e: load_artifact(e.tmp / "art"),
        ArtifactError,
        "2",
        _flip_tensor_bit,
    ),
    Case(
        "artifacts/edited-json-value",
        lambda e: load_artifact(e.tmp / "art"),
        ArtifactError,
        "2",
        _edit_json_value,
    ),
    Case(
        "artifacts/truncated-tensors",
        lambda e: load_artifact(e.tmp / "art"),
        ArtifactError,
        "",
        _truncate_tensors,
    ),
    # --- issue 20: the last bad inputs ---
    Case(
        "checkpoint/record-format-edited",
        lambda e: load_model(str(e.tmp / "ckpt")),
        ArtifactError,
        "20",
        _relabelled_format,
    ),
    Case(
        "load/chat-template-cannot-render",
        lambda e: load_model("toy", chat_template="{% for %}"),
        InvalidArgumentError,
        "20",
    ),
    Case(
        "load/chat-template-drops-the-messages",
        lambda e: load_model("toy", chat_template="{{ bos_token }}assistant:"),
        InvalidArgumentError,
        "20",
    ),
    Case(
        "load/text-file-named-gguf",
        _load_gguf_with_cache_in_tmp,
        InvalidArgumentError,
        "20",
        _text_named_gguf,
    ),
    Case(
        "load/not-a-model-directory",
        lambda e: load_model(str(e.tmp / "notes")),
        InvalidArgumentError,
        "20",
        _not_a_model_dir,
    ),
    Case(
        "load/weights-do-not-match-config",
        lambda e: load_model(str(e.tmp / "mism")),
        InvalidArgumentError,
        "20",
        _mismatched_shapes,
    ),
    Case("awq/scales-1e-300-overflow", _awq_scale(1e-300), NonFiniteError, "20"),
    Case("awq/scales-1e300-underflow", _awq_scale(1e300), InvalidArgumentError, "20"),
    Case(
        "artifacts/not-a-compression-record",
        lambda e: CompressionRecord.load(e.tmp / "art"),
        ArtifactError,
        "",
        _saved_artifact,
    ),
)


def test_catalogue_ids_are_unique_and_cover_issue_10_classes() -> None:
    ids = [c.id for c in CASES]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"duplicate catalogue ids: {duplicates}"
    covered = {c.issue for c in CASES}
    assert {"1", "4", "6"} <= covered, f"issue 10 case classes covered: {sorted(covered)}; need 1, 4 and 6"


def _param(case: Case) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=case.known_gap)] if case.known_gap else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_catalogue_case(case: Case, tmp_path: Path) -> None:
    env = Env(tmp=tmp_path)
    if case.setup is not None:
        case.setup(env)
    before = snapshot(env)
    with pytest.raises(RefusalCoreError) as info:
        case.call(env)
    assert isinstance(info.value, case.error), (
        f"{case.id}: raised {type(info.value).__name__}: {info.value}; expected {case.error.__name__}"
    )
    changed = _diff(before, snapshot(env))
    assert not changed, f"{case.id}: the failed call modified or wrote something: {changed}"


# ----------------------------------------------------------------------------
# the command line over the same bad models: one line on stderr, the cause first, exit 2
# ----------------------------------------------------------------------------

#: (id, setup, argv with {tmp}, what the one line must say). transformers' text of these is 5-18 lines.
CLI_LOAD_CASES: tuple[tuple[str, Callable[[Env], None], list[str], str], ...] = (
    ("extract-not-a-model", _not_a_model_dir, ["extract", "--model", "{tmp}/notes"], "has no config.json"),
    ("study-not-a-model", _not_a_model_dir, ["study", "--model", "{tmp}/notes"], "has no config.json"),
    (
        "audit-compressed-not-a-model",
        _not_a_model_dir,
        ["audit", "--base", "toy", "--compressed", "{tmp}/notes"],
        "has no config.json",
    ),
    (
        "evaluate-weights-do-not-match-config",
        _mismatched_shapes,
        ["evaluate", "--model", "{tmp}/mism"],
        "weight shapes do not match its config.json (model.layers.0.mlp.",
    ),
)


@pytest.mark.parametrize(
    ("case", "setup", "argv", "cause"), CLI_LOAD_CASES, ids=[c[0] for c in CLI_LOAD_CASES]
)
def test_cli_load_case(
    case: str,
    setup: Callable[[Env], None],
    argv: list[str],
    cause: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from refusal_core.cli import main

    setup(Env(tmp=tmp_path))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--out", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, f"{case}: exit status {code}"
    assert len(err) == 1, f"{case}: stderr must be one line, got {len(err)}: {err[:6]}"
    assert cause in err[0], f"{case}: the line names the cause {cause!r}: {err[0]}"
    # The temporary path's length depends on the runner (xdist adds a worker folder): measure without it.
    head = err[0].split(": error: ", 1)[-1].replace(str(tmp_path), "{tmp}")
    assert head.index(cause.split(" (")[0]) < 120, f"{case}: the cause comes first: {err[0]}"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, (
        f"{case}: files were written"
    )
