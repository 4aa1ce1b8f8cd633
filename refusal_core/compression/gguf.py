"""GGUF's legacy block quantizations (llama.cpp's Q8_0, Q5_0, Q5_1, Q4_0, Q4_1) as compression methods.

Every block linear's weight is quantized row by row in blocks of 32 input
weights with the ``gguf`` package's reference quantizer
(``gguf.quants.quantize``, llama.cpp's numerics re-implemented in numpy) and
replaced by its exact dequantization (``gguf.quants.dequantize``), so the
model computes with the weights a llama.cpp file of that type holds.

==========  =======================  ==================================================
name        config                   one block of 32 weights is stored as
==========  =======================  ==================================================
gguf-q8_0   GgufConfig("Q8_0")       float16 scale ``d``, 32 int8: ``w = d·q``
gguf-q5_0   GgufConfig("Q5_0")       ``d``, 32 5-bit ``q``: ``w = d·(q − 16)``
gguf-q5_1   GgufConfig("Q5_1")       ``d``, float16 minimum ``m``, 5-bit: ``w = d·q + m``
gguf-q4_0   GgufConfig("Q4_0")       ``d``, 32 4-bit ``q``: ``w = d·(q − 8)``
gguf-q4_1   GgufConfig("Q4_1")       ``d``, ``m``, 4-bit: ``w = d·q + m``
==========  =======================  ==================================================

What this method does not quantize, and what llama.cpp's ``llama-quantize``
does with it for these file types (read from ``src/llama-quant.cpp``; the
:class:`~refusal_core.compression.CompressionRecord` carries it per tensor
under ``details``):

- 1-D tensors (norm weights, biases) and every ``*_norm.weight``: never
  quantized by llama.cpp (F32); unchanged here.
- ``output.weight`` (``lm_head``), and ``token_embd.weight`` when it is tied to
  it: Q6_K, or Q8_0 in a Q8_0 file or when its row width is not a multiple of
  256 (Q6_K's block); unchanged here (the ``gguf`` package cannot quantize to
  Q6_K, and the project never compresses the head).
- ``token_embd.weight`` untied: the file's type, like the block linears;
  unchanged here, as for every method of this project (the embedding is not a
  block linear).
- Block linears: the file's type. (Only with an importance matrix does
  llama.cpp raise the first eighth of the ``ffn_down`` layers of Q4_0/Q5_0 files
  to Q4_1/Q5_1; without one, as here, every block linear gets the file's type.)

A row width (input features) that is not a multiple of 32 is refused before
anything changes: llama.cpp defines no fallback type for these formats and
refuses such a tensor too. Weights must be float32 or float64: the
dequantized values (float16 scale times a small integer, plus a float16
minimum) are exact there and would be rounded again in bfloat16/float16.

Example:
    >>> from refusal_core.compression import compress_, method_config
    >>> from refusal_core.testing.tiny import tiny_model
    >>> record = compress_(tiny_model("llama"), method_config("gguf-q4_0"))
    >>> record.method, record.details["format"]
    ('gguf', 'Q4_0')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from refusal_core.compression._common import (
    BlockLinear,
    block_linears,
    relative_error,
    require_float_linears,
)
from refusal_core.compression._registry import register_method
from refusal_core.compression.calibration import Calibration
from refusal_core.compression.config import CompressionConfig
from refusal_core.errors import (
    InvalidArgumentError,
    ShapeMismatchError,
    UnsupportedArchitectureError,
    UnsupportedModuleError,
)
from refusal_core.model import get_layout

__all__ = [
    "GGUF_BLOCK_SIZE",
    "GGUF_METHODS",
    "GGUF_TYPES",
    "GgufConfig",
    "dequantize_block_linears_",
    "gguf_dequantized",
    "gguf_plan",
    "quantize_gguf_",
]

#: The types the ``gguf`` package can quantize that llama.cpp ships as whole-file types of this kind.
GGUF_TYPES = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")

#: Weights per block for every type of :data:`GGUF_TYPES` (llama.cpp's QK4_0 = QK5_0 = QK8_0 = 32).
GGUF_BLOCK_SIZE = 32

#: Block width of Q6_K, which llama.cpp uses for ``output.weight`` when the row width allows it.
_Q6_K_BLOCK = 256


@dataclass(frozen=True)
class GgufConfig(CompressionConfig):
    """One of llama.cpp's legacy block types, applied to every block linear (see the module docstring)."""

    qtype: str = "Q4_0"

    def __post_init__(self) -> None:
        if self.qtype not in GGUF_TYPES:
            raise InvalidArgumentError(
                f"qtype must be one of {GGUF_TYPES} (the K-quants need llama.cpp's own quantizer: "
                "methods gguf-q4_k_m, gguf-q5_k_m, gguf-q6_k with the llamacpp extra), "
                f"got {self.qtype!r}"
            )

    def record_details(self, model: nn.Module) -> dict[str, Any]:
        """What is quantized to which type, and what llama.cpp would do with every other tensor."""
        return gguf_plan(model, self.qtype)


