"""The study report: results.json, report.md with tables, and PNG plots.

Inputs are plain data (the study's per-variant records and per-model score
grids), so a report can be rebuilt from saved artifacts without a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never open a window
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from refusal_core.saving import atomic_write_bytes

__all__ = [
    "format_value",
    "markdown_table",
    "plot_asr",
    "plot_candidate_heatmap",
    "plot_cosine_by_layer",
    "plot_pareto",
]


#: Colour-bar label (what and unit) of each candidate score.
SCORE_LABELS = {
    "bypass": "refusal score, harmful, r ablated (log-odds)",
    "induce": "refusal score, harmless, r added (log-odds)",
    "kl": "KL(base ‖ r ablated), harmless (nats)",
}
#: What a good candidate does to each score.
SCORE_GOALS = {"bypass": "low: r necessary", "induce": "high: r sufficient", "kl": "low: little damage"}


def plot_candidate_heatmap(
    path: Path,
    title: str,
    scores: Mapping[str, np.ndarray],
    positions: Sequence[int],
    selected: tuple[int, int] | None,
) -> None:
    """One panel per score (bypass, induce, kl), layer × position, selected source boxed."""
    names = list(scores)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        grid = np.asarray(scores[name], dtype=float)
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
        ax.set_title(f"{name} ({SCORE_GOALS[name]})" if name in SCORE_GOALS else name, fontsize=9)
        ax.set_xlabel("position")
        ax.set_ylabel("layer")
        ax.set_xticks(range(len(positions)), [str(p) for p in positions])
        ax.set_yticks(range(grid.shape[0]))
        if selected is not None:
            layer, pos = selected
            ax.add_patch(plt.Rectangle((pos - 0.5, layer - 0.5), 1, 1, fill=False, ec="red", lw=2))
        bar = fig.colorbar(im, ax=ax, fraction=0.046)
        bar.set_label(SCORE_LABELS.get(name, name), fontsize=8)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_cosine_by_layer(
    path: Path,
    position: int,
    cosines: Mapping[str, Sequence[float]],
    noise_floor: Sequence[float],
) -> None:
    """Cosine with the base direction per layer (at one position) for each model, noise floor as a band.

    The band runs from the split-half noise floor to 1: a cosine inside it is what two halves of
    the same prompt set already give. The y axis is zoomed to the data.
    """
    fig, ax = plt.subplots(figsize=(8.6, 4.4))  # room for the legend beside the axes
    layers = np.arange(len(noise_floor))
    floor = np.asarray([np.nan if v is None else v for v in noise_floor], dtype=float)
    ax.fill_between(layers, floor, 1.0, color="0.85", label="within split-half noise (base)", step=None)
    ax.plot(layers, floor, "k--", lw=1)
    values = [floor[np.isfinite(floor)]]
    styles = _line_styles(list(cosines))
    for name, vals in cosines.items():
        v = np.asarray([np.nan if x is None else x for x in vals], dtype=float)
        values.append(v[np.isfinite(v)])
        colour, dash, marker = styles[name]
        ax.plot(layers, v, color=colour, ls=dash, marker=marker, ms=4, lw=1.2, label=name)
    data = np.concatenate([v for v in values if v.size]) if any(v.size for v in values) else np.array([0.0])
    lo = float(np.min(data))
    ax.set_ylim(lo - 0.05 * max(1e-3, 1.0 - lo), 1.0 + 0.02 * max(1e-3, 1.0 - lo))
    ax.set_xticks(layers)
    ax.set_xlabel("layer (block input)")
    ax.set_ylabel("cosine with the base direction")
    ax.set_title(f"Direction similarity by layer, position {position}")
    ax.legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    _save(fig, path)


#: Line style and marker per kind of variant: compressed, paper-α repair, chosen repair, sparse repair.
_KIND_STYLES = {"": ("-", "o"), "+aird": ("--", "s"), "+aird*": (":", "^"), "+aird-sparse*": ("-.", "D")}


def _line_styles(names: Sequence[str]) -> dict[str, tuple[Any, str, str]]:
    """(colour, dash, marker) per variant name: one colour per model (the name before ``+``), one
    dash and marker per kind of variant, so no two lines look alike however many there are."""
    models = list(dict.fromkeys(n.partition("+")[0] for n in names))
    cmap = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")
    out: dict[str, tuple[Any, str, str]] = {}
    for name in names:
        model, plus, kind = name.partition("+")
        dash, marker = _KIND_STYLES.get(plus + kind, ("-", "x"))
        out[name] = (cmap(models.index(model) % cmap.N), dash, marker)
    return out


def _rate_err(rates: Sequence[Mapping[str, float] | None]) -> tuple[np.ndarray, np.ndarray]:
    vals = np.array([np.nan if r is None else r["value"] for r in rates], dtype=float)
    lo = np.array([0.0 if r is None else r["value"] - r["low"] for r in rates], dtype=float)
    hi = np.array([0.0 if r is None else r["high"] - r["value"] for r in rates], dtype=float)
    return vals, np.vstack([lo, hi])


def plot_asr(path: Path, table: Mapping[str, Mapping[str, Mapping[str, float] | None]]) -> None:
    """ASR per variant, one panel per attack, 95 % Wilson intervals as error bars.

    ``table[variant][attack]`` is a rate record with ``value``, ``low`` and ``high``. Variants run
    down a shared vertical axis, so their names stay horizontal and readable however many there are.
    """
    variants = list(table)
    attacks = sorted({a for row in table.values() for a in row}) or ["(none)"]
    height = 1.3 + 0.28 * max(1, len(variants))
    fig, axes = plt.subplots(
        1, len(attacks), figsize=(1.6 + 2.3 * len(attacks), height), sharey=True, squeeze=False
    )
    y = np.arange(len(variants))
    for ax, attack in zip(axes[0], attacks):
        vals, err = _rate_err([table[v].get(attack) for v in variants])
        ax.barh(y, np.nan_to_num(vals), 0.7, xerr=err, capsize=2, color="tab:red", alpha=0.75)
        for yi, v in zip(y, vals):
            if not np.isfinite(v):
                ax.text(0.02, yi, "not run", va="center", fontsize=7, color="0.4")
        ax.set_xlim(0, 1.0)
        ax.set_title(attack, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0][0].set_yticks(y, variants)
    axes[0][0].invert_yaxis()  # first variant (the base) on top
    fig.supxlabel("attack success rate on held-out harmful prompts (95 % Wilson interval)", fontsize=9)
    fig.suptitle("ASR per variant and attack", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_pareto(
    path: Path,
    title: str,
    points: Sequence[Mapping[str, Any]],
    chosen: Mapping[str, int],
) -> None:
    """The AIRD sweep of one compressed model on validation prompts: compliance vs over-refusal, KL and CE.

    ``points`` are sweep points (``label``, ``strength``, ``sparse``, ``scores`` with ``compliance``
    and ``over_refusal`` rate records and ``kl``); ``chosen`` maps an arm name to the index of its
    chosen point. The paper's α is drawn as a star, the unedited model as a square, chosen points
    are circled.
    """
    fig, axes = plt.subplots(1, 3, figsize=(14.0, 4.2), sharey=True)
    groups = {False: ("dense", "tab:blue"), True: ("sparsity-preserving", "tab:orange")}
    for ax, xkey, xlabel in (
        (axes[0], "over_refusal", "over-refusal on harmless validation prompts (95 % CI)"),
        (axes[1], "kl", "KL(base ‖ variant), harmless validation prompts (nats)"),
        (axes[2], "ce", "cross-entropy of the base's completions (nats/token)"),
    ):
        for sparse, (label, colour) in groups.items():
            idx = [
                i for i, p in enumerate(points) if p["strength"] != "identity" and bool(p["sparse"]) == sparse
            ]
            if not idx:
                continue
            ys, yerr = _rate_err([points[i]["scores"]["compliance"] for i in idx])
            if xkey in ("kl", "ce"):
                xs = np.array([points[i]["scores"].get(xkey, np.nan) for i in idx], dtype=float)
                xerr = None
            else:
                xs, xerr = _rate_err([points[i]["scores"]["over_refusal"] for i in idx])
            order = np.argsort(xs, kind="stable")
            ax.errorbar(
                xs, ys, yerr=yerr, xerr=xerr, fmt="o", ms=4, capsize=2, color=colour, label=label, lw=0.8
            )
            ax.plot(xs[order], ys[order], color=colour, lw=0.6, alpha=0.6)
            for i, xv, yv in zip(idx, xs, ys):
                p = points[i]
                txt = "α" if p["strength"] == "paper" else f"{p['gains'][0]:g}"
                ax.annotate(txt, (xv, yv), textcoords="offset points", xytext=(4, 3), fontsize=6)
                if p["strength"] == "paper":
                    ax.plot([xv], [yv], marker="*", ms=13, color=colour, mec="k", ls="none")
        for p in points:
            if p["strength"] == "identity":
                xv = p["scores"].get(xkey, np.nan) if xkey != "over_refusal" else p["scores"][xkey]["value"]
                ax.plot(
                    [xv],
                    [p["scores"]["compliance"]["value"]],
                    marker="s",
                    ms=7,
                    color="k",
                    ls="none",
                    label="unedited (compressed)",
                )
        for arm, i in chosen.items():
            p = points[i]
            xv = p["scores"].get(xkey, np.nan) if xkey != "over_refusal" else p["scores"][xkey]["value"]
            ax.plot(
                [xv],
                [p["scores"]["compliance"]["value"]],
                marker="o",
                ms=14,
                mfc="none",
                mec="red",
                mew=1.5,
                ls="none",
                label=f"chosen ({arm})",
            )
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
        # KL and CE of nearby strengths differ in the 3rd-5th digit: few ticks, short labels
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.xaxis.set_major_formatter(ScalarFormatter(useOffset=True))
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("harmful compliance on validation prompts (95 % CI)")
    handles, labels = axes[0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    axes[0].legend(uniq.values(), uniq.keys(), fontsize=6)
    fig.suptitle(f"{title}: AIRD sweep (numbers: gain g; star: paper's α)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def format_value(value: Any, digits: int = 3) -> str:
    """A table cell: ``–`` for None or a non-finite float, floats to ``digits``, sequences as ``(a, b)``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(format_value(v, digits) for v in value) + ")"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(format_value(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=True, default=str)
