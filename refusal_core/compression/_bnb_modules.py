"""bitsandbytes module classes and their (de)quantization; imported lazily by :mod:`.bnb`.

This module imports ``bitsandbytes`` at import time, so only
:mod:`refusal_core.compression.bnb` imports it, and only once a bitsandbytes
method is used: importing bitsandbytes is slow and logs backend messages.

The two classes are the stock ``bnb.nn.Linear8bitLt`` / ``bnb.nn.Linear4bit``
(``isinstance`` holds) with two additions: ``dequantize()`` (the float weight
the module computes with, what the rest of refusal_core reads through
:func:`~refusal_core.compression._common.effective_weight`) and a ``train()``
that keeps them in eval mode (see :class:`BnbLinear8bit`).
"""

from __future__ import annotations

import contextvars
import copy
import logging
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from torch import nn

__all__ = [
    "BnbLinear4bit",
    "BnbLinear8bit",
    "cpu_4bit_rows_ok",
    "dequantize_4bit",
    "dequantize_int8",
    "int8_from_weight",
    "nf4_from_weight",
]

# MatMul8bitLt logs a warning on every call whose input is not float16 (it casts to
# float16 before quantizing the activations). The cast is documented behaviour of this
# backend, so the message is dropped while one of our modules runs, and only then.
_QUIET_CAST = contextvars.ContextVar("refusal_core_bnb_quiet_cast", default=False)


class _DropCastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_QUIET_CAST.get() and "will be cast from" in record.getMessage())


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropCastWarning())


class BnbLinear8bit(bnb.nn.Linear8bitLt):
    """``bnb.nn.Linear8bitLt`` (``has_fp16_weights=False``) that stays in eval mode.

    In training mode bitsandbytes' CPU path multiplies by the dequantized
    weight instead of running LLM.int8 (no activation quantization, no outlier
    split), silently. This class is inference-only: :meth:`train` leaves it in
    eval mode whatever the mode asked for. Gradients with respect to the input
    still flow (bitsandbytes' backward uses the int8 weight).
    """

    def train(self, mode: bool = True) -> BnbLinear8bit:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        token = _QUIET_CAST.set(True)
        try:
            out: torch.Tensor = super().forward(x)
        finally:
            _QUIET_CAST.reset(token)
        return out

    def dequantize(self) -> torch.Tensor:
        """The weight ``CB · SCB / 127`` ``[out, in]`` float32, a new tensor."""
        return dequantize_int8(self)


