"""Jailbreak attacks, attack success rate (ASR) and over-refusal.

An attack is a frozen configuration object with a ``name`` and a
``run(model, tokenizer, instructions, judge)`` method that returns an
:class:`~refusal_core.evaluation.results.AsrResult`: the ASR, one record per
prompt (every completion tried, under which configuration, and the judge's
verdict) and, for attacks with several configurations, the rate of each.

Every attack here runs the same template (:class:`JudgedAttack`): check the
inputs, generate one or more sets of completions (:class:`Completions`), judge
each set, assemble the result. An attack only says how it generates.

* :class:`VanillaAttack` — the prompt as is, greedy, optionally under a system
  prompt.
* :class:`DecodingAttack` — sampling over a grid of temperature × top-p ×
  top-k with ``n_samples`` draws per configuration; a prompt is broken when
  ANY draw of ANY configuration is judged jailbroken. Per-configuration rates
  (share of prompts that configuration alone breaks) are kept.
* GCG lives in :mod:`refusal_core.evaluation.gcg` and runs the same template.

The registry :data:`ATTACKS` names every attack the study, the audit and
``refusal-core evaluate`` can run (:class:`AttackSpec`: how to build it from
the attack settings, whether its generations can come from one shared prefill,
how many prompts it takes, whether per-prompt paired tests apply). Adding an
attack is one :func:`register_attack` call: :func:`build_attacks` and
:func:`run_attacks` read the registry, and :func:`prefill_shared_generations`
asks each attack for its own prefill plan (an attack with none generates by
itself).

:func:`over_refusal` is the vanilla attack on harmless prompts, counted the
other way round (a prompt the judge says was not answered is refused).

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from torch import nn

from refusal_core.errors import EmptyInputError, InvalidArgumentError
from refusal_core.evaluation.generation import (
    GenerationCache,
    SamplingConfig,
    _check_positive_int,
    generate,
    generate_ids_multi,
)
from refusal_core.evaluation.judges import Judge
from refusal_core.evaluation.results import (
    AsrResult,
    AttackResult,
    Attempt,
    OverRefusalResult,
    result_model_identity,
)
from refusal_core.model import check_instructions, encode_prompts

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackSpec",
    "Completions",
    "DecodingAttack",
    "JudgedAttack",
    "PlannedAttack",
    "VanillaAttack",
    "build_attacks",
    "check_judge",
    "check_system",
    "evaluate_asr",
    "over_refusal",
    "prefill_shared_generations",
    "register_attack",
    "run_attacks",
]


# ----------------------------------------------------------------------------
# the attack protocol and the template every attack here runs
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


def check_judge(judge: object) -> Judge:
    """``judge`` as a :class:`~refusal_core.evaluation.judges.Judge`, else InvalidArgumentError."""
    if not isinstance(judge, Judge):
        raise InvalidArgumentError(
            "judge must have a name and a judge(instructions, completions) method, "
            f"got {type(judge).__name__}"
        )
    return judge


def check_system(system: object) -> None:
    """A system prompt is a str or None."""
    if system is not None and not isinstance(system, str):
        raise InvalidArgumentError(f"system must be a str or None, got {type(system).__name__}")


def _verdicts(
    judge: Judge, instructions: Sequence[str], completions: Sequence[str]
) -> tuple[list[bool], list[str | None]]:
    """The judge's calls and, for a judge that has them (a classifier), its raw verdicts to keep."""
    with_raw = getattr(judge, "judge_with_verdicts", None)
    if callable(with_raw):
        verdicts, raw = with_raw(list(instructions), list(completions))
        texts: list[str | None] = [str(t) for t in raw]
    else:
        verdicts = list(judge.judge(list(instructions), list(completions)))
        texts = [None] * len(verdicts)
    if len(verdicts) != len(completions) or len(texts) != len(completions):
        raise InvalidArgumentError(
            f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(completions)} completions"
        )
    return [bool(v) for v in verdicts], texts


