"""AIRD: repair a compressed model's refusal by amplifying a direction in one layer's output projections.

For the source layer ``l`` of the original model's refusal direction ``r``,
``W' = W + α r rᵀ W`` on block ``l``'s attention ``o_proj`` (``α_attn``) and MLP
``down_proj`` (``α_mlp``) (:func:`~refusal_core.functional.aird_update`). The
paper uses the raw difference in means ``r``; ``normalize=True`` uses ``r̂``
instead (then the gain along r̂ is ``1 + α``, else ``1 + α‖r‖²``). Which
direction and which layer are parameters, never fixed here.

The strength of each module has two spellings (:class:`AirdConfig`): the
paper's ``α``, or the scale-free gain ``g = 1 + α‖r‖²`` along r̂ (``1 + α``
when normalized). The paper's α is tied to the norm of Llama's directions and
is tiny on a model whose ‖r‖ is small; a gain means the same on every model.
One spelling fixes the other once ‖r‖ is known (:func:`alpha_from_gain`,
:func:`gain_from_alpha`, :meth:`AirdConfig.alphas`); the record keeps both,
the given one exactly. ``g = 0`` (``α‖r‖² = −1``) is weight orthogonalization
of the module, ``g = 1`` the identity. With
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
    >>> alpha_from_gain(1.5, direction_norm=2.0)  # ‖r‖ = 2: α = (g − 1) / ‖r‖²
    0.125
    >>> rec = apply_aird_(model, torch.randn(32), layer=0, config=AirdConfig(gain_attn=2.0, gain_mlp=1.5))
    >>> (rec.modules["o_proj"].gain, rec.modules["down_proj"].gain)
    (2.0, 1.5)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusal_core._finite import all_finite
from refusal_core.compression import check_model_finite
from refusal_core.directions import check_direction_origin
from refusal_core.errors import ArtifactError, InvalidArgumentError, NonFiniteError, ZeroDirectionError
from refusal_core.functional import aird_update, check_tensor, unit_direction
from refusal_core.interventions import check_directions, editable_writer_matrices
from refusal_core.model import get_layout, model_identity
from refusal_core.saving import RECORD_KINDS, Record, load_record_as, write_record

__all__ = [
    "AirdConfig",
    "AirdModuleRecord",
    "AirdRecord",
    "UpdateRetention",
    "alpha_from_gain",
    "apply_aird_",
    "dense_update_retention",
    "gain_from_alpha",
]


def _real(value: object, name: str) -> float:
    """``value`` as a finite float; bools, strings, None and tensors are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise NonFiniteError(f"{name} must be finite, got {value!r}")
    return out


def _direction_norm(value: object) -> float:
    norm = _real(value, "direction_norm")
    if norm < 0.0:
        raise InvalidArgumentError(f"direction_norm must be >= 0, got {value!r}")
    return norm


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be a bool, got {value!r}")
    return value


def gain_from_alpha(alpha: float, direction_norm: float, normalize: bool = False) -> float:
    """The gain along r̂ of AIRD with step ``alpha``: ``1 + α‖r‖²`` (``1 + α`` when ``normalize``).

    A zero-norm direction with ``normalize`` has no r̂, so only ``α = 0`` is
    accepted for it (:class:`~refusal_core.errors.ZeroDirectionError`
    otherwise); without ``normalize`` its update ``α r rᵀ W`` is zero (gain 1).

    >>> gain_from_alpha(0.125, 2.0)
    1.5
    >>> gain_from_alpha(0.5, 2.0, normalize=True)
    1.5
    """
    a = _real(alpha, "alpha")
    norm = _direction_norm(direction_norm)
    normalize = _flag(normalize, "normalize")
    if normalize and norm == 0.0 and a != 0.0:
        raise ZeroDirectionError(f"a zero-norm direction has no unit vector; alpha {a!r} needs one")
    gain = 1.0 + a * (1.0 if normalize else norm**2)
    if not math.isfinite(gain):
        raise NonFiniteError(f"gain 1 + alpha·‖r‖² overflows for alpha={a!r}, direction_norm={norm!r}")
    return gain


