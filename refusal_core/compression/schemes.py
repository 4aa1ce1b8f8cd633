"""Quantization schemes as small adapters: how to read a quantized linear's weight and how to write one.

Every linear an edit may meet is handled by one :class:`Scheme` (first match in
:data:`SCHEMES`); AIRD and weight orthogonalization of quantized models
(:mod:`refusal_core.quantized_edit`) go through it instead of branching on the
module type.

========  ========================  ===========================  =========================================
name      module                    ``dequantize``               ``requantize``
========  ========================  ===========================  =========================================
int8-sim  ``Int8LinearSim``         ``q · scale``                ``int8_quantize`` of it, same threshold
bnb-int8  ``bnb.nn.Linear8bitLt``   ``int8_vectorwise_dequant``  ``Linear8bitLt``, same threshold
bnb-4bit  ``bnb.nn.Linear4bit``     ``dequantize_4bit``          ``Linear4bit``, same type/block/dtypes
float     float ``nn.Linear``       a copy of the weight         (refused: a float linear is not quantized)
========  ========================  ===========================  =========================================

AWQ's result is fake-quantized: plain float ``nn.Linear`` weights on the
quantization grid, so it is the ``float`` scheme here (nothing tells a module
that it was AWQ-rounded; the method table's ``storage`` and ``requantize`` say so, and
:mod:`refusal_core.repair` rounds an edit onto the grid again).

Example:
    >>> from torch import nn
    >>> scheme_of(nn.Linear(4, 2)).name
    'float'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from refusal_core.compression.bnb import dequantize_bnb, is_bnb_4bit, is_bnb_int8
from refusal_core.compression.quantization import Int8LinearSim
from refusal_core.errors import UnsupportedModuleError
from refusal_core.functional import int8_quantize

__all__ = ["QUANTIZED_SCHEMES", "SCHEMES", "Scheme", "scheme_named", "scheme_of"]


@dataclass(frozen=True)
class Scheme:
    """One way a linear stores its weight; subclasses implement the three methods."""

    name: str
    quantized: bool = True

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` stores its weight this way."""
        raise NotImplementedError

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The float weight ``[out, in]`` that ``module`` computes with, as a new tensor."""
        raise NotImplementedError

    def requantize(self, like: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        """A new module of this scheme, with the settings of ``like``, holding ``weight`` and ``bias``."""
        raise NotImplementedError


class _Int8Sim(Scheme):
    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, Int8LinearSim)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        assert isinstance(module, Int8LinearSim)  # matched
        return module.dequantize()

    def requantize(self, like: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        if not isinstance(like, Int8LinearSim):
            raise UnsupportedModuleError(
                f"int8-sim requantize needs an Int8LinearSim, got {type(like).__name__}"
            )
        q, scale = int8_quantize(weight)
        if bias is not None and like.bias is not None:
            bias = bias.to(like.bias.dtype)
        return Int8LinearSim(q, scale, bias, like.threshold).to(weight.device)


class _BnbInt8(Scheme):
    def matches(self, module: nn.Module) -> bool:
        return is_bnb_int8(module)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return dequantize_bnb(module)

    def requantize(self, like: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        from refusal_core.compression import _bnb_modules as bm  # present: `like` is a bnb module

        old: Any = like
        return bm.int8_from_weight(weight, bias, float(old.state.threshold), weight.device)


class _Bnb4bit(Scheme):
    def matches(self, module: nn.Module) -> bool:
        return is_bnb_4bit(module)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return dequantize_bnb(module)

    def requantize(self, like: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        from refusal_core.compression import _bnb_modules as bm  # present: `like` is a bnb module

        settings = bm.four_bit_settings(like)
        return bm.nf4_from_weight(
            weight,
            bias,
            weight.device,
            quant_type=settings["quant_type"],
            blocksize=settings["blocksize"],
            compress_statistics=settings["compress_statistics"],
            dtype=settings["dtype"],
            compute_dtype=settings["compute_dtype"],
            quant_storage=settings["quant_storage"],
            cpu_packing=settings["cpu_packing"],
        )


class _Float(Scheme):
    def matches(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return (
            isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and weight.is_floating_point()
        )

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)  # matched
        return weight.detach().clone()

    def requantize(self, like: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        raise UnsupportedModuleError("a float nn.Linear is not quantized; there is nothing to re-quantize")


#: The schemes in match order (a bitsandbytes module is also an ``nn.Linear``: quantized ones first).
SCHEMES: tuple[Scheme, ...] = (
    _Int8Sim("int8-sim"),
    _BnbInt8("bnb-int8"),
    _Bnb4bit("bnb-4bit"),
    _Float("float", False),
)

#: Names of the quantized schemes.
QUANTIZED_SCHEMES = tuple(s.name for s in SCHEMES if s.quantized)


def scheme_of(module: nn.Module) -> Scheme:
    """The scheme of ``module``; :class:`~refusal_core.errors.UnsupportedModuleError` (naming its type)
    if none matches."""
    for scheme in SCHEMES:
        if scheme.matches(module):
            return scheme
    raise UnsupportedModuleError(
        f"{type(module).__name__} is neither a float nn.Linear nor a supported quantized linear "
        f"({', '.join(QUANTIZED_SCHEMES)})"
    )


def scheme_named(name: str) -> Scheme:
    """The scheme called ``name``; :class:`~refusal_core.errors.UnsupportedModuleError` if none is."""
    for scheme in SCHEMES:
        if scheme.name == name:
            return scheme
    raise UnsupportedModuleError(f"no quantization scheme {name!r}; known: {[s.name for s in SCHEMES]}")
