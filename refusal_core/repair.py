"""One repair step for every route to a repaired model: AIRD that keeps the candidate's storage.

:func:`repair_` applies AIRD (:func:`~refusal_core.aird.apply_aird_`) to block
``layer``'s residual writers (``o_proj`` and ``down_proj``; in a Mixture-of-Experts
block every routed expert's down projection and a shared expert's; Mamba's
``out_proj``: :meth:`~refusal_core.model.ModelLayout.writers`) and brings the result back into the storage of
the compression method that made the model, as the method table says
(:func:`~refusal_core.compression.method_spec`, field ``requantize``):

=================  ==========================================================================
rule               what the repair does, and what is checked afterwards
=================  ==========================================================================
``keep-zeros``     pruned models: the update is restricted to the nonzero entries
                   (``preserve_sparsity``), so the zero pattern is unchanged exactly (checked).
                   ``dense=True`` is the paper's dense edit instead; the record then states the
                   sparsity lost per module (``repair["sparsity_lost"]``).
``module-scheme``  quantized modules (``Int8LinearSim``, bitsandbytes int8 / NF4): dequantized,
                   edited in float, re-quantized with the module's own scheme and settings
                   (:func:`~refusal_core.quantized_edit.apply_aird_quantized_`); checked: the
                   module is again of its scheme (int8 codes in [-127, 127] times a row scale
                   for the simulation, int8 / 4-bit storage for bitsandbytes).
``weight-groups``  float weights on a group-wise integer grid (AWQ, llmcompressor's AWQ):
                   edited in float, rounded onto the grid again with the method's ``w_bit``,
                   ``group_size`` and ``zero_point``; checked: at most ``2^w_bit`` distinct
                   values in every group (before the edit too: a model that is not on the grid
                   is not what its method says and is refused; so is AWQ on an MoE block, whose
                   experts keep their scales inside the weights).
``gguf-blocks``    llama.cpp block types (``gguf-q4_0`` ...): edited in float, then every row
                   quantized again in blocks of 32 with the ``gguf`` package's reference numerics
                   for the method's type (:func:`~refusal_core.compression.gguf.gguf_dequantized`);
                   checked: at most ``2^bits`` distinct values in every block of 32.
``float``          no compression method (``method=None``) and float writers: the plain edit.
=================  ==========================================================================

With ``method=None`` the writers' modules decide: quantized ones follow
``module-scheme``, float ones ``float`` (a pruned model must name its method to
keep its zeros). Everything that can be refused is refused before the model
changes, with one line saying why: an unknown method, ``dense`` on a method that
does not prune, a method whose storage cannot be written again
(``requantize="refuse"``), a model loaded through a transformers quantizer other
than bitsandbytes, writers whose type the method does not produce. The edit is
all or nothing: if anything raises after the first write (a non-finite result,
a failed check), block ``layer`` is restored exactly (parameters, buffers,
replaced modules) before the error propagates.

Example:
    >>> import torch
    >>> from refusal_core.aird import AirdConfig
    >>> from refusal_core.compression import compress_, method_config
    >>> from refusal_core.testing.tiny import tiny_model
    >>> model = tiny_model("llama")
    >>> _ = compress_(model, method_config("magnitude"))
    >>> rec = repair_(model, torch.randn(32), 1, AirdConfig(gain_attn=2.0), method="magnitude")
    >>> rec.repair["rule"], rec.repair["sparsity_lost"]
    ('keep-zeros', {'o_proj': 0.0, 'down_proj': 0.0})
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from refusal_core.aird import AirdConfig, AirdRecord, apply_aird_
from refusal_core.compression import (
    CompressionConfig,
    MethodSpec,
    config_from_dict,
    method_config,
    method_spec,
    model_transaction,
    spec_of_recorded_method,
)
from refusal_core.compression.gguf import GGUF_BITS, GGUF_BLOCK_SIZE, gguf_dequantized
from refusal_core.compression.quantization import Int8LinearSim
from refusal_core.compression.schemes import scheme_of
from refusal_core.errors import InvalidArgumentError, RefusalCoreError, UnsupportedModuleError
from refusal_core.functional import pseudo_quantize
from refusal_core.interventions import check_directions
from refusal_core.model import ModelLayout, get_layout, model_identity
from refusal_core.quantized_edit import apply_aird_quantized_, dequantize_module, edit_outcome

__all__ = ["RepairPlan", "group_levels", "plan_repair", "recorded_compression", "repair_"]

#: The block layout :func:`~refusal_core.quantized_edit.apply_aird_quantized_` re-quantizes.
_QUANTIZED_WRITERS = ("o_proj", "down_proj")
#: transformers quantizers whose modules refusal_core can re-quantize (and save again).
_HF_QUANTIZERS = ("bitsandbytes",)


@dataclass(frozen=True)
class RepairPlan:
    """How :func:`repair_` will keep a model's storage (all checked before anything changes).

    ``rule`` is one of the module docstring's rules (``dense-edit`` for a pruned
    model edited densely on request); ``storage`` the checkpoint format the
    repaired model keeps; ``grid`` ``(w_bit, group_size, zero_point)`` for
    ``weight-groups``; ``schemes`` the writers' storage schemes by record name.
    """

    method: str | None
    kind: str | None
    rule: str
    storage: str
    grid: tuple[int, int, bool] | None
    schemes: dict[str, str]
    qtype: str | None = None  # the llama.cpp block type of ``gguf-blocks``

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (``grid`` as a dict)."""
        grid = None
        if self.grid is not None:
            grid = {"w_bit": self.grid[0], "group_size": self.grid[1], "zero_point": self.grid[2]}
        return {
            "method": self.method,
            "kind": self.kind,
            "rule": self.rule,
            "storage": self.storage,
            "grid": grid,
            "schemes": dict(self.schemes),
            "qtype": self.qtype,
        }


