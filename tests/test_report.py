"""The report: tables and plots from plain result records."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from refusal_core.report import plot_asr, plot_candidate_heatmap, plot_cosine_by_layer, write_report


def test_plots_are_pngs(tmp_path: Path) -> None:
    plot_candidate_heatmap(
        tmp_path / "h.png",
        "t",
        {"bypass": np.random.rand(4, 2), "kl": np.full((4, 2), np.nan)},
        [-2, -1],
        (1, 0),
    )
    plot_cosine_by_layer(tmp_path / "c.png", -1, {"wanda": [np.nan, 0.9, 0.8, 0.7]}, [np.nan, 0.5, 0.6, 0.7])
    plot_asr(tmp_path / "a.png", {"base": {"vanilla": 0.1}, "wanda": {"vanilla": 0.4, "gcg": 0.9}})
    for name in ("h.png", "c.png", "a.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG"), f"{name} is a PNG"


def test_report_tables(tmp_path: Path) -> None:
    results = {
        "model": {"name_or_path": "toy"},
        "base": {"source": [2, -1], "source_position": -1, "noise_floor_at_source": 0.97},
        "variants": [
            {
                "name": "base",
                "source": [2, -1],
                "asr": {"vanilla": 0.0},
                "over_refusal": 0.05,
                "accuracy": {},
            },
            {
                "name": "wanda",
                "source": [1, -1],
                "source_shift": [-1, 0],
                "asr": {"vanilla": 0.5},
                "necessity": 0.1,
            },
        ],
        "settings": {"seed": 0},
    }
    path = write_report(tmp_path, results, ["plots/a.png"])
    text = path.read_text()
    assert "| wanda | (1, -1) | (-1, 0) |" in text, f"variant row in report:\n{text}"
    assert "![a](plots/a.png)" in text, "plots are linked"
    assert (tmp_path / "results.json").is_file(), "results.json is written beside the report"
