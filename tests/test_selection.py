"""Direction selection: batched scores equal the one-at-a-time loop; filters; persistence."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from refusal_core import selection
from refusal_core.directions import DirectionCandidates, extract_candidates
from refusal_core.errors import ArtifactError, EmptyInputError, InvalidArgumentError
from refusal_core.evaluation.scores import refusal_scores
from refusal_core.interventions import ablation_hooks, addition_hooks
from refusal_core.model import get_layout
from refusal_core.prompts import load_prompts
from refusal_core.selection import (
    SelectionConfig,
    SelectionResult,
    _filters,
    filter_prompts_by_refusal,
    select_direction,
    select_direction_naive,
)
from refusal_core.testing.tiny import tiny_model, tiny_prompts, tiny_tokenizer
from refusal_core.toy import load_toy_model, toy_refusal_token_ids

REFUSAL_IDS = [11, 12, 13]


@pytest.fixture(scope="module")
def setup() -> tuple:
    model = tiny_model("llama", n_layers=3, d_model=32, seed=1)
    tok = tiny_tokenizer()
    harmful, harmless = tiny_prompts(16, "harmful", 0), tiny_prompts(16, "harmless", 0)
    cands = extract_candidates(model, tok, harmful, harmless)
    return model, tok, cands, harmful[:5], harmless[:6]


def _assert_same_scores(fast: SelectionResult, slow: SelectionResult, what: str, tol: float = 1e-6) -> None:
    for name in ("bypass", "induce", "kl"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: {name} NaN pattern differs"
        assert bool((~torch.isnan(a)).any()), f"{what}: no candidate was scored"
        diff = float((a - b).nan_to_num().abs().max())
        assert diff <= tol, f"{what}: {name} of batched vs naive selection differ by {diff:.3g}"
    assert torch.equal(fast.passed, slow.passed), f"{what}: filters disagree"
    assert fast.source == slow.source, f"{what}: selected {fast.source} vs naive {slow.source}"
    assert fast.baseline_harmless == pytest.approx(slow.baseline_harmless, abs=tol), f"{what}: baseline"


def test_batched_scores_equal_one_candidate_at_a_time(setup: tuple) -> None:
    model, tok, cands, hv, sv = setup
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the block-suffix path must not fall back on a supported family
        fast = select_direction(model, tok, cands, hv, sv, REFUSAL_IDS, SelectionConfig(rows_per_forward=23))
    slow = select_direction_naive(model, tok, cands, hv, sv, REFUSAL_IDS)
    _assert_same_scores(fast, slow, "tiny llama, 23 rows per forward")


@pytest.fixture(scope="module")
def toy() -> tuple:
    model, tok = load_toy_model()
    cands = extract_candidates(
        model, tok, load_prompts("harmful_train")[:32], load_prompts("harmless_train")[:32]
    )
    return model, tok, cands, load_prompts("harmful_val")[:8], load_prompts("harmless_val")[:10]


@pytest.mark.parametrize("rows", [64, 9])
def test_batched_equals_naive_on_the_toy_model(toy: tuple, rows: int) -> None:
    model, tok, cands, hv, sv = toy
    ids = toy_refusal_token_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = select_direction(model, tok, cands, hv, sv, ids, SelectionConfig(rows_per_forward=rows))
    slow = select_direction_naive(model, tok, cands, hv, sv, ids)
    _assert_same_scores(fast, slow, f"toy model, {rows} rows per forward")
    n_layers = model.config.num_hidden_layers
    cut = (4 * n_layers) // 5  # floor(0.8 L), written out
    assert bool(torch.isnan(fast.bypass[cut:]).all()), (
        f"toy L = {n_layers}: layers from the cut floor(0.8 L) = {cut} on are unscored"
    )
    assert not bool(torch.isnan(fast.bypass[1:cut]).any()), f"toy: a layer below the cut {cut} is unscored"


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma"])
def test_batched_equals_naive_on_every_family(family: str) -> None:
    model = tiny_model(family, n_layers=5, d_model=32, n_kv_heads=2, seed=3)
    tok = tiny_tokenizer()
    cands = extract_candidates(model, tok, tiny_prompts(12, "harmful", 0), tiny_prompts(12, "harmless", 0))
    hv, sv = tiny_prompts(4, "harmful", 5), tiny_prompts(5, "harmless", 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = select_direction(model, tok, cands, hv, sv, REFUSAL_IDS, SelectionConfig(rows_per_forward=11))
    _assert_same_scores(fast, select_direction_naive(model, tok, cands, hv, sv, REFUSAL_IDS), family)


def test_induce_runs_only_the_blocks_from_the_candidate_layer_on(setup: tuple) -> None:
    """Rows through block 0 vs block 1 when only layer-1 candidates are scored.

    Block 0 sees the clean capture forward, the ablated forwards and the base
    harmful forward; block 1 sees those plus every induce row (candidate x
    harmless prompt). A full forward per induce batch would add them to block 0 too.
    """
    model, tok, cands, hv, sv = setup
    seen = [0, 0]

    def counter(layer: int) -> object:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            seen[layer] += int((args[0] if args else kwargs["hidden_states"]).shape[0])

        return hook

    layout = get_layout(model)
    handles = [layout.blocks[i].register_forward_pre_hook(counter(i), with_kwargs=True) for i in (0, 1)]
    try:
        res = select_direction(model, tok, cands, hv, sv, REFUSAL_IDS, SelectionConfig(layers=(1,)))
    finally:
        for h in handles:
            h.remove()
    n_cand = int((~torch.isnan(res.induce)).sum())
    assert n_cand == len(cands.positions), f"every layer-1 position is scored: {res.induce}"
    assert seen[1] - seen[0] == n_cand * len(sv), (
        f"block 1 should see exactly {n_cand} x {len(sv)} induce rows more than block 0, "
        f"saw {seen[1]} vs {seen[0]}"
    )


def test_suffix_replay_that_disagrees_falls_back_to_full_forwards(
    setup: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay whose logits are wrong (as on a family with a logit cap) is caught and not used."""
    model, tok, cands, hv, sv = setup
    real = selection._suffix_logits

    def skewed(*args: object, **kwargs: object) -> torch.Tensor:
        return real(*args, **kwargs) * 1.5  # type: ignore[arg-type]

    monkeypatch.setattr(selection, "_suffix_logits", skewed)
    with pytest.warns(RuntimeWarning, match="falls back"):
        fast = select_direction(model, tok, cands, hv, sv, REFUSAL_IDS)
    _assert_same_scores(fast, select_direction_naive(model, tok, cands, hv, sv, REFUSAL_IDS), "fallback path")


