"""Interventions on a model: directional ablation and activation addition (hooks), weight orthogonalization.

Hooks are returned as a :class:`HookHandle`, registered immediately, removable
with :meth:`HookHandle.remove` (idempotent) and usable as a context manager
that removes them on exit, also when an exception passes through. The hook
arithmetic runs in float64 and casts back to the activation dtype, so one hook
application gives exactly :func:`~refusal_core.functional.ablate` /
:func:`~refusal_core.functional.add_direction` of its input.

A direction is ``r [d]`` (one for the whole batch) or ``r [B, d]`` (row ``b``
of every batch uses ``r[b]``; the batch must then have exactly ``B`` rows), so
a candidate search can try ``B`` directions in one forward pass.

Example:
    >>> import torch
    >>> from refusal_core.testing.tiny import tiny_model
    >>> model = tiny_model("llama"); ids = torch.tensor([[1, 5, 300, 7, 6]])
    >>> r = torch.randn(32)
    >>> with ablation_hooks(model, r):
    ...     ablated = model(ids).logits
    >>> orthogonalize_model_(model, r)
    >>> torch.allclose(model(ids).logits, ablated, atol=1e-5)
    True
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from refusal_core._finite import all_finite
from refusal_core.compression import check_model_finite
from refusal_core.errors import (
    InvalidArgumentError,
    NonFiniteError,
    ShapeMismatchError,
    UnsupportedArchitectureError,
    UnsupportedModuleError,
    ZeroDirectionError,
)
from refusal_core.functional import (
    MIN_DIRECTION_NORM,
    check_tensor,
    orthogonalize_embedding,
    orthogonalize_weight,
    unit_direction,
)
from refusal_core.model import ModelLayout, get_layout
from refusal_core.model.layout import Writer

__all__ = [
    "HookHandle",
    "WriterMatrix",
    "ablation_hooks",
    "addition_hooks",
    "check_directions",
    "editable_writer_matrices",
    "orthogonalize_model_",
]


class HookHandle:
    """A set of registered hooks; ``remove()`` is idempotent; a context manager that removes on exit."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self._handles = list(handles)

    @property
    def active(self) -> bool:
        """Whether any hook is still registered."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook (safe to call more than once)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"HookHandle(n_hooks={len(self._handles)})"


def check_directions(r: object, width: int, name: str = "r", *, allow_batch: bool = True) -> torch.Tensor:
    """Validate ``r [d]`` (or ``[B, d]``): floating, finite, width ``d``, every row of nonzero norm.

    Returns ``r`` detached in float64. Raises before anything is registered.
    """
    r = check_tensor(r, name)
    if not r.is_floating_point():
        raise InvalidArgumentError(f"{name} must be a floating-point tensor, got {r.dtype}")
    if r.ndim not in ((1, 2) if allow_batch else (1,)):
        allowed = "[d] or [B, d]" if allow_batch else "[d]"
        raise ShapeMismatchError(f"{name} must have shape {allowed}, got {tuple(r.shape)}")
    if r.shape[-1] != width:
        raise ShapeMismatchError(f"{name} has width {r.shape[-1]} but the model's residual width is {width}")
    if r.ndim == 2 and r.shape[0] == 0:
        raise ShapeMismatchError(f"{name} holds no directions (shape {tuple(r.shape)})")
    r64 = r.detach().to(torch.float64)
    norms = torch.linalg.vector_norm(r64, dim=-1).reshape(-1)
    bad = (~(norms > MIN_DIRECTION_NORM)).nonzero().flatten().tolist()
    if bad:
        where = f" (rows {bad})" if r.ndim == 2 else ""
        raise ZeroDirectionError(
            f"{name} has norm <= {MIN_DIRECTION_NORM:g}{where}; a direction needs a norm"
        )
    return r64


def _per_row(v: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """Broadcast ``v [d]`` or ``v [B, d]`` against activations ``x [B, ..., d]``."""
    if v.ndim == 1:
        return v
    if x.ndim < 2 or x.shape[0] != v.shape[0]:
        raise ShapeMismatchError(
            f"{name} holds {v.shape[0]} per-row directions but the activations have shape {tuple(x.shape)}"
        )
    return v.reshape(v.shape[0], *([1] * (x.ndim - 2)), v.shape[1])


def _unit_rows(r64: torch.Tensor) -> torch.Tensor:
    """``r̂`` of ``r [d]`` or of each row of ``r [B, d]``, computed exactly as the functional core does."""
    if r64.ndim == 1:
        return unit_direction(r64)
    return torch.stack([unit_direction(row, name=f"r[{b}]") for b, row in enumerate(r64)])


def _ablate_tensor(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``x − û ûᵀ x`` in float64, cast back; ``u`` unit, ``[d]`` or broadcast ``[B, 1.., d]``.

    For ``u [d]`` this is the arithmetic of :func:`~refusal_core.functional.ablate`
    (bit-identical results).
    """
    x64 = x.to(torch.float64)
    if u.ndim == 1:
        return (x64 - (x64 @ u).unsqueeze(-1) * u).to(x.dtype)
    return (x64 - (x64 * u).sum(-1, keepdim=True) * u).to(x.dtype)


