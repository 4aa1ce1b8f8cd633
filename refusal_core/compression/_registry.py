"""The method table: each compression method registered once, with all the project asks of it.

A :class:`MethodSpec` says, for one config type: its label (the ``method`` of a
:class:`~refusal_core.compression.CompressionRecord`), its handler, its
``kind``, whether it needs calibration data, which optional extra it needs, the
CLI names with their default configs, how its checkpoints are stored and how a
repaired model is brought back into that storage. :func:`register_method`
(a decorator on the handler) is the only place a method is listed; every other
table is read from here: :data:`METHODS` (CLI names), the config classes by
name that :func:`config_from_dict` reads records with, the study's "is this
pruning?", the checkpoint writer's ``format``, the repair's re-quantization
rule (:mod:`refusal_core.repair`) and the GPU tier's quantized methods.

=============  ====================================================================================
field          meaning
=============  ====================================================================================
kind           ``pruning`` (zeros in float weights), ``simulation`` (quantization simulated in
               float or in refusal_core's own modules), ``quantization`` (a real quantized backend
               module); where it runs (reference or a library) is ``extra``, not a kind
storage        the checkpoint ``format``: ``dense``, ``dequantized-simulation``,
               ``bitsandbytes-int8``, ``bitsandbytes-nf4``
requantize     how a repair keeps the storage: ``keep-zeros`` (the edit is restricted to the
               nonzero pattern), ``module-scheme`` (the quantized module is dequantized, edited
               and re-quantized by its own scheme, :mod:`~refusal_core.compression.schemes`),
               ``weight-groups`` (float weights on a group-wise ``w_bit`` grid: rounded onto it
               again with the config's ``w_bit`` / ``group_size`` / ``zero_point``), ``refuse``
               (the format cannot be written again here; ``repair_note`` says why, and a repair
               is refused before anything changes)
extra          None (reference, always there) or the optional dependency (``bnb``, ``llmc``),
               with ``available()`` telling whether it imports and ``install_hint`` what to run
=============  ====================================================================================

A handler is ``handler(model, config, calibration, *, batch_size, progress) -> errors``:
it receives the config object whole (validated once, when it was built),
changes ``model`` in place and returns the per-module rounding error (empty
for pruning). :meth:`MethodSpec.run` refuses a missing calibration set with
:class:`~refusal_core.errors.EmptyInputError` before the handler runs.

The backends (``bnb``, ``llmc``) register through this module, not through
the package, so importing them never needs a half-initialized
:mod:`refusal_core.compression`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

from torch import nn

from refusal_core.compression.calibration import Calibration
from refusal_core.compression.config import CONFIG_TYPES, CompressionConfig
from refusal_core.errors import EmptyInputError, InvalidArgumentError

__all__ = [
    "KINDS",
    "METHODS",
    "REGISTRY",
    "REQUANTIZE_RULES",
    "STORAGE_FORMATS",
    "Handler",
    "Method",
    "MethodSpec",
    "check_methods_available",
    "method_for",
    "method_spec",
    "method_specs",
    "named_config",
    "register_method",
    "required_calibration",
    "spec_of_recorded_method",
    "unregister_method",
]

_C = TypeVar("_C", bound=CompressionConfig, contravariant=True)

#: What a method does to the weights (see the module docstring).
KINDS = ("pruning", "simulation", "quantization")
#: How a method's checkpoints are stored (``format`` of :mod:`refusal_core.checkpoint`).
STORAGE_FORMATS = ("dense", "dequantized-simulation", "bitsandbytes-int8", "bitsandbytes-nf4")
#: How a repair brings an edited weight back into the method's storage.
REQUANTIZE_RULES = ("keep-zeros", "module-scheme", "weight-groups", "gguf-blocks", "refuse")


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


def _always() -> bool:
    return True


@dataclass(frozen=True)
class MethodSpec:
    """One registered compression method (see the module docstring for the fields)."""

    label: str
    config_type: type[CompressionConfig]
    handler: Handler[Any]
    kind: str
    needs_calibration: bool
    storage: str
    requantize: str
    names: Mapping[str, CompressionConfig]
    extra: str | None = None
    available: Callable[[], bool] = field(default=_always, compare=False)
    install_hint: str = ""
    bits: Callable[[Any], int | None] | None = field(default=None, compare=False)
    repair_note: str = ""

    @property
    def prunes(self) -> bool:
        """Whether the method zeroes weights (its repairs keep the zero pattern unless asked not to)."""
        return self.kind == "pruning"

    @property
    def quantizes(self) -> bool:
        """Whether the method rounds weights onto a quantization grid (simulated or real)."""
        return self.kind in ("simulation", "quantization")

    def weight_bits(self, config: CompressionConfig) -> int | None:
        """Bits per stored weight of ``config`` (None for pruning: float weights)."""
        return None if self.bits is None else self.bits(config)

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


#: The former name of :class:`MethodSpec` (what :func:`method_for` returns).
Method = MethodSpec

#: Config type → spec. Filled by :func:`register_method` only.
_BY_TYPE: dict[type[CompressionConfig], MethodSpec] = {}
#: CLI name → spec, in registration order. Filled by :func:`register_method` only.
_BY_NAME: dict[str, MethodSpec] = {}

#: Read-only view: config type → spec.
REGISTRY: Mapping[type[CompressionConfig], MethodSpec] = MappingProxyType(_BY_TYPE)


class _MethodNames(Mapping[str, CompressionConfig]):
    """Read-only view: CLI name → default config, over the registered specs."""

    def __getitem__(self, name: str) -> CompressionConfig:
        return _BY_NAME[name].names[name]

    def __iter__(self) -> Any:
        return iter(_ordered_names())

    def __len__(self) -> int:
        return len(_BY_NAME)

    def __repr__(self) -> str:
        return f"METHODS({dict(self)!r})"


#: CLI name → default config (every registered name).
METHODS: Mapping[str, CompressionConfig] = _MethodNames()

_T = TypeVar("_T", bound=CompressionConfig)


def register_method(
    config_type: type[_T],
    label: str,
    *,
    needs_calibration: bool,
    kind: str,
    storage: str,
    requantize: str,
    names: Mapping[str, _T] | None = None,
    extra: str | None = None,
    available: Callable[[], bool] = _always,
    install_hint: str = "",
    bits: Callable[[_T], int | None] | int | None = None,
    repair_note: str = "",
) -> Callable[[Handler[_T]], Handler[_T]]:
    """Register the decorated handler for ``config_type`` with its whole spec (see the module docstring).

    ``names`` maps CLI names to default configs (default: ``{label: config_type()}``);
    ``bits`` is the stored bits per weight, a number or a function of the config;
    ``repair_note`` (required with ``requantize="refuse"``) says why a repair cannot keep the storage.
    A second registration of a config type or a name raises (one method, one place).
    """
    if not (isinstance(config_type, type) and issubclass(config_type, CompressionConfig)):
        raise InvalidArgumentError(f"config_type must be a CompressionConfig subclass, got {config_type!r}")
    for value, allowed, what in (
        (kind, KINDS, "kind"),
        (storage, STORAGE_FORMATS, "storage"),
        (requantize, REQUANTIZE_RULES, "requantize"),
    ):
        if value not in allowed:
            raise InvalidArgumentError(f"{label}: {what} must be one of {allowed}, got {value!r}")
    if requantize == "refuse" and not repair_note:
        raise InvalidArgumentError(f"{label}: requantize='refuse' needs a repair_note saying why")
    named: dict[str, CompressionConfig] = dict(names) if names is not None else {label: config_type()}
    for name, config in named.items():
        if type(config) is not config_type:
            raise InvalidArgumentError(f"{label}: name {name!r} maps to a {type(config).__name__}")
        if "@" in name or "+" in name:
            raise InvalidArgumentError(f"{label}: method name {name!r} may not contain '@' or '+'")
    taken = sorted(n for n in named if n in _BY_NAME)
    if config_type in _BY_TYPE or taken:
        raise InvalidArgumentError(
            f"{label}: {config_type.__name__} or names {taken} are registered already (one place per method)"
        )
    bits_fn: Callable[[Any], int | None] | None
    if bits is None or callable(bits):
        bits_fn = bits
    else:
        fixed = int(bits)
        bits_fn = lambda _config: fixed  # noqa: E731

    def deco(fn: Handler[_T]) -> Handler[_T]:
        spec = MethodSpec(
            label=label,
            config_type=config_type,
            handler=fn,
            kind=kind,
            needs_calibration=bool(needs_calibration),
            storage=storage,
            requantize=requantize,
            names=MappingProxyType(named),
            extra=extra,
            available=available,
            install_hint=install_hint,
            bits=bits_fn,
            repair_note=repair_note,
        )
        _BY_TYPE[config_type] = spec
        for name in named:
            _BY_NAME[name] = spec
        # Records are read back by class name (config_from_dict).
        CONFIG_TYPES[config_type.__name__] = config_type
        return fn

    return deco


def _ordered_names() -> list[str]:
    # The reference methods first, then the backends', each in registration order (the backends
    # register on import, before the package's own handlers).
    return [n for n, s in _BY_NAME.items() if s.extra is None] + [
        n for n, s in _BY_NAME.items() if s.extra is not None
    ]


def unregister_method(config_type: type[CompressionConfig]) -> None:
    """Remove the method registered for ``config_type`` (its names and its record class too)."""
    spec = _BY_TYPE.pop(config_type, None)
    if spec is None:
        raise InvalidArgumentError(
            f"no method is registered for {getattr(config_type, '__name__', config_type)}"
        )
    for name in spec.names:
        _BY_NAME.pop(name, None)
    CONFIG_TYPES.pop(config_type.__name__, None)


def method_specs() -> list[MethodSpec]:
    """Every registered spec, once each: the reference methods first, then the backends'."""
    specs = list(_BY_TYPE.values())
    return [s for s in specs if s.extra is None] + [s for s in specs if s.extra is not None]