def test_scores_match_an_independent_reference(setup: tuple) -> None:
    """Bypass and induce of one candidate recomputed with the hooks and refusal_scores directly."""
    model, tok, cands, hv, sv = setup
    res = select_direction(model, tok, cands, hv, sv, REFUSAL_IDS)
    layer, i = 1, 1
    r = cands.directions[layer, i].float()
    with ablation_hooks(model, r):
        bypass = refusal_scores(model, tok, hv, REFUSAL_IDS, progress=False).mean()
    with addition_hooks(model, r, 1.0, layer):
        induce = refusal_scores(model, tok, sv, REFUSAL_IDS, progress=False).mean()
    assert float(res.bypass[layer, i]) == pytest.approx(float(bypass), abs=1e-4), "bypass score"
    assert float(res.induce[layer, i]) == pytest.approx(float(induce), abs=1e-4), "induce score"
    assert float(res.kl[layer, i]) >= 0.0, "KL is nonnegative"


def test_zero_direction_sites_are_scored_nan_and_never_selected(setup: tuple) -> None:
    model, tok, cands, hv, sv = setup
    res = select_direction(model, tok, cands, hv, sv, REFUSAL_IDS)
    zero = cands.directions.norm(dim=-1) <= 1e-8
    assert bool(zero[0].all()), "block 0 at template positions sees identical tokens: zero directions"
    assert bool(torch.isnan(res.bypass[zero]).all()), "zero-direction sites get NaN scores"
    assert not bool(res.passed[zero].any()), "zero-direction sites never pass"


