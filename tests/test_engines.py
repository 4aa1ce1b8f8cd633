"""The evaluation-engine seam (refusal_core.evaluation.engines) in the default tier, without vLLM.

vLLM itself runs in tox -e vllm (tests/vllm_tier/). Here a scripted engine stands in for it, to check
what the seam promises whichever engine generates: the engine receives exactly the prompt ids of
the chat template, the budget and the stop ids the torch path uses; its completions land in the
generation memo under the keys the attacks look up, so every attack and over-refusal judge them and
nothing is generated twice; a study evaluation with engine "vllm" opens one engine per variant,
generates every vanilla, system-prompt, decoding-grid and over-refusal completion with it and
closes it; the torch engine's results and stage keys are those of the study before the seam.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from refusal_core.errors import InvalidArgumentError
from refusal_core.evaluation.attacks import (
    DecodingAttack,
    VanillaAttack,
    over_refusal,
    prefill_shared_generations,
)
from refusal_core.evaluation.engines import (
    Engine,
    TorchEngine,
    VllmSettings,
    checkpoint_stop_ids,
    generate_completions,
    open_engine,
    request_seed,
)
from refusal_core.evaluation.generation import (
    GenerationCache,
    SamplingConfig,
    eos_token_ids,
    generate_ids_multi,
)
from refusal_core.evaluation.judges import SubstringJudge
from refusal_core.model import encode_prompts
from refusal_core.study import AttackSettings, StudyConfig
from refusal_core.testing.tiny import tiny_model, tiny_prompts, tiny_tokenizer


class ScriptedEngine:
    """Answers every request with tokens that encode (configuration, prompt, sample): [c, i, j] + 10."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.closed = False

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        samplings: Sequence[SamplingConfig | None],
        seeds: Sequence[int],
        *,
        max_new_tokens: int,
        stop_token_ids: Sequence[int],
    ) -> list[list[list[int]]]:
        assert not self.closed, "asked after close"
        self.calls.append(
            {
                "prompts": [list(p) for p in prompts],
                "samplings": list(samplings),
                "seeds": list(seeds),
                "max_new_tokens": max_new_tokens,
                "stops": list(stop_token_ids),
            }
        )
        return [
            [[10 + c, 10 + i, 10 + len(self.calls)] for i in range(len(prompts))]
            for c in range(len(samplings))
        ]

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return tiny_model(), tiny_tokenizer()


def test_the_scripted_engine_is_an_engine() -> None:
    assert isinstance(ScriptedEngine(), Engine)
    assert isinstance(TorchEngine(tiny_model(), tiny_tokenizer()), Engine)


