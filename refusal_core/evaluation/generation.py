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
import copy
import hashlib
import inspect
import itertools
import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from refusal_core.errors import EmptyInputError, InvalidArgumentError
from refusal_core.model import Suffix, encode_prompts, left_pad, model_device, pad_token_id, positions

__all__ = [
    "GenerationCache",
    "GenerationKey",
    "SamplingConfig",
    "eos_token_ids",
    "eval_mode",
    "filter_logits",
    "fork_cache",
    "forward_last_logits",
    "generate",
    "generate_ids",
    "generate_ids_multi",
    "model_fingerprint",
]


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


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}")
    return value


# ----------------------------------------------------------------------------
# next-token choice
# ----------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Temperature-scaled float64 logits ``[B, V]`` with the top-k / top-p rejects set to ``-inf``.

    Pure: returns a new tensor. At least one token (the most likely) survives
    every filter in every row. On CPU the k-th largest value and the nucleus come from numpy's
    sorting (several times faster than ``torch.topk`` / ``torch.sort`` here), with the same
    result bit for bit as :func:`_filter_logits_reference` (see :func:`_top_p_drop`).
    """
    out = logits.detach().to(torch.float64) / sampling.temperature
    fast = out.device.type == "cpu" and out.dim() >= 1 and not bool(torch.isnan(out).any())
    if sampling.top_k and sampling.top_k < out.shape[-1]:
        if fast:  # the k-th largest value itself (no indices): ties cannot change it
            cut = out.shape[-1] - sampling.top_k
            kth = torch.from_numpy(np.partition(out.numpy(), cut, axis=-1)[..., cut : cut + 1])
        else:
            kth = torch.topk(out, sampling.top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, -math.inf)
    if sampling.top_p < 1.0:
        drop = _top_p_drop(out, sampling.top_p) if fast else None
        if drop is None:
            drop = _top_p_drop_reference(out, sampling.top_p)
        out = out.masked_fill(drop, -math.inf)
    return out


def _filter_logits_reference(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """:func:`filter_logits` as first written (``torch.topk``, a full ``torch.sort``): the tests pin
    the fast path against it."""
    out = logits.detach().to(torch.float64) / sampling.temperature
    if sampling.top_k and sampling.top_k < out.shape[-1]:
        kth = torch.topk(out, sampling.top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, -math.inf)
    if sampling.top_p < 1.0:
        out = out.masked_fill(_top_p_drop_reference(out, sampling.top_p), -math.inf)
    return out


def _top_p_drop_reference(out: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which tokens the top-p filter removes, as written first: a full ``torch.sort`` of each row."""
    sorted_logits, order = torch.sort(out, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    # A token is dropped when the tokens ranked above it already reach top_p.
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    return torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)


def _top_p_drop(out: torch.Tensor, top_p: float) -> torch.Tensor | None:
    """:func:`_top_p_drop_reference` with numpy's sort, or None when it cannot vouch for the same result.

    The descending sequence of VALUES is the same whatever sort made it, so the softmax, the
    cumulative mass and the drop flag of every sorted position are the same tensors as in the
    reference. Only the order among equal values may differ, and it matters only when equal values
    straddle the cut (some dropped, some kept): then None, and the caller runs the reference.
    """
    x = out.numpy()
    order = np.argsort(-x, axis=-1)
    sorted_values = np.ascontiguousarray(np.sort(x, axis=-1)[..., ::-1])  # = x[order], value for value
    probs = torch.softmax(torch.from_numpy(sorted_values), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    flags = drop_sorted.numpy()
    tied = sorted_values[..., 1:] == sorted_values[..., :-1]
    if bool(np.any(tied & (flags[..., 1:] != flags[..., :-1]))):
        return None
    return torch.zeros_like(drop_sorted).scatter(-1, torch.from_numpy(order), drop_sorted)


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
    kwargs: dict[str, Any] = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False, **kwargs)
    return out.logits[:, -1, :]


