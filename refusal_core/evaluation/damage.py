"""Capability damage that moves on every model: next-token KL and cross-entropy of reference completions.

Zero-shot accuracy (lm-eval) stays the standard measure, but on a small model
with a few dozen four-choice items it sits near chance and moves in steps of
1/n, so it cannot see a repair's cost. Two measures the field uses beside it
move continuously:

* **Next-token KL**, ``KL(base ‖ model)`` of the next-token distributions at
  the last position of each chat-formatted prompt (the position the
  selection's KL score reads; DESIGN.md, "Selection"):
  ``Σ_v p_base(v) (log p_base(v) − log p_model(v))``, from log-softmax in
  float64. The base distribution is the reference, as in Arditi et al.
* **Completion cross-entropy**: the mean negative log-likelihood
  (nats/token) of given completion tokens (typically the base model's own
  greedy completions) under a model, teacher-forced after the prompt.
  Against the base's own CE on the same tokens it says how much less likely
  the variant finds what the base would have said.

Prompts are strings (chat-formatted with
:func:`~refusal_core.model.inputs.encode_prompts`, the same ids
:func:`~refusal_core.evaluation.generation.generate_ids` completes) or token
id lists already formatted. Batches are left-padded with position ids that
count real tokens only, so results do not depend on the batch size (to float
rounding). Both functions are pure: the models' weights and training flags
are as before afterwards.

An empty completion is an error (:class:`~refusal_core.errors.EmptyInputError`):
its mean over zero tokens is undefined and a NaN would silently drop out of
or poison the mean. ``generate_ids`` excludes the stop token, so a prompt the
base answers by stopping at once yields ``[]``; append the stop token id to
score the decision to stop (and to never pass an empty completion).

Example:
    >>> from refusal_core.testing.tiny import tiny_model, tiny_tokenizer
    >>> from refusal_core.evaluation.generation import generate_ids
    >>> from refusal_core.model import encode_prompts
    >>> base, tok = tiny_model(seed=0), tiny_tokenizer()
    >>> variant = tiny_model(seed=1)
    >>> ids = encode_prompts(tok, ["Tell me a story.", "Name a colour."])
    >>> greedy = generate_ids(base, tok, ids, max_new_tokens=4, progress=False)
    >>> completions = [c + [tok.eos_token_id] for c in greedy]
    >>> float(next_token_kl(base, base, tok, ids).abs().max())
    0.0
    >>> res = capability_damage(base, variant, tok, ids, completions)
    >>> (res.n, res.kl_mean > 0, res.ce_mean > res.ce_base_mean)
    (2, True, True)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusal_core.errors import (
    ArtifactError,
    EmptyInputError,
    InvalidArgumentError,
    NonFiniteError,
    ShapeMismatchError,
    UnsupportedArchitectureError,
)
from refusal_core.evaluation.generation import (
    _accepts,
    _check_positive_int,
    eval_mode,
)
from refusal_core.model import batch_inputs, encode_prompts, model_device, model_identity, pad_token_id
from refusal_core.saving import RECORD_KINDS, Record, load_record_as, write_record

__all__ = [
    "DamageResult",
    "capability_damage",
    "completion_cross_entropy",
    "kl_divergence",
    "next_token_kl",
    "next_token_logp",
]

#: A prompt given as text (chat-formatted here) or as token ids (already formatted).
Prompts = Sequence[str] | Sequence[Sequence[int]]


# ----------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------


def _check_ids(ids: object, name: str, vocab: int, *, allow_empty: bool) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InvalidArgumentError(f"{name} must be a sequence of int token ids, got {type(ids).__name__}")
    out = list(ids)
    if not out and not allow_empty:
        raise EmptyInputError(f"{name} has no tokens")
    for j, t in enumerate(out):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise InvalidArgumentError(f"{name}[{j}] must be an int token id, got {t!r}")
        if not 0 <= int(t) < vocab:
            raise InvalidArgumentError(f"{name}[{j}] = {t} lies outside the vocabulary [0, {vocab})")
    return [int(t) for t in out]


def _prompt_ids(tokenizer: Any, prompts: object, system: str | None, vocab: int) -> list[list[int]]:
    """Token ids of each prompt: strings are chat-formatted, id lists are taken as they are."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise InvalidArgumentError(
            f"prompts must be a sequence of str or of token id lists, got {type(prompts).__name__}"
        )
    items = list(prompts)
    if not items:
        raise EmptyInputError("prompts is empty")
    if system is not None and not isinstance(system, str):
        raise InvalidArgumentError(f"system must be a str or None, got {type(system).__name__}")
    if all(isinstance(p, str) for p in items):
        encoded = encode_prompts(tokenizer, items, system=system)
    elif any(isinstance(p, str) for p in items):
        raise InvalidArgumentError("prompts mixes strings and token id lists; give one kind")
    elif system is not None:
        raise InvalidArgumentError(
            "system applies to string prompts only; token id prompts are already formatted"
        )
    else:
        encoded = items
    return [_check_ids(p, f"prompts[{i}]", vocab, allow_empty=False) for i, p in enumerate(encoded)]


