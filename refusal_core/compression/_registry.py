"""The handler registry of :func:`~refusal_core.compression.compress_`: one handler per config type.

A handler is ``handler(model, config, calibration, *, batch_size, progress) -> errors``:
it receives the config object whole (validated once, when it was built),
changes ``model`` in place and returns the per-module rounding error (empty
for pruning). Whether it needs calibration data is declared when it is
registered; :meth:`Method.run` refuses a missing set with
:class:`~refusal_core.errors.EmptyInputError` before the handler runs.

The backends (``bnb``, ``llmc``) register through this module, not through
the package, so importing them never needs a half-initialized
:mod:`refusal_core.compression`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from torch import nn

from refusal_core.compression.calibration import Calibration
from refusal_core.compression.config import CompressionConfig
from refusal_core.errors import EmptyInputError, InvalidArgumentError

__all__ = ["REGISTRY", "Handler", "Method", "method_for", "register_method", "required_calibration"]

_C = TypeVar("_C", bound=CompressionConfig, contravariant=True)


class Handler(Protocol[_C]):
    """What a registered method is: it applies ``config`` to ``model`` in place."""

    def __call__(
        self,
        model: nn.Module,
        config: _C,
        calibration: Calibration | None,
        *,
        batch_size: int,
        progress: bool,
    ) -> dict[str, float]: ...


@dataclass(frozen=True)
class Method:
    """A registered method: its label, its handler and whether it needs calibration data."""

    label: str
    handler: Handler[Any]
    needs_calibration: bool

    def run(
        self,
        model: nn.Module,
        config: CompressionConfig,
        calibration: Calibration | None,
        *,
        batch_size: int,
        progress: bool,
    ) -> dict[str, float]:
        """Call the handler; a method needing calibration gets it or raises, one that does not gets None."""
        calibration = required_calibration(calibration, self.label) if self.needs_calibration else None
        return self.handler(model, config, calibration, batch_size=batch_size, progress=progress)


#: Config type → method. Filled by :func:`register_method`.
REGISTRY: dict[type[CompressionConfig], Method] = {}

_T = TypeVar("_T", bound=CompressionConfig)


def register_method(
    config_type: type[_T], label: str, *, needs_calibration: bool
) -> Callable[[Handler[_T]], Handler[_T]]:
    """Register the decorated handler for ``config_type`` (see the module docstring)."""
    if not (isinstance(config_type, type) and issubclass(config_type, CompressionConfig)):
        raise InvalidArgumentError(f"config_type must be a CompressionConfig subclass, got {config_type!r}")

    def deco(fn: Handler[_T]) -> Handler[_T]:
        REGISTRY[config_type] = Method(label, fn, bool(needs_calibration))
        return fn

    return deco


def method_for(config: object) -> Method:
    """The method registered for ``type(config)``; :class:`InvalidArgumentError` when there is none."""
    method = REGISTRY.get(type(config))  # type: ignore[arg-type]
    if method is None:
        raise InvalidArgumentError(
            f"config must be one of {sorted(t.__name__ for t in REGISTRY)}, got {type(config).__name__}"
        )
    return method


def required_calibration(calibration: Calibration | None, label: str) -> Calibration:
    """``calibration``, or :class:`~refusal_core.errors.EmptyInputError` (an ``InvalidArgumentError``)
    saying that method ``label`` needs one."""
    if calibration is None:
        raise EmptyInputError(
            f"{label} needs calibration data (token id sequences, see prepare_calibration); got None"
        )
    return calibration
