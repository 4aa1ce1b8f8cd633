"""AIRD and weight orthogonalization on quantized models: dequantize, edit, keep float or re-quantize.

:func:`~refusal_core.aird.apply_aird_` and
:func:`~refusal_core.interventions.orthogonalize_model_` refuse quantized
modules (an edit of a dequantized copy would be silently lost). The two
functions here make the round trip explicit, with a stated option
``requantize`` (keyword-only, no default):

1. every target module that is quantized is dequantized into a float
   ``nn.Linear`` stand-in (float32, or float64 for a float64 scheme);
2. the ordinary edit runs on the model with the stand-ins, so its arithmetic
   is exactly the float operation on the dequantized weights;
3. ``requantize=False``: the stand-in stays, cast to ``dtype`` (default: the
   embedding's dtype, the model's activation dtype), a 16/32-bit
   ``nn.Linear``. ``requantize=True``: the edited weight is quantized again
   with the module's own scheme and settings.

==========================  ================================  ==========================================
module                      dequantized by                    re-quantized as
==========================  ================================  ==========================================
``nn.Linear`` (float)       (edited in place, as usual)       (unchanged type)
``Int8LinearSim``           ``.dequantize()`` (q · scale)     ``int8_quantize`` of the edited weight
``bnb.nn.Linear8bitLt``     ``int8_vectorwise_dequant``       ``Linear8bitLt``, same threshold
``bnb.nn.Linear4bit``       ``dequantize_4bit``               ``Linear4bit``, same type/block/dtype
==========================  ================================  ==========================================

Re-quantizing rounds the edit onto the quantization grid; the record says how
much of it survived (:attr:`QuantizedModuleEdit.update_retained`). The
dequantized stand-ins of all targets exist at the same time (for
orthogonalization: every ``o_proj`` and ``down_proj``, in float32).

Example:
    >>> import torch
    >>> from refusal_core.compression import compress_, Int8Config
    >>> from refusal_core.testing.tiny import tiny_model
    >>> model = tiny_model("llama")
    >>> _ = compress_(model, Int8Config())
    >>> rec = apply_aird_quantized_(model, torch.randn(32), 1, requantize=True)
    >>> sorted(m.scheme for m in rec.modules.values())
    ['int8-sim', 'int8-sim']
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusal_core._finite import all_finite
from refusal_core.aird import AirdConfig, AirdRecord, apply_aird_
from refusal_core.compression.schemes import QUANTIZED_SCHEMES, scheme_named, scheme_of
from refusal_core.errors import (
    ArtifactError,
    InvalidArgumentError,
    NonFiniteError,
    UnsupportedModuleError,
)
from refusal_core.functional import compute_dtype
from refusal_core.interventions import check_directions, check_editable_linear, orthogonalize_model_
from refusal_core.model import ModelLayout, get_layout, model_identity, replace_module_
from refusal_core.saving import RECORD_KINDS, Record, load_record_as, write_record

__all__ = [
    "QUANTIZED_SCHEMES",
    "QuantizedEditRecord",
    "QuantizedModuleEdit",
    "apply_aird_quantized_",
    "dequantize_module",
    "edit_outcome",
    "orthogonalize_model_quantized_",
    "quantization_scheme",
]


def quantization_scheme(module: nn.Module) -> str:
    """``"float"``, ``"int8-sim"``, ``"bnb-int8"`` or ``"bnb-4bit"``: the name of ``module``'s
    :func:`~refusal_core.compression.schemes.scheme_of`; anything else raises.

    Raises :class:`~refusal_core.errors.UnsupportedModuleError` naming the type.
    """
    return scheme_of(module).name


def dequantize_module(module: nn.Module) -> torch.Tensor:
    """The float weight ``[out, in]`` a supported linear computes with, as a new tensor.

    ``Int8LinearSim``: ``q · scale`` (dtype of ``scale``); bitsandbytes: see
    :func:`~refusal_core.compression.bnb.dequantize_bnb`; float ``nn.Linear``:
    a copy of its weight (:meth:`~refusal_core.compression.schemes.Scheme.dequantize`).
    """
    return scheme_of(module).dequantize(module)


# ----------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedModuleEdit:
    """What happened to one quantized module.

    - ``scheme``: its :func:`quantization_scheme` before the edit.
    - ``requantized``: re-quantized with that scheme (else a float ``nn.Linear`` of dtype ``dtype``).
    - ``dtype``: the dtype of the module's float stand-in as kept (``requantized``: the edit's dtype).
    - ``update_retained``: ``⟨ΔW_kept, ΔW⟩ / ‖ΔW‖²`` with ``ΔW = W' − W`` the float edit of the
      dequantized weight ``W`` and ``ΔW_kept`` the change of the weight the module now computes
      with; 1 when nothing is lost, NaN when the edit is zero.
    - ``rounding_error``: ``‖W_kept − W'‖_F / ‖W'‖_F``, what re-quantizing (or the cast) cost.
    """

    scheme: str
    requantized: bool
    dtype: str
    update_retained: float
    rounding_error: float


@dataclass
class QuantizedEditRecord:
    """The outcome of :func:`apply_aird_quantized_` / :func:`orthogonalize_model_quantized_`.

    ``operation`` is ``"aird"`` or ``"orthogonalization"``; ``modules`` maps the
    full name of every quantized target to its :class:`QuantizedModuleEdit`;
    ``float_modules`` lists the targets that were plain float ``nn.Linear``
    (edited in place); ``aird`` is the :class:`~refusal_core.aird.AirdRecord`
    of the float edit (AIRD only); ``model`` the model identity afterwards.
    """

    operation: str
    requantize: bool
    modules: dict[str, QuantizedModuleEdit]
    float_modules: list[str]
    aird: AirdRecord | None = None
    model: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The saved JSON object (see :mod:`refusal_core.saving.records`; the model identity is ``model``)."""
        return {
            "kind": _RECORD_KIND,
            "version": RECORD_KINDS[_RECORD_KIND].version,
            "operation": self.operation,
            "requantize": self.requantize,
            "modules": {k: asdict(v) for k, v in self.modules.items()},
            "float_modules": list(self.float_modules),
            "aird": None if self.aird is None else self.aird.to_dict(),
            "model": dict(self.model),
        }

    def save(self, path: str | Path) -> Path:
        """Write the record as JSON to ``path`` (a file), atomically."""
        return write_record(path, Record.from_dict(self.to_dict(), _RECORD_KIND), strict=False)

    @classmethod
    def from_dict(cls, doc: object) -> QuantizedEditRecord:
        """The record :meth:`to_dict` wrote; :class:`ArtifactError` for anything else."""
        Record.from_dict(doc, _RECORD_KIND)  # kind and a readable version, else ArtifactError
        assert isinstance(doc, dict)  # checked by Record.from_dict
        try:
            aird = None if doc["aird"] is None else AirdRecord.from_dict(doc["aird"])
            return cls(
                operation=str(doc["operation"]),
                requantize=bool(doc["requantize"]),
                modules={k: QuantizedModuleEdit(**v) for k, v in doc["modules"].items()},
                float_modules=[str(n) for n in doc["float_modules"]],
                aird=aird,
                model=dict(doc.get("model", {})),
            )
        except ArtifactError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"malformed QuantizedEditRecord: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> QuantizedEditRecord:
        """Read a record written by :meth:`save`; :class:`ArtifactError` naming the file if it is not one."""
        return load_record_as(path, _RECORD_KIND, cls.from_dict)


