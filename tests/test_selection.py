"""Direction selection: batched scores equal the one-at-a-time loop; filters; persistence."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from refusal_core.directions import DirectionCandidates, extract_candidates
from refusal_core.errors import ArtifactError, EmptyInputError, InvalidArgumentError
from refusal_core.evaluation.scores import refusal_scores
from refusal_core.interventions import ablation_hooks, addition_hooks
from refusal_core.selection import (
    SelectionConfig,
    SelectionResult,
    _filters,
    select_direction,
    select_direction_naive,
)
from refusal_core.testing.tiny import tiny_model, tiny_prompts, tiny_tokenizer

REFUSAL_IDS = [11, 12, 13]


@pytest.fixture(scope="module")
def setup() -> tuple:
    model = tiny_model("llama", n_layers=3, d_model=32, seed=1)
    tok = tiny_tokenizer()
    harmful, harmless = tiny_prompts(16, "harmful", 0), tiny_prompts(16, "harmless", 0)
    cands = extract_candidates(model, tok, harmful, harmless)
    return model, tok, cands, harmful[:5], harmless[:6]


def test_batched_scores_equal_one_candidate_at_a_time(setup: tuple) -> None:
    model, tok, cands, hv, sv = setup
    fast = select_direction(model, tok, cands, hv, sv, REFUSAL_IDS, SelectionConfig(rows_per_forward=23))
    slow = select_direction_naive(model, tok, cands, hv, sv, REFUSAL_IDS)
    for name in ("bypass", "induce", "kl"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN pattern differs"
        diff = float((a - b).nan_to_num().abs().max())
        assert diff < 1e-4, f"{name}: batched vs naive differ by {diff}"
    assert fast.source == slow.source, f"selected {fast.source} vs naive {slow.source}"


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
    assert selected is None, f"nothing passes induce > 0, yet {selected} was selected"
    assert fallback == (3, 1), f"fallback {fallback}"
    no_induce_31 = induce.clone()
    no_induce_31[3, 1] = -1.0
    _, selected, fallback = _filters(bypass, no_induce_31, kl + 1.0, SelectionConfig())
    assert selected is None, "nothing passes KL <= 0.1"
    assert fallback == (1, 1), (
        f"KL relaxed first: (1, 1) has the lowest bypass with induce > 0, got {fallback}"
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
    assert torch.equal(back.bypass.nan_to_num(), res.bypass.nan_to_num()), "scores survive a round trip"
    other = tiny_model("llama", n_layers=3, d_model=32, seed=9)
    from refusal_core.models import model_identity

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
    full = select_direction(model, tok, cands, hv, sv, REFUSAL_IDS)
    pos = cands.positions[-1]
    cfg = SelectionConfig(layers=(1, 2), positions=(pos,), rows_per_forward=17)
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


def test_layer_cut_is_l_at_least_fraction_times_l() -> None:
    """DESIGN's rule l >= 0.8 L: with L = 4 the cut is 3.2, so layer 3 stays eligible."""
    bypass = torch.tensor([[0.0], [0.0], [0.0], [-1.0]], dtype=torch.float64)
    ones = torch.ones_like(bypass)
    _, selected, _ = _filters(bypass, ones, 0 * ones, SelectionConfig())
    assert selected == (3, 0), f"layer 3 of 4 is below 0.8 * 4 = 3.2 and has the lowest bypass: {selected}"
    _, selected, _ = _filters(bypass, ones, 0 * ones, SelectionConfig(max_layer_fraction=0.75))
    assert selected == (0, 0), f"with fraction 0.75 the cut is 3.0 and layer 3 goes: {selected}"
