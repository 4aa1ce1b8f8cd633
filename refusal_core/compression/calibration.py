"""Calibration data and the sequential walk over decoder blocks.

Wanda and AWQ calibrate block ``l`` on the outputs of blocks ``0..l-1`` *as
already compressed*. :class:`SequentialBlocks` does this in O(L) block
forwards: one ordinary model forward per calibration batch records the hidden
states entering block 0 and the keyword arguments every block receives (masks,
rotary embeddings, position ids: they depend on the tokens only), then blocks
are run one at a time. Per block, :meth:`SequentialBlocks.collect` feeds the
inputs of chosen linears (real tokens only, padding removed) to a callback
and can record whole calls of chosen modules (:class:`RecordedCall`, e.g. the
attention with its masks and rotary embeddings, which AWQ replays with
candidate weights), and :meth:`SequentialBlocks.advance` replaces the stored
hidden states by the block's output with its current (compressed) weights.

Calibration input may be given as

- a 2-D integer tensor ``[n, T]`` of token ids (no padding),
- a pair ``(input_ids, attention_mask)`` of ``[n, T]`` tensors (1 = token, 0 = padding),
- a mapping with ``"input_ids"`` and optionally ``"attention_mask"`` (a tokenizer's output),
- a list of token-id lists (or 1-D integer tensors) of any lengths (left-padded here).

Positions are counted from the first real token (``cumsum(mask) − 1``), so a
left-padded sequence sees the same positions as it would alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from refusal_core._finite import all_finite
from refusal_core.errors import EmptyInputError, InvalidArgumentError, NonFiniteError, ShapeMismatchError
from refusal_core.model import ModelLayout

__all__ = [
    "Calibration",
    "CalibrationBatch",
    "RecordedCall",
    "SequentialBlocks",
    "prepare_calibration",
]

#: Anything :func:`prepare_calibration` accepts.
Calibration: TypeAlias = (
    torch.Tensor
    | tuple[torch.Tensor, torch.Tensor]
    | Mapping[str, Any]
    | Sequence[Sequence[int]]
    | Sequence[torch.Tensor]
)


@dataclass(frozen=True)
class CalibrationBatch:
    """One batch of calibration sequences: ``input_ids`` and ``attention_mask``, both ``[B, T]`` long."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def token_mask(self) -> torch.Tensor:
        """``[B, T]`` bool, True at real tokens."""
        return self.attention_mask.bool()

    @property
    def position_ids(self) -> torch.Tensor:
        """``[B, T]`` positions counted from each sequence's first real token."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass(frozen=True)
class RecordedCall:
    """One call of a module inside a block, kept so it can be run again with other weights.

    ``args``/``kwargs`` are exactly what the module received (hidden states,
    attention mask, rotary embeddings, ...), ``output`` its first output
    ``[B, T, out]`` and ``token_mask`` ``[B, T]`` bool the real tokens of the batch.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: torch.Tensor
    token_mask: torch.Tensor

    def replay(self, module: nn.Module) -> torch.Tensor:
        """``module``'s first output for the recorded arguments, at the real tokens: ``[tokens, out]``."""
        return _first_output(module(*self.args, **self.kwargs))[self.token_mask]


def _first_output(out: Any) -> torch.Tensor:
    # Attention modules return (output, weights); blocks return a tensor (transformers 5) or a tuple.
    if isinstance(out, tuple):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise InvalidArgumentError(f"a module returned {type(out).__name__}, expected a tensor")
    return out


