"""The statistics module against values computed by hand (closed forms written out here, not scipy)."""

from __future__ import annotations

import math

import pytest

from refusal_core.errors import EmptyInputError, InvalidArgumentError, ShapeMismatchError
from refusal_core.stats import mcnemar, paired_mean_difference, rate, rate_of, wilson_interval

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson_by_hand(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (1, 64), (32, 64), (63, 64), (5, 7)])
def test_wilson_matches_the_closed_form(k: int, n: int) -> None:
    lo, hi = wilson_interval(k, n)
    elo, ehi = wilson_by_hand(k, n)
    assert lo == pytest.approx(max(0.0, elo), abs=1e-9), f"wilson_interval({k}, {n}) low"
    assert hi == pytest.approx(min(1.0, ehi), abs=1e-9), f"wilson_interval({k}, {n}) high"


def test_wilson_known_values() -> None:
    # 3 of 10: worked by hand, centre 0.35550, half-width 0.24772
    lo, hi = wilson_interval(3, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.1078, 0.6032)
    # 0 of 64 is not [0, 0]: the upper bound is z²/(n + z²)
    lo, hi = wilson_interval(0, 64)
    assert lo == 0.0
    assert hi == pytest.approx(Z95**2 / (64 + Z95**2), abs=1e-12)


def test_wilson_other_confidence() -> None:
    z90 = 1.6448536269514722
    lo, hi = wilson_interval(7, 20, confidence=0.90)
    elo, ehi = wilson_by_hand(7, 20, z90)
    assert (lo, hi) == (pytest.approx(elo, abs=1e-9), pytest.approx(ehi, abs=1e-9))


def test_rate_of_counts_true() -> None:
    r = rate_of([True, False, True, True])
    assert (r.k, r.n, r.value) == (3, 4, 0.75)
    assert r.to_dict()["k"] == 3
    assert type(r).from_dict(r.to_dict()) == r


def binomial_two_sided_by_hand(b: int, m: int) -> float:
    """Exact two-sided p of b successes in m fair trials: sum of the outcomes no more likely than b."""
    probs = [math.comb(m, i) / 2**m for i in range(m + 1)]
    pb = probs[b]
    return min(1.0, sum(p for p in probs if p <= pb * (1 + 1e-7)))


@pytest.mark.parametrize(("b", "c"), [(0, 0), (2, 1), (10, 0), (0, 6), (7, 2), (12, 20)])
def test_mcnemar_matches_the_binomial_sum(b: int, c: int) -> None:
    # b prompts go True -> False, c go False -> True, plus 5 concordant of each kind
    before = [True] * b + [False] * c + [True] * 5 + [False] * 5
    after = [False] * b + [True] * c + [True] * 5 + [False] * 5
    t = mcnemar(before, after)
    assert (t.b, t.c, t.n) == (b, c, b + c + 10)
    expected = 1.0 if b + c == 0 else binomial_two_sided_by_hand(b, b + c)
    assert t.p_value == pytest.approx(expected, rel=1e-9), f"mcnemar p for b={b}, c={c}"
    assert t.difference == pytest.approx((c - b) / (b + c + 10))
    assert t.significant == (expected < 0.05)


def test_mcnemar_known_values() -> None:
    t = mcnemar([True] * 10 + [False] * 10, [False] * 20)
    assert t.p_value == pytest.approx(2 * 0.5**10)  # 0.001953125
    assert t.significant
    # 6 vs 0 discordant: 2 / 64 = 0.03125 < 0.05; 5 vs 0: 0.0625, not significant
    assert mcnemar([True] * 6, [False] * 6).p_value == pytest.approx(0.03125)
    assert not mcnemar([True] * 5, [False] * 5).significant


def test_mcnemar_ignores_concordant_pairs() -> None:
    """Concordant prompts carry no information: adding them leaves p unchanged."""
    small = mcnemar([True, True, True, False], [False, False, False, False])
    large = mcnemar([True] * 3 + [True] * 50 + [False] * 50, [False] * 3 + [True] * 50 + [False] * 50)
    assert small.p_value == large.p_value == pytest.approx(0.25)


