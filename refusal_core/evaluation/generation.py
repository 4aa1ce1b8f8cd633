"""Batched text generation with left padding and a KV cache.

The decoding loop is written here rather than delegated to ``model.generate``
for two reasons: sampling draws from a caller-owned :class:`torch.Generator`
(so a seed makes a sampled run reproducible to the bit on CPU, independent of
the global RNG), and the same loop serves greedy decoding, the decoding
attack's sampling grid and GCG's suffixes.

Left padding keeps the last real token of every prompt in the last column, so
one forward pass per step serves the whole batch. Position ids are computed
from the attention mask (``cumsum − 1``), so a padded prompt sees exactly the
positions it would see alone; padded keys are masked out. Batched greedy
output therefore equals one-at-a-time greedy output (up to float rounding of
the padded matmuls, which the tests check does not change a token on the tiny
models).

Example:
    >>> from refusal_core.testing.tiny import tiny_model, tiny_tokenizer
    >>> model, tok = tiny_model(), tiny_tokenizer()
    >>> out = generate(model, tok, ["Tell me a story."], max_new_tokens=4, progress=False)
    >>> len(out)
    1
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from refusal_core.errors import EmptyInputError, InvalidArgumentError
from refusal_core.models import format_prompt, post_instruction_tokens

__all__ = [
    "SamplingConfig",
    "Suffix",
    "encode_prompts",
    "eos_token_ids",
    "eval_mode",
    "filter_logits",
    "forward_last_logits",
    "generate",
    "generate_ids",
    "left_pad",
    "model_device",
    "pad_token_id",
]

#: An adversarial suffix: text (appended to the instruction after one space) or
#: token ids (inserted verbatim right before the post-instruction template tokens).
Suffix = str | Sequence[int]


@dataclass(frozen=True)
class SamplingConfig:
    """Ancestral sampling settings; the filters apply in the order temperature, top-k, top-p.

    ``temperature > 0`` divides the logits; ``top_k = 0`` disables the top-k
    filter (otherwise every token whose logit is below the k-th largest is
    removed, so ties at the threshold are kept); ``top_p`` in ``(0, 1]`` keeps
    the smallest prefix of the sorted distribution whose mass reaches
    ``top_p`` (the most likely token is always kept). ``top_p = 1`` disables it.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
            raise InvalidArgumentError(f"temperature must be a finite number > 0, got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise InvalidArgumentError(f"top_p must lie in (0, 1], got {p!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InvalidArgumentError(f"top_k must be an int >= 0 (0 disables it), got {k!r}")

    @property
    def label(self) -> str:
        """A short stable name, e.g. ``"T=0.7,p=0.9,k=40"``, used as a key in results."""
        return f"T={self.temperature:g},p={self.top_p:g},k={self.top_k}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------
# small model helpers (shared by scores, attacks and zero-shot)
# ----------------------------------------------------------------------------


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore every module's training flag after.

    Dropout would make generation nondeterministic; restoring the flags keeps
    the caller's model exactly as it was, also when an exception passes through.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _cache_kwarg(model: nn.Module) -> str:
    """The forward keyword that takes the KV cache: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _output_cache(out: Any) -> Any:
    for key in ("cache", "past_key_values"):
        if key in out and out[key] is not None:
            return out[key]
    raise InvalidArgumentError("the model returned no KV cache although use_cache=True was passed")


def pad_token_id(tokenizer: Any) -> int:
    """The id used for (masked) padding: the tokenizer's pad token, else its eos token."""
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    if pid is None:
        raise InvalidArgumentError("tokenizer has neither a pad_token_id nor an eos_token_id to pad with")
    return int(pid)


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the tokenizer's eos plus the model's ``generation_config`` eos ids.

    Chat models often end a turn with a token other than the tokenizer's eos
    (Llama-3's ``<|eot_id|>``); their generation config lists it.
    """
    ids: set[int] = set()
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(int(tok_eos))
    gen_cfg = getattr(model, "generation_config", None)
    cfg_eos = getattr(gen_cfg, "eos_token_id", None)
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif isinstance(cfg_eos, (list, tuple)):
        ids.update(int(i) for i in cfg_eos)
    return sorted(ids)


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``input_ids [B, T]`` and ``attention_mask [B, T]`` (long, 1 = real)."""
    if not sequences:
        raise EmptyInputError("sequences is empty")
    width = max(len(s) for s in sequences)
    if width == 0:
        raise EmptyInputError("every sequence is empty; nothing to run the model on")
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def _check_instructions(instructions: object, name: str = "instructions") -> list[str]:
    if isinstance(instructions, str) or not isinstance(instructions, Sequence):
        raise InvalidArgumentError(f"{name} must be a sequence of str, got {type(instructions).__name__}")
    items = list(instructions)
    if not items:
        raise EmptyInputError(f"{name} is empty")
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise InvalidArgumentError(f"{name}[{i}] must be a str, got {type(s).__name__}")
    return items


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}")
    return value


def encode_prompts(
    tokenizer: Any,
    instructions: Sequence[str],
    *,
    system: str | None = None,
    suffixes: Sequence[Suffix | None] | None = None,
) -> list[list[int]]:
    """Token ids of each instruction in the chat template (templates carry BOS: no extra specials).

    ``suffixes`` (one per instruction, ``None`` for none): a ``str`` is appended
    to the instruction text after one space before formatting; a sequence of
    ints is inserted as tokens between the instruction and the post-instruction
    template tokens, the exact layout GCG optimises.
    """
    items = _check_instructions(instructions)
    if suffixes is not None:
        if isinstance(suffixes, str) or not isinstance(suffixes, Sequence):
            raise InvalidArgumentError(
                f"suffixes must be a sequence with one suffix per instruction, got {type(suffixes).__name__}"
            )
        if len(suffixes) != len(items):
            raise InvalidArgumentError(
                f"suffixes has {len(suffixes)} entries but there are {len(items)} instructions"
            )
    post: list[int] | None = None
    out: list[list[int]] = []
    for i, instruction in enumerate(items):
        suffix = None if suffixes is None else suffixes[i]
        if isinstance(suffix, str):
            instruction = f"{instruction} {suffix}" if suffix else instruction
            suffix = None
        text = format_prompt(tokenizer, instruction, system)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if suffix is not None:
            if isinstance(suffix, torch.Tensor):
                suffix = suffix.tolist()
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in suffix):
                raise InvalidArgumentError(f"suffixes[{i}] must be a str or a sequence of int token ids")
            if post is None:
                post = post_instruction_tokens(tokenizer, system)
            n_post = len(post)
            if ids[-n_post:] != post:
                raise InvalidArgumentError(
                    f"instructions[{i}] merges with the chat template when tokenized, so a token suffix "
                    f"cannot be placed before the post-instruction tokens: {instruction[-40:]!r}"
                )
            ids = ids[:-n_post] + list(suffix) + ids[-n_post:]
        out.append(ids)
    return out


# ----------------------------------------------------------------------------
# next-token choice
# ----------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Temperature-scaled float64 logits ``[B, V]`` with the top-k / top-p rejects set to ``-inf``.

    Pure: returns a new tensor. At least one token (the most likely) survives
    every filter in every row.
    """
    out = logits.detach().to(torch.float64) / sampling.temperature
    if sampling.top_k and sampling.top_k < out.shape[-1]:
        kth = torch.topk(out, sampling.top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, -math.inf)
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        # A token is dropped when the tokens ranked above it already reach top_p.
        drop_sorted = mass_before >= sampling.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, -math.inf)
    return out


def _next_tokens(
    logits: torch.Tensor, sampling: SamplingConfig | None, generator: torch.Generator | None
) -> torch.Tensor:
    if sampling is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, sampling), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------
# the decoding loop
# ----------------------------------------------------------------------------


@torch.no_grad()
def forward_last_logits(model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Next-token logits ``[B, V]`` (model dtype) at the last real position of each left-padded sequence."""
    device = model_device(model)
    ids, mask = left_pad(sequences, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    kwargs: dict[str, Any] = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **kwargs)
    return out.logits[:, -1, :]


@torch.no_grad()
def _generate_batch(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig | None,
    generator: torch.Generator | None,
    cache_kw: str,
    keep_kw: dict[str, Any],
) -> list[list[int]]:
    device = model_device(model)
    ids, mask = left_pad(sequences, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep_kw)
    cache = _output_cache(out)
    logits = out.logits[:, -1, :]
    batch = ids.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    next_pos = positions[:, -1:] + 1
    stop_ids = stop_ids.to(device)
    steps: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = _next_tokens(logits, sampling, generator).to(device)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        steps.append(token)
        done = done | torch.isin(token, stop_ids)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            use_cache=True,
            **{cache_kw: cache},
        )
        cache = _output_cache(out)
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1
    table = torch.stack(steps, dim=1).tolist()
    stop = set(stop_ids.tolist())
    completions: list[list[int]] = []
    for row in table:
        cut = next((j for j, t in enumerate(row) if t in stop), len(row))
        completions.append(row[:cut])
    return completions


