"""Shared pytest hooks of the example-based tiers (keep minimal: several files add to it)."""

from __future__ import annotations

import pytest

CATALOGUE_NODE = "test_bad_input_catalogue.py::test_catalogue_case["


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line with the size and outcome of the bad-input catalogue, when any of it ran."""
    outcomes: dict[str, int] = {}
    for outcome in ("passed", "failed", "skipped", "error", "xfailed", "xpassed"):
        for report in terminalreporter.stats.get(outcome, []):
            when = getattr(report, "when", "call")
            # a passed case counts once (its call phase); a failure or skip in setup counts too
            if CATALOGUE_NODE in getattr(report, "nodeid", "") and (
                when == "call" or (when == "setup" and outcome != "passed")
            ):
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
    total = sum(outcomes.values())
    if total:
        detail = ", ".join(f"{n} {o}" for o, n in outcomes.items())
        terminalreporter.write_line(f"bad-input catalogue: {total} cases ({detail})")
