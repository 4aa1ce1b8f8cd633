"""The study's report: results.json, report.md (every rate with n and interval, every comparison
with its p value) and the plots.

report.md opens with a verdict: two or three sentences answering whether compression changed
refusal and whether a repair helped, each null answer with the smallest change the data could have
shown (:func:`~refusal_core.stats.minimum_detectable_change`). A difference is called a finding only
when its paired test is significant at ``results["significance_level"]``; the tables mark those
with ``*`` and leave the others unmarked. A repaired variant for which the sweep chose no edit is
its compressed model: it gets a note instead of rows that repeat that model's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from refusal_core.report import (
    format_value,
    markdown_table,
    plot_asr,
    plot_candidate_heatmap,
    plot_cosine_by_layer,
    plot_pareto,
)
from refusal_core.saving import atomic_write_bytes, atomic_write_json
from refusal_core.stats import MeanDifference, PairedTest, Rate, minimum_detectable_change
from refusal_core.study.results import Comparison, StudyResults, VariantResult

__all__ = ["format_rate", "study_report_markdown", "write_study_report"]

#: Power at which the verdict states the smallest detectable change.
POWER = 0.8


def format_rate(r: Rate | Mapping[str, Any] | None, digits: int = 3) -> str:
    """``value [low, high]`` of a rate (or its dict), or ``–``."""
    if not r:
        return "–"
    if isinstance(r, Mapping):
        r = Rate.from_dict(dict(r))
    return f"{r.value:.{digits}f} [{r.low:.{digits}f}, {r.high:.{digits}f}]"


def _mark(test: PairedTest | MeanDifference | None) -> str:
    """`` ↑*``/`` ↓*`` for a significant paired change, else empty."""
    if test is None or not test.significant:
        return ""
    return " ↑*" if test.difference > 0 else " ↓*"


def _marked_mean(value: float | None, digits: int, test: MeanDifference | None) -> str:
    """A mean with its mark; where a marked value or its change would print as zero at ``digits``
    decimals ("0.0000 ↑*" says nothing), both are written to three significant digits instead."""
    text, mark = format_value(value, digits), _mark(test)
    if not mark or value is None or test is None or not math.isfinite(value):
        return text + mark
    if round(value, digits) == 0.0 or round(test.difference, digits) == 0.0:
        return f"{value:.3g} (Δ {test.difference:+.3g})" + mark
    return text + mark


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def _reference(v: VariantResult) -> Comparison:
    """The comparison a variant's table cells are marked against: repaired vs compressed, else vs base."""
    return (v.comparisons.reference if v.comparisons is not None else None) or Comparison()


def _shown(results: StudyResults) -> list[VariantResult]:
    """The variants that get table rows: all but repaired ones that are their compressed model."""
    return [v for v in results.variants if v.same_as is None]


def write_study_report(
    out_dir: Path,
    results: StudyResults,
    *,
    selections: Mapping[str, Any],
    cosine_by_layer: Mapping[str, Sequence[float]],
    noise: torch.Tensor,
    base_position_index: int,
) -> Path:
    """Write ``results.json``, ``report.md`` and ``plots/*.png`` into ``out_dir``; returns report.md."""
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", results.to_dict())
    plots = _write_plots(
        plots_dir,
        results,
        selections,
        cosine_by_layer,
        [float(x) for x in noise[:, base_position_index]],
    )
    path = out_dir / "report.md"
    atomic_write_bytes(path, study_report_markdown(results, plots).encode())
    return path


