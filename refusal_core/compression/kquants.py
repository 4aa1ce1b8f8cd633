"""llama.cpp's K-quant file types (Q4_K_M, Q5_K_M, Q6_K) as compression methods, with llama.cpp's own
quantizer.

The ``gguf`` package can dequantize the K-quant types but not quantize them, so these methods call
llama.cpp's quantizer itself: ``ggml_quantize_chunk`` of the ``libggml`` that ``llama-cpp-python``
ships (extra ``llamacpp``; its tox environment builds it from source). Every block linear's weight is
quantized from float32 to the type llama.cpp's ``llama-quantize`` gives that tensor in a file of the
chosen type (without an importance matrix) and replaced by the exact dequantization of those bytes
(``gguf.quants.dequantize``), so the model computes with the weights such a file holds.

Which tensor gets which type, as ``src/llama-quant.cpp`` (``llama_tensor_get_type_impl``, llama.cpp
as vendored by llama-cpp-python 0.3.36) decides it for a dense, non-Falcon model:

=============  =====================  ===================================================
method         file type              block linears
=============  =====================  ===================================================
gguf-q4_k_m    LLAMA_FTYPE_Q4_K_M     Q4_K; ``v_proj`` (attn_v) and ``down_proj`` (ffn_down)
                                      Q6_K in the layers where ``use_more_bits(i, n)``
gguf-q5_k_m    LLAMA_FTYPE_Q5_K_M     Q5_K; the same attn_v / ffn_down layers Q6_K
gguf-q6_k      LLAMA_FTYPE_Q6_K       Q6_K
=============  =====================  ===================================================

``use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` (integer division). A row
width (input features) that is not a multiple of 256, the K-quants' super-block, falls back as in
llama.cpp: Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0 (32-wide blocks); a width that is not a
multiple of 32 either is refused here (llama.cpp would store F16). The record lists every block
linear's type. Not modelled, and refused or written down: Mixture-of-Experts models (llama.cpp's
8-expert rules) are refused, as by the legacy GGUF methods; llama.cpp's rule that raises the
attn_v of 70B-class models to Q5_K is not applied (the record says so); the embedding and the head
stay in full precision, as for every method of this project (llama.cpp stores the head in Q6_K).

An AIRD repair of a K-quant model is refused: putting the edit back on a K-quant grid would need
llama.cpp's quantizer again, and the repair path does not call it yet.
"""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from refusal_core.compression._common import BlockLinear, block_linears
from refusal_core.compression._registry import register_method
from refusal_core.compression.calibration import Calibration
from refusal_core.compression.config import CompressionConfig
from refusal_core.compression.gguf import dequantize_block_linears_
from refusal_core.errors import (
    InvalidArgumentError,
    ShapeMismatchError,
    UnsupportedModuleError,
)
from refusal_core.model import get_layout

__all__ = [
    "KQUANT_FTYPES",
    "KquantConfig",
    "ggml_dequantized",
    "kquant_tensor_types",
    "quantize_kquant_",
    "use_more_bits",
]

#: The whole-file types offered, as llama.cpp names them.
KQUANT_FTYPES = ("Q4_K_M", "Q5_K_M", "Q6_K")

