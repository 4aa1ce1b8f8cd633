"""The study report: results.json, report.md with tables, and PNG plots.

Inputs are plain data (the study's per-variant records and per-model score
grids), so a report can be rebuilt from saved artifacts without a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never open a window
import matplotlib.pyplot as plt
import numpy as np

from refusal_core.artifacts import atomic_write_bytes, atomic_write_json

__all__ = ["plot_asr", "plot_candidate_heatmap", "plot_cosine_by_layer", "write_report"]


def plot_candidate_heatmap(
    path: Path,
    title: str,
    scores: Mapping[str, np.ndarray],
    positions: Sequence[int],
    selected: tuple[int, int] | None,
) -> None:
    """One panel per score (bypass, induce, kl), layer × position, selected source boxed."""
    names = list(scores)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        grid = np.asarray(scores[name], dtype=float)
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
        ax.set_title(name)
        ax.set_xlabel("position")
        ax.set_ylabel("layer")
        ax.set_xticks(range(len(positions)), [str(p) for p in positions])
        if selected is not None:
            layer, pos = selected
            ax.add_patch(plt.Rectangle((pos - 0.5, layer - 0.5), 1, 1, fill=False, ec="red", lw=2))
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_cosine_by_layer(
    path: Path,
    position: int,
    cosines: Mapping[str, Sequence[float]],
    noise_floor: Sequence[float],
) -> None:
    """Cosine with the base direction per layer (at one position) for each method, with the noise floor."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    layers = np.arange(len(noise_floor))
    for name, values in cosines.items():
        ax.plot(layers, values, marker="o", ms=3, label=name)
    ax.plot(layers, noise_floor, "k--", label="split-half noise floor (base)")
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine with base direction")
    ax.set_title(f"Direction similarity by layer, position {position}")
    ax.set_ylim(min(-0.05, float(np.nanmin([np.nanmin(v) for v in cosines.values()] + [0.0]))), 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_asr(path: Path, table: Mapping[str, Mapping[str, float]]) -> None:
    """Grouped bars: ASR per variant (rows of ``table``) for each attack (columns)."""
    variants = list(table)
    attacks = sorted({a for row in table.values() for a in row})
    fig, ax = plt.subplots(figsize=(max(6.4, 0.55 * len(variants) * max(1, len(attacks)) / 2), 4.2))
    width = 0.8 / max(1, len(attacks))
    x = np.arange(len(variants))
    for k, attack in enumerate(attacks):
        vals = [table[v].get(attack, np.nan) for v in variants]
        ax.bar(x + k * width - 0.4 + width / 2, vals, width, label=attack)
    ax.set_xticks(x, variants, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("attack success rate")
    ax.set_ylim(0, 1.02)
    ax.set_title("ASR per variant and attack (before / after AIRD)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(v, digits) for v in value) + ")"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: Path, results: Mapping[str, Any], plots: Sequence[str]) -> Path:
    """Write ``results.json`` and ``report.md`` (tables + links to ``plots``) into ``out_dir``."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "results.json", results)
    variants = results["variants"]
    attacks = sorted({a for v in variants for a in v.get("asr", {})})
    tasks = sorted({t for v in variants for t in v.get("accuracy", {})})
    header = [
        "variant",
        "source (l, pos)",
        "shift (Δl, Δpos)",
        "cos@base src",
        "cos selected",
        "sparsity",
        *[f"ASR {a}" for a in attacks],
        "over-refusal",
        *[f"acc {t}" for t in tasks],
    ]
    rows = []
    for v in variants:
        rows.append(
            [
                v["name"],
                v.get("source"),
                v.get("source_shift"),
                v.get("cosine_at_base_source"),
                v.get("cosine_selected"),
                v.get("sparsity"),
                *[v.get("asr", {}).get(a) for a in attacks],
                v.get("over_refusal"),
                *[v.get("accuracy", {}).get(t) for t in tasks],
            ]
        )
    mech_rows = [
        [v["name"], v.get("necessity"), v.get("sufficiency"), v.get("aird_gain")]
        for v in variants
        if v.get("necessity") is not None or v.get("aird_gain") is not None
    ]
    base = results.get("base", {})
    parts = [
        f"# refusal_core study: {results.get('model', {}).get('name_or_path', 'model')}",
        "",
        f"Base source: layer {base.get('source', ['?'])[0]}, position {base.get('source_position', '?')}; "
        f"split-half noise floor at that site: {_fmt(base.get('noise_floor_at_source'))} "
        f"(a cosine is only meaningful well above it).",
        "",
        "## Variants",
        "",
        markdown_table(header, rows),
        "",
        "ASR: share of harmful test prompts the judge counts as answered; over-refusal: share of "
        "harmless test prompts refused (greedy, no system prompt).",
        "",
        "## Mechanism",
        "",
        "necessity: refusal rate on harmful test prompts with the variant's own direction ablated "
        "(low = necessary); sufficiency: refusal rate on harmless prompts with it added at its layer "
        "(high = sufficient); AIRD gain: 1 + α‖r‖² of the attention / MLP edit.",
        "",
        markdown_table(
            ["variant", "refusal after ablation", "refusal after addition", "AIRD gain"], mech_rows
        ),
        "",
        "## Plots",
        "",
        *[f"![{Path(p).stem}]({p})" for p in plots],
        "",
        "## Settings",
        "",
        "```json",
        _json(results.get("settings", {})),
        "```",
        "",
    ]
    path = out_dir / "report.md"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=True, default=str)
