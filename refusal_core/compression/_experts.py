"""The routed experts of Mixture-of-Experts blocks as matrices, and the calibration tokens routed to each.

transformers 5 stores an MoE block's experts fused: ``gate_up_proj [E, 2·ff, d]``
(gate rows first, then up rows) and ``down_proj [E, d, ff]``. Compression
works on each expert's slice as one matrix (``W = param[e]``, a view, so an
in-place write edits the fused parameter), which lets the functional core's
2-D masks and quantizers apply unchanged. The router is never among them.

Calibration (Wanda, AWQ) must see an expert's *routed* inputs only: the
tokens whose top-k choice includes it. :func:`routed_inputs` takes them from
the recorded calls of the fused experts module, whose arguments are exactly
``(hidden [N, d], top_k_index [N, k], top_k_weights [N, k])``, and recomputes
the expert's down-projection input ``act(gate) · up`` from its own weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from refusal_core._finite import all_finite
from refusal_core.compression.calibration import RecordedCall
from refusal_core.errors import NonFiniteError, UnsupportedModuleError
from refusal_core.model import ModelLayout

__all__ = [
    "EXPERT_MATRICES",
    "ExpertMatrix",
    "RoutedInputs",
    "expert_effective_weights",
    "expert_matrices",
    "routed_inputs",
]

#: The fused parameters of an experts module, each one matrix per expert.
EXPERT_MATRICES = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertMatrix:
    """Matrix ``name`` (``gate_up_proj`` or ``down_proj``) of routed expert ``expert`` in block ``layer``."""

    layer: int
    name: str
    expert: int
    full_name: str
    module: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        """The expert's slice ``[out, in]`` of the fused parameter (a view: writes edit the model)."""
        return getattr(self.module, self.name)[self.expert]


def _experts_modules(layout: ModelLayout) -> Iterator[tuple[int, nn.Module, str]]:
    """``(layer, fused experts module, its full name)`` of every MoE block, in block order."""
    names = {id(m): n for n, m in layout.model.named_modules()}
    for layer in range(layout.n_layers):
        if layout.spec.moe is not None and layout.is_moe(layer):
            experts = layout.experts(layer)
            yield layer, experts, names.get(id(experts), f"layers.{layer}.mlp.experts")


def expert_matrices(layout: ModelLayout, operation: str | None = None) -> list[ExpertMatrix]:
    """Every routed expert matrix of every MoE block, in block, then matrix, then expert order.

    ``full_name`` is ``"<experts module>.<name>[<e>]"``. With ``operation``,
    each fused parameter is checked to be a finite floating-point 3-D tensor
    (:class:`UnsupportedModuleError` / :class:`NonFiniteError` naming it) before
    anything is returned. Empty for dense and Mamba models.
    """
    out: list[ExpertMatrix] = []
    for layer, experts, prefix in _experts_modules(layout):
        for name in EXPERT_MATRICES:
            param = getattr(experts, name, None)
            if operation is not None:
                if not isinstance(param, torch.Tensor) or param.ndim != 3 or not param.is_floating_point():
                    raise UnsupportedModuleError(
                        f"{operation} needs fused float expert weights [E, out, in]; {prefix}.{name} is "
                        f"{type(param).__name__ if not isinstance(param, torch.Tensor) else param.dtype}"
                    )
                if not all_finite(param):
                    raise NonFiniteError(f"{operation}: {prefix}.{name} contains NaN or inf")
            assert isinstance(param, torch.Tensor)
            out.extend(
                ExpertMatrix(layer, name, e, f"{prefix}.{name}[{e}]", experts) for e in range(param.shape[0])
            )
    return out


def expert_effective_weights(layout: ModelLayout) -> list[tuple[str, torch.Tensor]]:
    """``(full name, W_e)`` of every routed expert matrix as it computes: float slices, or dequantized
    LLM.int8 simulations (:class:`~refusal_core.compression.quantization.Int8ExpertsSim`)."""
    out: list[tuple[str, torch.Tensor]] = []
    for _, experts, prefix in _experts_modules(layout):
        for name in EXPERT_MATRICES:
            p = getattr(experts, name)
            for e in range(len(p)):
                w = p[e].detach() if isinstance(p, torch.Tensor) else p[e].dequantize()
                out.append((f"{prefix}.{name}[{e}]", w))
    return out


@dataclass(frozen=True)
class RoutedInputs:
    """The calibration inputs one expert saw: ``x [n, d]`` (to gate_up) and ``h [n, ff]`` (to down)."""

    gate_up: torch.Tensor
    down: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.gate_up.shape[0])


def _expert_hidden(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """``act(gate) · up`` of expert ``e`` on ``x [n, d]``: the input of its down projection.

    The gate rows come first in ``gate_up_proj[e]`` (the forward splits with ``chunk(2)``).
    """
    gate_up = cast(torch.Tensor, experts.gate_up_proj)
    gate, up = nn.functional.linear(x, gate_up[e]).chunk(2, dim=-1)
    act = experts.act_fn
    assert callable(act)
    out = act(gate) * up
    assert isinstance(out, torch.Tensor)
    return out


def routed_inputs(experts: nn.Module, calls: Sequence[RecordedCall]) -> list[RoutedInputs]:
    """Per expert, the real calibration tokens routed to it and its down-projection inputs on them.

    ``calls`` are recorded calls of the fused experts module (one per batch):
    ``args = (hidden [B·T, d], top_k_index [B·T, k], top_k_weights)``; only real
    tokens (``token_mask``) count. A token reaches expert ``e`` when ``e`` is
    among its top-k (whatever its routing weight); an expert no token reaches
    gets empty ``[0, d]`` / ``[0, ff]`` tensors.
    """
    n_experts = int(cast(torch.Tensor, experts.down_proj).shape[0])
    xs: list[list[torch.Tensor]] = [[] for _ in range(n_experts)]
    hs: list[list[torch.Tensor]] = [[] for _ in range(n_experts)]
    with torch.no_grad():
        for call in calls:
            hidden, index = call.args[0], call.args[1]
            real = call.token_mask.reshape(-1)
            x, idx = hidden[real], index[real]
            for e in range(n_experts):
                xe = x[(idx == e).any(dim=-1)]
                xs[e].append(xe)
                hs[e].append(_expert_hidden(experts, e, xe))
    return [RoutedInputs(torch.cat(x), torch.cat(h)) for x, h in zip(xs, hs)]