def _completion_ids(completions: object, n: int, vocab: int) -> list[list[int]]:
    if isinstance(completions, (str, bytes)) or not isinstance(completions, Sequence):
        raise InvalidArgumentError(
            f"completions must be a list of token id lists, got {type(completions).__name__}"
        )
    items = list(completions)
    if len(items) != n:
        raise ShapeMismatchError(f"completions has {len(items)} entries but there are {n} prompts")
    return [_check_ids(c, f"completions[{i}]", vocab, allow_empty=False) for i, c in enumerate(items)]


def _vocab_size(model: nn.Module, name: str) -> int:
    """The width of ``model``'s logits: its output embedding's rows, else ``config.vocab_size``."""
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"{name} must be a torch nn.Module, got {type(model).__name__}")
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    size = getattr(head, "out_features", None)
    if not isinstance(size, int):
        size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidArgumentError(f"cannot tell the vocabulary size of {name} ({type(model).__name__})")
    return size


def _common_vocab(base_model: nn.Module, model: nn.Module) -> int:
    vb, vm = _vocab_size(base_model, "base_model"), _vocab_size(model, "model")
    if vb != vm:
        raise ShapeMismatchError(
            f"base_model has a vocabulary of {vb} tokens but model has {vm}; "
            "their next-token distributions cannot be compared"
        )
    return vb


# ----------------------------------------------------------------------------
# the forward pass both measures read
# ----------------------------------------------------------------------------


@dataclass
class _Scored:
    """Per-prompt readings of one model: next-token log-probs after the prompt and completion CE."""

    last_logp: torch.Tensor  # [n, V] float64
    ce: torch.Tensor | None  # [n] float64, None without completions


def _score(
    model: nn.Module,
    name: str,
    prompts: list[list[int]],
    completions: list[list[int]] | None,
    *,
    pad_id: int,
    batch_size: int,
    vocab: int,
) -> _Scored:
    """One forward per batch over ``prompt + completion``, read at the prompt's last position and after.

    Row ``b`` is left-padded to width ``T``; its completion of length ``c``
    occupies the last ``c`` columns, so the logits predicting completion token
    ``j`` sit at column ``T − c − 1 + j`` and the prompt's own next-token logits
    at ``T − c − 1``. Only the last ``max c + 1`` columns are computed.
    """
    device = model_device(model)
    keep_kw = _accepts(model, "logits_to_keep")
    last_rows: list[torch.Tensor] = []
    ce_rows: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        p_batch = prompts[start : start + batch_size]
        c_batch = (
            completions[start : start + batch_size] if completions is not None else [[] for _ in p_batch]
        )
        keep = max(len(c) for c in c_batch) + 1
        inputs = batch_inputs([p + c for p, c in zip(p_batch, c_batch)], pad_id, device)
        extra: dict[str, Any] = {"logits_to_keep": keep} if keep_kw else {}
        logits = model(**inputs, use_cache=False, **extra).logits[:, -keep:, :]
        if logits.shape[-1] != vocab:
            raise ShapeMismatchError(f"{name} returned logits of width {logits.shape[-1]}, expected {vocab}")
        logits = logits.to(torch.float64).cpu()
        if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
            raise NonFiniteError(f"{name} produced NaN or +inf logits; its weights are broken")
        logp = torch.log_softmax(logits, dim=-1)  # [B, keep, V]
        for row, comp in enumerate(c_batch):
            at = keep - 1 - len(comp)  # the prompt's last position in the kept window
            last_rows.append(logp[row, at])
            if completions is not None:
                targets = torch.as_tensor(comp, dtype=torch.long)
                steps = logp[row, at : keep - 1]  # [c, V]: the positions predicting comp[0..c-1]
                nll = -steps.gather(-1, targets[:, None]).squeeze(-1)
                ce_rows.append(nll.mean())
    return _Scored(
        last_logp=torch.stack(last_rows),
        ce=torch.stack(ce_rows) if completions is not None else None,
    )


