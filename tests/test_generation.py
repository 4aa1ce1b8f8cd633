"""Batched generation: left padding, KV cache, greedy and sampled decoding, stopping, suffixes."""

from __future__ import annotations

import pytest
import torch

from refusal_core.errors import EmptyInputError, InvalidArgumentError
from refusal_core.evaluation.generation import (
    GenerationCache,
    SamplingConfig,
    eval_mode,
    filter_logits,
    generate,
    generate_ids,
    generate_ids_multi,
)
from refusal_core.model import encode_prompts, format_prompt, left_pad, post_instruction_tokens
from refusal_core.testing.tiny import TINY_FAMILIES, tiny_model, tiny_prompts, tiny_tokenizer

TOK = tiny_tokenizer()
#: Mixed lengths on purpose: batching must pad the short ones on the left.
PROMPTS = (
    tiny_prompts(4, "harmful", seed=3)
    + tiny_prompts(4, "harmless", seed=3)
    + ["Hi", "Write a very long story about the sea, the wind, the morning light and a small dog."]
)
N_NEW = 12
#: A stop id no model can emit: the completion runs to max_new_tokens.
NO_STOP = [-1]


def one_at_a_time(model: torch.nn.Module, prompts: list[list[int]], **kwargs: object) -> list[list[int]]:
    return [generate_ids(model, TOK, [p], batch_size=1, progress=False, **kwargs)[0] for p in prompts]  # type: ignore[arg-type]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_batched_greedy_equals_one_at_a_time(family: str) -> None:
    # float64 weights: only float64 rounding separates padded and unpadded runs, so no argmax can flip.
    model = tiny_model(family, dtype=torch.float64, seed=1)
    prompts = encode_prompts(TOK, PROMPTS)
    single = one_at_a_time(model, prompts, max_new_tokens=N_NEW)
    for batch_size in (3, 16):
        batched = generate_ids(
            model, TOK, prompts, max_new_tokens=N_NEW, batch_size=batch_size, progress=False
        )
        diff = [i for i, (a, b) in enumerate(zip(batched, single)) if a != b]
        assert not diff, f"{family}, batch_size={batch_size}: prompts {diff} differ from one-at-a-time greedy"


def test_greedy_matches_transformers_generate() -> None:
    """An independent decoder (HF generate, same left padding) gives the same tokens."""
    model = tiny_model("llama", dtype=torch.float64, seed=2)
    prompts = encode_prompts(TOK, PROMPTS)
    ours = generate_ids(model, TOK, prompts, max_new_tokens=N_NEW, batch_size=len(prompts), progress=False)
    ids, mask = left_pad(prompts, TOK.pad_token_id)
    with torch.no_grad():
        hf = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=N_NEW,
            do_sample=False,
            pad_token_id=TOK.pad_token_id,
        )
    for i, row in enumerate(hf[:, ids.shape[1] :].tolist()):
        ref = row[: row.index(TOK.eos_token_id)] if TOK.eos_token_id in row else row
        assert ours[i] == ref, f"prompt {i}: ours {ours[i]} vs transformers generate {ref}"


def test_generate_decodes_only_new_tokens() -> None:
    model = tiny_model("llama", seed=3)
    texts = generate(model, TOK, PROMPTS[:3], max_new_tokens=N_NEW, progress=False)
    ids = generate_ids(model, TOK, encode_prompts(TOK, PROMPTS[:3]), max_new_tokens=N_NEW, progress=False)
    for t, i, p in zip(texts, ids, PROMPTS):
        assert t == TOK.decode(i, skip_special_tokens=True), f"decoded text of {p!r} is not its new tokens"
        assert p not in t, f"completion of {p!r} repeats the prompt: {t!r}"


def test_stops_at_stop_token_and_keeps_batch_rows_independent() -> None:
    model = tiny_model("llama", dtype=torch.float64, seed=4)
    prompts = encode_prompts(TOK, PROMPTS)
    free = generate_ids(model, TOK, prompts, max_new_tokens=N_NEW, stop_token_ids=NO_STOP, progress=False)
    # Stop on the 3rd token of prompt 0's free completion: that row must end right before it.
    stop = free[0][2]
    stopped = generate_ids(model, TOK, prompts, max_new_tokens=N_NEW, stop_token_ids=[stop], progress=False)
    for i, (f, s) in enumerate(zip(free, stopped)):
        expected = f[: f.index(stop)] if stop in f else f
        assert s == expected, f"prompt {i}: with stop token {stop} got {s}, expected the prefix {expected}"
    assert len(stopped[0]) == free[0].index(stop) <= 2, "row 0 did not stop at its first stop token"


