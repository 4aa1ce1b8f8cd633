"""What a newcomer meets first on the command line: --version, -v/-q, progress bars in logs, the same
--dtype spellings everywhere, strict JSON on stdout, a fallback source that is said out loud, and a
--help that answers without importing torch."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch

from refusal_core import cli
from refusal_core.records import finite_or_null
from refusal_core.selection import SelectionResult

ROOT = Path(__file__).resolve().parents[1]


def _strict_loads(text: str) -> Any:
    """JSON as a strict parser reads it: NaN / Infinity are errors, not numbers."""

    def refuse(token: str) -> Any:
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


# ----------------------------------------------------------------------------
# --version, -v / -q, progress
# ----------------------------------------------------------------------------


def test_version_names_the_package_version_and_the_commit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0, "--version exits 0"
    out = capsys.readouterr().out.strip()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert out.startswith(f"refusal-core {declared}"), f"--version {out!r} vs pyproject's {declared}"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert f"commit {head.stdout.strip()[:12]}" in out, f"--version {out!r} names the checkout's commit"


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        ([], logging.WARNING),
        (["-v"], logging.INFO),
        (["-vv"], logging.DEBUG),
        (["-q"], logging.ERROR),
        (["compare", "-v"], logging.INFO),  # after the subcommand too
        (["-v", "compare", "-v", "-v"], logging.DEBUG),
    ],
)
def test_verbosity_sets_the_refusal_core_log_level(
    argv: list[str], level: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def fake(args: Any, ours: list[Path]) -> int:
        seen["level"] = logging.getLogger("refusal_core").level
        return 0

    monkeypatch.setitem(cli.COMMANDS, "compare", cli._Command(fake, writes=False))
    if "compare" not in argv:
        argv = [*argv, "compare"]
    argv = [*argv, "--base", "a", "--other", "b"]
    assert cli.main(argv) == 0
    assert seen["level"] == level, f"{argv}: refusal_core log level {seen['level']} (want {level})"


def test_quiet_hides_a_warning_and_default_shows_it_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    cli.configure_logging(0)
    logging.getLogger("refusal_core.study").warning("shown %d", 1)
    cli.configure_logging(-1)
    logging.getLogger("refusal_core.study").warning("hidden")
    err = capsys.readouterr().err
    assert err == "refusal-core: warning: shown 1\n", f"stderr with default then -q: {err!r}"


def test_progress_bars_are_off_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    def fake(args: Any, ours: list[Path]) -> int:
        seen.append(args.no_progress)
        return 0

    monkeypatch.setitem(cli.COMMANDS, "audit", cli._Command(fake, writes=False))
    argv = ["audit", "--base", "toy", "--compressed", "toy", "--out", "x"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    cli.main(argv)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    cli.main(argv)
    assert seen == [True, False], f"no_progress with stderr a pipe, then a terminal: {seen}"


# ----------------------------------------------------------------------------
# --dtype: one set of spellings
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "name"),
    [("auto", None), ("none", None), ("float32", "float32"), ("bf16", "bfloat16"), ("FP16", "float16")],
)
def test_every_command_takes_the_same_dtype_spellings(
    spelling: str, name: str | None, tmp_path: Path
) -> None:
    parser = cli.build_parser()
    for command in ("extract", "compress", "aird", "evaluate"):
        extra = {"compress": ["--method", "magnitude"], "aird": ["--direction", "d"]}.get(command, [])
        args = parser.parse_args([command, "--dtype", spelling, *extra, "--out", "o"])
        assert cli._dtype(args.dtype) == name, f"{command} --dtype {spelling}"
    args = parser.parse_args(
        ["audit", "--base", "toy", "--compressed", "c", "--dtype", spelling, "--out", "o"]
    )
    assert cli._dtype(args.dtype) == name, f"audit --dtype {spelling}"
    args = parser.parse_args(["study", "--dtype", spelling])
    assert cli.resolve_study_config(None, cli.cc.cli_overrides(args)).dtype == name, (
        f"study --dtype {spelling}"
    )
    config = tmp_path / "s.toml"
    config.write_text(f'dtype = "{spelling}"\n')
    assert cli.resolve_study_config(str(config), {}).dtype == name, f"dtype = {spelling!r} in a study config"


def test_a_dtype_no_command_takes_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["study", "--dtype", "int8"], ["extract", "--dtype", "int8", "--out", "o"]):
        try:
            code = cli.main(argv)  # study checks its config after parsing ...
        except SystemExit as exc:  # ... every other command while parsing
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, f"{argv}: exit status {code}"
        assert err.count("\n") == 1, f"{argv}: one line on stderr, got {err!r}"
        assert "int8" in err, f"{argv}: the message names the value: {err!r}"


# ----------------------------------------------------------------------------
# strict JSON
# ----------------------------------------------------------------------------


def _selection(selected: tuple[int, int] | None) -> SelectionResult:
    nan = math.nan
    bypass = torch.tensor([[1.0, 0.5], [nan, nan]], dtype=torch.float64)  # layer 1: beyond the cut
    return SelectionResult(
        bypass=bypass,
        induce=torch.tensor([[0.2, 0.3], [nan, nan]], dtype=torch.float64),
        kl=torch.tensor([[0.01, 0.2], [nan, nan]], dtype=torch.float64),
        passed=torch.tensor([[True, False], [False, False]]),
        positions=[-2, -1],
        baseline_harmful=2.0,
        baseline_harmless=-3.0,
        selected=selected,
        fallback=(0, 1) if selected is None else None,
        config={"kl_threshold": 0.1},
    )


@pytest.mark.parametrize("selected", [(0, 0), None], ids=["selected", "fallback"])
def test_selection_json_is_strict_and_names_the_source_position(
    tmp_path: Path, selected: tuple[int, int] | None
) -> None:
    sel = _selection(selected)
    sel.save(tmp_path / "selection")
    doc = _strict_loads((tmp_path / "selection.json").read_text())  # raises on NaN
    meta = doc["meta"]
    want = [0, -2] if selected else [0, -1]  # position index 0 is -2, index 1 is -1
    assert meta["source_site"] == want, f"source as (layer, position): {meta['source_site']}"
    assert meta["source_is_fallback"] is (selected is None), "whether the fallback chose the source"
    unscored = [c for c in meta["candidates"] if c["layer"] == 1]
    assert unscored, "the table lists the unscored candidates"
    assert all(c["bypass"] is None for c in unscored), f"unscored candidates: {unscored}"
    back = SelectionResult.load(tmp_path / "selection")
    assert back.source == sel.source, "round trip: source"
    assert torch.equal(back.bypass.isnan(), sel.bypass.isnan()), "round trip: NaN scores stay NaN"


def test_printed_json_is_strict(capsys: pytest.CaptureFixture[str]) -> None:
    cli._print({"cosine": math.nan, "rows": [1.0, math.inf, -math.inf], "n": 3})
    doc = _strict_loads(capsys.readouterr().out)
    assert doc == {"cosine": None, "rows": [1.0, None, None], "n": 3}, f"strict stdout: {doc}"


def test_finite_or_null_leaves_finite_values_and_inputs_alone() -> None:
    given = {"a": [1.5, (math.nan, 2)], "b": {"c": -math.inf}, "d": "nan", "e": True}
    assert finite_or_null(given) == {"a": [1.5, [None, 2]], "b": {"c": None}, "d": "nan", "e": True}
    assert math.isnan(given["a"][1][0]), "finite_or_null must not modify its input"


@pytest.mark.slow
def test_extract_and_aird_say_when_the_fallback_source_is_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A KL threshold no candidate meets: extract prints (layer, position) sites, strict, and one
    warning line; aird, given that direction, says so too and records it."""
    small = ["--n", "4", "--n-val", "4", "--batch-size", "8"]
    d = tmp_path / "d"
    argv = ["extract", "--model", "toy", "--select", "--selection-kl-threshold", "0", *small, "--out", str(d)]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    doc = _strict_loads(out)
    assert doc["selected"] is None, f"extract printed {doc}"
    assert doc["source_is_fallback"] is True, f"extract printed {doc}"
    layer, position = doc["fallback"]
    assert position < 0, f"sites are (layer, position -P..-1): {doc}"
    assert doc["source"] == [layer, position], f"the source is the fallback: {doc}"
    assert doc["source_position"] == position, f"{doc}"
    warnings = [line for line in err.splitlines() if line.startswith("refusal-core: warning:")]
    assert len(warnings) == 1, f"one warning line: {err!r}"
    assert f"layer {layer}, position {position}" in warnings[0], f"the warning names the site: {err!r}"

    a = tmp_path / "a"
    assert cli.main(["aird", "--model", "toy", "--direction", str(d), "--out", str(a)]) == 0
    err = capsys.readouterr().err
    assert "fallback source" in err, f"aird with a fallback direction says so: {err!r}"
    record = json.loads((a / "refusal_core.json").read_text())
    flat = json.dumps(record)
    assert '"source_is_fallback": true' in flat, "the checkpoint record says the source is a fallback"


