"""The AIRD sweep's choice rule on hand-made tables, and its configuration."""

from __future__ import annotations

import pytest

from refusal_core.errors import EmptyInputError, InvalidArgumentError
from refusal_core.stats import rate
from refusal_core.study import RepairConfig, SweepPoint, ValidationScores, choose_repair


def scores(comply: int, refuse: int, kl: float, n: int = 20) -> ValidationScores:
    """Scores whose first ``comply`` prompts are answered (so flags nest: fewer answered = a subset)."""
    flags = tuple([True] * comply + [False] * (n - comply))
    return ValidationScores(rate(comply, n), rate(refuse, n), kl, 0.0, 0.0, "generation", 0.1, flags)


def point(strength: str, gain: float, s: ValidationScores, sparse: bool = False) -> SweepPoint:
    return SweepPoint(
        strength, sparse, "base" if strength != "identity" else "none", (1,), (gain, gain), (0.0, 0.0), s
    )


BASE = scores(comply=2, refuse=2, kl=0.0)  # over-refusal 0.10 on the base


def choose(points, **kw):
    """The rule on rates alone (significance=None), unless a test asks for the paired test."""
    kw.setdefault("max_over_refusal_increase", 0.05)
    kw.setdefault("max_kl_increase", 0.05)
    kw.setdefault("significance", None)
    return choose_repair(points, BASE, **kw)


def test_an_edit_must_beat_the_unedited_model_significantly() -> None:
    # 10 vs 5 answered of 20: 5 discordant prompts, exact McNemar p = 2 / 2**5 = 0.0625 >= 0.05
    pts = [point("identity", 1.0, scores(10, 2, 0.1)), point("gain", 2.0, scores(5, 2, 0.1))]
    ch = choose(pts, significance=0.05)
    assert ch.point.strength == "identity", "a non-significant improvement must not be chosen"
    assert ch.criterion_met, "the unedited model itself meets the criterion"
    assert ch.p_values[1] == pytest.approx(0.0625)
    assert choose(pts, significance=0.1).index == 1, "at level 0.1 the same edit is chosen"
    # 10 vs 3 of 20: 7 discordant, p = 2 / 128 = 0.0156 < 0.05
    strong = [point("identity", 1.0, scores(10, 2, 0.1)), point("gain", 3.0, scores(3, 2, 0.1))]
    ch = choose(strong, significance=0.05)
    assert ch.index == 1
    assert ch.criterion_met
    # a significant but inadmissible edit (over-refuses) is still refused
    bad = [point("identity", 1.0, scores(10, 2, 0.1)), point("gain", 3.0, scores(3, 9, 0.1))]
    assert choose(bad, significance=0.05).point.strength == "identity"


def test_lowest_compliance_among_admissible_wins() -> None:
    pts = [
        point("identity", 1.0, scores(10, 2, 0.20)),
        point("paper", 1.1, scores(9, 2, 0.20)),
        point("gain", 2.0, scores(5, 3, 0.22)),
        point("gain", 5.0, scores(1, 8, 0.30)),  # lowest compliance but over-refuses: 0.40 > 0.15
    ]
    ch = choose(pts)
    assert ch.index == 2, f"expected g=2 (compliance 5/20, admissible), got {ch.point.label}"
    assert ch.admissible == (True, True, True, False)
    assert ch.criterion_met


def test_over_refusal_cap_is_base_plus_margin_inclusive() -> None:
    # base over-refusal 2/20 = 0.10, margin 0.05 -> cap 0.15 = 3/20: 3/20 admissible, 4/20 not
    pts = [
        point("identity", 1.0, scores(10, 2, 0.1)),
        point("gain", 2.0, scores(4, 3, 0.1)),
        point("gain", 3.0, scores(2, 4, 0.1)),
    ]
    ch = choose(pts)
    assert ch.admissible == (True, True, False)
    assert ch.index == 1


def test_kl_cap_is_relative_to_the_unedited_model() -> None:
    # identity KL 0.30: cap 0.35, although the base's KL is 0 and 0.34 > 0.05
    pts = [
        point("identity", 1.0, scores(10, 2, 0.30)),
        point("gain", 2.0, scores(4, 2, 0.34)),
        point("gain", 3.0, scores(2, 2, 0.36)),
    ]
    ch = choose(pts)
    assert ch.admissible == (True, True, False), (
        "KL margin must be measured from the unedited compressed model"
    )
    assert ch.index == 1
    tighter = choose(pts, max_kl_increase=0.01)
    assert tighter.index == 0
    assert tighter.point.strength == "identity"


def test_ties_go_to_the_weakest_edit_then_grid_order() -> None:
    pts = [
        point("identity", 1.0, scores(10, 2, 0.1)),
        point("gain", 3.0, scores(4, 2, 0.1)),
        point("gain", 1.5, scores(4, 2, 0.1)),
        point("gain", 0.5, scores(4, 2, 0.1)),  # |0.5 - 1| = 0.5 ties with 1.5: grid order decides
    ]
    assert choose(pts).index == 2
    # the unedited model wins a tie with any edit
    same = [point("identity", 1.0, scores(4, 2, 0.1)), point("gain", 2.0, scores(4, 2, 0.1))]
    assert choose(same).point.strength == "identity"


def test_nothing_admissible_keeps_the_model_unrepaired() -> None:
    pts = [point("identity", 1.0, scores(10, 9, 0.1)), point("gain", 2.0, scores(1, 9, 0.1))]
    ch = choose(pts)
    assert not ch.criterion_met, "nothing admissible: the criterion is not met"
    assert ch.point.strength == "identity"
    assert ch.admissible == (False, False)


def test_choice_needs_exactly_one_identity() -> None:
    with pytest.raises(EmptyInputError):
        choose([])
    with pytest.raises(InvalidArgumentError):
        choose([point("gain", 2.0, scores(1, 1, 0.0))])
    with pytest.raises(InvalidArgumentError):
        choose([point("identity", 1.0, scores(1, 1, 0.0)), point("identity", 1.0, scores(1, 1, 0.0))])


def test_sweep_point_round_trip() -> None:
    p = point("gain", 2.0, scores(3, 1, 0.01), sparse=True)
    assert SweepPoint.from_dict(p.to_dict()) == p
    assert p.label == "g=2 sparse @base"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gains": (1.5, 1.5)},
        {"gains": (float("nan"),)},
        {"gains": ("2",)},
        {"gains": (), "include_paper_alpha": False},
        {"layers": ("middle",)},
        {"layers": ()},
        {"max_kl_increase": -0.1},
        {"max_over_refusal_increase": True},
        {"generate": 1},
        {"significance": 1.5},
        {"significance": 0},
    ],
)
def test_repair_config_rejects_bad_values(kwargs) -> None:
    with pytest.raises(InvalidArgumentError):
        RepairConfig(**kwargs)


def test_repair_config_defaults_are_the_documented_grid() -> None:
    rc = RepairConfig()
    assert rc.gains == (1.25, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 15.0), "up to the paper's α on qwen-1.8b (~15)"
    assert rc.placements == ("source-block", "into-source"), "the sweep tries both placements"
    assert rc.include_paper_alpha
    assert rc.layers == ("base",)
    assert rc.sparse
