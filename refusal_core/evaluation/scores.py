"""Refusal scores of prompts and the per-model refusal tokens they are read from.

The refusal score of a prompt (DESIGN.md) is the log-odds of the total
next-token probability of the model's refusal tokens at the last position of
the formatted prompt. Which tokens those are depends on the model family's
tokenizer and chat template: :func:`refusal_token_ids_for` derives them from
refusal phrases by tokenizing each phrase *where the model would produce it*,
right after the generation prompt, and keeping the first token.

Example:
    >>> from refusal_core.testing.tiny import tiny_model, tiny_tokenizer
    >>> model, tok = tiny_model(), tiny_tokenizer()
    >>> ids = refusal_token_ids_for(tok, ["I'm sorry", "As an AI"])
    >>> refusal_scores(model, tok, ["Tell me a story."], ids, progress=False).dtype
    torch.float64
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from refusal_core.errors import EmptyInputError, InvalidArgumentError
from refusal_core.evaluation.generation import (
    _check_positive_int,
    eval_mode,
    forward_last_logits,
)
from refusal_core.functional import refusal_score
from refusal_core.model import check_instructions, encode_prompts, format_prompt, pad_token_id

__all__ = [
    "REFUSAL_OPENINGS",
    "continuation_token_ids",
    "refusal_scores",
    "refusal_token_ids_for",
]

#: Openings a chat model typically starts a refusal with. Their first tokens
#: (per tokenizer) are the default refusal tokens; pass your own list for a
#: family whose refusals start differently.
REFUSAL_OPENINGS: tuple[str, ...] = (
    "I'm sorry",
    "I am sorry",
    "I cannot",
    "I can't",
    "I apologize",
    "As an AI",
    "Sorry",
    "Unfortunately",
)


def continuation_token_ids(tokenizer: Any, continuation: str, *, system: str | None = None) -> list[int]:
    """Token ids of ``continuation`` as it would be tokenized right after the generation prompt.

    The continuation is appended to a formatted probe prompt; when the prompt's
    own tokens are an exact prefix of the joint tokenization, the rest is the
    answer (so SentencePiece's word-start marker and byte-level spaces come out
    as the model would emit them). When the boundary merges, the continuation
    is tokenized alone.
    """
    if not isinstance(continuation, str) or not continuation:
        raise InvalidArgumentError(f"continuation must be a non-empty str, got {continuation!r}")
    prompt = format_prompt(tokenizer, "Hello.", system)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    joint = list(tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"])
    if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        return joint[len(prompt_ids) :]
    return list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def refusal_token_ids_for(
    tokenizer: Any,
    phrases: Sequence[str] = REFUSAL_OPENINGS,
    *,
    system: str | None = None,
    include_standalone: bool = False,
) -> list[int]:
    """Sorted unique first tokens of refusal ``phrases`` for this tokenizer and chat template.

    Each phrase is tokenized in context (:func:`continuation_token_ids`); its
    first token that is not whitespace alone and not a special token counts.
    ``include_standalone`` also adds the first token of the phrase tokenized on
    its own, for templates after which models start with or without a space.
    """
    if isinstance(phrases, str) or not isinstance(phrases, Sequence) or not phrases:
        raise EmptyInputError("phrases must be a non-empty sequence of str")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    found: set[int] = set()
    for i, phrase in enumerate(phrases):
        if not isinstance(phrase, str) or not phrase.strip():
            raise InvalidArgumentError(f"phrases[{i}] must be a non-blank str, got {phrase!r}")
        variants = [continuation_token_ids(tokenizer, phrase, system=system)]
        if include_standalone:
            variants.append(list(tokenizer(phrase, add_special_tokens=False)["input_ids"]))
        for ids in variants:
            for t in ids:
                # Skip a bare word-start marker or space token: it carries no refusal signal.
                if t not in special and tokenizer.decode([t]).strip():
                    found.add(int(t))
                    break
    if not found:
        raise EmptyInputError(f"no refusal token could be derived from phrases {list(phrases)!r}")
    return sorted(found)


def _vocab_size(model: nn.Module) -> int:
    """Rows of the output head (the logits' width), else the config's vocab size."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    config: Any = getattr(model, "config", None)
    return int(config.vocab_size)


def refusal_scores(
    model: nn.Module,
    tokenizer: Any,
    instructions: Sequence[str],
    refusal_token_ids: Sequence[int],
    *,
    system: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """Refusal score of each instruction, ``[n]`` float64 (log-odds, nats).

    One forward pass per batch of left-padded formatted prompts; the logits at
    the last position go through :func:`refusal_core.functional.refusal_score`.
    Hooks installed on ``model`` (ablation, addition) act as usual, which is how
    direction selection scores its candidates.
    """
    items = check_instructions(instructions)
    batch_size = _check_positive_int(batch_size, "batch_size")
    ids = torch.as_tensor(list(refusal_token_ids), dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise EmptyInputError("refusal_token_ids is empty")
    vocab = _vocab_size(model)
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise InvalidArgumentError(f"refusal_token_ids must lie in [0, {vocab}), got {ids.tolist()}")
    prompts = encode_prompts(tokenizer, items, system=system)
    pad_id = pad_token_id(tokenizer)
    # Longest first, so each batch pads little; the order is restored below.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    scores = torch.empty(len(prompts), dtype=torch.float64)
    with eval_mode(model):
        for start in tqdm(range(0, len(order), batch_size), desc="refusal scores", disable=not progress):
            idx = order[start : start + batch_size]
            logits = forward_last_logits(model, [prompts[i] for i in idx], pad_id)
            scores[idx] = refusal_score(logits, ids).cpu()
    return scores
