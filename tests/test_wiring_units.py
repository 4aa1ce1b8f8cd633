"""Wiring checks of model-level code: each test is built so that a plausible wrong wiring gives a
different answer from the right one (issue 20's surviving mutants; /work/notes/wiring.md lists them).

The references are written here (the N:M group rule, the McNemar/bootstrap definitions, the
documented repair rule), never taken from the code under test.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from refusal_core.audit import PROBE, check_compatible
from refusal_core.compression import METHODS, compress_, pruning
from refusal_core.compression.pruning import prune_magnitude_
from refusal_core.errors import ArtifactError, IncompatibleModelsError
from refusal_core.evaluation.judges import COMPLIED, REFUSED, ClassifierJudge
from refusal_core.model import get_layout
from refusal_core.records import Record
from refusal_core.stats import paired_mean_difference, rate
from refusal_core.study.sweep import SweepPoint, ValidationScores, choose_repair
from refusal_core.testing.tiny import tiny_model, tiny_tokenizer

CALIBRATION = [[10, 20, 30, 40, 50, 60], [70, 80, 90, 15], [100, 110, 120, 130]]

# ----------------------------------------------------------------------------
# Wanda N:M through compress_
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "n", "m"), [("wanda-2:4", 2, 4), ("wanda-4:8", 4, 8)])
def test_compress_applies_the_n_m_pattern_in_every_group(method: str, n: int, m: int) -> None:
    """Every run of ``m`` consecutive inputs of every output row keeps exactly ``m - n`` weights.

    Unstructured pruning at the same 50 % leaves the overall sparsity equal but breaks the groups,
    so this fails when the pattern is dropped on the way through ``compress_``.
    """
    model = tiny_model("llama", n_layers=2, d_model=32, n_heads=4, seed=3)
    compress_(model, METHODS[method], CALIBRATION)
    for layer in range(get_layout(model).n_layers):
        for name, linear in get_layout(model).linears(layer).items():
            w = linear.weight.detach()
            groups = (w != 0).reshape(w.shape[0], -1, m).sum(-1)  # nonzeros per (row, group)
            bad = int((groups != m - n).sum())
            assert bad == 0, (
                f"compress_[{method}] layer {layer} {name}: {bad} of {groups.numel()} groups of {m} "
                f"do not keep exactly {m - n} weights (nonzeros per group seen: "
                f"{sorted(set(groups.flatten().tolist()))})"
            )


# ----------------------------------------------------------------------------
# classifier judge: the verdict's case
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "unsafe_label", "expected"),
    [
        ("Unsafe\nS1", "unsafe", COMPLIED),
        ("  UNSAFE", "unsafe", COMPLIED),
        ("unsafe", "UNSAFE", COMPLIED),  # the label's own case does not matter either
        ("Safe", "unsafe", REFUSED),
        ("SAFE unsafe", "unsafe", REFUSED),  # only the start of the verdict counts
    ],
)
def test_classifier_verdict_is_matched_without_case(
    raw: str, unsafe_label: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ClassifierJudge, "verdicts", lambda self, i, c: [raw])
    judge = ClassifierJudge(
        torch.nn.Linear(1, 1), object(), unsafe_label=unsafe_label, render=lambda i, c: f"{i} {c}"
    )
    completion = "Sure, here is a detailed plan with several steps you can follow right away."
    got = judge.classify(["q"], [completion])
    assert got == [expected], (
        f"classifier verdict {raw!r} with unsafe_label {unsafe_label!r}: got {got}, expected [{expected!r}]"
    )


# ----------------------------------------------------------------------------
# the repair rule (choose_repair)
# ----------------------------------------------------------------------------


def _scores(complied: list[bool], *, kl: float = 0.0, over_refusal: int = 0) -> ValidationScores:
    n = len(complied)
    return ValidationScores(
        compliance=rate(sum(complied), n),
        over_refusal=rate(over_refusal, n),
        kl=kl,
        refusal_score_harmful=0.0,
        refusal_score_harmless=0.0,
        source="generation",
        complied=tuple(complied),
    )


def _point(
    strength: str, gains: tuple[float, float], complied: list[bool], *, over_refusal: int = 0
) -> SweepPoint:
    return SweepPoint(
        strength=strength,
        sparse=False,
        placement="none" if strength == "identity" else "base",
        layers=() if strength == "identity" else (1,),
        gains=gains,
        alphas=(0.0, 0.0),
        scores=_scores(complied, over_refusal=over_refusal),
    )


N_VAL = 20


def _exact_mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p of ``b`` vs ``c`` discordant pairs (binomial, p = 1/2), written here."""
    from math import comb

    d = b + c
    if d == 0:
        return 1.0
    tail = sum(comb(d, k) for k in range(min(b, c) + 1)) / 2**d
    return min(1.0, 2 * tail)


