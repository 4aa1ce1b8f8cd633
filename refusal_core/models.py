"""Architecture layouts, chat formatting and post-instruction positions.

A :class:`ModelLayout` is the thin adapter between a Hugging Face causal LM
and the functional core: it names the decoder blocks, the embedding, the
matrices that write into the residual stream (attention ``o_proj`` and MLP
``down_proj``) and the norms that precede the linears (AWQ folds its scales
into them). Supported families: Llama, Qwen2, Qwen3, Mistral, Gemma, Gemma 2,
Gemma 3 (text) and Phi-3. Anything else raises
:class:`~refusal_core.errors.UnsupportedArchitectureError`.

How the families differ, as data in :class:`ArchitectureSpec`:

=============  ===========  ==========================  =================  =========================
family         norm weight  block linears               MLP input norm     residual writes through
=============  ===========  ==========================  =================  =========================
llama, qwen2,  ``w``        q/k/v/o, gate/up/down       post_attention     ``self_attn``, ``mlp``
mistral
qwen3          ``w``        same (+ q/k norms inside    post_attention     ``self_attn``, ``mlp``
                            attention)
gemma          ``1 + w``    same                        post_attention     ``self_attn``, ``mlp``
gemma2,        ``1 + w``    same (gemma3: + q/k norms)  pre_feedforward    post-norms: post_attention,
gemma3_text                                                                post_feedforward
phi3           ``w``        fused ``qkv_proj``, ``o``,  post_attention     ``self_attn``, ``mlp``
                            fused ``gate_up_proj``,
                            ``down_proj``
=============  ===========  ==========================  =================  =========================

Post-norm families (Gemma 2/3) normalise what attention and MLP produce
before it is added to the residual stream, so the modules that *write* into
the stream are those norms (:meth:`ModelLayout.attn_writer`): directional
ablation hooks them, and weight orthogonalization (an edit of ``o_proj`` /
``down_proj``) cannot equal it there and is refused.

Example:
    >>> from refusal_core.testing.tiny import tiny_model  # doctest: +SKIP
    >>> layout = get_layout(tiny_model("llama"))            # doctest: +SKIP
    >>> layout.n_layers, layout.d_model                      # doctest: +SKIP
    (2, 32)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from refusal_core.errors import (
    EmptyInputError,
    InvalidArgumentError,
    ModelNotFoundError,
    RefusalCoreError,
    UnsupportedArchitectureError,
)

__all__ = [
    "CACHE_ENV_VAR",
    "DTYPES",
    "SUPPORTED_ARCHITECTURES",
    "ArchitectureSpec",
    "ModelLayout",
    "check_device",
    "format_prompt",
    "get_layout",
    "gguf_cache_root",
    "gguf_cached_dir",
    "hub_cache_dir",
    "load_model",
    "model_device",
    "model_identity",
    "post_instruction_tokens",
    "read_chat_template",
    "resolve_dtype",
]


#: Names of the linears of one block, in the order AWQ and pruning visit them.
ATTN_INPUT_LINEARS = ("q_proj", "k_proj", "v_proj")
MLP_INPUT_LINEARS = ("gate_proj", "up_proj")
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Phi-3's block linears: q/k/v and gate/up are fused into one matrix each.
FUSED_BLOCK_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
#: Linears that live in the attention module (the others live in the MLP).
ATTN_LINEARS = frozenset({"q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj"})


@dataclass(frozen=True)
class ArchitectureSpec:
    """What differs between the supported decoder families.

    ``norm_offset`` is 1.0 where the RMSNorm multiplies by ``1 + weight``
    (Gemma family) and 0.0 where it multiplies by ``weight``.
    ``linear_names`` are the block linears (:data:`BLOCK_LINEARS`, or
    :data:`FUSED_BLOCK_LINEARS` for Phi-3). ``mlp_norm`` is the attribute name
    of the norm whose output feeds the MLP. ``post_norms`` names the norms that
    attention and MLP outputs pass through before the residual add (Gemma 2/3),
    ``None`` where they are added as they are. ``qk_norms``: attention
    normalises queries and keys per head (Qwen3, Gemma 3); it changes nothing
    outside attention.
    """

    family: str
    norm_offset: float = 0.0
    linear_names: tuple[str, ...] = BLOCK_LINEARS
    mlp_norm: str = "post_attention_layernorm"
    post_norms: tuple[str, str] | None = None
    qk_norms: bool = False

    @property
    def fused_linears(self) -> bool:
        """Whether q/k/v and gate/up are single fused matrices (Phi-3)."""
        return "qkv_proj" in self.linear_names

    @property
    def has_post_norms(self) -> bool:
        """Whether attention / MLP outputs are normalised before the residual add (Gemma 2/3)."""
        return self.post_norms is not None


_GEMMA2_POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")

#: model_type (from the HF config) → spec. A registry, not an if-chain.
SUPPORTED_ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec("llama"),
    "qwen2": ArchitectureSpec("qwen2"),
    "qwen3": ArchitectureSpec("qwen3", qk_norms=True),
    "mistral": ArchitectureSpec("mistral"),
    "gemma": ArchitectureSpec("gemma", norm_offset=1.0),
    "gemma2": ArchitectureSpec(
        "gemma2", norm_offset=1.0, mlp_norm="pre_feedforward_layernorm", post_norms=_GEMMA2_POST_NORMS
    ),
    "gemma3_text": ArchitectureSpec(
        "gemma3_text",
        norm_offset=1.0,
        mlp_norm="pre_feedforward_layernorm",
        post_norms=_GEMMA2_POST_NORMS,
        qk_norms=True,
    ),
    "phi3": ArchitectureSpec("phi3", linear_names=FUSED_BLOCK_LINEARS),
}


class ModelLayout:
    """Named access to the parts of a supported decoder-only model."""

    def __init__(self, model: nn.Module, spec: ArchitectureSpec) -> None:
        # Any: the HF methods used here (get_output_embeddings, config) are not on nn.Module.
        self.model: Any = model
        self.spec = spec
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if inner is None or layers is None:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no .model.layers; expected a *ForCausalLM of "
                f"family {spec.family}"
            )
        self.inner: nn.Module = inner
        self.blocks: Sequence[nn.Module] = list(layers)
        if not self.blocks:
            raise UnsupportedArchitectureError(f"{type(model).__name__} has no decoder blocks")

    # -- sizes ---------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.embedding.weight.shape[1])

    # -- parts ---------------------------------------------------------------
    @property
    def embedding(self) -> nn.Embedding:
        emb = self.inner.embed_tokens
        assert isinstance(emb, nn.Embedding)
        return emb

    @property
    def lm_head(self) -> nn.Module:
        head = self.model.get_output_embeddings()
        assert head is not None
        return head

    @property
    def embeddings_tied(self) -> bool:
        head = self.model.get_output_embeddings()
        return head is not None and head.weight is self.embedding.weight

    def attn(self, layer: int) -> nn.Module:
        return self._block(layer).self_attn

    def mlp(self, layer: int) -> nn.Module:
        return self._block(layer).mlp

    def attn_out(self, layer: int) -> nn.Module:
        """The attention output projection (``o_proj``) of block ``layer``."""
        return cast(nn.Module, self.attn(layer).o_proj)

    def mlp_out(self, layer: int) -> nn.Module:
        """The MLP down projection (``down_proj``) of block ``layer``."""
        return cast(nn.Module, self.mlp(layer).down_proj)

    def attn_writer(self, layer: int) -> nn.Module:
        """The module whose output block ``layer`` adds to the residual stream for attention.

        ``self_attn`` itself, or for post-norm families (Gemma 2/3) the norm applied to its output.
        """
        post = self.spec.post_norms
        return self.attn(layer) if post is None else cast(nn.Module, getattr(self._block(layer), post[0]))

    def mlp_writer(self, layer: int) -> nn.Module:
        """The module whose output block ``layer`` adds to the residual stream for the MLP."""
        post = self.spec.post_norms
        return self.mlp(layer) if post is None else cast(nn.Module, getattr(self._block(layer), post[1]))

    def input_norm(self, layer: int) -> nn.Module:
        """The norm whose output feeds attention (``input_layernorm``)."""
        return cast(nn.Module, self._block(layer).input_layernorm)

    def post_attention_norm(self, layer: int) -> nn.Module:
        """The block's ``post_attention_layernorm`` (the MLP input norm except in Gemma 2/3)."""
        return cast(nn.Module, self._block(layer).post_attention_layernorm)

    def mlp_input_norm(self, layer: int) -> nn.Module:
        """The norm whose output feeds the MLP (Gemma 2/3: ``pre_feedforward_layernorm``)."""
        return cast(nn.Module, getattr(self._block(layer), self.spec.mlp_norm))

    def linear_parent(self, layer: int, name: str) -> nn.Module:
        """The module (attention or MLP of block ``layer``) that holds linear ``name`` as an attribute."""
        if name not in self.spec.linear_names:
            raise InvalidArgumentError(
                f"{self.spec.family} blocks have no linear {name!r}; they have {self.spec.linear_names}"
            )
        return self.attn(layer) if name in ATTN_LINEARS else self.mlp(layer)

    def linears(self, layer: int) -> dict[str, nn.Module]:
        """All linears of a block by name, in :attr:`ArchitectureSpec.linear_names` order.

        Seven (``q_proj`` … ``down_proj``) for most families, four for Phi-3
        (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``).
        """
        return {
            name: cast(nn.Module, getattr(self.linear_parent(layer, name), name))
            for name in self.spec.linear_names
        }

    def residual_writers(self) -> list[nn.Module]:
        """Every matrix that writes into the residual stream: ``o_proj`` and ``down_proj`` of each block."""
        return [m for layer in range(self.n_layers) for m in (self.attn_out(layer), self.mlp_out(layer))]

    def _block(self, layer: int) -> Any:
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int)
            or not -self.n_layers <= layer < self.n_layers
        ):
            raise InvalidArgumentError(f"layer must be an int in [0, {self.n_layers}), got {layer!r}")
        return self.blocks[layer]

    def __repr__(self) -> str:
        return f"ModelLayout(family={self.spec.family!r}, n_layers={self.n_layers}, d_model={self.d_model})"