class BnbLinear4bit(bnb.nn.Linear4bit):
    """``bnb.nn.Linear4bit`` with :meth:`dequantize`; ``cpu_packing`` False keeps bnb's layout portable.

    On CPUs with AVX512-BF16, bitsandbytes repacks the weight at the first eval
    forward for its own kernel and rounds the block scales to bfloat16. With
    ``cpu_packing=False`` (our default) it keeps the standard layout and float32
    scales, so results do not depend on the CPU's instruction set.
    """

    def __init__(self, *args: Any, cpu_packing: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not cpu_packing:
            self.support_avx512bf16_for_cpu = False

    def dequantize(self) -> torch.Tensor:
        """The weight ``[out, in]`` in the dtype it was quantized from, a new tensor."""
        return dequantize_4bit(self)


def dequantize_int8(module: nn.Module) -> torch.Tensor:
    """Float32 weight ``[out, in]`` of an int8 ``Linear8bitLt`` (before or after its first forward)."""
    weight: Any = module.weight
    state = getattr(module, "state", None)
    # Before the first forward the scales live on the parameter, afterwards on the matmul state.
    scb = getattr(weight, "SCB", None)
    if scb is None and state is not None:
        scb = getattr(state, "SCB", None)
    cb = weight.data
    if scb is None or cb.dtype != torch.int8:
        raise ValueError("Linear8bitLt holds no int8 weight (has_fp16_weights=True or not yet quantized)")
    out: torch.Tensor = bnbf.int8_vectorwise_dequant(cb, scb)
    return out.to(torch.float32)


def _plain_4bit_state(module: nn.Module) -> tuple[torch.Tensor, Any]:
    """The packed weight and quant state in bitsandbytes' standard layout (copies if repacked for CPU)."""
    weight: Any = module.weight
    state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
    if state is None:
        raise ValueError("Linear4bit is not quantized yet (no quant_state)")
    data: torch.Tensor = weight.data
    if getattr(state, "packing_format_for_cpu", False):
        # The inverse rewrites the state in place: work on copies so the module is untouched.
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
    return data, state


def cpu_4bit_rows_ok(in_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes' native CPU 4-bit dequantization is right for rows of ``in_features``.

    Measured on bitsandbytes 0.50.2: the CPU kernel indexes block scales per
    row, so when a block spans two rows (``in_features % blocksize != 0``) it
    dequantizes with the wrong scales (relative weight error ~0.2-0.4 instead
    of ~0.09 for NF4); its quantizer and its pure-torch fallback are right.
    """
    return in_features % blocksize == 0


def dequantize_4bit(module: nn.Module) -> torch.Tensor:
    """Float weight ``[out, in]`` of a quantized ``Linear4bit`` (nf4 or fp4), in its quantization dtype."""
    data, state = _plain_4bit_state(module)
    if data.device.type == "cpu" and not cpu_4bit_rows_ok(int(state.shape[-1]), int(state.blocksize)):
        raise ValueError(
            f"Linear4bit with in_features {state.shape[-1]} and blocksize {state.blocksize} on the CPU: "
            "bitsandbytes' CPU kernel dequantizes blocks that span rows wrongly"
        )
    out: torch.Tensor = bnbf.dequantize_4bit(data, state)
    return out


def four_bit_settings(module: nn.Module) -> dict[str, Any]:
    """What is needed to quantize a new weight exactly as ``module`` was."""
    _, state = _plain_4bit_state(module)
    weight: Any = module.weight
    return {
        "quant_type": str(state.quant_type),
        "blocksize": int(state.blocksize),
        "compress_statistics": bool(getattr(weight, "compress_statistics", state.nested)),
        "dtype": getattr(state, "original_dtype", None) or state.dtype,
        "compute_dtype": getattr(module, "compute_dtype", None),
        "quant_storage": getattr(module, "quant_storage", torch.uint8),
        "cpu_packing": bool(getattr(module, "support_avx512bf16_for_cpu", False)),
    }


def _cpu_copy(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    # bitsandbytes quantizes when a parameter moves *from the CPU* to a device.
    return t.detach().to(device="cpu", dtype=dtype or t.dtype).clone().contiguous()


def int8_from_weight(
    weight: torch.Tensor, bias: torch.Tensor | None, threshold: float, device: torch.device
) -> BnbLinear8bit:
    """A :class:`BnbLinear8bit` for ``weight [out, in]`` on ``device``, in eval mode.

    ``threshold`` is bitsandbytes' (0 disables the outlier split). bitsandbytes
    casts the weight to float16 before its per-row absmax int8 quantization.
    """
    out_f, in_f = weight.shape
    mod = BnbLinear8bit(
        in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=threshold, device="meta"
    )
    mod.weight = bnb.nn.Int8Params(_cpu_copy(weight), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        mod.bias = nn.Parameter(_cpu_copy(bias), requires_grad=False)
    mod = mod.to(device)  # quantization happens here
    mod.eval()
    return mod


def nf4_from_weight(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    device: torch.device,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    compress_statistics: bool = True,
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
    quant_storage: torch.dtype = torch.uint8,
    cpu_packing: bool = False,
) -> BnbLinear4bit:
    """A :class:`BnbLinear4bit` for ``weight [out, in]`` (quantized from ``dtype``, default its own)."""
    out_f, in_f = weight.shape
    mod = BnbLinear4bit(
        in_f,
        out_f,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        quant_storage=quant_storage,
        cpu_packing=cpu_packing,
        device="meta",  # the random initial weight is replaced below; do not allocate it
    )
    mod.weight = bnb.nn.Params4bit(
        _cpu_copy(weight, dtype),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        quant_storage=quant_storage,
        module=mod,
    )
    if bias is not None:
        mod.bias = nn.Parameter(_cpu_copy(bias), requires_grad=False)
    mod = mod.to(device)  # quantization happens here
    mod.eval()
    return mod
