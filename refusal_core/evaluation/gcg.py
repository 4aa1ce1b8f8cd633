"""Greedy coordinate gradient (GCG) suffix attack, written for this project.

Gradients of the target loss with respect to a one-hot encoding of the suffix
tokens (through the embedding matrix) propose the top-k substitutions per
position; random single-token substitutions drawn from them are scored in
batches; the best candidate becomes the next suffix; a fixed step budget. By
default one suffix per prompt (the stronger "individual" setting);
``universal=True`` optimises one suffix for the mean loss over all prompts.
:class:`GcgAttack` runs the attack template of
:mod:`~refusal_core.evaluation.attacks`: optimise, generate with the suffixes,
judge.

Example:
    >>> from refusal_core.testing.tiny import tiny_model, tiny_tokenizer
    >>> model, tok = tiny_model(), tiny_tokenizer()
    >>> run = GcgAttack(n_steps=1, suffix_len=2, topk=4, batch_size=4).optimize(model, tok, ["Hi"],
    ...                                                                       progress=False)
    >>> (len(run.suffix_ids), len(run.losses), run.best_loss == min(run.losses))
    (2, 2, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from refusal_core.errors import EmptyInputError, InvalidArgumentError
from refusal_core.evaluation.attacks import (
    AttackSpec,
    Completions,
    JudgedAttack,
    check_system,
    register_attack,
)
from refusal_core.evaluation.generation import (
    GenerationCache,
    _accepts,
    _check_positive_int,
    eval_mode,
    generate,
)
from refusal_core.evaluation.scores import continuation_token_ids
from refusal_core.model import check_instructions, format_prompt, model_device, post_instruction_tokens

__all__ = [
    "GcgAttack",
    "GcgRun",
    "allowed_suffix_tokens",
    "gcg_optimize",
    "suffix_token_gradients",
    "target_loss",
]


def allowed_suffix_tokens(tokenizer: Any, vocab_size: int, *, ascii_only: bool = True) -> torch.Tensor:
    """``[vocab_size]`` bool: tokens a suffix may use.

    A token is allowed when it is not special, decodes to printable text
    (ASCII only unless ``ascii_only`` is False) and that text tokenizes back
    to exactly this one token, so a suffix written out as text means what was
    optimised. Embedding rows beyond the tokenizer's vocabulary are never
    allowed.
    """
    n = min(int(vocab_size), len(tokenizer))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    texts = [str(tokenizer.decode([t])) for t in range(n)]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    allowed = torch.zeros(int(vocab_size), dtype=torch.bool)
    for t, (text, ids) in enumerate(zip(texts, encoded)):
        if t in special or not text or not text.isprintable():
            continue
        if ascii_only and not text.isascii():
            continue
        allowed[t] = list(ids) == [t]
    return allowed


@dataclass
class _GcgTemplate:
    """One prompt laid out for GCG: ``before + suffix + after + target``, all token ids."""

    before: torch.Tensor
    after: torch.Tensor
    target: torch.Tensor

    def ids(self, suffixes: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` full sequences for suffixes ``[B, L]``."""
        b = suffixes.shape[0]
        parts = [self.before.expand(b, -1), suffixes, self.after.expand(b, -1), self.target.expand(b, -1)]
        return torch.cat(parts, dim=1)

    @property
    def n_target(self) -> int:
        return int(self.target.numel())


def _templates(
    tokenizer: Any, instructions: Sequence[str], system: str | None, target: str, device: torch.device
) -> list[_GcgTemplate]:
    post = post_instruction_tokens(tokenizer, system)
    target_ids = continuation_token_ids(tokenizer, target, system=system)
    out = []
    for i, instruction in enumerate(instructions):
        ids = list(
            tokenizer(format_prompt(tokenizer, instruction, system), add_special_tokens=False)["input_ids"]
        )
        if ids[-len(post) :] != post:
            raise InvalidArgumentError(
                f"instructions[{i}] merges with the chat template when tokenized; cannot place a suffix"
            )
        out.append(
            _GcgTemplate(
                before=torch.tensor([ids[: -len(post)]], dtype=torch.long, device=device),
                after=torch.tensor([post], dtype=torch.long, device=device),
                target=torch.tensor([target_ids], dtype=torch.long, device=device),
            )
        )
    return out