def get_layout(model: nn.Module) -> ModelLayout:
    """The layout of a supported causal LM; raises for any other architecture."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = SUPPORTED_ARCHITECTURES.get(str(model_type))
    if spec is None:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported; supported: "
            f"{sorted(SUPPORTED_ARCHITECTURES)}"
        )
    return ModelLayout(model, spec)


def model_device(model: nn.Module) -> str:
    """Where the model's parameters live: ``"cpu"``, ``"cuda:0"``, or a sorted comma list when split."""
    devices = sorted({str(p.device) for p in model.parameters()})
    return ",".join(devices) if devices else "cpu"


def model_identity(model: nn.Module) -> dict[str, Any]:
    """A JSON-able identity of a model: architecture, sizes, source path, dtype, device, weight fingerprint.

    The fingerprint is a float64 checksum of a few fixed weights, enough to tell
    two checkpoints (or a compressed model from its base) apart. ``dtype`` is
    the embedding's dtype (``"float32"``, ``"bfloat16"``, ...), ``device`` is
    :func:`model_device`, so every artifact records where and how it was computed.
    """
    layout = get_layout(model)
    cfg: Any = model.config
    with torch.no_grad():
        probes = [
            layout.embedding.weight,
            layout.attn_out(0).weight,
            layout.mlp_out(layout.n_layers - 1).weight,
        ]
        fingerprint = [
            float(p.detach().to(torch.float64).sum()) for p in probes if isinstance(p, torch.Tensor)
        ]
    return {
        "model_type": cfg.model_type,
        "name_or_path": str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "name_or_path", "")),
        "n_layers": layout.n_layers,
        "d_model": layout.d_model,
        "vocab_size": int(layout.embedding.weight.shape[0]),
        "dtype": str(layout.embedding.weight.dtype).removeprefix("torch."),
        "device": model_device(model),
        "fingerprint": fingerprint,
    }