#: ggml's type ids (``enum ggml_type``; the same numbers as ``gguf.GGMLQuantizationType``).
GGML_TYPE_IDS: Mapping[str, int] = MappingProxyType(
    {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
)

#: Weights per block of each type (the K-quants' super-block is 256).
BLOCK_SIZE: Mapping[str, int] = MappingProxyType(
    {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
)

#: llama.cpp's fallback when a row does not split into 256-wide super-blocks.
_FALLBACK = MappingProxyType({"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"})

#: Each file type's default tensor type, and the type of the attn_v / ffn_down layers it raises.
_FILE_TYPES: Mapping[str, tuple[str, str | None]] = MappingProxyType(
    {"Q4_K_M": ("Q4_K", "Q6_K"), "Q5_K_M": ("Q5_K", "Q6_K"), "Q6_K": ("Q6_K", None)}
)

#: Stored bits per weight of each file type's default tensor type (scales included, rounded down).
KQUANT_BITS: Mapping[str, int] = MappingProxyType({"Q4_K_M": 4, "Q5_K_M": 5, "Q6_K": 6})


@dataclass(frozen=True)
class KquantConfig(CompressionConfig):
    """One of llama.cpp's K-quant file types applied to the block linears (see the module docstring)."""

    ftype: str = "Q4_K_M"

    def __post_init__(self) -> None:
        if self.ftype not in KQUANT_FTYPES:
            raise InvalidArgumentError(f"ftype must be one of {KQUANT_FTYPES}, got {self.ftype!r}")

    def record_details(self, model: nn.Module) -> dict[str, Any]:
        """The file type and every block linear's tensor type (llama.cpp's rule, see the module docstring)."""
        return {
            "format": self.ftype,
            "quantizer": "llama.cpp ggml_quantize_chunk (llama-cpp-python 0.3.36), no importance matrix",
            "tensor_types": kquant_tensor_types(model, self.ftype),
            "not_applied": "llama.cpp's 70B-class rule (attn_v Q4_K -> Q5_K); embedding and head kept",
        }


KQUANT_METHODS: Mapping[str, KquantConfig] = MappingProxyType(
    {f"gguf-{t.lower()}": KquantConfig(t) for t in KQUANT_FTYPES}
)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down get more bits in ``*_K_M`` files."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def kquant_tensor_types(model: nn.Module, ftype: str) -> dict[str, str]:
    """The type of every block linear (full module name) in a llama.cpp ``ftype`` file of ``model``."""
    if ftype not in KQUANT_FTYPES:
        raise InvalidArgumentError(f"ftype must be one of {KQUANT_FTYPES}, got {ftype!r}")
    layout = get_layout(model)
    base, more = _FILE_TYPES[ftype]
    out: dict[str, str] = {}
    for bl in block_linears(layout):
        qtype = base
        raised = bl.name in ("v_proj", "down_proj") and use_more_bits(bl.layer, layout.n_layers)
        if more is not None and raised:
            qtype = more
        weight = bl.module.weight
        assert isinstance(weight, torch.Tensor)  # every block linear has a 2-D weight
        ncols = int(weight.shape[1])
        if ncols % BLOCK_SIZE[qtype]:
            qtype = _FALLBACK[qtype]
        out[bl.full_name] = qtype
    return out


def llamacpp_available() -> bool:
    """Whether ``llama_cpp`` (llama-cpp-python) is installed."""
    return importlib.util.find_spec("llama_cpp") is not None


_LIB: Any = None


def _libggml() -> Any:
    """llama-cpp-python's ``libggml`` with the two functions used here typed."""
    global _LIB
    if _LIB is None:
        try:
            from llama_cpp import _ggml  # the ctypes handle llama-cpp-python loads its ggml through
        except ImportError as exc:
            raise InvalidArgumentError(
                f"the K-quant methods need llama-cpp-python (pip install 'refusal_core[llamacpp]'): {exc}"
            ) from exc
        lib = _ggml.libggml
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int,  # enum ggml_type
            ctypes.c_void_p,  # const float * src
            ctypes.c_void_p,  # void * dst
            ctypes.c_int64,  # start
            ctypes.c_int64,  # nrows
            ctypes.c_int64,  # n_per_row
            ctypes.c_void_p,  # const float * imatrix (NULL)
        ]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        _LIB = lib
    return _LIB


def ggml_quantize(weight: np.ndarray, qtype: str) -> np.ndarray:
    """llama.cpp's bytes of float32 ``weight [rows, cols]`` in ``qtype``: ``uint8 [rows, row_size]``."""
    if qtype not in GGML_TYPE_IDS:
        raise InvalidArgumentError(f"qtype must be one of {tuple(GGML_TYPE_IDS)}, got {qtype!r}")
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % BLOCK_SIZE[qtype]:
        raise ShapeMismatchError(f"{qtype} needs a 2-D weight with rows of a multiple of {BLOCK_SIZE[qtype]}")
    lib = _libggml()
    kind = GGML_TYPE_IDS[qtype]
    rows, cols = w.shape
    row_size = int(lib.ggml_row_size(kind, cols))
    out = np.zeros((rows, row_size), dtype=np.uint8)
    written = int(lib.ggml_quantize_chunk(kind, w.ctypes.data, out.ctypes.data, 0, rows, cols, None))
    if written != rows * row_size:
        raise UnsupportedModuleError(f"ggml_quantize_chunk wrote {written} bytes, expected {rows * row_size}")
    return out


def ggml_dequantized(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """``weight`` quantized to ``qtype`` by llama.cpp and dequantized by the ``gguf`` package, exactly
    (``weight``'s dtype and device; float32 or float64 in)."""
    import gguf

    if weight.dtype not in (torch.float32, torch.float64):
        raise UnsupportedModuleError(f"GGUF {qtype} needs float32 or float64 weights, got {weight.dtype}")
    raw = ggml_quantize(weight.detach().to("cpu", torch.float32).numpy(), qtype)
    deq = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype))
    return torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float32)).to(weight.device, weight.dtype)


def quantize_kquant_(model: nn.Module, ftype: str) -> dict[str, float]:
    """Every block linear replaced by its llama.cpp ``ftype`` dequantization, in place; returns the
    relative Frobenius rounding error per module. Everything is checked before the first change."""
    if ftype not in KQUANT_FTYPES:
        raise InvalidArgumentError(f"ftype must be one of {KQUANT_FTYPES}, got {ftype!r}")
    _libggml()
    types: dict[str, str] = {}

    def type_of(bl: BlockLinear) -> str:  # read after the helper has refused MoE models and non-linears
        if not types:
            types.update(kquant_tensor_types(model, ftype))
        return types[bl.full_name]

    return dequantize_block_linears_(
        model,
        f"GGUF {ftype}",
        type_of,
        lambda t: BLOCK_SIZE[t],
        ggml_dequantized,
        experts="and llama.cpp's K-quant rules for experts are not modelled",
        width="llama.cpp would keep it in F16",
    )


@register_method(
    KquantConfig,
    "gguf-k",
    needs_calibration=False,
    kind="simulation",
    storage="dequantized-simulation",
    requantize="refuse",
    names=dict(KQUANT_METHODS),
    extra="llamacpp",
    available=llamacpp_available,
    install_hint="pip install 'refusal_core[llamacpp]': llama-cpp-python, built from source (~15 min)",
    bits=lambda c: KQUANT_BITS[c.ftype],
    repair_note="putting an AIRD edit back on a K-quant grid needs llama.cpp's quantizer, "
    "which the repair path does not call",
)
def _kquant_handler(
    model: nn.Module,
    config: KquantConfig,
    calibration: Calibration | None,
    *,
    batch_size: int,
    progress: bool,
) -> dict[str, float]:
    return quantize_kquant_(model, config.ftype)
