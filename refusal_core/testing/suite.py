"""Run the property suite against an outside implementation, from a checkout or a plain install.

The suite ships in the wheel as the package ``refusal_core.testing.properties``
(in a checkout it is the ``properties/`` folder, mapped onto that name by
``setup.py``), so ``pip install refusal_core`` is enough::

    refusal-core oracle mypkg.refusal_ops            # the whole suite against mypkg.refusal_ops
    refusal-core oracle mypkg.refusal_ops -k ablate  # any pytest arguments after the module

:func:`run_oracle` runs pytest in a fresh interpreter with
``REFUSAL_CORE_IMPL`` set (see :mod:`refusal_core.testing.oracle`), from the
caller's working directory (so a module there imports), with the caller's own
pytest configuration kept out, and returns pytest's exit code.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from refusal_core.errors import ImplementationError, InvalidArgumentError
from refusal_core.testing.oracle import ENV_VAR

__all__ = ["SUITE_PACKAGE", "run_oracle", "suite_directory"]

#: The property suite's package name in an installed wheel.
SUITE_PACKAGE = "refusal_core.testing.properties"


def suite_directory() -> Path:
    """The folder holding the property suite: the installed package, else a checkout's ``properties/``."""
    try:
        spec = importlib.util.find_spec(SUITE_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    checkout = Path(__file__).resolve().parents[2] / "properties"
    if (checkout / "conftest.py").is_file():
        return checkout
    raise ImplementationError(
        f"the property suite is not installed ({SUITE_PACKAGE} not found) and this is no checkout"
    )


def run_oracle(module: str, pytest_args: Sequence[str] = (), *, cwd: str | Path | None = None) -> int:
    """Run the property suite against ``module`` (comma-separated for several); pytest's exit code.

    ``pytest_args`` follow the suite's path (``-k``, ``-x``, ``-m bad_input``, ...). The module's
    import is checked first, in the caller's
    working directory, so a typo fails with one line instead of a collection error.
    """
    if not isinstance(module, str) or not module.strip():
        raise InvalidArgumentError(f"module must name a Python module, got {module!r}")
    where = Path.cwd() if cwd is None else Path(cwd)
    suite = suite_directory()
    env = dict(os.environ)
    env[ENV_VAR] = module
    # the caller's directory first, so that their module (and nothing of a checkout) is imported
    env["PYTHONPATH"] = os.pathsep.join([str(where), *filter(None, [env.get("PYTHONPATH")])])
    check = "from refusal_core.testing.oracle import load_implementations as f; f()"
    probe = subprocess.run(
        [sys.executable, "-c", check], cwd=where, env=env, capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise ImplementationError(f"{module!r} cannot be checked: {last}")
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(suite),
        "-c",
        os.devnull,  # none of the caller's pytest settings (addopts, plugins) reach the suite
        "--rootdir",
        str(suite.parent),
        "-p",
        "no:cacheprovider",
        *pytest_args,
    ]
    return subprocess.run(command, cwd=where, env=env, check=False).returncode
