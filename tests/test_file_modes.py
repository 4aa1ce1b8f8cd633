"""Files others can read: everything refusal_core writes gets the mode the umask gives an ordinary
``open``/``mkdir`` (0644 / 0755 under umask 022), never ``tempfile``'s private 0600 / 0700."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from refusal_core.artifacts import atomic_write_bytes, atomic_write_json, save_artifact
from refusal_core.checkpoint import save_checkpoint
from refusal_core.records import current_umask
from refusal_core.testing.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=lambda m: f"umask-{m:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _check_tree(root: Path, mask: int, what: str) -> None:
    """Every file 0666 & ~mask and every folder (root included) 0777 & ~mask."""
    wrong = []
    for p in [root, *sorted(root.rglob("*"))]:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        if _mode(p) != want:
            wrong.append(f"{p.relative_to(root.parent)} {_mode(p):04o} (want {want:04o})")
    assert not wrong, f"{what} under umask {mask:03o}: wrong modes: {wrong}"


def test_current_umask_reads_without_changing(umask: int) -> None:
    assert current_umask() == umask, "current_umask() must return the umask the process has"
    assert current_umask() == umask, "reading the umask must not change it"


def test_atomic_writes_respect_the_umask(tmp_path: Path, umask: int) -> None:
    out = tmp_path / "run"
    atomic_write_json(out / "results.json", {"a": 1})
    atomic_write_bytes(out / "report.md", b"# report\n")
    save_artifact(out / "art", tensors={"v": torch.ones(3)}, meta={"kind": "test"})
    # The reference: what plain Python gives a new file and folder under the same umask.
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "f").write_text("x")
    assert _mode(tmp_path / "plain" / "f") == 0o666 & ~umask, "the reference file mode"
    _check_tree(out, umask, "atomic_write_json/atomic_write_bytes/save_artifact")


def test_checkpoint_folder_and_files_respect_the_umask(tmp_path: Path, umask: int) -> None:
    model = tiny_model("llama", n_layers=1, d_model=16, n_heads=2)
    out = save_checkpoint(model, tiny_tokenizer(), tmp_path / "ckpt", record={"method": None})
    _check_tree(Path(out), umask, "save_checkpoint")
