"""Jailbreak attacks, attack success rate (ASR) and over-refusal.

An attack is a frozen configuration object with a ``name`` and a
``run(model, tokenizer, instructions, judge)`` method that returns an
:class:`AsrResult`: the ASR, one :class:`AttackResult` per prompt (every
completion tried, under which configuration, and the judge's verdict) and,
for attacks with several configurations, the rate of each configuration.

* :class:`VanillaAttack` — the prompt as is, greedy, optionally under a system
  prompt.
* :class:`DecodingAttack` — sampling over a grid of temperature × top-p ×
  top-k with ``n_samples`` draws per configuration; a prompt is broken when
  ANY draw of ANY configuration is judged jailbroken. Per-configuration rates
  (share of prompts that configuration alone breaks) are kept.
* :class:`GcgAttack` — greedy coordinate gradient suffix search, written for
  this project: gradients of the target loss with respect to a one-hot
  encoding of the suffix tokens (through the embedding matrix) propose the
  top-k substitutions per position; random single-token substitutions drawn
  from them are scored in batches; the best candidate becomes the next
  suffix; a fixed step budget. By default one suffix per prompt (the stronger
  "individual" setting); ``universal=True`` optimises one suffix for the mean
  loss over all prompts.

Example:
    >>> from refusal_core.testing.tiny import tiny_model, tiny_tokenizer
    >>> from refusal_core.evaluation.judges import SubstringJudge
    >>> model, tok = tiny_model(), tiny_tokenizer()
    >>> res = VanillaAttack(max_new_tokens=4).run(model, tok, ["Tell me a story."], SubstringJudge(),
    ...                                           progress=False)
    >>> 0.0 <= res.asr <= 1.0
    True
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from tqdm.auto import tqdm

from refusal_core.artifacts import atomic_write_json
from refusal_core.errors import ArtifactError, EmptyInputError, InvalidArgumentError, RefusalCoreError
from refusal_core.evaluation.generation import (
    GenerationCache,
    SamplingConfig,
    _accepts,
    _check_positive_int,
    eval_mode,
    generate,
    generate_ids_multi,
)
from refusal_core.evaluation.judges import Judge
from refusal_core.evaluation.scores import continuation_token_ids
from refusal_core.model import (
    check_instructions,
    encode_prompts,
    format_prompt,
    model_device,
    model_identity,
    post_instruction_tokens,
)

__all__ = [
    "AsrResult",
    "Attack",
    "AttackResult",
    "Attempt",
    "DecodingAttack",
    "GcgAttack",
    "GcgRun",
    "OverRefusalResult",
    "VanillaAttack",
    "allowed_suffix_tokens",
    "evaluate_asr",
    "gcg_optimize",
    "over_refusal",
    "prefill_shared_generations",
    "suffix_token_gradients",
    "target_loss",
]

_FORMAT = "refusal_core.asr/1"


# ----------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------


@dataclass
class Attempt:
    """One completion tried against a prompt: the configuration it came from and the verdict."""

    config: dict[str, Any]
    completion: str
    jailbroken: bool


@dataclass
class AttackResult:
    """One prompt under one attack: broken when any attempt is jailbroken.

    ``details`` holds attack-specific data (GCG: the suffix, its ids and the
    loss history).
    """

    instruction: str
    attempts: list[Attempt]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def jailbroken(self) -> bool:
        return any(a.jailbroken for a in self.attempts)

    @property
    def completions(self) -> list[str]:
        return [a.completion for a in self.attempts]


def _identity(model: nn.Module) -> dict[str, Any]:
    try:
        return model_identity(model)
    except RefusalCoreError:
        # Attacks run on any causal LM; record at least the class for others.
        return {"class": type(model).__name__}


def _records_to_json(records: Sequence[AttackResult]) -> list[dict[str, Any]]:
    return [{**asdict(r), "jailbroken": r.jailbroken} for r in records]


def _records_from_json(items: Any) -> list[AttackResult]:
    return [
        AttackResult(
            instruction=str(r["instruction"]),
            attempts=[
                Attempt(dict(a["config"]), str(a["completion"]), bool(a["jailbroken"])) for a in r["attempts"]
            ],
            details=dict(r.get("details", {})),
        )
        for r in items
    ]


def _write_json_atomic(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    out = Path(path)
    atomic_write_json(out, payload)
    return out


def _read_json(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{kind} file {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{kind} file {str(p)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("kind") != kind:
        raise ArtifactError(f"{str(p)!r} is not a refusal_core {kind} file (format {_FORMAT})")
    return data


@dataclass
class AsrResult:
    """Attack success rate of one attack over a prompt set, with every per-prompt record.

    ``config_rates`` maps a configuration label (e.g. ``"T=0.7,p=0.9,k=40"``)
    to the share of prompts that configuration alone breaks.
    """

    attack: str
    judge: str
    records: list[AttackResult]
    config_rates: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def n_prompts(self) -> int:
        return len(self.records)

    @property
    def n_jailbroken(self) -> int:
        return sum(r.jailbroken for r in self.records)

    @property
    def asr(self) -> float:
        """Share of prompts broken, in [0, 1]."""
        return self.n_jailbroken / self.n_prompts if self.records else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "kind": "asr",
            "attack": self.attack,
            "judge": self.judge,
            "asr": self.asr,
            "n_prompts": self.n_prompts,
            "n_jailbroken": self.n_jailbroken,
            "config_rates": self.config_rates,
            "settings": self.settings,
            "model": self.model,
            "records": _records_to_json(self.records),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AsrResult:
        try:
            return cls(
                attack=str(data["attack"]),
                judge=str(data["judge"]),
                records=_records_from_json(data["records"]),
                config_rates={str(k): float(v) for k, v in data.get("config_rates", {}).items()},
                settings=dict(data.get("settings", {})),
                model=dict(data.get("model", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"ASR record is missing or has a malformed field: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write JSON atomically; returns the path."""
        return _write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AsrResult:
        return cls.from_dict(_read_json(path, "asr"))


