"""One record type for everything refusal_core saves: what a saved result says about itself.

A :class:`Record` holds its ``kind`` and layout ``version``, the ``identity`` of
the model it describes (:func:`~refusal_core.model.model_identity`; the one name
for it in every file), the ``settings`` that produced it, the SHA-256 of the
``files`` it vouches for, and the kind's own fields (``data``). On disk it is one
flat JSON object: the five common keys next to the kind's fields, written by
:func:`write_record` through :func:`~refusal_core.saving.files.atomic_write_bytes`.

==============================  =======  ==============================================
kind                            version  written by
==============================  =======  ==============================================
``refusal_core.artifact``       3        :func:`~refusal_core.saving.artifacts.save_artifact`
``refusal_core.checkpoint``     2        :func:`~refusal_core.checkpoint.save_checkpoint`
``AirdRecord``                  2        :meth:`~refusal_core.aird.AirdRecord.save`
``QuantizedEditRecord``         1        :meth:`~refusal_core.quantized_edit.QuantizedEditRecord.save`
``DamageResult``                2        :meth:`~refusal_core.evaluation.damage.DamageResult.save`
==============================  =======  ==============================================

(:data:`RECORD_KINDS` is that table; :func:`register_kind` adds a kind.)

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "r.json"
    >>> rec = Record("DamageResult", 2, identity={"class": "Toy"}, data={"n": 3})
    >>> _ = write_record(path, rec)
    >>> read_record(path, "DamageResult") == rec
    True
    >>> read_record(path, "AirdRecord")
    Traceback (most recent call last):
    ...
    refusal_core.errors.ArtifactError: ...: kind 'DamageResult' is not a AirdRecord record
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from refusal_core.errors import ArtifactError
from refusal_core.saving.files import atomic_write_bytes, json_default, json_text, read_json

__all__ = [
    "COMMON_KEYS",
    "RECORD_KINDS",
    "Record",
    "RecordKind",
    "load_record_as",
    "read_record",
    "register_kind",
    "write_record",
]


_T = TypeVar("_T")

# ----------------------------------------------------------------------------
# kinds
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordKind:
    """A kind of record: the layout ``version`` written now and the ``readable`` versions."""

    version: int
    readable: tuple[int, ...]


#: Every kind of record refusal_core writes (see the module docstring).
RECORD_KINDS: dict[str, RecordKind] = {
    "refusal_core.artifact": RecordKind(3, (2, 3)),
    "refusal_core.checkpoint": RecordKind(2, (1, 2)),
    "AirdRecord": RecordKind(2, (1, 2)),
    "QuantizedEditRecord": RecordKind(1, (1,)),
    "DamageResult": RecordKind(2, (1, 2)),
}


def register_kind(kind: str, version: int, readable: Sequence[int] | None = None) -> RecordKind:
    """Add (or replace) a record kind; returns it. ``readable`` defaults to ``(version,)``."""
    if not isinstance(kind, str) or not kind:
        raise ArtifactError(f"a record kind is a non-empty str, got {kind!r}")
    versions = tuple(readable) if readable is not None else (version,)
    if not _is_count(version) or version not in versions or not all(_is_count(v) for v in versions):
        raise ArtifactError(f"kind {kind!r}: version {version!r} must be an int among readable {versions!r}")
    RECORD_KINDS[kind] = RecordKind(version, versions)
    return RECORD_KINDS[kind]


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ----------------------------------------------------------------------------
# the record
# ----------------------------------------------------------------------------

#: The keys every record has on disk; a kind's own fields may not use them.
COMMON_KEYS = ("kind", "version", "identity", "settings", "files")

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _json_copy(value: Any, where: str) -> Any:
    """A plain-JSON deep copy of ``value`` (tuples become lists, ...); :class:`ArtifactError` if none."""
    try:
        return json.loads(json.dumps(value, default=json_default))
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{where} is not JSON-serializable: {exc}") from None


@dataclass(frozen=True)
class Record:
    """A saved result's self-description (see the module docstring).

    - ``kind``: one of :data:`RECORD_KINDS`; ``version``: one of its readable versions.
    - ``identity``: the model identity of the model the record describes.
    - ``settings``: what produced it (JSON object).
    - ``files``: ``{file name: hex SHA-256}`` of the files it vouches for.
    - ``data``: the kind's own fields; none may be named like a common key.

    Everything is checked when the record is built and copied to plain JSON,
    so a record that exists can be written (:func:`write_record` refuses NaN
    and infinity, which strict JSON has not); a bad one raises
    :class:`ArtifactError` before any file is touched.
    """

    kind: str
    version: int
    identity: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = RECORD_KINDS.get(self.kind) if isinstance(self.kind, str) else None
        if spec is None:
            raise ArtifactError(f"unknown record kind {self.kind!r}; known: {sorted(RECORD_KINDS)}")
        if not _is_count(self.version) or self.version not in spec.readable:
            raise ArtifactError(
                f"{self.kind} record version {self.version!r} is not supported (readable: {spec.readable})"
            )
        for name in ("identity", "settings", "files", "data"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise ArtifactError(
                    f"{self.kind} record: {name} must be a JSON object, got {type(value).__name__}"
                )
            object.__setattr__(self, name, _json_copy(dict(value), f"{self.kind} record: {name}"))
        for name, digest in self.files.items():
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise ArtifactError(
                    f"{self.kind} record: files[{name!r}] is not a hex SHA-256, got {digest!r}"
                )
        clash = sorted(set(self.data) & set(COMMON_KEYS))
        if clash:
            raise ArtifactError(
                f"{self.kind} record: fields {clash} clash with the common keys {COMMON_KEYS}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON object: the common keys and the kind's fields (a fresh copy)."""
        out: dict[str, Any] = json.loads(json.dumps(dict(self.data)))
        out.update(
            kind=self.kind,
            version=self.version,
            identity=json.loads(json.dumps(dict(self.identity))),
            settings=json.loads(json.dumps(dict(self.settings))),
            files=dict(self.files),
        )
        return out

    @classmethod
    def from_dict(
        cls, doc: object, kind: str, *, versions: Sequence[int] | None = None, where: str = "record"
    ) -> Record:
        """The record of a JSON object written by :meth:`to_dict`, checked to be a ``kind`` record.

        ``versions`` narrows the kind's readable versions. A missing common key
        other than ``kind``/``version`` reads as empty (older layouts had none).
        Raises :class:`ArtifactError` naming ``where`` for anything else.
        """
        if not isinstance(doc, Mapping):
            raise ArtifactError(f"{where}: a record is a JSON object, got {type(doc).__name__}")
        if doc.get("kind") != kind:
            raise ArtifactError(f"{where}: kind {doc.get('kind')!r} is not a {kind} record")
        spec = RECORD_KINDS.get(kind)
        allowed = tuple(versions) if versions is not None else (spec.readable if spec else ())
        version = doc.get("version")
        if not _is_count(version) or version not in allowed:
            raise ArtifactError(
                f"{where}: {kind} record version {version!r} is not readable (readable: {allowed})"
            )
        try:
            return cls(
                kind=kind,
                version=int(version),
                identity=doc.get("identity", {}),
                settings=doc.get("settings", {}),
                files=doc.get("files", {}),
                data={k: v for k, v in doc.items() if k not in COMMON_KEYS},
            )
        except ArtifactError as exc:
            raise ArtifactError(f"{where}: {exc}") from None