def method_for(config: object) -> MethodSpec:
    """The spec registered for ``type(config)``; :class:`InvalidArgumentError` when there is none."""
    spec = _BY_TYPE.get(type(config))  # type: ignore[arg-type]
    if spec is None:
        raise InvalidArgumentError(
            f"config must be one of {sorted(t.__name__ for t in _BY_TYPE)}, got {type(config).__name__}"
        )
    return spec


def method_spec(name: str) -> MethodSpec:
    """The spec of a method name (``"wanda"``, ``"wanda@0.6"``, ``"awq-w4"``) or record label (``"awq"``).

    An unknown name raises one :class:`InvalidArgumentError` listing the valid names.
    """
    if not isinstance(name, str):
        raise InvalidArgumentError(f"compression method must be a str, got {type(name).__name__}")
    base = name.partition("@")[0]
    spec = _BY_NAME.get(base)
    if spec is None:
        spec = next((s for s in _BY_TYPE.values() if s.label == base), None)
    if spec is None:
        raise InvalidArgumentError(
            f"unknown compression method {name!r}; valid: {', '.join(_ordered_names())} "
            "(pruning methods also take @SPARSITY, e.g. wanda@0.6)"
        )
    return spec


def spec_of_recorded_method(method: object) -> MethodSpec | None:
    """The spec of the compression a recorded ``method`` string names, else None.

    Records name derived models ``"<method>+aird"`` (compression, then repair);
    the part before the first ``+`` is the compression. ``None``, ``"aird"``,
    ``"base"`` and names no method has registered give None.
    """
    if not isinstance(method, str) or not method:
        return None
    head = method.partition("+")[0]
    try:
        return method_spec(head)
    except InvalidArgumentError:
        return None