@torch.no_grad()
def _prefill(
    model: nn.Module, sequences: Sequence[Sequence[int]], *, pad_id: int, keep_kw: dict[str, Any]
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over the left-padded prompts: ``(cache, last logits [B, V], mask, next pos [B, 1])``."""
    device = model_device(model)
    ids, mask = left_pad(sequences, pad_id, device)
    pos = positions(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep_kw)
    return _output_cache(out), out.logits[:, -1, :], mask, pos[:, -1:] + 1


@torch.no_grad()
def _decode(
    model: nn.Module,
    cache: Any,
    logits: torch.Tensor,
    mask: torch.Tensor,
    next_pos: torch.Tensor,
    *,
    pad_id: int,
    stop_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig | None,
    generator: torch.Generator | None,
    cache_kw: str,
) -> list[list[int]]:
    """Decode from a prefilled ``cache`` (which it consumes) and the prompt's last ``logits``."""
    device = mask.device
    batch = mask.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
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


def fork_cache(cache: Any) -> Any:
    """An independent copy of a KV cache (every key/value tensor copied), to decode one branch from.

    transformers' ``DynamicCache`` grows by reassigning its layers' tensors,
    and other cache layers may write in place, so a fork must own its tensors:
    decoding from the fork leaves ``cache`` exactly as it was.
    """
    return copy.deepcopy(cache)


# ----------------------------------------------------------------------------
# the generation memo
# ----------------------------------------------------------------------------


def model_fingerprint(model: nn.Module) -> str:
    """A sha256 over everything that decides the model's outputs: module classes, parameters, buffers, hooks.

    Parameters and buffers enter with name, dtype, shape and raw bytes (about
    a second per GB on CPU). Forward hooks (ablation, activation addition)
    change the outputs without touching a weight, so the ids of every
    registered hook, module-level and global, enter too: a hook registered
    anew gets a new id, so a hooked model never matches a cached unhooked run
    (or a different hook). Pass an explicit ``model_key`` to the generation
    functions to skip the hashing when the caller knows the model's identity.
    """
    h = hashlib.sha256()
    for name, module in model.named_modules():
        h.update(f"m:{name}:{type(module).__module__}.{type(module).__qualname__};".encode())
        hooks = (
            module._forward_hooks,
            module._forward_pre_hooks,
            getattr(module, "_forward_hooks_with_kwargs", {}),
        )
        h.update(f"h:{[sorted(d.keys()) for d in hooks]};".encode())
    globals_ = (
        torch.nn.modules.module._global_forward_hooks,
        torch.nn.modules.module._global_forward_pre_hooks,
    )
    h.update(f"g:{[sorted(d.keys()) for d in globals_]};".encode())
    tensors = itertools.chain(
        model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
    )
    for name, t in tensors:
        data = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"t:{name}:{data.dtype}:{tuple(t.shape)};".encode())
        if data.numel():
            raw: Any = data.view(torch.uint8).numpy()  # hashed through the buffer protocol, no bytes copy
            h.update(raw)
    return h.hexdigest()


def _state_signature(model: nn.Module) -> tuple[Any, ...]:
    """Cheap identity of the model's current state: every tensor's storage, version counter, dtype and
    shape, plus hook ids and module classes. Any in-place op on a parameter (also under ``no_grad``),
    ``load_state_dict``, re-assignment or a new hook changes it; writes through ``.data`` do not."""
    tensors = itertools.chain(
        model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
    )
    state = tuple((n, t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.device) for n, t in tensors)
    hooks = tuple(
        (
            name,
            type(m),
            tuple(m._forward_hooks),
            tuple(m._forward_pre_hooks),
        )
        for name, m in model.named_modules()
    )
    globals_ = (
        tuple(torch.nn.modules.module._global_forward_hooks),
        tuple(torch.nn.modules.module._global_forward_pre_hooks),
    )
    return (state, hooks, globals_)