def test_torch_engine_is_the_torch_loop(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    ids = encode_prompts(tok, tiny_prompts(5, "harmful"))
    samplings = [None, SamplingConfig(0.9, top_k=20)]
    want = generate_ids_multi(
        model, tok, ids, samplings, [0, 7], max_new_tokens=5, batch_size=2, progress=False
    )
    got = TorchEngine(model, tok, batch_size=2).complete(
        ids, samplings, [0, 7], max_new_tokens=5, stop_token_ids=eos_token_ids(model, tok)
    )
    assert got == want, "TorchEngine.complete vs generate_ids_multi (greedy and T=0.9,k=20, seed 7)"
    # the torch loop's sampled draws depend on its batching, so the same batch size
    same = generate_completions("torch", model, tok, ids, samplings, [0, 7], max_new_tokens=5, batch_size=2)
    assert same == want, "generate_completions('torch', in-memory model) vs generate_ids_multi"


def test_engine_generations_fill_the_memo_under_the_attack_keys(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    harmful = tiny_prompts(3, "harmful")
    system = "Be careful."
    attacks = [
        VanillaAttack(max_new_tokens=4, batch_size=2),
        VanillaAttack(system=system, max_new_tokens=4, batch_size=2),
        DecodingAttack(temperatures=(0.7, 1.3), top_ps=(1.0,), top_ks=(0,), n_samples=2, max_new_tokens=4),
    ]
    memo, engine = GenerationCache(), ScriptedEngine()
    groups = prefill_shared_generations(model, tok, harmful, attacks, memo, progress=False, engine=engine)
    assert groups == 3, "vanilla, system prompt, decoding grid"
    assert len(engine.calls) == 3, "one engine request per prompt group"
    # the engine saw this package's chat template, the attacks' budget and the torch path's stop ids
    by_prompts = {tuple(map(tuple, call["prompts"])): call for call in engine.calls}
    plain = tuple(map(tuple, encode_prompts(tok, harmful)))
    with_system = tuple(map(tuple, encode_prompts(tok, harmful, system=system)))
    repeated = tuple(map(tuple, encode_prompts(tok, harmful + harmful)))
    assert set(by_prompts) == {plain, with_system, repeated}, "prompt ids of each group"
    for call in engine.calls:
        assert call["max_new_tokens"] == 4, call
        assert call["stops"] == eos_token_ids(model, tok), call
    assert by_prompts[plain]["samplings"] == [None]
    assert by_prompts[repeated]["samplings"] == attacks[2].configs
    misses = memo.misses
    results = {
        a.name: a.run(model, tok, harmful, SubstringJudge(), progress=False, cache=memo) for a in attacks
    }
    assert memo.misses == misses, "every attack found the engine's generations in the memo"
    call_no = engine.calls.index(by_prompts[plain]) + 1
    assert results["vanilla"].records[1].completions == [
        tok.decode([10, 11, 10 + call_no], skip_special_tokens=True)
    ]
    # decoding: configuration c, sample j of prompt i sits at j*n + i of the repeated prompts
    call_no = engine.calls.index(by_prompts[repeated]) + 1
    rec = results["decoding"].records[2]
    assert rec.completions == [
        tok.decode([10 + c, 10 + j * 3 + 2, 10 + call_no], skip_special_tokens=True)
        for c in range(2)
        for j in range(2)
    ], "configuration-major, sample-minor, as the torch path records them"
    # over-refusal reads the same memo when given it
    harmless = tiny_prompts(2, "harmless")
    prefill_shared_generations(
        model,
        tok,
        harmless,
        [VanillaAttack(max_new_tokens=4, batch_size=2)],
        memo,
        progress=False,
        engine=engine,
    )
    misses = memo.misses
    refusal = over_refusal(model, tok, harmless, SubstringJudge(), max_new_tokens=4, batch_size=2, cache=memo)
    assert memo.misses == misses
    assert refusal.records[0].completions == [tok.decode([10, 10, 14], skip_special_tokens=True)]


def test_generate_completions_refuses_bad_requests_before_loading_anything(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tok = tiny
    ids = encode_prompts(tok, ["Hi"])
    with pytest.raises(InvalidArgumentError, match="engine must be one of"):
        generate_completions("tensorrt", model, tok, ids, [None], [0])
    with pytest.raises(InvalidArgumentError, match="checkpoint directory"):
        generate_completions("vllm", model, tok, ids, [None], [0])
    with pytest.raises(InvalidArgumentError, match=r"config\.json"):
        generate_completions("vllm", tmp_path, tok, ids, [None], [0])
    with pytest.raises(InvalidArgumentError, match="cache needs the in-memory model"):
        generate_completions("torch", tmp_path, tok, ids, [None], [0], cache=GenerationCache())
    with pytest.raises(InvalidArgumentError, match="equal length"):
        generate_completions("torch", tmp_path, tok, ids, [None, None], [0])
    with pytest.raises(InvalidArgumentError, match="checkpoint_dir"):
        open_engine("vllm", model, tok)
    for bad in (
        {"tensor_parallel_size": 0},
        {"gpu_memory_utilization": 1.5},
        {"dtype": "float64"},
        {"cpu_kv_cache_gib": 0},
        {"max_model_len": -1},
        {"enforce_eager": "yes"},
    ):
        with pytest.raises(InvalidArgumentError, match=next(iter(bad))):
            VllmSettings(**bad)
    with pytest.raises(InvalidArgumentError, match="engine"):
        StudyConfig(engine="tensorrt")  # type: ignore[arg-type]


def test_a_checkpoint_directory_generates_as_the_in_memory_model(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert checkpoint_stop_ids(tmp_path, tok) == eos_token_ids(model, tok)
    ids = encode_prompts(tok, tiny_prompts(3, "harmless"))
    in_memory = generate_completions(
        "torch", model, tok, ids, [None, SamplingConfig(1.1)], [0, 3], max_new_tokens=4
    )
    from_dir = generate_completions(
        "torch", tmp_path, tok, ids, [None, SamplingConfig(1.1)], [0, 3], max_new_tokens=4
    )
    assert from_dir == in_memory, "torch engine on the saved directory vs on the in-memory model"


def test_request_seeds_depend_on_configuration_seed_and_prompt_only() -> None:
    assert request_seed(3, [1, 2, 3]) == request_seed(3, (1, 2, 3))
    seeds = {request_seed(s, p) for s in (0, 1) for p in ([1, 2], [2, 1], [1, 2, 0])}
    assert len(seeds) == 6, "a different seed or prompt gives a different request seed"
    assert all(0 <= s < 2**56 for s in seeds)


def _small_config(engine: str) -> StudyConfig:
    return StudyConfig(
        model="toy",
        methods=("magnitude",),
        n_train=8,
        n_val=4,
        n_test=4,
        n_calibration=4,
        noise_splits=2,
        max_new_tokens=4,
        batch_size=8,
        zero_shot_tasks=(),
        attacks=AttackSettings(
            decoding_temperatures=(1.0,),
            decoding_top_ps=(1.0,),
            decoding_top_ks=(0,),
            decoding_samples=2,
            gcg_prompts=0,
        ),
        engine=engine,  # type: ignore[arg-type]
    )


class _Run:
    """The study's evaluation step on one bench (the engine's public steps), as the study runs it."""

    def __init__(self, config: Any, out: Path, progress: bool) -> None:
        from refusal_core.bench import Bench

        self.bench = Bench(config, out, progress=progress)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bench, name)

    def evaluate(self, name: str, model: Any, upstream: list[str]) -> Any:
        from refusal_core.bench import evaluate

        return evaluate(self.bench, name, model, upstream)


def test_a_study_evaluation_generates_through_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import refusal_core.bench as study_run

    opened: list[dict[str, Any]] = []

    def fake_open(
        name: str, settings: VllmSettings, model: Any, tokenizer: Any, directory: Path, **kw: Any
    ) -> Any:
        if name == "torch":
            return None
        engine = ScriptedEngine()
        opened.append({"name": name, "dir": directory, "variant": kw["variant"], "engine": engine})
        return engine

    monkeypatch.setattr(study_run, "open_variant_engine", fake_open)
    torch_run = _Run(_small_config("torch"), tmp_path / "torch", False)
    ev_torch, key_torch = torch_run.evaluate("base", torch_run.model, [])
    assert opened == [], "the torch engine opens nothing"
    vllm_run = _Run(_small_config("vllm"), tmp_path / "vllm", False)
    ev_vllm, key_vllm = vllm_run.evaluate("base", vllm_run.model, [])
    assert [o["variant"] for o in opened] == ["base"], "one engine for the one variant evaluated"
    assert opened[0]["engine"].closed, "the engine is closed after the evaluation"
    assert opened[0]["dir"] == tmp_path / "vllm" / "engine_checkpoints" / "base"
    engine = opened[0]["engine"]
    harmful = vllm_run.prompts["harmful_test"]
    harmless = vllm_run.prompts["harmless_test"]
    asked = [tuple(map(tuple, c["prompts"])) for c in engine.calls]
    tok = vllm_run.tokenizer
    system = vllm_run.config.attacks.system_prompt
    for prompts, what in (
        (harmful, "vanilla"),
        (harmful + harmful, "decoding grid, 2 samples"),
        (harmless, "over-refusal"),
    ):
        assert tuple(map(tuple, encode_prompts(tok, prompts))) in asked, f"{what} went to the engine"
    assert tuple(map(tuple, encode_prompts(tok, harmful, system=system))) in asked, "system prompt"
    # what was judged is what the engine wrote: completion i of the vanilla call is [10, 10 + i, 10 + call]
    from refusal_core.evaluation.results import AsrResult, OverRefusalResult

    stage = tmp_path / "vllm" / "stages" / "eval" / "base"
    call = asked.index(tuple(map(tuple, encode_prompts(tok, harmful)))) + 1
    vanilla = AsrResult.load(stage / "asr_vanilla.json")
    assert [r.completions for r in vanilla.records] == [
        [tok.decode([10, 10 + i, 10 + call], skip_special_tokens=True)] for i in range(len(harmful))
    ]
    call = asked.index(tuple(map(tuple, encode_prompts(tok, harmless)))) + 1
    refusal = OverRefusalResult.load(stage / "over_refusal.json")
    assert [r.completions for r in refusal.records] == [
        [tok.decode([10, 10 + i, 10 + call], skip_special_tokens=True)] for i in range(len(harmless))
    ]
    assert ev_vllm["jailbroken"].keys() == ev_torch["jailbroken"].keys()
    assert key_vllm != key_torch, "the engine is part of the evaluation's stage key"
    # the torch engine's stage key is the one a study before the engine setting wrote
    settings = {
        "attacks": asdict(torch_run.config.attacks),
        "max_new_tokens": 4,
        "tasks": [],
        "judge": "substring",
    }
    from refusal_core.artifacts import settings_key

    assert torch_run.store.recorded_key("eval/base") == settings_key(settings, torch_run.root_key)
    rerun = _Run(replace(_small_config("vllm")), tmp_path / "vllm", False)
    assert rerun.evaluate("base", rerun.model, [])[0] == ev_vllm, "resumed"
    assert len(opened) == 1, "a resumed evaluation opens no engine"


def test_the_commands_that_evaluate_take_the_engine(tmp_path: Path) -> None:
    from refusal_core.cli import build_parser, main

    parser = build_parser()
    for argv in (
        ["evaluate", "--out", "x"],
        ["audit", "--base", "toy", "--compressed", "toy", "--out", "x"],
        ["study"],
    ):
        assert parser.parse_args(argv).__dict__.get("engine", "torch") == "torch", argv
        args = parser.parse_args([*argv, "--engine", "vllm", "--vllm-tensor-parallel-size", "2"])
        got = {k: v for k, v in vars(args).items() if "engine" in k or "tensor_parallel" in k}
        assert "vllm" in got.values(), (argv, got)
        assert 2 in got.values(), (argv, got)
    # without vLLM installed (this tier) the vllm engine is refused in one line, before any output
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        out = tmp_path / "eval"
        code = main(["evaluate", "--engine", "vllm", "--n-test", "2", "--no-progress", "--out", str(out)])
        assert code != 0
        assert not out.exists(), "nothing written"


def test_variant_evaluations_are_independent_stages_two_machines_can_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs on one run directory (two machines on a shared filesystem) each evaluate one variant;
    a third finds both done, keyed by each variant's upstream (its checkpoint's) key."""
    import copy

    import torch

    import refusal_core.bench as study_run

    opened: list[str] = []

    def fake_open(
        name: str, settings: VllmSettings, model: Any, tokenizer: Any, directory: Path, **kw: Any
    ) -> Any:
        opened.append(kw["variant"])
        return ScriptedEngine()

    monkeypatch.setattr(study_run, "open_variant_engine", fake_open)
    shared = tmp_path / "shared-run"
    machine_a = _Run(_small_config("vllm"), shared, False)
    ev_a, _ = machine_a.evaluate("base", machine_a.model, [])
    machine_b = _Run(_small_config("vllm"), shared, False)
    variant = copy.deepcopy(machine_b.model)
    with torch.no_grad():
        next(variant.parameters()).mul_(0.5)
    ev_b, _ = machine_b.evaluate("halved", variant, ["key-of-halved-checkpoint"])
    assert opened == ["base", "halved"]
    later = _Run(_small_config("vllm"), shared, False)
    assert later.store.is_done("eval/base", later.store.recorded_key("eval/base") or "")
    assert later.evaluate("base", later.model, [])[0] == ev_a, "machine B's stage left machine A's intact"
    assert later.evaluate("halved", variant, ["key-of-halved-checkpoint"])[0] == ev_b
    assert opened == ["base", "halved"], "both resumed, nothing generated again"
    # another checkpoint under the same name is another key: evaluated anew, not mistaken for the old one
    later.evaluate("halved", variant, ["key-of-another-checkpoint"])
    assert opened == ["base", "halved", "halved"]
