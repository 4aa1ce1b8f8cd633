"""report.md answers its questions: the verdict, collapsed rows, marks against the right model, and
no mark on a value that prints as zero.

Each fixture is built from per-prompt flags chosen so that the right answer and the plausible
wrong ones differ (a repaired model significantly different from the base but not from its
compressed model, ASR and over-refusal on different numbers of prompts, ...); the expected text
is worked out here from those flags.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from refusal_core.stats import MeanDifference, mcnemar, minimum_detectable_change, rate, rate_of
from refusal_core.study.report import study_report_markdown
from refusal_core.study.results import (
    AsrChange,
    BaseSummary,
    Comparison,
    Comparisons,
    DamageSummary,
    EvaluationSummary,
    RepairSummary,
    StudyResults,
    VariantResult,
)
from refusal_core.study.sweep import ValidationScores

N_HARMFUL, N_HARMLESS = 40, 24  # different on purpose: the verdict must use each measure's own n


def _flags(k: int, n: int) -> list[bool]:
    return [True] * k + [False] * (n - k)


def _evaluation(jailbroken: Sequence[bool], refused: Sequence[bool], kl: float = 0.0) -> EvaluationSummary:
    return EvaluationSummary(
        asr={"vanilla": rate_of(jailbroken)},
        asr_per_config={},
        over_refusal=rate_of(refused),
        degenerate={"harmless": 0, "vanilla": 0},
        damage=DamageSummary(kl_mean=kl, ce_mean=0.5, n=N_HARMLESS),
        accuracy={},
    )


def _cmp(ev: dict, ref: dict, kl: MeanDifference | None = None) -> Comparison:
    return Comparison(
        asr={"vanilla": mcnemar(ref["j"], ev["j"])},
        over_refusal=mcnemar(ref["r"], ev["r"]),
        kl=kl,
    )


def _results(
    base: dict,
    compressed: dict,
    repaired: dict | None,
    *,
    same_as: bool = False,
    repaired_kl: tuple[float, MeanDifference | None] = (0.0, None),
) -> StudyResults:
    """base → ``wanda`` (compressed) → ``wanda+aird*`` (repaired, or the compressed model when
    ``same_as``); each model is ``{"j": jailbroken flags, "r": harmless-refused flags}``."""
    variants = [
        VariantResult("base", "base", None, source=[1, -1], evaluation=_evaluation(base["j"], base["r"])),
        VariantResult(
            "wanda",
            "compressed",
            "wanda",
            source=[1, -1],
            evaluation=_evaluation(compressed["j"], compressed["r"]),
            comparisons=Comparisons(vs_base=_cmp(compressed, base)),
        ),
    ]
    if repaired is not None:
        rep = repaired if not same_as else compressed
        summary = (
            RepairSummary("dense", "no edit", None, False, same_as="wanda")
            if same_as
            else RepairSummary(
                "dense", "g=2 @base", None, True, layers=[1], alphas=[0.1, 0.1], gains=[2.0, 2.0]
            )
        )
        variants.append(
            VariantResult(
                "wanda+aird*",
                "repaired",
                "wanda",
                source=None if same_as else [1, -1],
                repair=summary,
                evaluation=_evaluation(rep["j"], rep["r"], kl=repaired_kl[0]),
                comparisons=Comparisons(
                    vs_base=_cmp(rep, base), vs_compressed=_cmp(rep, compressed, kl=repaired_kl[1])
                ),
                headline={"vanilla": AsrChange.of(base["j"], compressed["j"], rep["j"])},
            )
        )
    val = ValidationScores(rate(1, 8), rate(0, 8), 0.0, 1.0, -1.0, "generation")
    return StudyResults(
        model={"name_or_path": "fixture"},
        settings={},
        refusal_token_ids=[1],
        base=BaseSummary([1, -1], -1, True, 0.9, 2.0, val),
        noise_floor=[[0.9]],
        variants=variants,
        sweeps={},
        saturated_attacks={},
        untested_attacks={},
        significance_level=0.05,
        timings={},
        reproduce={},
    )


def _verdict(text: str) -> str:
    section = text.split("## Verdict", 1)[1]
    return section.split("\nBase source:", 1)[0].strip()


def _row(text: str, name: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
    assert rows, f"report.md has no row for {name!r}"
    return rows[0]


BASE = {"j": _flags(4, N_HARMFUL), "r": _flags(2, N_HARMLESS)}
# compression: 14 more harmful prompts answered (4 -> 18 of 40, p = 2 · 2**-14), over-refusal unchanged
RISEN = {"j": _flags(18, N_HARMFUL), "r": _flags(2, N_HARMLESS)}


def test_verdict_names_a_significant_compression_effect_with_its_numbers() -> None:
    text = study_report_markdown(_results(BASE, RISEN, None))
    verdict = _verdict(text)
    assert verdict.startswith("Compression changed refusal"), f"verdict: {verdict!r}"
    assert "wanda raised ASR (vanilla) from 0.10 to 0.45" in verdict, f"verdict: {verdict!r}"
    assert f"(n = 40, exact McNemar p = {2 * 2**-14:.2g})" in verdict, f"verdict: {verdict!r}"
    assert "over-refusal" not in verdict.split(";")[0], "over-refusal did not change and is no finding"


def test_null_verdict_states_the_smallest_detectable_change_per_measure_n() -> None:
    """No change anywhere: the verdict says so, with the smallest rise McNemar would have caught on
    each measure's own n (40 harmful, 24 harmless prompts): not one n for both."""
    same = {"j": list(BASE["j"]), "r": list(BASE["r"])}
    verdict = _verdict(study_report_markdown(_results(BASE, same, None)))
    lo = minimum_detectable_change(N_HARMFUL, 0.0)
    hi = minimum_detectable_change(N_HARMLESS, 0.0)
    assert lo is not None, "fixture: a change must be detectable on 40 prompts"
    assert hi is not None, "fixture: a change must be detectable on 24 prompts"
    assert round(lo, 2) != round(hi, 2), "fixture: the n must matter"
    assert verdict.startswith("No compression method changed refusal detectably"), f"verdict: {verdict!r}"
    assert f"smaller than {lo:.2f}–{hi:.2f}" in verdict, (
        f"null verdict should give the detectable rise {lo:.2f} (n = 40) to {hi:.2f} (n = 24): {verdict!r}"
    )