def _replace_output(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to a module output that is a tensor or a tuple whose first entry is one."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]), *output[1:])
    raise InvalidArgumentError(f"cannot intervene on a module output of type {type(output).__name__}")


def _replace_block_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], fn: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """New ``(args, kwargs)`` of a block call with ``hidden_states`` replaced (positional or keyword)."""
    if args and isinstance(args[0], torch.Tensor):
        return (fn(args[0]), *args[1:]), kwargs
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        return args, {**kwargs, "hidden_states": fn(hidden)}
    raise InvalidArgumentError("decoder block was called without a hidden_states tensor")


def _register_all(register: Callable[[], list[RemovableHandle]]) -> HookHandle:
    """Register hooks; if any registration fails, remove those already registered."""
    handles: list[RemovableHandle] = []
    try:
        handles.extend(register())
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return HookHandle(handles)


def ablation_hooks(model: nn.Module, r: torch.Tensor) -> HookHandle:
    """Directional ablation ``x − r̂ r̂ᵀ x`` at every block input and attention / MLP output.

    All positions (including tokens generated with a KV cache). ``r [d]`` or
    ``r [B, d]`` (per batch row). ``r`` is validated before any hook exists.
    The outputs hooked are :meth:`~refusal_core.model.ModelLayout.output_modules`:
    for a Mixture-of-Experts block the whole sparse MoE block, whose output is
    the routing-weighted sum of its experts' (and shared expert's) outputs, so
    ablating it equals ablating every expert's output (the projection is
    linear) with one hook instead of one per expert inside the fused loop;
    for Mamba the mixer.
    """
    layout = get_layout(model)
    u_cpu = _unit_rows(check_directions(r, layout.d_model))
    cache: dict[torch.device, torch.Tensor] = {}

    def unit_on(x: torch.Tensor) -> torch.Tensor:
        if x.device not in cache:
            cache[x.device] = u_cpu.to(x.device)
        return _per_row(cache[x.device], x, "r")

    def ablate(x: torch.Tensor) -> torch.Tensor:
        return _ablate_tensor(x, unit_on(x))

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _replace_block_input(args, kwargs, ablate)

    def out_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return _replace_output(output, ablate)

    def register() -> list[RemovableHandle]:
        hs: list[RemovableHandle] = []
        for layer, block in enumerate(layout.blocks):
            hs.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
            # The modules whose outputs are added to the stream (Gemma 2/3: the post-norms).
            hs.extend(m.register_forward_hook(out_hook) for m in layout.output_modules(layer))
        return hs

    return _register_all(register)


