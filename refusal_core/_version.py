"""The code's version: the package version and, in a git checkout, the commit (no torch import).

Results record where they came from, as lm-eval's results do (``git_hash``), so a number in a
results.json can be traced to the code that produced it.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["__version__", "code_version", "version_line"]

#: The package version (pyproject.toml's ``version``; a test keeps the two equal).
__version__ = "0.1.0"


@functools.lru_cache(maxsize=1)
def _git(*args: str) -> str | None:
    """``git args`` run in the package's source tree; None outside a checkout or without git."""
    root = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,  # git's "fatal: not a git repository" goes nowhere
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """``{"version", "commit", "dirty"}``: commit and dirty are None outside a git checkout."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"version": __version__, "commit": commit, "dirty": None if status is None else bool(status)}


def version_line() -> str:
    """``refusal-core 0.1.0`` plus ``(commit abc1234[, modified])`` in a git checkout."""
    v = code_version()
    if v["commit"] is None:
        return f"refusal-core {v['version']}"
    return f"refusal-core {v['version']} (commit {v['commit'][:12]}{', modified' if v['dirty'] else ''})"
