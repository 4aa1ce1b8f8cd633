"""Atomic artifacts: round trip, corruption, identity/settings mismatch, stage keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refusal_core.artifacts import StageStore, load_artifact, save_artifact, settings_key
from refusal_core.errors import ArtifactError


def test_roundtrip(tmp_path: Path) -> None:
    t = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float64)}
    save_artifact(tmp_path / "x", tensors=t, meta={"k": 1}, identity={"m": "tiny"}, settings={"s": 2})
    art = load_artifact(tmp_path / "x", expect_identity={"m": "tiny"}, expect_settings={"s": 2})
    assert art.meta == {"k": 1}, art
    assert art.identity == {"m": "tiny"}, art
    assert art.settings == {"s": 2}, art
    assert all(torch.equal(art.tensors[k], t[k]) for k in t), "tensors survive a round trip"
    assert not list(tmp_path.glob(".*tmp")), "no temporary files are left behind"


def test_mismatch_and_corruption_raise(tmp_path: Path) -> None:
    save_artifact(tmp_path / "x", tensors={"a": torch.ones(3)}, meta={}, identity={"m": 1}, settings={"s": 1})
    with pytest.raises(ArtifactError, match="identity"):
        load_artifact(tmp_path / "x", expect_identity={"m": 2})
    with pytest.raises(ArtifactError, match="settings"):
        load_artifact(tmp_path / "x", expect_settings={"s": 3})
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(tmp_path / "x")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(tmp_path / "x")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "missing")


def test_tensor_file_swapped_for_another_is_detected(tmp_path: Path) -> None:
    save_artifact(tmp_path / "x", tensors={"a": torch.ones(3)}, meta={})
    save_artifact(tmp_path / "y", tensors={"a": torch.ones(4)}, meta={})
    (tmp_path / "x.safetensors").write_bytes((tmp_path / "y.safetensors").read_bytes())
    with pytest.raises(ArtifactError, match="records"):
        load_artifact(tmp_path / "x")


def test_settings_key_is_stable_and_chained() -> None:
    a = settings_key({"x": 1, "y": [1, 2]})
    assert a == settings_key({"y": [1, 2], "x": 1}), "key order does not matter"
    assert a != settings_key({"x": 2, "y": [1, 2]}), "a changed setting changes the key"
    assert settings_key({"x": 1}, a) != settings_key({"x": 1}, "other"), "upstream keys chain"


def test_stage_store(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    assert not store.is_done("s", "k1"), "nothing is done at first"
    store.mark_done("s", "k1", {"seconds": 1.5})
    assert store.is_done("s", "k1"), "done for the same key"
    assert not store.is_done("s", "k2"), "not done for another key"
    assert store.seconds("s") == 1.5, "the recorded time is kept"
    (tmp_path / "s" / "stage.json").write_text("{broken")
    assert not store.is_done("s", "k1"), "a broken marker means not done"
