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
A model whose tensors exceed :data:`SPILL_THRESHOLD_BYTES` (1 GiB; the
environment variable ``REFUSAL_CORE_SNAPSHOT_SPILL_BYTES`` overrides it) is
snapshotted to a temporary file instead (``torch.save`` of the live tensors,
written storage by storage, read back on restore), so compressing a
1.5 B-parameter model does not hold a second 7 GB float32 copy in memory while
keeping the same bit-exact rollback; the file is deleted when the transaction
ends.

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

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import torch
from torch import nn

from refusal_core._finite import all_finite
from refusal_core.errors import NonFiniteError

__all__ = [
    "SPILL_THRESHOLD_BYTES",
    "ModelSnapshot",
    "check_model_finite",
    "check_tensors_finite",
    "model_transaction",
    "scoped_edit",
    "transactional",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")

#: ids of the models inside a transaction now (an inner transaction on one of them is a no-op)
_ACTIVE: set[int] = set()

#: Models holding more tensor bytes than this are snapshotted to a temporary file, not to memory.
SPILL_THRESHOLD_BYTES = 1 << 30


def _spill_threshold() -> int:
    env = os.environ.get("REFUSAL_CORE_SNAPSHOT_SPILL_BYTES", "").strip()
    return int(env) if env else SPILL_THRESHOLD_BYTES


def _tensor_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen and t.device.type != "meta":
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _nonfinite(t: torch.Tensor) -> bool:
    return not all_finite(t)  # integer codes and meta tensors count as finite


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
    """The exact state of a module tree, restorable bit for bit (see the module docstring).

    With ``spill_dir`` the tensor data goes to a file in that directory instead of memory copies.
    """

    def __init__(self, model: nn.Module, spill_dir: str | os.PathLike[str] | None = None) -> None:
        self._states: list[_ModuleState] = []
        self._data: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(tensor) -> (tensor, copy)
        self._spilled: dict[int, tuple[torch.Tensor, str, torch.device]] = {}  # id -> (tensor, key, device)
        self._spill_file: str | None = None
        live: dict[str, torch.Tensor] = {}
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
                    if t is None or t.device.type == "meta" or id(t) in self._data or id(t) in self._spilled:
                        continue
                    if spill_dir is None:
                        self._data[id(t)] = (t, t.detach().clone())
                    else:
                        key = str(len(live))
                        live[key] = t.detach().cpu()  # the live tensor itself on CPU: no copy in memory
                        self._spilled[id(t)] = (t, key, t.device)
        if spill_dir is not None:
            # torch.save writes storage by storage, so the snapshot never holds a second copy in memory.
            fd, path = tempfile.mkstemp(prefix="snapshot_", suffix=".pt", dir=spill_dir)
            os.close(fd)
            torch.save(live, path)
            self._spill_file = path

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
            if self._spill_file is not None:
                stored = torch.load(self._spill_file, mmap=True, weights_only=True)
                for tensor, key, device in self._spilled.values():
                    tensor.data = stored[key].to(device=device, copy=True)
                del stored


@contextlib.contextmanager
def model_transaction(model: nn.Module) -> Iterator[None]:
    """Run the body on ``model``; if it raises, restore ``model`` exactly, then re-raise."""
    if id(model) in _ACTIVE:  # nested: the outer transaction's snapshot covers this one
        yield
        return
    with contextlib.ExitStack() as stack:
        spill_dir = None
        if _tensor_bytes(model) > _spill_threshold():
            spill_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="refusal_core_snapshot_"))
        snapshot = ModelSnapshot(model, spill_dir=spill_dir)
        _ACTIVE.add(id(model))
        try:
            yield
        except BaseException:
            snapshot.restore()
            raise
        finally:
            _ACTIVE.discard(id(model))


@contextlib.contextmanager
def scoped_edit(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Let the body change ``modules`` in place for its duration only: on exit, whether it returned
    or raised, every one is restored exactly (submodules, parameters, buffers, data and flags).

    Costs one copy of ``modules``' tensors (a block or two, not the model): the study's AIRD sweep
    scores each strength on the compressed model itself instead of a deep copy of it.
    """
    snapshots = [ModelSnapshot(m) for m in modules]
    try:
        yield
    finally:
        for snapshot in reversed(snapshots):
            snapshot.restore()


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
