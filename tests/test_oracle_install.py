"""``refusal-core oracle`` from a plain install: build the wheel, install it into a fresh venv, run
the property suite from a folder outside the checkout against a correct and a wrong module.

The venv sees the test interpreter's site-packages (torch, hypothesis, ...) but gets refusal_core
only from the wheel (``pip install --no-deps``); the run starts in a temporary folder with no
``PYTHONPATH``, so nothing of the checkout can be imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
META = ROOT / "tests" / "meta_impls"

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REFUSAL_CORE_IMPL")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with refusal_core installed from a wheel built off a copy of the sources."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("refusal_core", "properties"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    wheels = tmp / "wheels"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
        check=True,
        env=_env(),
    )
    (wheel,) = wheels.glob("refusal_core-*.whl")
    env_dir = tmp / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # The test interpreter may itself be a venv, whose packages --system-site-packages does not
    # reach: add its site-packages after the new venv's own (a plain path line processes no .pth
    # there, so an editable refusal_core of the checkout stays invisible).
    own = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    parent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(own) / "_test_interpreter.pth").write_text("".join(f"{p}\n" for p in sorted(parent)))
    subprocess.run(
        [*pip, "--python", str(py), "install", "--no-deps", "-q", str(wheel)], check=True, env=_env()
    )
    return env_dir


def _oracle(env_dir: Path, module_file: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    work = tmp_path / "outside"
    work.mkdir()
    shutil.copy(module_file, work / "my_ops.py")
    return subprocess.run(
        [str(env_dir / "bin" / "refusal-core"), "oracle", "my_ops", "-p", "no:xdist", *args],
        cwd=work,
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
    )


def test_installed_suite_comes_from_the_wheel(installed: Path) -> None:
    out = subprocess.run(
        [
            str(installed / "bin" / "python"),
            "-c",
            "from refusal_core.testing.suite import suite_directory as s; print(s())",
        ],
        cwd=installed,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert str(installed) in out, f"the suite was found at {out}, not in the venv"
    assert "site-packages" in out, f"the suite was found at {out}, not in an installed package"


def test_a_correct_module_passes(installed: Path, tmp_path: Path) -> None:
    res = _oracle(installed, META / "correct_float32.py", tmp_path, "-k", "ablat or cosine")
    assert res.returncode == 0, (
        f"correct module failed the installed suite:\n{res.stdout[-3000:]}{res.stderr[-2000:]}"
    )
    assert "implementation under test: my_ops" in res.stdout, res.stdout[-2000:]
    assert " passed" in res.stdout, res.stdout[-2000:]


def test_a_wrong_module_fails(installed: Path, tmp_path: Path) -> None:
    res = _oracle(installed, META / "wrong_ablate_sign.py", tmp_path, "-k", "ablat", "-x")
    assert res.returncode == 1, (
        f"a wrong ablate passed the installed suite (exit {res.returncode}):\n{res.stdout[-3000:]}"
    )
    assert "failed" in res.stdout, res.stdout[-2000:]
