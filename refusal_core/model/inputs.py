"""Feeding a model its inputs: instructions, the chat template, token ids, padding, positions, device.

Every caller that turns instructions into model inputs goes through here
(activation capture, selection, generation, scores, attacks, damage):

1. :func:`check_instructions`: a sequence of str, not empty;
2. :func:`format_prompt`: the instruction in the tokenizer's chat template
   with the generation prompt (the template carries BOS, so no extra special
   tokens are added when tokenizing);
3. :func:`encode_prompts`: the token ids, with an optional adversarial suffix,
   checked to end in the template's :func:`post_instruction_tokens` wherever
   those positions are read (an instruction whose last characters merge with
   the template is refused rather than read at the wrong positions);
4. :func:`left_pad` / :func:`batch_inputs`: LEFT padding, so the last columns
   of every row are real tokens, with an attention mask and position ids that
   count real tokens only (:func:`positions`), placed on :func:`model_device`.

Example:
    >>> from refusal_core.testing.tiny import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> ids = encode_prompts(tok, ["Hi", "Tell me a story."])
    >>> batch = batch_inputs(ids, pad_token_id(tok))
    >>> batch["input_ids"].shape[0], batch["position_ids"][0, -1].item() == len(ids[0]) - 1
    (2, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from refusal_core.errors import EmptyInputError, InvalidArgumentError

__all__ = [
    "Suffix",
    "batch_inputs",
    "check_instructions",
    "device_label",
    "encode_prompts",
    "format_prompt",
    "left_pad",
    "model_device",
    "pad_token_id",
    "positions",
    "post_instruction_tokens",
]

#: An adversarial suffix: text (appended to the instruction after one space) or
#: token ids (inserted verbatim right before the post-instruction template tokens).
Suffix = str | Sequence[int]


def check_instructions(instructions: object, name: str = "instructions") -> list[str]:
    """``instructions`` as a list of str; a bare str or an empty collection is rejected."""
    if isinstance(instructions, str) or not isinstance(instructions, Sequence):
        raise InvalidArgumentError(
            f"{name} must be a sequence of str (not a single str), got {type(instructions).__name__}"
        )
    out = list(instructions)
    if not out:
        raise EmptyInputError(f"{name} is empty; at least one prompt is needed")
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise InvalidArgumentError(f"{name}[{i}] must be a str, got {type(s).__name__}")
    return out


# ----------------------------------------------------------------------------
# the chat template
# ----------------------------------------------------------------------------

_SENTINEL = "\x00REFUSAL_CORE_INSTRUCTION\x00"


def format_prompt(tokenizer: Any, instruction: str, system: str | None = None) -> str:
    """The instruction wrapped in the tokenizer's chat template, ready for generation."""
    if not isinstance(instruction, str):
        raise InvalidArgumentError(f"instruction must be a str, got {type(instruction).__name__}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidArgumentError(
            "tokenizer has no chat_template; refusal_core needs one to format prompts: give one with "
            "load_model(..., chat_template=FILE_OR_STRING)"
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": instruction}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(text)


def post_instruction_tokens(tokenizer: Any, system: str | None = None) -> list[int]:
    """Token ids of the chat template that follow the user's message.

    Rendered with a sentinel instruction; the text after it is tokenized alone
    and checked to tokenize identically at the end of a real prompt. These are
    positions ``-P..-1`` of every formatted prompt.
    """
    text = format_prompt(tokenizer, _SENTINEL, system)
    if text.count(_SENTINEL) != 1:
        raise InvalidArgumentError("chat template does not place the instruction exactly once")
    suffix = text.split(_SENTINEL, 1)[1]
    ids = list(tokenizer(suffix, add_special_tokens=False)["input_ids"])
    if not ids:
        raise EmptyInputError("chat template puts no tokens after the instruction; nothing to read")
    probe = list(
        tokenizer(format_prompt(tokenizer, "Tell me a story.", system), add_special_tokens=False)["input_ids"]
    )
    if probe[-len(ids) :] != ids:
        raise InvalidArgumentError(
            "the post-instruction suffix tokenizes differently inside a prompt; cannot locate positions"
        )
    return ids


def encode_prompts(
    tokenizer: Any,
    instructions: Sequence[str],
    *,
    system: str | None = None,
    suffixes: Sequence[Suffix | None] | None = None,
    require_post_instruction: bool = False,
) -> list[list[int]]:
    """Token ids of each instruction in the chat template (templates carry BOS: no extra specials).

    ``suffixes`` (one per instruction, ``None`` for none): a ``str`` is appended
    to the instruction text after one space before formatting; a sequence of
    ints is inserted as tokens between the instruction and the post-instruction
    template tokens, the exact layout GCG optimises.

    A prompt must end in :func:`post_instruction_tokens` where those positions
    matter: always with ``require_post_instruction`` (activation capture and
    selection read them), and for a token suffix (which goes right before
    them). An instruction whose last characters merge with the template when
    tokenized then raises :class:`~refusal_core.errors.InvalidArgumentError`.
    """
    items = check_instructions(instructions)
    if suffixes is not None:
        if isinstance(suffixes, str) or not isinstance(suffixes, Sequence):
            raise InvalidArgumentError(
                f"suffixes must be a sequence with one suffix per instruction, got {type(suffixes).__name__}"
            )
        if len(suffixes) != len(items):
            raise InvalidArgumentError(
                f"suffixes has {len(suffixes)} entries but there are {len(items)} instructions"
            )
    if not isinstance(require_post_instruction, bool):
        raise InvalidArgumentError(
            f"require_post_instruction must be a bool, got {require_post_instruction!r}"
        )
    post = post_instruction_tokens(tokenizer, system) if require_post_instruction else None
    out: list[list[int]] = []
    for i, instruction in enumerate(items):
        suffix = None if suffixes is None else suffixes[i]
        if isinstance(suffix, str):
            instruction = f"{instruction} {suffix}" if suffix else instruction
            suffix = None
        if suffix is not None:
            if isinstance(suffix, torch.Tensor):
                suffix = suffix.tolist()
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in suffix):
                raise InvalidArgumentError(f"suffixes[{i}] must be a str or a sequence of int token ids")
        ids = list(
            tokenizer(format_prompt(tokenizer, instruction, system), add_special_tokens=False)["input_ids"]
        )
        if suffix is not None or post is not None:
            if post is None:
                post = post_instruction_tokens(tokenizer, system)
            n_post = len(post)
            if ids[-n_post:] != post:
                raise InvalidArgumentError(
                    f"instructions[{i}] merges with the chat template when tokenized (it does not end in "
                    f"the post-instruction tokens {post}, its tail is {ids[-n_post:]}), so the "
                    f"post-instruction positions cannot be located: {instruction[-40:]!r}"
                )
            if suffix is not None:
                ids = ids[:-n_post] + list(suffix) + ids[-n_post:]
        out.append(ids)
    return out