def recorded_compression(record: Mapping[str, Any] | None) -> tuple[str | None, CompressionConfig | None]:
    """``(method, config)`` of the compression that made a checkpointed model, from its record.

    ``record`` is :func:`~refusal_core.saving.read_checkpoint_record`'s (None: no record).
    The method is the one :func:`repair_` keeps the storage of: a repaired model's
    ``"awq-w4+aird"`` is ``"awq-w4"``; None when no compression made the model (the base,
    ``"aird"`` on a float model, an unknown name). The config is the exact one the record
    keeps (``settings.compression.config``), None when it keeps none (the name's default).
    Every route that repairs a saved model (``refusal-core aird``, the audit) reads it here.
    """
    if record is None or spec_of_recorded_method(record.get("method")) is None:
        return None, None
    method = str(record["method"]).partition("+")[0]
    stored = ((record.get("settings") or {}).get("compression") or {}).get("config")
    return method, config_from_dict(stored) if isinstance(stored, Mapping) else None


def _schemes(layout: ModelLayout, layer: int) -> dict[str, str]:
    """The storage scheme of every residual writer of block ``layer`` (its name in the layout)."""
    out: dict[str, str] = {}
    for w in layout.writers(layer):
        if w.stacked:  # fused routed experts: a float [E, d, ff] parameter, or a quantized stand-in
            if not (isinstance(w.weight, torch.Tensor) and w.weight.is_floating_point()):
                raise UnsupportedModuleError(
                    f"{w.name}[{layer}] holds quantized per-expert modules; they cannot be re-quantized "
                    "after an edit here"
                )
            out[w.name] = "float"
            continue
        try:
            out[w.name] = scheme_of(w.module).name
        except UnsupportedModuleError as exc:
            raise UnsupportedModuleError(
                f"{w.name}[{layer}] cannot be re-quantized after an edit: {exc}"
            ) from None
    return out


def _matrices(layout: ModelLayout, layer: int) -> dict[str, torch.Tensor]:
    """Every writer matrix ``[d, in]`` of block ``layer`` by its AIRD record key, as it computes.

    Float writers give the live weight (a view per routed expert), quantized ones a dequantized copy.
    """
    out: dict[str, torch.Tensor] = {}
    for w in layout.writers(layer):
        if w.stacked:
            out.update(w.matrices())
        elif scheme_of(w.module).name == "float":
            weight = w.module.weight
            assert isinstance(weight, torch.Tensor)  # a float nn.Linear (its scheme matched)
            out[w.name] = weight
        else:
            out[w.name] = dequantize_module(w.module)
    return out


def _check_layer(layer: object, layout: ModelLayout) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layout.n_layers:
        raise InvalidArgumentError(f"layer must be an int in [0, {layout.n_layers}), got {layer!r}")
    return layer


def _refuse_foreign_quantizer(model: nn.Module) -> None:
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    qc: Any = getattr(quantizer, "quantization_config", None)
    qm = getattr(qc, "quant_method", None)
    name = str(getattr(qm, "value", qm))
    if name not in _HF_QUANTIZERS:
        raise UnsupportedModuleError(
            f"the model was loaded through transformers' {type(quantizer).__name__} ({name}); refusal_core "
            f"cannot re-quantize {name} weights after an edit, so a repair could not keep its storage"
        )