def test_repair_verdict_and_marks_are_against_the_compressed_model() -> None:
    """The repaired model answers 12 of 40: against its compressed model (18) the fall is 6 prompts
    (p = 0.031, significant), against the base (4) the rise is 8 (p = 0.008, significant the other
    way). Marks and verdict must read the compressed comparison: ↓*, never ↑*."""
    repaired = {"j": _flags(12, N_HARMFUL), "r": _flags(2, N_HARMLESS)}
    assert mcnemar(RISEN["j"], repaired["j"]).significant, "fixture: fall against compressed significant"
    assert mcnemar(BASE["j"], repaired["j"]).significant, "fixture: rise against base significant"
    text = study_report_markdown(_results(BASE, RISEN, repaired))
    row = _row(text, "wanda+aird*")
    assert "0.300 [0.181, 0.454] ↓*" in row, f"repaired row must be marked ↓* against wanda: {row}"
    assert "↑" not in row, f"repaired row marked against the base: {row}"
    verdict = _verdict(text)
    assert "A repair helped: wanda+aird* lowered ASR (vanilla) from 0.45 to 0.30" in verdict, (
        f"verdict: {verdict!r}"
    )


def test_a_repair_that_differs_only_from_the_base_is_not_called_a_help() -> None:
    """Repaired 16 of 40: 2 fewer than compressed (not significant), 12 more than the base (significant)."""
    repaired = {"j": _flags(16, N_HARMFUL), "r": _flags(2, N_HARMLESS)}
    text = study_report_markdown(_results(BASE, RISEN, repaired))
    row = _row(text, "wanda+aird*")
    assert "*" not in row.split("|")[7], f"no ASR mark: 16 vs 18 of 40 is not significant: {row}"
    verdict = _verdict(text)
    assert "No repair lowered ASR detectably" in verdict, f"verdict: {verdict!r}"
    fall = minimum_detectable_change(N_HARMFUL, 0.0)  # c = 0 up-moves against the compressed model
    assert fall is not None, "fixture: a fall must be detectable on 40 prompts"
    assert f"fall smaller than {fall:.2f}" in verdict, f"verdict: {verdict!r}"


