"""Architecture layouts, chat formatting and post-instruction positions.

A :class:`ModelLayout` is the thin adapter between a Hugging Face causal LM
and the functional core: it names the decoder blocks, the embedding, the
matrices that write into the residual stream (attention ``o_proj`` and MLP
``down_proj``) and the norms that precede the linears (AWQ folds its scales
into them). Supported families: Llama, Qwen2, Mistral, Gemma. Anything else
raises :class:`~refusal_core.errors.UnsupportedArchitectureError`.

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
    UnsupportedArchitectureError,
)

__all__ = [
    "CACHE_ENV_VAR",
    "SUPPORTED_ARCHITECTURES",
    "ArchitectureSpec",
    "ModelLayout",
    "format_prompt",
    "get_layout",
    "gguf_cache_root",
    "gguf_cached_dir",
    "load_model",
    "model_identity",
    "post_instruction_tokens",
]


@dataclass(frozen=True)
class ArchitectureSpec:
    """What differs between the supported decoder families.

    ``norm_offset`` is 1.0 where the RMSNorm multiplies by ``1 + weight``
    (Gemma) and 0.0 where it multiplies by ``weight``.
    """

    family: str
    norm_offset: float = 0.0


#: model_type (from the HF config) → spec. A registry, not an if-chain.
SUPPORTED_ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec("llama"),
    "qwen2": ArchitectureSpec("qwen2"),
    "mistral": ArchitectureSpec("mistral"),
    "gemma": ArchitectureSpec("gemma", norm_offset=1.0),
}

#: Names of the linears of one block, in the order AWQ and pruning visit them.
ATTN_INPUT_LINEARS = ("q_proj", "k_proj", "v_proj")
MLP_INPUT_LINEARS = ("gate_proj", "up_proj")
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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

    def input_norm(self, layer: int) -> nn.Module:
        return self._block(layer).input_layernorm

    def post_attention_norm(self, layer: int) -> nn.Module:
        return self._block(layer).post_attention_layernorm

    def linears(self, layer: int) -> dict[str, nn.Module]:
        """All seven linears of a block by name (``q_proj`` … ``down_proj``)."""
        attn, mlp = self.attn(layer), self.mlp(layer)
        out: dict[str, nn.Module] = {}
        for name in BLOCK_LINEARS:
            out[name] = getattr(attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else mlp, name)
        return out

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


def model_identity(model: nn.Module) -> dict[str, Any]:
    """A JSON-able identity of a model: architecture, sizes, source path and a weight fingerprint.

    The fingerprint is a float64 checksum of a few fixed weights, enough to tell
    two checkpoints (or a compressed model from its base) apart.
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
        raise InvalidArgumentError("tokenizer has no chat_template; refusal_core needs one to format prompts")
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


def load_model(
    spec: str, *, dtype: torch.dtype = torch.float32, device: str | None = None
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from ``"toy"`` (the embedded toy refusal model), a local
    Hugging Face directory, or a local ``.gguf`` file (needs the ``gguf`` package).

    Never downloads: a path that does not exist or does not load raises
    :class:`~refusal_core.errors.InvalidArgumentError` naming it. The model is
    returned in eval mode with eager attention, and its layout is checked. A
    GGUF file is converted once into a cached safetensors directory
    (:func:`gguf_cached_dir`) and loaded from there; the model's recorded
    name stays the GGUF path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "toy":
        from refusal_core.toy import load_toy_model

        model, tokenizer = load_toy_model(dtype=dtype)
    else:
        path = Path(spec)
        if not path.exists():
            raise InvalidArgumentError(f"model path {spec!r} does not exist (and is not 'toy')")
        kwargs: dict[str, Any] = {"local_files_only": True}
        if path.is_file() and path.suffix != ".gguf":
            raise InvalidArgumentError(f"model file {spec!r} is not a .gguf file or a model directory")
        try:
            src = str(gguf_cached_dir(path)) if path.is_file() else str(path)
            tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                src, dtype=dtype, attn_implementation="eager", **kwargs
            )
        except Exception as exc:  # transformers raises many unrelated types here
            raise InvalidArgumentError(
                f"model path {spec!r} does not load: {type(exc).__name__}: {exc}"
            ) from exc
        model.config._name_or_path = str(path.resolve())
    get_layout(model)
    model.eval()
    if device is not None:
        model.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