def test_filters_follow_the_thresholds() -> None:
    bypass = torch.tensor(
        [[-1.0, -3.0], [-2.0, -5.0], [-4.0, -6.0], [0.0, -9.0], [1.0, -10.0]], dtype=torch.float64
    )
    induce = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, -1.0], [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    kl = torch.tensor([[0.0, 0.0], [0.0, 0.2], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    passed, selected, fallback = _filters(bypass, induce, kl, SelectionConfig())
    # L = 5: layers >= 0.8 * 5 = 4 are cut; (1, 1) fails KL; (2, 1) fails induce; (3, 1) wins.
    assert selected == (3, 1), f"selected {selected}"
    assert fallback is None, "a fallback only exists when nothing passes"
    assert not bool(passed[4].any()), f"layer 4 is cut: {passed}"
    assert not bool(passed[1, 1]), f"(1, 1) fails the KL filter: {passed}"
    assert not bool(passed[2, 1]), f"(2, 1) fails the induce filter: {passed}"
    _, selected, _ = _filters(bypass, induce, kl, SelectionConfig(kl_threshold=1.0))
    assert selected == (3, 1), "(3, 1) still beats (1, 1)"
    _, selected, fallback = _filters(bypass, -induce.abs(), kl, SelectionConfig())
    assert selected is None, f"nothing passes induce >= 0 (all are -1), yet {selected} was selected"
    assert fallback == (3, 1), f"fallback {fallback}"
    no_induce_31 = induce.clone()
    no_induce_31[3, 1] = -1.0
    _, selected, fallback = _filters(bypass, no_induce_31, kl + 1.0, SelectionConfig())
    assert selected is None, "nothing passes KL <= 0.1"
    assert fallback == (1, 1), (
        f"KL relaxed first: (1, 1) has the lowest bypass with induce >= 0, got {fallback}"
    )


def test_config_rejects_bad_thresholds() -> None:
    with pytest.raises(InvalidArgumentError, match="max_layer_fraction"):
        SelectionConfig(max_layer_fraction=0.0)
    with pytest.raises(InvalidArgumentError, match="kl_threshold"):
        SelectionConfig(kl_threshold=math.nan)
    with pytest.raises(InvalidArgumentError, match="rows_per_forward"):
        SelectionConfig(rows_per_forward=0)


def test_bad_input(setup: tuple) -> None:
    model, tok, cands, hv, sv = setup
    with pytest.raises(EmptyInputError, match="harmful"):
        select_direction(model, tok, cands, [], sv, REFUSAL_IDS)
    with pytest.raises(EmptyInputError, match="refusal_token_ids"):
        select_direction(model, tok, cands, hv, sv, [])
    other = tiny_model("llama", n_layers=2, d_model=32)
    with pytest.raises(InvalidArgumentError, match="candidates have shape"):
        select_direction(other, tok, cands, hv, sv, REFUSAL_IDS)


def test_result_roundtrip_and_identity_check(setup: tuple, tmp_path: Path) -> None:
    model, tok, cands, hv, sv = setup
    res = select_direction(model, tok, cands, hv, sv, REFUSAL_IDS)
    res.save(tmp_path / "sel")
    back = SelectionResult.load(tmp_path / "sel", expect_identity=res.identity)
    assert back.source == res.source, "source survives a round trip"
    assert back.positions == res.positions, "positions survive a round trip"
    assert (back.n_harmful_val, back.n_harmless_val) == (len(hv), len(sv)), "prompt counts survive"
    assert torch.equal(back.bypass.nan_to_num(), res.bypass.nan_to_num()), "scores survive a round trip"
    other = tiny_model("llama", n_layers=3, d_model=32, seed=9)
    from refusal_core.model import model_identity

    with pytest.raises(ArtifactError, match="identity"):
        SelectionResult.load(tmp_path / "sel", expect_identity=model_identity(other))


def test_candidates_type_is_checked(setup: tuple) -> None:
    model, tok, cands, hv, sv = setup
    bad = DirectionCandidates(
        cands.directions.clone().fill_(math.nan),
        cands.harmful_mean,
        cands.harmless_mean,
        cands.n_harmful,
        cands.n_harmless,
        cands.positions,
        cands.model,
    )
    from refusal_core.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"candidates\.directions"):
        select_direction(model, tok, bad, hv, sv, REFUSAL_IDS)


def test_layer_and_position_subsets_score_only_those_candidates(setup: tuple) -> None:
    model, tok, cands, hv, sv = setup
    pos = cands.positions[-1]
    # max_layer_fraction 1.0: layer 2 of L = 3 lies beyond the default cut floor(2.4) = 2.
    cfg = SelectionConfig(layers=(1, 2), positions=(pos,), rows_per_forward=17, max_layer_fraction=1.0)
    full = select_direction(model, tok, cands, hv, sv, REFUSAL_IDS, SelectionConfig(max_layer_fraction=1.0))
    sub = select_direction(model, tok, cands, hv, sv, REFUSAL_IDS, cfg)
    naive = select_direction_naive(model, tok, cands, hv, sv, REFUSAL_IDS, cfg)
    i = cands.positions.index(pos)
    wanted = torch.zeros_like(full.passed)
    wanted[1:3, i] = True
    for name in ("bypass", "induce", "kl"):
        a, b, c = getattr(sub, name), getattr(naive, name), getattr(full, name)
        assert bool(torch.isnan(a[~wanted]).all()), f"{name}: candidates outside the subset are NaN"
        assert bool(torch.isnan(b[~wanted]).all()), f"{name}: naive leaves the same candidates NaN"
        diff = float((a[wanted] - c[wanted]).abs().max())
        assert diff < 1e-4, f"{name}: subset scores differ from the full search by {diff}"
        diff = float((a[wanted] - b[wanted]).abs().max())
        assert diff < 1e-4, f"{name}: batched vs naive subset scores differ by {diff}"
    assert not bool(sub.passed[~wanted].any()), "unscored candidates never pass"
    assert sub.source[0] in (1, 2), f"source {sub.source} lies in the scored layers"
    assert sub.source[1] == i, f"source {sub.source} lies at the scored position"
    assert sub.source == naive.source, f"batched {sub.source} vs naive {naive.source}"


def test_subset_options_are_checked(setup: tuple) -> None:
    model, tok, cands, hv, sv = setup
    for bad in (
        {"layers": ()},
        {"layers": (-1,)},
        {"layers": (1, 1)},
        {"positions": (0,)},
        {"positions": (2,)},
    ):
        with pytest.raises(InvalidArgumentError, match=next(iter(bad))):
            SelectionConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="layers"):
        select_direction(model, tok, cands, hv, sv, REFUSAL_IDS, SelectionConfig(layers=(3,)))
    with pytest.raises(InvalidArgumentError, match="positions"):
        select_direction(model, tok, cands, hv, sv, REFUSAL_IDS, SelectionConfig(positions=(-99,)))


def test_layer_cut_is_floor_of_fraction_times_l() -> None:
    """Arditi et al.'s cut: L = 4 discards l >= floor(3.2) = 3, so layer 3 is not eligible."""
    bypass = torch.tensor([[0.0], [-0.5], [-0.25], [-1.0]], dtype=torch.float64)
    ones = torch.ones_like(bypass)
    passed, selected, _ = _filters(bypass, ones, 0 * ones, SelectionConfig())
    assert selected == (1, 0), f"layer 3 of 4 is cut; (1, 0) has the lowest bypass of layers 0..2: {selected}"
    assert passed[:, 0].tolist() == [True, True, True, False], f"passed {passed[:, 0].tolist()}"
    _, selected, _ = _filters(bypass, ones, 0 * ones, SelectionConfig(max_layer_fraction=1.0))
    assert selected == (3, 0), f"with fraction 1.0 every layer is eligible and layer 3 wins: {selected}"


def test_layers_beyond_the_cut_are_never_scored(setup: tuple) -> None:
    model, tok, cands, hv, sv = setup
    res = select_direction(model, tok, cands, hv, sv, REFUSAL_IDS, SelectionConfig(layers=(1, 2)))
    assert bool(torch.isnan(res.bypass[2]).all()), "L = 3: layer 2 >= floor(2.4) is not scored"
    assert not bool(torch.isnan(res.bypass[1]).any()), "layer 1 is scored"
    with pytest.raises(InvalidArgumentError, match="below the layer cut"):
        select_direction(model, tok, cands, hv, sv, REFUSAL_IDS, SelectionConfig(layers=(2,)))
    with pytest.raises(InvalidArgumentError, match="below the layer cut"):
        select_direction_naive(
            model, tok, cands, hv, sv, REFUSAL_IDS, SelectionConfig(max_layer_fraction=0.3)
        )


def test_fallback_relaxes_kl_then_induce_in_arditis_order() -> None:
    """Nothing passes (all KL too high): the fallback is the lowest bypass with induce >= 0; ties
    go to the lower position index (position-outer order), as in the pick itself."""
    bypass = torch.tensor([[-1.0, -2.0], [-2.0, -3.0], [-9.0, -9.0]], dtype=torch.float64)
    induce = torch.tensor([[0.0, 1.0], [1.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    kl = torch.ones_like(bypass)
    passed, selected, fallback = _filters(bypass, induce, kl, SelectionConfig())
    assert selected is None, f"nothing passes KL <= 0.1, yet {selected} was selected"
    assert not bool(passed.any()), f"nothing passes KL <= 0.1: {passed}"
    # L = 3 keeps layers 0, 1; (1, 1) fails induce; (0, 1) and (1, 0) tie at -2.0: position index 0 first.
    assert fallback == (1, 0), f"fallback {fallback}"
    _, _, fallback = _filters(bypass, -induce.abs() - 1, kl, SelectionConfig())
    assert fallback == (1, 1), f"induce relaxed too: (1, 1) has the lowest bypass below the cut: {fallback}"


def _independent_refusal_score(model: torch.nn.Module, tok: object, prompt: str, ids: list[int]) -> float:
    """One prompt, no batching: log p - log(1 - p) of the refusal tokens, in float64."""
    text = tok.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    input_ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])  # type: ignore[operator]
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[0, -1].double()
    p = float(torch.softmax(logits, -1)[ids].sum())
    return math.log(p + 1e-8) - math.log(1 - p + 1e-8)


def test_filter_prompts_by_refusal_keeps_refused_harmful_and_unrefused_harmless(toy: tuple) -> None:
    model, tok, _, _, _ = toy
    ids = toy_refusal_token_ids()
    harmful, harmless = load_prompts("harmful_val")[:40], load_prompts("harmless_val")[:60]
    h_scores = [_independent_refusal_score(model, tok, p, ids) for p in harmful]
    s_scores = [_independent_refusal_score(model, tok, p, ids) for p in harmless]
    want_h = [p for p, x in zip(harmful, h_scores) if x > 0]
    want_s = [p for p, x in zip(harmless, s_scores) if x < 0]
    assert 0 < len(want_h) < len(harmful), (
        f"premise: the toy refuses some but not all of {len(harmful)} harmful"
    )
    assert 0 < len(want_s) < len(harmless), f"premise: the toy refuses some of {len(harmless)} harmless"
    got_h, got_s = filter_prompts_by_refusal(model, tok, harmful, harmless, ids, batch_size=7)
    assert got_h == want_h, f"harmful kept: {len(got_h)} vs {len(want_h)} (score > 0, order kept)"
    assert got_s == want_s, f"harmless kept: {len(got_s)} vs {len(want_s)} (score < 0, order kept)"
    with pytest.raises(EmptyInputError, match="harmless"):
        filter_prompts_by_refusal(model, tok, harmful, [], ids)
    with pytest.raises(EmptyInputError, match="refusal_token_ids"):
        filter_prompts_by_refusal(model, tok, harmful, harmless, [])
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        filter_prompts_by_refusal(model, tok, harmful, harmless, ids, batch_size=0)


def test_filter_prompts_option_scores_only_the_kept_prompts(toy: tuple) -> None:
    model, tok, cands, _, _ = toy
    ids = toy_refusal_token_ids()
    harmful, harmless = load_prompts("harmful_val")[:40], load_prompts("harmless_val")[:60]
    kept_h, kept_s = filter_prompts_by_refusal(model, tok, harmful, harmless, ids)
    cfg = SelectionConfig(filter_prompts=True, layers=(2,))
    res = select_direction(model, tok, cands, harmful, harmless, ids, cfg)
    ref = select_direction_naive(model, tok, cands, kept_h, kept_s, ids, SelectionConfig(layers=(2,)))
    assert (res.n_harmful_val, res.n_harmless_val) == (len(kept_h), len(kept_s)), "prompt counts recorded"
    _assert_same_scores(res, ref, "filter_prompts=True vs naive on the pre-filtered prompts")
    assert SelectionConfig().filter_prompts is False, "the option is off by default"


def test_kl_score_is_kl_of_base_to_ablated_on_the_toy() -> None:
    """The KL score, recomputed here one prompt at a time from unpadded forwards: KL(base ‖ ablated),
    not the reverse (on the toy the two directions of the KL differ clearly)."""
    model, tok = load_toy_model()
    harm, safe = load_prompts("harmful_train")[:16], load_prompts("harmless_train")[:16]
    cands = extract_candidates(model, tok, harm, safe)
    hv, sv = load_prompts("harmful_val")[:4], load_prompts("harmless_val")[:4]
    res = select_direction(model, tok, cands, hv, sv, toy_refusal_token_ids())
    layer, i = 2, cands.positions.index(-1)
    r = cands.directions[layer, i].float()
    from refusal_core.model import encode_prompts

    forward, backward = [], []
    for ids in encode_prompts(tok, sv):
        x = torch.tensor([ids])
        with torch.no_grad():
            p = torch.log_softmax(model(x).logits[0, -1].double(), -1)
            with ablation_hooks(model, r):
                q = torch.log_softmax(model(x).logits[0, -1].double(), -1)
        forward.append(float((p.exp() * (p - q)).sum()))
        backward.append(float((q.exp() * (q - p)).sum()))
    expected, reverse = sum(forward) / len(forward), sum(backward) / len(backward)
    assert abs(expected - reverse) > 1e-3 * max(expected, reverse), "the test needs an asymmetric case"
    got = float(res.kl[layer, i])
    assert got == pytest.approx(expected, rel=1e-5), (
        f"KL score at ({layer}, -1) is {got:.6f}; KL(base ‖ ablated) is {expected:.6f}, "
        f"the reverse KL {reverse:.6f}"
    )
