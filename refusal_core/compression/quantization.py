"""Quantizing a whole model in place: the reference LLM.int8 and AWQ simulations.

**LLM.int8.** :func:`quantize_llm_int8_` replaces every block linear by an
:class:`Int8LinearSim`, which stores the int8 weight and its per-row scale and
computes exactly :func:`~refusal_core.functional.llm_int8_linear` (bit for
bit). It deliberately is *not* an ``nn.Linear`` and has no float ``weight``:
weight edits such as AIRD or orthogonalization must refuse it rather than
silently edit a copy.

**AWQ.** :func:`quantize_awq_` is fake quantization: per block, in order, it
searches activation-aware scales (the candidates of
:func:`~refusal_core.functional.awq_scales`) for four groups of linears that
share an input, each scored on the output error of the module the group feeds,

==========================  =========================================  ======================
scale folded (÷ s) into      linears multiplied by s (input columns)    error measured at
==========================  =========================================  ======================
``input_layernorm``          ``q_proj``, ``k_proj``, ``v_proj``         attention output
``v_proj`` output rows       ``o_proj`` (only without grouped-query     ``o_proj`` output
                             attention)
MLP input norm               ``gate_proj``, ``up_proj``                 MLP output
``up_proj`` output rows      ``down_proj``                              ``down_proj`` output
==========================  =========================================  ======================

(or, with ``objective="linear"``, on the group's own linear outputs, which is
exactly :func:`~refusal_core.functional.awq_scales`), then rounds every
linear of the block with :func:`~refusal_core.functional.pseudo_quantize`
(group size ``min(group_size, d_in)``). The weights stay dequantized floats in plain
``nn.Linear`` modules, so later weight edits (AIRD) *are* possible on an AWQ
model; they act on the dequantized values and leave the quantization grid.
Each block is calibrated on the outputs of the already quantized blocks
before it. Before rounding the scaling is function-preserving: a Gemma norm
``x·(1 + w)`` becomes ``x·(1 + w')`` with ``1 + w' = (1 + w)/s``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from refusal_core._finite import all_finite
from refusal_core.compression._common import relative_error, require_float_linears
from refusal_core.compression._experts import expert_matrices, routed_inputs
from refusal_core.compression._transaction import transactional
from refusal_core.compression.calibration import (
    Calibration,
    RecordedCall,
    SequentialBlocks,
)
from refusal_core.compression.config import AwqConfig
from refusal_core.errors import (
    InvalidArgumentError,
    NonFiniteError,
    ShapeMismatchError,
    UnsupportedArchitectureError,
)
from refusal_core.functional import (
    _awq_candidate_scales,
    check_tensor,
    compute_dtype,
    pseudo_quantize,
)
from refusal_core.model import LINEAR_INPUTS, ModelLayout, get_layout, input_taps, replace_module_
from refusal_core.model.layout import ATTENTION_LINEARS
from refusal_core.model.simulated import Int8LinearSim, check_threshold

__all__ = [
    "AwqScaleGroup",
    "Int8ExpertsSim",
    "Int8LinearSim",
    "apply_awq_",
    "apply_awq_scale_",
    "awq_effective_",
    "awq_scale_groups",
    "cast_floating_",
    "quantize_awq_",
    "quantize_experts_int8_",
    "quantize_llm_int8_",
]

# ----------------------------------------------------------------------------
# LLM.int8
# ----------------------------------------------------------------------------


class Int8ExpertsSim(nn.Module):
    """A fused experts module with every expert's two matrices as :class:`Int8LinearSim` (LLM.int8).

    Called like the transformers experts module it replaces,
    ``(hidden [N, d], top_k_index [N, k], top_k_weights [N, k]) → [N, d]``: each
    expert runs ``down(act(gate) · up)`` on the tokens routed to it, through
    LLM.int8 linears, so the outlier columns of ``x`` are those of its routed
    tokens (as a per-expert bitsandbytes linear would see them). ``gate_up_proj``
    and ``down_proj`` are ``nn.ModuleList`` of one simulation per expert; there is
    no float weight to edit (weight edits must refuse it, as for ``Int8LinearSim``).
    """

    gate_up_proj: nn.ModuleList
    down_proj: nn.ModuleList

    def __init__(self, experts: nn.Module, threshold: float) -> None:
        super().__init__()
        gate_up = cast(torch.Tensor, experts.gate_up_proj).detach()
        down = cast(torch.Tensor, experts.down_proj).detach()
        self.num_experts = int(down.shape[0])
        self.act_fn = cast(Callable[[torch.Tensor], torch.Tensor], experts.act_fn)
        self.gate_up_proj = nn.ModuleList(
            Int8LinearSim.from_linear(_linear_of(gate_up[e]), threshold) for e in range(self.num_experts)
        )
        self.down_proj = nn.ModuleList(
            Int8LinearSim.from_linear(_linear_of(down[e]), threshold) for e in range(self.num_experts)
        )

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            gate, up = self.gate_up_proj[e](hidden_states[token_idx]).chunk(2, dim=-1)
            y = self.down_proj[e](self.act_fn(gate) * up) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _linear_of(w: torch.Tensor) -> nn.Linear:
    """A bias-free ``nn.Linear`` holding ``w [out, in]`` (a copy), to quantize like any block linear."""
    lin = nn.Linear(int(w.shape[1]), int(w.shape[0]), bias=False, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def quantize_experts_int8_(layout: ModelLayout, threshold: float) -> dict[str, float]:
    """Replace every MoE block's fused experts by an :class:`Int8ExpertsSim`, in place.

    Returns ``‖W_int8 − W‖/‖W‖`` per expert matrix (full names as in
    :func:`expert_matrices`). The router and any shared expert's gate stay float.
    """
    errors: dict[str, float] = {}
    sims: dict[int, Int8ExpertsSim] = {}
    for em in expert_matrices(layout, "LLM.int8 quantization"):
        if em.layer not in sims:
            sims[em.layer] = Int8ExpertsSim(em.module, threshold)
        sim = sims[em.layer]
        q = (sim.gate_up_proj if em.name == "gate_up_proj" else sim.down_proj)[em.expert]
        dequantize = cast(Callable[[], torch.Tensor], q.dequantize)
        errors[em.full_name] = relative_error(dequantize(), em.weight)
    for layer, sim in sims.items():
        assert layout.spec.moe is not None
        replace_module_(layout.mlp(layer), layout.spec.moe.experts, sim)
    return errors


@transactional  # all or nothing: restored exactly if anything raises after a write
def quantize_llm_int8_(model: nn.Module, threshold: float = 6.0) -> dict[str, float]:
    """Replace every block linear by an :class:`Int8LinearSim`, in place.

    Returns the relative Frobenius rounding error ``‖W_int8 − W‖/‖W‖`` per
    module (full name). Embedding and ``lm_head`` stay float. In an MoE block
    the fused experts become one ``Int8ExpertsSim`` (an ``Int8LinearSim`` per
    expert matrix, errors under ``"<experts>.<name>[e]"``); the router stays float. Raises
    :class:`~refusal_core.errors.UnsupportedModuleError` (e.g. when already
    quantized) or :class:`~refusal_core.errors.InvalidArgumentError` before
    changing anything.
    """
    thr = check_threshold(threshold)
    layout = get_layout(model)
    linears = require_float_linears(layout, "LLM.int8 quantization")
    expert_matrices(layout, "LLM.int8 quantization")  # checked before the first module is swapped
    errors: dict[str, float] = {}
    with torch.no_grad():
        for bl in linears:
            assert isinstance(bl.module, nn.Linear)
            sim = Int8LinearSim.from_linear(bl.module, thr).to(bl.module.weight.device)
            errors[bl.full_name] = relative_error(sim.dequantize(), bl.module.weight)
            layout.set_linear_(bl.layer, bl.name, sim)
        # MoE: every routed expert's two matrices, one simulation each; the router stays float.
        errors.update(quantize_experts_int8_(layout, thr))
    return errors


def cast_floating_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating parameters and buffers of ``model`` to ``dtype`` in place; returns ``model``.

    Unlike ``model.to(dtype)``, the simulated LLM.int8 layers keep their own
    tensors: the per-row ``scale`` stays in the precision it was computed in
    (bitsandbytes also keeps its row statistics in float32), and their forward
    computes in float32 and returns the dtype of its input, so a bfloat16
    model around them sees bfloat16 activations.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgumentError(f"dtype must be a floating torch.dtype, got {dtype!r}")

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    for module in model.modules():
        if not isinstance(module, Int8LinearSim):
            module._apply(cast, recurse=False)
    return model


# ----------------------------------------------------------------------------
# AWQ
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AwqScaleGroup:
    """Linears sharing one input, the module whose output that input is, and which captured input it is.

    ``source`` names the captured input: ``"attn_in"`` (input of q/k/v),
    ``"o_in"``, ``"mlp_in"`` (input of gate/up) or ``"down_in"``.
    """

    source: str
    prev: nn.Module
    linears: tuple[nn.Linear, ...]


def _as_linear(m: nn.Module, what: str) -> nn.Linear:
    if not isinstance(m, nn.Linear):
        raise InvalidArgumentError(f"{what} must be an nn.Linear, got {type(m).__name__}")
    return m


def _require_unfused(layout: ModelLayout) -> None:
    if layout.spec.ssm_name is not None:
        raise UnsupportedArchitectureError(
            f"AWQ is not supported for {layout.spec.family}: its input norm feeds attention and a Mamba "
            f"mixer through different multipliers, and the mixer's out_proj reads the scan's output"
        )
    if layout.spec.state_space:
        raise UnsupportedArchitectureError(
            f"AWQ is not supported for {layout.spec.family}: its mixer's x_proj reads the convolution's "
            f"output and out_proj the scan's, so no scale of theirs folds into a preceding op"
        )
    # A fused qkv/gate_up matrix breaks the per-linear scale groups and the v→o / up→down folds.
    if layout.spec.fused_linears:
        raise UnsupportedArchitectureError(
            f"AWQ is not supported for {layout.spec.family}: its fused linears "
            f"{layout.spec.linear_names} have no separate q/k/v and gate/up groups to scale"
        )


def awq_scale_groups(layout: ModelLayout, layer: int) -> list[AwqScaleGroup]:
    """AWQ's scale groups of block ``layer`` (see the table in the module docstring)."""
    _require_unfused(layout)
    lin = {name: _as_linear(m, name) for name, m in layout.linears(layer).items()}

    def fed(source: str) -> tuple[nn.Linear, ...]:
        return tuple(m for name, m in lin.items() if LINEAR_INPUTS[name] == source)

    groups = [AwqScaleGroup("attn_in", layout.input_norm(layer), fed("attn_in"))]
    # With grouped-query attention one v channel feeds several o_proj inputs: no per-channel fold exists.
    if lin["v_proj"].out_features == lin["o_proj"].in_features:
        groups.append(AwqScaleGroup("o_in", lin["v_proj"], fed("o_in")))
    if layout.is_moe(layer):
        # The MLP input norm also feeds the router and every expert: no fold (see awq_effective_).
        return groups
    groups.append(AwqScaleGroup("mlp_in", layout.mlp_input_norm(layer), fed("mlp_in")))
    groups.append(AwqScaleGroup("down_in", lin["up_proj"], fed("down_in")))
    return groups


