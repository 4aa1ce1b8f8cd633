"""Shared pytest hooks of the example-based tiers (keep minimal: several files add to it)."""

from __future__ import annotations

import pytest

#: The bad-input catalogue: the API table and the command-line table, counted together.
CATALOGUE_NODES = {
    "API": "test_bad_input_catalogue.py::test_catalogue_case[",
    "CLI": "test_cli.py::test_bad_command_lines_exit_2_with_one_line_and_write_nothing[",
    "CLI-load": "test_bad_input_catalogue.py::test_cli_load_case[",
}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line with the size and outcome of the bad-input catalogue, when any of it ran."""
    outcomes: dict[str, int] = {}
    per_table: dict[str, int] = {}
    for outcome in ("passed", "failed", "skipped", "error", "xfailed", "xpassed"):
        for report in terminalreporter.stats.get(outcome, []):
            when = getattr(report, "when", "call")
            nodeid = getattr(report, "nodeid", "")
            table = next((t for t, node in CATALOGUE_NODES.items() if node in nodeid), None)
            # a passed case counts once (its call phase); a failure or skip in setup counts too
            if table and (when == "call" or (when == "setup" and outcome != "passed")):
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                per_table[table] = per_table.get(table, 0) + 1
    total = sum(outcomes.values())
    if total:
        detail = ", ".join(f"{n} {o}" for o, n in outcomes.items())
        tables = " + ".join(f"{n} {t}" for t, n in per_table.items())
        terminalreporter.write_line(f"bad-input catalogue: {total} cases ({tables}; {detail})")