def _target_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats/token) per row of ``logits [B, T, V]`` against ``target [1, T]``.

    Computed in float32, or float64 for a float64 model.
    """
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    picked = logp.gather(-1, target.expand(logits.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    return -picked.mean(dim=-1)


@torch.no_grad()
def _candidate_losses(
    model: nn.Module, template: _GcgTemplate, suffixes: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Target loss ``[B]`` of each candidate suffix ``[B, L]`` (no padding: equal lengths)."""
    t = template.n_target
    # Only the logits that predict the target are needed: the last t + 1 positions minus the very last.
    keep: dict[str, Any] = {"logits_to_keep": t + 1} if _accepts(model, "logits_to_keep") else {}
    out = []
    for start in range(0, suffixes.shape[0], chunk):
        ids = template.ids(suffixes[start : start + chunk])
        logits = model(input_ids=ids, use_cache=False, **keep).logits[:, -t - 1 : -1, :]
        out.append(_target_losses(logits, template.target))
    return torch.cat(out)


def target_loss(
    model: nn.Module,
    tokenizer: Any,
    instruction: str,
    suffix_ids: Sequence[int],
    target: str = "Sure, here is",
    *,
    system: str | None = None,
) -> float:
    """Mean cross-entropy (nats per target token) of ``target`` after ``instruction`` + token suffix.

    A plain full-sequence forward pass, independent of the search code: the
    reference GCG's reported losses are checked against.
    """
    (template,) = _templates(tokenizer, [instruction], system, target, model_device(model))
    suffix = torch.tensor([list(suffix_ids)], dtype=torch.long, device=model_device(model))
    with eval_mode(model), torch.no_grad():
        ids = template.ids(suffix)
        logits = model(input_ids=ids, use_cache=False).logits
        t = template.n_target
        return float(_target_losses(logits[:, -t - 1 : -1, :], template.target)[0])


def _one_hot_gradient(model: nn.Module, template: _GcgTemplate, suffix: torch.Tensor) -> torch.Tensor:
    """``[L, V]`` gradient (model dtype) of one prompt's target loss w.r.t. the one-hot suffix.

    Uses ``torch.autograd.grad``, so no ``.grad`` is written on the model's parameters.
    """
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    weight = embedding.weight
    one_hot = torch.zeros(suffix.numel(), weight.shape[0], dtype=weight.dtype, device=weight.device)
    one_hot.scatter_(1, suffix.reshape(-1, 1), 1.0)
    one_hot.requires_grad_(True)
    # Gemma-style input scaling happens inside the model on inputs_embeds, so the
    # fixed parts go through the embedding module and the suffix through E directly.
    with torch.no_grad():
        before = embedding(template.before)
        after = embedding(torch.cat([template.after, template.target], dim=1))
    embeds = torch.cat([before, (one_hot @ weight).unsqueeze(0), after], dim=1)
    logits = model(inputs_embeds=embeds, use_cache=False).logits
    t = template.n_target
    loss = _target_losses(logits[:, -t - 1 : -1, :], template.target)[0]
    (grad,) = torch.autograd.grad(loss, one_hot)
    return grad


def suffix_token_gradients(
    model: nn.Module,
    tokenizer: Any,
    instruction: str,
    suffix_ids: Sequence[int],
    target: str = "Sure, here is",
    *,
    system: str | None = None,
) -> torch.Tensor:
    """``[L, V]`` gradient of :func:`target_loss` w.r.t. a one-hot encoding of the suffix tokens.

    Entry ``[i, v]`` is the first-order change of the loss when position ``i``
    moves toward token ``v``: replacing token ``a`` by ``v`` changes the loss by
    about ``g[i, v] − g[i, a]``. GCG proposes the most negative entries.
    """
    device = model_device(model)
    (template,) = _templates(tokenizer, [instruction], system, target, device)
    suffix = torch.tensor(list(suffix_ids), dtype=torch.long, device=device)
    with eval_mode(model):
        return _one_hot_gradient(model, template, suffix)


def _token_gradients(
    model: nn.Module, templates: Sequence[_GcgTemplate], suffix: torch.Tensor
) -> torch.Tensor:
    """Float32 ``[L, V]`` sum over prompts of each prompt's per-position normalised one-hot gradient.

    The normalisation (as in the original GCG) keeps any one prompt from
    dominating in universal mode; for one prompt it does not change the
    per-position top-k.
    """
    total: torch.Tensor | None = None
    for template in templates:
        grad = _one_hot_gradient(model, template, suffix).float()
        grad = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        total = grad if total is None else total + grad
    assert total is not None
    return total