def test_max_new_tokens_is_respected() -> None:
    model = tiny_model("qwen2", seed=0)
    out = generate_ids(
        model, TOK, encode_prompts(TOK, PROMPTS), max_new_tokens=5, stop_token_ids=NO_STOP, progress=False
    )
    assert all(len(o) == 5 for o in out), f"lengths {[len(o) for o in out]} with max_new_tokens=5 and no stop"


def test_sampling_is_reproducible_and_seed_dependent() -> None:
    model = tiny_model("llama", seed=5)
    cfg = SamplingConfig(temperature=1.0, top_p=0.95, top_k=50)
    a = generate(model, TOK, PROMPTS, sampling=cfg, seed=7, max_new_tokens=N_NEW, progress=False)
    b = generate(model, TOK, PROMPTS, sampling=cfg, seed=7, max_new_tokens=N_NEW, progress=False)
    c = generate(model, TOK, PROMPTS, sampling=cfg, seed=8, max_new_tokens=N_NEW, progress=False)
    assert a == b, "same seed gave different samples"
    assert a != c, "seeds 7 and 8 gave identical samples for every prompt"


def test_sampling_leaves_global_rng_alone() -> None:
    model = tiny_model("llama", seed=5)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(model, TOK, PROMPTS[:2], sampling=SamplingConfig(), max_new_tokens=4, progress=False)
    assert torch.equal(torch.rand(3), expected), "sampled generation consumed the global RNG"


def test_top_k_one_sampling_equals_greedy() -> None:
    model = tiny_model("mistral", dtype=torch.float64, seed=6)
    greedy = generate(model, TOK, PROMPTS, max_new_tokens=N_NEW, progress=False)
    sampled = generate(
        model,
        TOK,
        PROMPTS,
        sampling=SamplingConfig(temperature=1.7, top_k=1),
        seed=3,
        max_new_tokens=N_NEW,
        progress=False,
    )
    assert sampled == greedy, "top_k=1 sampling must reduce to greedy decoding"


