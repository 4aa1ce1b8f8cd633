"""Model-level compression: one config per method, one entry point, a record of what was done.

:func:`compress_` applies a config to a model in place, dispatching on the
config's type through a registry, and returns a :class:`CompressionRecord`
(method, config, achieved sparsity overall and per module, per-module
rounding error, model identity before and after) that saves to and loads
from JSON. :data:`METHODS` maps the CLI names to default configs.

Each method is listed once, where its handler is registered
(:func:`~refusal_core.compression._registry.register_method`), with its kind,
calibration needs, optional extra, checkpoint storage and repair rule;
:func:`method_spec` reads that entry for a name (``"wanda@0.6"`` included) and
:func:`check_methods_available` refuses unknown or uninstalled methods up front.

============  ===================  ==============================================
name          config               operation
============  ===================  ==============================================
magnitude     MagnitudeConfig()    :func:`~refusal_core.compression.pruning.prune_magnitude_`
wanda         WandaConfig()        :func:`~refusal_core.compression.pruning.prune_wanda_`
wanda-2:4     WandaConfig(n_m=2:4) N:M Wanda
wanda-4:8     WandaConfig(n_m=4:8) N:M Wanda
llm-int8      Int8Config()         :func:`~refusal_core.compression.quantization.quantize_llm_int8_`
awq-w8        AwqConfig(w_bit=8)   :func:`~refusal_core.compression.quantization.quantize_awq_`
awq-w4        AwqConfig(w_bit=4)   AWQ, 4-bit, group 128
============  ===================  ==============================================

Example:
    >>> from refusal_core.testing.tiny import tiny_model
    >>> model = tiny_model("llama")
    >>> record = compress_(model, method_config("magnitude"))
    >>> record.sparsity
    0.5
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from refusal_core._finite import all_finite

# bnb and llmc register their methods on import (their libraries are imported only when one runs);
# like every handler they register through _registry, so importing them needs nothing from here.
from refusal_core.compression import bnb, llmc  # noqa: F401
from refusal_core.compression._common import block_linears, effective_weight
from refusal_core.compression._registry import (
    METHODS,
    REGISTRY,
    MethodSpec,
    check_methods_available,
    method_for,
    method_spec,
    method_specs,
    named_config,
    register_method,
    required_calibration,
    spec_of_recorded_method,
)
from refusal_core.compression._transaction import (
    check_model_finite,
    check_tensors_finite,
    model_transaction,
    scoped_edit,
)
from refusal_core.compression.calibration import Calibration, CalibrationBatch, prepare_calibration
from refusal_core.compression.config import (
    AwqConfig,
    CompressionConfig,
    Int8Config,
    MagnitudeConfig,
    WandaConfig,
    config_from_dict,
    config_to_dict,
)
from refusal_core.compression.pruning import model_sparsity, prune_magnitude_, prune_wanda_
from refusal_core.compression.quantization import (
    Int8LinearSim,
    apply_awq_,
    apply_awq_scale_,
    awq_scale_groups,
    quantize_awq_,
    quantize_llm_int8_,
)
from refusal_core.errors import ArtifactError, NonFiniteError
from refusal_core.model import get_layout, model_identity
from refusal_core.saving import load_artifact, save_artifact

__all__ = [
    "METHODS",
    "REGISTRY",
    "AwqConfig",
    "Calibration",
    "CalibrationBatch",
    "CompressionConfig",
    "CompressionRecord",
    "Int8Config",
    "Int8LinearSim",
    "MagnitudeConfig",
    "MethodSpec",
    "WandaConfig",
    "apply_awq_scale_",
    "awq_scale_groups",
    "check_methods_available",
    "check_model_finite",
    "compress_",
    "config_from_dict",
    "config_to_dict",
    "effective_weight",
    "method_config",
    "method_for",
    "method_spec",
    "method_specs",
    "model_sparsity_of",
    "model_transaction",
    "prepare_calibration",
    "prune_magnitude_",
    "prune_wanda_",
    "quantize_awq_",
    "quantize_llm_int8_",
    "register_method",
    "scoped_edit",
    "spec_of_recorded_method",
]


def method_config(name: str) -> CompressionConfig:
    """The config of a :data:`METHODS` name, optionally with ``@SPARSITY`` for pruning methods.

    ``"wanda@0.6"`` is Wanda at 60 % unstructured sparsity, ``"magnitude@0.3"``
    magnitude pruning at 30 %. An unknown name, a suffix on a method without a
    ``sparsity`` field, or a sparsity outside [0, 1) raises, listing the valid names.
    """
    return named_config(name)


# ----------------------------------------------------------------------------
# handlers: one per config type, each taking the config whole
# ----------------------------------------------------------------------------


@register_method(
    MagnitudeConfig,
    "magnitude",
    needs_calibration=False,
    kind="pruning",
    storage="dense",
    requantize="keep-zeros",
)
def _magnitude(
    model: nn.Module,
    config: MagnitudeConfig,
    calibration: Calibration | None,
    *,
    batch_size: int,
    progress: bool,
) -> dict[str, float]:
    prune_magnitude_(model, config.sparsity)
    return {}


@register_method(
    WandaConfig,
    "wanda",
    needs_calibration=True,
    kind="pruning",
    storage="dense",
    requantize="keep-zeros",
    names={
        "wanda": WandaConfig(),
        "wanda-2:4": WandaConfig(n_m=(2, 4)),
        "wanda-4:8": WandaConfig(n_m=(4, 8)),
    },
)
def _wanda(
    model: nn.Module, config: WandaConfig, calibration: Calibration | None, *, batch_size: int, progress: bool
) -> dict[str, float]:
    calibration = required_calibration(calibration, "wanda")
    prune_wanda_(model, calibration, config.sparsity, config.n_m, batch_size=batch_size, progress=progress)
    return {}


@register_method(
    Int8Config,
    "llm-int8",
    needs_calibration=False,
    kind="simulation",
    storage="dequantized-simulation",
    requantize="module-scheme",
    bits=8,
)
def _int8(
    model: nn.Module, config: Int8Config, calibration: Calibration | None, *, batch_size: int, progress: bool
) -> dict[str, float]:
    return quantize_llm_int8_(model, config.threshold)


@register_method(
    AwqConfig,
    "awq",
    needs_calibration=True,
    kind="simulation",
    storage="dequantized-simulation",
    requantize="weight-groups",
    # awq-w8 / awq-w4 are the paper's; w6, w5, w3 are the frontier's bit widths between and below them.
    names={f"awq-w{b}": AwqConfig(w_bit=b) for b in (8, 4, 6, 5, 3)},
    bits=lambda c: c.w_bit,
)
def _awq(
    model: nn.Module, config: AwqConfig, calibration: Calibration | None, *, batch_size: int, progress: bool
) -> dict[str, float]:
    calibration = required_calibration(calibration, "awq")
    return apply_awq_(model, config, calibration, batch_size=batch_size, progress=progress)


# ----------------------------------------------------------------------------
# record and entry point
# ----------------------------------------------------------------------------


@dataclass
class CompressionRecord:
    """What :func:`compress_` did to a model.

    ``sparsity`` is the fraction of exact zeros over all block linears and
    ``module_sparsity`` the same per module (full module name);
    ``quantization_error`` is the relative Frobenius rounding error
    ``‖W_q − W‖/‖W‖`` per module (empty for pruning; for AWQ ``W`` is the
    weight after scaling); ``calibration_tokens`` counts the real calibration
    tokens used (0 when none); ``details`` holds method-specific facts (for the
    GGUF methods: which tensors were quantized to which type and what llama.cpp
    does with the others). ``identity_before``/``identity_after`` are
    :func:`~refusal_core.model.model_identity` of the model.
    """

    method: str
    config: CompressionConfig
    sparsity: float
    module_sparsity: dict[str, float]
    quantization_error: dict[str, float]
    identity_before: dict[str, Any]
    identity_after: dict[str, Any] = field(default_factory=dict)
    calibration_tokens: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the config as :func:`config_to_dict`)."""
        return {
            "method": self.method,
            "config": config_to_dict(self.config),
            "sparsity": self.sparsity,
            "module_sparsity": dict(self.module_sparsity),
            "quantization_error": dict(self.quantization_error),
            "identity_before": dict(self.identity_before),
            "identity_after": dict(self.identity_after),
            "calibration_tokens": self.calibration_tokens,
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionRecord:
        """Inverse of :meth:`to_dict`; raises :class:`ArtifactError` on missing or malformed fields."""
        try:
            return cls(
                method=str(data["method"]),
                config=config_from_dict(data["config"]),
                sparsity=float(data["sparsity"]),
                module_sparsity={str(k): float(v) for k, v in data["module_sparsity"].items()},
                quantization_error={str(k): float(v) for k, v in data["quantization_error"].items()},
                identity_before=dict(data["identity_before"]),
                identity_after=dict(data.get("identity_after", {})),
                calibration_tokens=int(data.get("calibration_tokens", 0)),
                details=dict(data.get("details", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"compression record is malformed: {type(exc).__name__}: {exc}") from exc

    def save(self, base: str | Path) -> Path:
        """Write ``base.json`` atomically (identity = the model before compression); returns its path."""
        base = Path(base)
        save_artifact(
            base,
            meta={"compression_record": self.to_dict()},
            identity=self.identity_before,
            settings=config_to_dict(self.config),
        )
        return base.with_suffix(".json")

    @classmethod
    def load(cls, base: str | Path, *, expect_identity: Mapping[str, Any] | None = None) -> CompressionRecord:
        """Read a record written by :meth:`save`; ``expect_identity`` checks the base model."""
        meta = load_artifact(Path(base), expect_identity=expect_identity).meta
        if "compression_record" not in meta:
            raise ArtifactError(f"{base} does not hold a compression record")
        return cls.from_dict(meta["compression_record"])


def model_sparsity_of(model: nn.Module) -> tuple[float, dict[str, float]]:
    """Fraction of zeros over all block linears of ``model``, and per module (full name)."""
    return model_sparsity(get_layout(model))


def compress_(
    model: nn.Module,
    config: CompressionConfig,
    calibration: Calibration | None = None,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> CompressionRecord:
    """Apply ``config`` to ``model`` in place and return the :class:`CompressionRecord`.

    ``calibration`` (token ids, see
    :func:`~refusal_core.compression.calibration.prepare_calibration`) is
    required by Wanda and AWQ and ignored otherwise. An unregistered config
    type, a missing calibration set or any other bad input raises a
    :class:`~refusal_core.errors.RefusalCoreError` before the model changes.

    All or nothing: before the first write every floating parameter and buffer
    of the model (weights and biases of every linear, norms, embeddings) must be
    finite and the calibration token ids valid; the method then runs inside a
    :func:`~refusal_core.compression._transaction.model_transaction`, and its
    result must be finite (every parameter, buffer and effective block weight).
    If anything raises on the way (non-finite calibration activations of a
    later block, a non-finite result, a backend error), the model is restored
    to its exact previous state (parameters, buffers, replaced submodules,
    train/eval flags) before the error propagates. The snapshot costs one copy
    of the model's tensors while the method runs.
    """
    method = method_for(config)
    layout = get_layout(model)
    operation = f"compress_ ({method.label})"
    check_model_finite(model, operation)
    n_tokens = 0
    if method.needs_calibration:
        # Validate (and count) here too so a bad set fails before identity/sparsity work.
        batches = prepare_calibration(
            required_calibration(calibration, method.label),
            vocab_size=int(layout.embedding.weight.shape[0]),
            batch_size=batch_size,
        )
        n_tokens = sum(b.n_tokens for b in batches)
    before = model_identity(model)
    details = config.record_details(model)
    with model_transaction(model):
        errors = method.run(model, config, calibration, batch_size=batch_size, progress=progress)
        _check_result_finite(model, operation)
        overall, per_module = model_sparsity(get_layout(model))
        record = CompressionRecord(
            method=method.label,
            config=config,
            sparsity=overall,
            module_sparsity=per_module,
            quantization_error=errors,
            identity_before=before,
            identity_after=model_identity(model),
            calibration_tokens=n_tokens,
            details=details,
        )
    return record


def _check_result_finite(model: nn.Module, operation: str) -> None:
    """After the method ran, before it is committed: no NaN/inf in any tensor or effective block weight."""
    check_tensors_finite(model, operation, what=" after compression")
    for bl in block_linears(get_layout(model)):
        w = effective_weight(bl.module)
        if not all_finite(w):
            raise NonFiniteError(
                f"{operation}: the compressed weight of {bl.full_name} contains NaN or infinity"
            )


# llama.cpp's block types register after the paper's reference methods, so those stay first in METHODS.
from refusal_core.compression import gguf, kquants  # noqa: E402, F401