_RECORD_KIND = "QuantizedEditRecord"


# ----------------------------------------------------------------------------
# the round trip
# ----------------------------------------------------------------------------


@dataclass
class _Target:
    """One module to edit: where it lives, what it is, and (if quantized) its dequantized weight."""

    parent: nn.Module
    attr: str
    full_name: str
    module: nn.Module
    scheme: str
    weight: torch.Tensor | None = None  # dequantized, float32/float64 (quantized targets only)
    stand_in: nn.Linear | None = None


def _bias_of(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias.detach() if isinstance(bias, torch.Tensor) else None


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be a bool (state it explicitly), got {value!r}")
    return value


def _check_dtype(dtype: object, layout: ModelLayout) -> torch.dtype:
    if dtype is None:
        return layout.embedding.weight.dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgumentError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    return dtype


def _targets(layout: ModelLayout, layers: list[int]) -> list[_Target]:
    """The ``o_proj`` / ``down_proj`` of ``layers``, each classified and (if quantized) dequantized."""
    names = {id(m): n for n, m in layout.model.named_modules()}
    out = []
    for layer in layers:
        for attr, parent in (("o_proj", layout.attn(layer)), ("down_proj", layout.mlp(layer))):
            module = getattr(parent, attr)
            label = f"{attr}[{layer}]"
            full = names.get(id(module), f"layers.{layer}.{attr}")
            try:
                scheme = quantization_scheme(module)
            except UnsupportedModuleError as exc:
                raise UnsupportedModuleError(f"{label} ({full}): {exc}") from None
            target = _Target(parent, attr, full, module, scheme)
            if scheme == "float":
                check_editable_linear(module, label)
            else:
                _dequantize_target(target, label)
            out.append(target)
    return out


def _dequantize_target(target: _Target, label: str) -> None:
    if _module_device(target.module).type == "meta":
        raise UnsupportedModuleError(f"{label} is offloaded (meta device); load it on a device to edit it")
    dq = dequantize_module(target.module)
    dq = dq.to(compute_dtype(dq))  # a float16/bfloat16 dequantization would round the edit
    if not all_finite(dq):
        raise NonFiniteError(f"{label}: dequantized weight contains NaN or infinity")
    bias = _bias_of(target.module)
    if bias is not None and not all_finite(bias):
        raise NonFiniteError(f"{label}.bias contains NaN or infinity")
    target.weight = dq


def _module_device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _stand_in(target: _Target, requires_grad: bool) -> nn.Linear:
    """A float ``nn.Linear`` holding the dequantized weight (and the bias) of a quantized target."""
    w = target.weight
    assert w is not None
    bias = _bias_of(target.module)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w.clone(), requires_grad=requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(device=w.device, dtype=w.dtype).clone(), requires_grad=requires_grad)
    return lin


