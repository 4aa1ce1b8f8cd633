"""The record of a checkpoint directory: ``refusal_core.json``, which vouches for every other file.

A checkpoint is a Hugging Face directory (what ``from_pretrained`` loads) plus
``refusal_core.json``: a :class:`~refusal_core.saving.records.Record` of kind
:data:`CHECKPOINT_KIND` holding the storage ``format``, the method, the base
model's identity, the package versions, the sha256 of every other file and a
digest of its own content (:data:`RECORD_DIGEST`). This module writes that
record (:func:`seal_checkpoint_dir`, into the directory being built) and reads
it back with every hash checked (:func:`read_checkpoint_record`). Building the
directory from a model is :func:`refusal_core.checkpoint.save_checkpoint`'s
job; loading it, :func:`refusal_core.model.load_model`'s.

Example:
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "config.json").write_text("{}")
    >>> _ = seal_checkpoint_dir(d, identity={}, settings={"method": None}, data={"format": "dense"})
    >>> read_checkpoint_record(d)["format"], is_checkpoint_dir(d)
    ('dense', True)
    >>> _ = (d / "config.json").write_text('{"edited": true}')
    >>> read_checkpoint_record(d)
    Traceback (most recent call last):
    ...
    refusal_core.errors.ArtifactError: checkpoint ...: 'config.json' has sha256 ... after saving)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from refusal_core.errors import ArtifactError, InvalidArgumentError
from refusal_core.saving.files import file_sha256, first_changed_file, json_sha256, read_json
from refusal_core.saving.records import RECORD_KINDS, Record, write_record

__all__ = [
    "CHECKPOINT_FORMATS",
    "CHECKPOINT_KIND",
    "CHECKPOINT_RECORD",
    "CHECKPOINT_VERSION",
    "RECORD_DIGEST",
    "is_checkpoint_dir",
    "read_checkpoint_record",
    "record_digest",
    "seal_checkpoint_dir",
]

#: File name of the record inside a checkpoint directory.
CHECKPOINT_RECORD = "refusal_core.json"
#: ``kind`` of every record.
CHECKPOINT_KIND = "refusal_core.checkpoint"
#: Version of the record layout. Version 2 is the common :class:`~refusal_core.saving.records.Record`
#: layout: the method's record moved from ``record`` to ``settings`` and the file hashes from
#: ``sha256`` to ``files``; version 1 records are read as version 2.
CHECKPOINT_VERSION = RECORD_KINDS[CHECKPOINT_KIND].version
#: The storage formats (see :mod:`refusal_core.checkpoint`).
CHECKPOINT_FORMATS = ("dense", "bitsandbytes-int8", "bitsandbytes-nf4", "dequantized-simulation")
#: Key of the checkpoint record's digest of its own content.
RECORD_DIGEST = "record_sha256"


def record_digest(doc: Mapping[str, Any]) -> str:
    """SHA-256 of a record's content (every key but :data:`RECORD_DIGEST`) as canonical JSON."""
    return json_sha256({k: v for k, v in doc.items() if k != RECORD_DIGEST}, ensure_ascii=False, strict=True)


def seal_checkpoint_dir(
    root: Path, *, identity: Mapping[str, Any], settings: Mapping[str, Any], data: Mapping[str, Any]
) -> Path:
    """Write ``root/refusal_core.json`` vouching for every file now under ``root``; returns its path.

    ``identity`` is the saved model's, ``settings`` the method's record, ``data`` the
    checkpoint's own fields (``format``, ``method``, ``base_identity``, ...). The record's
    digest of its own content is added last.
    """
    files = sorted(p for p in root.rglob("*") if p.is_file())
    unsealed = Record(
        CHECKPOINT_KIND,
        CHECKPOINT_VERSION,
        identity=identity,
        settings=settings,
        files={p.relative_to(root).as_posix(): file_sha256(p) for p in files},
        data=data,
    )
    sealed = {**unsealed.data, RECORD_DIGEST: record_digest(unsealed.to_dict())}
    return write_record(root / CHECKPOINT_RECORD, dataclasses.replace(unsealed, data=sealed))


def is_checkpoint_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a refusal_core checkpoint record (by its ``kind``; nothing verified)."""
    record = Path(path) / CHECKPOINT_RECORD
    if not record.is_file():
        return False
    try:
        doc = read_json(record, "checkpoint record")
    except ArtifactError:
        return False
    return isinstance(doc, dict) and doc.get("kind") == CHECKPOINT_KIND


def read_checkpoint_record(path: str | Path) -> dict[str, Any] | None:
    """The ``refusal_core.json`` of checkpoint directory ``path``, with every file's sha256 checked.

    None for a directory without ``refusal_core.json`` (any other Hugging Face
    directory). Raises :class:`~refusal_core.errors.ArtifactError` when the
    record is malformed, a recorded file is missing, or a hash does not match;
    :class:`~refusal_core.errors.InvalidArgumentError` when ``path`` is not a directory.
    """
    root = Path(path)
    if not root.is_dir():
        raise InvalidArgumentError(f"checkpoint {str(root)!r} is not a directory")
    record_path = root / CHECKPOINT_RECORD
    if not record_path.is_file():
        return None
    raw = read_json(record_path, "checkpoint record")
    if isinstance(raw, dict) and raw.get("kind") == CHECKPOINT_KIND and raw.get("version") == 1:
        raw = _upgrade_v1(raw)
    rec = Record.from_dict(raw, CHECKPOINT_KIND, versions=(CHECKPOINT_VERSION,), where=repr(str(record_path)))
    doc = rec.to_dict()
    # The record vouches for the files; its own digest vouches for the record (a hand-edited
    # "format" used to load a simulated int8 model as a plain float one). Records written before
    # the digest existed have none and are read as before.
    if RECORD_DIGEST in doc and doc[RECORD_DIGEST] != record_digest(doc):
        raise ArtifactError(
            f"{str(record_path)!r} was edited after saving: its content does not match its "
            f"{RECORD_DIGEST} (restore the file or save the checkpoint again)"
        )
    if doc.get("format") not in CHECKPOINT_FORMATS:
        raise ArtifactError(f"{str(record_path)!r}: unknown format {doc.get('format')!r}")
    if not rec.files:
        raise ArtifactError(f"{str(record_path)!r} records no file hashes")
    changed = first_changed_file(root, rec.files)
    if changed is not None:
        rel, actual = changed
        if actual is None:
            raise ArtifactError(f"checkpoint {str(root)!r}: recorded file {rel!r} is missing")
        raise ArtifactError(
            f"checkpoint {str(root)!r}: {rel!r} has sha256 {actual}, the record says {rec.files[rel]} "
            "(the file was changed or corrupted after saving)"
        )
    return doc


def _upgrade_v1(doc: dict[str, Any]) -> dict[str, Any]:
    """A version-1 record in the version-2 layout (``record`` → ``settings``, ``sha256`` → ``files``)."""
    out = {k: v for k, v in doc.items() if k not in ("record", "sha256")}
    out.update(version=CHECKPOINT_VERSION, settings=doc.get("record", {}), files=doc.get("sha256", {}))
    return out