def test_results_json_records_schema_version_time_and_code(tmp_path: Path) -> None:
    """As lm-eval's results do: which layout, when, and which code (version and git commit)."""
    import dataclasses
    import datetime

    from refusal_core.stats import rate
    from refusal_core.study.results import RESULTS_SCHEMA_VERSION, StudyResults
    from refusal_core.study.sweep import ValidationScores

    minimal = {
        "model": {"name_or_path": "toy"},
        "refusal_token_ids": [1],
        "noise_floor": [[0.9]],
        "base": {
            "source": [0, -1],
            "source_position": -1,
            "filters_passed": True,
            "noise_floor_at_source": 0.9,
            "direction_norm": 2.0,
            "validation": ValidationScores(rate(1, 2), rate(0, 2), 0.0, 1.0, -1.0, "generation").to_dict(),
        },
        "variants": [],
        "settings": {"seed": 0},
    }
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    old = StudyResults.from_dict(minimal)
    assert old.provenance == {}, "a results.json written before provenance existed claims none"
    # what the study does: construct the results (run.py passes no provenance)
    fresh = StudyResults(
        **{f.name: getattr(old, f.name) for f in dataclasses.fields(old) if f.name != "provenance"}
    )
    doc = fresh.to_dict()
    assert doc["schema_version"] == RESULTS_SCHEMA_VERSION == 1, f"schema_version {doc.get('schema_version')}"
    prov = doc["provenance"]
    # a results.json read back keeps the time it was written, not the time it was read
    assert StudyResults.from_dict(doc).to_dict()["provenance"] == prov, "provenance survives a round trip"
    created = datetime.datetime.fromisoformat(prov["created_utc"])
    assert before <= created <= datetime.datetime.now(datetime.timezone.utc), f"created_utc {created}"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert prov["refusal_core"]["version"] == declared, f"version {prov['refusal_core']}"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    want = head.stdout.strip() if head.returncode == 0 else None
    assert prov["refusal_core"]["commit"] == want, (
        f"commit {prov['refusal_core']['commit']} (git says {want})"
    )
    _strict_loads(json.dumps(doc))


