"""Quantizing a whole model in place: the reference LLM.int8 and AWQ simulations.

**LLM.int8.** :func:`quantize_llm_int8_` replaces every block linear by an
:class:`Int8LinearSim`, which stores the int8 weight and its per-row scale and
computes exactly :func:`~refusal_core.functional.llm_int8_linear` (bit for
bit). It deliberately is *not* an ``nn.Linear`` and has no float ``weight``:
weight edits such as AIRD or orthogonalization must refuse it rather than
silently edit a copy.

**AWQ.** :func:`quantize_awq_` is fake quantization: per block, in order, it
searches activation-aware scales with :func:`~refusal_core.functional.awq_scales`
for four groups of linears that share an input,

==========================  =========================================
scale folded (÷ s) into      linears multiplied by s (input columns)
==========================  =========================================
``input_layernorm``          ``q_proj``, ``k_proj``, ``v_proj``
``v_proj`` output rows       ``o_proj`` (only without grouped-query attention)
``post_attention_layernorm`` ``gate_proj``, ``up_proj``
``up_proj`` output rows      ``down_proj``
==========================  =========================================

then rounds every linear of the block with
:func:`~refusal_core.functional.pseudo_quantize` (group size
``min(group_size, d_in)``). The weights stay dequantized floats in plain
``nn.Linear`` modules, so later weight edits (AIRD) *are* possible on an AWQ
model; they act on the dequantized values and leave the quantization grid.
Each block is calibrated on the outputs of the already quantized blocks
before it. Before rounding the scaling is function-preserving: a Gemma norm
``x·(1 + w)`` becomes ``x·(1 + w')`` with ``1 + w' = (1 + w)/s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from refusal_core.compression._common import relative_error, require_float_linears
from refusal_core.compression.calibration import Calibration, SequentialBlocks, prepare_calibration
from refusal_core.compression.config import check_positive_int, check_threshold
from refusal_core.errors import InvalidArgumentError, ShapeMismatchError
from refusal_core.functional import awq_scales, check_tensor, int8_dequantize, int8_quantize, pseudo_quantize
from refusal_core.models import ModelLayout, get_layout

__all__ = [
    "AwqScaleGroup",
    "Int8LinearSim",
    "apply_awq_scale_",
    "awq_scale_groups",
    "quantize_awq_",
    "quantize_llm_int8_",
]

# ----------------------------------------------------------------------------
# LLM.int8
# ----------------------------------------------------------------------------

#: Input features per float32 partial product: 1024 · 127² < 2²⁴, so every
#: partial sum of int8·int8 products is an exactly representable integer.
_EXACT_FP32_CHUNK = 1024


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Same rule as the functional core: float64 stays float64, the rest runs in float32.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _exact_int_matmul(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """``qx @ qwᵀ`` for integer-valued ``qx [T, K]`` (|v| ≤ 127) and int8 ``qw [N, K]``, exact, float64.

    Float32 products over chunks of 1024 inputs are exact integers; summing
    them in float64 stays exact (far below 2⁵³), so the result equals the
    float64 matmul of the functional core bit for bit, at float32 speed.
    """
    acc: torch.Tensor | None = None
    for start in range(0, qx.shape[1], _EXACT_FP32_CHUNK):
        stop = start + _EXACT_FP32_CHUNK
        part = (qx[:, start:stop].to(torch.float32) @ qw[:, start:stop].to(torch.float32).T).to(torch.float64)
        acc = part if acc is None else acc + part
    if acc is None:
        return torch.zeros(qx.shape[0], qw.shape[0], dtype=torch.float64, device=qx.device)
    return acc


class Int8LinearSim(nn.Module):
    """An LLM.int8 linear layer simulated exactly: ``y = llm_int8_linear(x, W, threshold) + b``.

    Buffers: ``q`` int8 ``[out, in]``, ``scale`` ``[out]`` (row absmax / 127),
    ``bias`` ``[out]`` or None. The output has the dtype of ``x``. Not an
    ``nn.Linear`` and ``weight`` is None on purpose (see the module docstring);
    :meth:`dequantize` gives the float weight it computes with.

    >>> lin = nn.Linear(4, 2)
    >>> sim = Int8LinearSim.from_linear(lin)
    >>> sim(torch.ones(3, 4)).shape
    torch.Size([3, 2])
    """

    weight: None = None
    q: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, threshold: float = 6.0
    ) -> None:
        super().__init__()
        q = check_tensor(q, "q", ndim=2)
        scale = check_tensor(scale, "scale", ndim=1)
        if q.dtype != torch.int8:
            raise InvalidArgumentError(f"q must be int8, got {q.dtype}")
        if not scale.is_floating_point() or scale.shape[0] != q.shape[0]:
            raise ShapeMismatchError(
                f"scale must be float [{q.shape[0]}], got {scale.dtype} {tuple(scale.shape)}"
            )
        if bias is not None:
            bias = check_tensor(bias, "bias", ndim=1)
            if bias.shape[0] != q.shape[0]:
                raise ShapeMismatchError(f"bias has length {bias.shape[0]} but q has {q.shape[0]} rows")
        self.threshold = check_threshold(threshold)
        self.out_features, self.in_features = int(q.shape[0]), int(q.shape[1])
        self.register_buffer("q", q.detach().clone())
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> Int8LinearSim:
        """Quantize ``linear`` (per-row absmax int8, :func:`~refusal_core.functional.int8_quantize`)."""
        if not isinstance(linear, nn.Linear):
            raise InvalidArgumentError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        q, scale = int8_quantize(linear.weight.detach())
        return cls(q, scale, None if linear.bias is None else linear.bias.detach(), threshold)

    def dequantize(self) -> torch.Tensor:
        """The float weight ``q · scale`` ``[out, in]`` (dtype of ``scale``), a new tensor."""
        return int8_dequantize(self.q, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ShapeMismatchError(
                f"x has width {x.shape[-1]} but this layer has {self.in_features} inputs"
            )
        # The steps below mirror functional.llm_int8_linear operation for operation
        # (same dtypes, same order) so that the result is bit-identical to it.
        f64 = torch.float64
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, x.shape[-1]).to(_compute_dtype(x))
        if x2.shape[0]:
            outlier = (x2.abs() >= self.threshold).any(dim=0)
        else:
            outlier = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
        xr = torch.where(outlier, torch.zeros_like(x2), x2)
        sx = xr.abs().amax(dim=1) / 127.0 if x2.shape[0] else torch.zeros(0, dtype=x2.dtype, device=x.device)
        safe = torch.where(sx > 0, sx, torch.ones_like(sx))
        qx = torch.round(xr / safe.unsqueeze(1)).clamp(-127, 127)
        acc = _exact_int_matmul(qx, self.q)
        out = acc * sx.to(f64).unsqueeze(1) * self.scale.to(f64).unsqueeze(0)
        if bool(outlier.any()):
            wdq = self.q[:, outlier].to(self.scale.dtype) * self.scale.unsqueeze(1)
            out = out + x2[:, outlier].to(f64) @ wdq.to(f64).T
        y = out.to(x.dtype).reshape(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, threshold={self.threshold}"
        )


def _linear_parents(layout: ModelLayout, layer: int) -> dict[str, nn.Module]:
    """The module holding each named linear of a block as an attribute."""
    attn, mlp = layout.attn(layer), layout.mlp(layer)
    return {
        name: attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else mlp
        for name in layout.linears(layer)
    }


def quantize_llm_int8_(model: nn.Module, threshold: float = 6.0) -> dict[str, float]:
    """Replace every block linear by an :class:`Int8LinearSim`, in place.

    Returns the relative Frobenius rounding error ``‖W_int8 − W‖/‖W‖`` per
    module (full name). Embedding and ``lm_head`` stay float. Raises
    :class:`~refusal_core.errors.UnsupportedModuleError` (e.g. when already
    quantized) or :class:`~refusal_core.errors.InvalidArgumentError` before
    changing anything.
    """
    thr = check_threshold(threshold)
    layout = get_layout(model)
    linears = require_float_linears(layout, "LLM.int8 quantization")
    errors: dict[str, float] = {}
    with torch.no_grad():
        for bl in linears:
            assert isinstance(bl.module, nn.Linear)
            sim = Int8LinearSim.from_linear(bl.module, thr).to(bl.module.weight.device)
            errors[bl.full_name] = relative_error(sim.dequantize(), bl.module.weight)
            setattr(_linear_parents(layout, bl.layer)[bl.name], bl.name, sim)
    return errors


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


def awq_scale_groups(layout: ModelLayout, layer: int) -> list[AwqScaleGroup]:
    """AWQ's scale groups of block ``layer`` (see the table in the module docstring)."""
    lin = {name: _as_linear(m, name) for name, m in layout.linears(layer).items()}
    groups = [
        AwqScaleGroup("attn_in", layout.input_norm(layer), (lin["q_proj"], lin["k_proj"], lin["v_proj"]))
    ]
    # With grouped-query attention one v channel feeds several o_proj inputs: no per-channel fold exists.
    if lin["v_proj"].out_features == lin["o_proj"].in_features:
        groups.append(AwqScaleGroup("o_in", lin["v_proj"], (lin["o_proj"],)))
    groups.append(
        AwqScaleGroup("mlp_in", layout.post_attention_norm(layer), (lin["gate_proj"], lin["up_proj"]))
    )
    groups.append(AwqScaleGroup("down_in", lin["up_proj"], (lin["down_proj"],)))
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
        if isinstance(prev, nn.Linear):
            prev.weight.copy_(prev.weight.to(torch.float64) / s64.unsqueeze(1))
            if prev.bias is not None:
                prev.bias.copy_(prev.bias.to(torch.float64) / s64)
        else:
            pw.copy_((pw.to(torch.float64) + norm_offset) / s64 - norm_offset)
        for m in linears:
            m.weight.copy_(m.weight.to(torch.float64) * s64.unsqueeze(0))


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
    dtype = _compute_dtype(w)
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