def alpha_from_gain(gain: float, direction_norm: float, normalize: bool = False) -> float:
    """The step ``α`` that gives ``gain`` along r̂: ``(g − 1) / ‖r‖²`` (``g − 1`` when ``normalize``).

    A zero-norm direction cannot carry a gain other than 1
    (:class:`~refusal_core.errors.ZeroDirectionError`); with gain 1 it gives ``α = 0``.

    >>> alpha_from_gain(1.5, 2.0)
    0.125
    >>> alpha_from_gain(0.0, 2.0)  # gain 0: orthogonalization, α‖r‖² = −1
    -0.25
    """
    g = _real(gain, "gain")
    norm = _direction_norm(direction_norm)
    normalize = _flag(normalize, "normalize")
    scale = 1.0 if normalize else norm**2
    if norm == 0.0 or scale == 0.0:
        if g == 1.0:
            return 0.0
        raise ZeroDirectionError(
            f"a direction of norm {norm!r} cannot give gain {g!r} (only 1: its update is zero)"
        )
    alpha = (g - 1.0) / scale
    if not math.isfinite(alpha):
        raise NonFiniteError(f"alpha (g − 1) / ‖r‖² overflows for gain={g!r}, direction_norm={norm!r}")
    return alpha


#: The paper's step sizes, used for a module whose strength is given in neither spelling.
PAPER_ALPHA_ATTN = 0.02
PAPER_ALPHA_MLP = 0.01


