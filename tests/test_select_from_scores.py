"""``select_from_scores`` on hand-made score tables: Arditi et al.'s filters and tie order.

The reference in :func:`_arditi_select` is Arditi et al.'s ``filter_fn`` and
stable sort (``pipeline/submodules/select_direction.py``) re-written here from
their description, with their ``int(n_layer * (1.0 - 0.2))`` cut spelled as
they spell it, independent of ``refusal_core.selection``.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refusal_core.errors import InvalidArgumentError
from refusal_core.selection import SelectionConfig, layer_cut, select_from_scores


def row(layer: int, position: int, bypass: float, induce: float = 1.0, kl: float = 0.0) -> dict[str, Any]:
    return {"layer": layer, "position": position, "bypass": bypass, "induce": induce, "kl": kl}


def _arditi_select(
    rows: list[dict[str, Any]], n_layer: int, kl_threshold: float, induce_threshold: float, prune: float
) -> tuple[int, int] | None:
    """Arditi et al.'s filter and pick: position-outer, layer-inner, sorted by -bypass (stable)."""
    by_site = {(r["position"], r["layer"]): r for r in rows}
    kept = []
    for pos in sorted({p for p, _ in by_site}):
        for layer in range(n_layer):
            r = by_site.get((pos, layer))
            if r is None:
                continue
            b, s, k = r["bypass"], r["induce"], r["kl"]
            if math.isnan(b) or math.isnan(s) or math.isnan(k):
                continue
            if layer >= int(n_layer * (1.0 - prune)):
                continue
            if k > kl_threshold:
                continue
            if s < induce_threshold:
                continue
            kept.append((-b, pos, layer))
    if not kept:
        return None
    _, pos, layer = sorted(kept, key=lambda x: x[0], reverse=True)[0]
    return layer, pos


@pytest.mark.parametrize(("n_layers", "last_kept"), [(4, 2), (5, 3), (10, 7), (32, 24)])
def test_layer_cut_is_floor_of_four_fifths(n_layers: int, last_kept: int) -> None:
    """Bypass falls with the layer, so the deepest eligible layer wins: floor(0.8 L) - 1."""
    table = [row(layer, -1, bypass=-float(layer)) for layer in range(n_layers)]
    got = select_from_scores(table, n_layers)
    assert got == (last_kept, -1), (
        f"select_from_scores with L={n_layers}: layers 0..{last_kept} are eligible "
        f"(cut at floor(0.8*{n_layers})), so ({last_kept}, -1) wins, got {got}"
    )


def test_layer_cut_matches_arditis_int_expression_and_is_exact_elsewhere() -> None:
    for n in range(1, 513):
        assert layer_cut(n) == int(n * (1.0 - 0.2)), f"layer_cut({n}) vs Arditi's int({n} * 0.8)"
    # int(L * f) lands one below the exact floor here; the decimal reading does not.
    assert int(90 * 0.7) == 62, "premise: floating point rounds 90 * 0.7 below 63"
    assert layer_cut(90, 0.7) == 63, f"layer_cut(90, 0.7) = floor(63) = 63, got {layer_cut(90, 0.7)}"
    assert layer_cut(100, 0.57) == 57, f"layer_cut(100, 0.57) = 57, got {layer_cut(100, 0.57)}"
    assert layer_cut(4, 1.0) == 4, "fraction 1.0 keeps every layer"
    with pytest.raises(InvalidArgumentError, match="n_layers"):
        layer_cut(0)
    with pytest.raises(InvalidArgumentError, match="max_layer_fraction"):
        layer_cut(4, 1.5)


def test_induce_exactly_zero_is_kept_and_just_below_is_dropped() -> None:
    best, other = row(1, -1, bypass=-5.0, induce=0.0), row(2, -1, bypass=-1.0, induce=3.0)
    got = select_from_scores([best, other], 4)
    assert got == (1, -1), f"induce == 0.0 passes induce_threshold 0.0 (only < 0 is dropped), got {got}"
    best["induce"] = -1e-9
    got = select_from_scores([best, other], 4)
    assert got == (2, -1), f"induce = -1e-9 < 0 is dropped, so (2, -1) wins, got {got}"