def _check_awq_args(layout: ModelLayout, w_bit: int, group_size: int, grid: int) -> None:
    check_positive_int(w_bit, "w_bit", low=2, high=8)
    check_positive_int(group_size, "group_size")
    check_positive_int(grid, "grid")
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


def quantize_awq_(
    model: nn.Module,
    calibration: Calibration,
    w_bit: int = 4,
    group_size: int = 128,
    grid: int = 20,
    *,
    clip: bool = False,
    zero_point: bool = True,
    scale_only: bool = False,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, float]:
    """AWQ fake quantization of every block linear, in place (see the module docstring).

    Per block, in order: capture the inputs of the four scale groups at the
    real calibration tokens (block unchanged, preceding blocks already
    quantized), search every group's scales on the original weights with
    :func:`~refusal_core.functional.awq_scales` (group size ``min(group_size,
    d_in)``), fold them (:func:`apply_awq_scale_`), optionally search clip
    values (:func:`clip_search`, not for q/k), and round every linear with
    :func:`~refusal_core.functional.pseudo_quantize`.

    ``scale_only`` applies the searched scales and skips clipping and rounding:
    the model computes the same function (up to float rounding). The scale
    search always uses the asymmetric quantizer of ``awq_scales``; only the
    final rounding follows ``zero_point``.

    Returns the relative Frobenius rounding error ``‖Q(W') − W'‖/‖W'‖`` per
    module, ``W'`` the weight after scaling (0 for ``scale_only``). Everything
    is validated before the first weight changes.
    """
    layout = get_layout(model)
    linears = require_float_linears(layout, "AWQ quantization")
    _check_awq_args(layout, w_bit, group_size, grid)
    for name, value in (("clip", clip), ("zero_point", zero_point), ("scale_only", scale_only)):
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"{name} must be a bool, got {value!r}")
    batches = prepare_calibration(
        calibration,
        vocab_size=int(layout.embedding.weight.shape[0]),
        batch_size=batch_size,
        device=layout.embedding.weight.device,
    )
    runner = SequentialBlocks(layout, batches, progress=progress)
    full_names = {(bl.layer, bl.name): bl.full_name for bl in linears}
    offset = float(layout.spec.norm_offset)

    errors: dict[str, float] = {}
    for layer in runner.layers("AWQ"):
        lin = {name: _as_linear(m, name) for name, m in layout.linears(layer).items()}
        groups = awq_scale_groups(layout, layer)
        captured: dict[str, list[torch.Tensor]] = {g.source: [] for g in groups}
        captured.setdefault("o_in", [])  # o_proj's input, for its clip search even without a scale group
        taps = {
            "attn_in": lin["q_proj"],
            "o_in": lin["o_proj"],
            "mlp_in": lin["gate_proj"],
            "down_in": lin["down_proj"],
        }

        def record(src: str, x: torch.Tensor, captured: dict[str, list[torch.Tensor]] = captured) -> None:
            captured[src].append(x)

        runner.collect(layer, taps, record)
        inputs = {src: torch.cat(xs) for src, xs in captured.items()}

        # All scales are searched on the unscaled block before any is applied (as AWQ does);
        # the folds of different groups touch disjoint rows/columns, so their order is free.
        scales = []
        for g in groups:
            w_cat = torch.cat([m.weight.detach() for m in g.linears], dim=0)
            scales.append(
                awq_scales(w_cat, inputs[g.source], w_bit, _group_size(g.linears[0], group_size), grid)
            )
        for g, s in zip(groups, scales):
            apply_awq_scale_(g.prev, g.linears, s, norm_offset=offset)
            inputs[g.source] = (inputs[g.source].to(torch.float64) / s.to(torch.float64)).to(
                inputs[g.source].dtype
            )

        if not scale_only:
            sources = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
                       "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}  # fmt: skip
            with torch.no_grad():
                for name, m in lin.items():
                    gs = _group_size(m, group_size)
                    scaled = m.weight.detach().clone()
                    if clip and name not in _NO_CLIP:
                        max_val, _, _ = clip_search(
                            scaled, inputs[sources[name]], w_bit, gs, zero_point=zero_point
                        )
                        _apply_clip_(m, max_val, gs)
                    m.weight.copy_(pseudo_quantize(m.weight, w_bit, gs, zero_point))
                    errors[full_names[layer, name]] = relative_error(m.weight, scaled)
        else:
            errors.update({full_names[layer, name]: 0.0 for name in lin})
        if layer + 1 < layout.n_layers:
            runner.advance(layer)
    return errors
