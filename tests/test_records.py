"""The one record type, the one atomic writer and the one JSON reader (refusal_core.saving; the
older path refusal_core.records names the same objects)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import refusal_core.saving.files as files
from refusal_core.errors import ArtifactError
from refusal_core.records import (
    Record,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_with,
    read_json,
    read_record,
    write_record,
)

HASH = "ab" * 32


def _record() -> Record:
    return Record(
        "DamageResult",
        2,
        identity={"class": "Toy", "fingerprint": [0.5, 1.25]},
        settings={"batch_size": 4, "pair": (1, 2)},
        files={"weights.safetensors": HASH},
        data={"n": 3, "kl_mean": None, "base_identity": {"class": "Base"}},
    )


def test_to_dict_is_flat_and_from_dict_inverts_it() -> None:
    rec = _record()
    doc = rec.to_dict()
    assert {k: doc[k] for k in ("kind", "version", "files")} == {
        "kind": "DamageResult",
        "version": 2,
        "files": {"weights.safetensors": HASH},
    }, f"common keys as written: {doc}"
    assert doc["identity"] == {"class": "Toy", "fingerprint": [0.5, 1.25]}, f"identity as written: {doc}"
    assert doc["settings"]["pair"] == [1, 2], "a tuple is not stored as its JSON list"
    assert (doc["n"], doc["base_identity"]) == (3, {"class": "Base"}), f"kind's fields not flat: {doc}"
    back = Record.from_dict(json.loads(json.dumps(doc)), "DamageResult")
    assert back == rec, f"to_dict/from_dict changed the record: {back} != {rec}"
    doc["n"] = 99
    assert rec.data["n"] == 3, "to_dict handed out the record's own dict"


def test_write_then_read_gives_the_record_back(tmp_path: Path) -> None:
    rec = _record()
    path = write_record(tmp_path / "sub" / "r.json", rec)
    assert read_record(path, "DamageResult") == rec, "write_record/read_record changed the record"
    text = path.read_text()
    assert text.endswith("\n"), "no trailing newline"
    assert json.loads(text)["kind"] == "DamageResult", text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "a record is a JSON object"),
        ('{"kind": "AirdRecord", "version": 2}', "kind 'AirdRecord' is not a DamageResult"),
        ('{"version": 2}', "kind None is not a DamageResult"),
        ('{"kind": "DamageResult", "version": 7}', "version 7 is not readable"),
        ('{"kind": "DamageResult", "version": true}', "version True is not readable"),
        ('{"kind": "DamageResult", "version": 2, "identity": [1]}', "identity must be a JSON object"),
        ('{"kind": "DamageResult", "version": 2, "files": {"w": "nothex"}}', "not a hex SHA-256"),
    ],
)
def test_read_rejects_bad_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "r.json"
    path.write_text(text)
    with pytest.raises(ArtifactError, match=message):
        read_record(path, "DamageResult")


def test_missing_file_is_an_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        read_json(tmp_path / "nothing.json", "result")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Record("NoSuchKind", 1), "unknown record kind"),
        (lambda: Record("DamageResult", 9), "version 9 is not supported"),
        (lambda: Record("DamageResult", 2, data={"identity": {}}), "clash with the common keys"),
        (lambda: Record("DamageResult", 2, settings={"f": object()}), "not JSON-serializable"),
        (lambda: Record("DamageResult", 2, files={"w": 12}), "not a hex SHA-256"),
    ],
)
def test_bad_records_are_refused_before_anything_is_written(tmp_path: Path, build, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(ArtifactError, match=message):
        write_record(path, build())
    assert path.read_text() == "old", "a refused record touched the file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"], "a temp file was left behind"


def test_strict_write_refuses_nan_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text("old")
    rec = Record("DamageResult", 2, data={"kl_mean": float("nan")})
    with pytest.raises(ArtifactError, match="not strict JSON"):
        write_record(path, rec)
    assert path.read_text() == "old", "a record with NaN overwrote the file"
    write_record(path, rec, strict=False)
    assert "NaN" in path.read_text(), "strict=False did not write the NaN"
    with pytest.raises(ArtifactError, match="needs a Record"):
        write_record(path, rec.to_dict())  # type: ignore[arg-type]


def test_atomic_json_keeps_the_old_file_when_serialisation_fails(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(path, {"a": 1, "z": object()})  # fails after "a" was serialised
    assert json.loads(path.read_text()) == {"v": 1}, "a failed serialisation replaced the file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"], "a temp file was left behind"


def test_atomic_write_keeps_the_old_file_when_the_write_fails_midway(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    atomic_write_bytes(path, b"old contents")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(path, half_then_fail)
    assert path.read_bytes() == b"old contents", "a write that failed midway replaced the file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"], "a temp file was left behind"


def test_atomic_write_fsyncs_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = files.os.fsync, files.os.replace

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    atomic_write_bytes(tmp_path / "x", b"data")
    assert events == ["fsync", "replace"], f"write order {events}"


def test_every_migrated_writer_writes_a_readable_record(tmp_path: Path) -> None:
    """The five savers all produce a file that read_record accepts as their kind."""
    import torch

    from refusal_core.aird import apply_aird_
    from refusal_core.artifacts import save_artifact
    from refusal_core.checkpoint import CHECKPOINT_RECORD, save_checkpoint
    from refusal_core.evaluation.damage import DamageResult
    from refusal_core.model import model_identity
    from refusal_core.quantized_edit import apply_aird_quantized_
    from refusal_core.testing.tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama")
    ident = model_identity(model)
    save_artifact(tmp_path / "a", tensors={"t": torch.ones(2)}, meta={"n": 1}, identity=ident)
    art = json.loads((tmp_path / "a.json").read_text())
    art.pop("sha256")
    assert Record.from_dict(art, "refusal_core.artifact").identity == ident, "artifact identity"
    ckpt = save_checkpoint(model, tiny_tokenizer(), tmp_path / "ckpt", record={"method": None})
    assert read_record(ckpt / CHECKPOINT_RECORD, "refusal_core.checkpoint").identity == ident, "checkpoint"
    aird = apply_aird_(model, torch.randn(32, generator=torch.Generator().manual_seed(0)), 0)
    assert read_record(aird.save(tmp_path / "aird.json"), "AirdRecord").data["model"] == aird.model
    from refusal_core.compression import Int8Config, compress_

    compress_(model, Int8Config())
    q = apply_aird_quantized_(model, torch.ones(32), 1, requantize=True)
    assert read_record(q.save(tmp_path / "q.json"), "QuantizedEditRecord").data["operation"] == "aird"
    dmg = DamageResult(0.1, [0.1], 1.0, [1.0], 0.9, 1, [0.9], {"class": "B"}, {"class": "M"})
    assert read_record(dmg.save(tmp_path / "d.json"), "DamageResult").identity == {"class": "M"}


def test_legacy_versions_are_still_read(tmp_path: Path) -> None:
    """Version-2 artifacts (``format_version``), version-1 damage results and checkpoints load."""
    import hashlib

    from refusal_core.artifacts import load_artifact
    from refusal_core.checkpoint import CHECKPOINT_RECORD, read_checkpoint_record, save_checkpoint
    from refusal_core.evaluation.damage import DamageResult
    from refusal_core.testing.tiny import tiny_model, tiny_tokenizer

    body = {
        "format_version": 2,
        "identity": {"m": 1},
        "settings": {},
        "meta": {"n": 3},
        "tensors": {},
        "files": {},
    }
    body["sha256"] = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    (tmp_path / "old.json").write_text(json.dumps(body))
    art = load_artifact(tmp_path / "old", expect_identity={"m": 1})
    assert (art.meta, art.identity) == ({"n": 3}, {"m": 1}), f"version-2 artifact read as {art}"
    old = {
        "kind": "DamageResult",
        "version": 1,
        "n": 1,
        "kl_mean": 0.5,
        "ce_mean": 1.0,
        "ce_base_mean": 0.75,
        "kl_per_prompt": [0.5],
        "ce_per_prompt": [1.0],
        "model": {"class": "M"},
        "base_model": {"class": "B"},
    }
    res = DamageResult.from_dict(old)
    assert (res.identity, res.base_identity, res.kl_mean) == ({"class": "M"}, {"class": "B"}, 0.5), res
    ckpt = save_checkpoint(tiny_model("llama"), tiny_tokenizer(), tmp_path / "ckpt", record={"method": None})
    new = json.loads((ckpt / CHECKPOINT_RECORD).read_text())
    v1 = {k: v for k, v in new.items() if k not in ("settings", "files")}
    v1.update(version=1, record=new["settings"], sha256=new["files"])
    (ckpt / CHECKPOINT_RECORD).write_text(json.dumps(v1))
    doc = read_checkpoint_record(ckpt)
    assert doc == new, f"a version-1 checkpoint record reads as {doc}, not as the version-2 {new}"