# ----------------------------------------------------------------------------
# padding, positions, device
# ----------------------------------------------------------------------------


def pad_token_id(tokenizer: Any) -> int:
    """The id used for (masked) padding: the tokenizer's pad token, else its eos token."""
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    if pid is None:
        raise InvalidArgumentError("tokenizer has neither a pad_token_id nor an eos_token_id to pad with")
    return int(pid)


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``input_ids [B, T]`` and ``attention_mask [B, T]`` (long, 1 = real)."""
    if not sequences:
        raise EmptyInputError("sequences is empty")
    width = max(len(s) for s in sequences)
    if width == 0:
        raise EmptyInputError("every sequence is empty; nothing to run the model on")
    ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    if device is None:
        return ids, mask
    return ids.to(device), mask.to(device)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, T]`` that count real tokens only (``cumsum − 1``; pads get 0).

    A left-padded prompt so sees exactly the positions it would see alone.
    """
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def batch_inputs(
    token_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids``, ``attention_mask`` and ``position_ids``, each ``[B, T]``, on ``device``.

    Keyword arguments for a forward pass (:func:`left_pad` and :func:`positions`).
    """
    input_ids, mask = left_pad(token_ids, pad_id, device)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions(mask)}


def model_device(model: nn.Module) -> torch.device:
    """Where inputs go: the device of the model's first parameter (CPU for a parameterless module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def device_label(model: nn.Module) -> str:
    """Where the model's parameters live: ``"cpu"``, ``"cuda:0"``, or a sorted comma list when split."""
    devices = sorted({str(p.device) for p in model.parameters()})
    return ",".join(devices) if devices else "cpu"
