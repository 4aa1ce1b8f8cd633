"""The plots are readable at their saved size: labels that fit and do not overlap, colour bars that
say what they show, lines that can be told apart (issue 20, "Results a person can read").

The figures are caught before saving (``refusal_core.report._save`` is wrapped) so the checks can
measure what matplotlib drew: tick-label boxes from the renderer, pixel sizes at the saved dpi.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from refusal_core import report
from refusal_core.stats import rate

#: The toy study's variants: 3 methods, each compressed, paper-α, chosen and (pruning) sparse repair.
VARIANTS = ["base"] + [
    f"{m}{k}"
    for m in ("magnitude", "wanda", "llm-int8")
    for k in ("", "+aird", "+aird*", "+aird-sparse*")
    if not (m == "llm-int8" and k == "+aird-sparse*")
]
ATTACKS = ["decoding", "gcg", "vanilla", "vanilla_system"]


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    caught: list[Any] = []
    save = report._save

    def catch(fig: Any, path: Path) -> None:
        fig.canvas.draw()  # lay out once, as savefig does
        fig._wiring_renderer = fig.canvas.get_renderer()  # the canvas is dropped when the figure closes
        caught.append(fig)
        save(fig, path)

    monkeypatch.setattr(report, "_save", catch)
    return caught


def _overlapping(labels: list[Any], renderer: Any) -> list[tuple[str, str]]:
    boxes = [
        (t.get_text(), t.get_window_extent(renderer)) for t in labels if t.get_text() and t.get_visible()
    ]
    return [(a, b) for (a, ba), (b, bb) in combinations(boxes, 2) if ba.overlaps(bb)]


def test_asr_plot_fits_a_page_with_horizontal_readable_labels(figures: list[Any], tmp_path: Path) -> None:
    table = {v: {a: rate(i % 7, 16).to_dict() for a in ATTACKS} for i, v in enumerate(VARIANTS)}
    report.plot_asr(tmp_path / "asr.png", table)
    fig = figures[-1]
    w, h = (fig.get_size_inches() * 110).round()
    assert (w <= 1400, h <= 1000) == (True, True), (
        f"asr.png is {w:.0f}×{h:.0f} px for {len(VARIANTS)} variants × 4 attacks"
    )
    renderer = fig._wiring_renderer
    names = fig.axes[0].get_yticklabels()
    assert [t.get_text() for t in names] == VARIANTS, "every variant is named on the shared axis"
    assert all(t.get_rotation() == 0 and t.get_fontsize() >= 8 for t in names), (
        "variant names must be horizontal and at least 8 pt"
    )
    assert not _overlapping(names, renderer), f"variant names overlap: {_overlapping(names, renderer)}"


def test_pareto_tick_labels_do_not_overlap(figures: list[Any], tmp_path: Path) -> None:
    """KL and CE of neighbouring sweep points differ in the 4th decimal: the default ticks collide."""
    points = [
        {
            "strength": "identity" if i == 0 else "gain",
            "sparse": False,
            "gains": [1.0 + i, 1.0 + i],
            "label": f"g={i}",
            "scores": {
                "compliance": rate(10 - i, 16).to_dict(),
                "over_refusal": rate(i, 16).to_dict(),
                "kl": 0.0123 + 1.7e-5 * i,
                "ce": 2.345678 + 3.1e-5 * i,
            },
        }
        for i in range(7)
    ]
    report.plot_pareto(tmp_path / "p.png", "wanda", points, {"dense": 3})
    fig = figures[-1]
    renderer = fig._wiring_renderer
    for ax in fig.axes:
        clash = _overlapping(ax.get_xticklabels(), renderer)
        assert not clash, f"pareto panel {ax.get_xlabel()!r}: tick labels overlap: {clash}"


def test_candidate_heatmap_colour_bars_name_their_score_and_unit(figures: list[Any], tmp_path: Path) -> None:
    grid = np.random.default_rng(0).random((6, 3))
    report.plot_candidate_heatmap(
        tmp_path / "h.png", "base", {"bypass": grid, "induce": grid, "kl": grid}, [-3, -2, -1], (2, 1)
    )
    fig = figures[-1]
    bars = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 3, f"one colour bar per score, found {len(bars)}"
    assert all("(" in b and ")" in b for b in bars), f"colour bars need a label with a unit: {bars}"
    units = [("nats" in b, "log-odds" in b) for b in bars]
    assert units == [(False, True), (False, True), (True, False)], (
        f"bypass, induce: log-odds; kl: nats: {bars}"
    )


def test_cosine_lines_are_all_distinguishable(figures: list[Any], tmp_path: Path) -> None:
    names = VARIANTS[1:]  # 11 lines besides the base, as in the toy study
    names += ["awq-w4", "awq-w4+aird", "awq-w4+aird*"]
    cos = {n: [np.nan, *np.linspace(0.9, 0.99, 3)] for n in names}
    report.plot_cosine_by_layer(tmp_path / "c.png", -1, cos, [np.nan, 0.5, 0.6, 0.7])
    ax = figures[-1].axes[0]
    lines = [ln for ln in ax.get_lines() if ln.get_label() in cos]
    looks = [(tuple(np.round(ln.get_color(), 3)), ln.get_linestyle(), ln.get_marker()) for ln in lines]
    assert len(lines) == len(names), f"one line per model: {len(lines)} for {len(names)}"
    dupes = [
        (a.get_label(), b.get_label())
        for a, b in combinations(lines, 2)
        if looks[lines.index(a)] == looks[lines.index(b)]
    ]
    assert not dupes, f"lines drawn alike: {dupes}"