def _as_id_tensor(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise InvalidArgumentError(f"{name} must hold integers, got {value.dtype}")
    if value.ndim != 2:
        raise ShapeMismatchError(f"{name} must be 2-D [sequences, tokens], got shape {tuple(value.shape)}")
    return value.detach().to(torch.long)


def _from_lists(seqs: Sequence[Sequence[int] | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    rows: list[list[int]] = []
    for i, seq in enumerate(seqs):
        if isinstance(seq, torch.Tensor) and seq.ndim == 1 and not seq.is_floating_point():
            seq = [int(t) for t in seq.tolist()]
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise InvalidArgumentError(
                f"calibration[{i}] must be a list of token ids, got {type(seq).__name__} "
                "(tokenize text before passing it)"
            )
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in seq):
            raise InvalidArgumentError(f"calibration[{i}] holds a value that is not an int token id")
        rows.append(list(seq))
    width = max((len(r) for r in rows), default=0)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:  # left padding, as for generation
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def prepare_calibration(
    calibration: Calibration | None,
    *,
    vocab_size: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> list[CalibrationBatch]:
    """Validate calibration input (see the module docstring) and split it into batches.

    Raises :class:`EmptyInputError` for no sequences or a sequence without
    tokens, :class:`InvalidArgumentError` for ids outside ``[0, vocab_size)``
    or a mask that is not 0/1, :class:`ShapeMismatchError` for a mask whose
    shape differs from the ids'.
    """
    if calibration is None:
        raise EmptyInputError("calibration is required by this method (token ids of calibration text)")
    batch_size = int(batch_size)
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    mask: torch.Tensor | None
    if isinstance(calibration, torch.Tensor):
        ids, mask = _as_id_tensor(calibration, "calibration"), None
    elif (
        isinstance(calibration, tuple) and len(calibration) == 2 and isinstance(calibration[0], torch.Tensor)
    ):
        ids = _as_id_tensor(calibration[0], "calibration input_ids")
        mask = _as_id_tensor(calibration[1], "calibration attention_mask")
    elif isinstance(calibration, Mapping):
        if "input_ids" not in calibration:
            raise InvalidArgumentError("calibration mapping has no 'input_ids'")
        ids = _as_id_tensor(torch.as_tensor(calibration["input_ids"]), "calibration input_ids")
        raw_mask = calibration.get("attention_mask")
        mask = (
            None
            if raw_mask is None
            else _as_id_tensor(torch.as_tensor(raw_mask), "calibration attention_mask")
        )
    elif isinstance(calibration, Sequence) and not isinstance(calibration, (str, bytes)):
        ids, mask = _from_lists(cast(Sequence[Sequence[int] | torch.Tensor], calibration))
    else:
        raise InvalidArgumentError(
            f"calibration must be token ids (tensor, (ids, mask), mapping or list of lists), "
            f"got {type(calibration).__name__}"
        )
    if mask is None:
        mask = torch.ones_like(ids)
    if mask.shape != ids.shape:
        raise ShapeMismatchError(
            f"calibration attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}"
        )
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise EmptyInputError(f"calibration holds no tokens (shape {tuple(ids.shape)})")
    if bool(((mask != 0) & (mask != 1)).any()):
        raise InvalidArgumentError("calibration attention_mask must hold only 0 and 1")
    empty = (mask.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise EmptyInputError(f"calibration sequence(s) {empty[:10]} have no tokens (all padding)")
    real = ids[mask.bool()]
    if bool((real < 0).any()) or (vocab_size is not None and bool((real >= vocab_size).any())):
        bad = real[(real < 0) | (real >= (vocab_size or 2**62))][:5].tolist()
        raise InvalidArgumentError(f"calibration token ids must lie in [0, {vocab_size}), got e.g. {bad}")
    # Padding positions still go through the embedding: give them a valid id (their outputs are ignored).
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    return [
        CalibrationBatch(ids[i : i + batch_size].to(device), mask[i : i + batch_size].to(device))
        for i in range(0, ids.shape[0], batch_size)
    ]


class _StopForwardError(Exception):
    """Raised by a hook to end a forward pass early; never leaves this module."""


@contextmanager
def _hooks(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    """Remove every hook when the block exits, also through an exception."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _zero_padding(hidden: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """``hidden [B, T, d]`` with the padding rows set to 0.

    A padding query that may attend to nothing gets NaN from the softmax in
    some attention implementations (eager float64 in transformers 5); real
    tokens give such keys weight exactly 0, but ``0 · NaN`` is NaN. Real-token
    outputs do not depend on the padding rows' values otherwise, so zeroing them
    changes nothing else.
    """
    return torch.where(
        token_mask.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)
    )


class SequentialBlocks:
    """Hidden states of calibration batches, advanced block by block through a model.

    Construction runs one model forward per batch (stopped before the last
    block) to record the block-0 inputs and each block's keyword arguments,
    and checks the activations entering every block for NaN/inf (at real
    tokens) so a bad model or calibration set fails before anything is changed.
    Block outputs at padding positions are set to 0 (see :func:`_zero_padding`).
    Memory: ``tokens × d_model`` hidden states plus the shared masks.
    """

    def __init__(
        self, layout: ModelLayout, batches: Sequence[CalibrationBatch], *, progress: bool = False
    ) -> None:
        if not batches:
            raise EmptyInputError("calibration holds no batches")
        self.layout = layout
        self.batches = list(batches)
        self.progress = progress
        self.hidden: list[torch.Tensor] = []
        self.block_args: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = [[] for _ in layout.blocks]
        n = layout.n_layers
        for b, batch in enumerate(self.batches):
            handles = [
                block.register_forward_pre_hook(
                    self._recorder(layer, b, last=layer == n - 1), with_kwargs=True
                )
                for layer, block in enumerate(layout.blocks)
            ]
            handles += [block.register_forward_hook(self._padding_zeroer(batch)) for block in layout.blocks]
            with _hooks(handles), torch.no_grad(), suppress(_StopForwardError):
                layout.model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    use_cache=False,
                )
            if len(self.hidden) != b + 1 or any(len(a) != b + 1 for a in self.block_args):
                raise InvalidArgumentError("the model's forward did not call every decoder block once")

    @classmethod
    def from_calibration(
        cls, layout: ModelLayout, calibration: Calibration | None, *, batch_size: int, progress: bool = False
    ) -> SequentialBlocks:
        """The runner over ``calibration`` batched for ``layout``'s model: checked against its
        vocabulary, on its embedding's device (:func:`prepare_calibration`)."""
        batches = prepare_calibration(
            calibration,
            vocab_size=int(layout.embedding.weight.shape[0]),
            batch_size=batch_size,
            device=layout.embedding.weight.device,
        )
        return cls(layout, batches, progress=progress)

    def _recorder(self, layer: int, b: int, *, last: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            kwargs = dict(kwargs)
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            if not all_finite(hidden[self.batches[b].token_mask]):
                raise NonFiniteError(f"calibration activations entering block {layer} contain NaN or inf")
            if layer == 0:
                self.hidden.append(hidden.detach())
            self.block_args[layer].append((rest, kwargs))
            if last:
                raise _StopForwardError

        return hook

    @staticmethod
    def _padding_zeroer(batch: CalibrationBatch) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if isinstance(output, tuple):
                return (_zero_padding(output[0], batch.token_mask), *output[1:])
            return _zero_padding(output, batch.token_mask)

        return hook

    @property
    def n_tokens(self) -> int:
        """Number of real (non-padding) calibration tokens."""
        return sum(batch.n_tokens for batch in self.batches)

    def _run(self, layer: int, b: int) -> torch.Tensor:
        rest, kwargs = self.block_args[layer][b]
        out = _first_output(self.layout.blocks[layer](self.hidden[b], *rest, **kwargs))
        return _zero_padding(out, self.batches[b].token_mask)

    def collect(
        self,
        layer: int,
        modules: Mapping[str, nn.Module],
        on_input: Callable[[str, torch.Tensor], None],
        *,
        record: Mapping[str, nn.Module] | None = None,
    ) -> dict[str, list[RecordedCall]]:
        """Run block ``layer`` on every batch; ``on_input(name, x [tokens, in])`` gets each module's input.

        Only real tokens reach ``on_input`` (padding rows are dropped). The
        modules named in ``record`` (submodules of the block) have every call
        kept as a :class:`RecordedCall`, one per batch, returned by name. The
        stored hidden states are not advanced.
        """
        current: dict[str, torch.Tensor] = {}
        calls: dict[str, list[RecordedCall]] = {name: [] for name in record or {}}

        def make_hook(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                x, mask = args[0], current["mask"]
                if x.ndim == mask.ndim:  # fed the flattened tokens [B·T, in] (an MoE block's shared expert)
                    mask = mask.reshape(-1)
                on_input(name, x[mask].detach())

            return hook

        def make_recorder(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
                calls[name].append(
                    RecordedCall(tuple(args), dict(kwargs), _first_output(output).detach(), current["mask"])
                )

            return hook

        handles = [m.register_forward_hook(make_hook(name)) for name, m in modules.items()]
        handles += [
            m.register_forward_hook(make_recorder(name), with_kwargs=True)
            for name, m in (record or {}).items()
        ]
        with _hooks(handles), torch.no_grad():
            for b, batch in enumerate(self.batches):
                current["mask"] = batch.token_mask
                self._run(layer, b)
        return calls

    def advance(self, layer: int) -> None:
        """Replace the stored hidden states by block ``layer``'s outputs (with its current weights)."""
        with torch.no_grad():
            for b in range(len(self.batches)):
                self.hidden[b] = self._run(layer, b).detach()

    def layers(self, desc: str) -> Iterator[int]:
        """The block indices in order, with a progress bar when enabled."""
        yield from tqdm(range(self.layout.n_layers), desc=desc, disable=not self.progress, leave=False)