def reference_filter(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Per-row loops: the kept set after temperature, top-k and top-p, as a bool mask."""
    keep = torch.zeros_like(logits, dtype=torch.bool)
    for r, row in enumerate(logits.to(torch.float64) / cfg.temperature):
        order = sorted(range(row.numel()), key=lambda j: -float(row[j]))
        if cfg.top_k:
            order = order[: cfg.top_k]
        probs = torch.softmax(row[order], dim=0)  # renormalised over the top-k survivors
        mass = 0.0
        for j, p in zip(order, probs.tolist()):
            keep[r, j] = True
            mass += p
            if mass >= cfg.top_p:
                break
    return keep


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(1.0, 0.5, 0),
        SamplingConfig(0.7, 0.9, 5),
        SamplingConfig(2.0, 1.0, 3),
        SamplingConfig(0.3, 0.2, 0),
    ],
    ids=lambda c: c.label,
)
def test_filter_logits_matches_reference(cfg: SamplingConfig) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=gen) * 3
    got = torch.isfinite(filter_logits(logits, cfg))
    ref = reference_filter(logits, cfg)
    assert torch.equal(got, ref), (
        f"{cfg.label}: kept sets differ in rows {torch.where((got != ref).any(1))[0]}"
    )
    scaled = filter_logits(logits, cfg)[got]
    expected = (logits.to(torch.float64) / cfg.temperature)[got]
    assert torch.equal(scaled, expected), f"{cfg.label}: kept logits are not logits / temperature"


def test_filter_logits_numpy_path_is_bit_identical_to_the_torch_sort_reference() -> None:
    """filter_logits' CPU path (numpy partition and sort) against the path as first written (torch.topk,
    a full torch.sort), value for value, on rows with many ties, ties straddling the top-p cut (the
    one case the numpy order cannot vouch for: the reference runs), -inf entries, top-k before top-p."""
    from refusal_core.evaluation.generation import _filter_logits_reference, _top_p_drop

    gen = torch.Generator().manual_seed(3)
    fallbacks = fast = 0
    for trial in range(600):
        vocab = (5, 17, 64, 2048)[trial % 4]
        logits = torch.randn(trial % 5 + 1, vocab, generator=gen) * (trial % 5 + 0.2)
        if trial % 3 == 0:
            logits = (logits * 2).round() / 2  # coarse values: ties everywhere
        if trial % 5 == 0:
            logits[0, : vocab // 2] = float("-inf")
        cfg = SamplingConfig(
            (0.7, 1.0, 1.3)[trial % 3], (0.9, 1.0, 0.5, 0.99, 0.3)[trial % 5], (0, 40, 3, 1)[trial % 4]
        )
        got, want = filter_logits(logits, cfg), _filter_logits_reference(logits, cfg)
        assert torch.equal(got, want), f"trial {trial}, {cfg.label}, vocab {vocab}: filter_logits differs"
        if cfg.top_p < 1.0:
            scaled = logits.to(torch.float64) / cfg.temperature
            if cfg.top_k and cfg.top_k < vocab:
                scaled = _filter_logits_reference(logits, SamplingConfig(cfg.temperature, 1.0, cfg.top_k))
            if _top_p_drop(scaled, cfg.top_p) is None:
                fallbacks += 1
            else:
                fast += 1
    assert fallbacks > 10, f"only {fallbacks} rows had ties across the cut: that branch is not exercised"
    assert fast > 100, f"the numpy path ran {fast} times only"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
    ],
)
def test_sampling_config_rejects_bad_values(kwargs: dict[str, float], needle: str) -> None:
    with pytest.raises(InvalidArgumentError, match=needle):
        SamplingConfig(**kwargs)  # type: ignore[arg-type]


def test_token_suffix_goes_before_post_instruction_tokens() -> None:
    post = post_instruction_tokens(TOK)
    base = encode_prompts(TOK, PROMPTS[:2])
    suffix = [100, 101, 102]
    with_suffix = encode_prompts(TOK, PROMPTS[:2], suffixes=[suffix, None])
    n = len(post)
    assert with_suffix[0] == base[0][:-n] + suffix + base[0][-n:], (
        "token suffix not inserted before the template tail"
    )
    assert with_suffix[1] == base[1], "a None suffix changed the prompt"
    text = encode_prompts(TOK, PROMPTS[:1], suffixes=["zz top"])[0]
    expected = TOK(format_prompt(TOK, PROMPTS[0] + " zz top"), add_special_tokens=False)["input_ids"]
    assert text == expected, "a text suffix must be appended to the instruction after one space"


def test_bad_inputs_raise_before_running() -> None:
    model = tiny_model("llama")
    with pytest.raises(EmptyInputError):
        generate(model, TOK, [], progress=False)
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        generate(model, TOK, ["Hi"], max_new_tokens=0, progress=False)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        generate(model, TOK, ["Hi"], batch_size=0, progress=False)
    with pytest.raises(InvalidArgumentError, match="instructions"):
        generate(model, TOK, "Hi", progress=False)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="suffixes"):
        generate(model, TOK, ["Hi", "Yo"], suffixes=["x"], progress=False)


def test_generation_restores_training_flags_and_weights() -> None:
    model = tiny_model("llama")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generate(model, TOK, PROMPTS[:2], max_new_tokens=3, progress=False)
    assert all(m.training for m in model.modules()), "generate left the model in eval mode"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, f"generate changed weights {changed}"
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert all(m.training for m in model.modules()), "eval_mode did not restore flags after an exception"


# -- one prefill for many configurations ----------------------------------------


def _default_grid_with_greedy() -> tuple[list[SamplingConfig | None], list[int]]:
    from refusal_core.evaluation.attacks import DecodingAttack, _config_seed

    grid = DecodingAttack().configs
    assert len(grid) == 12, f"the default decoding grid has {len(grid)} configurations, expected 12"
    return [None, *grid], [0, *(_config_seed(0, c.label) for c in grid)]


@pytest.mark.parametrize("which", ["toy", "tiny-qwen2"])
def test_shared_prefill_equals_one_run_per_configuration(which: str) -> None:
    """Vanilla greedy + the default 12-configuration grid from one prefill: the same tokens as 13 runs."""
    if which == "toy":
        from refusal_core.toy import load_toy_model

        model, tok = load_toy_model()
        texts = tiny_prompts(5, "harmful", seed=11) + tiny_prompts(4, "harmless", seed=11) + PROMPTS[-2:]
    else:
        model, tok = tiny_model("qwen2", seed=7), TOK
        texts = PROMPTS
    prompts = encode_prompts(tok, texts)
    assert len({len(p) for p in prompts}) > 3, "the prompts must differ in length so batches are left-padded"
    samplings, seeds = _default_grid_with_greedy()
    # batch_size 4: several batches, so each configuration's generator is consumed across batch boundaries.
    kw = {"max_new_tokens": 8, "batch_size": 4, "stop_token_ids": NO_STOP, "progress": False}
    shared = generate_ids_multi(model, tok, prompts, samplings, seeds, **kw)  # type: ignore[arg-type]
    assert len(shared) == len(samplings), f"{len(shared)} outputs for {len(samplings)} configurations"
    distinct = set()
    for c, (sampling, seed) in enumerate(zip(samplings, seeds)):
        alone = generate_ids(model, tok, prompts, sampling=sampling, seed=seed, **kw)  # type: ignore[arg-type]
        label = "greedy" if sampling is None else sampling.label
        diff = [i for i, (a, b) in enumerate(zip(shared[c], alone)) if a != b]
        assert not diff, (
            f"{which}, {label}: shared-prefill tokens differ from the unshared run at prompts {diff}"
        )
        distinct.add(tuple(map(tuple, alone)))
    assert len(distinct) > 6, f"{which}: only {len(distinct)} distinct outputs over 13 configurations"


def test_shared_prefill_validates_before_running() -> None:
    model = tiny_model("llama")
    ids = encode_prompts(TOK, PROMPTS[:2])
    with pytest.raises(InvalidArgumentError, match="seeds"):
        generate_ids_multi(model, TOK, ids, [None, SamplingConfig()], [0], progress=False)
    with pytest.raises(InvalidArgumentError, match="samplings"):
        generate_ids_multi(model, TOK, ids, [], [], progress=False)
    with pytest.raises(InvalidArgumentError, match=r"samplings\[1\]"):
        generate_ids_multi(model, TOK, ids, [None, "greedy"], [0, 1], progress=False)  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError, match=r"seeds\[0\]"):
        generate_ids_multi(model, TOK, ids, [None], [1.5], progress=False)  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError, match="cache"):
        generate_ids(model, TOK, ids, cache={}, progress=False)  # type: ignore[arg-type]


# -- the generation memo --------------------------------------------------------


class ForwardCounter:
    """Counts top-level forward calls of a model through a forward pre-hook."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: object) -> None:
        self.calls += 1

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def test_generation_cache_reuses_only_an_identical_request() -> None:
    model = tiny_model("llama", seed=8)
    counter = ForwardCounter(model)  # registered once, before every call: part of the fingerprint for all
    memo = GenerationCache()
    cfg = SamplingConfig(temperature=1.2, top_p=0.95)
    base = {"max_new_tokens": 6, "sampling": cfg, "seed": 3, "system": None, "progress": False}

    def run(instructions: list[str], **changes: object) -> list[str]:
        return generate(model, TOK, instructions, cache=memo, **{**base, **changes})  # type: ignore[arg-type]

    first = run(PROMPTS)
    assert counter.take() > 0, "the first request ran no forward pass"
    again = run(PROMPTS)
    assert counter.take() == 0, "an identical second request ran the model again"
    assert again == first, "the memoised completions differ from the computed ones"
    assert (memo.hits, memo.misses) == (1, 1), f"hits/misses {memo.hits}/{memo.misses} after two equal calls"
    again[0] = "edited"
    assert run(PROMPTS)[0] == first[0], "editing a returned list corrupted the memo"
    counter.take()

    changes: dict[str, dict[str, object]] = {
        "prompts": {"instructions": PROMPTS[:-1]},
        "system prompt": {"system": "You are a careful assistant."},
        "sampling": {"sampling": SamplingConfig(temperature=0.9, top_p=0.95)},
        "seed": {"seed": 4},
        "max_new_tokens": {"max_new_tokens": 7},
        "greedy": {"sampling": None},
    }
    for what, change in changes.items():
        instructions = change.pop("instructions", PROMPTS)  # type: ignore[assignment]
        got = run(instructions, **change)  # type: ignore[arg-type]
        assert counter.take() > 0, f"changing the {what} reused a memoised generation"
        fresh = generate(model, TOK, instructions, **{**base, **change})  # type: ignore[arg-type]
        counter.take()
        assert got == fresh, f"changing the {what}: the memo-path output differs from a fresh run"

    weight = model.model.layers[0].mlp.down_proj.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] += 1.0
    run(PROMPTS)
    assert counter.take() > 0, "a changed weight reused the generation of the old weights"
    with torch.no_grad():
        weight.copy_(saved)
    extra = model.model.layers[0].register_forward_hook(lambda m, a, o: None)
    run(PROMPTS)
    assert counter.take() > 0, "a model with an extra forward hook reused the unhooked generation"
    extra.remove()
    assert run(PROMPTS) == first, "the restored model's memoised generation differs"
    assert counter.take() == 0, "the restored model missed its memoised generation"
    counter.handle.remove()