def write_record(path: str | os.PathLike[str], record: Record, *, strict: bool = True) -> Path:
    """Write ``record`` as JSON to ``path`` atomically; returns the path.

    ``record`` must be a :class:`Record` (validated when it was built); with
    ``strict`` a NaN or infinity in it is refused. Either raises
    :class:`ArtifactError` before anything is written.
    """
    if not isinstance(record, Record):
        raise ArtifactError(f"write_record needs a Record, got {type(record).__name__}")
    try:
        text = json_text(record.to_dict(), strict=strict)
    except ValueError as exc:
        raise ArtifactError(f"{record.kind} record for {str(path)!r} is not strict JSON: {exc}") from None
    return atomic_write_bytes(path, text.encode())


def load_record_as(path: str | os.PathLike[str], kind: str, parse: Callable[[Any], _T]) -> _T:
    """``parse`` of the JSON in ``path`` (e.g. a class's ``from_dict``); any :class:`ArtifactError`
    of reading or parsing names the file."""
    doc = read_json(path, f"{kind} file")
    try:
        return parse(doc)
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from exc


def read_record(path: str | os.PathLike[str], kind: str, *, versions: Sequence[int] | None = None) -> Record:
    """Read a ``kind`` record written by :func:`write_record`; :class:`ArtifactError` naming the file
    if it is missing, not JSON, of another kind or an unreadable version, or malformed."""
    return Record.from_dict(read_json(path, f"{kind} file"), kind, versions=versions, where=str(path))
