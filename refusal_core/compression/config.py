"""One frozen configuration dataclass per compression method.

A config is a value: it is validated when built (bad values raise
:class:`~refusal_core.errors.InvalidArgumentError` naming the field), compares
by value, and round-trips through :func:`config_to_dict` /
:func:`config_from_dict` for the JSON of a
:class:`~refusal_core.compression.CompressionRecord`.

Example:
    >>> WandaConfig(sparsity=0.5, n_m=(2, 4))
    WandaConfig(sparsity=0.5, n_m=(2, 4))
    >>> config_from_dict(config_to_dict(AwqConfig(w_bit=8))) == AwqConfig(w_bit=8)
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from refusal_core.errors import InvalidArgumentError
from refusal_core.model.simulated import check_threshold

__all__ = [
    "AwqConfig",
    "CompressionConfig",
    "Int8Config",
    "MagnitudeConfig",
    "WandaConfig",
    "check_threshold",
    "config_from_dict",
    "config_to_dict",
]


def check_sparsity(value: object, name: str = "sparsity") -> float:
    """``value`` as a float in [0, 1), else :class:`InvalidArgumentError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise InvalidArgumentError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_n_m(value: object, name: str = "n_m") -> tuple[int, int] | None:
    """``None`` or a pair ``(n, m)`` of ints with ``1 <= n < m``."""
    if value is None:
        return None
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise InvalidArgumentError(f"{name} must be None or a pair of ints (n, m), got {value!r}")
    n, m = int(value[0]), int(value[1])
    if not 1 <= n < m:
        raise InvalidArgumentError(f"{name} = {value!r}: need 1 <= n < m")
    return n, m


def check_positive_int(value: object, name: str, *, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``, else :class:`InvalidArgumentError` naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidArgumentError(f"{name} must be an int {bound}, got {value!r}")
    return value


#: What an AWQ scale candidate is scored on (see :class:`AwqConfig`).
AWQ_OBJECTIVES = ("module", "linear")


@dataclass(frozen=True)
class CompressionConfig:
    """Base class of the method configs; the registry in :mod:`refusal_core.compression` keys on the type."""

    def record_details(self, model: Any) -> dict[str, Any]:
        """Method-specific facts for the record (JSON-able), computed before the model changes; none here."""
        return {}


@dataclass(frozen=True)
class MagnitudeConfig(CompressionConfig):
    """Unstructured magnitude pruning: per matrix, exactly ``⌊sparsity·numel⌋`` smallest ``|W|`` zeroed."""

    sparsity: float = 0.5

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)


@dataclass(frozen=True)
class WandaConfig(CompressionConfig):
    """Wanda pruning: scores ``|W|·‖X_j‖₂``; per row ``⌊sparsity·d_in⌋`` zeros, or N:M when ``n_m`` is set.

    With ``n_m = (n, m)`` the achieved sparsity is ``n/m`` and ``sparsity`` is only range-checked.
    """

    sparsity: float = 0.5
    n_m: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        # Normalize a JSON list to a tuple so equal configs compare equal.
        object.__setattr__(self, "n_m", check_n_m(self.n_m))


@dataclass(frozen=True)
class Int8Config(CompressionConfig):
    """LLM.int8 simulation: per-row absmax int8 weights, per-token int8 activations, outliers ≥ threshold."""

    threshold: float = 6.0

    def __post_init__(self) -> None:
        check_threshold(self.threshold)


@dataclass(frozen=True)
class AwqConfig(CompressionConfig):
    """AWQ fake quantization (weights kept as dequantized floats in plain ``nn.Linear``).

    ``group_size`` is capped per linear at its input width (``min(group_size, d_in)``);
    ``grid`` is the number of exponents ``a`` searched (``a = i/grid``); ``clip``
    enables the per-group clipping search; ``zero_point`` selects asymmetric
    (True) or symmetric group quantization; ``objective`` is what a scale
    candidate is scored on: ``"module"`` the output of the module the group
    feeds (attention, MLP, ``o_proj``, ``down_proj``; AWQ's choice) or
    ``"linear"`` the group's own linear outputs (``functional.awq_scales``).
    """

    w_bit: int = 4
    group_size: int = 128
    grid: int = 20
    clip: bool = False
    zero_point: bool = True
    objective: str = "module"

    def __post_init__(self) -> None:
        check_positive_int(self.w_bit, "w_bit", low=2, high=8)
        check_positive_int(self.group_size, "group_size")
        check_positive_int(self.grid, "grid")
        for name in ("clip", "zero_point"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.objective not in AWQ_OBJECTIVES:
            raise InvalidArgumentError(f"objective must be one of {AWQ_OBJECTIVES}, got {self.objective!r}")


#: Config classes by name, for reading records back. Filled by
#: :func:`~refusal_core.compression._registry.register_method` (the one place a method is listed).
CONFIG_TYPES: dict[str, type[CompressionConfig]] = {}


def config_to_dict(config: CompressionConfig) -> dict[str, Any]:
    """A JSON-able dict ``{"type": <class name>, <field>: <value>, ...}``."""
    if not isinstance(config, CompressionConfig):
        raise InvalidArgumentError(f"config must be a CompressionConfig, got {type(config).__name__}")
    out: dict[str, Any] = {"type": type(config).__name__}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def config_from_dict(data: Mapping[str, Any]) -> CompressionConfig:
    """Inverse of :func:`config_to_dict`; unknown types or fields raise :class:`InvalidArgumentError`."""
    if not isinstance(data, Mapping) or "type" not in data:
        raise InvalidArgumentError(f"config data must be a mapping with a 'type' key, got {data!r}")
    cls = CONFIG_TYPES.get(str(data["type"]))
    if cls is None:
        raise InvalidArgumentError(f"unknown config type {data['type']!r}; known: {sorted(CONFIG_TYPES)}")
    fields = {k: v for k, v in data.items() if k != "type"}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise InvalidArgumentError(f"config data for {cls.__name__} has unknown fields {unknown}")
    return cls(**fields)
