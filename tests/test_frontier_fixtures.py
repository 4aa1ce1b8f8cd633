"""The committed frontier results (toy and real model) are what today's code writes from their data.

Each committed ``frontier.json`` holds the analysis a run produced; its ``report.md`` and its
``answer`` sentence must be exactly what :func:`~refusal_core.frontier.write_report` and
:func:`~refusal_core.frontier.answer_sentence` make of it. A change to the report's wording, the
Holm marks or the frontier rule then shows up here until the fixtures are regenerated, so the
README's quotes of those reports cannot drift from the code silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refusal_core.frontier import answer_sentence, write_report

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FRONTIERS = sorted(FIXTURES.rglob("frontier.json"))
# the order plot_frontier writes them in
PLOT_ORDER = ("frontier_rates.png", "frontier_mechanism.png", "frontier_direction.png", "frontier_damage.png")


def test_the_committed_frontiers_are_found() -> None:
    names = {str(p.parent.relative_to(FIXTURES)) for p in FRONTIERS}
    real = {"real_study/qwen1.5b/frontier/wanda", "real_study/qwen1.5b/frontier/gguf"}
    assert {"frontier_toy/wanda", "frontier_toy/gguf", *real} <= names


@pytest.mark.parametrize("path", FRONTIERS, ids=lambda p: str(p.parent.relative_to(FIXTURES)))
def test_a_committed_report_regenerates_byte_for_byte(path: Path, tmp_path: Path) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["answer"] == answer_sentence(doc["method"], doc["model"], doc)
    plots = [p for p in PLOT_ORDER if (path.parent / p).is_file()]
    assert plots, "a committed frontier has its plots"
    out = write_report(tmp_path, doc["method"], doc["model"], doc, plots)
    assert out.read_text(encoding="utf-8") == (path.parent / "report.md").read_text(encoding="utf-8")