def test_kl_exactly_at_threshold_is_kept_and_just_above_is_dropped() -> None:
    best, other = row(0, -2, bypass=-5.0, kl=0.1), row(1, -2, bypass=-1.0, kl=0.0)
    got = select_from_scores([best, other], 4)
    assert got == (0, -2), f"kl == 0.1 passes kl_threshold 0.1 (only > is dropped), got {got}"
    best["kl"] = math.nextafter(0.1, 1.0)
    got = select_from_scores([best, other], 4)
    assert got == (1, -2), f"kl just above 0.1 is dropped, so (1, -2) wins, got {got}"


@pytest.mark.parametrize("key", ["bypass", "induce", "kl"])
def test_a_nan_score_drops_the_candidate(key: str) -> None:
    best, other = row(1, -1, bypass=-5.0), row(2, -1, bypass=-1.0)
    best[key] = math.nan
    got = select_from_scores([best, other], 4)
    assert got == (2, -1), f"a NaN {key} drops (1, -1), so (2, -1) wins, got {got}"


def test_ties_go_to_the_first_candidate_position_outer_layer_inner() -> None:
    tied = [row(2, -2, -3.0), row(1, -1, -3.0), row(0, -1, -3.0), row(1, -2, -3.0)]
    for seed in range(5):
        shuffled = tied[:]
        random.Random(seed).shuffle(shuffled)
        got = select_from_scores(shuffled, 4)
        assert got == (1, -2), (
            f"equal bypass: position -2 comes before -1 and layer 1 before 2 in Arditi's order, "
            f"so (1, -2) wins whatever the input order; got {got} for {shuffled}"
        )
    got = select_from_scores([row(2, -1, -3.0), row(0, -1, -3.0)], 4)
    assert got == (0, -1), f"same position: the lower layer wins a tie, got {got}"


def test_nothing_passing_gives_none() -> None:
    table = [row(0, -1, -1.0, induce=-1.0), row(1, -1, -2.0, kl=0.5), row(3, -1, -9.0), row(2, -1, math.nan)]
    got = select_from_scores(table, 4)
    assert got is None, f"each candidate fails one filter, yet {got} was selected"
    assert select_from_scores([], 4) is None, "an empty table selects nothing"


def test_every_threshold_is_honoured_when_changed() -> None:
    table = [
        row(3, -1, bypass=-9.0),  # beyond the default cut of L = 4
        row(2, -1, bypass=-8.0, kl=0.5),  # KL above 0.1
        row(1, -1, bypass=-7.0, induce=0.5),  # induce below 1.0
        row(0, -1, bypass=-6.0, induce=2.0),
    ]
    cases = [
        (SelectionConfig(), (1, -1), "defaults: (1, -1) has the lowest bypass that passes"),
        (SelectionConfig(max_layer_fraction=1.0), (3, -1), "fraction 1.0 keeps layer 3"),
        (SelectionConfig(kl_threshold=0.5), (2, -1), "kl_threshold 0.5 keeps kl 0.5"),
        (SelectionConfig(induce_threshold=1.0), (0, -1), "induce_threshold 1.0 drops induce 0.5 and 1.0"),
        (SelectionConfig(max_layer_fraction=0.5), (1, -1), "fraction 0.5 of L = 4 keeps layers 0, 1"),
        (SelectionConfig(max_layer_fraction=0.25, induce_threshold=1.5), (0, -1), "fraction 0.25 keeps 0"),
        (SelectionConfig(induce_threshold=2.5), None, "induce_threshold 2.5 drops everything"),
    ]
    for config, want, why in cases:
        got = select_from_scores(table, 4, config)
        assert got == want, f"select_from_scores with {config}: {why}; want {want}, got {got}"