#: CLI name → config.
GGUF_METHODS: Mapping[str, CompressionConfig] = MappingProxyType(
    {f"gguf-{t.lower()}": GgufConfig(t) for t in GGUF_TYPES}
)


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise InvalidArgumentError(
            f"the GGUF methods need the 'gguf' package (pip install gguf): {exc}"
        ) from exc
    return gguf


def gguf_dequantized(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """``dequantize(quantize(weight))`` with the ``gguf`` package's reference numerics for ``qtype``.

    ``weight`` is ``[out, in]`` with ``in`` a multiple of 32, float32 or float64
    (quantized from its float32 value, as llama.cpp quantizes from F32); the
    result has ``weight``'s dtype and device and holds the dequantized values
    exactly. ``weight`` is not modified.
    """
    if qtype not in GGUF_TYPES:
        raise InvalidArgumentError(f"qtype must be one of {GGUF_TYPES}, got {qtype!r}")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ShapeMismatchError(
            f"weight must be a 2-D tensor [out, in], got {getattr(weight, 'shape', weight)}"
        )
    if weight.dtype not in (torch.float32, torch.float64):
        raise UnsupportedModuleError(
            f"GGUF {qtype} needs float32 or float64 weights (its dequantized values are not exact in "
            f"{weight.dtype}); got {weight.dtype}"
        )
    if weight.shape[1] % GGUF_BLOCK_SIZE:
        raise ShapeMismatchError(
            f"GGUF {qtype} quantizes rows in blocks of {GGUF_BLOCK_SIZE}; a row of {weight.shape[1]} inputs "
            "is not a multiple of it"
        )
    gguf = _gguf()
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    w32 = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    deq = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(w32), kind), kind)
    return torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float32)).to(weight.device, weight.dtype)


def _output_type(qtype: str, ncols: int) -> str:
    # llama.cpp: the head keeps Q8_0 in a Q8_0 file, else Q6_K unless its rows do not split into Q6_K blocks.
    if qtype == "Q8_0" or ncols % _Q6_K_BLOCK:
        return "Q8_0"
    return "Q6_K"


def gguf_plan(model: nn.Module, qtype: str) -> dict[str, Any]:
    """For every parameter of ``model``: the type this method gives it, and llama.cpp's type for it.

    Returns ``{"format", "block_size", "quantized": {name: qtype}, "kept": {name:
    {"here": ..., "llama.cpp": ..., "why": ...}}}`` (names as in
    ``model.named_parameters()``).
    """
    if qtype not in GGUF_TYPES:
        raise InvalidArgumentError(f"qtype must be one of {GGUF_TYPES}, got {qtype!r}")
    layout = get_layout(model)
    linear_weights = {f"{bl.full_name}.weight" for bl in block_linears(layout)}
    embedding = layout.embedding.weight
    head_weight = getattr(layout.lm_head, "weight", None)
    tied = head_weight is embedding
    quantized: dict[str, str] = {}
    kept: dict[str, dict[str, str]] = {}
    # remove_duplicate=False: a tied head is listed under its own name too.
    for name, p in model.named_parameters(remove_duplicate=False):
        here = str(p.dtype).removeprefix("torch.")
        if name in linear_weights:
            quantized[name] = qtype
        elif p.ndim < 2:
            kept[name] = {
                "here": here,
                "llama.cpp": "F32",
                "why": "1-D tensors (norms, biases) are never quantized",
            }
        elif p is head_weight or (p is embedding and tied):
            kept[name] = {
                "here": here,
                "llama.cpp": _output_type(qtype, int(p.shape[-1])),
                "why": "the output head (and a token embedding tied to it) gets Q6_K, Q8_0 in Q8_0 files "
                "or when a row is not a multiple of 256; this project never compresses the head",
            }
        elif p is embedding:
            kept[name] = {
                "here": here,
                "llama.cpp": qtype,
                "why": "an untied token embedding gets the file's type in llama.cpp; "
                "this project compresses block linears only",
            }
        else:
            kept[name] = {"here": here, "llama.cpp": "not decided here", "why": "not a block linear"}
    return {"format": qtype, "block_size": GGUF_BLOCK_SIZE, "quantized": quantized, "kept": kept}