def _requantized(target: _Target, edited: nn.Linear) -> nn.Module:
    """The edited weight quantized again exactly as ``target.module`` was."""
    return scheme_named(target.scheme).requantize(target.module, edited.weight.detach(), _bias_of(edited))


def _outcome(
    target: _Target, edited: torch.Tensor, kept: torch.Tensor, requantized: bool
) -> QuantizedModuleEdit:
    before = target.weight
    assert before is not None
    return edit_outcome(target.scheme, before, edited, kept, requantized=requantized)


def edit_outcome(
    scheme: str, before: torch.Tensor, edited: torch.Tensor, kept: torch.Tensor, *, requantized: bool
) -> QuantizedModuleEdit:
    """What re-quantizing (or casting) an edit of ``before`` into ``edited`` kept, as ``kept`` holds it.

    See :class:`QuantizedModuleEdit` for the measures (float64).
    """
    w0, w1, wk = (t.detach().to(torch.float64) for t in (before, edited, kept))
    delta, delta_kept = w1 - w0, wk - w0
    dd = float((delta * delta).sum())
    retained = float((delta_kept * delta).sum()) / dd if dd > 0 else math.nan
    n1 = float(torch.linalg.matrix_norm(w1))
    err = float(torch.linalg.matrix_norm(wk - w1)) / n1 if n1 > 0 else 0.0
    return QuantizedModuleEdit(
        scheme=scheme,
        requantized=requantized,
        dtype=str(kept.dtype).removeprefix("torch."),
        update_retained=retained,
        rounding_error=err,
    )


def _round_trip_(
    model: nn.Module,
    targets: list[_Target],
    edit: Callable[[], Any],
    *,
    requantize: bool,
    dtype: torch.dtype,
) -> tuple[Any, dict[str, QuantizedModuleEdit]]:
    """Swap stand-ins in for the quantized targets, run ``edit``, then keep float or re-quantize."""
    layout = get_layout(model)
    grad = bool(layout.embedding.weight.requires_grad)
    quantized = [t for t in targets if t.scheme != "float"]
    for t in quantized:
        t.stand_in = _stand_in(t, grad)
    swapped: list[_Target] = []
    try:
        for t in quantized:
            assert t.stand_in is not None
            replace_module_(t.parent, t.attr, t.stand_in)
            swapped.append(t)
        result = edit()
    except BaseException:
        for t in reversed(swapped):  # put the quantized modules back; the edit validated before editing
            setattr(t.parent, t.attr, t.module)
        raise
    outcomes: dict[str, QuantizedModuleEdit] = {}
    with torch.no_grad():
        for t in quantized:
            lin = t.stand_in
            assert lin is not None
            edited = lin.weight.detach()
            new: nn.Module
            if requantize:
                new = _requantized(t, lin)
                kept = dequantize_module(new)
            else:
                new = lin if lin.weight.dtype == dtype else lin.to(dtype)
                kept = new.weight.detach()
            outcomes[t.full_name] = _outcome(t, edited, kept, requantize)
            replace_module_(t.parent, t.attr, new)
    return result, outcomes