score_values = st.sampled_from([-2.0, -1.0, 0.0, 0.05, 0.1, 0.2, 1.0, math.nan])


@settings(max_examples=300, deadline=None)
@given(
    n_layers=st.integers(1, 12),
    n_pos=st.integers(1, 4),
    data=st.data(),
    kl_threshold=st.sampled_from([0.0, 0.1, 1.0]),
    induce_threshold=st.sampled_from([-1.0, 0.0, 0.1]),
    prune=st.sampled_from([0.2, 0.5, 0.0]),
)
def test_agrees_with_arditis_filter_and_sort(
    n_layers: int,
    n_pos: int,
    data: st.DataObject,
    kl_threshold: float,
    induce_threshold: float,
    prune: float,
) -> None:
    sites = [(layer, -p) for p in range(1, n_pos + 1) for layer in range(n_layers)]
    table = [
        row(layer, pos, data.draw(score_values), data.draw(score_values), data.draw(score_values))
        for layer, pos in data.draw(st.permutations(sites))
    ]
    config = SelectionConfig(
        max_layer_fraction=1.0 - prune, kl_threshold=kl_threshold, induce_threshold=induce_threshold
    )
    want = _arditi_select(table, n_layers, kl_threshold, induce_threshold, prune)
    got = select_from_scores(table, n_layers, config)
    assert got == want, f"select_from_scores(L={n_layers}, {config}) = {got}, Arditi's rule gives {want}"


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ([{"layer": 0, "position": -1, "bypass": 0.0, "induce": 0.0}], "lacks the keys"),
        ([row(0, -1, "low")], "bypass"),  # type: ignore[arg-type]
        ([row(0, -1, 0.0, induce=None)], "induce"),  # type: ignore[arg-type]
        ([row(0, -1, 0.0, kl=True)], "kl"),
        ([row(4, -1, 0.0)], "layer"),
        ([row(-1, -1, 0.0)], "layer"),
        ([row(1.0, -1, 0.0)], "layer"),  # type: ignore[arg-type]
        ([row(0, 0, 0.0)], "position"),
        ([row(0, 2, 0.0)], "position"),
        ([row(0, -1, 0.0), row(0, -1, 1.0)], "repeats"),
        ([(0, -1, 0.0, 0.0, 0.0)], "mapping"),
        (row(0, -1, 0.0), "iterable of mappings"),
    ],
)
def test_bad_tables_raise(table: Any, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        select_from_scores(table, 4)


def test_bad_n_layers_and_config_raise() -> None:
    with pytest.raises(InvalidArgumentError, match="n_layers"):
        select_from_scores([row(0, -1, 0.0)], 0)
    with pytest.raises(InvalidArgumentError, match="config"):
        select_from_scores([row(0, -1, 0.0)], 4, {"kl_threshold": 0.1})  # type: ignore[arg-type]


def test_config_rejects_bad_thresholds() -> None:
    for kwargs, name in (
        ({"induce_threshold": math.nan}, "induce_threshold"),
        ({"induce_threshold": "0"}, "induce_threshold"),
        ({"kl_threshold": -0.1}, "kl_threshold"),
        ({"max_layer_fraction": 1.2}, "max_layer_fraction"),
        ({"filter_prompts": 1}, "filter_prompts"),
        ({"rows_per_forward": 2.5}, "rows_per_forward"),
    ):
        with pytest.raises(InvalidArgumentError, match=name):
            SelectionConfig(**kwargs)  # type: ignore[arg-type]
    relaxed = SelectionConfig(kl_threshold=math.inf, induce_threshold=-math.inf)
    assert select_from_scores([row(0, -1, 0.0, induce=-1e9, kl=1e9)], 4, relaxed) == (0, -1), (
        "infinite thresholds (the fallback's relaxation) keep any finite score"
    )
