"""Attacks (vanilla, decoding grid, GCG), ASR records, over-refusal and result files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from refusal_core.errors import ArtifactError, EmptyInputError, InvalidArgumentError
from refusal_core.evaluation.attacks import DecodingAttack, VanillaAttack, evaluate_asr, over_refusal
from refusal_core.evaluation.gcg import GcgAttack, allowed_suffix_tokens, suffix_token_gradients, target_loss
from refusal_core.evaluation.generation import SamplingConfig, generate
from refusal_core.evaluation.judges import FunctionJudge, SubstringJudge
from refusal_core.evaluation.results import AsrResult, OverRefusalResult
from refusal_core.testing.tiny import tiny_model, tiny_prompts, tiny_tokenizer

TOK = tiny_tokenizer()
HARMFUL = tiny_prompts(4, "harmful", seed=6)
HARMLESS = tiny_prompts(3, "harmless", seed=6)
ALWAYS = FunctionJudge(lambda i, c: True, label="always")
NEVER = FunctionJudge(lambda i, c: False, label="never")
SMALL_GRID = DecodingAttack(
    temperatures=(0.8, 1.5), top_ps=(0.9, 1.0), top_ks=(0, 7), n_samples=2, max_new_tokens=6
)


# -- vanilla -------------------------------------------------------------------


def test_vanilla_records_greedy_completions_and_asr() -> None:
    model = tiny_model("llama", seed=1)
    completions = generate(model, TOK, HARMFUL, max_new_tokens=6, progress=False)
    # Broken exactly when the completion is longer than the median: a judge with a known answer.
    cut = sorted(len(c) for c in completions)[len(completions) // 2]
    judge = FunctionJudge(lambda i, c: len(c) > cut, label="long")
    res = VanillaAttack(max_new_tokens=6).run(model, TOK, HARMFUL, judge, progress=False)
    assert (res.attack, res.judge) == ("vanilla", "long"), f"names {res.attack!r}, {res.judge!r}"
    assert [r.completions for r in res.records] == [[c] for c in completions], (
        "records are not greedy outputs"
    )
    expected = [len(c) > cut for c in completions]
    assert [r.jailbroken for r in res.records] == expected, "per-prompt flags differ from the judge"
    assert res.asr == sum(expected) / len(expected), f"ASR {res.asr} is not the share of broken prompts"


def test_vanilla_with_system_prompt_is_a_different_attack() -> None:
    model = tiny_model("llama", seed=1)
    plain = VanillaAttack(max_new_tokens=8).run(model, TOK, HARMFUL, ALWAYS, progress=False)
    system = VanillaAttack(system="You are a careful assistant.", max_new_tokens=8).run(
        model, TOK, HARMFUL, ALWAYS, progress=False
    )
    assert system.attack == "vanilla_system", f"name {system.attack!r}"
    assert system.records[0].attempts[0].config["system"] == "You are a careful assistant.", (
        "system not recorded"
    )
    plain_c = [r.completions for r in plain.records]
    assert plain_c != [r.completions for r in system.records], "the system prompt changed no completion"


# -- decoding --------------------------------------------------------------------


def test_decoding_grid_records_every_draw_and_is_reproducible() -> None:
    model = tiny_model("llama", seed=2)
    res = SMALL_GRID.run(model, TOK, HARMFUL, NEVER, progress=False)
    n_cfg = len(SMALL_GRID.configs)
    assert n_cfg == 8, f"grid of 2x2x2 has {n_cfg} configurations"
    for r in res.records:
        labels = [
            SamplingConfig(a.config["temperature"], a.config["top_p"], a.config["top_k"]).label
            for a in r.attempts
        ]
        assert len(r.attempts) == n_cfg * 2, f"{r.instruction!r}: {len(r.attempts)} attempts"
        assert sorted(set(labels)) == sorted(c.label for c in SMALL_GRID.configs), (
            "a configuration is missing"
        )
    again = SMALL_GRID.run(model, TOK, HARMFUL, NEVER, progress=False)
    assert [r.completions for r in res.records] == [r.completions for r in again.records], "not reproducible"
    assert res.asr == 0.0, f"a never-judge gave ASR {res.asr}"
    assert set(res.config_rates.values()) == {0.0}, f"a never-judge gave rates {res.config_rates}"


def test_decoding_any_configuration_breaks_a_prompt() -> None:
    model = tiny_model("llama", seed=2)
    base = SMALL_GRID.run(model, TOK, HARMFUL, NEVER, progress=False)
    # Pick a completion of prompt 0 that no other draw of any prompt produced: the judge breaks only it.
    counts: dict[str, int] = {}
    for r in base.records:
        for a in r.attempts:
            counts[a.completion] = counts.get(a.completion, 0) + 1
    unique = next(a for a in base.records[0].attempts if counts[a.completion] == 1)
    label = SamplingConfig(unique.config["temperature"], unique.config["top_p"], unique.config["top_k"]).label
    judge = FunctionJudge(lambda i, c: c == unique.completion, label="one")
    res = SMALL_GRID.run(model, TOK, HARMFUL, judge, progress=False)
    assert [r.jailbroken for r in res.records] == [True, False, False, False], "any-config rule violated"
    assert res.asr == 1 / len(HARMFUL), f"ASR {res.asr}"
    expected = {c.label: (1 / len(HARMFUL) if c.label == label else 0.0) for c in SMALL_GRID.configs}
    assert res.config_rates == expected, f"per-config rates {res.config_rates} != {expected}"


def test_decoding_draws_do_not_depend_on_the_rest_of_the_grid() -> None:
    model = tiny_model("llama", seed=2)
    full = SMALL_GRID.run(model, TOK, HARMFUL, NEVER, progress=False)
    alone = DecodingAttack(
        temperatures=(1.5,), top_ps=(0.9,), top_ks=(7,), n_samples=2, max_new_tokens=6
    ).run(model, TOK, HARMFUL, NEVER, progress=False)
    key = {"temperature": 1.5, "top_p": 0.9, "top_k": 7}
    for rf, ra in zip(full.records, alone.records):
        from_full = [a.completion for a in rf.attempts if all(a.config[k] == v for k, v in key.items())]
        assert from_full == ra.completions, f"{rf.instruction!r}: draws changed with the grid"


def test_decoding_rejects_bad_grids() -> None:
    with pytest.raises(InvalidArgumentError, match="temperatures"):
        DecodingAttack(temperatures=())
    with pytest.raises(InvalidArgumentError, match="top_p"):
        DecodingAttack(top_ps=(1.2,))
    with pytest.raises(InvalidArgumentError, match="repeats"):
        DecodingAttack(temperatures=(1.0, 1.0))
    with pytest.raises(InvalidArgumentError, match="n_samples"):
        DecodingAttack(n_samples=0)


# -- GCG ----------------------------------------------------------------------------

GCG = GcgAttack(n_steps=6, suffix_len=5, topk=16, batch_size=24, max_new_tokens=6, seed=0)


def test_gcg_lowers_the_target_loss_and_reports_it_exactly() -> None:
    model = tiny_model("llama", seed=3)
    run = GCG.optimize(model, TOK, HARMFUL[:1], progress=False)
    assert len(run.losses) == GCG.n_steps + 1, f"{len(run.losses)} losses for {GCG.n_steps} steps"
    assert run.best_loss < run.losses[0], f"no improvement over the initial loss {run.losses[0]:.4f}"
    assert run.best_loss == min(run.losses), "best_loss is not the minimum of the history"
    ref = target_loss(model, TOK, HARMFUL[0], run.suffix_ids, GCG.target)
    assert abs(ref - run.best_loss) <= 1e-5 * abs(ref), f"reported {run.best_loss} vs recomputed {ref}"
    init = target_loss(model, TOK, HARMFUL[0], [TOK.convert_tokens_to_ids("!")] * GCG.suffix_len, GCG.target)
    assert abs(init - run.losses[0]) <= 1e-5 * abs(init), f"initial loss {run.losses[0]} vs recomputed {init}"


def test_gcg_is_deterministic_and_uses_allowed_tokens_only() -> None:
    model = tiny_model("qwen2", seed=4)
    a = GCG.optimize(model, TOK, HARMFUL[:1], progress=False)
    b = GCG.optimize(model, TOK, HARMFUL[:1], progress=False)
    assert a == b, "same seed gave a different GCG run"
    allowed = allowed_suffix_tokens(TOK, model.config.vocab_size)
    assert all(bool(allowed[t]) for t in a.suffix_ids), f"suffix {a.suffix_ids} uses disallowed tokens"
    assert not set(a.suffix_ids) & set(TOK.all_special_ids), "suffix contains special tokens"


def test_allowed_tokens_round_trip() -> None:
    allowed = allowed_suffix_tokens(TOK, len(TOK) + 3)
    assert not allowed[len(TOK) :].any(), "rows beyond the tokenizer vocabulary are allowed"
    assert not allowed[TOK.all_special_ids].any(), "special tokens are allowed"
    ids = torch.where(allowed)[0].tolist()
    assert len(ids) > len(TOK) // 2, f"only {len(ids)} of {len(TOK)} tokens allowed"
    bad = [t for t in ids if TOK(TOK.decode([t]), add_special_tokens=False)["input_ids"] != [t]]
    assert not bad, f"allowed tokens that do not round-trip: {bad[:10]}"


def test_suffix_gradient_matches_embedding_autograd_and_token_swaps() -> None:
    """g[i, new] − g[i, old] is the derivative of the loss along the embedding edge old → new.

    Checked two ways: exactly, against autograd through ``inputs_embeds`` of a sequence built
    here by hand (position and target alignment); and to first order, against the real loss
    change of swapping in 16 tokens (the ranking GCG relies on).
    """
    model = tiny_model("llama", dtype=torch.float64, seed=5)
    bang = TOK.convert_tokens_to_ids("!")
    suffix = [bang] * 4
    grad = suffix_token_gradients(model, TOK, HARMFUL[0], suffix, "Sure, here is")
    assert grad.shape == (4, model.config.vocab_size), f"gradient shape {tuple(grad.shape)}"
    emb = model.get_input_embeddings()
    chat = [{"role": "user", "content": HARMFUL[0]}]
    full = TOK(
        TOK.apply_chat_template(chat, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    full_ids = full["input_ids"]
    target = TOK("Sure, here is", add_special_tokens=False)["input_ids"]
    cut = len(full_ids) - 2  # the tiny template has two post-instruction tokens
    ids = torch.tensor(full_ids[:cut] + suffix + full_ids[cut:] + target)
    pos, new = cut + 2, 300
    e = emb(ids[None]).detach().requires_grad_(True)
    logp = torch.log_softmax(model(inputs_embeds=e).logits[0, -len(target) - 1 : -1], -1)
    loss = -logp[torch.arange(len(target)), torch.tensor(target)].mean()
    (grad_e,) = torch.autograd.grad(loss, e)
    w = emb.weight.detach()
    directional = float(grad_e[0, pos] @ (w[new] - w[bang]))
    analytic = float(grad[2, new] - grad[2, bang])
    assert abs(directional - analytic) <= 1e-9 * abs(directional), (
        f"autograd {directional} vs one-hot {analytic}"
    )

    base = target_loss(model, TOK, HARMFUL[0], suffix)
    swaps = list(range(200, 216))
    actual = torch.tensor([target_loss(model, TOK, HARMFUL[0], [bang, bang, t, bang]) - base for t in swaps])
    predicted = torch.tensor([float(grad[2, t] - grad[2, bang]) for t in swaps])
    corr = float(torch.corrcoef(torch.stack([actual, predicted]))[0, 1])
    assert corr > 0.8, (
        f"first-order prediction of token swaps correlates only {corr:.3f} with the real change"
    )
    assert not any(p.grad is not None for p in model.parameters()), (
        "suffix gradients wrote .grad on the model"
    )


def test_gcg_attack_generates_with_its_suffix() -> None:
    model = tiny_model("llama", seed=3)
    res = GCG.run(model, TOK, HARMFUL[:2], ALWAYS, progress=False)
    for r in res.records:
        ids = r.details["suffix_ids"]
        expected = generate(model, TOK, [r.instruction], suffixes=[ids], max_new_tokens=6, progress=False)
        assert r.completions == expected, f"{r.instruction!r}: completion not generated with the best suffix"
        assert r.attempts[0].config["suffix"] == TOK.decode(ids), "suffix text not recorded"
        assert r.details["best_loss"] < r.details["losses"][0], f"{r.instruction!r}: loss did not drop"
    assert res.asr == 1.0, "an always-judge must give ASR 1"


def test_universal_gcg_shares_one_suffix() -> None:
    model = tiny_model("llama", seed=3)
    attack = GcgAttack(n_steps=3, suffix_len=4, topk=8, batch_size=12, universal=True, max_new_tokens=4)
    res = attack.run(model, TOK, HARMFUL[:3], NEVER, progress=False)
    suffixes = {tuple(r.details["suffix_ids"]) for r in res.records}
    assert len(suffixes) == 1, f"universal mode produced {len(suffixes)} suffixes"
    losses = res.records[0].details["losses"]
    assert min(losses) < losses[0], f"universal loss did not drop: {losses}"


def test_gcg_rejects_bad_settings() -> None:
    with pytest.raises(InvalidArgumentError, match="n_steps"):
        GcgAttack(n_steps=0)
    with pytest.raises(InvalidArgumentError, match="target"):
        GcgAttack(target=" ")
    with pytest.raises(InvalidArgumentError, match="init"):
        GcgAttack(init="<|pad|>").optimize(tiny_model(), TOK, HARMFUL[:1], progress=False)


# -- evaluation entry points and files ------------------------------------------------


def test_evaluate_asr_runs_every_attack_by_name() -> None:
    model = tiny_model("llama", seed=1)
    attacks = [VanillaAttack(max_new_tokens=4), VanillaAttack(system="Be brief.", max_new_tokens=4)]
    res = evaluate_asr(model, TOK, HARMFUL, attacks, SubstringJudge(min_words=1), progress=False)
    assert sorted(res) == ["vanilla", "vanilla_system"], f"keys {sorted(res)}"
    assert all(r.n_prompts == len(HARMFUL) for r in res.values()), "a result lost prompts"
    with pytest.raises(InvalidArgumentError, match="unique"):
        evaluate_asr(model, TOK, HARMFUL, [VanillaAttack(), VanillaAttack()], ALWAYS, progress=False)
    with pytest.raises(EmptyInputError):
        evaluate_asr(model, TOK, HARMFUL, [], ALWAYS, progress=False)
    with pytest.raises(InvalidArgumentError, match="judge"):
        evaluate_asr(model, TOK, HARMFUL, attacks, object(), progress=False)  # type: ignore[arg-type]


def test_over_refusal_is_the_share_refused() -> None:
    model = tiny_model("llama", seed=1)
    assert over_refusal(model, TOK, HARMLESS, NEVER, max_new_tokens=3, progress=False).rate == 1.0, (
        "never-judge"
    )
    assert over_refusal(model, TOK, HARMLESS, ALWAYS, max_new_tokens=3, progress=False).rate == 0.0, (
        "always-judge"
    )
    first = FunctionJudge(lambda i, c: i != HARMLESS[0], label="first")
    res = over_refusal(model, TOK, HARMLESS, first, max_new_tokens=3, progress=False)
    assert res.n_refused == 1, f"{res.n_refused} refused, expected only the first prompt"
    assert res.rate == 1 / len(HARMLESS), f"rate {res.rate}"


def test_results_round_trip_through_json(tmp_path: Path) -> None:
    model = tiny_model("llama", seed=2)
    res = SMALL_GRID.run(model, TOK, HARMFUL[:2], SubstringJudge(min_words=1), progress=False)
    path = res.save(tmp_path / "asr" / "decoding.json")
    back = AsrResult.load(path)
    assert back == res, "AsrResult changed through save/load"
    data = json.loads(path.read_text())
    assert data["asr"] == res.asr, f"JSON ASR {data['asr']} vs {res.asr}"
    assert data["model"]["model_type"] == "llama", f"JSON lacks the model identity: {data['model']}"
    over = over_refusal(model, TOK, HARMLESS, ALWAYS, max_new_tokens=3, progress=False)
    assert OverRefusalResult.load(over.save(tmp_path / "over.json")) == over, "OverRefusalResult changed"
    with pytest.raises(ArtifactError, match="not a refusal_core asr"):
        AsrResult.load(tmp_path / "over.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        AsrResult.load(tmp_path / "broken.json")
    with pytest.raises(ArtifactError, match="does not exist"):
        AsrResult.load(tmp_path / "missing.json")


# -- the toy refusal model (used when its artifacts exist) -------------------------------


def _toy() -> tuple[torch.nn.Module, object]:
    try:
        from refusal_core.toy import load_toy_model

        return load_toy_model()  # type: ignore[no-any-return]
    except (ImportError, ArtifactError) as exc:
        pytest.skip(f"toy refusal model not available: {exc}")


def test_toy_model_refuses_harmful_and_answers_harmless() -> None:
    model, tok = _toy()
    from refusal_core.prompts import load_prompts

    harmful, harmless = load_prompts("harmful_test")[:12], load_prompts("harmless_test")[:12]
    judge = SubstringJudge(min_words=1)
    asr = VanillaAttack(max_new_tokens=16).run(model, tok, harmful, judge, progress=False)
    over = over_refusal(model, tok, harmless, judge, max_new_tokens=16, progress=False)
    assert asr.asr <= 0.25, (
        f"toy model: vanilla ASR {asr.asr:.2f} on harmful prompts; refusals missed by the judge?"
    )
    assert over.rate <= 0.25, f"toy model: over-refusal {over.rate:.2f} on harmless prompts"


def test_decoding_grid_from_one_prefill_equals_one_generate_per_configuration() -> None:
    """The shared-prefill run gives the completions of the unshared loop, draw for draw (seed per label)."""
    import hashlib

    model = tiny_model("llama", seed=4)
    attack = DecodingAttack(n_samples=2, max_new_tokens=6, batch_size=3, seed=5, system="Be brief.")
    prompts = [*HARMFUL, "Hi", "Write a very long story about the sea and the wind and a small dog, please."]
    res = attack.run(model, TOK, prompts, NEVER, progress=False)
    repeated = prompts + prompts
    for cfg in attack.configs:
        # The per-configuration seed written independently of attacks._config_seed.
        seed = int.from_bytes(hashlib.sha256(f"5:{cfg.label}".encode()).digest()[:7], "little")
        expected = generate(
            model,
            TOK,
            repeated,
            system="Be brief.",
            max_new_tokens=6,
            batch_size=3,
            sampling=cfg,
            seed=seed,
            progress=False,
        )
        for k, want in enumerate(expected):
            i, j = k % len(prompts), k // len(prompts)
            got = [
                a.completion
                for a in res.records[i].attempts
                if a.config["sample"] == j
                and SamplingConfig(a.config["temperature"], a.config["top_p"], a.config["top_k"]) == cfg
            ]
            assert got == [want], f"{cfg.label}, prompt {i}, sample {j}: {got} != unshared {want!r}"


def test_vanilla_and_decoding_reuse_a_generation_cache() -> None:
    from refusal_core.evaluation.generation import GenerationCache

    model = tiny_model("llama", seed=4)
    memo = GenerationCache()
    first = VanillaAttack(max_new_tokens=5).run(model, TOK, HARMFUL, NEVER, progress=False, cache=memo)
    grid = DecodingAttack(temperatures=(1.0,), top_ps=(0.9,), top_ks=(0, 5), max_new_tokens=5)
    g1 = grid.run(model, TOK, HARMFUL, NEVER, progress=False, cache=memo)
    assert (memo.hits, memo.misses) == (0, 3), f"hits/misses {memo.hits}/{memo.misses} after three new runs"
    second = VanillaAttack(max_new_tokens=5).run(model, TOK, HARMFUL, NEVER, progress=False, cache=memo)
    g2 = grid.run(model, TOK, HARMFUL, NEVER, progress=False, cache=memo)
    assert (memo.hits, memo.misses) == (3, 3), f"hits/misses {memo.hits}/{memo.misses}: the reruns recomputed"
    assert second.to_dict() == first.to_dict(), "memoised vanilla ASR records differ"
    assert g2.to_dict() == g1.to_dict(), "memoised decoding-grid ASR records differ"


def test_one_prefill_serves_vanilla_and_the_grid_and_the_attacks_then_run_from_the_memo() -> None:
    from refusal_core.evaluation.attacks import prefill_shared_generations
    from refusal_core.evaluation.generation import GenerationCache

    model = tiny_model("llama", seed=4)
    prompts = [*HARMFUL, "Hi", "Write a very long story about the sea and the wind and a small dog, please."]
    attacks = [
        VanillaAttack(max_new_tokens=5, batch_size=4),
        VanillaAttack(system="Be brief.", max_new_tokens=5, batch_size=4),
        DecodingAttack(temperatures=(0.8, 1.3), top_ps=(0.9,), top_ks=(0, 5), max_new_tokens=5, batch_size=4),
    ]
    cold = [a.run(model, TOK, prompts, NEVER, progress=False).to_dict() for a in attacks]
    widths: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: widths.append(int(kwargs["input_ids"].shape[1])), with_kwargs=True
    )
    memo = GenerationCache()
    groups = prefill_shared_generations(model, TOK, prompts, attacks, memo, progress=False)
    assert groups == 2, (
        f"{groups} prefill groups; vanilla and the grid share prompts, the system prompt does not"
    )
    prefills = sum(w > 1 for w in widths)
    n_batches = -(-len(prompts) // 4)
    assert prefills == 2 * n_batches, (
        f"{prefills} prefill forwards for 2 prompt groups of {n_batches} batches: vanilla and the 4-config "
        "grid must share one prefill per batch"
    )
    widths.clear()
    warm = [a.run(model, TOK, prompts, NEVER, progress=False, cache=memo).to_dict() for a in attacks]
    handle.remove()
    assert not widths, (
        f"the attacks ran {len(widths)} forwards after prefill_shared_generations filled the memo"
    )
    assert warm == cold, "attack results from the shared-prefill memo differ from cold runs"
    # an attack with no prefill plan (GCG's prompts carry its own suffix) is left to generate itself
    misses = memo.misses
    assert prefill_shared_generations(model, TOK, prompts, [GcgAttack()], memo, progress=False) == 0, (
        "GCG declares no shared prefill: no prefill group for it"
    )
    assert memo.misses == misses, "prefill_shared_generations generated something for GCG"