def test_an_edit_significantly_worse_than_no_edit_is_never_chosen() -> None:
    """The unedited model complies on 2 of 20; the only edit on 12 of 20 (10 prompts more, exact
    McNemar p = 0.002): the edit differs significantly, but in the wrong direction. The unedited
    model is itself over the over-refusal margin (10/20 against the base's 0/20 + 0.1), so it cannot
    win on compliance alone: only the direction of the test keeps the worse edit out."""
    ident = [True] * 2 + [False] * 18
    worse = [True] * 12 + [False] * 8
    assert _exact_mcnemar_p(0, 10) < 0.05, "fixture: the difference must be significant"
    pts = [
        _point("identity", (1.0, 1.0), ident, over_refusal=10),
        _point("gain", (2.0, 2.0), worse),
    ]
    base = _scores([False] * N_VAL)
    choice = choose_repair(pts, base, max_over_refusal_increase=0.1, max_kl_increase=1.0)
    assert choice.admissible == (False, True), f"fixture: admissibility {choice.admissible}"
    assert choice.point.strength == "identity", (
        f"choose_repair chose {choice.point.label} (compliance 12/20) over no edit (2/20): an edit "
        f"significantly worse than the unedited model was admitted (p-values {choice.p_values})"
    )


def test_an_edit_significantly_better_is_chosen_and_an_insignificant_one_is_not() -> None:
    ident = [True] * 12 + [False] * 8
    better = [False] * 20  # 12 fewer: p = 2 · 2**-12
    slightly = [True] * 10 + [False] * 10  # 2 fewer: p = 0.5
    base = _scores([False] * N_VAL)
    chosen = choose_repair(
        [_point("identity", (1.0, 1.0), ident), _point("gain", (2.0, 2.0), better)],
        base,
        max_over_refusal_increase=1.0,
        max_kl_increase=1.0,
    )
    assert chosen.point.strength == "gain", (
        f"choose_repair: an edit lowering compliance 12/20 -> 0/20 (p {_exact_mcnemar_p(12, 0):.2g}) "
        f"was not chosen; got {chosen.point.label}"
    )
    kept = choose_repair(
        [_point("identity", (1.0, 1.0), ident), _point("gain", (2.0, 2.0), slightly)],
        base,
        max_over_refusal_increase=1.0,
        max_kl_increase=1.0,
    )
    assert kept.point.strength == "identity", (
        f"choose_repair: an edit lowering compliance 12/20 -> 10/20 (p {_exact_mcnemar_p(2, 0):.2g}) "
        f"is noise but was chosen: {kept.point.label}"
    )


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        # max(|g_attn - 1|, |g_mlp - 1|): (1.0, 2.6) -> 1.6, (1.9, 1.9) -> 0.9
        ((1.0, 2.6), (1.9, 1.9), 1),
        ((2.6, 1.0), (1.9, 1.9), 1),
        ((1.9, 1.9), (1.0, 2.6), 0),
        ((1.9, 1.9), (2.6, 1.0), 0),
        ((0.5, 1.2), (1.0, 1.6), 0),  # 0.5 vs 0.6: an attenuating gain counts by its distance too
    ],
)
def test_equal_compliance_ties_go_to_the_weaker_edit_by_both_gains(
    first: tuple[float, float], second: tuple[float, float], expected: int
) -> None:
    """Two admissible edits with the same compliance: the one whose larger distance from gain 1
    (attention or MLP, whichever is larger) is smaller wins; unequal gains make attention-only,
    MLP-only and sum readings disagree with that."""
    ident = [True] * 12 + [False] * 8
    fixed = [False] * 20
    pts = [_point("identity", (1.0, 1.0), ident), _point("gain", first, fixed), _point("gain", second, fixed)]
    choice = choose_repair(pts, _scores([False] * N_VAL), max_over_refusal_increase=1.0, max_kl_increase=1.0)
    want = pts[1 + expected]
    assert choice.point is want, (
        f"choose_repair tie between gains {first} and {second}: chose {choice.point.gains}, expected "
        f"{want.gains} (smaller max |g - 1| over attention and MLP)"
    )


# ----------------------------------------------------------------------------
# paired mean difference: a constant nonzero difference
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [0.25, -3.0, 1e-9])
def test_a_constant_nonzero_paired_difference_is_significant(delta: float) -> None:
    """Every pair moved by exactly ``delta``: no resample can give anything else, so the interval is
    the point ``delta`` and it excludes 0."""
    before = [0.1 * i for i in range(6)]
    after = [b + delta for b in before]
    d = paired_mean_difference(before, after)
    assert d.significant, f"paired_mean_difference with every pair moved by {delta}: not significant ({d})"
    assert (d.low, d.high) == pytest.approx((delta, delta), rel=1e-6), (
        f"paired_mean_difference with constant difference {delta}: interval [{d.low}, {d.high}]"
    )