def _check_layer(layer: object, layout: ModelLayout) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layout.n_layers:
        raise InvalidArgumentError(f"layer must be an int in [0, {layout.n_layers}), got {layer!r}")
    return layer


_DEFAULT_AIRD = AirdConfig()


def apply_aird_quantized_(
    model: nn.Module,
    r: torch.Tensor,
    layer: int,
    config: AirdConfig = _DEFAULT_AIRD,
    *,
    requantize: bool,
    dtype: torch.dtype | None = None,
    record_identity: bool = True,
) -> QuantizedEditRecord:
    """AIRD on block ``layer``'s ``o_proj`` and ``down_proj``, quantized or not, in place.

    Quantized modules go through the round trip of the module docstring: the
    float edit is exactly :func:`~refusal_core.aird.apply_aird_` on the
    dequantized weights (``W' = W + α r rᵀ W``, each module's α the config's
    or resolved from its gain against ‖r‖); ``requantize`` (required)
    says whether the result is quantized again with the same scheme or kept
    as an ``nn.Linear`` of ``dtype`` (default: the embedding's dtype). Float
    ``nn.Linear`` targets are edited in place as by ``apply_aird_``.

    ``r``, ``layer``, ``config`` (its strengths resolved against ‖r‖),
    ``requantize``, ``dtype`` and both modules (supported type, finite
    weights) are checked before anything changes; an edit whose result is not
    finite raises :class:`~refusal_core.errors.NonFiniteError` with the
    quantized modules restored. ``record_identity`` False leaves the records'
    ``model`` empty (no hash of the whole model).
    """
    if not isinstance(config, AirdConfig):
        raise InvalidArgumentError(f"config must be an AirdConfig, got {type(config).__name__}")
    requantize = _check_bool(requantize, "requantize")
    layout = get_layout(model)
    layer = _check_layer(layer, layout)
    r64 = check_directions(r, layout.d_model, allow_batch=False)
    config.alphas(float(torch.linalg.vector_norm(r64)))  # a gain ‖r‖ cannot give raises here, first
    keep_dtype = _check_dtype(dtype, layout)
    targets = _targets(layout, [layer])

    aird, outcomes = _round_trip_(
        model,
        targets,
        lambda: apply_aird_(model, r, layer, config, record_identity=record_identity),
        requantize=requantize,
        dtype=keep_dtype,
    )
    return QuantizedEditRecord(
        operation="aird",
        requantize=requantize,
        modules=outcomes,
        float_modules=[t.full_name for t in targets if t.scheme == "float"],
        aird=aird,
        model=model_identity(model) if record_identity else {},
    )


def orthogonalize_model_quantized_(
    model: nn.Module,
    r: torch.Tensor,
    *,
    requantize: bool,
    dtype: torch.dtype | None = None,
) -> QuantizedEditRecord:
    """Weight orthogonalization of a model whose ``o_proj`` / ``down_proj`` may be quantized, in place.

    Every residual writer ``W ← (I − r̂ r̂ᵀ) W`` (bias too) and the embedding
    ``E ← E (I − r̂ r̂ᵀ)``, exactly as
    :func:`~refusal_core.interventions.orthogonalize_model_` (a tied
    ``lm_head`` is untied first), with the quantized writers going through the
    round trip of the module docstring. ``requantize`` is required. Note that
    re-quantizing leaves a small r̂ component in the rounded weights (reported
    by :attr:`QuantizedModuleEdit.rounding_error`).

    ``r``, ``requantize``, ``dtype``, the embedding and every writer are checked
    before anything changes.
    """
    requantize = _check_bool(requantize, "requantize")
    layout = get_layout(model)
    check_directions(r, layout.d_model, allow_batch=False)
    keep_dtype = _check_dtype(dtype, layout)
    emb = layout.embedding.weight
    if not emb.is_floating_point():
        raise UnsupportedModuleError(f"embedding is {emb.dtype}; it must be floating point to edit")
    if not all_finite(emb):
        raise NonFiniteError("embedding.weight contains NaN or infinity")
    targets = _targets(layout, list(range(layout.n_layers)))

    _, outcomes = _round_trip_(
        model,
        targets,
        lambda: orthogonalize_model_(model, r),
        requantize=requantize,
        dtype=keep_dtype,
    )
    return QuantizedEditRecord(
        operation="orthogonalization",
        requantize=requantize,
        modules=outcomes,
        float_modules=[t.full_name for t in targets if t.scheme == "float"],
        model=model_identity(model),
    )