def apply_awq_scale_(
    prev: nn.Module, linears: Sequence[nn.Linear], s: torch.Tensor, *, norm_offset: float = 0.0
) -> None:
    """Fold ``1/s`` into ``prev``'s output and ``s`` into the input columns of ``linears``, in place.

    ``prev`` is an ``nn.Linear`` (its output rows and bias are divided by
    ``s``) or a norm with a 1-D ``weight`` computing ``x̂·(norm_offset + weight)``
    (``norm_offset + weight`` is divided by ``s``). The composition is
    unchanged up to floating-point rounding. Arithmetic in float64.
    """
    s = check_tensor(s, "s", ndim=1)
    if not bool((s > 0).all()):
        raise InvalidArgumentError("s must be strictly positive")
    width = s.shape[0]
    for m in linears:
        if not isinstance(m, nn.Linear) or m.in_features != width:
            raise ShapeMismatchError(f"s has length {width} but a group linear is {m}")
    pw = getattr(prev, "weight", None)
    if not isinstance(pw, torch.Tensor):
        raise InvalidArgumentError(f"prev has no weight to fold the scale into ({type(prev).__name__})")
    out_width = pw.shape[0]
    if out_width != width:
        raise ShapeMismatchError(f"s has length {width} but prev produces {out_width} features")
    if not isinstance(prev, nn.Linear) and pw.ndim != 1:
        raise InvalidArgumentError(
            f"prev must be an nn.Linear or a norm with a 1-D weight, got {type(prev).__name__}"
        )
    with torch.no_grad():
        s64 = s.detach().to(device=pw.device, dtype=torch.float64)
        # (tensor, its new value, offset of its effective value): all computed, cast to the stored
        # dtype and checked before any is written, so extreme scales (1e-300) cannot leave an
        # infinite norm weight or zeroed q/k/v behind.
        updates: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        if isinstance(prev, nn.Linear):
            updates.append((prev.weight, prev.weight.to(torch.float64) / s64.unsqueeze(1), 0.0))
            if prev.bias is not None:
                updates.append((prev.bias, prev.bias.to(torch.float64) / s64, 0.0))
        else:
            updates.append((pw, (pw.to(torch.float64) + norm_offset) / s64 - norm_offset, norm_offset))
        for m in linears:
            updates.append((m.weight, m.weight.to(torch.float64) * s64.unsqueeze(0), 0.0))
        span = f"s in [{float(s64.min()):.3g}, {float(s64.max()):.3g}]"
        stored = []
        for target, value, offset in updates:
            cast = value.to(target.dtype)
            if not all_finite(cast):
                raise NonFiniteError(
                    f"AWQ scales {span} overflow {target.dtype} weights; nothing was changed"
                )
            lost = ((target.to(torch.float64) + offset) != 0) & ((cast.to(torch.float64) + offset) == 0)
            if bool(lost.any()):
                raise InvalidArgumentError(
                    f"AWQ scales {span} underflow {int(lost.sum())} nonzero {target.dtype} weights to 0; "
                    "nothing was changed"
                )
            stored.append((target, cast))
        for target, cast in stored:
            target.copy_(cast)