def group_levels(weight: torch.Tensor, group_size: int) -> int:
    """The most distinct values in any group of ``group_size`` consecutive inputs of a row of ``weight``."""
    if weight.shape[-1] % group_size:
        raise InvalidArgumentError(
            f"group_size {group_size} does not divide the input width {weight.shape[-1]}"
        )
    g = weight.detach().reshape(-1, group_size).sort(dim=1).values
    distinct = 1 + (g[:, 1:] != g[:, :-1]).sum(dim=1)
    return int(distinct.max()) if distinct.numel() else 0


def _grid_of(spec: MethodSpec, config: CompressionConfig) -> tuple[int, int, bool]:
    try:
        w_bit, group_size, zero_point = config.w_bit, config.group_size, config.zero_point  # type: ignore[attr-defined]
    except AttributeError:
        raise InvalidArgumentError(
            f"{spec.label}: its config {type(config).__name__} has no w_bit / group_size / zero_point "
            "for the weight-groups repair"
        ) from None
    return int(w_bit), int(group_size), bool(zero_point)


def plan_repair(
    model: nn.Module,
    layer: int,
    *,
    method: str | None = None,
    dense: bool = False,
    compression: CompressionConfig | None = None,
) -> RepairPlan:
    """How :func:`repair_` would keep ``model``'s storage at ``layer``; raises (one line) if it cannot.

    ``compression`` is the method's exact config when it differs from the
    name's default (e.g. an AWQ ``group_size`` of 64); it must be of the
    method's config type. Nothing is changed.
    """
    if not isinstance(dense, bool):
        raise InvalidArgumentError(f"dense must be a bool, got {dense!r}")
    layout = get_layout(model)
    layer = _check_layer(layer, layout)
    _refuse_foreign_quantizer(model)
    schemes = _schemes(layout, layer)
    if any(s != "float" for s in schemes.values()) and tuple(schemes) != _QUANTIZED_WRITERS:
        raise UnsupportedModuleError(
            f"block {layer}'s writers {list(schemes)} include quantized modules; re-quantizing an edit is "
            f"implemented for blocks whose writers are {list(_QUANTIZED_WRITERS)}"
        )
    quantized = sorted({s for s in schemes.values() if s != "float"})
    if method is None:
        if compression is not None:
            raise InvalidArgumentError("compression= needs the method it belongs to (method=...)")
        if dense:
            raise InvalidArgumentError("dense=True applies to a pruned model; name its method (method=...)")
        if quantized:
            if len(set(schemes.values())) != 1:
                raise UnsupportedModuleError(f"layer {layer}'s writers mix storage schemes {schemes}")
            storage = {"int8-sim": "dequantized-simulation", "bnb-int8": "bitsandbytes-int8"}.get(
                quantized[0], "bitsandbytes-nf4"
            )
            return RepairPlan(None, None, "module-scheme", storage, None, schemes)
        return RepairPlan(None, None, "float", "dense", None, schemes)

    spec = method_spec(method)  # unknown: one error listing the valid names
    if compression is None:
        compression = method_config(method) if "@" in method or method in spec.names else None
    if compression is not None and type(compression) is not spec.config_type:
        raise InvalidArgumentError(
            f"compression is a {type(compression).__name__}, but {method!r} is configured by "
            f"{spec.config_type.__name__}"
        )
    if dense and not spec.prunes:
        raise InvalidArgumentError(
            f"dense=True is the paper's dense edit of a pruned model; {method!r} is {spec.kind}, not pruning"
        )
    if spec.requantize == "refuse":
        raise UnsupportedModuleError(f"{method!r} cannot be repaired in its own storage: {spec.repair_note}")
    wants_modules = spec.requantize == "module-scheme"
    for name, scheme in schemes.items():
        if wants_modules and scheme == "float":
            raise UnsupportedModuleError(
                f"{method!r} stores quantized modules, but {name}[{layer}] is a float nn.Linear (loaded "
                f"without refusal_core, or not a {method!r} model?)"
            )
        if not wants_modules and scheme != "float":
            raise UnsupportedModuleError(
                f"{method!r} stores float weights, but {name}[{layer}] is a {scheme} module; "
                f"this is not a {method!r} model"
            )
    grid = None
    if spec.requantize == "weight-groups":
        if compression is None:
            raise InvalidArgumentError(
                f"{method!r} is a record label; pass compression= (its config): the grid to round onto"
            )
        w_bit, group_size, zero_point = _grid_of(spec, compression)
        if layout.is_moe(layer):
            raise UnsupportedModuleError(
                f"{method!r} on a Mixture-of-Experts block keeps each expert's scales inside its weights "
                f"(Q(W·s)/s) and stores no scales: an edit of block {layer} cannot be rounded onto its grid"
            )
        for name, weight in _matrices(layout, layer).items():
            gs = min(group_size, weight.shape[1])
            levels = group_levels(weight, gs)
            if levels > 2**w_bit:
                raise UnsupportedModuleError(
                    f"{name}[{layer}] has {levels} distinct values in a group of {gs}; a {w_bit}-bit "
                    f"{method!r} model has at most {2**w_bit}: the model is not on its method's grid "
                    "(edited densely already?)"
                )
        grid = (w_bit, group_size, zero_point)
    qtype = None
    if spec.requantize == "gguf-blocks":
        qtype = getattr(compression, "qtype", None)
        if qtype is None:
            raise InvalidArgumentError(
                f"{method!r} is a record label; pass compression= (its config): the block type to "
                "re-quantize to"
            )
    rule = "dense-edit" if (spec.prunes and dense) else spec.requantize
    return RepairPlan(method, spec.kind, rule, spec.storage, grid, schemes, qtype)