def _write_plots(
    plots_dir: Path,
    results: StudyResults,
    selections: Mapping[str, Any],
    cosine_by_layer: Mapping[str, Sequence[float]],
    noise_at_position: Sequence[float],
) -> list[str]:
    """Every plot of the report; returns their paths relative to the report."""
    plots: list[str] = []
    for name, sel in selections.items():
        path = plots_dir / f"candidates_{_slug(name)}.png"
        scores = {"bypass": sel.bypass.numpy(), "induce": sel.induce.numpy(), "kl": sel.kl.numpy()}
        plot_candidate_heatmap(path, f"{name}: candidate scores", scores, sel.positions, sel.source)
        plots.append(f"plots/{path.name}")
    plot_cosine_by_layer(
        plots_dir / "cosine_by_layer.png", results.base.source_position, cosine_by_layer, noise_at_position
    )
    plots.append("plots/cosine_by_layer.png")
    asr_table = {
        v.name: {a: r.to_dict() for a, r in v.evaluation.asr.items()}
        for v in _shown(results)
        if v.evaluation is not None
    }
    plot_asr(plots_dir / "asr.png", asr_table)
    plots.append("plots/asr.png")
    for method, sweep in results.sweeps.items():
        path = plots_dir / f"pareto_{_slug(method)}.png"
        chosen: dict[str, int] = {}
        for arm, ch in sweep.choices.items():
            # indices in a choice refer to that arm's points (identity first); map back to the full list
            arm_idx = [
                i
                for i, p in enumerate(sweep.points)
                if p.strength == "identity" or p.sparse == (arm == "sparse")
            ]
            chosen[arm] = arm_idx[ch.index]
        plot_pareto(path, method, [p.to_dict() for p in sweep.points], chosen)
        plots.append(f"plots/{path.name}")
    return plots


# ----------------------------------------------------------------------------
# the verdict
# ----------------------------------------------------------------------------


def _tests(v: VariantResult, against: str) -> list[tuple[str, PairedTest]]:
    """``(what, test)`` of a variant's refusal measures against ``"base"`` or ``"compressed"``."""
    comp = v.comparisons
    c = None if comp is None else (comp.vs_base if against == "base" else comp.vs_compressed)
    if c is None:
        return []
    out = [(f"ASR ({a})", t) for a, t in sorted(c.asr.items())]
    if c.over_refusal is not None:
        out.append(("over-refusal", c.over_refusal))
    return out


def _change(name: str, what: str, t: PairedTest) -> str:
    verb = "raised" if t.difference > 0 else "lowered"
    return (
        f"{name} {verb} {what} from {t.before.value:.2f} to {t.after.value:.2f} "
        f"(n = {t.n}, exact McNemar p = {t.p_value:.2g})"
    )


def _joined(changes: Sequence[str]) -> str:
    """Changes joined with "; ", a model's later ones after ", and" without repeating its name."""
    groups: list[list[str]] = []
    for c in changes:
        name, _, rest = c.partition(" ")
        if groups and groups[-1][0].partition(" ")[0] == name:
            groups[-1].append(rest)
        else:
            groups.append([c])
    return "; ".join(", and ".join(g) for g in groups)


def _detectable(tests: Sequence[PairedTest], rise: bool) -> str:
    """The range over ``tests`` of the smallest change McNemar detects with :data:`POWER`, as text.

    ``rise``: the change of interest is a rise (a pair moving down is then the reverse discordance
    ``b / n``), else a fall (reverse: ``c / n``).
    """
    sizes = []
    for t in tests:
        reverse = (t.b if rise else t.c) / t.n
        sizes.append(minimum_detectable_change(t.n, min(0.5, reverse), t.level, POWER))
    if not sizes:
        return ""
    if any(s is None for s in sizes):
        return "no change at all was likely to be detected on some of them"
    lo, hi = min(s for s in sizes if s is not None), max(s for s in sizes if s is not None)
    span = f"{lo:.2f}" if round(lo, 2) == round(hi, 2) else f"{lo:.2f}–{hi:.2f}"
    ns = sorted({t.n for t in tests})
    n_text = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
    return (
        f"a {'rise' if rise else 'fall'} smaller than {span} in a rate ({POWER * 100:.0f} % power at "
        f"p < {tests[0].level:g} on n = {n_text} prompts) could go unseen"
    )


