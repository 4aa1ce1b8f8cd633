"""The resumable stage store of a study or an audit: which stages are done, with which settings.

A :class:`StageStore` keys each stage by a hash of its own settings chained with
the keys of the stages it depends on (:func:`settings_key`), and records the
SHA-256 of every file a stage wrote in ``<stage>/stage.json``; a stage whose
files no longer match is not done, and a stage whose recomputation wrote
different files changes the key of everything downstream
(:meth:`StageStore.output_key`).

Example:
    >>> import tempfile
    >>> store = StageStore(Path(tempfile.mkdtemp()))
    >>> key = settings_key({"n": 4})
    >>> _ = (store.stage_dir("base") / "x.json").write_text("{}")
    >>> _ = store.mark_done("base", key)
    >>> store.is_done("base", key), store.is_done("base", settings_key({"n": 5}))
    (True, False)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_core.errors import ArtifactError
from refusal_core.saving.files import (
    atomic_write_json,
    file_sha256,
    first_changed_file,
    json_default,
    read_json,
)
from refusal_core.saving.schemas import JsonSchema, dict_of, validate_json

__all__ = ["FileStamps", "StageStore", "settings_key", "stage_output_key"]


def settings_key(settings: Mapping[str, Any], *upstream: str) -> str:
    """A short stable hash of ``settings`` (key-sorted JSON) chained with upstream keys.

    The spelling (``json.dumps`` separators included) is part of every run directory's keys:
    changing it would make every finished stage look undone.
    """
    blob = json.dumps(settings, sort_keys=True, default=json_default) + "|" + "|".join(upstream)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_MARKER = "stage.json"
_MARKER_SCHEMA: JsonSchema = {"key": str, "summary": dict, "files": dict_of(str)}

#: ``(inode, mtime_ns, size)`` of each file of a stage directory, to tell which a compute wrote.
FileStamps = dict[str, tuple[int, int, int]]


def stage_output_key(key: str, files: Mapping[str, str]) -> str:
    """The key downstream stages chain on: a stage's settings ``key`` and its ``{file: sha256}``."""
    return settings_key({"files": dict(files)}, key)


@dataclass
class StageStore:
    """Stage bookkeeping under one run directory: ``root/<stage>/``.

    A stage is complete when ``root/<stage>/stage.json`` exists, holds the
    key it is asked for, and every file it records still has the recorded
    SHA-256. Its artifacts are written before that file, so an interrupted
    stage is simply redone. Files in the directory that the marker does not
    record (leftovers, files other code adds later) are ignored.
    """

    root: Path

    def stage_dir(self, stage: str) -> Path:
        d = Path(self.root) / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _marker(self, stage: str) -> dict[str, Any] | None:
        path = Path(self.root) / stage / _MARKER
        try:
            doc = read_json(path, "stage marker")
            validate_json(doc, _MARKER_SCHEMA, path)
        except ArtifactError:
            return None
        return dict(doc)

    def recorded_key(self, stage: str) -> str | None:
        """The key the stage was completed with; None when not marked done or the marker is broken."""
        doc = self._marker(stage)
        return None if doc is None else str(doc["key"])

    def verify(self, stage: str, key: str | None = None) -> dict[str, str]:
        """Check every file the stage recorded against its SHA-256; returns ``{file name: sha256}``.

        Raises :class:`ArtifactError` naming the stage and the file when the
        marker is missing or broken (or, with ``key``, records another key),
        a file is missing, or its hash differs.
        """
        doc = self._marker(stage)
        d = Path(self.root) / stage
        if doc is None:
            raise ArtifactError(f"stage {stage}: {d / _MARKER} is missing or not a valid stage marker")
        if key is not None and doc["key"] != key:
            raise ArtifactError(f"stage {stage} was completed with key {doc['key']}, not {key}")
        files: dict[str, str] = doc["files"]
        changed = first_changed_file(d, files)
        if changed is not None:
            name, got = changed
            if got is None:
                raise ArtifactError(f"stage {stage}: file {d / name} is missing")
            raise ArtifactError(
                f"stage {stage}: file {d / name} was modified or corrupted (sha256 {got[:12]}…, "
                f"recorded {files[name][:12]}…)"
            )
        return files

    def is_done(self, stage: str, key: str) -> bool:
        """True when the stage is marked done with ``key`` and its files verify."""
        try:
            self.verify(stage, key)
        except ArtifactError:
            return False
        return True

    def file_stamps(self, stage: str) -> FileStamps:
        """Stamps of the stage directory's visible files, to pass to :meth:`mark_done` after a compute."""
        d = self.stage_dir(stage)
        stamps: FileStamps = {}
        for p in d.iterdir():
            if p.is_file() and not p.name.startswith(".") and p.name != _MARKER:
                st = p.stat()
                stamps[p.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return stamps

    def invalidate(self, stage: str) -> None:
        """Remove the stage's marker, so it is not done until marked again."""
        (Path(self.root) / stage / _MARKER).unlink(missing_ok=True)

    def mark_done(
        self,
        stage: str,
        key: str,
        summary: Mapping[str, Any] | None = None,
        *,
        unchanged_since: FileStamps | None = None,
    ) -> dict[str, str]:
        """Mark the stage done with ``key``, recording the SHA-256 of its files; returns them.

        Every visible file of the stage directory is recorded, except, with
        ``unchanged_since`` (from :meth:`file_stamps` taken before the
        compute), the files that the compute did not write.
        """
        d = self.stage_dir(stage)
        current = self.file_stamps(stage)
        before = unchanged_since or {}
        files = {
            name: file_sha256(d / name)
            for name, stamp in sorted(current.items())
            if before.get(name) != stamp
        }
        atomic_write_json(d / _MARKER, {"key": key, "summary": dict(summary or {}), "files": files})
        return files

    def output_key(self, stage: str) -> str:
        """A key of the stage's settings key and the hashes of its files, for downstream stages.

        Chaining on it (instead of the settings key alone) means a stage whose
        recomputation produced different files invalidates everything
        downstream, while an identical recomputation keeps it valid.
        """
        doc = self._marker(stage)
        if doc is None:
            raise ArtifactError(f"stage {stage} is not marked done")
        return stage_output_key(str(doc["key"]), doc["files"])

    def seconds(self, stage: str) -> float:
        """The recorded compute time of a completed stage (0.0 when unknown)."""
        doc = self._marker(stage)
        try:
            return float(doc["summary"].get("seconds", 0.0)) if doc else 0.0
        except (TypeError, ValueError):
            return 0.0
