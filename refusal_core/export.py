"""Export a model the tool wrote (base, compressed, repaired) as a GGUF file that llama.cpp runs.

:func:`export_gguf` writes, with the ``gguf`` package's ``GGUFWriter``, the
architecture metadata llama.cpp reads for ``llama`` and ``qwen2`` models, the
tokenizer (byte-level BPE: tokens, token types, merges, special ids, the
chat template) and every tensor under llama.cpp's names:

=================================  ====================================
transformers                       GGUF
=================================  ====================================
``model.embed_tokens.weight``      ``token_embd.weight``
``model.layers.N.input_layernorm``  ``blk.N.attn_norm``
``…self_attn.{q,k,v,o}_proj``      ``blk.N.attn_{q,k,v,output}``
``…post_attention_layernorm``      ``blk.N.ffn_norm``
``…mlp.{gate,up,down}_proj``       ``blk.N.ffn_{gate,up,down}``
``model.norm.weight``              ``output_norm.weight``
``lm_head.weight`` (untied only)   ``output.weight``
=================================  ====================================

For ``llama`` the rows of ``q_proj`` and ``k_proj`` are permuted per head
(the two rotary halves interleaved), as llama.cpp's converter does, because
llama.cpp's llama rotary embedding pairs neighbouring dimensions; ``qwen2``
keeps the order (llama.cpp uses the "NEOX" rotary style for it).

Tensor types by ``tensor_type`` (the file type): ``f32`` everything float32;
``f16`` 2-D tensors float16, 1-D float32 (llama.cpp's converter default);
``q8_0``, ``q5_0``, ``q5_1``, ``q4_0``, ``q4_1``: 2-D tensors quantized with
``gguf.quants`` (llama.cpp's numerics), 1-D float32, and the output head
(or a token embedding tied to it) Q8_0 -- llama.cpp would use Q6_K there
when the row width is a multiple of 256, which the ``gguf`` package cannot
write. A model compressed by a ``gguf-*`` method and exported with the same
type keeps its weights: re-quantizing them gives the same values.

Every block linear must be a plain float ``nn.Linear``: a model holding
int8/4-bit modules (LLM.int8 simulation, bitsandbytes) is refused, because
their arithmetic (activation quantization, outlier split) has no GGUF
equivalent and writing their dequantized weights would misstate what ran.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from refusal_core.testing.tiny import tiny_model, tiny_tokenizer
    >>> out = Path(tempfile.mkdtemp()) / "tiny.gguf"
    >>> export_gguf(tiny_model("llama"), tiny_tokenizer(), out, tensor_type="q8_0").name
    'tiny.gguf'
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from refusal_core._finite import all_finite
from refusal_core.errors import (
    InvalidArgumentError,
    ShapeMismatchError,
    UnsupportedArchitectureError,
    UnsupportedModuleError,
)
from refusal_core.model import get_layout
from refusal_core.saving import atomic_write_with

__all__ = ["EXPORT_TYPES", "GGUF_ARCHITECTURES", "export_gguf", "gguf_tensor_name", "llama_rotary_permute"]

#: ``tensor_type`` → (GGML type name of 2-D tensors, llama.cpp's ``general.file_type`` number).
EXPORT_TYPES: dict[str, tuple[str, int]] = {
    "f32": ("F32", 0),
    "f16": ("F16", 1),
    "q4_0": ("Q4_0", 2),
    "q4_1": ("Q4_1", 3),
    "q8_0": ("Q8_0", 7),
    "q5_0": ("Q5_0", 8),
    "q5_1": ("Q5_1", 9),
}

#: transformers ``model_type`` → llama.cpp architecture name.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

# llama.cpp's token types (llama_token_type).
_NORMAL, _UNUSED, _CONTROL, _USER_DEFINED = 1, 5, 3, 4

_BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's name of the transformers parameter ``name`` (``model.layers.3.mlp.up_proj.weight``
    → ``blk.3.ffn_up.weight``); :class:`InvalidArgumentError` for a name it has no place for."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in fixed:
        return fixed[name]
    parts = name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        inner, leaf = ".".join(parts[3:-1]), parts[-1]
        if inner in _BLOCK_NAMES and leaf in ("weight", "bias"):
            return f"blk.{parts[2]}.{_BLOCK_NAMES[inner]}.{leaf}"
    raise InvalidArgumentError(f"GGUF export: no llama.cpp name for parameter {name!r}")


def llama_rotary_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp's llama architecture expects for ``q_proj``/``k_proj`` (``n_head`` heads).

    transformers rotates the first half of each head against the second
    (``rotate_half``); llama.cpp's llama rotary embedding rotates neighbouring
    pairs, so within each head rows ``i`` and ``i + head_dim/2`` become
    neighbours ``2i`` and ``2i + 1``.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ShapeMismatchError(f"{rows} rows do not split into {n_head} heads of an even width")
    half = rows // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise InvalidArgumentError(f"GGUF export needs the 'gguf' package (pip install gguf): {exc}") from exc
    return gguf


def _check_model(model: nn.Module) -> tuple[Any, str]:
    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF export supports {sorted(GGUF_ARCHITECTURES)} models, got model_type {model_type!r}"
        )
    layout = get_layout(model)
    for layer in range(layout.n_layers):
        for name, module in layout.linears(layer).items():
            if type(module) is not nn.Linear or not module.weight.is_floating_point():
                raise UnsupportedModuleError(
                    f"GGUF export needs plain float nn.Linear block linears; layer {layer} {name} is "
                    f"{type(module).__name__} (int8/4-bit modules compute differently from any GGUF type)"
                )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise UnsupportedArchitectureError(
            f"GGUF export writes plain rotary embeddings; got rope_type {rope_type!r}"
        )
    for p_name, p in model.named_parameters():
        if not all_finite(p):
            raise InvalidArgumentError(f"GGUF export: parameter {p_name} holds NaN or infinity")
    return config, GGUF_ARCHITECTURES[model_type]


def _merges(tokenizer: Any) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedModuleError("GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    pre = spec.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if model.get("type") != "BPE" or not any(p.get("type") == "ByteLevel" for p in pres):
        raise UnsupportedModuleError(
            "GGUF export writes byte-level BPE tokenizers (llama.cpp's 'gpt2' model); this tokenizer is "
            f"{model.get('type')!r} with pre-tokenizer {pre.get('type')!r}"
        )
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _pre_tokenizer_name(arch: str) -> str:
    # llama.cpp picks its pre-tokenizer split by this name; Qwen2's vocabulary has its own regex.
    return "qwen2" if arch == "qwen2" else "gpt-2"


def _add_tokenizer(writer: Any, tokenizer: Any, n_vocab: int, arch: str) -> None:
    vocab: dict[str, int] = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ShapeMismatchError(
            f"tokenizer ids reach {max(vocab.values())} but the embedding has {n_vocab} rows"
        )
    merges = _merges(tokenizer)
    by_id = {i: t for t, i in vocab.items()}
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    added = {int(i): t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in by_id:  # embedding rows beyond the vocabulary (padding to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        else:
            tokens.append(by_id[i])
            is_special = i in special or bool(getattr(added.get(i), "special", False))
            types.append(_CONTROL if is_special else _USER_DEFINED if i in added else _NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(arch))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
        ("unk_token_id", writer.add_unk_token_id),
    ):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    # Whether the tokenizer itself prepends BOS (the chat template may write it instead).
    probe = "a"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    without = tokenizer(probe, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    writer.add_add_bos_token(bool(bos is not None and with_special[:1] == [bos] and without[:1] != [bos]))
    writer.add_add_eos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def _add_architecture(writer: Any, config: Any, arch: str, n_vocab: int) -> None:
    d = int(config.hidden_size)
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    head_dim = int(getattr(config, "head_dim", None) or d // n_head)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(d)
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(n_vocab)
    if head_dim * n_head != d:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _tensors(model: nn.Module, config: Any, arch: str) -> Iterator[tuple[str, np.ndarray, bool]]:
    """``(gguf name, float32 array, is_output_like)`` for every parameter, in llama.cpp's order."""
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    layout = get_layout(model)
    embedding = layout.embedding.weight
    head_weight = getattr(layout.lm_head, "weight", None)
    tied = head_weight is embedding
    for name, p in model.named_parameters():  # a tied head appears once, as the embedding
        gname = gguf_tensor_name(name)
        array = p.detach().to(device="cpu", dtype=torch.float32).numpy()
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_q.bias")):
            array = llama_rotary_permute(array, n_head)
        elif arch == "llama" and gname.endswith(("attn_k.weight", "attn_k.bias")):
            array = llama_rotary_permute(array, n_kv)
        output_like = gname == "output.weight" or (gname == "token_embd.weight" and tied)
        yield gname, np.ascontiguousarray(array), output_like


