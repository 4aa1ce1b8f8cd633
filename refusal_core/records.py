"""One record type for everything refusal_core saves, one atomic writer and one JSON reader.

A :class:`Record` is what a saved result says about itself: its ``kind`` and
layout ``version``, the ``identity`` of the model it describes
(:func:`~refusal_core.model.model_identity`; the one name for it in every
file), the ``settings`` that produced it, the SHA-256 of the ``files`` it
vouches for, and the kind's own fields (``data``). On disk it is one flat JSON
object: the five common keys next to the kind's fields.

==============================  =======  ==============================================
kind                            version  written by
==============================  =======  ==============================================
``refusal_core.artifact``       3        :func:`~refusal_core.artifacts.save_artifact`
``refusal_core.checkpoint``     2        :func:`~refusal_core.checkpoint.save_checkpoint`
``AirdRecord``                  2        :meth:`~refusal_core.aird.AirdRecord.save`
``QuantizedEditRecord``         1        :meth:`~refusal_core.quantized_edit.QuantizedEditRecord.save`
``DamageResult``                2        :meth:`~refusal_core.evaluation.damage.DamageResult.save`
==============================  =======  ==============================================

(:data:`RECORD_KINDS` is that table; :func:`register_kind` adds a kind.)

Every write goes through :func:`atomic_write_bytes`: the bytes are produced
first, written to a temporary file in the target's directory, flushed to
disk (``fsync``) and moved over the target with :func:`os.replace`; a
failure at any point (a value that cannot be serialized, a full disk, a
kill) leaves the previous file as it was. Every read of a JSON file goes
through :func:`read_json`, which turns a missing, unreadable or malformed
file into :class:`~refusal_core.errors.ArtifactError` naming it.

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

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from refusal_core.errors import ArtifactError

__all__ = [
    "COMMON_KEYS",
    "RECORD_KINDS",
    "Record",
    "RecordKind",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_with",
    "current_umask",
    "file_sha256",
    "finite_or_null",
    "json_default",
    "load_record_as",
    "read_json",
    "read_record",
    "register_kind",
    "respect_umask_",
    "write_record",
]


_T = TypeVar("_T")

# ----------------------------------------------------------------------------
# the writer and the reader
# ----------------------------------------------------------------------------


def finite_or_null(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) in it, however nested, replaced by None.

    Strict JSON has no NaN: a value that is not defined (an unscored candidate, a cosine with a zero
    vector) is written as null, which every parser reads.
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def json_default(obj: Any) -> Any:
    """How values JSON has no type for are written: tensors as lists, paths as str, sets sorted."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, tuple):  # pragma: no cover - json writes tuples as arrays itself
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def current_umask() -> int:
    """The process's umask (read without changing it where ``/proc`` allows; else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def respect_umask_(path: str | os.PathLike[str], *, recursive: bool = False) -> Path:
    """Give a file or directory made by ``tempfile`` (always 0600 / 0700) the mode an ordinary
    ``open``/``mkdir`` would have given it (0666 / 0777 less the umask); returns the path.
    ``recursive`` also sets everything under a directory (safetensors writes its files 0600).

    ``mkstemp``/``mkdtemp`` ignore the umask on purpose (their names are guessable in a shared
    /tmp); ours are renamed into place as results that others on the machine may need to read.
    """
    p = Path(path)
    mask = current_umask()
    for q in [p, *(sorted(p.rglob("*")) if recursive and p.is_dir() else [])]:
        if not q.is_symlink():
            os.chmod(q, (0o777 if q.is_dir() else 0o666) & ~mask)
    return p


def atomic_write_with(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Let ``write(tmp)`` fill a temp file beside ``path``, fsync it and rename it over ``path``; returns it.

    The one temp-and-rename of the project: if ``write`` (or the disk) fails,
    the temp file is removed and an existing ``path`` is left as it was.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        respect_umask_(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write_with`); returns the path."""
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def _dumps(obj: Any, *, strict: bool) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=json_default, allow_nan=not strict) + "\n"


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, strict: bool = False) -> Path:
    """Write ``obj`` as indented, key-sorted JSON, atomically; returns the path.

    The whole text is serialized before the file is touched, so a value that
    cannot be written (raising ``TypeError``/``ValueError``) leaves an existing
    file unchanged. ``strict`` refuses NaN and infinity (strict JSON parsers do).
    """
    return atomic_write_bytes(path, _dumps(obj, strict=strict).encode())


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    """The parsed JSON of ``path``; :class:`ArtifactError` naming ``what`` and the path if it is
    missing, unreadable or not valid JSON."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{what} {str(p)!r} does not exist")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{what} {str(p)!r} is not valid JSON: {exc}") from exc


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        text = _dumps(record.to_dict(), strict=strict)
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
