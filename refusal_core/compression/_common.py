"""Model walking shared by pruning and quantization: the block linears, by full module name."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from refusal_core._finite import all_finite
from refusal_core.compression._transaction import check_model_finite
from refusal_core.errors import NonFiniteError, UnsupportedModuleError
from refusal_core.model import ModelLayout


@dataclass(frozen=True)
class BlockLinear:
    """One linear of a decoder block: its layer, short name (``q_proj`` …), full module name, module."""

    layer: int
    name: str
    full_name: str
    module: nn.Module

    @property
    def linear(self) -> nn.Linear:
        """The module as an ``nn.Linear`` (after :func:`require_float_linears` has checked it)."""
        if not isinstance(self.module, nn.Linear):
            raise UnsupportedModuleError(f"{self.full_name} is {type(self.module).__name__}, not nn.Linear")
        return self.module


def block_linears(layout: ModelLayout) -> list[BlockLinear]:
    """Every linear of every block, in block order then ``q_proj … down_proj`` order."""
    names = {id(m): n for n, m in layout.model.named_modules()}
    out = []
    for layer in range(layout.n_layers):
        for name, module in layout.linears(layer).items():
            out.append(BlockLinear(layer, name, names.get(id(module), f"layers.{layer}.{name}"), module))
    return out


def require_float_linears(layout: ModelLayout, operation: str) -> list[BlockLinear]:
    """The block linears, checked to be plain float ``nn.Linear`` with finite weights and biases.

    Every other floating parameter and buffer of the model (norms, embeddings,
    the head) is checked finite too (:func:`check_model_finite`).

    Raises :class:`UnsupportedModuleError` (e.g. for an already int8-quantized
    module) or :class:`NonFiniteError`, before the caller changes anything.
    """
    # Everything the operation reads or writes: biases, norms and embeddings as well as the weights.
    check_model_finite(layout.model, operation)
    linears = block_linears(layout)
    for bl in linears:
        if not isinstance(bl.module, nn.Linear):
            raise UnsupportedModuleError(
                f"{operation} needs plain nn.Linear modules; {bl.full_name} is {type(bl.module).__name__}"
            )
        if not bl.module.weight.is_floating_point():
            raise UnsupportedModuleError(f"{operation}: {bl.full_name} has non-float weights")
        if not all_finite(bl.module.weight):
            raise NonFiniteError(f"{operation}: weight of {bl.full_name} contains NaN or inf")
        if bl.module.bias is not None and not all_finite(bl.module.bias):
            raise NonFiniteError(f"{operation}: bias of {bl.full_name} contains NaN or inf")
    return linears


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a block linear computes with: ``.weight`` or a quantized module's ``dequantize()``."""
    dequantize = getattr(module, "dequantize", None)
    if callable(dequantize):
        w = dequantize()
        assert isinstance(w, torch.Tensor)
        return w
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise UnsupportedModuleError(f"{type(module).__name__} exposes no weight")
    return w.detach()


def relative_error(new: torch.Tensor, old: torch.Tensor) -> float:
    """``‖new − old‖_F / ‖old‖_F`` in float64 (0 for an all-zero ``old`` equal to ``new``)."""
    old64, new64 = old.detach().to(torch.float64), new.detach().to(torch.float64)
    denom = float(torch.linalg.vector_norm(old64))
    diff = float(torch.linalg.vector_norm(new64 - old64))
    return diff / denom if denom > 0 else (0.0 if diff == 0 else float("inf"))