def kl_divergence(base_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q) = Σ p (log p − log q)`` per row; entries with ``p = 0`` contribute 0 (also vs −inf)."""
    p = base_logp.exp()
    terms = torch.where(p > 0, p * (base_logp - logp), torch.zeros_like(p))
    # KL ≥ 0; rounding can leave −1e-17 where the distributions agree, which a report would show.
    return terms.sum(-1).clamp_min(0.0)


def _run(
    models: list[tuple[nn.Module, str]],
    tokenizer: Any,
    prompts: object,
    completions: object | None,
    *,
    system: str | None,
    batch_size: object,
) -> list[_Scored]:
    """Validate everything, then score each model (in eval mode, no grad) on the same inputs."""
    batch = _check_positive_int(batch_size, "batch_size")
    vocab = _vocab_size(models[0][0], models[0][1])
    if len(models) == 2:
        vocab = _common_vocab(models[0][0], models[1][0])
    ids = _prompt_ids(tokenizer, prompts, system, vocab)
    comps = None if completions is None else _completion_ids(completions, len(ids), vocab)
    pad_id = pad_token_id(tokenizer)
    out = []
    with ExitStack() as stack, torch.inference_mode():
        for model, _ in models:
            stack.enter_context(eval_mode(model))
        for model, name in models:
            out.append(_score(model, name, ids, comps, pad_id=pad_id, batch_size=batch, vocab=vocab))
    return out


# ----------------------------------------------------------------------------
# public measures
# ----------------------------------------------------------------------------


def next_token_kl(
    base_model: nn.Module,
    model: nn.Module,
    tokenizer: Any,
    prompts: Prompts,
    *,
    system: str | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """``KL(base ‖ model)`` of the next-token distribution after each prompt: ``[n]`` float64, nats.

    ``prompts``: strings (chat-formatted with ``system``) or formatted token
    id lists. Both models must share a vocabulary
    (:class:`~refusal_core.errors.ShapeMismatchError`); a model with NaN or
    +inf logits raises :class:`~refusal_core.errors.NonFiniteError`. ``base_model``
    may be ``model`` itself (the KL is then exactly 0).
    """
    base, other = _run(
        [(base_model, "base_model"), (model, "model")],
        tokenizer,
        prompts,
        None,
        system=system,
        batch_size=batch_size,
    )
    return kl_divergence(base.last_logp, other.last_logp)


def next_token_logp(
    model: nn.Module,
    tokenizer: Any,
    prompts: Prompts,
    *,
    system: str | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Log-probabilities of the next token after each prompt: ``[n, V]`` float64.

    The reading :func:`next_token_kl` takes from each of its two models, in the
    same batches: ``kl_divergence(next_token_logp(base, ...), next_token_logp(model, ...))``
    equals ``next_token_kl(base, model, ...)`` bit for bit, so a study comparing
    many variants with one base computes the base's once.
    """
    (scored,) = _run([(model, "model")], tokenizer, prompts, None, system=system, batch_size=batch_size)
    return scored.last_logp