def addition_hooks(model: nn.Module, r: torch.Tensor, coeff: float, layer: int) -> HookHandle:
    """Activation addition ``x + coeff·r`` at block ``layer``'s input, all positions.

    ``r [d]`` or ``r [B, d]`` (per batch row), used as given (not normalized).
    Arguments are validated before any hook exists.
    """
    layout = get_layout(model)
    r64 = check_directions(r, layout.d_model)
    if isinstance(coeff, bool) or not isinstance(coeff, numbers.Real):
        raise InvalidArgumentError(f"coeff must be a real number, got {coeff!r}")
    if not math.isfinite(float(coeff)):
        raise NonFiniteError(f"coeff must be finite, got {coeff!r}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layout.n_layers:
        raise InvalidArgumentError(f"layer must be an int in [0, {layout.n_layers}), got {layer!r}")
    shift_cpu = float(coeff) * r64
    cache: dict[torch.device, torch.Tensor] = {}

    def add(x: torch.Tensor) -> torch.Tensor:
        if x.device not in cache:
            cache[x.device] = shift_cpu.to(x.device)
        return (x.to(torch.float64) + _per_row(cache[x.device], x, "r")).to(x.dtype)

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _replace_block_input(args, kwargs, add)

    block = layout.blocks[layer]
    return _register_all(lambda: [block.register_forward_pre_hook(pre_hook, with_kwargs=True)])


def check_editable_linear(module: nn.Module, name: str) -> nn.Linear:
    """``module`` if it is a plain floating-point ``nn.Linear`` with finite weights, else raise."""
    if not isinstance(module, nn.Linear) or not module.weight.is_floating_point():
        raise UnsupportedModuleError(
            f"{name} is a {type(module).__name__}; only floating-point nn.Linear weights can be edited "
            f"(dequantize or edit before quantizing)"
        )
    if not all_finite(module.weight):
        raise NonFiniteError(f"{name}.weight contains NaN or infinity")
    if module.bias is not None and not all_finite(module.bias):
        raise NonFiniteError(f"{name}.bias contains NaN or infinity")
    return module


def residual_writer_linears(layout: ModelLayout) -> list[tuple[str, nn.Linear]]:
    """``(name, module)`` of every ``o_proj`` / ``down_proj``, each checked to be editable.

    Dense families only (an MoE block's experts are no ``nn.Linear``: :func:`editable_writer_matrices`).
    """
    out = []
    for layer in range(layout.n_layers):
        for name, module in (
            (f"o_proj[{layer}]", layout.attn_out(layer)),
            (f"down_proj[{layer}]", layout.mlp_out(layer)),
        ):
            out.append((name, check_editable_linear(module, name)))
    return out


def check_editable_expert_weight(weight: object, name: str) -> torch.Tensor:
    """A fused experts parameter ``[E, d, in]`` if it is a finite floating-point tensor, else raise."""
    if not isinstance(weight, torch.Tensor) or weight.ndim != 3 or not weight.is_floating_point():
        kind = (
            type(weight).__name__
            if not isinstance(weight, torch.Tensor)
            else f"{weight.dtype} {weight.ndim}-D"
        )
        raise UnsupportedModuleError(
            f"{name} is {kind}; only a floating-point 3-D experts parameter [E, d, in] can be edited"
        )
    if not all_finite(weight):
        raise NonFiniteError(f"{name} contains NaN or infinity")
    return weight


@dataclass(frozen=True)
class WriterMatrix:
    """One matrix ``W [d, in]`` that writes into the residual stream, ready to edit in place.

    ``key``: the block-relative name (``"o_proj"``, ``"down_proj"``,
    ``"shared_expert.down_proj"``, ``"out_proj"``, or ``"experts.down_proj[e]"``
    for routed expert ``e``); ``label`` adds the layer (``"o_proj[3]"``,
    ``"experts.down_proj[3][e]"``). For a routed expert ``weight`` is a view of
    its slice of the fused ``[E, d, ff]`` parameter (writing it edits the model)
    and ``bias`` is None (the fused experts have none).
    """

    writer: Writer
    key: str
    label: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    expert: int | None = None


def editable_writer_matrices(layout: ModelLayout, layers: list[int] | None = None) -> list[WriterMatrix]:
    """Every residual-writer matrix of ``layers`` (default all), checked editable (float, finite) first.

    One entry per ``nn.Linear`` writer (``o_proj``, ``down_proj``, a shared
    expert's ``down_proj``, Mamba's ``out_proj``) and one per routed expert of
    a fused ``experts.down_proj [E, d, ff]``.
    """
    out: list[WriterMatrix] = []
    for layer in range(layout.n_layers) if layers is None else layers:
        for writer in layout.writers(layer):
            label = f"{writer.name}[{layer}]"
            if writer.stacked:
                stacked = check_editable_expert_weight(writer.weight, label)
                out.extend(
                    WriterMatrix(writer, f"{writer.name}[{e}]", f"{label}[{e}]", stacked[e], None, e)
                    for e in range(stacked.shape[0])
                )
            else:
                linear = check_editable_linear(writer.module, label)
                out.append(WriterMatrix(writer, writer.name, label, linear.weight, linear.bias))
    return out


def _untie_lm_head_(model: nn.Module, layout: ModelLayout) -> None:
    """Give ``lm_head`` its own copy of the tied embedding, so editing the embedding leaves it alone."""
    head = layout.lm_head
    head.weight = nn.Parameter(
        layout.embedding.weight.detach().clone(), requires_grad=layout.embedding.weight.requires_grad
    )
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    # transformers 5 keeps the tying map on the model; recompute it from the updated config.
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if hasattr(model, "all_tied_weights_keys") and callable(expand):
        model.all_tied_weights_keys = expand(all_submodels=True)


def orthogonalize_model_(model: nn.Module, r: torch.Tensor) -> None:
    """Weight orthogonalization in place: nothing writes along ``r̂`` into the residual stream.

    Every residual writer (:meth:`~refusal_core.model.ModelLayout.writers`:
    ``o_proj`` and ``down_proj``; every routed expert's down projection
    ``W_e ← (I − r̂ r̂ᵀ) W_e`` and any shared expert's in an MoE block; Mamba's
    ``out_proj``) becomes ``(I − r̂ r̂ᵀ) W`` (their
    biases, if any, lose their r̂ part too) and every embedding row
    ``E (I − r̂ r̂ᵀ)``. The unembedding is NOT changed: a ``lm_head`` tied to
    the embedding is first untied (it keeps the original weights and the config
    says ``tie_word_embeddings=False``), because orthogonalization is defined on
    what writes into the stream and the tied read-out must stay as it was for
    the edited model to equal :func:`ablation_hooks`. Gemma's embedding scale
    ``√d`` is a scalar, so it commutes with the projection.

    Every module is checked (plain floating nn.Linear, finite) and ``r``
    validated before the first edit. Post-norm families (Gemma 2/3) raise
    :class:`~refusal_core.errors.UnsupportedArchitectureError`: there the
    residual writers are norms, and no edit of ``o_proj``/``down_proj`` equals ablation.
    """
    layout = get_layout(model)
    if layout.spec.has_post_norms:
        raise UnsupportedArchitectureError(
            f"weight orthogonalization is not exact for {layout.spec.family}: its attention/MLP outputs pass "
            f"through post-norms before the residual add, so editing o_proj/down_proj cannot equal "
            f"directional ablation; use ablation_hooks"
        )
    u = unit_direction(check_directions(r, layout.d_model, allow_batch=False), layout.d_model)
    writers = editable_writer_matrices(layout)
    check_model_finite(model, "orthogonalize_model_")  # no NaN/inf anywhere (biases, norms) before any edit
    emb = layout.embedding
    if not emb.weight.is_floating_point():
        raise UnsupportedModuleError(f"embedding is {emb.weight.dtype}; it must be floating point to edit")
    if not all_finite(emb.weight):
        raise NonFiniteError("embedding.weight contains NaN or infinity")
    with torch.no_grad():
        if layout.embeddings_tied:
            _untie_lm_head_(model, layout)
        emb.weight.copy_(orthogonalize_embedding(emb.weight, u.to(emb.weight.device)))
        for wm in writers:
            ud = u.to(wm.weight.device)
            wm.weight.copy_(
                orthogonalize_weight(wm.weight, ud)
            )  # an expert's slice: a view into the fused one
            if wm.bias is not None:
                wm.bias.copy_(orthogonalize_weight(wm.bias.unsqueeze(1), ud).squeeze(1))