def _compression_verdict(results: StudyResults) -> str:
    compressed = [v for v in results.variants if v.kind == "compressed"]
    tests = [(v.name, what, t) for v in compressed for what, t in _tests(v, "base")]
    if not tests:
        return "No compressed model was compared with the base."
    found = [_change(n, w, t) for n, w, t in tests if t.significant]
    null = [t for _, _, t in tests if not t.significant]
    if found:
        rest = f"; elsewhere nothing moved detectably: {_detectable(null, True)}" if null else ""
        return "Compression changed refusal: " + _joined(found) + rest + "."
    return (
        f"No compression method changed refusal detectably: none of {len(tests)} paired tests (ASR per "
        f"attack and over-refusal of each compressed model against the base) reached p < "
        f"{results.significance_level:g}, and {_detectable(null, True)}."
    )


def _repair_verdict(results: StudyResults) -> str:
    repaired = [v for v in results.variants if v.kind == "repaired"]
    if not repaired:
        return "No repair was run."
    unedited = [v.name for v in repaired if v.same_as is not None]
    none_chosen = (
        f" The validation sweep chose no edit for {', '.join(unedited)}: no admissible strength lowered "
        "harmful compliance significantly, so these are their compressed models unchanged."
        if unedited
        else ""
    )
    asr = [(v.name, what, t) for v in repaired if v.same_as is None for what, t in _tests(v, "compressed")]
    asr = [x for x in asr if x[1].startswith("ASR")]
    if not asr:
        return (
            "No repair was applied: the validation sweep chose no edit for "
            f"{', '.join(unedited)} (no admissible strength lowered harmful compliance significantly), "
            "so each is its compressed model unchanged."
            if unedited
            else "No edited model was compared with its compressed model."
        )
    helped = [
        _change(n, w, t) + " against its compressed model"
        for n, w, t in asr
        if t.significant and t.difference < 0
    ]
    hurt = [
        _change(n, w, t) + " against its compressed model"
        for n, w, t in asr
        if t.significant and t.difference > 0
    ]
    null = [t for _, _, t in asr if not t.significant]
    if helped:
        text = "A repair helped: " + "; ".join(helped)
    else:
        text = (
            f"No repair lowered ASR detectably against its compressed model, and {_detectable(null, False)}"
        )
    if hurt:
        text += "; but " + "; ".join(hurt)
    return text + "." + none_chosen


# ----------------------------------------------------------------------------
# the tables
# ----------------------------------------------------------------------------


def _variant_rows(shown: Sequence[VariantResult], attacks: Sequence[str]) -> list[list[str]]:
    rows = []
    for v in shown:
        ev = v.evaluation
        ref = _reference(v)
        cells = [
            v.name,
            format_value(v.source) + ("" if v.filters_passed in (True, None) else " †"),
            format_value(v.source_shift),
            format_value(v.cosine_at_base_source),
            format_value(v.cosine_selected),
            format_value(v.sparsity),
        ]
        cells += [format_rate(ev.asr.get(a) if ev else None) + _mark(ref.asr.get(a)) for a in attacks]
        cells.append(format_rate(ev.over_refusal if ev else None) + _mark(ref.over_refusal))
        deg = ev.degenerate if ev else {}
        cells.append(f"{deg.get('harmless', '–')} / {deg.get('vanilla', '–')}")
        cells.append(_marked_mean(ev.damage.kl_mean if ev else None, 4, ref.kl))
        cells.append(_marked_mean(ev.damage.ce_mean if ev else None, 3, ref.ce))
        rows.append(cells)
    return rows


def _mechanism_rows(shown: Sequence[VariantResult]) -> list[list[str]]:
    rows = []
    for v in shown:
        m = v.mechanism
        if m is None:
            continue
        mref = v.comparisons.mechanism_reference if v.comparisons is not None else {}
        rows.append(
            [
                v.name,
                format_rate(m.refusal_rate_harmful) + _mark(mref.get("refused_harmful")),
                format_rate(m.necessity) + _mark(mref.get("refused_ablated")),
                format_rate(m.sufficiency) + _mark(mref.get("refused_added")),
                format_value(v.cosine_at_base_source),
                format_value(v.source_shift),
            ]
        )
    return rows