@dataclass
class OverRefusalResult:
    """Share of harmless prompts the model refused (the judge said it did not comply)."""

    judge: str
    records: list[AttackResult]
    settings: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def n_prompts(self) -> int:
        return len(self.records)

    @property
    def n_refused(self) -> int:
        return sum(not r.jailbroken for r in self.records)

    @property
    def rate(self) -> float:
        """Share of harmless prompts refused, in [0, 1]."""
        return self.n_refused / self.n_prompts if self.records else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "kind": "over_refusal",
            "judge": self.judge,
            "rate": self.rate,
            "n_prompts": self.n_prompts,
            "n_refused": self.n_refused,
            "settings": self.settings,
            "model": self.model,
            "records": _records_to_json(self.records),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OverRefusalResult:
        try:
            return cls(
                judge=str(data["judge"]),
                records=_records_from_json(data["records"]),
                settings=dict(data.get("settings", {})),
                model=dict(data.get("model", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"over-refusal record is missing or has a malformed field: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> Path:
        return _write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OverRefusalResult:
        return cls.from_dict(_read_json(path, "over_refusal"))


# ----------------------------------------------------------------------------
# the attack protocol and the simple attacks
# ----------------------------------------------------------------------------


@runtime_checkable
class Attack(Protocol):
    """A configured attack: ``run`` returns the ASR with per-prompt records."""

    @property
    def name(self) -> str: ...

    def run(
        self,
        model: nn.Module,
        tokenizer: Any,
        instructions: Sequence[str],
        judge: Judge,
        *,
        progress: bool = True,
    ) -> AsrResult: ...


def _check_judge(judge: object) -> Judge:
    if not isinstance(judge, Judge):
        raise InvalidArgumentError(
            "judge must have a name and a judge(instructions, completions) method, "
            f"got {type(judge).__name__}"
        )
    return judge


def _verdicts(judge: Judge, instructions: Sequence[str], completions: Sequence[str]) -> list[bool]:
    verdicts = list(judge.judge(list(instructions), list(completions)))
    if len(verdicts) != len(completions):
        raise InvalidArgumentError(
            f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(completions)} completions"
        )
    return [bool(v) for v in verdicts]


def _settings(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON values (tuples become lists): records compare equal after a reload."""
    return dict(json.loads(json.dumps(asdict(config))))


def _check_system(system: object) -> None:
    if system is not None and not isinstance(system, str):
        raise InvalidArgumentError(f"system must be a str or None, got {type(system).__name__}")


@dataclass(frozen=True)
class VanillaAttack:
    """The harmful instruction as is, greedy decoding; ``system`` adds a system prompt."""

    system: str | None = None
    max_new_tokens: int = 64
    batch_size: int = 16
    label: str | None = None

    def __post_init__(self) -> None:
        _check_system(self.system)
        _check_positive_int(self.max_new_tokens, "max_new_tokens")
        _check_positive_int(self.batch_size, "batch_size")

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return "vanilla" if self.system is None else "vanilla_system"

    def run(
        self,
        model: nn.Module,
        tokenizer: Any,
        instructions: Sequence[str],
        judge: Judge,
        *,
        progress: bool = True,
        cache: GenerationCache | None = None,
    ) -> AsrResult:
        """Greedy completions judged; with ``cache`` a generation already memoised is reused."""
        items = check_instructions(instructions)
        judge = _check_judge(judge)
        completions = generate(
            model,
            tokenizer,
            items,
            system=self.system,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            cache=cache,
            progress=progress,
        )
        verdicts = _verdicts(judge, items, completions)
        config = {"decoding": "greedy", "system": self.system}
        records = [
            AttackResult(i, [Attempt(dict(config), c, v)]) for i, c, v in zip(items, completions, verdicts)
        ]
        return AsrResult(
            attack=self.name,
            judge=judge.name,
            records=records,
            config_rates={"greedy": sum(verdicts) / len(verdicts)},
            settings=_settings(self),
            model=_identity(model),
        )


def _config_seed(seed: int, label: str) -> int:
    """A seed per configuration that does not depend on which other configurations are in the grid."""
    digest = hashlib.sha256(f"{seed}:{label}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


@dataclass(frozen=True)
class DecodingAttack:
    """Sampling over ``temperatures × top_ps × top_ks``, ``n_samples`` draws per configuration.

    A prompt counts as broken when any draw under any configuration is judged
    jailbroken. ``top_k = 0`` means no top-k filter. Each configuration draws
    from its own generator seeded by ``seed`` and its label, so results are
    reproducible and a configuration's draws do not change when the grid does.
    """

    temperatures: tuple[float, ...] = (0.7, 1.0, 1.3)
    top_ps: tuple[float, ...] = (0.9, 1.0)
    top_ks: tuple[int, ...] = (0, 40)
    n_samples: int = 1
    system: str | None = None
    max_new_tokens: int = 64
    batch_size: int = 16
    seed: int = 0
    label: str = "decoding"

    def __post_init__(self) -> None:
        for name in ("temperatures", "top_ps", "top_ks"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or not value:
                raise InvalidArgumentError(f"{name} must be a non-empty tuple, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        _check_system(self.system)
        _check_positive_int(self.n_samples, "n_samples")
        _check_positive_int(self.max_new_tokens, "max_new_tokens")
        _check_positive_int(self.batch_size, "batch_size")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidArgumentError(f"seed must be an int, got {self.seed!r}")
        labels = [c.label for c in self.configs]  # validates every value
        if len(set(labels)) != len(labels):
            raise InvalidArgumentError(f"the grid repeats a configuration: {labels}")

    @property
    def name(self) -> str:
        return self.label

    @property
    def configs(self) -> list[SamplingConfig]:
        """The grid, temperature-major."""
        return [
            SamplingConfig(temperature=t, top_p=p, top_k=k)
            for t, p, k in itertools.product(self.temperatures, self.top_ps, self.top_ks)
        ]

    def run(
        self,
        model: nn.Module,
        tokenizer: Any,
        instructions: Sequence[str],
        judge: Judge,
        *,
        progress: bool = True,
        cache: GenerationCache | None = None,
    ) -> AsrResult:
        """Every configuration decoded from one prefill per prompt batch (:func:`generate_ids_multi`).

        The draws are token for token those of one :func:`generate` call per
        configuration with its :func:`_config_seed`; ``cache`` memoises them.
        """
        items = check_instructions(instructions)
        judge = _check_judge(judge)
        n, s = len(items), self.n_samples
        # Sample j of prompt i sits at j * n + i.
        repeated = [items[i] for _ in range(s) for i in range(n)]
        attempts: list[list[Attempt]] = [[] for _ in items]
        config_rates: dict[str, float] = {}
        configs = self.configs
        token_ids = generate_ids_multi(
            model,
            tokenizer,
            encode_prompts(tokenizer, repeated, system=self.system),
            configs,
            [_config_seed(self.seed, cfg.label) for cfg in configs],
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            cache=cache,
            progress=progress,
            desc="decoding grid",
        )
        for cfg, ids in zip(configs, token_ids):
            completions = [str(tokenizer.decode(t, skip_special_tokens=True)) for t in ids]
            verdicts = _verdicts(judge, repeated, completions)
            broken = [False] * n
            for k, (completion, verdict) in enumerate(zip(completions, verdicts)):
                i, j = k % n, k // n
                attempts[i].append(Attempt({**cfg.as_dict(), "sample": j}, completion, verdict))
                broken[i] = broken[i] or verdict
            config_rates[cfg.label] = sum(broken) / n
        records = [AttackResult(instr, att) for instr, att in zip(items, attempts)]
        return AsrResult(
            attack=self.name,
            judge=judge.name,
            records=records,
            config_rates=config_rates,
            settings=_settings(self),
            model=_identity(model),
        )


def prefill_shared_generations(
    model: nn.Module,
    tokenizer: Any,
    instructions: Sequence[str],
    attacks: Sequence[VanillaAttack | DecodingAttack],
    cache: GenerationCache,
    *,
    progress: bool = True,
) -> int:
    """Generate into ``cache`` every completion the ``attacks`` will ask for, one prefill per group.

    Attacks whose prompts are the same token ids (same system prompt, same
    number of samples) and that share ``max_new_tokens`` and ``batch_size``
    form one group: a vanilla attack and a decoding grid on the same prompts
    are served by ONE prefill per prompt batch, forked for greedy decoding and
    for every grid configuration (:func:`generate_ids_multi`). Afterwards
    ``attack.run(..., cache=cache)`` finds every generation in the memo, with
    results identical to a cold run. Returns the number of groups (= prefill
    passes over the prompt set).

    Example:
        >>> from refusal_core.evaluation.generation import GenerationCache
        >>> from refusal_core.evaluation.judges import SubstringJudge
        >>> from refusal_core.testing.tiny import tiny_model, tiny_tokenizer
        >>> model, tok, memo = tiny_model(), tiny_tokenizer(), GenerationCache()
        >>> attacks = [VanillaAttack(max_new_tokens=4), DecodingAttack(max_new_tokens=4)]
        >>> prefill_shared_generations(model, tok, ["Hi"], attacks, memo, progress=False)
        1
        >>> res = [a.run(model, tok, ["Hi"], SubstringJudge(), progress=False, cache=memo) for a in attacks]
        >>> memo.hits, memo.misses
        (13, 13)
    """
    items = check_instructions(instructions)
    if not isinstance(cache, GenerationCache):
        raise InvalidArgumentError(f"cache must be a GenerationCache, got {type(cache).__name__}")
    groups: dict[tuple[Any, ...], list[tuple[SamplingConfig | None, int]]] = {}
    for i, attack in enumerate(attacks):
        if isinstance(attack, VanillaAttack):
            key = (attack.system, 1, attack.max_new_tokens, attack.batch_size)
            wanted: list[tuple[SamplingConfig | None, int]] = [(None, 0)]
        elif isinstance(attack, DecodingAttack):
            key = (attack.system, attack.n_samples, attack.max_new_tokens, attack.batch_size)
            wanted = [(cfg, _config_seed(attack.seed, cfg.label)) for cfg in attack.configs]
        else:
            raise InvalidArgumentError(
                f"attacks[{i}] must be a VanillaAttack or a DecodingAttack, got {type(attack).__name__}"
            )
        group = groups.setdefault(key, [])
        group.extend(w for w in wanted if w not in group)
    for (system, n_samples, max_new_tokens, batch_size), runs in groups.items():
        repeated = [items[i] for _ in range(n_samples) for i in range(len(items))]
        generate_ids_multi(
            model,
            tokenizer,
            encode_prompts(tokenizer, repeated, system=system),
            [sampling for sampling, _ in runs],
            [seed for _, seed in runs],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            cache=cache,
            progress=progress,
            desc="shared prefill",
        )
    return len(groups)


# ----------------------------------------------------------------------------
# GCG
# ----------------------------------------------------------------------------


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
class GcgAttack:
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
        _check_system(self.system)
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

    def run(
        self,
        model: nn.Module,
        tokenizer: Any,
        instructions: Sequence[str],
        judge: Judge,
        *,
        progress: bool = True,
    ) -> AsrResult:
        items = check_instructions(instructions)
        judge = _check_judge(judge)
        allowed = self._allowed(model, tokenizer)
        if self.universal:
            shared = self.optimize(model, tokenizer, items, progress=progress, allowed=allowed)
            runs = [shared] * len(items)
        else:
            runs = [
                self.optimize(model, tokenizer, [instr], progress=False, allowed=allowed)
                for instr in tqdm(items, desc="gcg prompts", disable=not progress)
            ]
        completions = generate(
            model,
            tokenizer,
            items,
            system=self.system,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.gen_batch_size,
            suffixes=[r.suffix_ids for r in runs],
            progress=False,
        )
        verdicts = _verdicts(judge, items, completions)
        records = [
            AttackResult(
                instr,
                [Attempt({"suffix": r.suffix, "universal": self.universal}, c, v)],
                details={"suffix_ids": r.suffix_ids, "best_loss": r.best_loss, "losses": r.losses},
            )
            for instr, r, c, v in zip(items, runs, completions, verdicts)
        ]
        return AsrResult(
            attack=self.name,
            judge=judge.name,
            records=records,
            config_rates={"gcg": sum(verdicts) / len(verdicts)},
            settings=_settings(self),
            model=_identity(model),
        )


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


# ----------------------------------------------------------------------------
# evaluation entry points
# ----------------------------------------------------------------------------


def evaluate_asr(
    model: nn.Module,
    tokenizer: Any,
    harmful_instructions: Sequence[str],
    attacks: Sequence[Attack],
    judge: Judge,
    *,
    progress: bool = True,
) -> dict[str, AsrResult]:
    """Run every attack on the harmful instructions; results keyed by attack name (names must be unique)."""
    items = check_instructions(harmful_instructions, "harmful_instructions")
    judge = _check_judge(judge)
    if isinstance(attacks, Attack) or not isinstance(attacks, Sequence) or not attacks:
        raise EmptyInputError("attacks must be a non-empty sequence of attacks")
    for i, attack in enumerate(attacks):
        if not isinstance(attack, Attack):
            raise InvalidArgumentError(f"attacks[{i}] is not an attack: {type(attack).__name__}")
    names = [a.name for a in attacks]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"attack names must be unique, got {names}")
    return {a.name: a.run(model, tokenizer, items, judge, progress=progress) for a in attacks}


def over_refusal(
    model: nn.Module,
    tokenizer: Any,
    harmless_instructions: Sequence[str],
    judge: Judge,
    *,
    system: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
) -> OverRefusalResult:
    """Greedy completions of harmless instructions; a prompt is refused when the judge says it did not comply.

    With :class:`~refusal_core.evaluation.judges.SubstringJudge`, its
    ``min_words`` rule also counts very short answers as refused: use a small
    value (e.g. 1) when harmless answers can legitimately be short.
    """
    items = check_instructions(harmless_instructions, "harmless_instructions")
    judge = _check_judge(judge)
    _check_system(system)
    completions = generate(
        model,
        tokenizer,
        items,
        system=system,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    verdicts = _verdicts(judge, items, completions)
    config = {"decoding": "greedy", "system": system}
    records = [
        AttackResult(i, [Attempt(dict(config), c, v)]) for i, c, v in zip(items, completions, verdicts)
    ]
    return OverRefusalResult(
        judge=judge.name,
        records=records,
        settings={"system": system, "max_new_tokens": max_new_tokens},
        model=_identity(model),
    )
