"""Uncertainty of every reported number: binomial intervals and paired tests.

The study reports rates on a few dozen prompts, where one prompt moves a rate
by 1/n. Each rate therefore carries its count, its n and a 95 % Wilson score
interval, and each before/after comparison on the same prompts (compressed vs
base, repaired vs compressed) carries an exact paired test: McNemar's test on
the discordant prompts, computed as a two-sided binomial test of the
discordant counts against 1/2. Continuous per-prompt measures (KL, cross-
entropy) use a paired bootstrap of the mean difference. The arithmetic is
scipy's (:func:`scipy.stats.binomtest`, :func:`scipy.stats.bootstrap`); this
module only decides what is counted.

Example:
    >>> r = rate(3, 10)
    >>> round(r.low, 4), round(r.high, 4)
    (0.1078, 0.6032)
    >>> t = mcnemar([True, True, False, False], [False, False, False, True])
    >>> t.b, t.c, t.p_value
    (2, 1, 1.0)
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from refusal_core.errors import EmptyInputError, InvalidArgumentError, ShapeMismatchError

__all__ = [
    "CONFIDENCE",
    "SIGNIFICANCE",
    "MeanDifference",
    "PairedTest",
    "Rate",
    "holm",
    "mcnemar",
    "mcnemar_power",
    "minimum_detectable_change",
    "paired_mean_difference",
    "rate",
    "rate_of",
    "wilson_interval",
]

#: Confidence level of every interval the study reports.
CONFIDENCE = 0.95
#: Level at which a paired difference is called significant.
SIGNIFICANCE = 0.05


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name} must be an int, got {value!r}")
    return int(value)


def _level(confidence: object) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real):
        raise InvalidArgumentError(f"confidence must be a real number in (0, 1), got {confidence!r}")
    c = float(confidence)
    if not 0.0 < c < 1.0:
        raise InvalidArgumentError(f"confidence must lie in (0, 1), got {confidence!r}")
    return c


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (scipy's ``proportion_ci``)."""
    from scipy.stats import binomtest

    k, n = _count(k, "k"), _count(n, "n")
    if n < 1:
        raise EmptyInputError(f"a rate needs n >= 1 trials, got n = {n}")
    if not 0 <= k <= n:
        raise InvalidArgumentError(f"k must lie in [0, n = {n}], got {k}")
    ci = binomtest(k, n).proportion_ci(confidence_level=_level(confidence), method="wilson")
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n`` with its point estimate and Wilson interval at ``confidence``."""

    k: int
    n: int
    value: float
    low: float
    high: float
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rate:
        return rate(int(data["k"]), int(data["n"]), float(data.get("confidence", CONFIDENCE)))

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"


def rate(k: int, n: int, confidence: float = CONFIDENCE) -> Rate:
    """The :class:`Rate` of ``k`` successes in ``n`` trials."""
    low, high = wilson_interval(k, n, confidence)
    return Rate(k=int(k), n=int(n), value=int(k) / int(n), low=low, high=high, confidence=confidence)


def rate_of(outcomes: Sequence[bool], confidence: float = CONFIDENCE) -> Rate:
    """The :class:`Rate` of the ``True`` entries of ``outcomes``."""
    flags = _flags(outcomes, "outcomes")
    return rate(sum(flags), len(flags), confidence)


def _flags(values: Sequence[bool], name: str) -> list[bool]:
    out = list(values)
    if not out:
        raise EmptyInputError(f"{name} is empty")
    if any(not isinstance(v, (bool, np.bool_)) for v in out):
        raise InvalidArgumentError(f"{name} must hold bools, got {out[:4]!r}...")
    return [bool(v) for v in out]


@dataclass(frozen=True)
class PairedTest:
    """Exact McNemar test of two paired binary outcomes on the same ``n`` prompts.

    ``b`` counts prompts True before and False after, ``c`` the reverse; only
    they carry information about a change. ``p_value`` is the two-sided exact
    binomial p of ``b`` in ``b + c`` trials at 1/2 (1.0 when ``b + c = 0``).
    ``difference`` is rate(after) − rate(before) = (c − b) / n.
    """

    n: int
    b: int
    c: int
    before: Rate
    after: Rate
    difference: float
    p_value: float
    significant: bool
    level: float = SIGNIFICANCE
    test: str = "exact McNemar (two-sided binomial test on discordant pairs)"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["before"], d["after"] = self.before.to_dict(), self.after.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PairedTest:
        return cls(
            n=int(data["n"]),
            b=int(data["b"]),
            c=int(data["c"]),
            before=Rate.from_dict(data["before"]),
            after=Rate.from_dict(data["after"]),
            difference=float(data["difference"]),
            p_value=float(data["p_value"]),
            significant=bool(data["significant"]),
            level=float(data.get("level", SIGNIFICANCE)),
            test=str(data.get("test", cls.test)),
        )


def mcnemar(before: Sequence[bool], after: Sequence[bool], level: float = SIGNIFICANCE) -> PairedTest:
    """Exact McNemar test of ``before[i]`` vs ``after[i]`` (the same prompt ``i`` under two models)."""
    from scipy.stats import binomtest

    x, y = _flags(before, "before"), _flags(after, "after")
    if len(x) != len(y):
        raise ShapeMismatchError(f"before has {len(x)} outcomes but after has {len(y)}: they must be paired")
    lvl = _level(level)
    b = sum(1 for u, v in zip(x, y) if u and not v)
    c = sum(1 for u, v in zip(x, y) if v and not u)
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    p = min(1.0, p)
    return PairedTest(
        n=len(x),
        b=b,
        c=c,
        before=rate_of(x),
        after=rate_of(y),
        difference=(c - b) / len(x),
        p_value=p,
        significant=p < lvl,
        level=lvl,
    )


@dataclass(frozen=True)
class MeanDifference:
    """Mean of ``after − before`` over paired values with a paired-bootstrap interval."""

    n: int
    before_mean: float
    after_mean: float
    difference: float
    low: float
    high: float
    significant: bool
    confidence: float = CONFIDENCE
    test: str = "paired bootstrap (percentile) of the mean difference"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeanDifference:
        return cls(
            n=int(data["n"]),
            before_mean=float(data["before_mean"]),
            after_mean=float(data["after_mean"]),
            difference=float(data["difference"]),
            low=float(data["low"]),
            high=float(data["high"]),
            significant=bool(data["significant"]),
            confidence=float(data.get("confidence", CONFIDENCE)),
            test=str(data.get("test", cls.test)),
        )


def paired_mean_difference(
    before: Sequence[float],
    after: Sequence[float],
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = 2000,
    seed: int = 0,
) -> MeanDifference:
    """Mean of ``after[i] − before[i]`` and its paired-bootstrap interval (scipy).

    Significant when the interval excludes 0. Identical inputs give a zero
    interval; fewer than two pairs give the point estimate as both bounds and
    never a significant result.
    """
    from scipy.stats import bootstrap

    x = np.asarray(list(before), dtype=np.float64)
    y = np.asarray(list(after), dtype=np.float64)
    if x.size == 0:
        raise EmptyInputError("before is empty")
    if x.shape != y.shape or x.ndim != 1:
        raise ShapeMismatchError(f"before {x.shape} and after {y.shape} must be paired 1-d sequences")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InvalidArgumentError("paired values must be finite")
    n_resamples = _count(n_resamples, "n_resamples")
    if n_resamples < 1:
        raise InvalidArgumentError(f"n_resamples must be >= 1, got {n_resamples}")
    diff = y - x
    mean = float(diff.mean())
    if x.size < 2 or float(np.ptp(diff)) == 0.0:
        low = high = mean
        significant = x.size >= 2 and mean != 0.0
    else:
        res = bootstrap(
            (diff,),
            np.mean,
            confidence_level=_level(confidence),
            n_resamples=n_resamples,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        significant = not (low <= 0.0 <= high)
    return MeanDifference(
        n=int(x.size),
        before_mean=float(x.mean()),
        after_mean=float(y.mean()),
        difference=mean,
        low=low,
        high=high,
        significant=bool(significant),
        confidence=float(confidence),
    )


def finite_or_none(value: float | None) -> float | None:
    """``value`` as a float, or None when it is None or not finite (strict JSON has no NaN)."""
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


@functools.lru_cache(maxsize=4096)
def _mcnemar_rejection(d: int, level: float) -> np.ndarray:
    """Boolean mask over ``k = 0..d`` up-moves: where the exact McNemar test of ``k`` in ``d`` rejects.

    Depends on ``(d, level)`` only, and every power computation asks for the same ones (a report's
    minimum detectable changes bisect 40 times over ``d = 1..n``): memoised, returned read-only.
    """
    from scipy.stats import binom

    k = np.arange(d + 1)
    # Two-sided exact binomial p at 1/2 is symmetric: 2 * the smaller tail, capped at 1 (scipy's binomtest).
    tail = np.minimum(binom.cdf(k, d, 0.5), binom.sf(k - 1, d, 0.5))
    mask = np.minimum(1.0, 2.0 * tail) < level
    mask.setflags(write=False)
    return mask


def mcnemar_power(n: int, p_up: float, p_down: float, level: float = SIGNIFICANCE) -> float:
    """Power of :func:`mcnemar` on ``n`` pairs when pairs move up with probability ``p_up``, down ``p_down``.

    Exact: the number of discordant pairs ``D`` is Binomial(n, p_up + p_down) and, given ``D``, the up-moves
    are Binomial(D, p_up / (p_up + p_down)); the power is the probability that the test rejects.

    Example:
        >>> round(mcnemar_power(64, 0.15, 0.0), 3)
        0.932
        >>> mcnemar_power(64, 0.0, 0.0)
        0.0
    """
    from scipy.stats import binom

    n = _count(n, "n")
    if n < 1:
        raise InvalidArgumentError(f"n must be at least 1, got {n}")
    for name, v in (("p_up", p_up), ("p_down", p_down)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= float(v) <= 1.0:
            raise InvalidArgumentError(f"{name} must be a probability in [0, 1], got {v!r}")
    up, down = float(p_up), float(p_down)
    if up + down > 1.0 + 1e-12:
        raise InvalidArgumentError(f"p_up + p_down must be at most 1, got {up} + {down}")
    lvl = _level(level)
    disc = min(1.0, up + down)
    if disc == 0.0:
        return 0.0
    share = up / disc
    p_d = binom.pmf(np.arange(n + 1), n, disc)
    # Row d holds binom.pmf(0..d, d, share) (the same values, element for element, as one call per d).
    k = np.arange(n + 1)
    pmf_up = binom.pmf(k[None, :], k[:, None], share)
    power = 0.0
    for d in range(1, n + 1):
        if p_d[d] < 1e-15:
            continue
        reject = _mcnemar_rejection(d, lvl)
        power += float(p_d[d] * pmf_up[d, : d + 1][reject].sum())
    return min(1.0, power)


def minimum_detectable_change(
    n: int, p_down: float = 0.0, level: float = SIGNIFICANCE, power: float = 0.8
) -> float | None:
    """Smallest rise ``p_up − p_down`` that :func:`mcnemar` detects with the given power on ``n`` pairs.

    ``p_down`` is the rate of pairs moving the other way (use the observed reverse discordance, ``b / n`` of a
    :class:`PairedTest` read as before → after). A null result on ``n`` prompts says only that no change of at
    least this size was likely; ``None`` when no change up to ``1 − 2·p_down`` reaches the power.

    Example:
        >>> round(minimum_detectable_change(64), 3)
        0.121
        >>> round(minimum_detectable_change(64, p_down=0.05), 3)
        0.192
    """
    n = _count(n, "n")
    if n < 1:
        raise InvalidArgumentError(f"n must be at least 1, got {n}")
    target = _level(power)
    down = float(p_down)
    if not 0.0 <= down <= 0.5:
        raise InvalidArgumentError(f"p_down must lie in [0, 0.5], got {p_down!r}")
    hi_up = 1.0 - down
    if mcnemar_power(n, hi_up, down, level) < target:
        return None
    lo_up, hi = down, hi_up
    for _ in range(40):  # bisection on p_up: power rises with p_up at fixed p_down
        mid = 0.5 * (lo_up + hi)
        if mcnemar_power(n, mid, down, level) >= target:
            hi = mid
        else:
            lo_up = mid
    return hi - down


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control over every test listed), in input order.

    Example:
        >>> holm([0.01, 0.04, 0.03, 0.005])
        [0.03, 0.06, 0.06, 0.02]
    """
    ps = [float(p) for p in p_values]
    if any(not (0.0 <= p <= 1.0) for p in ps):
        raise InvalidArgumentError(f"p-values must lie in [0, 1], got {ps!r}")
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        adjusted[i] = running
    return adjusted
