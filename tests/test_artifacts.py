"""Atomic, hash-verified artifacts: round trip, corruption, edits, schemas, write order,
identity/settings mismatch, stage keys and stage file hashes, non-finite models."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import refusal_core.artifacts as artifacts
import refusal_core.saving.artifacts as saving_artifacts
import refusal_core.saving.files as files
from refusal_core.artifacts import (
    NUMBER,
    StageStore,
    check_finite_model,
    dict_of,
    list_of,
    load_artifact,
    optional,
    save_artifact,
    save_model_weights,
    settings_key,
    validate_json,
)
from refusal_core.errors import ArtifactError, NonFiniteError
from refusal_core.study.schemas import EVALUATION_SCHEMA
from refusal_core.testing.tiny import tiny_model


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
    save_artifact(tmp_path / "y", tensors={"a": torch.zeros(3)}, meta={})
    # Same names, shapes and dtype: only the recorded file hash tells them apart.
    (tmp_path / "x.safetensors").write_bytes((tmp_path / "y.safetensors").read_bytes())
    with pytest.raises(ArtifactError, match=r"x\.safetensors is corrupt or was replaced"):
        load_artifact(tmp_path / "x")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_json_records_the_sha256_of_the_tensor_file(tmp_path: Path) -> None:
    save_artifact(tmp_path / "x", tensors={"a": torch.arange(5.0)}, meta={})
    header = json.loads((tmp_path / "x.json").read_text())
    assert header["files"] == {"x.safetensors": _sha256(tmp_path / "x.safetensors")}, (
        f"x.json must record hashlib's sha256 of x.safetensors: {header['files']}"
    )


def test_one_flipped_bit_in_the_tensor_file_is_detected(tmp_path: Path) -> None:
    save_artifact(tmp_path / "x", tensors={"a": torch.arange(8.0)}, meta={})
    path = tmp_path / "x.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # an exponent bit of the last float32: still a valid file, a different value
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"x\.safetensors is corrupt"):
        load_artifact(tmp_path / "x")


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h["meta"].__setitem__("n", 7),
        lambda h: h["meta"].pop("n"),
        lambda h: h["identity"].__setitem__("m", "other"),
        lambda h: h["tensors"].__setitem__("a", [3]),
        lambda h: h["files"].__setitem__("x.safetensors", "0" * 64),
    ],
    ids=["meta value", "removed meta key", "identity", "recorded shape", "recorded file hash"],
)
def test_edited_json_is_detected(tmp_path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    save_artifact(tmp_path / "x", tensors={"a": torch.ones(2)}, meta={"n": 3}, identity={"m": "tiny"})
    header = json.loads((tmp_path / "x.json").read_text())
    edit(header)
    (tmp_path / "x.json").write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
    with pytest.raises(ArtifactError, match=r"x\.json was modified"):
        load_artifact(tmp_path / "x")


def test_crash_between_tensors_and_json_leaves_no_silent_mix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_artifact(tmp_path / "x", tensors={"a": torch.ones(3)}, meta={"version": "old"})

    def killed(path: Path, obj: object) -> None:
        raise KeyboardInterrupt("killed between the tensor file and its JSON")

    monkeypatch.setattr(saving_artifacts, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(tmp_path / "x", tensors={"a": torch.zeros(3)}, meta={"version": "new"})
    monkeypatch.undo()
    # New tensors, old JSON: same names and shapes, so only the file hash can tell.
    with pytest.raises(ArtifactError, match="corrupt or was replaced"):
        load_artifact(tmp_path / "x")


def test_tensors_are_moved_into_place_before_their_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    real = os.replace

    def recording(src: str, dst: str) -> None:
        order.append(Path(dst).name)
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", recording)
    save_artifact(tmp_path / "x", tensors={"a": torch.ones(3)}, meta={})
    assert order == ["x.safetensors", "x.json"], f"files moved into place in this order: {order}"


def test_meta_schema_and_header_schema(tmp_path: Path) -> None:
    save_artifact(tmp_path / "x", meta={"n": 3, "name": "a", "flag": True})
    assert load_artifact(tmp_path / "x", meta_schema={"n": int, "name": str}).meta["n"] == 3
    with pytest.raises(ArtifactError, match="required key 'count' is missing"):
        load_artifact(tmp_path / "x", meta_schema={"count": int})
    with pytest.raises(ArtifactError, match="'name' must be int"):
        load_artifact(tmp_path / "x", meta_schema={"name": int})
    with pytest.raises(ArtifactError, match="'flag' must be int or float, got a bool"):
        load_artifact(tmp_path / "x", meta_schema={"flag": NUMBER})
    header = json.loads((tmp_path / "x.json").read_text())
    del header["files"]
    (tmp_path / "x.json").write_text(json.dumps(header))
    with pytest.raises(ArtifactError, match="required key 'files' is missing"):
        load_artifact(tmp_path / "x")
    header["version"] = 1
    (tmp_path / "x.json").write_text(json.dumps(header))
    with pytest.raises(ArtifactError, match="version 1; this version reads"):
        load_artifact(tmp_path / "x")
    legacy = {k: v for k, v in header.items() if k not in ("kind", "version")}
    (tmp_path / "x.json").write_text(json.dumps({**legacy, "format_version": 1}))
    with pytest.raises(ArtifactError, match="version 1; this version reads"):
        load_artifact(tmp_path / "x")


def test_validate_json_nested_specs() -> None:
    schema = {"rates": dict_of(NUMBER), "sizes": list_of(int), "maybe": optional(str), "sub": {"k": str}}
    validate_json(
        {"rates": {"a": 0.5, "b": 1}, "sizes": [1, 2], "maybe": None, "sub": {"k": "v"}}, schema, "doc"
    )
    bad = [
        (
            {"rates": {"a": "0.5"}, "sizes": [], "maybe": None, "sub": {"k": ""}},
            r"doc: 'rates'\['a'\] must be",
        ),
        ({"rates": {}, "sizes": [1, 2.0], "maybe": None, "sub": {"k": ""}}, r"doc: 'sizes'\[1\] must be int"),
        ({"rates": {}, "sizes": [], "maybe": 3, "sub": {"k": ""}}, "'maybe' must be str"),
        ({"rates": {}, "sizes": [], "maybe": None, "sub": {}}, "required key 'k' is missing"),
        ({"rates": [], "sizes": [], "maybe": None, "sub": {"k": ""}}, "'rates' must be an object"),
    ]
    for doc, needle in bad:
        with pytest.raises(ArtifactError, match=needle):
            validate_json(doc, schema, "doc")
    with pytest.raises(ArtifactError, match="doc must be a JSON object"):
        validate_json([], schema, "doc")


def test_study_evaluation_schema_refuses_what_the_report_cannot_use() -> None:
    good = {
        "jailbroken": {"vanilla": [True, False]},
        "asr_per_config": {"vanilla": {"greedy": 0.5}},
        "refused_harmless": [False, False],
        "degenerate": {"harmless": 0, "vanilla": 1},
        "damage": {"kl_per_prompt": [0.0, 0.1], "ce_per_prompt": [0.2, 0.3], "ce_prompts": [0, 1]},
        "accuracy": {"rc_arithmetic": {"accuracy": 0.5, "stderr": 0.1, "n": 40}},
    }
    validate_json(good, EVALUATION_SCHEMA, "evaluation.json")
    for change, needle in (
        ({}, None),
        ({"refused_harmless": [1, 0]}, "true or false"),
        ({"jailbroken": {"vanilla": "yes"}}, "must be an array"),
        ({"asr_per_config": {"vanilla": {"greedy": 1.5}}}, "rate in"),
        ({"damage": {**good["damage"], "kl_per_prompt": [float("nan")]}}, "finite number"),
        ({"accuracy": {"t": {"accuracy": 0.5, "stderr": None, "n": -1}}}, "count"),
    ):
        doc = {**good, **change} if change else {}
        with pytest.raises(ArtifactError, match=needle or "required key"):
            validate_json(doc, EVALUATION_SCHEMA, "evaluation.json")


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


def test_stage_store_records_and_verifies_file_hashes(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    d = store.stage_dir("s")
    (d / "a.json").write_text('{"x": 1}')
    (d / "b.bin").write_bytes(b"\x00\x01")
    store.mark_done("s", "k")
    marker = json.loads((d / "stage.json").read_text())
    assert marker["files"] == {"a.json": _sha256(d / "a.json"), "b.bin": _sha256(d / "b.bin")}, (
        f"mark_done records hashlib's sha256 of every file: {marker['files']}"
    )
    assert store.verify("s") == marker["files"], "verify returns the recorded hashes"
    with pytest.raises(ArtifactError, match="completed with key k, not k2"):
        store.verify("s", "k2")
    assert store.is_done("s", "k"), "an untouched stage is done"
    (d / "extra.txt").write_text("added later")
    assert store.is_done("s", "k"), "a file the marker does not record is ignored"
    (d / "b.bin").write_bytes(b"\x00\x02")
    assert not store.is_done("s", "k"), "a modified file makes the stage not done"
    with pytest.raises(ArtifactError, match=r"stage s: file .*b\.bin was modified"):
        store.verify("s")
    (d / "b.bin").unlink()
    with pytest.raises(ArtifactError, match=r"stage s: file .*b\.bin is missing"):
        store.verify("s")


def test_stage_store_records_only_what_the_compute_wrote(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    d = store.stage_dir("s")
    (d / "leftover.json").write_text("{}")
    (d / "rewritten.json").write_text('{"v": 1}')
    stamps = store.file_stamps("s")
    artifacts.atomic_write_json(d / "rewritten.json", {"v": 2})
    (d / "new.json").write_text("{}")
    store.mark_done("s", "k", unchanged_since=stamps)
    recorded = set(json.loads((d / "stage.json").read_text())["files"])
    assert recorded == {"rewritten.json", "new.json"}, f"files recorded after the compute: {recorded}"


def test_output_key_follows_the_files(tmp_path: Path) -> None:
    keys = []
    for i, content in enumerate((b"same", b"same", b"other")):
        store = StageStore(tmp_path / str(i))
        (store.stage_dir("s") / "out.bin").write_bytes(content)
        store.mark_done("s", "k", {"seconds": float(i)})
        keys.append(store.output_key("s"))
    assert keys[0] == keys[1], "identical files (another run, other timing) give the same output key"
    assert keys[0] != keys[2], "different files give a different output key"
    store.invalidate("s")
    assert store.recorded_key("s") is None, "invalidate removes the marker"
    assert not store.is_done("s", "k"), "an invalidated stage is not done"
    with pytest.raises(ArtifactError, match="not marked done"):
        store.output_key("s")


def test_check_finite_model_names_the_offending_tensor() -> None:
    model = tiny_model("llama", n_layers=2, seed=0)
    check_finite_model(model)  # a finite model passes
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 4] = float("inf")
        model.model.layers[0].post_attention_layernorm.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match="2 tensor") as info:
        check_finite_model(model)
    msg = str(info.value)
    assert "model.layers.1.self_attn.o_proj.weight" in msg, msg
    assert "model.layers.0.post_attention_layernorm.weight" in msg, msg


def test_check_finite_model_sees_buffers() -> None:
    model = tiny_model("llama", n_layers=2, seed=0)
    model.register_buffer("scale_probe", torch.tensor([1.0, float("-inf")]))
    with pytest.raises(NonFiniteError, match="scale_probe"):
        check_finite_model(model)


def test_save_model_weights_refuses_non_finite_before_writing(tmp_path: Path) -> None:
    model = tiny_model("llama", n_layers=2, seed=0)
    path = tmp_path / "w" / "weights.safetensors"
    digest = save_model_weights(model, path)
    assert digest == _sha256(path), "save_model_weights returns the written file's sha256"
    before = path.read_bytes()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="down_proj"):
        save_model_weights(model, path)
    assert path.read_bytes() == before, "the previous weights are untouched"
    assert sorted(p.name for p in path.parent.iterdir()) == ["weights.safetensors"], "no temp file left"