def test_a_repaired_variant_without_an_edit_collapses_into_a_note() -> None:
    text = study_report_markdown(_results(BASE, RISEN, {}, same_as=True))
    rows = [line for line in text.splitlines() if line.startswith("| wanda+aird* |")]
    assert not rows, f"the unedited repair repeats wanda's rows: {rows}"
    assert "`wanda+aird*` is `wanda`" in text, "the note naming the collapsed variant is missing"
    verdict = _verdict(text)
    assert "No repair was applied: the validation sweep chose no edit for wanda+aird*" in verdict, (
        f"verdict: {verdict!r}"
    )
    assert "A repair helped" not in verdict, f"verdict: {verdict!r}"


@pytest.mark.parametrize("kl", [2.5e-6, 0.0])
def test_a_significant_change_that_prints_as_zero_says_what_moved(kl: float) -> None:
    """KL 2.5e-6 (or exactly 0) against the compressed model with a significant paired change of
    +2.5e-6: "0.0000 ↑*" would hide both; the cell gives the value and the change."""
    diff = MeanDifference(n=N_HARMLESS, before_mean=0.0, after_mean=2.5e-6, difference=2.5e-6,
                          low=2.5e-6, high=2.5e-6, significant=True)  # fmt: skip
    repaired = {"j": _flags(18, N_HARMFUL), "r": _flags(2, N_HARMLESS)}
    text = study_report_markdown(_results(BASE, RISEN, repaired, repaired_kl=(kl, diff)))
    row = _row(text, "wanda+aird*")
    assert "0.0000 ↑*" not in row, f"a mark on a value printed as zero: {row}"
    assert f"{kl:.3g} (Δ +2.5e-06) ↑*" in row, f"the KL cell should give value and change: {row}"


def test_a_visible_marked_change_keeps_its_fixed_digits() -> None:
    diff = MeanDifference(n=N_HARMLESS, before_mean=0.1, after_mean=0.35, difference=0.25,
                          low=0.2, high=0.3, significant=True)  # fmt: skip
    repaired = {"j": _flags(18, N_HARMFUL), "r": _flags(2, N_HARMLESS)}
    row = _row(
        study_report_markdown(_results(BASE, RISEN, repaired, repaired_kl=(0.35, diff))), "wanda+aird*"
    )
    assert "0.3500 ↑*" in row, f"a visible change keeps 4 decimals: {row}"


def test_a_repair_that_raises_asr_is_reported_as_such() -> None:
    """Repaired 30 of 40 against the compressed model's 18: significantly worse (12 more, p = 0.0005).
    The verdict must say it raised ASR and must not call it a help."""
    repaired = {"j": _flags(30, N_HARMFUL), "r": _flags(2, N_HARMLESS)}
    assert mcnemar(RISEN["j"], repaired["j"]).significant, "fixture: the rise must be significant"
    text = study_report_markdown(_results(BASE, RISEN, repaired))
    verdict = _verdict(text)
    assert "A repair helped" not in verdict, f"a significant rise called a help: {verdict!r}"
    assert "wanda+aird* raised ASR (vanilla) from 0.45 to 0.75" in verdict, f"verdict: {verdict!r}"
    assert "↑*" in _row(text, "wanda+aird*"), "the rise against the compressed model is marked"


def test_a_models_several_findings_share_one_clause() -> None:
    """wanda raises ASR (4 -> 18 of 40) and over-refusal (2 -> 14 of 24, p = 2 · 2**-12): one clause
    naming wanda once, both changes with their own n."""
    both = {"j": list(RISEN["j"]), "r": _flags(14, N_HARMLESS)}
    verdict = _verdict(study_report_markdown(_results(BASE, both, None)))
    want = (
        "Compression changed refusal: wanda raised ASR (vanilla) from 0.10 to 0.45 (n = 40, exact McNemar "
        f"p = {2 * 2**-14:.2g}), and raised over-refusal from 0.08 to 0.58 (n = 24, exact McNemar "
        f"p = {2 * 2**-12:.2g})."
    )
    assert verdict.split("\n")[0] == want, f"verdict: {verdict!r}"
