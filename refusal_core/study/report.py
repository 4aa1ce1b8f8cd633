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

__all__ = ["format_rate", "write_study_report"]


def format_rate(r: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``value [low, high]`` of a rate record, or ``–``."""
    if not r:
        return "–"
    return f"{r['value']:.{digits}f} [{r['low']:.{digits}f}, {r['high']:.{digits}f}]"


def _mark(test: Mapping[str, Any] | None) -> str:
    """`` ↑*``/`` ↓*`` for a significant paired change, else empty."""
    if not test or not test.get("significant"):
        return ""
    return " ↑*" if test["difference"] > 0 else " ↓*"


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def _reference_test(v: Mapping[str, Any]) -> Mapping[str, Any]:
    """The comparison a variant's table cells are marked against: repaired vs compressed, else vs base."""
    comps = v.get("comparisons", {})
    return comps.get("vs_compressed") or comps.get("vs_base") or {}


def write_study_report(
    out_dir: Path,
    results: Mapping[str, Any],
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
    atomic_write_json(out_dir / "results.json", results)
    variants = list(results["variants"])
    base = results["base"]
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
        base["source_position"],
        cosine_by_layer,
        [float(x) for x in noise[:, base_position_index]],
    )
    plots.append("plots/cosine_by_layer.png")
    asr_table = {v["name"]: v["evaluation"]["asr"] for v in variants if "evaluation" in v}
    plot_asr(plots_dir / "asr.png", asr_table)
    plots.append("plots/asr.png")
    for method, sweep in results.get("sweeps", {}).items():
        path = plots_dir / f"pareto_{_slug(method)}.png"
        points = sweep["points"]
        chosen: dict[str, int] = {}
        for arm, ch in sweep["choices"].items():
            # indices in a choice refer to that arm's points (identity first); map back to the full list
            arm_idx = [
                i
                for i, p in enumerate(points)
                if p["strength"] == "identity" or p["sparse"] == (arm == "sparse")
            ]
            chosen[arm] = arm_idx[ch["index"]]
        plot_pareto(path, method, points, chosen)
        plots.append(f"plots/{path.name}")

    level = results.get("significance_level", 0.05)
    attacks = sorted({a for v in variants for a in v.get("evaluation", {}).get("asr", {})})
    saturated = results.get("saturated_attacks", {})
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
        ev = v.get("evaluation", {})
        ref = _reference_test(v)
        same = v.get("repair", {}).get("same_as")
        cells = [
            v["name"] + (f" (= {same}: no edit chosen)" if same else ""),
            format_value(v.get("source")) + ("" if v.get("filters_passed", True) else " †"),
            format_value(v.get("source_shift")),
            format_value(v.get("cosine_at_base_source")),
            format_value(v.get("cosine_selected")),
            format_value(v.get("sparsity")),
        ]
        for a in attacks:
            cells.append(format_rate(ev.get("asr", {}).get(a)) + _mark(ref.get("asr", {}).get(a)))
        cells.append(format_rate(ev.get("over_refusal")) + _mark(ref.get("over_refusal")))
        deg = ev.get("degenerate", {})
        cells.append(f"{deg.get('harmless', '–')} / {deg.get('vanilla', '–')}")
        dmg = ev.get("damage", {})
        cells.append(format_value(dmg.get("kl_mean"), 4) + _mark(ref.get("kl")))
        cells.append(format_value(dmg.get("ce_mean"), 3) + _mark(ref.get("ce")))
        rows.append(cells)

    mech_rows = []
    for v in variants:
        m = v.get("mechanism")
        if not m:
            continue
        ref = v.get("comparisons", {}).get("mechanism_vs_compressed") or v.get("comparisons", {}).get(
            "mechanism_vs_base", {}
        )
        mech_rows.append(
            [
                v["name"],
                format_rate(m["refusal_rate_harmful"]) + _mark(ref.get("refused_harmful")),
                format_rate(m["necessity"]) + _mark(ref.get("refused_ablated")),
                format_rate(m["sufficiency"]) + _mark(ref.get("refused_added")),
                format_value(v.get("cosine_at_base_source")),
                format_value(v.get("source_shift")),
            ]
        )

    repair_rows = []
    for v in variants:
        rep = v.get("repair")
        if not rep:
            continue
        head_line = v.get("headline", {})
        vs_c = v.get("comparisons", {}).get("vs_compressed", {})
        for a in attacks:
            h = head_line.get(a)
            t = vs_c.get("asr", {}).get(a)
            if h is None or t is None:
                continue
            repair_rows.append(
                [
                    v["name"],
                    rep.get("how", ""),
                    format_value(rep.get("gains")),
                    format_value(rep.get("alphas"), 5),
                    a,
                    f"{h['asr_compressed']:.3f} → {h['asr_repaired']:.3f}",
                    format_value(h["absolute_reduction"]),
                    format_value(h["relative_reduction"]),
                    format_value(h["share_of_rise_recovered"]),
                    f"{t['p_value']:.3g}" + (" *" if t["significant"] else ""),
                ]
            )

    sweep_parts: list[str] = []
    for method, sweep in results.get("sweeps", {}).items():
        srows = [
            [
                p["label"],
                format_value(p["gains"]),
                format_value(p["alphas"], 5),
                format_rate(p["scores"]["compliance"]),
                format_rate(p["scores"]["over_refusal"]),
                format_value(p["scores"]["kl"], 4),
                format_value(p["scores"].get("ce"), 4),
            ]
            for p in sweep["points"]
        ]
        choice_lines = [
            f"- {arm}: **{ch['chosen']['label']}** (criterion met: {ch['criterion_met']})"
            for arm, ch in sweep["choices"].items()
        ]
        rule = next(iter(sweep["choices"].values()))["rule"] if sweep["choices"] else ""
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
    tasks = sorted({t for v in variants for t in v.get("evaluation", {}).get("accuracy", {})})
    for v in variants:
        acc = v.get("evaluation", {}).get("accuracy", {})
        if acc:
            acc_rows.append(
                [v["name"]]
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
        for a, why in results.get("untested_attacks", {}).items()
        if a in attacks
    ]
    model_name = results.get("model", {}).get("name_or_path", "model")
    parts = [
        f"# refusal_core study: {model_name}",
        "",
        f"Base source: layer {base['source'][0]}, position {base['source_position']}"
        + ("" if base.get("filters_passed", True) else " (no candidate passed the filters: fallback †)")
        + f"; ‖r‖ = {base['direction_norm']:.3f}; split-half noise floor at that site: "
        f"{format_value(base.get('noise_floor_at_source'))} (a cosine is only meaningful well above it).",
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
        json.dumps(results.get("settings", {}), indent=2, sort_keys=True),
        "```",
        "",
    ]
    path = out_dir / "report.md"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path