def completion_cross_entropy(
    model: nn.Module,
    tokenizer: Any,
    prompts: Prompts,
    completions: Sequence[Sequence[int]],
    *,
    system: str | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Mean cross-entropy (nats/token) of each completion under ``model``, after its prompt: ``[n]`` float64.

    Teacher-forced: completion token ``j`` is scored by the distribution the
    model gives after the prompt and tokens ``0..j−1``; padding never enters.
    ``completions[i]`` is a non-empty list of token ids (an empty one raises
    :class:`~refusal_core.errors.EmptyInputError`, see the module docstring).
    """
    (scored,) = _run(
        [(model, "model")], tokenizer, prompts, completions, system=system, batch_size=batch_size
    )
    assert scored.ce is not None
    return scored.ce


def _identity(model: nn.Module) -> dict[str, Any]:
    try:
        return model_identity(model)
    except UnsupportedArchitectureError:  # the measures need no layout; the record says less
        return {"class": type(model).__name__}


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _from_json(x: Any) -> float:
    return math.nan if x is None else float(x)


@dataclass
class DamageResult:
    """Capability damage of a model against its base on one prompt set.

    - ``kl_mean`` / ``kl_per_prompt``: ``KL(base ‖ model)`` of the next-token
      distributions after each prompt (nats).
    - ``ce_mean`` / ``ce_per_prompt``: mean cross-entropy (nats/token) of the
      base's completions under the model; ``ce_mean`` averages the per-prompt
      means (each prompt weighs the same, whatever its completion's length).
    - ``ce_base_mean`` / ``ce_base_per_prompt``: the same under the base model,
      so :attr:`ce_increase` reads as the damage.
    - ``n``: the number of prompts.
    - ``identity`` / ``base_identity``: the identities of the model and of its
      base (:func:`~refusal_core.model.model_identity`; only the class name
      for an architecture without a layout).
    """

    kl_mean: float
    kl_per_prompt: list[float]
    ce_mean: float
    ce_per_prompt: list[float]
    ce_base_mean: float
    n: int
    ce_base_per_prompt: list[float] = field(default_factory=list)
    base_identity: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def ce_increase(self) -> float:
        """``ce_mean − ce_base_mean`` (nats/token): how much less likely the model finds the base's text."""
        return self.ce_mean - self.ce_base_mean

    def record(self) -> Record:
        """This result as a :class:`~refusal_core.saving.records.Record` (non-finite values as ``None``)."""
        return Record(
            _RECORD_KIND,
            RECORD_KINDS[_RECORD_KIND].version,
            identity=self.identity,
            data={
                "n": int(self.n),
                "kl_mean": _json_float(self.kl_mean),
                "ce_mean": _json_float(self.ce_mean),
                "ce_base_mean": _json_float(self.ce_base_mean),
                "ce_increase": _json_float(self.ce_increase),
                "kl_per_prompt": [_json_float(x) for x in self.kl_per_prompt],
                "ce_per_prompt": [_json_float(x) for x in self.ce_per_prompt],
                "ce_base_per_prompt": [_json_float(x) for x in self.ce_base_per_prompt],
                "base_identity": dict(self.base_identity),
            },
        )

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON dict: floats as floats, a non-finite value (NaN, inf) as ``None``."""
        return self.record().to_dict()

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` (a file), atomically."""
        return write_record(path, self.record())

    @classmethod
    def load(cls, path: str | Path) -> DamageResult:
        """Read a result written by :meth:`save`; :class:`ArtifactError` if it is not one."""
        return load_record_as(path, _RECORD_KIND, cls.from_dict)

    @classmethod
    def from_dict(cls, doc: object) -> DamageResult:
        """The result :meth:`to_dict` wrote (``None`` back to NaN); :class:`ArtifactError` otherwise.

        Version 1 named the identities ``model`` and ``base_model``; it is read too.
        """
        if isinstance(doc, dict) and doc.get("kind") == _RECORD_KIND and doc.get("version") == 1:
            doc = {k: v for k, v in doc.items() if k not in ("model", "base_model")} | {
                "version": 2,
                "identity": doc.get("model", {}),
                "base_identity": doc.get("base_model", {}),
            }
        rec = Record.from_dict(doc, _RECORD_KIND, versions=(2,))
        d = rec.data
        try:
            return cls(
                kl_mean=_from_json(d["kl_mean"]),
                kl_per_prompt=[_from_json(x) for x in d["kl_per_prompt"]],
                ce_mean=_from_json(d["ce_mean"]),
                ce_per_prompt=[_from_json(x) for x in d["ce_per_prompt"]],
                ce_base_mean=_from_json(d["ce_base_mean"]),
                n=int(d["n"]),
                ce_base_per_prompt=[_from_json(x) for x in d.get("ce_base_per_prompt", [])],
                base_identity=dict(d.get("base_identity", {})),
                identity=dict(rec.identity),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"malformed DamageResult: {exc}") from exc


_RECORD_KIND = "DamageResult"


def capability_damage(
    base_model: nn.Module,
    model: nn.Module,
    tokenizer: Any,
    prompts: Prompts,
    base_completions: Sequence[Sequence[int]],
    *,
    system: str | None = None,
    batch_size: int = 32,
) -> DamageResult:
    """Next-token KL and completion cross-entropy of ``model`` against ``base_model``, in one pass each.

    ``base_completions[i]`` are token ids the base produced for ``prompts[i]``
    (e.g. :func:`~refusal_core.evaluation.generation.generate_ids`, greedy,
    with the stop token appended). Each model runs one forward per batch over
    prompt + completion: the KL is read at the prompt's last position of that
    forward (causal attention makes it the prompt's own next-token
    distribution), the CE at the completion's positions. Equals
    :func:`next_token_kl` and :func:`completion_cross_entropy` up to float
    rounding of the longer forward.
    """
    base, other = _run(
        [(base_model, "base_model"), (model, "model")],
        tokenizer,
        prompts,
        base_completions,
        system=system,
        batch_size=batch_size,
    )
    assert base.ce is not None
    assert other.ce is not None
    kl = kl_divergence(base.last_logp, other.last_logp)
    return DamageResult(
        kl_mean=float(kl.mean()),
        kl_per_prompt=kl.tolist(),
        ce_mean=float(other.ce.mean()),
        ce_per_prompt=other.ce.tolist(),
        ce_base_mean=float(base.ce.mean()),
        n=int(kl.numel()),
        ce_base_per_prompt=base.ce.tolist(),
        base_identity=_identity(base_model),
        identity=_identity(model),
    )
