"""The report: plots and tables from plain result records; significance marks only where significant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from refusal_core.report import plot_asr, plot_candidate_heatmap, plot_cosine_by_layer, plot_pareto
from refusal_core.stats import mcnemar, rate
from refusal_core.study.report import format_rate, write_study_report
from refusal_core.study.results import StudyResults
from refusal_core.study.sweep import ValidationScores


def test_plots_are_pngs(tmp_path: Path) -> None:
    plot_candidate_heatmap(
        tmp_path / "h.png",
        "t",
        {"bypass": np.random.rand(4, 2), "kl": np.full((4, 2), np.nan)},
        [-2, -1],
        (1, 0),
    )
    plot_cosine_by_layer(tmp_path / "c.png", -1, {"wanda": [np.nan, 0.9, 0.8, 0.7]}, [np.nan, 0.5, 0.6, 0.7])
    plot_asr(
        tmp_path / "a.png",
        {
            "base": {"vanilla": rate(1, 10).to_dict()},
            "wanda": {"vanilla": rate(4, 10).to_dict(), "gcg": None},
        },
    )
    pts = [
        {
            "strength": "identity",
            "sparse": False,
            "gains": [1, 1],
            "label": "no edit",
            "scores": {"compliance": rate(6, 10).to_dict(), "over_refusal": rate(1, 10).to_dict(), "kl": 0.1},
        },
        {
            "strength": "paper",
            "sparse": False,
            "gains": [1.1, 1.05],
            "label": "paper α @base",
            "scores": {"compliance": rate(6, 10).to_dict(), "over_refusal": rate(1, 10).to_dict(), "kl": 0.1},
        },
        {
            "strength": "gain",
            "sparse": True,
            "gains": [3.0, 3.0],
            "label": "g=3 sparse @base",
            "scores": {"compliance": rate(2, 10).to_dict(), "over_refusal": rate(2, 10).to_dict(), "kl": 0.2},
        },
    ]
    plot_pareto(tmp_path / "p.png", "wanda", pts, {"dense": 1, "sparse": 2})
    for name in ("h.png", "c.png", "a.png", "p.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG"), f"{name} is a PNG"


def test_format_rate() -> None:
    assert format_rate(rate(3, 10).to_dict()) == "0.300 [0.108, 0.603]"
    assert format_rate(None) == "–"


class _Sel:
    bypass = induce = kl = torch.zeros(2, 1)
    positions = (-1,)
    source = (0, 0)


def _variant(name: str, kind: str, k: int, test=None) -> dict:
    ev = {
        "asr": {"vanilla": rate(k, 20).to_dict()},
        "over_refusal": rate(1, 20).to_dict(),
        "damage": {"kl_mean": 0.0, "ce_mean": 0.2, "n": 20},
        "accuracy": {},
    }
    v = {"name": name, "kind": kind, "source": [0, -1], "source_shift": [0, 0], "evaluation": ev}
    if test is not None:
        v["comparisons"] = {"vs_base": {"asr": {"vanilla": test.to_dict()}}}
    return v


def test_report_marks_only_significant_differences(tmp_path: Path) -> None:
    before = [False] * 20
    big = mcnemar(before, [True] * 10 + [False] * 10)  # 10 discordant, p = 0.002
    small = mcnemar(before, [True] * 2 + [False] * 18)  # 2 discordant, p = 0.5
    results = {
        "model": {"name_or_path": "toy"},
        "refusal_token_ids": [1],
        "noise_floor": [[0.97], [0.97]],
        "base": {
            "source": [0, -1],
            "source_position": -1,
            "filters_passed": True,
            "noise_floor_at_source": 0.97,
            "direction_norm": 2.0,
            "validation": ValidationScores(rate(1, 2), rate(0, 2), 0.0, 1.0, -1.0, "generation").to_dict(),
        },
        "variants": [
            _variant("base", "base", 0),
            _variant("wanda", "compressed", 10, big),
            _variant("magnitude", "compressed", 2, small),
        ],
        "sweeps": {},
        "saturated_attacks": {"vanilla": "floor (0 on the base): cannot show a repair lowering it"},
        "significance_level": 0.05,
        "settings": {"seed": 0},
    }
    path = write_study_report(
        tmp_path,
        StudyResults.from_dict(results),
        selections={"base": _Sel()},
        cosine_by_layer={},
        noise=torch.ones(2, 1),
        base_position_index=0,
    )
    text = path.read_text()
    wanda = next(line for line in text.splitlines() if line.startswith("| wanda |"))
    mag = next(line for line in text.splitlines() if line.startswith("| magnitude |"))
    assert "0.500 [0.299, 0.701] ↑*" in wanda, f"significant rise is marked: {wanda}"
    assert "*" not in mag, f"a non-significant difference must not be marked: {mag}"
    assert "**vanilla** is saturated" in text, "saturated attacks are flagged"
    assert (tmp_path / "results.json").is_file(), "results.json is written beside the report"