@dataclass(frozen=True)
class AirdConfig:
    """AIRD settings: the strength of each projection, unit-norm variant, sparsity preservation.

    Each module's strength is given EITHER as the paper's step (``alpha_attn``
    for ``o_proj``, ``alpha_mlp`` for ``down_proj``) OR as the gain along r̂
    (``gain_attn`` / ``gain_mlp``, ``g = 1 + α‖r‖²``, or ``1 + α`` with
    ``normalize``); both for one module is an
    :class:`~refusal_core.errors.InvalidArgumentError`. A module given neither
    gets the paper's α (0.02 attention, 0.01 MLP), so ``AirdConfig()`` is the
    paper's recipe and reads ``alpha_attn == 0.02``. The field of the spelling
    not given stays ``None``: a gain is resolved to α only against a
    direction's norm (:meth:`alphas`). To turn a config given in α into one
    given in gains, clear the α: ``replace(cfg, alpha_attn=None, gain_attn=2.0)``.

    >>> AirdConfig(gain_attn=2.0).alphas(direction_norm=2.0)
    (0.25, 0.01)
    """

    alpha_attn: float | None = None
    alpha_mlp: float | None = None
    normalize: bool = False
    preserve_sparsity: bool = False
    gain_attn: float | None = None
    gain_mlp: float | None = None

    def __post_init__(self) -> None:
        for module, paper in (("attn", PAPER_ALPHA_ATTN), ("mlp", PAPER_ALPHA_MLP)):
            a_name, g_name = f"alpha_{module}", f"gain_{module}"
            alpha, gain = getattr(self, a_name), getattr(self, g_name)
            if alpha is not None and gain is not None:
                raise InvalidArgumentError(
                    f"give either {a_name} or {g_name}, not both (got {a_name}={alpha!r}, "
                    f"{g_name}={gain!r}); to switch spelling, set the other to None"
                )
            if gain is not None:
                object.__setattr__(self, g_name, _real(gain, g_name))
            else:
                object.__setattr__(self, a_name, paper if alpha is None else _real(alpha, a_name))
        for name in ("normalize", "preserve_sparsity"):
            _flag(getattr(self, name), name)

    def strength(self, module: str, direction_norm: float) -> tuple[float, float]:
        """``(α, gain)`` of ``module`` (``"attn"`` or ``"mlp"``) for a direction of norm ``direction_norm``.

        The spelling given is returned exactly; the other is computed from it.
        """
        if module not in ("attn", "mlp"):
            raise InvalidArgumentError(f"module must be 'attn' or 'mlp', got {module!r}")
        gain = getattr(self, f"gain_{module}")
        if gain is not None:
            return alpha_from_gain(gain, direction_norm, self.normalize), float(gain)
        alpha = float(getattr(self, f"alpha_{module}"))
        return alpha, gain_from_alpha(alpha, direction_norm, self.normalize)

    def alphas(self, direction_norm: float) -> tuple[float, float]:
        """The ``(α_attn, α_mlp)`` this config applies with a direction of norm ``direction_norm``."""
        return self.strength("attn", direction_norm)[0], self.strength("mlp", direction_norm)[0]

    def gains(self, direction_norm: float) -> tuple[float, float]:
        """The ``(g_attn, g_mlp)`` along r̂ this config gives with a direction of norm ``direction_norm``."""
        return self.strength("attn", direction_norm)[1], self.strength("mlp", direction_norm)[1]


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
    """What AIRD did to one module: its α, the gain along r̂, the update norm and the zero fractions.

    ``alpha`` and ``gain`` are both the values in effect: the spelling the
    config gave is kept exactly, the other is computed from it and ‖r‖.
    """

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
    Frobenius norm ``‖W' − W‖_F`` actually applied (float64). ``repair`` is
    filled by :func:`~refusal_core.repair.repair_`: how the edit was brought back
    into the model's storage (rule, format, sparsity lost, re-quantization and
    its representability check); None for a bare :func:`apply_aird_`.
    """

    layer: int
    config: AirdConfig
    direction_norm: float
    modules: dict[str, AirdModuleRecord]
    model: dict[str, Any] = field(default_factory=dict)
    repair: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The saved JSON object (see :mod:`refusal_core.saving.records`; the model identity is ``model``)."""
        return {"kind": _RECORD_KIND, "version": _RECORD_VERSION, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        """Write the record as JSON to ``path`` (a file), atomically."""
        return write_record(path, Record.from_dict(self.to_dict(), _RECORD_KIND), strict=False)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> AirdRecord:
        """The record :meth:`to_dict` wrote (version 2) or an older version-1 one (α spelling only).

        Raises :class:`ArtifactError` for anything else, naming what is wrong.
        """
        Record.from_dict(doc, _RECORD_KIND)  # kind and a readable version, else ArtifactError
        try:
            modules = {}
            for name, m in doc["modules"].items():
                m = dict(m)
                ret = m.pop("retention", None)
                modules[name] = AirdModuleRecord(**m, retention=UpdateRetention(**ret) if ret else None)
            return cls(
                layer=int(doc["layer"]),
                config=AirdConfig(**doc["config"]),
                direction_norm=float(doc["direction_norm"]),
                modules=modules,
                model=dict(doc.get("model", {})),
                repair=dict(doc["repair"]) if doc.get("repair") is not None else None,
            )
        except ArtifactError:
            raise
        except (InvalidArgumentError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"malformed AirdRecord: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> AirdRecord:
        """Read a record written by :meth:`save`; :class:`ArtifactError` if it is not one."""
        return load_record_as(path, _RECORD_KIND, cls.from_dict)


#: Version 2 added ``gain_attn`` / ``gain_mlp`` to the config; version 1 records load as α-spelled.
_RECORD_KIND = "AirdRecord"
_RECORD_VERSION = RECORD_KINDS[_RECORD_KIND].version


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
    record_identity: bool = True,
) -> AirdRecord:
    """Apply AIRD in place to block ``layer``'s ``o_proj`` and ``down_proj``; returns what was done.

    On a Mixture-of-Experts block the MLP strength applies to every routed
    expert's down projection (rank 1 per expert; record keys
    ``"experts.down_proj[e]"``) and to any shared expert's
    (``"shared_expert.down_proj"``); the router reads the stream and is left
    alone. On Mamba the attention strength applies to the mixer's ``out_proj``
    (the mixer is its only token mixer and its only writer).

    ``r [d]`` is used as given (raw difference in means) unless
    ``config.normalize``. Each module's α is the config's, or resolved from its
    gain against ‖r‖ (:meth:`AirdConfig.strength`). Both modules are checked to
    be plain floating-point ``nn.Linear`` with finite weights, ``r``/``layer``/
    ``config`` validated, and both edited weights computed and checked finite
    (:class:`~refusal_core.errors.NonFiniteError`, e.g. for α = 1e40 in
    float32) before either is written; anything else raises (a quantized
    linear: :class:`~refusal_core.errors.UnsupportedModuleError` naming it).
    With ``direction_identity`` (the identity recorded with ``r``), a direction
    from another model raises :class:`~refusal_core.errors.ForeignDirectionError`
    unless ``model_record["base_identity"]`` is that model (see
    :func:`~refusal_core.directions.check_direction_origin`). ``record_identity``
    False leaves the record's ``model`` empty (no hash of the whole model).
    """
    if direction_identity is not None:  # None: a raw tensor of unknown origin, used as given
        check_direction_origin(direction_identity, model, model_record=model_record)
    if not isinstance(config, AirdConfig):
        raise InvalidArgumentError(f"config must be an AirdConfig, got {type(config).__name__}")
    layout = get_layout(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layout.n_layers:
        raise InvalidArgumentError(f"layer must be an int in [0, {layout.n_layers}), got {layer!r}")
    r64 = check_directions(r, layout.d_model, allow_batch=False)
    check_model_finite(model, "apply_aird_")  # no NaN/inf anywhere (biases, norms too) before any edit
    r_norm = float(torch.linalg.vector_norm(r64))
    # Every residual writer of the block: o_proj and down_proj, or in an MoE block o_proj, each routed
    # expert's down projection (a view of the fused [E, d, ff] parameter) and any shared expert's;
    # Mamba's out_proj. The router only reads the stream and is not among them.
    linears: dict[str, torch.Tensor] = {}
    strengths: dict[str, tuple[float, float]] = {}
    for wm in editable_writer_matrices(layout, [layer]):
        linears[wm.key] = wm.weight
        strengths[wm.key] = config.strength(wm.writer.strength, r_norm)
    # Every edit is computed (and checked finite) before any module is written, so a
    # failing one leaves the model as it was.
    planned: dict[str, tuple[torch.Tensor, AirdModuleRecord]] = {}
    with torch.no_grad():
        for name, weight in linears.items():
            alpha, gain = strengths[name]
            before = weight.detach().to(torch.float64).clone()
            rd = r64.to(weight.device)
            new = aird_update(
                weight,
                rd,
                alpha,
                normalize=config.normalize,
                preserve_sparsity=config.preserve_sparsity,
            )
            if not all_finite(new):
                raise NonFiniteError(
                    f"AIRD on {name}[{layer}] with alpha={alpha!r} (gain {gain!r}, ‖r‖={r_norm:.6g}) "
                    f"gives non-finite {new.dtype} weights; nothing was edited"
                )
            after = new.detach().to(torch.float64)
            retention = (
                dense_update_retention(before, rd, alpha, normalize=config.normalize)
                if config.preserve_sparsity
                else None
            )
            record = AirdModuleRecord(
                alpha=alpha,
                gain=gain,
                update_norm=float(torch.linalg.matrix_norm(after - before)),
                sparsity_before=_zero_fraction(before),
                sparsity_after=_zero_fraction(after),
                retention=retention,
            )
            planned[name] = (new, record)
        for name, (new, _) in planned.items():
            linears[name].copy_(new)  # an expert's slice is a view: this writes the fused parameter
    return AirdRecord(
        layer=layer,
        config=config,
        direction_norm=r_norm,
        modules={name: rec for name, (_, rec) in planned.items()},
        model=model_identity(model) if record_identity else {},
    )
