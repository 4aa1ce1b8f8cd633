"""The study's report: results.json, report.md (every rate with n and interval, every comparison
with its p value) and the plots.

A difference is called a finding only when its paired test is significant at
``results["significance_level"]``; the tables mark those with ``*`` and leave
the others unmarked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from refusal_core.artifacts import atomic_write_bytes, atomic_write_json
from refusal_core.report import (
    format_value,
    markdown_table,
    plot_asr,
    plot_candidate_heatmap,
    plot_cosine_by_layer,
    plot_pareto,
)
from refusal_core.stats import MeanDifference, PairedTest, Rate
from refusal_core.study.results import Comparison, StudyResults, VariantResult

__all__ = ["format_rate", "write_study_report"]


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


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def _reference(v: VariantResult) -> Comparison:
    """The comparison a variant's table cells are marked against: repaired vs compressed, else vs base."""
    return (v.comparisons.reference if v.comparisons is not None else None) or Comparison()


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
    variants = results.variants
    base = results.base
    plots: list[str] = []

    for name, sel in selections.items():
        path = plots_dir / f"candidates_{_slug(name)}.png"
        plot_candidate_heatmap(
            path,
            f"{name}: candidate scores",
            {"bypass": sel.bypass.numpy(), "induce": sel.induce.numpy(), "kl": sel.kl.numpy()},
            sel.positions,
            sel.source,
        )
        plots.append(f"plots/{path.name}")
    plot_cosine_by_layer(
        plots_dir / "cosine_by_layer.png",
        base.source_position,
        cosine_by_layer,
        [float(x) for x in noise[:, base_position_index]],
    )
    plots.append("plots/cosine_by_layer.png")
    asr_table = {
        v.name: {a: r.to_dict() for a, r in v.evaluation.asr.items()}
        for v in variants
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

    level = results.significance_level
    attacks = sorted({a for v in variants if v.evaluation is not None for a in v.evaluation.asr})
    saturated = results.saturated_attacks
    head = [
        "variant",
        "source (l, pos)",
        "shift",
        "cos@base src",
        "cos selected",
        "sparsity",
        *[f"ASR {a}" + (" (saturated)" if a in saturated else "") for a in attacks],
        "over-refusal",
        "degenerate (harmless / vanilla)",
        "KL(base‖v)",
        "CE of base completions",
    ]
    rows = []
    for v in variants:
        ev = v.evaluation
        ref = _reference(v)
        same = v.same_as
        cells = [
            v.name + (f" (= {same}: no edit chosen)" if same else ""),
            format_value(v.source) + ("" if v.filters_passed in (True, None) else " †"),
            format_value(v.source_shift),
            format_value(v.cosine_at_base_source),
            format_value(v.cosine_selected),
            format_value(v.sparsity),
        ]
        for a in attacks:
            cells.append(format_rate(ev.asr.get(a) if ev else None) + _mark(ref.asr.get(a)))
        cells.append(format_rate(ev.over_refusal if ev else None) + _mark(ref.over_refusal))
        deg = ev.degenerate if ev else {}
        cells.append(f"{deg.get('harmless', '–')} / {deg.get('vanilla', '–')}")
        cells.append(format_value(ev.damage.kl_mean if ev else None, 4) + _mark(ref.kl))
        cells.append(format_value(ev.damage.ce_mean if ev else None, 3) + _mark(ref.ce))
        rows.append(cells)

    mech_rows = []
    for v in variants:
        m = v.mechanism
        if m is None:
            continue
        mref = v.comparisons.mechanism_reference if v.comparisons is not None else {}
        mech_rows.append(
            [
                v.name,
                format_rate(m.refusal_rate_harmful) + _mark(mref.get("refused_harmful")),
                format_rate(m.necessity) + _mark(mref.get("refused_ablated")),
                format_rate(m.sufficiency) + _mark(mref.get("refused_added")),
                format_value(v.cosine_at_base_source),
                format_value(v.source_shift),
            ]
        )

    repair_rows = []
    for v in variants:
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
            repair_rows.append(
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

    sweep_parts: list[str] = []
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
        choice_lines = [
            f"- {arm}: **{ch.point.label}** (criterion met: {ch.criterion_met})"
            for arm, ch in sweep.choices.items()
        ]
        rule = next(iter(sweep.choices.values())).rule if sweep.choices else ""
        sweep_parts += [
            f"### {method}",
            "",
            markdown_table(
                [
                    "point",
                    "gain (attn, mlp)",
                    "α (attn, mlp)",
                    "compliance (val)",
                    "over-refusal (val)",
                    "KL (val)",
                    "CE (val)",
                ],
                srows,
            ),
            "",
            f"Rule: {rule}.",
            "",
            *choice_lines,
            "",
        ]

    acc_rows = []
    tasks = sorted({t for v in variants if v.evaluation is not None for t in v.evaluation.accuracy})
    for v in variants:
        acc = v.evaluation.accuracy if v.evaluation is not None else {}
        if acc:
            acc_rows.append(
                [v.name]
                + [
                    f"{acc[t]['accuracy']:.3f} ± {acc[t]['stderr']:.3f} (n={acc[t]['n']})"
                    if t in acc and acc[t].get("stderr") is not None
                    else "–"
                    for t in tasks
                ]
            )

    sat_lines = [f"- **{a}** is saturated on the base model: {why}." for a, why in saturated.items()]
    sat_lines += [
        f"- **{a}** carries no paired test: {why}; its rates are shown without marks."
        for a, why in results.untested_attacks.items()
        if a in attacks
    ]
    model_name = results.model.get("name_or_path", "model")
    parts = [
        f"# refusal_core study: {model_name}",
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
        "comparisons is applied. † source chosen by the fallback (no candidate passed the filters).",
        "",
        *sat_lines,
        "",
        "## Variants (held-out test prompts)",
        "",
        markdown_table(head, rows),
        "",
        "ASR: share of harmful test prompts answered (substring judge); over-refusal: share of harmless "
        "test prompts refused (greedy, no system prompt); degenerate: completions that are empty or one "
        "word repeated, counted as neither refused nor answered; KL: mean KL(base ‖ variant) of the "
        "next-token "
        "distribution on harmless test prompts; CE: mean cross-entropy (nats/token) of the base model's "
        "greedy completions of those prompts under the variant.",
        "",
        "## Mechanism (each model's own re-extracted and re-selected direction)",
        "",
        markdown_table(
            [
                "variant",
                "refusal (harmful)",
                "refusal with own direction ablated (necessity: low)",
                "harmless refused with it added (sufficiency: high)",
                "cos@base src",
                "shift",
            ],
            mech_rows,
        ),
        "",
        "## Repair: AIRD against the unedited compressed model",
        "",
        markdown_table(
            [
                "variant",
                "strength",
                "gain (attn, mlp)",
                "α (attn, mlp)",
                "attack",
                "ASR compressed → repaired",
                "absolute reduction",
                "relative reduction",
                "share of compression's rise recovered",
                "McNemar p",
            ],
            repair_rows,
        ),
        "",
        "## The AIRD sweep (validation prompts only)",
        "",
        *sweep_parts,
        "## Zero-shot accuracy (± lm-eval's standard error)",
        "",
        markdown_table(["variant", *tasks], acc_rows) if acc_rows else "(no zero-shot tasks)",
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
    path = out_dir / "report.md"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path