def generate_ids(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    stop_token_ids: Sequence[int] | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[list[int]]:
    """New token ids for each tokenized prompt (the stop token itself excluded).

    ``prompts`` are token id lists (see :func:`encode_prompts`). Greedy when
    ``sampling`` is None, else sampled from one :class:`torch.Generator` seeded
    with ``seed`` and consumed batch after batch in a fixed order (prompts are
    batched longest first to minimise padding), so equal arguments give equal
    output. ``stop_token_ids`` defaults to :func:`eos_token_ids`.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise EmptyInputError("prompts must be a non-empty sequence of token id lists")
    max_new_tokens = _check_positive_int(max_new_tokens, "max_new_tokens")
    batch_size = _check_positive_int(batch_size, "batch_size")
    if sampling is not None and not isinstance(sampling, SamplingConfig):
        raise InvalidArgumentError(
            f"sampling must be a SamplingConfig or None, got {type(sampling).__name__}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidArgumentError(f"seed must be an int, got {seed!r}")
    for i, p in enumerate(prompts):
        if not len(p):
            raise EmptyInputError(f"prompts[{i}] is empty")
    stops = list(stop_token_ids) if stop_token_ids is not None else eos_token_ids(model, tokenizer)
    if not stops:
        raise InvalidArgumentError("no stop token: the tokenizer has no eos and stop_token_ids is empty")
    stop_t = torch.as_tensor(stops, dtype=torch.long)
    pad_id = pad_token_id(tokenizer)
    generator: torch.Generator | None = None
    if sampling is not None:
        # Generator on the model's device: multinomial draws there.
        generator = torch.Generator(device=model_device(model))
        generator.manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    cache_kw = _cache_kwarg(model)
    keep_kw: dict[str, Any] = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    starts = range(0, len(order), batch_size)
    with eval_mode(model):
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            outs = _generate_batch(
                model,
                [prompts[i] for i in idx],
                pad_id=pad_id,
                stop_ids=stop_t,
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                generator=generator,
                cache_kw=cache_kw,
                keep_kw=keep_kw,
            )
            for i, toks in zip(idx, outs):
                results[i] = toks
    return results


def generate(
    model: nn.Module,
    tokenizer: Any,
    instructions: Sequence[str],
    *,
    system: str | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    suffixes: Sequence[Suffix | None] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    progress: bool = True,
) -> list[str]:
    """Completions (new text only, special tokens dropped) for instructions in the chat template.

    Greedy unless ``sampling`` is given; see :func:`generate_ids` for batching
    and reproducibility and :func:`encode_prompts` for ``suffixes``.
    """
    prompts = encode_prompts(tokenizer, instructions, system=system, suffixes=suffixes)
    new = generate_ids(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        sampling=sampling,
        seed=seed,
        stop_token_ids=stop_token_ids,
        progress=progress,
    )
    return [str(tokenizer.decode(t, skip_special_tokens=True)) for t in new]
