"""AIRD: repair a compressed model's refusal by amplifying a direction in one layer's output projections.

For the source layer ``l`` of the original model's refusal direction ``r``,
``W' = W + α r rᵀ W`` on block ``l``'s attention ``o_proj`` (``α_attn``) and MLP
``down_proj`` (``α_mlp``) (:func:`~refusal_core.functional.aird_update`). The
paper uses the raw difference in means ``r``; ``normalize=True`` uses ``r̂``
instead (then the gain along r̂ is ``1 + α``, else ``1 + α‖r‖²``). Which
direction and which layer are parameters, never fixed here. With
``preserve_sparsity`` the update is restricted to the nonzero entries of a
pruned ``W`` (zero pattern unchanged exactly), and the record reports how much
of the dense update it keeps (:func:`dense_update_retention`). Biases are not
changed: the paper's update acts on ``W`` only.

Example:
    >>> import torch
    >>> from refusal_core.testing.tiny import tiny_model
    >>> model = tiny_model("llama")
    >>> record = apply_aird_(model, torch.randn(32), layer=1)
    >>> sorted(record.modules)
    ['down_proj', 'o_proj']
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusal_core.artifacts import atomic_write_json
from refusal_core.errors import ArtifactError, InvalidArgumentError, NonFiniteError
from refusal_core.functional import aird_update, check_tensor, unit_direction
from refusal_core.interventions import check_directions, check_editable_linear
from refusal_core.models import get_layout, model_identity

__all__ = [
    "AirdConfig",
    "AirdModuleRecord",
    "AirdRecord",
    "UpdateRetention",
    "apply_aird_",
    "dense_update_retention",
]


@dataclass(frozen=True)
class AirdConfig:
    """AIRD settings: step sizes of the two projections, unit-norm variant, sparsity preservation.

    Defaults are the paper's (α_attn = 0.02, α_mlp = 0.01, raw ``r``, dense update).
    """

    alpha_attn: float = 0.02
    alpha_mlp: float = 0.01
    normalize: bool = False
    preserve_sparsity: bool = False

    def __post_init__(self) -> None:
        for name in ("alpha_attn", "alpha_mlp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InvalidArgumentError(f"{name} must be a real number, got {value!r}")
            if not math.isfinite(float(value)):
                raise NonFiniteError(f"{name} must be finite, got {value!r}")
        for name in ("normalize", "preserve_sparsity"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"{name} must be a bool, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class UpdateRetention:
    """How much of AIRD's dense update ``ΔW_d = α r rᵀ W`` its sparsity-preserving version ``ΔW_s`` keeps.

    - ``frobenius_ratio``: ``‖ΔW_s‖_F / ‖ΔW_d‖_F``.
    - ``gain_retention``: ``⟨r̂ᵀΔW_s, r̂ᵀΔW_d⟩ / ‖r̂ᵀΔW_d‖²``, the share of the
      dense update's effect along r̂ (for any input) that the sparse one keeps,
      in the least-squares sense; 1 means all of it.
    - ``effect_cosine``: cosine between ``r̂ᵀΔW_s`` and ``r̂ᵀΔW_d`` (vectors over
      the inputs): whether the sparse update reacts to the same inputs.
    - ``off_direction_fraction``: ``‖(I − r̂r̂ᵀ) ΔW_s‖_F / ‖ΔW_s‖_F``, the part of
      the sparse update that leaks outside span(r) (the dense one has none).

    All are NaN when the dense update is zero (``α = 0`` or ``rᵀW = 0``).
    """

    frobenius_ratio: float
    gain_retention: float
    effect_cosine: float
    off_direction_fraction: float


def dense_update_retention(
    w: torch.Tensor, r: torch.Tensor, alpha: float, *, normalize: bool = False
) -> UpdateRetention:
    """Compare the sparsity-preserving AIRD update of ``w [d, k]`` with the dense one (float64)."""
    w = check_tensor(w, "w", ndim=2)
    u = unit_direction(r, w.shape[0])
    w64 = w.detach().to(torch.float64)
    dense = aird_update(w64, r.to(torch.float64), alpha, normalize=normalize) - w64
    sparse = aird_update(w64, r.to(torch.float64), alpha, normalize=normalize, preserve_sparsity=True) - w64
    nd = float(torch.linalg.matrix_norm(dense))
    ns = float(torch.linalg.matrix_norm(sparse))
    eff_d, eff_s = u @ dense, u @ sparse
    ned, nes = float(torch.linalg.vector_norm(eff_d)), float(torch.linalg.vector_norm(eff_s))
    if nd == 0.0 or ned == 0.0:
        return UpdateRetention(math.nan, math.nan, math.nan, math.nan)
    cos = float(torch.dot(eff_s, eff_d)) / (nes * ned) if nes > 0 else 0.0
    off = float(torch.linalg.matrix_norm(sparse - torch.outer(u, eff_s))) / ns if ns > 0 else 0.0
    return UpdateRetention(
        frobenius_ratio=ns / nd,
        gain_retention=float(torch.dot(eff_s, eff_d)) / ned**2,
        effect_cosine=max(-1.0, min(1.0, cos)),
        off_direction_fraction=off,
    )


@dataclass
class AirdModuleRecord:
    """What AIRD did to one module: its α, the gain along r̂, the update norm and the zero fractions."""

    alpha: float
    gain: float
    update_norm: float
    sparsity_before: float
    sparsity_after: float
    retention: UpdateRetention | None = None


@dataclass
class AirdRecord:
    """The outcome of :func:`apply_aird_` (JSON-serializable via :meth:`save`).

    ``modules`` maps ``"o_proj"`` and ``"down_proj"`` to their records; ``gain``
    is ``1 + α‖r‖²`` (``1 + α`` when normalized) and ``update_norm`` the
    Frobenius norm ``‖W' − W‖_F`` actually applied (float64).
    """

    layer: int
    config: AirdConfig
    direction_norm: float
    modules: dict[str, AirdModuleRecord]
    model: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "AirdRecord", "version": 1, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        """Write the record as JSON to ``path`` (a file)."""
        out = Path(path)
        atomic_write_json(out, self.to_dict())
        return out

    @classmethod
    def load(cls, path: str | Path) -> AirdRecord:
        """Read a record written by :meth:`save`; :class:`ArtifactError` if it is not one."""
        try:
            doc = json.loads(Path(path).read_text())
            if doc.get("kind") != "AirdRecord" or doc.get("version") != 1:
                raise ArtifactError(f"{path} is not an AirdRecord (version 1)")
            modules = {}
            for name, m in doc["modules"].items():
                ret = m.pop("retention", None)
                modules[name] = AirdModuleRecord(**m, retention=UpdateRetention(**ret) if ret else None)
            return cls(
                layer=int(doc["layer"]),
                config=AirdConfig(**doc["config"]),
                direction_norm=float(doc["direction_norm"]),
                modules=modules,
                model=dict(doc.get("model", {})),
            )
        except ArtifactError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"cannot read AirdRecord from {path}: {exc}") from exc


def _zero_fraction(w: torch.Tensor) -> float:
    return float((w == 0).sum()) / w.numel()


_DEFAULT_CONFIG = AirdConfig()


def apply_aird_(
    model: nn.Module,
    r: torch.Tensor,
    layer: int,
    config: AirdConfig = _DEFAULT_CONFIG,
    *,
    direction_identity: dict[str, Any] | None = None,
    model_record: dict[str, Any] | None = None,
) -> AirdRecord:
    """Apply AIRD in place to block ``layer``'s ``o_proj`` and ``down_proj``; returns what was done.

    ``r [d]`` is used as given (raw difference in means) unless
    ``config.normalize``. Both modules are checked to be plain floating-point
    ``nn.Linear`` with finite weights, and ``r``/``layer``/``config`` validated,
    before either is edited; anything else raises (a quantized linear:
    :class:`~refusal_core.errors.UnsupportedModuleError` naming it).
    With ``direction_identity`` (the identity recorded with ``r``), a direction
    from another model raises :class:`~refusal_core.errors.ForeignDirectionError`
    unless ``model_record["base_identity"]`` is that model (see
    :func:`~refusal_core.directions.check_direction_origin`).
    """
    if direction_identity is not None:  # None: a raw tensor of unknown origin, used as given
        from refusal_core.directions import check_direction_origin

        check_direction_origin(direction_identity, model, model_record=model_record)
    if not isinstance(config, AirdConfig):
        raise InvalidArgumentError(f"config must be an AirdConfig, got {type(config).__name__}")
    layout = get_layout(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layout.n_layers:
        raise InvalidArgumentError(f"layer must be an int in [0, {layout.n_layers}), got {layer!r}")
    r64 = check_directions(r, layout.d_model, allow_batch=False)
    targets = {
        "o_proj": (
            check_editable_linear(layout.attn_out(layer), f"o_proj[{layer}]"),
            float(config.alpha_attn),
        ),
        "down_proj": (
            check_editable_linear(layout.mlp_out(layer), f"down_proj[{layer}]"),
            float(config.alpha_mlp),
        ),
    }
    r_norm = float(torch.linalg.vector_norm(r64))
    records: dict[str, AirdModuleRecord] = {}
    with torch.no_grad():
        for name, (linear, alpha) in targets.items():
            before = linear.weight.detach().to(torch.float64).clone()
            rd = r64.to(linear.weight.device)
            new = aird_update(
                linear.weight,
                rd,
                alpha,
                normalize=config.normalize,
                preserve_sparsity=config.preserve_sparsity,
            )
            linear.weight.copy_(new)
            after = linear.weight.detach().to(torch.float64)
            retention = (
                dense_update_retention(before, rd, alpha, normalize=config.normalize)
                if config.preserve_sparsity
                else None
            )
            records[name] = AirdModuleRecord(
                alpha=alpha,
                gain=1.0 + alpha * (1.0 if config.normalize else r_norm**2),
                update_norm=float(torch.linalg.matrix_norm(after - before)),
                sparsity_before=_zero_fraction(before),
                sparsity_after=_zero_fraction(after),
                retention=retention,
            )
    return AirdRecord(
        layer=layer, config=config, direction_norm=r_norm, modules=records, model=model_identity(model)
    )
