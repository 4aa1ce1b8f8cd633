"""The README's quick start runs as written, from a directory that holds only what a fresh clone
puts beside it (the shipped, commented ``study.toml``), and that file is current."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from refusal_core import cli

ROOT = Path(__file__).resolve().parents[1]

#: Smaller prompt counts appended to each command (the last flag wins; the file's values lose to
#: flags), so the commands as written run in minutes on the toy; nothing else is changed.
SMALL: dict[str, list[str]] = {
    "compress": ["--n-calibration", "8"],
    "extract": ["--n", "8", "--n-val", "8", "--n-calibration", "8"],
    "evaluate": ["--n-test", "4", "--max-new-tokens", "6"],
    "audit": ["--n-train", "8", "--n-val", "4", "--n-test", "4", "--max-new-tokens", "6"],
    "study": [
        "--n-train", "8", "--n-val", "4", "--n-test", "4", "--n-calibration", "8", "--noise-splits", "2",
        "--max-new-tokens", "6", "--attacks-gcg-prompts", "0", "--zero-shot-tasks", "",
        "--repair-gains", "2.0",
    ],
}  # fmt: skip


def quick_start_commands() -> list[str]:
    """The command lines of the README's quick-start code block, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Quick start.*?```bash\n(.*?)```", text, re.S | re.M)
    assert section, "README.md has a '## Quick start' section with a bash block"
    return [line for line in section.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_shipped_study_toml_is_the_commented_example_and_reads_back() -> None:
    shipped = ROOT / "study.toml"
    assert shipped.is_file(), "study.toml ships at the repository root (the quick start names it)"
    assert shipped.read_text(encoding="utf-8") == cli.example_config_text(), (
        "study.toml is stale: regenerate it with "
        "python -c \"from refusal_core.cli import write_example_config as w; w('study.toml')\""
    )
    config = cli.resolve_study_config(str(shipped), {})
    assert config == cli.example_study_config(), "study.toml reads back as the example config"
    text = shipped.read_text(encoding="utf-8")
    missing = [o.key for o in cli._study_options() if f"\n{o.path[-1]} = " not in text]
    assert not missing, f"settings study.toml does not show: {missing}"
    comments = sum(1 for line in text.splitlines() if line.startswith("# "))
    assert comments >= len(cli._study_options()), "every setting has a comment saying what it does"


def test_quick_start_names_the_shipped_config() -> None:
    commands = quick_start_commands()
    study = [c for c in commands if c.startswith("refusal-core study")]
    assert study, f"the quick start runs a study: {commands}"
    config = shlex.split(study[0], comments=True)
    assert (ROOT / config[config.index("--config") + 1]).is_file(), f"{study[0]!r} names a shipped file"


@pytest.mark.slow
def test_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    shutil.copy(ROOT / "study.toml", tmp_path / "study.toml")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    for line in quick_start_commands():
        argv = shlex.split(line, comments=True)
        if argv[0] == "refusal-core":
            argv = [sys.executable, "-m", "refusal_core.cli", *argv[1:], *SMALL.get(argv[1], [])]
        elif argv[0] == "python":
            argv = [sys.executable, *argv[1:]]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"quick start {line!r} exited {done.returncode}: {done.stderr[-1500:]}"
    assert (tmp_path / "runs" / "study" / "report.md").is_file(), "the study wrote its report"
    assert (tmp_path / "ckpt" / "wanda+aird" / "refusal_core.json").is_file(), "aird wrote its checkpoint"