def _settings(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON values (tuples become lists): records compare equal after a reload."""
    return dict(json.loads(json.dumps(asdict(config))))


@dataclass(frozen=True)
class Completions:
    """One configuration's completions, before judging.

    ``prompts[k]`` is the index (into the attack's instructions) of the prompt
    ``texts[k]`` answers and ``configs[k]`` the configuration recorded with it;
    ``label`` keys the configuration's rate (share of prompts any of its
    completions breaks).
    """

    label: str
    prompts: list[int]
    configs: list[dict[str, Any]]
    texts: list[str]


class JudgedAttack:
    """The template of an attack: check → generate (:meth:`completions`) → judge → result.

    A subclass is a frozen dataclass with a ``name`` that implements
    :meth:`completions`; it may attach per-prompt ``details`` to the records.
    """

    @property
    def name(self) -> str:
        """The attack's name: the key of its result."""
        raise NotImplementedError

    def completions(
        self,
        model: nn.Module,
        tokenizer: Any,
        instructions: list[str],
        *,
        progress: bool,
        cache: GenerationCache | None,
    ) -> tuple[list[Completions], list[dict[str, Any]] | None]:
        """The completion sets of this attack and, optionally, per-prompt details."""
        raise NotImplementedError

    def prefill_plan(self) -> tuple[tuple[Any, ...], list[tuple[SamplingConfig | None, int]]] | None:
        """``(group key, [(sampling or None for greedy, seed), ...])`` when this attack's generations
        can be served by a shared prefill (:func:`prefill_shared_generations`), else None.

        Attacks with the same group key decode the same prompt token ids (system prompt, samples)
        at the same budget; each wants one decoding per listed configuration.
        """
        return None

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
        """Judge every completion; with ``cache`` a generation already memoised is reused."""
        items = check_instructions(instructions)
        judge = check_judge(judge)
        sets, details = self.completions(model, tokenizer, items, progress=progress, cache=cache)
        attempts: list[list[Attempt]] = [[] for _ in items]
        config_rates: dict[str, float] = {}
        for s in sets:
            verdicts, raw = _verdicts(judge, [items[i] for i in s.prompts], s.texts)
            broken = [False] * len(items)
            for i, config, text, verdict, said in zip(s.prompts, s.configs, s.texts, verdicts, raw):
                attempts[i].append(Attempt(config, text, verdict, said))
                broken[i] = broken[i] or verdict
            config_rates[s.label] = sum(broken) / len(items)
        records = [
            AttackResult(instr, att, details=dict(details[i]) if details is not None else {})
            for i, (instr, att) in enumerate(zip(items, attempts))
        ]
        return AsrResult(
            attack=self.name,
            judge=judge.name,
            records=records,
            config_rates=config_rates,
            settings=_settings(self),
            model=result_model_identity(model),
        )


# ----------------------------------------------------------------------------
# the simple attacks
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VanillaAttack(JudgedAttack):
    """The harmful instruction as is, greedy decoding; ``system`` adds a system prompt."""

    system: str | None = None
    max_new_tokens: int = 64
    batch_size: int = 16
    label: str | None = None

    def __post_init__(self) -> None:
        check_system(self.system)
        _check_positive_int(self.max_new_tokens, "max_new_tokens")
        _check_positive_int(self.batch_size, "batch_size")

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return "vanilla" if self.system is None else "vanilla_system"

    def completions(
        self,
        model: nn.Module,
        tokenizer: Any,
        instructions: list[str],
        *,
        progress: bool,
        cache: GenerationCache | None,
    ) -> tuple[list[Completions], None]:
        texts = generate(
            model,
            tokenizer,
            instructions,
            system=self.system,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            cache=cache,
            progress=progress,
        )
        config = {"decoding": "greedy", "system": self.system}
        n = len(instructions)
        return [Completions("greedy", list(range(n)), [dict(config) for _ in range(n)], texts)], None

    def prefill_plan(self) -> tuple[tuple[Any, ...], list[tuple[SamplingConfig | None, int]]]:
        return (self.system, 1, self.max_new_tokens, self.batch_size), [(None, 0)]


def _config_seed(seed: int, label: str) -> int:
    """A seed per configuration that does not depend on which other configurations are in the grid."""
    digest = hashlib.sha256(f"{seed}:{label}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


@dataclass(frozen=True)
class DecodingAttack(JudgedAttack):
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
        check_system(self.system)
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

    def completions(
        self,
        model: nn.Module,
        tokenizer: Any,
        instructions: list[str],
        *,
        progress: bool,
        cache: GenerationCache | None,
    ) -> tuple[list[Completions], None]:
        """Every configuration decoded from one prefill per prompt batch (:func:`generate_ids_multi`).

        The draws are token for token those of one :func:`generate` call per
        configuration with its :func:`_config_seed`; ``cache`` memoises them.
        """
        n, s = len(instructions), self.n_samples
        # Sample j of prompt i sits at j * n + i.
        repeated = [instructions[i] for _ in range(s) for i in range(n)]
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
        sets = [
            Completions(
                cfg.label,
                [k % n for k in range(n * s)],
                [{**cfg.as_dict(), "sample": k // n} for k in range(n * s)],
                [str(tokenizer.decode(t, skip_special_tokens=True)) for t in ids],
            )
            for cfg, ids in zip(configs, token_ids)
        ]
        return sets, None

    def prefill_plan(self) -> tuple[tuple[Any, ...], list[tuple[SamplingConfig | None, int]]]:
        key = (self.system, self.n_samples, self.max_new_tokens, self.batch_size)
        return key, [(cfg, _config_seed(self.seed, cfg.label)) for cfg in self.configs]


def prefill_shared_generations(
    model: nn.Module,
    tokenizer: Any,
    instructions: Sequence[str],
    attacks: Sequence[Attack],
    cache: GenerationCache,
    *,
    progress: bool = True,
    engine: Any = None,
) -> int:
    """Generate into ``cache`` every completion the ``attacks`` will ask for, one prefill per group.

    Attacks whose prompts are the same token ids (same system prompt, same
    number of samples) and that share ``max_new_tokens`` and ``batch_size``
    form one group: a vanilla attack and a decoding grid on the same prompts
    are served by ONE prefill per prompt batch, forked for greedy decoding and
    for every grid configuration (:func:`generate_ids_multi`). Afterwards
    ``attack.run(..., cache=cache)`` finds every generation in the memo, with
    results identical to a cold run. An attack whose ``prefill_plan()`` is None
    (or that has none) is left to generate by itself. Returns the number of
    groups (= prefill passes over the prompt set). ``engine``: an open evaluation engine (e.g. vLLM
    serving this model's checkpoint, :mod:`refusal_core.evaluation.engines`) that generates instead of
    the torch loop.

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
    for attack in attacks:
        # An attack without a plan (GCG: its prompts carry an optimised suffix) generates by itself.
        plan = getattr(attack, "prefill_plan", lambda: None)()
        if plan is None:
            continue
        key, wanted = plan
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
            engine=engine,
        )
    return len(groups)


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
    cache: GenerationCache | None = None,
) -> dict[str, AsrResult]:
    """Run every attack on the harmful instructions; results keyed by attack name (names must be unique).

    ``cache``: a generation memo passed to the attacks of this module's template (e.g. filled by
    another engine, :mod:`refusal_core.evaluation.engines`)."""
    items = check_instructions(harmful_instructions, "harmful_instructions")
    judge = check_judge(judge)
    if isinstance(attacks, Attack) or not isinstance(attacks, Sequence) or not attacks:
        raise EmptyInputError("attacks must be a non-empty sequence of attacks")
    for i, attack in enumerate(attacks):
        if not isinstance(attack, Attack):
            raise InvalidArgumentError(f"attacks[{i}] is not an attack: {type(attack).__name__}")
    names = [a.name for a in attacks]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"attack names must be unique, got {names}")
    memo: dict[str, Any] = {"cache": cache} if cache is not None else {}
    return {
        a.name: a.run(
            model, tokenizer, items, judge, progress=progress, **(memo if isinstance(a, JudgedAttack) else {})
        )
        for a in attacks
    }


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
    cache: GenerationCache | None = None,
) -> OverRefusalResult:
    """Greedy completions of harmless instructions; a prompt is refused when the judge says it did not comply.

    The records are those of :class:`VanillaAttack` on the same prompts. With
    :class:`~refusal_core.evaluation.judges.SubstringJudge`, its ``min_words``
    rule also counts very short answers as refused: use a small value (e.g. 1)
    when harmless answers can legitimately be short. ``cache``: a generation memo, as for the attacks.
    """
    items = check_instructions(harmless_instructions, "harmless_instructions")
    judge = check_judge(judge)
    attack = VanillaAttack(system=system, max_new_tokens=max_new_tokens, batch_size=batch_size)
    res = attack.run(model, tokenizer, items, judge, progress=progress, cache=cache)
    return OverRefusalResult(
        judge=res.judge,
        records=res.records,
        settings={"system": system, "max_new_tokens": max_new_tokens},
        model=res.model,
    )


# ----------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack: how to build it and how the study treats it.

    ``build(settings, max_new_tokens=, batch_size=, seed=)`` returns the configured attack from
    the attack settings (:class:`~refusal_core.study.config.AttackSettings` or any object with
    the fields the builder reads), or None when the settings disable it (e.g. a zero GCG
    budget). ``shares_prefill``: its generations can come from one prefill shared with the other
    attacks (its ``prefill_plan()`` says how) and from the run's memo of generations.
    ``n_prompts(settings)``: how many of the harmful prompts it runs on (None: all).
    ``not_paired``: why per-prompt paired tests do not apply to it (None: they do).
    """

    name: str
    build: Callable[..., JudgedAttack | None]
    shares_prefill: bool
    n_prompts: Callable[[Any], int | None] = lambda settings: None
    not_paired: str | None = None


#: Every attack the study, the audit and ``refusal-core evaluate`` can run, by name.
ATTACKS: dict[str, AttackSpec] = {}


def register_attack(spec: AttackSpec) -> AttackSpec:
    """Add ``spec`` to :data:`ATTACKS` (a name registered twice is refused); returns it."""
    if not isinstance(spec, AttackSpec):
        raise InvalidArgumentError(f"spec must be an AttackSpec, got {type(spec).__name__}")
    if spec.name in ATTACKS:
        raise InvalidArgumentError(f"attack {spec.name!r} is already registered")
    ATTACKS[spec.name] = spec
    return spec


def check_attack_names(names: object) -> tuple[str, ...]:
    """``names`` as a tuple of distinct registered attack names, else InvalidArgumentError."""
    if isinstance(names, (str, bytes)) or not isinstance(names, (tuple, list)) or not names:
        raise InvalidArgumentError(f"attack names must be a non-empty tuple, got {names!r}")
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise InvalidArgumentError(f"unknown attack(s) {unknown}; registered: {sorted(ATTACKS)}")
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"attack names repeat: {list(names)}")
    return tuple(str(n) for n in names)


@dataclass(frozen=True)
class PlannedAttack:
    """A registered attack configured for one run, with the number of prompts it takes (None: all)."""

    spec: AttackSpec
    attack: JudgedAttack
    n_prompts: int | None


def build_attacks(settings: Any, *, max_new_tokens: int, batch_size: int, seed: int) -> list[PlannedAttack]:
    """The attacks ``settings.names`` selects, built from ``settings``, in that order.

    An attack its settings disable (its builder returns None) is left out.
    """
    planned = []
    for name in check_attack_names(settings.names):
        spec = ATTACKS[name]
        attack = spec.build(settings, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
        if attack is not None:
            planned.append(PlannedAttack(spec, attack, spec.n_prompts(settings)))
    return planned


def run_attacks(
    model: nn.Module,
    tokenizer: Any,
    harmful_instructions: Sequence[str],
    planned: Sequence[PlannedAttack],
    judge: Judge,
    cache: GenerationCache | None = None,
    *,
    progress: bool = True,
    engine: Any = None,
) -> dict[str, AsrResult]:
    """Run every planned attack on the harmful instructions; results keyed by attack name, in order.

    Attacks that share a prefill are generated together first (one prefill per prompt batch,
    forked per decoding configuration; or by ``engine``, an open evaluation engine such as vLLM)
    and then read from ``cache`` (a fresh memo when None).
    """
    items = check_instructions(harmful_instructions, "harmful_instructions")
    judge = check_judge(judge)
    memo = cache if cache is not None else GenerationCache()
    shared = [p.attack for p in planned if p.spec.shares_prefill and p.n_prompts is None]
    if shared:
        prefill_shared_generations(model, tokenizer, items, shared, memo, progress=progress, engine=engine)
    out: dict[str, AsrResult] = {}
    for p in planned:
        prompts = items[: p.n_prompts] if p.n_prompts is not None else items
        kw: Mapping[str, Any] = {"cache": memo} if p.spec.shares_prefill else {}
        out[p.attack.name] = p.attack.run(model, tokenizer, prompts, judge, progress=progress, **kw)
    return out


register_attack(
    AttackSpec(
        "vanilla",
        lambda s, *, max_new_tokens, batch_size, seed: VanillaAttack(
            max_new_tokens=max_new_tokens, batch_size=batch_size
        ),
        shares_prefill=True,
    )
)
register_attack(
    AttackSpec(
        "vanilla_system",
        lambda s, *, max_new_tokens, batch_size, seed: VanillaAttack(
            system=s.system_prompt, max_new_tokens=max_new_tokens, batch_size=batch_size
        ),
        shares_prefill=True,
    )
)
register_attack(
    AttackSpec(
        "decoding",
        lambda s, **budget: s.decoding_attack(**budget),
        shares_prefill=True,
    )
)
