"""The one saving layer (refusal_core.saving): every on-disk format it writes, byte for byte.

The expected SHA-256 values were taken from the writers before they moved into
``refusal_core.saving`` (records.py, artifacts.py, checkpoint.py, the ASR file of
evaluation/results.py each wrote their own files then): a move that changes one byte of
any file a user or a resumed study reads again fails here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from refusal_core.aird import AirdConfig, apply_aird_
from refusal_core.artifacts import StageStore, save_artifact
from refusal_core.checkpoint import CHECKPOINT_RECORD, save_checkpoint
from refusal_core.evaluation.results import AsrResult, AttackResult, Attempt
from refusal_core.records import Record, atomic_write_json, write_record
from refusal_core.testing.tiny import tiny_model, tiny_tokenizer


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


#: file -> sha256 of what the writers produced before the saving layer existed
EXPECTED: dict[str, str] = {
    "aird.json": "ae1717094f4b9899c0d851e085fccad7ce0233a729d8f42608bf4f1afc9f263b",
    "artifact.json": "3a0d4e388441d832a3349607faddc86f732d7a26ef61a0ef43aa1b98cff22413",
    "artifact.safetensors": "0ae3aa89b32dc0cb5ae5ef80d9fe90747eb3080f3a6ab0a53ffed8798ebafe5c",
    "asr.json": "819df8ca9e7ed957dd8871f8d5275eed7c18c023609b35019c0c562f7d2f699f",
    "meta_only.json": "5515802ef4fb62ab606a6603da789ad8a9a9e5f8bb9d703acb561219024fb136",
    "plain.json": "8157a1b5747a2f59b1df64ee9bec11aa51f4e838eb3bbcad180672a1e1a4f513",
    "record.json": "3127c9af065fd593340bb055f1bbf23c03397439958a8dbac296e21157ebef5f",
    "stages/base/stage.json": "02f851ecf38bb3f1bbaa12eeaf35e133ac400397933656ed4e5f603cd954807d",
    "stages/base/x.json": "4a48c7348d7982e297f57d640574d85d03aade6d7d7cd6c6ae2d0806bff62219",
}


def _write_every_format(root: Path) -> None:
    identity = {"class": "Tiny", "fingerprint": [0.5, 1.25], "dtype": "float32"}
    save_artifact(
        root / "artifact",
        tensors={"r": torch.arange(6.0).reshape(2, 3), "n": torch.ones(2, dtype=torch.float64)},
        meta={"layer": 1, "score": -0.25, "names": ["a", "b"]},
        identity=identity,
        settings={"n": 4, "seed": 0},
    )
    save_artifact(root / "meta_only", meta={"k": 1})
    write_record(
        root / "record.json",
        Record("DamageResult", 2, identity=identity, settings={"pair": (1, 2)}, data={"kl": 0.125}),
    )
    atomic_write_json(root / "plain.json", {"b": [1, 2.5], "a": {"nan": float("nan")}})
    store = StageStore(root / "stages")
    (store.stage_dir("base") / "x.json").write_text('{"v": 1}\n')
    store.mark_done("base", "0123456789abcdef", {"seconds": 1.5})
    AsrResult(
        "vanilla",
        "substring",
        [AttackResult("Hi", [Attempt({"t": 0}, "Sure", True)]), AttackResult("No", [])],
        settings={"max_new_tokens": 8},
        model=identity,
    ).save(root / "asr.json")
    r = torch.linspace(-1.0, 1.0, 32, dtype=torch.float64)
    apply_aird_(tiny_model("llama"), r, 1, AirdConfig()).save(root / "aird.json")


def test_every_format_is_written_byte_for_byte_as_before(tmp_path: Path) -> None:
    _write_every_format(tmp_path)
    got = _files(tmp_path)
    assert got == EXPECTED, "the bytes of a saved file changed:\n" + "\n".join(
        f"  {k}: {got.get(k)} (was {EXPECTED.get(k)})"
        for k in sorted(set(got) | set(EXPECTED))
        if got.get(k) != EXPECTED.get(k)
    )


def _stable_record(doc: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint record without what depends on the installed packages or the machine (package
    versions; the bytes of the files transformers writes; the digest over all of it; identity values,
    which are :func:`~refusal_core.model.model_identity`'s and summed in float)."""
    out = {k: v for k, v in doc.items() if k not in ("packages", "record_sha256")}
    for key in ("files", "identity", "base_identity"):
        out[key] = sorted(doc[key])
    return out


#: sha256 of the canonical JSON of :func:`_stable_record` of a tiny llama's checkpoint record
EXPECTED_CHECKPOINT_RECORD = "469ea0b7c09f973b6df0e16eabadaba737d0d74730433d18081fe7f4e64d4e38"


def test_checkpoint_record_is_written_as_before(tmp_path: Path) -> None:
    path = save_checkpoint(
        tiny_model("llama"), tiny_tokenizer(), tmp_path / "ckpt", record={"method": None, "note": "x"}
    )
    text = (path / CHECKPOINT_RECORD).read_text(encoding="utf-8")
    doc = json.loads(text)
    assert text == json.dumps(doc, indent=2, sort_keys=True) + "\n", "the record's layout changed"
    stable = json.dumps(_stable_record(doc), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(stable.encode()).hexdigest()
    assert digest == EXPECTED_CHECKPOINT_RECORD, f"checkpoint record content changed:\n{stable}"