def test_no_difference_or_a_single_pair_is_not_significant() -> None:
    same = paired_mean_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    one = paired_mean_difference([1.0], [5.0])
    assert not same.significant, f"identical paired values called significant: {same}"
    assert not one.significant, f"a single pair called significant: {one}"


# ----------------------------------------------------------------------------
# records: a file digest is exactly 64 lower-case hex digits
# ----------------------------------------------------------------------------

GOOD = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    "digest",
    [GOOD + "0", GOOD + "zz", GOOD + "\n", GOOD[:-1], GOOD.upper(), " " + GOOD, GOOD[:-1] + "g"],
)
def test_a_file_digest_must_be_exactly_64_hex_digits(digest: str) -> None:
    with pytest.raises(ArtifactError, match="SHA-256"):
        Record(kind="refusal_core.artifact", version=3, files={"weights.safetensors": digest})


def test_a_64_hex_digit_digest_is_accepted() -> None:
    rec = Record(kind="refusal_core.artifact", version=3, files={"weights.safetensors": GOOD})
    assert rec.files == {"weights.safetensors": GOOD}, f"a valid digest was altered: {rec.files}"


# ----------------------------------------------------------------------------
# audit: the vocabulary check compares token -> id, not just the token set
# ----------------------------------------------------------------------------


class _RemappedTokenizer:
    """The tiny tokenizer, but ``get_vocab`` reports two tokens' ids swapped (tokenizing is unchanged)."""

    def __init__(self, tok: Any, a: str, b: str) -> None:
        self._tok, self._a, self._b = tok, a, b
        self.chat_template = tok.chat_template

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._tok.get_vocab())
        vocab[self._a], vocab[self._b] = vocab[self._b], vocab[self._a]
        return vocab

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tok(*args, **kwargs)


def test_audit_rejects_a_tokenizer_with_the_same_tokens_under_other_ids() -> None:
    tok = tiny_tokenizer()
    model = tiny_model("llama", n_layers=2, seed=1)
    rows = int(get_layout(model).embedding.weight.shape[0])
    probe = set(tok(PROBE, add_special_tokens=False)["input_ids"])
    a, b = [
        t for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if i < rows and i not in probe
    ][10:12]
    check_compatible((model, tok), (copy.deepcopy(model), tok))  # the fixture itself is compatible
    with pytest.raises(IncompatibleModelsError, match="vocabularies differ"):
        check_compatible((model, tok), (copy.deepcopy(model), _RemappedTokenizer(tok, a, b)))


# ----------------------------------------------------------------------------
# rollback: every exception, the model passed either way
# ----------------------------------------------------------------------------


def _interrupt_on_call(fn: Any, n: int, exc: BaseException) -> Any:
    calls = {"n": 0}

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return fn(*args, **kwargs)

    return wrapped


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(3), RuntimeError("backend")])
@pytest.mark.parametrize("by_keyword", [False, True])
def test_interrupted_pruning_restores_the_model(
    exc: BaseException, by_keyword: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Magnitude pruning interrupted at its 9th matrix (block 1, after block 0 was written) must leave
    the model bit for bit as it was, whatever was raised and however the model was passed."""
    monkeypatch.setattr(pruning, "magnitude_mask", _interrupt_on_call(pruning.magnitude_mask, 9, exc))
    model = tiny_model("llama", n_layers=2, seed=2)
    before = _state(model)
    call = (
        (lambda: prune_magnitude_(model=model, sparsity=0.5))
        if by_keyword
        else (lambda: prune_magnitude_(model, 0.5))
    )
    with pytest.raises(type(exc)):
        call()
    after = _state(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, (
        f"prune_magnitude_({'model=' if by_keyword else ''}...) interrupted by {type(exc).__name__} "
        f"after block 0: {len(changed)} tensors left changed, e.g. {changed[:3]}"
    )


@pytest.mark.parametrize("by_keyword", [False, True])
def test_interrupted_compress_restores_the_model(by_keyword: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        pruning, "magnitude_mask", _interrupt_on_call(pruning.magnitude_mask, 9, KeyboardInterrupt())
    )
    model = tiny_model("llama", n_layers=2, seed=2)
    before = _state(model)
    call = (
        (lambda: compress_(model=model, config=METHODS["magnitude"]))
        if by_keyword
        else (lambda: compress_(model, METHODS["magnitude"]))
    )
    with pytest.raises(KeyboardInterrupt):
        call()
    after = _state(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"compress_[magnitude] interrupted by KeyboardInterrupt: {changed[:3]} left changed"