def _direction(direction: object) -> torch.Tensor:
    vector = getattr(direction, "vector", direction)  # a Direction, or the tensor itself
    if not isinstance(vector, torch.Tensor):
        raise InvalidArgumentError(
            f"direction must be a tensor [d] or a Direction, got {type(direction).__name__}"
        )
    return vector


def _zero_fraction(w: torch.Tensor) -> float:
    return float((w == 0).sum()) / w.numel()


def repair_(
    model: nn.Module,
    direction: Any,
    layer: int,
    config: AirdConfig,
    *,
    method: str | None = None,
    dense: bool = False,
    compression: CompressionConfig | None = None,
    record_identity: bool = True,
) -> AirdRecord:
    """AIRD on block ``layer``'s residual writers of ``model``, in place, keeping its storage.

    ``direction`` is the BASE model's direction (a tensor ``[d]`` or a
    :class:`~refusal_core.directions.Direction`), used as
    :func:`~refusal_core.aird.apply_aird_` uses it; ``config`` the AIRD
    strengths. ``method`` names the compression that made ``model`` (a
    :data:`~refusal_core.compression.METHODS` name, ``"wanda@0.6"`` included;
    None for a model named by its modules alone, see the module docstring);
    ``compression`` its exact config when not the name's default. ``dense``
    asks for the paper's dense edit of a pruned model (its zeros are lost, and
    the record says how many). ``record_identity`` False leaves the record's ``model`` empty
    instead of hashing the whole edited model (for a caller that scores the edit and undoes it, as
    the study's sweep does). Returns the AIRD record with ``repair`` filled
    (:class:`RepairPlan` fields, ``sparsity_lost`` per module, and per module
    the re-quantization outcome and ``levels`` / ``max_levels`` for the grid).
    """
    if not isinstance(config, AirdConfig):
        raise InvalidArgumentError(f"config must be an AirdConfig, got {type(config).__name__}")
    if dense and config.preserve_sparsity:
        raise InvalidArgumentError("dense=True contradicts config.preserve_sparsity=True; choose one")
    layout = get_layout(model)
    plan = plan_repair(model, layer, method=method, dense=dense, compression=compression)
    r = _direction(direction)
    r64 = check_directions(r, layout.d_model, allow_batch=False)
    config.alphas(float(torch.linalg.vector_norm(r64)))  # a gain this ‖r‖ cannot give raises first
    edit_config = dataclasses.replace(config, preserve_sparsity=True) if plan.rule == "keep-zeros" else config

    before = {name: w.detach().clone() for name, w in _matrices(layout, layer).items()}
    with model_transaction(layout.blocks[layer]):
        modules: dict[str, dict[str, Any]] = {}
        if plan.rule == "module-scheme":
            qrec = apply_aird_quantized_(
                model, r, layer, edit_config, requantize=True, record_identity=record_identity
            )
            if qrec.aird is None:  # pragma: no cover - apply_aird_quantized_ always records the edit
                raise RefusalCoreError("the quantized AIRD edit returned no record")
            record = qrec.aird
            by_full = dict(qrec.modules)
            names = {id(m): n for n, m in model.named_modules()}
            for w in layout.writers(layer):
                outcome = by_full.get(names.get(id(w.module), ""))
                modules[w.name] = {} if outcome is None else dataclasses.asdict(outcome)
        else:
            record = apply_aird_(model, r, layer, edit_config, record_identity=record_identity)
            if plan.rule == "weight-groups":
                modules = _regrid_(layout, layer, plan, before)
            elif plan.rule == "gguf-blocks":
                modules = _gguf_requantize_(layout, layer, plan, before)
        _check_storage(layout, layer, plan, before, modules)
        after = _matrices(layout, layer)
        # Zeros are storage only for float weights (a quantized code of 0 is a rounding outcome).
        lost = (
            {}
            if plan.rule in ("module-scheme", "weight-groups", "gguf-blocks")
            else {name: _zero_fraction(before[name]) - _zero_fraction(after[name]) for name in before}
        )
        record.repair = {
            **plan.to_dict(),
            "dense": dense,
            "sparsity_lost": lost,
            "modules": modules,
        }
        record.model = model_identity(model) if record_identity else {}
    return record


