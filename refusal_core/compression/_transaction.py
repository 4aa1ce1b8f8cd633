"""All-or-nothing in-place edits of a model: validate everything first, roll back on any error.

:func:`check_model_finite` is the up-front check of every compression entry
point: every floating-point parameter and buffer of the model (weights AND
biases of every linear, norms, embeddings, the head) must be finite.
:class:`ModelSnapshot` records a model's exact state — each module's
parameter and buffer objects with a bit-exact copy of their data, its
submodule objects and its train/eval flag — and :meth:`ModelSnapshot.restore`
puts all of it back, so a method that replaced ``layer 0``'s linears by
quantized modules and then failed on ``layer 1`` leaves the model as it was.
:func:`model_transaction` wraps the two: the body runs, and if it raises,
the model is restored before the error propagates. Transactions nest: inside
one, a transaction on the same model takes no second snapshot (the outer one
restores everything). :func:`transactional` makes an in-place entry point
``fn(model, ...)`` run as one transaction.

The snapshot holds one copy of every parameter and buffer on its own device
(tied parameters are copied once); that memory is the price of the guarantee.

Example:
    >>> import torch
    >>> lin = torch.nn.Linear(2, 2)
    >>> before = lin.weight.detach().clone()
    >>> try:
    ...     with model_transaction(lin):
    ...         with torch.no_grad():
    ...             _ = lin.weight.zero_()
    ...         raise RuntimeError("later failure")
    ... except RuntimeError:
    ...     pass
    >>> torch.equal(lin.weight, before)
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import torch
from torch import nn

from refusal_core.errors import NonFiniteError

__all__ = [
    "ModelSnapshot",
    "check_model_finite",
    "check_tensors_finite",
    "model_transaction",
    "transactional",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")

#: ids of the models inside a transaction now (an inner transaction on one of them is a no-op)
_ACTIVE: set[int] = set()


def _nonfinite(t: torch.Tensor) -> bool:
    if not (t.is_floating_point() or t.is_complex()) or t.device.type == "meta":
        return False
    return not bool(torch.isfinite(t.detach()).all())


def check_tensors_finite(model: nn.Module, operation: str, *, what: str = "") -> None:
    """Raise :class:`NonFiniteError` naming the first parameter or buffer of ``model`` holding NaN/inf.

    Parameters and buffers are visited in ``named_parameters`` / ``named_buffers``
    order (tied ones once); integer tensors (quantized codes) have nothing to check.
    """
    for name, p in model.named_parameters():
        if _nonfinite(p):
            raise NonFiniteError(f"{operation}: parameter {name} contains NaN or infinity{what}")
    for name, b in model.named_buffers():
        if _nonfinite(b):
            raise NonFiniteError(f"{operation}: buffer {name} contains NaN or infinity{what}")


def check_model_finite(model: nn.Module, operation: str) -> None:
    """Before an in-place edit: every floating parameter and buffer of ``model`` is finite, else raise."""
    check_tensors_finite(model, operation)


@dataclass
class _ModuleState:
    module: nn.Module
    training: bool
    children: dict[str, nn.Module | None]
    parameters: dict[str, nn.Parameter | None]
    buffers: dict[str, torch.Tensor | None]
    non_persistent: set[str]


class ModelSnapshot:
    """The exact state of a module tree, restorable bit for bit (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self._states: list[_ModuleState] = []
        self._data: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(tensor) -> (tensor, copy)
        with torch.no_grad():
            for module in model.modules():
                state = _ModuleState(
                    module=module,
                    training=module.training,
                    children=dict(module._modules),
                    parameters=dict(module._parameters),
                    buffers=dict(module._buffers),
                    non_persistent=set(module._non_persistent_buffers_set),
                )
                self._states.append(state)
                for t in (*state.parameters.values(), *state.buffers.values()):
                    if t is not None and id(t) not in self._data and t.device.type != "meta":
                        self._data[id(t)] = (t, t.detach().clone())

    def restore(self) -> None:
        """Put back every submodule, parameter and buffer object and its saved data and flags."""
        with torch.no_grad():
            for state in self._states:
                m = state.module
                m._modules.clear()
                m._modules.update(state.children)
                m._parameters.clear()
                m._parameters.update(state.parameters)
                m._buffers.clear()
                m._buffers.update(state.buffers)
                m._non_persistent_buffers_set.clear()
                m._non_persistent_buffers_set.update(state.non_persistent)
                m.training = state.training
            for tensor, saved in self._data.values():
                # ``.data =`` also undoes a dtype, shape or device change of the same object.
                tensor.data = saved


@contextmanager
def model_transaction(model: nn.Module) -> Iterator[None]:
    """Run the body on ``model``; if it raises, restore ``model`` exactly, then re-raise."""
    if id(model) in _ACTIVE:  # nested: the outer transaction's snapshot covers this one
        yield
        return
    snapshot = ModelSnapshot(model)
    _ACTIVE.add(id(model))
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise
    finally:
        _ACTIVE.discard(id(model))


def transactional(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate an in-place entry point ``fn(model, ...)``: it changes the model fully or not at all."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        model = args[0] if args else kwargs.get("model")
        if not isinstance(model, nn.Module):
            return fn(*args, **kwargs)  # the entry point's own check raises for a non-model
        with model_transaction(model):
            return fn(*args, **kwargs)

    return run