def _sample_candidates(
    suffix: torch.Tensor,
    grad: torch.Tensor,
    allowed: torch.Tensor,
    topk: int,
    n: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """``[n, L]`` suffixes that each replace one position by one of its top-k gradient tokens."""
    scores = (-grad).masked_fill(~allowed.to(grad.device), -torch.inf)
    k = min(topk, int(allowed.sum()))
    top = scores.topk(k, dim=1).indices.cpu()  # [L, k]
    length = suffix.numel()
    positions = torch.randint(0, length, (n,), generator=generator)
    picks = torch.randint(0, k, (n,), generator=generator)
    candidates = suffix.cpu().reshape(1, -1).repeat(n, 1)
    candidates[torch.arange(n), positions] = top[positions, picks]
    return candidates.to(suffix.device)


def _round_trips(tokenizer: Any, candidates: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: the candidate's text tokenizes back to the same ids."""
    rows = candidates.tolist()
    texts = [str(tokenizer.decode(r)) for r in rows]
    again = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([list(a) == r for a, r in zip(again, rows)], dtype=torch.bool)


@dataclass
class GcgRun:
    """Outcome of one GCG optimisation: the best suffix and the loss history (nats/token).

    ``losses[0]`` is the initial suffix's loss; ``losses[s]`` the loss of the
    suffix chosen at step ``s`` (GCG moves to the best candidate even when it
    is worse than the current suffix); ``best_loss`` is the minimum.
    """

    suffix_ids: list[int]
    suffix: str
    best_loss: float
    losses: list[float]


@dataclass(frozen=True)
class GcgAttack(JudgedAttack):
    """Greedy coordinate gradient suffix attack (see the module docstring).

    ``batch_size`` candidates are sampled per step and scored in chunks of
    ``eval_batch_size`` (default: all at once). ``init`` is the text of one
    initial suffix token, repeated ``suffix_len`` times. With
    ``filter_retokenization`` candidates whose text would tokenize differently
    are dropped (when a whole step's candidates fail, they are kept).
    """

    n_steps: int = 100
    suffix_len: int = 20
    topk: int = 256
    batch_size: int = 256
    eval_batch_size: int | None = None
    target: str = "Sure, here is"
    init: str = "!"
    universal: bool = False
    filter_retokenization: bool = True
    ascii_only: bool = True
    system: str | None = None
    max_new_tokens: int = 64
    gen_batch_size: int = 16
    seed: int = 0
    label: str = "gcg"

    def __post_init__(self) -> None:
        for name in ("n_steps", "suffix_len", "topk", "batch_size", "max_new_tokens", "gen_batch_size"):
            _check_positive_int(getattr(self, name), name)
        if self.eval_batch_size is not None:
            _check_positive_int(self.eval_batch_size, "eval_batch_size")
        if not isinstance(self.target, str) or not self.target.strip():
            raise InvalidArgumentError(f"target must be a non-blank str, got {self.target!r}")
        if not isinstance(self.init, str) or not self.init:
            raise InvalidArgumentError(f"init must be a non-empty str, got {self.init!r}")
        check_system(self.system)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidArgumentError(f"seed must be an int, got {self.seed!r}")

    @property
    def name(self) -> str:
        return self.label

    def _init_suffix(self, tokenizer: Any, allowed: torch.Tensor) -> list[int]:
        ids = list(tokenizer(self.init, add_special_tokens=False)["input_ids"])
        if len(ids) != 1 or not bool(allowed[ids[0]]):
            raise InvalidArgumentError(f"init {self.init!r} must be exactly one allowed token, got ids {ids}")
        return ids * self.suffix_len

    def _allowed(self, model: nn.Module, tokenizer: Any) -> torch.Tensor:
        vocab = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
        return allowed_suffix_tokens(tokenizer, vocab, ascii_only=self.ascii_only)

    def optimize(
        self,
        model: nn.Module,
        tokenizer: Any,
        instructions: Sequence[str],
        *,
        progress: bool = True,
        allowed: torch.Tensor | None = None,
    ) -> GcgRun:
        """One suffix minimising the mean target loss over ``instructions`` (one prompt: individual GCG).

        ``allowed`` (``[vocab]`` bool, from :func:`allowed_suffix_tokens`) saves
        recomputing the token filter when optimising many prompts.
        """
        items = check_instructions(instructions)
        device = model_device(model)
        vocab = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
        if allowed is None:
            allowed = self._allowed(model, tokenizer)
        elif (
            not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool or allowed.shape != (vocab,)
        ):
            raise InvalidArgumentError(f"allowed must be a bool tensor of shape ({vocab},)")
        if not bool(allowed.any()):
            raise EmptyInputError("no token of this tokenizer is allowed in a suffix")
        suffix = torch.tensor(self._init_suffix(tokenizer, allowed), dtype=torch.long, device=device)
        templates = _templates(tokenizer, items, self.system, self.target, device)
        chunk = self.eval_batch_size or self.batch_size
        generator = torch.Generator().manual_seed(self.seed)
        with eval_mode(model):

            def mean_loss(cands: torch.Tensor) -> torch.Tensor:
                total = torch.zeros(cands.shape[0], dtype=torch.float64, device=device)
                for template in templates:
                    total += _candidate_losses(model, template, cands, chunk)
                return total / len(templates)

            current_loss = float(mean_loss(suffix.reshape(1, -1))[0])
            best, best_loss, losses = suffix.clone(), current_loss, [current_loss]
            for _ in tqdm(range(self.n_steps), desc="gcg", disable=not progress, leave=False):
                grad = _token_gradients(model, templates, suffix)
                cands = _sample_candidates(suffix, grad, allowed, self.topk, self.batch_size, generator)
                if self.filter_retokenization:
                    keep = _round_trips(tokenizer, cands)
                    if bool(keep.any()):
                        cands = cands[keep.to(cands.device)]
                cand_losses = mean_loss(cands)
                j = int(cand_losses.argmin())
                suffix, current_loss = cands[j].clone(), float(cand_losses[j])
                losses.append(current_loss)
                if current_loss < best_loss:
                    best, best_loss = suffix.clone(), current_loss
        ids = best.tolist()
        return GcgRun(ids, str(tokenizer.decode(ids)), best_loss, losses)

    def completions(
        self,
        model: nn.Module,
        tokenizer: Any,
        instructions: list[str],
        *,
        progress: bool,
        cache: GenerationCache | None,
    ) -> tuple[list[Completions], list[dict[str, Any]]]:
        """Optimise the suffix(es), then complete every prompt with its suffix (greedy, no cache)."""
        allowed = self._allowed(model, tokenizer)
        if self.universal:
            shared = self.optimize(model, tokenizer, instructions, progress=progress, allowed=allowed)
            runs = [shared] * len(instructions)
        else:
            runs = [
                self.optimize(model, tokenizer, [instr], progress=False, allowed=allowed)
                for instr in tqdm(instructions, desc="gcg prompts", disable=not progress)
            ]
        texts = generate(
            model,
            tokenizer,
            instructions,
            system=self.system,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.gen_batch_size,
            suffixes=[r.suffix_ids for r in runs],
            progress=False,
        )
        configs = [{"suffix": r.suffix, "universal": self.universal} for r in runs]
        details = [{"suffix_ids": r.suffix_ids, "best_loss": r.best_loss, "losses": r.losses} for r in runs]
        return [Completions("gcg", list(range(len(instructions))), configs, texts)], details


def gcg_optimize(
    model: nn.Module,
    tokenizer: Any,
    instructions: Sequence[str],
    config: GcgAttack | None = None,
    *,
    progress: bool = True,
) -> GcgRun:
    """Functional form of :meth:`GcgAttack.optimize` (default settings when ``config`` is None)."""
    return (config or GcgAttack()).optimize(model, tokenizer, instructions, progress=progress)


#: The study's GCG: one universal suffix on the first ``gcg_prompts`` harmful prompts, when the
#: settings give it a budget. Its prompts carry the optimised suffix, so it shares no prefill.
register_attack(
    AttackSpec(
        "gcg",
        lambda s, **budget: s.gcg_attack(**budget) if s.runs_gcg else None,
        shares_prefill=False,
        n_prompts=lambda s: s.gcg_prompts,
        not_paired="one universal suffix per model: per-prompt outcomes are not independent",
    )
)