def test_paired_mean_difference() -> None:
    before = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    after = [v + 1.0 for v in before]
    d = paired_mean_difference(before, after)
    assert d.difference == pytest.approx(1.0)
    assert (d.low, d.high) == (pytest.approx(1.0), pytest.approx(1.0))
    assert d.significant
    noisy = paired_mean_difference([0.0] * 8, [1.0, -1.0, 0.5, -0.5, 0.2, -0.2, 0.1, -0.1])
    assert noisy.low < 0.0 < noisy.high
    assert not noisy.significant
    shifted = paired_mean_difference([0.0] * 40, [1.0 + 0.1 * ((-1) ** i) for i in range(40)])
    assert shifted.significant
    assert shifted.low > 0.8


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: wilson_interval(3, 0), EmptyInputError),
        (lambda: wilson_interval(11, 10), InvalidArgumentError),
        (lambda: wilson_interval(-1, 10), InvalidArgumentError),
        (lambda: wilson_interval(1.5, 10), InvalidArgumentError),
        (lambda: wilson_interval(True, 10), InvalidArgumentError),
        (lambda: wilson_interval(1, 10, confidence=1.0), InvalidArgumentError),
        (lambda: rate(1, 10, confidence="0.9"), InvalidArgumentError),
        (lambda: mcnemar([True], [True, False]), ShapeMismatchError),
        (lambda: mcnemar([], []), EmptyInputError),
        (lambda: mcnemar([1, 0], [0, 1]), InvalidArgumentError),
        (lambda: paired_mean_difference([1.0], [1.0, 2.0]), ShapeMismatchError),
        (lambda: paired_mean_difference([math.nan], [1.0]), InvalidArgumentError),
    ],
)
def test_bad_input(call, error) -> None:
    with pytest.raises(error):
        call()


def _exact_power_by_enumeration(n: int, p_up: float, p_down: float) -> float:
    """Independent reference: every assignment of n pairs to (up, down, same), weighted, tested by mcnemar."""
    import itertools

    total = 0.0
    for moves in itertools.product((0, 1, 2), repeat=n):
        weight = 1.0
        before, after = [], []
        for m in moves:
            weight *= (p_up, p_down, 1 - p_up - p_down)[m]
            before.append(m == 1)
            after.append(m == 0)
        if mcnemar(before, after).significant:
            total += weight
    return total


def test_mcnemar_power_equals_enumeration_of_every_outcome():
    from refusal_core.stats import mcnemar_power

    # n = 6: only 6 of 6 discordant one way reaches p < 0.05 (p = 0.03125).
    for p_up, p_down in ((0.6, 0.1), (0.3, 0.0), (0.5, 0.5), (0.0, 0.2)):
        want = _exact_power_by_enumeration(6, p_up, p_down)
        got = mcnemar_power(6, p_up, p_down)
        assert got == pytest.approx(want, abs=1e-12), f"mcnemar_power(6, {p_up}, {p_down}): {got} != {want}"


def test_minimum_detectable_change_reaches_the_power_and_no_smaller_change_does():
    from refusal_core.stats import mcnemar_power, minimum_detectable_change

    for n, down in ((64, 0.0), (64, 0.05), (128, 0.02)):
        mdc = minimum_detectable_change(n, p_down=down)
        assert mdc is not None
        power = mcnemar_power(n, down + mdc, down)
        assert power >= 0.8 - 1e-9, f"n={n}, p_down={down}: mdc {mdc} underpowered ({power})"
        assert mcnemar_power(n, down + mdc - 0.01, down) < 0.8, f"n={n}, p_down={down}: mdc {mdc} not minimal"
    assert minimum_detectable_change(128) < minimum_detectable_change(64), "more prompts must detect less"
    assert minimum_detectable_change(3) is None, "3 pairs can never reach p < 0.05"


def test_holm_matches_the_textbook_step_down():
    from refusal_core.stats import holm

    # Sorted p: 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, max(., 2*0.03), max(., 1*0.04).
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
    with pytest.raises(InvalidArgumentError):
        holm([1.5])


def _power_one_pmf_call_per_d(n: int, p_up: float, p_down: float, level: float) -> float:
    """mcnemar_power as first written: the rejection region and binom.pmf recomputed for every d."""
    import numpy as np
    from scipy.stats import binom

    disc = min(1.0, p_up + p_down)
    if disc == 0.0:
        return 0.0
    share = p_up / disc
    p_d = binom.pmf(np.arange(n + 1), n, disc)
    power = 0.0
    for d in range(1, n + 1):
        if p_d[d] < 1e-15:
            continue
        k = np.arange(d + 1)
        tail = np.minimum(binom.cdf(k, d, 0.5), binom.sf(k - 1, d, 0.5))
        reject = np.minimum(1.0, 2.0 * tail) < level
        power += float(p_d[d] * binom.pmf(k, d, share)[reject].sum())
    return min(1.0, power)


def test_mcnemar_power_is_bit_identical_to_one_pmf_call_per_discordant_count():
    """The memoised rejection regions and the one-call pmf table change no bit of the power (the
    report's minimum detectable changes are computed from it)."""
    import random

    from refusal_core.stats import mcnemar_power

    rng = random.Random(0)
    for _ in range(150):
        n = rng.choice([1, 2, 7, 32, 64, 100])
        down = rng.choice([0.0, 0.03125, rng.random() * 0.5])
        up = rng.random() * (1.0 - down)
        level = rng.choice([0.05, 0.01, 0.2])
        want = _power_one_pmf_call_per_d(n, up, down, level)
        got = mcnemar_power(n, up, down, level)
        assert got == want, f"mcnemar_power({n}, {up}, {down}, level={level}) = {got!r}, per-d form {want!r}"