@dataclass(frozen=True)
class GenerationKey:
    """What decides a generation: model state, prompt token ids (template and system prompt included),
    sampling, seed, token budget, batching and stop ids."""

    model: str
    prompts: tuple[tuple[int, ...], ...]
    sampling: SamplingConfig | None
    seed: int
    max_new_tokens: int
    batch_size: int
    stop_ids: tuple[int, ...]


class GenerationCache:
    """A memo of generations, so the same generation requested twice in a study is computed once.

    Keyed by :class:`GenerationKey`. The chat template and the system prompt
    are part of the prompt token ids, so a different system prompt is a
    different key. Sampled runs are keyed by their seed; greedy runs ignore
    it (``seed`` is recorded as 0). Entries are copied in and out, so a
    caller editing a returned list cannot corrupt the memo. Unbounded: one
    study's completions are small next to the model.

    Example:
        >>> from refusal_core.testing.tiny import tiny_model, tiny_tokenizer
        >>> model, tok = tiny_model(), tiny_tokenizer()
        >>> memo = GenerationCache()
        >>> a = generate(model, tok, ["Hi"], max_new_tokens=3, cache=memo, progress=False)
        >>> b = generate(model, tok, ["Hi"], max_new_tokens=3, cache=memo, progress=False)
        >>> a == b, memo.hits, memo.misses
        (True, 1, 1)
    """

    def __init__(self) -> None:
        self._store: dict[GenerationKey, list[list[int]]] = {}
        self._fingerprints: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], str]] = (
            weakref.WeakKeyDictionary()
        )
        self.hits = 0
        self.misses = 0

    def fingerprint(self, model: nn.Module) -> str:
        """:func:`model_fingerprint`, re-hashed only when the model's state signature changed.

        The signature (storage, version counter, dtype, shape of every tensor;
        hook ids; module classes) is cheap to read, so a study pays the hash
        once per model state instead of once per generation. A weight written
        through ``.data`` bypasses version counters: after such an edit pass
        an explicit ``model_key`` or call :meth:`clear`.
        """
        signature = _state_signature(model)
        known = self._fingerprints.get(model)
        if known is not None and known[0] == signature:
            return known[1]
        digest = model_fingerprint(model)
        self._fingerprints[model] = (signature, digest)
        return digest

    def __len__(self) -> int:
        return len(self._store)

    def get(self, key: GenerationKey) -> list[list[int]] | None:
        """The stored token ids for ``key`` (a copy), or None (counted as a miss)."""
        found = self._store.get(key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        return [list(row) for row in found]

    def put(self, key: GenerationKey, completions: Sequence[Sequence[int]]) -> None:
        self._store[key] = [list(row) for row in completions]

    def clear(self) -> None:
        self._store.clear()
        self._fingerprints.clear()
        self.hits = self.misses = 0


def _check_cache(cache: object, model_key: object) -> None:
    if cache is not None and not isinstance(cache, GenerationCache):
        raise InvalidArgumentError(f"cache must be a GenerationCache or None, got {type(cache).__name__}")
    if model_key is not None and not (isinstance(model_key, str) and model_key):
        raise InvalidArgumentError(f"model_key must be a non-empty str or None, got {model_key!r}")


# ----------------------------------------------------------------------------
# the public generation functions
# ----------------------------------------------------------------------------


def _check_generation_args(prompts: object, max_new_tokens: object, batch_size: object) -> tuple[int, int]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise EmptyInputError("prompts must be a non-empty sequence of token id lists")
    for i, p in enumerate(prompts):
        if not len(p):
            raise EmptyInputError(f"prompts[{i}] is empty")
    return _check_positive_int(max_new_tokens, "max_new_tokens"), _check_positive_int(
        batch_size, "batch_size"
    )


def _check_sampling(sampling: object, name: str) -> None:
    if sampling is not None and not isinstance(sampling, SamplingConfig):
        raise InvalidArgumentError(f"{name} must be a SamplingConfig or None, got {type(sampling).__name__}")


def _check_seed(seed: object, name: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidArgumentError(f"{name} must be an int, got {seed!r}")
    return seed


def generate_ids_multi(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    samplings: Sequence[SamplingConfig | None],
    seeds: Sequence[int],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop_token_ids: Sequence[int] | None = None,
    cache: GenerationCache | None = None,
    model_key: str | None = None,
    progress: bool = True,
    desc: str = "generate",
    engine: Any = None,
) -> list[list[list[int]]]:
    """``out[c][i]``: the new token ids of prompt ``i`` under ``samplings[c]`` seeded with ``seeds[c]``.

    Equal, token for token, to ``[generate_ids(..., sampling=samplings[c],
    seed=seeds[c]) for c]`` but each prompt batch is prefilled once: the KV
    cache and the last logits of the prefill are forked (:func:`fork_cache`)
    for every configuration, and each configuration decodes from its fork
    with its own generator, consumed batch after batch in the same order as
    the unshared path. ``None`` in ``samplings`` is greedy decoding. With a
    ``cache``, configurations already in it are not decoded again and the
    new ones are stored under the same keys :func:`generate_ids` uses.

    Example:
        >>> from refusal_core.testing.tiny import tiny_model, tiny_tokenizer
        >>> model, tok = tiny_model(), tiny_tokenizer()
        >>> ids = encode_prompts(tok, ["Hi", "Tell me a story."])
        >>> out = generate_ids_multi(model, tok, ids, [None, SamplingConfig(0.7)], [0, 1],
        ...                          max_new_tokens=3, progress=False)
        >>> out[0] == generate_ids(model, tok, ids, max_new_tokens=3, progress=False)
        True

    ``engine``: an open :class:`~refusal_core.evaluation.engines.Engine` (e.g.
    vLLM serving this model's saved checkpoint) that decodes the configurations
    not in the cache instead of this loop; the cache keys stay this model's, so
    the attacks find those generations (see :mod:`refusal_core.evaluation.engines`).
    """
    max_new_tokens, batch_size = _check_generation_args(prompts, max_new_tokens, batch_size)
    if isinstance(samplings, (str, SamplingConfig)) or not isinstance(samplings, Sequence) or not samplings:
        raise InvalidArgumentError("samplings must be a non-empty sequence of SamplingConfig or None")
    if isinstance(seeds, (str, int)) or not isinstance(seeds, Sequence) or len(seeds) != len(samplings):
        raise InvalidArgumentError(
            f"seeds must be a sequence with one int per sampling configuration ({len(samplings)})"
        )
    for c, (sampling, seed) in enumerate(zip(samplings, seeds)):
        _check_sampling(sampling, f"samplings[{c}]")
        _check_seed(seed, f"seeds[{c}]")
    _check_cache(cache, model_key)
    stops = list(stop_token_ids) if stop_token_ids is not None else eos_token_ids(model, tokenizer)
    if not stops:
        raise InvalidArgumentError("no stop token: the tokenizer has no eos and stop_token_ids is empty")
    stop_t = torch.as_tensor(stops, dtype=torch.long)
    pad_id = pad_token_id(tokenizer)

    results: list[list[list[int]] | None] = [None] * len(samplings)
    keys: list[GenerationKey | None] = [None] * len(samplings)
    if cache is not None:
        fingerprint = model_key if model_key is not None else cache.fingerprint(model)
        frozen = tuple(tuple(int(t) for t in p) for p in prompts)
        for c, (sampling, seed) in enumerate(zip(samplings, seeds)):
            keys[c] = GenerationKey(
                fingerprint,
                frozen,
                sampling,
                int(seed) if sampling is not None else 0,
                max_new_tokens,
                batch_size,
                tuple(int(s) for s in stops),
            )
            results[c] = cache.get(keys[c])  # type: ignore[arg-type]
    todo = [c for c in range(len(samplings)) if results[c] is None]
    if todo and engine is not None:
        computed = engine.complete(
            prompts,
            [samplings[c] for c in todo],
            [seeds[c] for c in todo],
            max_new_tokens=max_new_tokens,
            stop_token_ids=stops,
        )
    elif todo:
        computed = _generate_shared(
            model,
            prompts,
            [samplings[c] for c in todo],
            [seeds[c] for c in todo],
            pad_id=pad_id,
            stop_ids=stop_t,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            desc=desc,
        )
    else:
        computed = []
    for c, out in zip(todo, computed):
        results[c] = out
        if cache is not None:
            cache.put(keys[c], out)  # type: ignore[arg-type]
    return [r for r in results if r is not None]


def _generate_shared(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    samplings: Sequence[SamplingConfig | None],
    seeds: Sequence[int],
    *,
    pad_id: int,
    stop_ids: torch.Tensor,
    max_new_tokens: int,
    batch_size: int,
    progress: bool,
    desc: str,
) -> list[list[list[int]]]:
    device = model_device(model)
    generators: list[torch.Generator | None] = []
    for sampling, seed in zip(samplings, seeds):
        if sampling is None:
            generators.append(None)
        else:
            # Generator on the model's device: multinomial draws there.
            gen = torch.Generator(device=device)
            gen.manual_seed(int(seed))
            generators.append(gen)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[list[int]]] = [[[] for _ in prompts] for _ in samplings]
    cache_kw = _cache_kwarg(model)
    keep_kw: dict[str, Any] = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    starts = range(0, len(order), batch_size)
    last = len(samplings) - 1
    with eval_mode(model):
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            kv, logits, mask, next_pos = _prefill(
                model, [prompts[i] for i in idx], pad_id=pad_id, keep_kw=keep_kw
            )
            for c, (sampling, generator) in enumerate(zip(samplings, generators)):
                outs = _decode(
                    model,
                    kv if c == last else fork_cache(kv),  # the last branch may consume the original
                    logits,
                    mask,
                    next_pos,
                    pad_id=pad_id,
                    stop_ids=stop_ids,
                    max_new_tokens=max_new_tokens,
                    sampling=sampling,
                    generator=generator,
                    cache_kw=cache_kw,
                )
                for i, toks in zip(idx, outs):
                    results[c][i] = toks
    return results


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
    cache: GenerationCache | None = None,
    model_key: str | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[list[int]]:
    """New token ids for each tokenized prompt (the stop token itself excluded).

    ``prompts`` are token id lists (see :func:`encode_prompts`). Greedy when
    ``sampling`` is None, else sampled from one :class:`torch.Generator` seeded
    with ``seed`` and consumed batch after batch in a fixed order (prompts are
    batched longest first to minimise padding), so equal arguments give equal
    output. ``stop_token_ids`` defaults to :func:`eos_token_ids`. With a
    ``cache`` (:class:`GenerationCache`) a generation already computed under
    the same key is returned without a forward pass; ``model_key`` replaces
    the model's :func:`model_fingerprint` in the key.
    """
    _check_sampling(sampling, "sampling")
    _check_seed(seed, "seed")
    return generate_ids_multi(
        model,
        tokenizer,
        prompts,
        [sampling],
        [seed],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop_token_ids=stop_token_ids,
        cache=cache,
        model_key=model_key,
        progress=progress,
        desc=desc,
    )[0]


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
    cache: GenerationCache | None = None,
    model_key: str | None = None,
    progress: bool = True,
) -> list[str]:
    """Completions (new text only, special tokens dropped) for instructions in the chat template.

    Greedy unless ``sampling`` is given; see :func:`generate_ids` for batching
    and reproducibility (and ``cache`` / ``model_key``) and :func:`encode_prompts`
    for ``suffixes``.
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
        cache=cache,
        model_key=model_key,
        progress=progress,
    )
    return [str(tokenizer.decode(t, skip_special_tokens=True)) for t in new]