def export_gguf(
    model: nn.Module,
    tokenizer: Any,
    out: str | os.PathLike[str],
    *,
    tensor_type: str = "f32",
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` and ``tokenizer`` as the GGUF file ``out`` (see the module docstring); returns it.

    Everything is checked (architecture, modules, tokenizer, every row width
    against the type's block of 32) before the file is opened; the file is
    written to a temporary sibling and renamed into place, so a failure never
    leaves a partial ``out``. An existing ``out`` is refused unless
    ``overwrite``.
    """
    if tensor_type not in EXPORT_TYPES:
        raise InvalidArgumentError(f"tensor_type must be one of {sorted(EXPORT_TYPES)}, got {tensor_type!r}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise InvalidArgumentError(f"GGUF export target must end in .gguf, got {str(out)!r}")
    if out.exists() and not overwrite:
        raise InvalidArgumentError(f"{str(out)!r} exists; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.is_dir():
        raise InvalidArgumentError(f"directory {str(out.parent)!r} does not exist")
    gguf = _gguf()
    config, arch = _check_model(model)
    qname, file_type = EXPORT_TYPES[tensor_type]
    n_vocab = int(get_layout(model).embedding.weight.shape[0])
    _merges(tokenizer)  # refuses a tokenizer it cannot write before anything else happens
    quantized = qname not in ("F32", "F16")
    if quantized:
        for gname, array, _ in _tensors(model, config, arch):
            if array.ndim == 2 and array.shape[1] % 32:
                raise ShapeMismatchError(
                    f"GGUF {qname} quantizes rows in blocks of 32; {gname} has rows of {array.shape[1]}"
                )

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(name or str(getattr(config, "_name_or_path", "") or arch))
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_architecture(writer, config, arch, n_vocab)
        _add_tokenizer(writer, tokenizer, n_vocab, arch)
        for gname, array, output_like in _tensors(model, config, arch):
            if array.ndim < 2 or qname == "F32":
                writer.add_tensor(gname, array.astype(np.float32))
            elif qname == "F16":
                writer.add_tensor(gname, array.astype(np.float16))
            else:
                kind = getattr(gguf.GGMLQuantizationType, "Q8_0" if output_like else qname)
                writer.add_tensor(gname, gguf.quants.quantize(array, kind), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write_with(out, write)
    return out