def _base_direction_parts(shown: Sequence[VariantResult]) -> list[str]:
    """The base direction's mechanism in each compressed model (only when the study measured it)."""
    rows = []
    for v in shown:
        m = v.base_direction_mechanism
        if m is None:
            continue
        tests = (v.comparisons.base_direction_mechanism_vs_base if v.comparisons is not None else None) or {}
        rows.append(
            [
                v.name,
                format_rate(m.refusal_rate_harmful) + _mark(tests.get("refused_harmful")),
                format_rate(m.necessity) + _mark(tests.get("refused_ablated")),
                format_rate(m.sufficiency) + _mark(tests.get("refused_added")),
            ]
        )
    if not rows:
        return []
    head = [
        "variant",
        "refusal (harmful)",
        "refusal with the base direction ablated (necessity: low)",
        "harmless refused with it added at the base source (sufficiency: high)",
    ]
    return [
        "## Mechanism of the base direction in each compressed model (the direction AIRD reinforces)",
        "",
        markdown_table(head, rows),
        "",
        "`*`: exact McNemar against the base model's own (same prompts, same direction).",
        "",
    ]


def _repair_rows(shown: Sequence[VariantResult], attacks: Sequence[str]) -> list[list[str]]:
    rows = []
    for v in shown:
        rep = v.repair
        if rep is None:
            continue
        head_line = v.headline or {}
        vs_c = v.comparisons.vs_compressed if v.comparisons is not None else None
        for a in attacks:
            h = head_line.get(a)
            t = vs_c.asr.get(a) if vs_c is not None else None
            if h is None or t is None:
                continue
            rows.append(
                [
                    v.name,
                    rep.how,
                    format_value(rep.gains),
                    format_value(rep.alphas, 5),
                    a,
                    f"{h.asr_compressed:.3f} → {h.asr_repaired:.3f}",
                    format_value(h.absolute_reduction),
                    format_value(h.relative_reduction),
                    format_value(h.share_of_rise_recovered),
                    f"{t.p_value:.3g}" + (" *" if t.significant else ""),
                ]
            )
    return rows


def _sweep_parts(results: StudyResults) -> list[str]:
    parts: list[str] = []
    for method, sweep in results.sweeps.items():
        srows = [
            [
                p.label,
                format_value(list(p.gains)),
                format_value(list(p.alphas), 5),
                format_rate(p.scores.compliance),
                format_rate(p.scores.over_refusal),
                format_value(p.scores.kl, 4),
                format_value(p.scores.to_dict().get("ce"), 4),
            ]
            for p in sweep.points
        ]
        head = ["point", "gain (attn, mlp)", "α (attn, mlp)", "compliance (val)", "over-refusal (val)"]
        rule = next(iter(sweep.choices.values())).rule if sweep.choices else ""
        parts += [f"### {method}", "", markdown_table([*head, "KL (val)", "CE (val)"], srows), ""]
        parts += [f"Rule: {rule}.", ""]
        parts += [
            f"- {arm}: **{ch.point.label}** (criterion met: {ch.criterion_met})"
            for arm, ch in sweep.choices.items()
        ]
        parts.append("")
    return parts


def _accuracy_table(shown: Sequence[VariantResult]) -> str:
    tasks = sorted({t for v in shown if v.evaluation is not None for t in v.evaluation.accuracy})
    rows = []
    for v in shown:
        acc = v.evaluation.accuracy if v.evaluation is not None else {}
        if acc:
            rows.append(
                [v.name]
                + [
                    f"{acc[t]['accuracy']:.3f} ± {acc[t]['stderr']:.3f} (n={acc[t]['n']})"
                    if t in acc and acc[t].get("stderr") is not None
                    else "–"
                    for t in tasks
                ]
            )
    return markdown_table(["variant", *tasks], rows) if rows else "(no zero-shot tasks)"


def _collapsed_note(results: StudyResults) -> list[str]:
    same = [(v.name, v.same_as) for v in results.variants if v.same_as is not None]
    if not same:
        return []
    names = ", ".join(f"`{n}` is `{c}`" for n, c in same)
    return [
        f"No edit was chosen for these repairs, so each is its compressed model and its rows are left "
        f"out (results.json keeps them): {names}.",
        "",
    ]