# ----------------------------------------------------------------------------
# chat formatting and post-instruction positions
# ----------------------------------------------------------------------------

_SENTINEL = "\x00REFUSAL_CORE_INSTRUCTION\x00"


def format_prompt(tokenizer: Any, instruction: str, system: str | None = None) -> str:
    """The instruction wrapped in the tokenizer's chat template, ready for generation."""
    if not isinstance(instruction, str):
        raise InvalidArgumentError(f"instruction must be a str, got {type(instruction).__name__}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidArgumentError(
            "tokenizer has no chat_template; refusal_core needs one to format prompts: give one with "
            "load_model(..., chat_template=FILE_OR_STRING)"
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": instruction}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(text)


def post_instruction_tokens(tokenizer: Any, system: str | None = None) -> list[int]:
    """Token ids of the chat template that follow the user's message.

    Rendered with a sentinel instruction; the text after it is tokenized alone
    and checked to tokenize identically at the end of a real prompt. These are
    positions ``-P..-1`` of every formatted prompt.
    """
    text = format_prompt(tokenizer, _SENTINEL, system)
    if text.count(_SENTINEL) != 1:
        raise InvalidArgumentError("chat template does not place the instruction exactly once")
    suffix = text.split(_SENTINEL, 1)[1]
    ids = list(tokenizer(suffix, add_special_tokens=False)["input_ids"])
    if not ids:
        raise EmptyInputError("chat template puts no tokens after the instruction; nothing to read")
    probe = list(
        tokenizer(format_prompt(tokenizer, "Tell me a story.", system), add_special_tokens=False)["input_ids"]
    )
    if probe[-len(ids) :] != ids:
        raise InvalidArgumentError(
            "the post-instruction suffix tokenizes differently inside a prompt; cannot locate positions"
        )
    return ids


# ----------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------

#: The dtype names ``load_model`` accepts (besides a floating ``torch.dtype``).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# "org/name": one slash, Hub-legal characters, no leading dot or dash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype | str:
    """The dtype to load with: a name of :data:`DTYPES`, a floating ``torch.dtype``, or None.

    None means float32 on CPU and the checkpoint's own dtype (transformers'
    ``"auto"``) on CUDA or with ``device="auto"``.
    """
    if dtype is None:
        return torch.float32 if device == "cpu" else "auto"
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InvalidArgumentError(
                f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}"
            )
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise InvalidArgumentError(
        f"dtype must be one of {sorted(DTYPES)} or a floating torch.dtype, got {dtype!r}"
    )