def test_generation_cache_serves_configurations_of_a_multi_run() -> None:
    model = tiny_model("llama", seed=9)
    memo = GenerationCache()
    ids = encode_prompts(TOK, PROMPTS)
    cfgs: list[SamplingConfig | None] = [None, SamplingConfig(0.7), SamplingConfig(1.3, top_k=5)]
    multi = generate_ids_multi(model, TOK, ids, cfgs, [0, 5, 6], max_new_tokens=5, cache=memo, progress=False)
    counter = ForwardCounter(model)
    # The counting hook changes the fingerprint, so look the runs up by an explicit model key instead.
    keyed = GenerationCache()
    generate_ids_multi(
        model, TOK, ids, cfgs, [0, 5, 6], max_new_tokens=5, cache=keyed, model_key="m", progress=False
    )
    counter.take()
    greedy = generate_ids(model, TOK, ids, max_new_tokens=5, cache=keyed, model_key="m", progress=False)
    sampled = generate_ids(
        model,
        TOK,
        ids,
        max_new_tokens=5,
        sampling=cfgs[1],
        seed=5,
        cache=keyed,
        model_key="m",
        progress=False,
    )
    assert counter.take() == 0, "a configuration computed by generate_ids_multi was generated again"
    assert greedy == multi[0], "memoised greedy output differs from the shared run"
    assert sampled == multi[1], "memoised sampled output differs from the shared run"
    generate_ids(
        model,
        TOK,
        ids,
        max_new_tokens=5,
        sampling=cfgs[1],
        seed=5,
        cache=keyed,
        model_key="other",
        progress=False,
    )
    assert counter.take() > 0, "a different model_key reused another model's generation"
    counter.handle.remove()


def test_generation_cache_hashes_a_model_once_per_state(monkeypatch: pytest.MonkeyPatch) -> None:
    from refusal_core.evaluation import generation

    model = tiny_model("llama", seed=10)
    memo = GenerationCache()
    hashed: list[int] = []
    real = generation.model_fingerprint
    monkeypatch.setattr(generation, "model_fingerprint", lambda m: hashed.append(1) or real(m))
    first = memo.fingerprint(model)
    assert first == real(model), "GenerationCache.fingerprint differs from model_fingerprint"
    for _ in range(3):
        generate(model, TOK, PROMPTS[:2], max_new_tokens=2, cache=memo, progress=False)
    assert len(hashed) == 1, f"an unchanged model was hashed {len(hashed)} times, expected once"
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(0.5)  # in place, under no_grad
    assert memo.fingerprint(model) != first, "an in-place weight edit kept the old fingerprint"
    model.model.layers[1].self_attn.o_proj.weight = torch.nn.Parameter(torch.zeros(32, 32))
    assert memo.fingerprint(model) != first, "a replaced weight kept the old fingerprint"
    assert len(hashed) == 3, f"{len(hashed)} hashes for three distinct model states"
