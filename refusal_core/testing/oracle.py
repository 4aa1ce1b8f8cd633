"""Which implementation the property suite checks (reference-oracle mode).

By default the suite in ``properties/`` checks the project's own functional
core, :mod:`refusal_core.functional`. An outside implementer points it at their
module with an environment variable::

    REFUSAL_CORE_IMPL=mypkg.refusal_ops pytest properties

The module may expose any subset of the protocol functions listed in
:data:`PROTOCOL`, under the same names and signatures; a test that needs a
function the module lacks is skipped with a reason naming the function.
Several modules can be checked in one run with a comma-separated list
(``REFUSAL_CORE_IMPL=a.ops,b.ops``); every test then runs once per module and
its id ends in ``[module]``.

Every call goes through :meth:`Implementation.__getattr__`, which returns the
function wrapped in a checker: after each call (also one that raises) every
tensor argument must be bit-identical to what it was before, and no returned
tensor may share memory with an argument.

Errors on bad input are the project's *policy*, kept apart from the math: the
property tests that check it carry the pytest marker ``bad_input``
(:data:`BAD_INPUT_MARKER`). Who is held to them (:meth:`Implementation.held_to_bad_input`):

=================================================  ==========================================
module                                             bad-input tests
=================================================  ==========================================
the reference                                      always, strict rule
declares ``RAISES_REFUSAL_CORE_ERRORS = True``     always, strict rule
any other outside module                           skipped, unless the run selects the marker
                                                   (``-m bad_input``); then the lenient rule
=================================================  ==========================================

Strict rule: a :class:`~refusal_core.errors.RefusalCoreError` subclass whose
message names the offending argument. Lenient rule: any :class:`Exception`
counts as a correct rejection, since an outside module cannot know this
project's exception types (returning a value never does). So a module that
implements only the math never fails on the project's bad-input policy unless
its author asks for it.

Example:
    >>> impl = load_implementation()
    >>> impl.is_reference, len(impl.provided())
    (True, 15)
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, ModuleType
from typing import Any, NoReturn

import torch

from refusal_core.errors import ImplementationError

__all__ = [
    "BAD_INPUT_MARKER",
    "ENV_VAR",
    "PROTOCOL",
    "REFERENCE_MODULE",
    "STRICT_ERRORS_ATTRIBUTE",
    "TOLERANCE",
    "Implementation",
    "describe_implementations",
    "load_implementation",
    "load_implementations",
    "marker_selected",
    "protocol_signature",
    "protocol_table",
    "reference_implementation",
    "require",
    "tolerance",
]

#: The environment variable naming the module(s) under test.
ENV_VAR = "REFUSAL_CORE_IMPL"

#: The module checked when :data:`ENV_VAR` is unset or empty.
REFERENCE_MODULE = "refusal_core.functional"

#: A module attribute that opts an outside implementation into the strict error rule.
STRICT_ERRORS_ATTRIBUTE = "RAISES_REFUSAL_CORE_ERRORS"

#: The pytest marker of the bad-input policy checks.
BAD_INPUT_MARKER = "bad_input"


def marker_selected(markexpr: str, marker: str = BAD_INPUT_MARKER) -> bool:
    """Whether a ``-m`` expression asks for the tests marked ``marker``.

    True when the expression names ``marker`` and is true for a test carrying
    ``marker`` and no other marker — so ``bad_input``, ``bad_input or not
    bad_input`` and ``bad_input and not slow`` select it, while ``not bad_input``,
    ``not (gpu or bad_input)`` and expressions that do not name it (the default
    ``not gpu and not real and not slow``) do not. Uses pytest's own expression
    parser; an expression it rejects counts as not selecting.

    >>> marker_selected("bad_input"), marker_selected("not bad_input"), marker_selected("")
    (True, False, False)
    >>> marker_selected("bad_input or not bad_input"), marker_selected("not (gpu or bad_input)")
    (True, False)
    >>> marker_selected("not gpu and not real and not slow")
    False
    """
    if not markexpr or not re.search(rf"(?<!\w){re.escape(marker)}(?!\w)", markexpr):
        return False
    try:
        from _pytest.mark.expression import Expression  # the parser behind -m itself

        def only_marker(name: str, /, **kwargs: str | int | bool | None) -> bool:
            return name == marker

        return bool(Expression.compile(markexpr).evaluate(only_marker))
    except Exception:  # a malformed expression (pytest reports it itself) or another pytest
        return False


#: The oracle protocol: function name -> one-line meaning. :func:`protocol_table` turns it, with the
#: reference's signatures, into the README's table.
PROTOCOL: Mapping[str, str] = MappingProxyType(
    {
        "difference_in_means": "[n1, ..., d], [n2, ..., d] → [..., d] float64: "
        "mean(harmful) − mean(harmless), never normalized",
        "ablate": "x − r̂ r̂ᵀ x over the last axis of x [..., d], same dtype as x",
        "add_direction": "x + coeff·r over the last axis, same dtype as x",
        "orthogonalize_weight": "(I − r̂ r̂ᵀ) w for w [d, k] writing into the residual stream",
        "orthogonalize_embedding": "e (I − r̂ r̂ᵀ) for an embedding table e [vocab, d]",
        "aird_update": "w + α r rᵀ w (r̂ when normalize); with preserve_sparsity the update is zero "
        "wherever w is zero",
        "cosine_similarity": "cosine of the angle between two same-shape tensors, a float in [−1, 1]",
        "magnitude_mask": "bool keep-mask: exactly ⌊s·numel⌋ entries of lowest |w| are False",
        "wanda_mask": "keep-mask by |w[i, j]|·input_norms[j]: ⌊s·in⌋ pruned per row, or n of every m "
        "consecutive inputs when n_m = (n, m)",
        "int8_quantize": "(q int8 [out, in], scale [out]): scale = row absmax / 127, q = round(w / scale); "
        "an all-zero row gives q = 0",
        "int8_dequantize": "q · scale per row",
        "llm_int8_linear": "x wᵀ with int8 weights and per-token int8 activations, except input features "
        "with any |x| ≥ threshold, which multiply the dequantized weights unquantized",
        "pseudo_quantize": "group-wise quantize-dequantize of w [out, in]: asymmetric with a clamped "
        "zero point, or symmetric",
        "awq_scales": "per-input-channel s = t/√(max t·min t), t = max(mean|x|^a, 1e-4), for the a "
        "of the grid minimizing ‖x wᵀ − (x/s) Q(w·s)ᵀ‖² (first on ties)",
        "refusal_score": "log(p + 1e-8) − log(1 − p + 1e-8) in float64, p the softmax mass on the "
        "refusal ids",
    }
)


def protocol_signature(name: str) -> str:
    """``name(arg, ..., *, kw=default)`` as the reference declares it, without type annotations."""
    from refusal_core import functional

    params = inspect.signature(getattr(functional, name)).parameters.values()
    parts, star = [], False
    for p in params:
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        parts.append(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}")
    return f"{name}({', '.join(parts)})"


def protocol_table() -> str:
    """The protocol as a Markdown table (function with signature | meaning), for the README."""
    rows = ["| function | meaning |", "|---|---|"]
    rows += [
        f"| `{protocol_signature(n)}` | {meaning.replace('|', chr(92) + '|')} |"
        for n, meaning in PROTOCOL.items()
    ]
    return "\n".join(rows)


#: Norm-relative tolerance per dtype, used by the properties and the differential checks:
#: ``‖actual − expected‖ ≤ TOLERANCE[dtype] · scale`` where ``scale`` is a norm of the inputs
#: that bounds the result (stated in each test). Generous enough for another accumulation
#: order or precision, far below the O(1) relative errors of a wrong formula.
TOLERANCE: Mapping[torch.dtype, float] = MappingProxyType(
    {
        torch.float64: 1e-10,
        torch.float32: 2e-5,
        torch.float16: 4e-3,
        torch.bfloat16: 3e-2,
    }
)


def tolerance(dtype: torch.dtype) -> float:
    """The norm-relative tolerance of :data:`TOLERANCE` for ``dtype`` (float32's for other dtypes)."""
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


def _fail_skip(reason: str) -> NoReturn:
    import pytest  # only the suite calls this; the library does not depend on pytest

    pytest.skip(reason)
    raise AssertionError("unreachable")  # pragma: no cover - pytest.skip raises


def _tensors_in(value: object, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside ``value`` (tuples, lists and dict values included), with a readable path."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _tensors_in(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors_in(item, f"{path}[{key!r}]")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (NaN-safe equality, -0.0 distinct from 0.0)."""
    flat = t.detach().reshape(-1).contiguous()
    return flat.view(torch.uint8) if flat.numel() else flat


def _storage(t: torch.Tensor) -> int:
    return int(t.untyped_storage().data_ptr())


def _argument_names(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """Parameter names for ``args`` (``argument #i`` when the signature cannot bind them)."""
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs)
        return list(bound.arguments)[: len(args)]
    except (TypeError, ValueError):
        return [f"argument #{i}" for i in range(len(args))]


def _checked(name: str, module_name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` wrapped so that input mutation and output aliasing fail the calling test."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        names = _argument_names(fn, args, kwargs) + list(kwargs)
        values = list(args) + list(kwargs.values())
        before = [
            (path, t, t.dtype, tuple(t.shape), _bits(t).clone())
            for arg_name, value in zip(names, values)
            for path, t in _tensors_in(value, arg_name)
        ]
        try:
            result = fn(*args, **kwargs)
        finally:
            for path, t, dtype, shape, bits in before:
                if t.dtype != dtype or tuple(t.shape) != shape or not torch.equal(_bits(t), bits):
                    raise AssertionError(
                        f"{module_name}.{name} modified its input {path} "
                        f"({str(dtype).removeprefix('torch.')}{list(shape)}) in place; "
                        "protocol functions must leave their inputs bit-identical"
                    )
        inputs = {_storage(t) for _, t, *_ in before if t.numel()}
        for path, out in _tensors_in(result, "result"):
            if out.numel() and _storage(out) in inputs:
                raise AssertionError(
                    f"{module_name}.{name} returned {path} sharing memory with an input; "
                    "protocol functions must return new tensors"
                )
        return result

    return call


@dataclass(frozen=True)
class Implementation:
    """A module under test and the protocol functions it provides.

    Attribute access by protocol name (``impl.ablate``) returns the module's
    function wrapped by the input-mutation and aliasing checks, or skips the
    calling test when the module lacks it.
    """

    module_name: str
    module: ModuleType

    @property
    def is_reference(self) -> bool:
        """True for the project's own functional core."""
        return self.module_name == REFERENCE_MODULE

    @property
    def strict_errors(self) -> bool:
        """Whether bad input must raise a ``RefusalCoreError`` that names the argument."""
        return self.is_reference or bool(getattr(self.module, STRICT_ERRORS_ATTRIBUTE, False))

    def held_to_bad_input(self, marker_selected: bool) -> bool:
        """Whether the ``bad_input`` tests apply: strict modules always, others when the run selects them."""
        return self.strict_errors or marker_selected

    @property
    def label(self) -> str:
        """The id used in test names: the module name."""
        return self.module_name

    def has(self, name: str) -> bool:
        """Whether the module provides protocol function ``name``."""
        return name in PROTOCOL and callable(getattr(self.module, name, None))

    def provided(self) -> tuple[str, ...]:
        """The protocol functions the module provides, in protocol order."""
        return tuple(n for n in PROTOCOL if self.has(n))

    def missing(self) -> tuple[str, ...]:
        """The protocol functions the module lacks, in protocol order."""
        return tuple(n for n in PROTOCOL if not self.has(n))

    def raw(self, name: str) -> Callable[..., Any]:
        """The unwrapped function ``name`` (skips the calling test when it is missing)."""
        return require(self, name)

    def describe(self) -> str:
        """One line: the module, whether it is the reference, which functions it provides."""
        kind = "reference" if self.is_reference else "outside implementation"
        have, lack = self.provided(), self.missing()
        text = f"{self.module_name} ({kind}; provides {len(have)}/{len(PROTOCOL)} protocol functions"
        if lack:
            text += f"; missing: {', '.join(lack)}"
        if self.strict_errors:
            errors = "bad input must raise RefusalCoreError naming the argument"
        else:
            errors = f"bad-input policy checked only with -m {BAD_INPUT_MARKER} (then any exception counts)"
        return text + f"; {errors})"

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("__") or name not in PROTOCOL:
            raise AttributeError(f"{name!r} is not a protocol function (see refusal_core.testing.oracle)")
        return _checked(name, self.module_name, require(self, name))

    def __repr__(self) -> str:
        return f"Implementation({self.module_name!r})"


def load_implementation(name: str | None = None) -> Implementation:
    """Import the module ``name`` (default: :data:`REFERENCE_MODULE`) as an :class:`Implementation`.

    Raises :class:`~refusal_core.errors.ImplementationError` when the module cannot be
    imported, provides none of the protocol functions, or binds a protocol name to
    something that is not callable.
    """
    module_name = (name or REFERENCE_MODULE).strip()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of an outside module is reported the same way
        raise ImplementationError(
            f"{ENV_VAR}={module_name!r}: cannot import the implementation module: {type(exc).__name__}: {exc}"
        ) from exc
    for fn_name in PROTOCOL:
        attr = getattr(module, fn_name, None)
        if attr is not None and not callable(attr):
            raise ImplementationError(
                f"{ENV_VAR}={module_name!r}: {fn_name} is a {type(attr).__name__}, not a function"
            )
    impl = Implementation(module_name, module)
    if not impl.provided():
        raise ImplementationError(
            f"{ENV_VAR}={module_name!r}: the module provides none of the protocol functions "
            f"({', '.join(PROTOCOL)})"
        )
    return impl


def load_implementations(spec: str | None = None) -> tuple[Implementation, ...]:
    """The implementations named by ``spec`` (default: the :data:`ENV_VAR` variable), comma-separated.

    An unset or empty variable gives the reference alone.
    """
    text = os.environ.get(ENV_VAR, "") if spec is None else spec
    names = [part.strip() for part in text.split(",") if part.strip()] or [REFERENCE_MODULE]
    if len(set(names)) != len(names):
        raise ImplementationError(f"{ENV_VAR}={text!r} names a module twice")
    return tuple(load_implementation(n) for n in names)


@functools.cache
def reference_implementation() -> Implementation:
    """The project's functional core, the oracle for the differential checks."""
    return load_implementation(REFERENCE_MODULE)


def require(impl: Implementation, name: str) -> Callable[..., Any]:
    """The module's function ``name``; skips the calling pytest test (naming it) when it is missing."""
    if name not in PROTOCOL:
        raise ImplementationError(f"{name!r} is not a protocol function; known: {', '.join(PROTOCOL)}")
    if not impl.has(name):
        _fail_skip(f"{impl.module_name} does not provide the protocol function {name}()")
    fn: Callable[..., Any] = getattr(impl.module, name)
    return fn


def describe_implementations(impls: Sequence[Implementation]) -> str:
    """The pytest header line(s) naming the implementation(s) that ran."""
    return "\n".join(f"refusal_core implementation under test: {impl.describe()}" for impl in impls)