def _regrid_(
    layout: ModelLayout, layer: int, plan: RepairPlan, before: dict[str, torch.Tensor]
) -> dict[str, dict[str, Any]]:
    """Round both edited writers onto the method's group grid again; returns each outcome."""
    assert plan.grid is not None
    w_bit, group_size, zero_point = plan.grid
    out: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for name, weight in _matrices(layout, layer).items():  # planned: float writers (live views)
            edited = weight.detach().clone()
            gs = min(group_size, edited.shape[1])
            weight.copy_(
                pseudo_quantize(edited, w_bit, gs, zero_point)
            )  # an expert's view writes the fused one
            outcome = edit_outcome("float-grid", before[name], edited, weight, requantized=True)
            out[name] = {**dataclasses.asdict(outcome), "levels": group_levels(weight, gs)}
    return out


def _gguf_requantize_(
    layout: ModelLayout, layer: int, plan: RepairPlan, before: dict[str, torch.Tensor]
) -> dict[str, dict[str, Any]]:
    """Quantize both edited writers again to the plan's llama.cpp block type; returns each outcome."""
    assert plan.qtype is not None
    out: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for name, weight in _matrices(layout, layer).items():
            edited = weight.detach().clone()
            weight.copy_(gguf_dequantized(edited, plan.qtype))
            outcome = edit_outcome("gguf-blocks", before[name], edited, weight, requantized=True)
            out[name] = {**dataclasses.asdict(outcome), "levels": group_levels(weight, GGUF_BLOCK_SIZE)}
    return out


def _check_storage(
    layout: ModelLayout,
    layer: int,
    plan: RepairPlan,
    before: dict[str, torch.Tensor],
    modules: dict[str, dict[str, Any]],
) -> None:
    """Raise (the transaction then restores the block) if a writer left its method's storage."""
    if plan.rule == "module-scheme":
        for w in layout.writers(layer):
            where = f"repair of {w.name}[{layer}] ({plan.method or 'no method'}, {plan.rule})"
            scheme = scheme_of(w.module).name
            if scheme != plan.schemes[w.name]:
                raise RefusalCoreError(f"{where}: re-quantized as {scheme}, was {plan.schemes[w.name]}")
            if isinstance(w.module, Int8LinearSim):
                q = w.module.q
                # The simulation computes with q · scale (one scale per row): int8 codes are all it may hold.
                if q.dtype != torch.int8 or int(q.abs().max()) > 127 or w.module.scale.shape != (q.shape[0],):
                    raise RefusalCoreError(f"{where}: not int8 codes in [-127, 127] with one scale per row")
            modules.setdefault(w.name, {})["representable"] = True
        return
    for name, matrix in _matrices(layout, layer).items():
        where = f"repair of {name}[{layer}] ({plan.method or 'no method'}, {plan.rule})"
        if plan.rule == "keep-zeros":
            if not torch.equal(matrix == 0, before[name] == 0):
                raise RefusalCoreError(f"{where}: the zero pattern changed")
        elif plan.rule == "weight-groups":
            assert plan.grid is not None
            w_bit, group_size, _ = plan.grid
            gs = min(group_size, matrix.shape[1])
            levels = group_levels(matrix, gs)
            if levels > 2**w_bit:
                raise RefusalCoreError(f"{where}: {levels} distinct values in a group of {gs} (> 2^{w_bit})")
            modules[name]["max_levels"] = 2**w_bit
        elif plan.rule == "gguf-blocks":
            assert plan.qtype is not None
            bits = GGUF_BITS[plan.qtype]
            levels = group_levels(matrix, GGUF_BLOCK_SIZE)
            if levels > 2**bits:
                raise RefusalCoreError(f"{where}: {levels} distinct values in a block of 32 (> 2^{bits})")
            modules[name]["max_levels"] = 2**bits