def check_device(device: object) -> str:
    """``device`` checked: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (N a visible GPU) or ``"auto"``.

    A CUDA device on a machine without CUDA is an
    :class:`~refusal_core.errors.InvalidArgumentError` naming it.
    """
    if not isinstance(device, str) or not re.fullmatch(r"cpu|auto|cuda(:[0-9]+)?", device):
        raise InvalidArgumentError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidArgumentError(
                f"device {device!r} requested but CUDA is not available on this machine"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise InvalidArgumentError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return device


def read_chat_template(chat_template: str | Path) -> str:
    """The template text from a Jinja file path or a template string (one with ``{{`` or ``{%``)."""
    if isinstance(chat_template, Path) or (
        isinstance(chat_template, str) and "{{" not in chat_template and "{%" not in chat_template
    ):
        path = Path(chat_template)
        if not path.is_file():
            raise InvalidArgumentError(
                f"chat_template {str(chat_template)!r} is neither an existing file nor a Jinja template"
            )
        text = path.read_text(encoding="utf-8")
    elif isinstance(chat_template, str):
        text = chat_template
    else:
        raise InvalidArgumentError(
            f"chat_template must be a path or a template string, got {type(chat_template).__name__}"
        )
    if "{{" not in text and "{%" not in text:
        raise InvalidArgumentError(f"chat_template {str(chat_template)!r} holds no Jinja template")
    return text


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _resolve_hub_id(repo_id: str) -> Path:
    """The local snapshot directory of ``repo_id`` in the HF cache; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(str(snapshot_download(repo_id, local_files_only=True, cache_dir=cache)))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local path and not in the local Hugging Face cache {str(cache)!r} "
            f"(offline: nothing is downloaded; fetch it with `hf download {repo_id}` where there is network)"
        ) from exc


#: Environment variable naming refusal_core's cache root (default ``~/.cache/refusal_core``).
CACHE_ENV_VAR = "REFUSAL_CORE_CACHE"


def gguf_cache_root() -> Path:
    """Converted GGUF models live in ``$REFUSAL_CORE_CACHE/gguf`` (else ``~/.cache/refusal_core/gguf``)."""
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "refusal_core"
    return base / "gguf"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _read_gguf(path: Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` dequantized from a GGUF file by transformers, in float32 (slow: minutes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True, "gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    return model, tokenizer


def gguf_cached_dir(path: str | os.PathLike[str]) -> Path:
    """The safetensors Hugging Face directory converted from the GGUF file ``path``, made on first use.

    Keyed by the file's sha256 (``gguf_cache_root() / <sha256>``), so a changed
    file is converted anew and a renamed one is not. The weights are the
    float32 dequantization transformers computes from the GGUF, saved as is,
    so loading the directory gives bit-identical weights in seconds instead of
    re-dequantizing. Written atomically: into a temporary directory beside the
    target, renamed into place when complete; a failed conversion leaves no
    cache entry. ``refusal_core_gguf.json`` in it records the source.
    """
    src = Path(path)
    if not src.is_file() or src.suffix != ".gguf":
        raise InvalidArgumentError(f"{str(src)!r} is not a .gguf file")
    digest = _file_sha256(src)
    root = gguf_cache_root()
    target = root / digest
    if (target / _GGUF_RECORD).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=root))
    try:
        model, tokenizer = _read_gguf(src)
        _save_dequantized(model, tmp)
        tokenizer.save_pretrained(tmp)
        record = {"source": str(src.resolve()), "sha256": digest, "bytes": src.stat().st_size}
        (tmp / _GGUF_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _GGUF_RECORD).is_file():  # not another process's finished conversion
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


_GGUF_RECORD = "refusal_core_gguf.json"


def _save_dequantized(model: Any, directory: Path) -> None:
    """Save a GGUF-loaded model as a plain float Hugging Face directory.

    transformers refuses ``save_pretrained`` on a model loaded with
    ``gguf_file=`` (it counts as quantized), although its weights are plain
    dequantized tensors; so the weights go to ``model.safetensors`` directly
    and the config is saved without its GGUF quantization record. A tied
    ``lm_head`` is left out (transformers re-ties it on load).
    """
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(
        {k: v.detach().contiguous() for k, v in state.items()},
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)


def _load_gguf(path: Path, *, dtype: torch.dtype | str) -> tuple[nn.Module, Any]:
    """Model and tokenizer from a ``.gguf`` file, through its cached safetensors conversion.

    The first load dequantizes the file with transformers (needs ``gguf``) into
    :func:`gguf_cached_dir`; every later load reads that directory in seconds.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = str(gguf_cached_dir(path))
    kwargs: dict[str, Any] = {"local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="eager", **kwargs)
    return model, tokenizer


def _load_directory(path: Path, *, dtype: torch.dtype | str, device: str) -> tuple[nn.Module, Any]:
    """Model and tokenizer from a local Hugging Face directory, placed on ``device`` while loading.

    A directory written by :func:`~refusal_core.checkpoint.save_checkpoint` has its
    file hashes checked first, and after loading gets back what transformers does
    not rebuild (:func:`~refusal_core.checkpoint.restore_checkpoint_modules_`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refusal_core.checkpoint import read_checkpoint_record, restore_checkpoint_modules_

    record = read_checkpoint_record(path)
    kwargs: dict[str, Any] = {"local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    if device != "cpu":  # "auto" is accelerate's device map; "cuda:N" loads straight onto that GPU
        kwargs["device_map"] = device
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation="eager", **kwargs
    )
    if record is not None:
        restore_checkpoint_modules_(model, record)
    return model, tokenizer


def load_model(
    spec: str,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    chat_template: str | Path | None = None,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)``, offline, in eval mode with eager attention.

    ``spec`` is ``"toy"`` (the embedded toy refusal model), a local Hugging
    Face directory (also one written by
    :func:`~refusal_core.checkpoint.save_checkpoint`), an existing ``.gguf``
    file (needs the ``gguf`` package), or a hub id ``"org/name"`` found in the
    local HF cache (:func:`hub_cache_dir`; never downloaded: a missing one
    raises :class:`~refusal_core.errors.ModelNotFoundError` naming the id and
    the cache).

    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (accelerate's
    device map over the visible GPUs, CPU when there is none). ``dtype``:
    ``"float32"``, ``"bfloat16"``, ``"float16"``, a floating ``torch.dtype``, or
    None: float32 on CPU, the checkpoint's own dtype on a GPU.
    ``chat_template``: a Jinja file or template string, set on the tokenizer
    (for tokenizers that have none; it replaces an existing one). A tokenizer
    without any template loads, and :func:`format_prompt` then raises.

    The model's layout is checked; arguments are checked before anything loads.
    ``load_model("toy")`` is exactly :func:`~refusal_core.toy.load_toy_model`.

    Example:
        >>> model, tok = load_model("toy")
        >>> model_identity(model)["dtype"], model_identity(model)["device"]
        ('float32', 'cpu')
    """
    if not isinstance(spec, str) or not spec:
        raise InvalidArgumentError(f"model spec must be a non-empty str, got {spec!r}")
    device = check_device(device)
    load_dtype = resolve_dtype(dtype, device)
    template = None if chat_template is None else read_chat_template(chat_template)
    if spec == "toy":
        from refusal_core.toy import load_toy_model

        model, tokenizer = load_toy_model(
            dtype=load_dtype if isinstance(load_dtype, torch.dtype) else torch.float32
        )
        _move(model, device)
    else:
        path = Path(spec)
        if path.exists():
            name = str(path.resolve())
        elif _HUB_ID.match(spec):
            path, name = _resolve_hub_id(spec), spec
        else:
            raise ModelNotFoundError(
                f"model path {spec!r} does not exist (and is not 'toy' or a hub id 'org/name')"
            )
        try:
            if path.is_file():
                if path.suffix != ".gguf":
                    raise InvalidArgumentError(
                        f"model file {spec!r} is not a .gguf file or a model directory"
                    )
                model, tokenizer = _load_gguf(path, dtype=load_dtype)
                _move(model, device)
            else:
                model, tokenizer = _load_directory(path, dtype=load_dtype, device=device)
        except RefusalCoreError:
            raise
        except Exception as exc:  # transformers raises many unrelated types here
            raise InvalidArgumentError(f"model {spec!r} does not load: {type(exc).__name__}: {exc}") from exc
        config: Any = model.config
        config._name_or_path = name
    get_layout(model)
    model.eval()
    if template is not None:
        tokenizer.chat_template = template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def _move(model: nn.Module, device: str) -> None:
    """Put a model loaded on CPU onto ``device`` (``"auto"``: the first GPU if there is one)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        nn.Module.to(model, device)