def _group_size(linear: nn.Linear, group_size: int) -> int:
    return min(group_size, linear.in_features)


def clip_search(
    w: torch.Tensor,
    x: torch.Tensor,
    w_bit: int,
    group_size: int,
    *,
    zero_point: bool = True,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    max_tokens: int = 512,
    row_chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ's clip search: per (output row, input group) the clip value minimizing the group's output error.

    For ``i = 0 .. ⌊max_shrink·n_grid⌋ − 1`` the group's weights are clipped to
    ``±absmax·(1 − i/n_grid)`` and rounded; the error is the mean over (at most
    ``max_tokens`` evenly spaced) tokens of ``(x_g·Q(clip(w_g)) − x_g·w_g)²``.
    ``i = 0`` is no clipping, so the chosen error never exceeds it.

    Returns ``(max_val [out, groups], best_err [out, groups], unclipped_err [out, groups])``.
    """
    out_f, in_f = w.shape
    n_groups = in_f // group_size
    dtype = compute_dtype(w)
    step = max(1, x.shape[0] // max_tokens)
    xs = x[::step][:max_tokens].to(dtype).reshape(-1, n_groups, group_size)
    max_vals, best_errs, base_errs = [], [], []
    for r0 in range(0, out_f, row_chunk):
        wg = w[r0 : r0 + row_chunk].to(dtype).reshape(-1, n_groups, group_size)
        ref = torch.einsum("tgk,ogk->tog", xs, wg)
        org_max = wg.abs().amax(dim=-1, keepdim=True)
        best_max = org_max.clone()
        best_err = torch.full(org_max.shape[:2], float("inf"), dtype=dtype, device=w.device)
        base_err = best_err
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            cur = torch.clamp(wg, -max_val, max_val)
            q = pseudo_quantize(cur.reshape(-1, in_f), w_bit, group_size, zero_point).reshape(cur.shape)
            err = (torch.einsum("tgk,ogk->tog", xs, q) - ref).pow(2).mean(dim=0)
            if i == 0:
                base_err = err
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better.unsqueeze(-1), max_val, best_max)
        max_vals.append(best_max.squeeze(-1))
        best_errs.append(best_err)
        base_errs.append(base_err)
    return torch.cat(max_vals), torch.cat(best_errs), torch.cat(base_errs)


def _apply_clip_(linear: nn.Linear, max_val: torch.Tensor, group_size: int) -> None:
    w = linear.weight
    g = w.reshape(w.shape[0], -1, group_size)
    m = max_val.to(w.dtype).unsqueeze(-1)
    with torch.no_grad():
        w.copy_(torch.clamp(g, -m, m).reshape(w.shape))


def _check_group_widths(layout: ModelLayout, group_size: int) -> None:
    for layer in range(layout.n_layers):
        for name, m in layout.linears(layer).items():
            lin = _as_linear(m, name)
            gs = _group_size(lin, group_size)
            if lin.in_features % gs:
                raise InvalidArgumentError(
                    f"group_size {group_size} does not divide the input width {lin.in_features} of "
                    f"layer {layer} {name}"
                )


#: Linears whose weights AWQ's clip search leaves alone: q/k errors are
#: amplified by the attention softmax, so the original method skips them.
_NO_CLIP = ("q_proj", "k_proj")

#: Tokens per MLP call while scoring candidates: bounds the ``[tokens, d_ff]`` intermediate.
_MLP_CHUNK = 4096


def _awq_effective_weight(w64: torch.Tensor, s64: torch.Tensor, w_bit: int, group_size: int) -> torch.Tensor:
    """``Q(w·s)/s`` for float64 ``w [out, in]``, ``s [in]``: bit-identical to ``functional.awq_apply_scales``.

    The same float64 operations in the same order as the functional core
    (asymmetric :func:`~refusal_core.functional.pseudo_quantize`, then ``/ s``),
    minus its argument checks: inside the candidate loop those finiteness scans
    cost as much as the rounding itself, and the inputs were checked once
    before the loop. In-place steps give the same values as the out-of-place
    ones (each is one correctly rounded IEEE operation per element).
    """
    ws = w64 * s64  # the only full-size allocation: every later step works in place
    g = ws.view(-1, group_size)
    max_int = 2**w_bit - 1
    hi, lo = g.amax(dim=1, keepdim=True), g.amin(dim=1, keepdim=True)  # (aminmax is slower on CPU)
    scale = (hi - lo).clamp(min=1e-5) / max_int
    zero = torch.round(-lo / scale).clamp(0, max_int)
    g.div_(scale).round_().add_(zero).clamp_(0, max_int).sub_(zero).mul_(scale)
    return ws.div_(s64)


def _awq_candidates(x_mean64: torch.Tensor, grid: int) -> list[torch.Tensor]:
    """The distinct candidate scales ``s [in]`` (float64) for ``a = 0, 1/grid, …``, in grid order.

    A candidate equal to an earlier one is dropped: its loss would be equal, and
    the earlier one wins ties. The first candidate (``a = 0``) is exactly all
    ones, which is also ``awq_scales``' result when no loss is finite; so when
    it is the only distinct candidate (``grid = 1``, or constant ``mean|x|``)
    it is the result whatever its loss, and scoring can be skipped.
    """
    out: list[torch.Tensor] = []
    for i in range(grid):
        s = _awq_candidate_scales(x_mean64, i / grid)
        if not any(torch.equal(s, prev) for prev in out):
            out.append(s)
    return out


def _awq_pick(candidates: Sequence[torch.Tensor], loss_of: Callable[[torch.Tensor], float]) -> torch.Tensor:
    """The first candidate of lowest loss (ones when no loss is finite, as in ``functional.awq_scales``)."""
    best_loss, best = math.inf, torch.ones_like(candidates[0])
    for s in candidates:
        loss = loss_of(s)
        if loss < best_loss:
            best_loss, best = loss, s
    return best


#: Unit roundoff of float64.
_U64 = 2.0**-53

#: Safety factor on the rounding-error bounds of :func:`_awq_gram_bounds` (worst-case bounds
#: already; the factor absorbs the products of several epsilons dropped in their derivation).
_BOUND_SLACK = 4.0


def _gamma(n: int) -> float:
    """Higham's ``γ_n = n·u/(1 − n·u)``: the relative error bound of any length-``n`` float64 sum."""
    nu = n * _U64
    return nu / (1.0 - nu) if nu < 0.5 else math.inf


def _awq_gram_bounds(
    gram_loss: float, d_sq: float, w_norm: float, x_sq: float, tokens: int, in_f: int, out_f: int
) -> tuple[float, float]:
    """Interval ``[lo, hi]`` certain to hold the value the direct float64 loss would compute.

    ``gram_loss = Σ (D G) ∘ D`` with ``G = xᵀx`` and ``D = w − Q(w·s)/s`` all
    in float64; ``d_sq = ‖D‖²``, ``w_norm = ‖w‖``, ``x_sq = ‖x‖²`` (Frobenius).
    Standard worst-case rounding analysis, with ``‖|x||D|ᵀ‖ ≤ ‖x‖‖D‖``:

    - the Gram form is within ``Bg = (3u + γ_T + γ_in + γ_{out·in})·‖x‖²‖D‖²``
      of the exact loss ``L = ‖x Dᵀ‖²``;
    - the direct form ``Σ (x wᵀ − x Wqᵀ)²`` is within
      ``Be = 2√L·Φ + Φ² + (3u + γ_{T·out})(√L + Φ)²`` of ``L``, where
      ``Φ = γ_in‖x‖(‖w‖ + ‖Wq‖) ≤ γ_in‖x‖(2‖w‖ + ‖D‖)`` bounds the error of
      the two matmuls.
    """
    bg = _BOUND_SLACK * (3 * _U64 + _gamma(tokens) + _gamma(in_f) + _gamma(out_f * in_f)) * x_sq * d_sq
    phi = _BOUND_SLACK * _gamma(in_f) * math.sqrt(x_sq) * (2 * w_norm + math.sqrt(d_sq))
    root = math.sqrt(max(gram_loss + bg, 0.0))
    be = 2 * root * phi + phi**2 + _BOUND_SLACK * (3 * _U64 + _gamma(tokens * out_f)) * (root + phi) ** 2
    return gram_loss - bg - be, gram_loss + bg + be


def _awq_linear_scales(
    w: torch.Tensor, x: torch.Tensor, w_bit: int, group_size: int, grid: int, *, method: str = "auto"
) -> torch.Tensor:
    """:func:`~refusal_core.functional.awq_scales` for checked inputs, the same result bit for bit, faster.

    ``w [out, in]`` (the group's linears stacked), ``x [tokens, in]``, both
    finite. ``awq_scales`` scores a candidate by the float64 loss
    ``Σ (x wᵀ − x Wqᵀ)²`` (``Wq = Q(w·s)/s``), ``tokens·in·out`` multiply-adds.

    ``method="direct"`` computes exactly that (``(y − ref)²`` in place equals
    ``(ref − y)²``: IEEE subtraction is sign-symmetric). ``method="gram"``
    instead scores ``Σ (D G) ∘ D`` with ``G = xᵀx`` formed once and
    ``D = w − Wq``: ``out·in²`` per candidate, far cheaper when there are more
    tokens than inputs. The two forms round differently, so each Gram loss comes
    with a certain interval for what the direct form would compute
    (:func:`_awq_gram_bounds`); only candidates whose interval reaches below
    every other's upper end can be ``awq_scales``' pick, and when more than one
    can (a near tie), those are re-scored by the direct form and the first
    lowest wins, as in ``awq_scales``. ``"auto"`` picks the cheaper method.
    """
    if method not in ("auto", "direct", "gram"):
        raise InvalidArgumentError(f"method must be 'auto', 'direct' or 'gram', got {method!r}")
    w64, x64 = w.detach().to(torch.float64), x.detach().to(torch.float64)
    candidates = _awq_candidates(x64.abs().mean(dim=0), grid)
    if len(candidates) == 1:
        return candidates[0].to(compute_dtype(w))  # see _awq_candidates: nothing to compare
    tokens, in_f = x64.shape
    out_f = w64.shape[0]
    buffers: dict[str, torch.Tensor] = {}

    def direct_loss(s: torch.Tensor) -> float:
        if "ref" not in buffers:
            buffers["ref"] = x64 @ w64.T
            buffers["y"] = torch.empty_like(buffers["ref"])  # reused: fresh large buffers cost page faults
        y = buffers["y"]
        torch.matmul(x64, _awq_effective_weight(w64, s, w_bit, group_size).T, out=y)
        return float(y.sub_(buffers["ref"]).square_().sum())

    n = len(candidates)
    if method == "auto":
        gram_cost = tokens * in_f * in_f + n * out_f * in_f * in_f
        method = "gram" if gram_cost < 0.8 * (n + 1) * tokens * in_f * out_f else "direct"
    if method == "direct":
        return _awq_pick(candidates, direct_loss).to(compute_dtype(w))

    gram = x64.T @ x64
    x_sq = float(x64.square().sum())
    w_norm = float(torch.linalg.vector_norm(w64))
    intervals = []
    for s in candidates:
        d = w64 - _awq_effective_weight(w64, s, w_bit, group_size)
        gram_loss = float((d @ gram).mul_(d).sum())
        intervals.append(
            _awq_gram_bounds(gram_loss, float(d.square_().sum()), w_norm, x_sq, tokens, in_f, out_f)
        )
    if not all(math.isfinite(lo) and math.isfinite(hi) for lo, hi in intervals):
        return _awq_pick(candidates, direct_loss).to(compute_dtype(w))
    ceiling = min(hi for _, hi in intervals)
    possible = [s for s, (lo, _) in zip(candidates, intervals) if lo <= ceiling]
    best = possible[0] if len(possible) == 1 else _awq_pick(possible, direct_loss)
    return best.to(compute_dtype(w))


def _awq_module_scales(
    linears: Sequence[nn.Linear],
    x: torch.Tensor,
    w_bit: int,
    group_size: int,
    grid: int,
    output_error: Callable[[], float],
) -> torch.Tensor:
    """Scales ``s [in]`` minimizing ``output_error()`` with ``linears`` set to ``Q(W·s)/s`` in turn.

    ``x [tokens, in]`` are the linears' shared inputs (for the candidates
    ``mean|x|^a``). ``output_error`` runs the module the linears feed and
    returns its squared output error against the original output; the module's
    other weights stay as they are. The candidates, the float64 rounding and the
    tie rule (first lowest wins) are those of ``functional.awq_scales``. The
    original weights are restored, also when an exception passes through.
    """
    candidates = _awq_candidates(x.detach().to(torch.float64).abs().mean(dim=0), grid)
    if len(candidates) == 1:
        return candidates[0].to(compute_dtype(linears[0].weight))  # see _awq_candidates
    originals = [m.weight.detach().clone() for m in linears]
    w64 = torch.cat(originals).to(torch.float64)
    rows = [m.out_features for m in linears]

    def loss_of(s: torch.Tensor) -> float:
        for m, part in zip(linears, _awq_effective_weight(w64, s, w_bit, group_size).split(rows)):
            m.weight.copy_(part)  # cast to the model dtype, as awq_apply_scales' result is
        return output_error()

    try:
        with torch.no_grad():
            best = _awq_pick(candidates, loss_of)
    finally:
        with torch.no_grad():
            for m, w0 in zip(linears, originals):
                m.weight.copy_(w0)
    return best.to(compute_dtype(originals[0]))


def _squared_error(out: torch.Tensor, ref64: torch.Tensor) -> float:
    d = out.to(torch.float64) - ref64
    return float(d.square_().sum())


def _replay_error(module: nn.Module, calls: Sequence[RecordedCall]) -> Callable[[], float]:
    """Squared error of ``module``'s output at the recorded calls' real tokens vs. the recorded outputs."""
    refs = [c.output[c.token_mask].to(torch.float64) for c in calls]

    def error() -> float:
        return sum(_squared_error(c.replay(module), ref) for c, ref in zip(calls, refs))

    return error


def _tokenwise_error(module: nn.Module, x: torch.Tensor) -> Callable[[], float]:
    """Squared error of a token-wise ``module`` (the MLP) on ``x [tokens, d]`` vs. its current output."""
    chunks = x.split(_MLP_CHUNK)
    with torch.no_grad():
        refs = [module(c).to(torch.float64) for c in chunks]

    def error() -> float:
        return sum(_squared_error(module(c), ref) for c, ref in zip(chunks, refs))

    return error


def awq_effective_(
    weights: Sequence[torch.Tensor],
    x: torch.Tensor,
    w_bit: int,
    group_size: int,
    grid: int,
    zero_point: bool,
) -> list[float]:
    """AWQ without a fold: each ``W`` (sharing input ``x [n, in]``) becomes ``Q(W·s)/s``, in place.

    ``s`` is :func:`~refusal_core.functional.awq_scales`' choice for the
    stacked ``W`` on ``x`` (bit for bit, the fast search of the dense path), or
    ones (plain round to nearest) when ``x`` holds no token. Used where the
    scale cannot be folded into a preceding op that only these weights read:
    the MLP input norm of an MoE block also feeds the router and every expert,
    each of which would want its own scale. Returns ``‖W_new − W‖/‖W‖`` per
    weight.
    """
    in_f = int(weights[0].shape[1])
    gs = min(group_size, in_f)
    with torch.no_grad():
        if x.shape[0] == 0:
            s64 = torch.ones(in_f, dtype=torch.float64, device=weights[0].device)
        else:
            w_cat = torch.cat([w.detach() for w in weights])
            s64 = _awq_linear_scales(w_cat, x, w_bit, gs, grid).to(torch.float64)
        errors = []
        for w in weights:
            old = w.detach().clone()
            w.copy_(pseudo_quantize(w.to(torch.float64) * s64, w_bit, gs, zero_point) / s64)
            errors.append(relative_error(w, old))
    return errors


def _awq_moe_mlp_(
    layout: ModelLayout,
    layer: int,
    lin: dict[str, nn.Linear],
    inputs: dict[str, torch.Tensor],
    expert_calls: Sequence[RecordedCall],
    config: AwqConfig,
    scale_only: bool,
) -> dict[str, float]:
    """AWQ of an MoE block's MLP weights, in place: every routed expert and any shared expert.

    Each expert's ``gate_up_proj[e]`` is searched and rounded on the tokens
    routed to it, its ``down_proj[e]`` on ``act(gate)·up`` of them; the shared
    expert's gate/up on every token, its down on its own input. Scales are
    kept in the weights (``Q(W·s)/s``, :func:`awq_effective_`),
    since the MLP input norm also feeds the router. The router is not touched.
    An expert no calibration token reaches is rounded to nearest (``s = 1``).
    With ``scale_only`` nothing changes (there is no fold to apply).
    """
    errors: dict[str, float] = {}
    names = {id(m): n for n, m in layout.model.named_modules()}
    args = (config.w_bit, config.group_size, config.grid, config.zero_point)
    if scale_only:
        return errors
    shared = [name for name in lin if name.startswith("shared_expert.")]
    for source in ("mlp_in", "shared_down_in"):
        group = [name for name in shared if LINEAR_INPUTS[name] == source]
        if group:
            errs = awq_effective_([lin[n].weight for n in group], inputs[source], *args)
            errors.update({names.get(id(lin[n]), n): e for n, e in zip(group, errs)})
    routed = routed_inputs(layout.experts(layer), expert_calls)
    for em in (em for em in expert_matrices(layout) if em.layer == layer):
        x = routed[em.expert].gate_up if em.name == "gate_up_proj" else routed[em.expert].down
        errors[em.full_name] = awq_effective_([em.weight], x, *args)[0]
    return errors


def quantize_awq_(
    model: nn.Module,
    calibration: Calibration,
    w_bit: int = 4,
    group_size: int = 128,
    grid: int = 20,
    *,
    objective: str = "module",
    clip: bool = False,
    zero_point: bool = True,
    scale_only: bool = False,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, float]:
    """AWQ fake quantization of every block linear, in place (see the module docstring).

    Per block, in order: capture the inputs of the four scale groups at the
    real calibration tokens (block unchanged, preceding blocks already
    quantized), search every group's scales on the original weights, fold them
    (:func:`apply_awq_scale_`), optionally search clip values
    (:func:`clip_search`, not for q/k), and round every linear with
    :func:`~refusal_core.functional.pseudo_quantize` (group size
    ``min(group_size, d_in)``).

    Every scale search tries the candidates of
    :func:`~refusal_core.functional.awq_scales` (``a = i/grid``) with the
    group's linears set to ``Q(W·s)/s``, and keeps the first of lowest squared
    error of ``objective``:

    - ``"module"`` (default; AWQ's own choice): the output of the module the
      group feeds, with the block's other weights as they are. For q/k/v that is
      the attention output, computed by the block's attention module on the
      recorded calls (masks, rotary embeddings); for gate/up the MLP output;
      for o_proj and down_proj their own output.
    - ``"linear"``: the group's own linear outputs, exactly
      :func:`~refusal_core.functional.awq_scales` (same scales bit for bit).

    The two coincide for o_proj and down_proj, whose search is always the
    float64 one of ``awq_scales``. The module objective runs the attention and
    the MLP in the model's dtype; the errors are summed in float64.

    ``scale_only`` applies the searched scales and skips clipping and rounding:
    the model computes the same function (up to float rounding). The scale
    search always uses the asymmetric quantizer of ``awq_scales``; only the
    final rounding follows ``zero_point``. ``grid = 1`` tries only ``a = 0``
    (``s = 1``): plain round-to-nearest.

    Returns the relative Frobenius rounding error ``‖Q(W') − W'‖/‖W'‖`` per
    module, ``W'`` the weight after scaling (0 for ``scale_only``). Everything
    is validated before the first weight changes.
    """
    if not isinstance(scale_only, bool):
        raise InvalidArgumentError(f"scale_only must be a bool, got {scale_only!r}")
    config = AwqConfig(
        w_bit=w_bit, group_size=group_size, grid=grid, clip=clip, zero_point=zero_point, objective=objective
    )
    return apply_awq_(
        model, config, calibration, scale_only=scale_only, batch_size=batch_size, progress=progress
    )


@transactional  # all or nothing: restored exactly if anything raises after a write
def apply_awq_(
    model: nn.Module,
    config: AwqConfig,
    calibration: Calibration,
    *,
    scale_only: bool = False,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, float]:
    """:func:`quantize_awq_` with its settings as one config (validated when it was built).

    What is checked here depends on the model: unfused linears that are plain
    floats, a group size dividing every input width, the calibration tokens.
    """
    if not isinstance(config, AwqConfig):
        raise InvalidArgumentError(f"config must be an AwqConfig, got {type(config).__name__}")
    w_bit, group_size, grid = config.w_bit, config.group_size, config.grid
    clip, zero_point, objective = config.clip, config.zero_point, config.objective
    layout = get_layout(model)
    _require_unfused(layout)
    linears = require_float_linears(layout, "AWQ quantization")
    _check_group_widths(layout, group_size)
    for em in expert_matrices(layout, "AWQ quantization"):
        width = int(em.weight.shape[1])
        if width % min(group_size, width):
            raise InvalidArgumentError(
                f"group_size {group_size} does not divide the input width {width} of {em.full_name}"
            )
    runner = SequentialBlocks.from_calibration(layout, calibration, batch_size=batch_size, progress=progress)
    full_names = {(bl.layer, bl.name): bl.full_name for bl in linears}
    offset = float(layout.spec.norm_offset)
    # Without a second candidate nothing is scored, so there is nothing to record.
    by_module = objective == "module" and grid > 1

    errors: dict[str, float] = {}
    for layer in runner.layers("AWQ"):
        lin = {name: _as_linear(m, name) for name, m in layout.linears(layer).items()}
        groups = awq_scale_groups(layout, layer)
        taps = {source: lin[name] for source, name in input_taps(lin).items()}
        # Every tapped input (o_proj's too, for its clip search even without a scale group).
        captured: dict[str, list[torch.Tensor]] = {source: [] for source in taps}

        def keep_input(src: str, x: torch.Tensor, captured: dict[str, list[torch.Tensor]] = captured) -> None:
            captured[src].append(x)

        attn = layout.attn(layer)
        fused = layout.experts(layer) if layout.is_moe(layer) else None
        record = {"attn": attn} if by_module else {}
        if fused is not None:
            record["experts"] = fused  # its calls carry each token's top-k choice
        calls = runner.collect(layer, taps, keep_input, record=record)
        expert_calls = calls.pop("experts", [])
        inputs = {src: torch.cat(xs) for src, xs in captured.items()}

        # All scales are searched on the unscaled block before any is applied (as AWQ does);
        # the folds of different groups touch disjoint rows/columns, so their order is free.
        scales = []
        for g in groups:
            gs = _group_size(g.linears[0], group_size)
            x = inputs[g.source]
            if by_module and g.source == "attn_in":
                error = _replay_error(attn, calls["attn"])
                scales.append(_awq_module_scales(g.linears, x, w_bit, gs, grid, error))
            elif by_module and g.source == "mlp_in":
                error = _tokenwise_error(layout.mlp(layer), x)
                scales.append(_awq_module_scales(g.linears, x, w_bit, gs, grid, error))
            else:
                w_cat = torch.cat([m.weight.detach() for m in g.linears], dim=0)
                scales.append(_awq_linear_scales(w_cat, x, w_bit, gs, grid))
        del calls
        for g, s in zip(groups, scales):
            apply_awq_scale_(g.prev, g.linears, s, norm_offset=offset)
            inputs[g.source] = (inputs[g.source].to(torch.float64) / s.to(torch.float64)).to(
                inputs[g.source].dtype
            )

        if fused is not None:
            errors.update(_awq_moe_mlp_(layout, layer, lin, inputs, expert_calls, config, scale_only))
            lin = {name: m for name, m in lin.items() if name in ATTENTION_LINEARS}
        if not scale_only:
            with torch.no_grad():
                for name, m in lin.items():
                    gs = _group_size(m, group_size)
                    scaled = m.weight.detach().clone()
                    if clip and name not in _NO_CLIP:
                        max_val, _, _ = clip_search(
                            scaled, inputs[LINEAR_INPUTS[name]], w_bit, gs, zero_point=zero_point
                        )
                        _apply_clip_(m, max_val, gs)
                    m.weight.copy_(pseudo_quantize(m.weight, w_bit, gs, zero_point))
                    errors[full_names[layer, name]] = relative_error(m.weight, scaled)
        else:
            errors.update({full_names[layer, name]: 0.0 for name in lin})
        if layer + 1 < layout.n_layers:
            runner.advance(layer)
    return errors