def check_methods_available(names: Iterable[str]) -> None:
    """Refuse, before any work, a method name that is unknown (record labels such as ``"awq"`` are not
    method names), has a bad ``@SPARSITY`` suffix, or whose optional extra does not import.

    Raises one :class:`InvalidArgumentError` naming every unavailable method
    and what to install.
    """
    if isinstance(names, str):
        names = [names]
    missing: dict[str, list[str]] = {}
    for name in names:
        named_config(name)  # an unknown name or a bad @SPARSITY suffix raises here, listing the valid ones
        spec = method_spec(name)
        if not spec.available():
            missing.setdefault(spec.extra or spec.label, []).append(name)
    if missing:
        parts = []
        for extra, which in missing.items():
            hint = next(s.install_hint for s in _BY_TYPE.values() if (s.extra or s.label) == extra)
            what = f"method {which[0]} needs" if len(which) == 1 else f"methods {', '.join(which)} need"
            parts.append(f"{what} the {extra!r} extra, which does not import here ({hint})")
        raise InvalidArgumentError("; ".join(parts))


def required_calibration(calibration: Calibration | None, label: str) -> Calibration:
    """``calibration``, or :class:`~refusal_core.errors.EmptyInputError` (an ``InvalidArgumentError``)
    saying that method ``label`` needs one."""
    if calibration is None:
        raise EmptyInputError(
            f"{label} needs calibration data (token id sequences, see prepare_calibration); got None"
        )
    return calibration


def named_config(name: str) -> CompressionConfig:
    """The config of a method name, optionally with ``@SPARSITY`` for unstructured pruning methods."""
    spec = method_spec(name)
    base, _, level = name.partition("@")
    if base not in spec.names:  # a record label such as "awq" is not a CLI name
        raise InvalidArgumentError(
            f"unknown compression method {name!r}; valid: {', '.join(_ordered_names())} "
            "(pruning methods also take @SPARSITY, e.g. wanda@0.6)"
        )
    config = spec.names[base]
    if not level:
        return config
    if not hasattr(config, "sparsity") or getattr(config, "n_m", None) is not None:
        raise InvalidArgumentError(f"method {base!r} takes no @SPARSITY suffix (in {name!r})")
    try:
        sparsity = float(level)
    except ValueError:
        raise InvalidArgumentError(f"sparsity suffix of {name!r} is not a number") from None
    return dataclasses.replace(config, sparsity=sparsity)  # type: ignore[call-arg]