def _preamble(results: StudyResults, attacks: Sequence[str]) -> list[str]:
    base, level, saturated = results.base, results.significance_level, results.saturated_attacks
    sat_lines = [f"- **{a}** is saturated on the base model: {why}." for a, why in saturated.items()]
    sat_lines += [
        f"- **{a}** carries no paired test: {why}; its rates are shown without marks."
        for a, why in results.untested_attacks.items()
        if a in attacks
    ]
    return [
        f"# refusal_core study: {results.model.get('name_or_path', 'model')}",
        "",
        "## Verdict",
        "",
        _compression_verdict(results),
        "",
        _repair_verdict(results),
        "",
        f"Base source: layer {base.source[0]}, position {base.source_position}"
        + ("" if base.filters_passed else " (no candidate passed the filters: fallback †)")
        + f"; ‖r‖ = {base.direction_norm:.3f}; split-half noise floor at that site: "
        f"{format_value(base.noise_floor_at_source)} (a cosine is only meaningful well above it).",
        "",
        f"Rates: value [95 % Wilson interval], n per rate in results.json. `*` marks a paired difference "
        f"significant at p < {level} (exact McNemar on the same prompts; paired bootstrap for KL and CE): "
        "compressed variants against the base, repaired ones against their unedited compressed model "
        "(↑ higher, ↓ lower). An unmarked difference is not a finding. No correction for multiple "
        "comparisons is applied. † source chosen by the fallback (no candidate passed the filters). "
        "A marked KL or CE that would print as zero is given to three significant digits with its "
        "change (Δ).",
        "",
        *sat_lines,
        "",
    ]


def study_report_markdown(results: StudyResults, plots: Sequence[str] = ()) -> str:
    """The text of report.md for ``results``; ``plots`` are image paths relative to the report."""
    shown = _shown(results)
    attacks = sorted({a for v in shown if v.evaluation is not None for a in v.evaluation.asr})
    sat = results.saturated_attacks
    head = ["variant", "source (l, pos)", "shift", "cos@base src", "cos selected", "sparsity"]
    head += [f"ASR {a}" + (" (saturated)" if a in sat else "") for a in attacks]
    head += ["over-refusal", "degenerate (harmless / vanilla)", "KL(base‖v)", "CE of base completions"]
    mech_head = [
        "variant",
        "refusal (harmful)",
        "refusal with own direction ablated (necessity: low)",
        "harmless refused with it added (sufficiency: high)",
        "cos@base src",
        "shift",
    ]
    repair_head = ["variant", "strength", "gain (attn, mlp)", "α (attn, mlp)", "attack"]
    repair_head += ["ASR compressed → repaired", "absolute reduction", "relative reduction"]
    repair_head += ["share of compression's rise recovered", "McNemar p"]
    parts = [
        *_preamble(results, attacks),
        "## Variants (held-out test prompts)",
        "",
        markdown_table(head, _variant_rows(shown, attacks)),
        "",
        *_collapsed_note(results),
        "ASR: share of harmful test prompts answered (substring judge); over-refusal: share of harmless "
        "test prompts refused (greedy, no system prompt); degenerate: completions that are empty or one "
        "word repeated, counted as neither refused nor answered; KL: mean KL(base ‖ variant) of the "
        "next-token distribution on harmless test prompts; CE: mean cross-entropy (nats/token) of the "
        "base model's greedy completions of those prompts under the variant.",
        "",
        "## Mechanism (each model's own re-extracted and re-selected direction)",
        "",
        markdown_table(mech_head, _mechanism_rows(shown)),
        "",
        *_base_direction_parts(shown),
        "## Repair: AIRD against the unedited compressed model",
        "",
        markdown_table(repair_head, _repair_rows(shown, attacks)),
        "",
        "## The AIRD sweep (validation prompts only)",
        "",
        *_sweep_parts(results),
        "## Zero-shot accuracy (± lm-eval's standard error)",
        "",
        _accuracy_table(shown),
        "",
        "## Plots",
        "",
        *[f"![{Path(p).stem}]({p})" for p in plots],
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(results.settings, indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(parts)