def quantize_gguf_(model: nn.Module, qtype: str) -> dict[str, float]:
    """Replace every block linear's weight by its GGUF ``qtype`` dequantization, in place.

    Returns the relative Frobenius rounding error per module (full name). Every
    linear is checked (plain float ``nn.Linear``, float32/float64, finite, row
    width a multiple of 32) before the first one changes; a failure raises a
    :class:`~refusal_core.errors.RefusalCoreError` naming the module.
    """
    if qtype not in GGUF_TYPES:
        raise InvalidArgumentError(f"qtype must be one of {GGUF_TYPES}, got {qtype!r}")
    _gguf()
    return dequantize_block_linears_(
        model,
        f"GGUF {qtype}",
        lambda bl: qtype,
        lambda t: GGUF_BLOCK_SIZE,
        gguf_dequantized,
        experts="which the GGUF methods do not quantize yet",
        width="llama.cpp has no fallback type for this format either",
    )


def dequantize_block_linears_(
    model: nn.Module,
    operation: str,
    type_of: Callable[[BlockLinear], str],
    block_size: Callable[[str], int],
    dequantized: Callable[[torch.Tensor, str], torch.Tensor],
    *,
    experts: str,
    width: str,
) -> dict[str, float]:
    """Replace every block linear's weight by ``dequantized(weight, type_of(linear))``, in place, after
    checking every one (plain float ``nn.Linear``, float32/float64, finite, rows a multiple of the
    type's ``block_size``) before the first changes; MoE models are refused (``experts`` says why),
    and ``width`` says what llama.cpp does with a row width that does not fit. Returns the relative
    Frobenius rounding error per module (full name). The GGUF and K-quant methods' one loop."""
    layout = get_layout(model)
    if any(layout.is_moe(layer) for layer in range(layout.n_layers)):
        # llama.cpp quantizes every expert matrix too; leaving the fused experts float would misstate it.
        raise UnsupportedArchitectureError(
            f"{operation}: {layout.spec.family} keeps its routed experts as fused 3-D parameters, {experts}"
        )
    linears = require_float_linears(layout, operation)
    for bl in linears:
        w = bl.linear.weight
        if w.dtype not in (torch.float32, torch.float64):
            raise UnsupportedModuleError(
                f"{operation} needs float32 or float64 weights (the dequantized values are exact only "
                f"there); {bl.full_name} is {w.dtype}: load the model in float32 first"
            )
        size = block_size(type_of(bl))
        if w.shape[1] % size:
            raise ShapeMismatchError(
                f"{operation} quantizes rows in blocks of {size} inputs; "
                f"{bl.full_name} has rows of {w.shape[1]} ({width})"
            )
    errors: dict[str, float] = {}
    with torch.no_grad():
        for bl in linears:
            w = bl.linear.weight
            new = dequantized(w, type_of(bl))
            errors[bl.full_name] = relative_error(new, w)
            w.copy_(new)
    return errors


#: bits per stored weight of each type (a block of 32 holds at most 2^bits distinct values).
GGUF_BITS: Mapping[str, int] = MappingProxyType({"Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q4_0": 4, "Q4_1": 4})


@register_method(
    GgufConfig,
    "gguf",
    needs_calibration=False,
    kind="simulation",
    # the exact dequantized weights a llama.cpp file of that type computes with
    storage="dequantized-simulation",
    requantize="gguf-blocks",
    names={f"gguf-{t.lower()}": GgufConfig(t) for t in GGUF_TYPES},
    bits=lambda c: GGUF_BITS[c.qtype],
)
def _gguf_handler(
    model: nn.Module, config: GgufConfig, calibration: Calibration | None, *, batch_size: int, progress: bool
) -> dict[str, float]:
    return quantize_gguf_(model, config.qtype)