# ----------------------------------------------------------------------------
# --help and --version import nothing heavy
# ----------------------------------------------------------------------------

_PROBE = """
import sys
from refusal_core.cli import main
try:
    code = main({argv!r})
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "transformers", "numpy", "scipy") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), "CODE=" + str(code))
"""


@pytest.mark.parametrize(
    "argv", [["--help"], ["--version"], [], ["-v", "--help"], ["no-such-command"], ["study", "--help"]]
)
def test_top_level_help_and_version_do_not_import_torch(argv: list[str]) -> None:
    """``refusal-core --help`` took 7.5 s because torch and transformers were imported first."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(argv=argv)],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert last.startswith("HEAVY= "), (
        f"refusal-core {argv} imported {last!r} (stderr {done.stderr[-300:]!r})"
    )
    assert last.endswith("CODE=0" if argv and argv[-1] in ("--help", "--version") else "CODE=2"), last


def test_the_command_list_matches_the_full_parser() -> None:
    full = cli.build_parser()
    light = cli.build_command_list_parser()

    def helps(parser: Any) -> dict[str, str]:
        sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
        return {c.dest: c.help for c in sub._choices_actions}

    assert helps(light) == helps(full), (
        "refusal-core --help lists the same commands and help as the full parser"
    )


def test_study_help_from_the_cached_table_is_the_full_parsers_help() -> None:
    """``study --help`` is answered from a table of StudyConfig's options; it must be current and
    print exactly what the parser built from the live config classes prints."""
    assert cli.STUDY_OPTIONS_CACHE.read_text(encoding="utf-8") == cli.study_options_cache_text(), (
        "refusal_core/data/study_options.json is stale: run "
        "python -c 'from refusal_core.cli import write_study_options_cache as w; w()'"
    )
    import argparse

    def command_help(parser: argparse.ArgumentParser, name: str) -> str:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return sub.choices[name].format_help()

    light, full = cli.build_study_help_parser(), cli.build_parser()
    for name in ("study", "frontier"):
        assert command_help(light, name) == command_help(full, name), f"{name} --help differs"
