"""Files on disk: the one atomic writer, the one JSON reader, the JSON spellings and the hashes.

Every write goes through :func:`atomic_write_with`: the content is produced
first, written to a temporary file in the target's directory, flushed to disk
(``fsync``) and moved over the target with :func:`os.replace`; a failure at any
point (a value that cannot be serialized, a full disk, a kill) leaves the
previous file as it was. A directory is built the same way
(:func:`staged_directory`). Every read of a JSON file goes through
:func:`read_json`, which turns a missing, unreadable or malformed file into
:class:`~refusal_core.errors.ArtifactError` naming it.

JSON is written in one spelling (:func:`json_text`: indented, key-sorted, a
trailing newline; tensors, paths, dtypes and sets through :func:`json_default`)
and hashed in one other (:func:`json_sha256` of :func:`canonical_json`: compact,
key-sorted), so that a record can vouch for its own content.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "x.json"
    >>> _ = atomic_write_json(path, {"b": 1, "a": float("nan")})
    >>> path.read_text()
    '{\\n  "a": NaN,\\n  "b": 1\\n}\\n'
    >>> read_json(path)["b"], json_sha256({"b": 1}) == json_sha256({"b": 1.0})
    (1, False)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from refusal_core.errors import ArtifactError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_tensors",
    "atomic_write_with",
    "canonical_json",
    "current_umask",
    "file_sha256",
    "finite_or_null",
    "first_changed_file",
    "json_default",
    "json_sha256",
    "json_text",
    "read_json",
    "respect_umask_",
    "staged_directory",
]


# ----------------------------------------------------------------------------
# JSON spellings
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


def json_text(obj: Any, *, strict: bool = False) -> str:
    """``obj`` as the project writes JSON files: indented, key-sorted, with a trailing newline.

    ``strict`` refuses NaN and infinity (``ValueError``; strict JSON parsers do).
    """
    return json.dumps(obj, indent=2, sort_keys=True, default=json_default, allow_nan=not strict) + "\n"


def canonical_json(obj: Any, *, ensure_ascii: bool = True, strict: bool = False) -> str:
    """The compact, key-sorted JSON text content hashes are taken of (:func:`json_sha256`)."""
    return json.dumps(
        obj,
        sort_keys=True,
        separators=(",", ":"),
        default=json_default,
        ensure_ascii=ensure_ascii,
        allow_nan=not strict,
    )


def json_sha256(obj: Any, *, ensure_ascii: bool = True, strict: bool = False) -> str:
    """Hex SHA-256 of :func:`canonical_json` of ``obj`` (UTF-8)."""
    text = canonical_json(obj, ensure_ascii=ensure_ascii, strict=strict)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def first_changed_file(root: Path, files: Mapping[str, str]) -> tuple[str, str | None] | None:
    """The first of ``files`` (``{name under root: recorded sha256}``, in name order) that is missing
    (``(name, None)``) or whose SHA-256 is not the recorded one (``(name, actual sha256)``); None when
    every file is as recorded. The one check behind every record that vouches for files."""
    for name, expected in sorted(files.items()):
        path = root / name
        if not path.is_file():
            return name, None
        actual = file_sha256(path)
        if actual != expected:
            return name, actual
    return None


# ----------------------------------------------------------------------------
# modes
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------


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


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, strict: bool = False) -> Path:
    """Write ``obj`` as :func:`json_text` (indented, key-sorted JSON), atomically; returns the path.

    The whole text is serialized before the file is touched, so a value that
    cannot be written (raising ``TypeError``/``ValueError``) leaves an existing
    file unchanged. ``strict`` refuses NaN and infinity (strict JSON parsers do).
    """
    return atomic_write_bytes(path, json_text(obj, strict=strict).encode())


def atomic_write_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor]) -> str:
    """Save ``tensors`` (contiguous CPU tensors) to ``path`` as safetensors, atomically; returns the
    file's SHA-256."""
    atomic_write_with(path, lambda tmp: save_file(dict(tensors), str(tmp)))
    return file_sha256(path)


@contextmanager
def staged_directory(out: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary directory beside ``out`` to fill; when the block ends it replaces ``out`` whole.

    Files in it get the umask's modes (:func:`respect_umask_`). A previous ``out`` is
    moved aside first and deleted after the rename (put back if the rename fails); if
    the block raises, the temporary directory is removed and ``out`` is left as it was.
    So a killed process leaves the previous directory or the new one, never a mix.
    """
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp.", dir=target.parent))
    try:
        yield tmp
        _replace_dir(respect_umask_(tmp, recursive=True), target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; a previous ``out`` is moved aside first, then deleted."""
    old: Path | None = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "previous")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:  # put the previous directory back
            os.replace(old / "previous", out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------


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
