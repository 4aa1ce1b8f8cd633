"""Activation capture: the residual stream at every block input, at the post-instruction positions.

The site is ``resid_pre`` of block ``l`` (the hidden states the decoder block
receives, ``l = 0..L-1``) at the last ``P`` tokens of each formatted prompt,
the chat template's post-instruction tokens (positions ``-P..-1``). Prompts are
encoded and batched by :mod:`refusal_core.model.inputs` (the chat template,
LEFT padding so the last ``P`` columns of every row are real tokens, an
attention mask and mask-derived position ids) and run through the base model
(no ``lm_head``).

Means are accumulated in float64 while streaming: memory is
``O(n_groups·L·P·d)`` whatever the number of prompts.

Example:
    >>> from refusal_core.testing.tiny import tiny_model, tiny_tokenizer
    >>> model, tok = tiny_model("llama"), tiny_tokenizer()
    >>> mean_activations(model, tok, ["Tell me a story.", "Write a poem."]).shape
    torch.Size([2, 2, 32])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from refusal_core._finite import all_finite
from refusal_core.errors import (
    EmptyInputError,
    InvalidArgumentError,
    NonFiniteError,
    ShapeMismatchError,
)
from refusal_core.model import (
    batch_inputs,
    check_instructions,
    encode_prompts,
    get_layout,
    model_device,
    pad_token_id,
    post_instruction_tokens,
)

__all__ = [
    "block_input",
    "mean_activations",
]


def block_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The ``hidden_states`` a decoder block was called with, positional or keyword."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise InvalidArgumentError("decoder block was called without a hidden_states tensor")
    return hidden


def _membership(groups: torch.Tensor | None, n_groups: int, n: int) -> torch.Tensor:
    """A bool matrix ``[n, n_groups]``: entry (i, g) is True when prompt i belongs to group g."""
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
        raise InvalidArgumentError(f"n_groups must be a positive int, got {n_groups!r}")
    if groups is None:
        if n_groups != 1:
            raise InvalidArgumentError(f"n_groups is {n_groups} but no groups were given")
        return torch.ones((n, 1), dtype=torch.bool)
    if not isinstance(groups, torch.Tensor):
        raise InvalidArgumentError(f"groups must be a torch.Tensor, got {type(groups).__name__}")
    if groups.ndim == 1:
        if groups.dtype.is_floating_point or groups.dtype == torch.bool:
            raise InvalidArgumentError(f"a 1-D groups must hold integer group indices, got {groups.dtype}")
        if groups.shape[0] != n:
            raise ShapeMismatchError(f"groups has {groups.shape[0]} entries but there are {n} instructions")
        g = groups.to(torch.long).cpu()
        if n and (int(g.min()) < 0 or int(g.max()) >= n_groups):
            raise InvalidArgumentError(
                f"groups must lie in [0, {n_groups}), got values {g.unique().tolist()}"
            )
        member = torch.zeros((n, n_groups), dtype=torch.bool)
        member[torch.arange(n), g] = True
    elif groups.ndim == 2:
        if groups.dtype != torch.bool:
            raise InvalidArgumentError(f"a 2-D groups must be a bool membership matrix, got {groups.dtype}")
        if tuple(groups.shape) != (n, n_groups):
            raise ShapeMismatchError(
                f"groups has shape {tuple(groups.shape)} but [n_instructions, n_groups] = {(n, n_groups)}"
            )
        member = groups.cpu().clone()
    else:
        raise ShapeMismatchError(f"groups must be 1-D (indices) or 2-D (membership), got {groups.ndim}-D")
    empty = (~member.any(0)).nonzero().flatten().tolist()
    if empty:
        raise EmptyInputError(f"groups {empty} contain no prompts; their mean is undefined")
    return member


def mean_activations(
    model: nn.Module,
    tokenizer: Any,
    instructions: Sequence[str],
    *,
    batch_size: int = 16,
    system: str | None = None,
    groups: torch.Tensor | None = None,
    n_groups: int = 1,
    progress: bool = False,
) -> torch.Tensor:
    """Mean block-input activations at the post-instruction positions, float64 on the CPU.

    Returns ``[L, P, d]`` (``groups`` None) or ``[n_groups, L, P, d]``: entry
    ``[g, l, p]`` is the mean over the prompts of group ``g`` of the residual
    stream entering block ``l`` at position ``p − P`` (``p = 0`` is position
    ``-P``). ``groups`` is either ``[n]`` integer group indices or an
    ``[n, n_groups]`` bool membership matrix (a prompt may then count in several
    groups, which lets several random splits share one forward pass). Every
    group needs at least one prompt.

    Raises :class:`EmptyInputError` for no prompts, :class:`NonFiniteError`
    when an activation is NaN or infinite. Hooks are removed on every exit.
    """
    texts = check_instructions(instructions)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
    member = _membership(groups, n_groups, len(texts))
    layout = get_layout(model)
    pad_id = pad_token_id(tokenizer)
    encoded = encode_prompts(tokenizer, texts, system=system, require_post_instruction=True)
    n_pos = len(post_instruction_tokens(tokenizer, system))
    n_layers, d = layout.n_layers, layout.d_model
    sums = torch.zeros((member.shape[1], n_layers, n_pos, d), dtype=torch.float64)
    counts = member.sum(0).to(torch.float64)
    device = model_device(model)
    # Similar lengths share a batch (less padding); the mean does not depend on order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))

    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            # Left padding: the last n_pos columns are the real post-instruction tokens.
            captured[layer] = block_input(args, kwargs)[:, -n_pos:, :].detach().to("cpu", torch.float64)

        return hook

    handles = [
        block.register_forward_pre_hook(make_hook(layer), with_kwargs=True)
        for layer, block in enumerate(layout.blocks)
    ]
    try:
        with torch.inference_mode():
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc="activations", disable=not progress, unit="batch"):
                idx = order[start : start + batch_size]
                batch = batch_inputs([encoded[i] for i in idx], pad_id, device)
                captured.clear()
                layout.inner(**batch, use_cache=False)
                if len(captured) != n_layers:
                    raise InvalidArgumentError(
                        f"captured {len(captured)} of {n_layers} block inputs; the model skipped blocks"
                    )
                acts = torch.stack([captured[layer] for layer in range(n_layers)], dim=1)  # [B, L, P, d]
                if not all_finite(acts):
                    bad = (~torch.isfinite(acts)).flatten(1).any(1).nonzero().flatten().tolist()
                    raise NonFiniteError(
                        f"activations of instructions {[idx[b] for b in bad]} contain NaN or infinity"
                    )
                weights = member[idx].to(torch.float64)  # [B, G]
                sums += torch.einsum("bg,blpd->glpd", weights, acts)
    finally:
        for h in handles:
            h.remove()
        captured.clear()
    means = sums / counts.view(-1, 1, 1, 1)
    return means[0] if groups is None else means
