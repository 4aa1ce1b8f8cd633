"""Atomic, hash-verified, self-describing artifacts and the resumable stage store of a study.

Every artifact is a pair ``NAME.safetensors`` + ``NAME.json`` (the tensor file
is absent when there are no tensors). Each file is written to a temporary file
in the same directory and moved into place with :func:`os.replace`; the
tensors go first and the JSON last, and the JSON records the SHA-256 of the
tensor file and a SHA-256 of its own content. So a killed process leaves
either the old artifact, or new tensors that the old JSON does not vouch for
(detected), never an unnoticed mix. :func:`load_artifact` recomputes every
hash, validates the JSON against a schema and checks the expected model
identity and settings; anything off raises
:class:`~refusal_core.errors.ArtifactError` naming the file.

A :class:`StageStore` keys each stage by a hash of its own settings chained
with the keys of the stages it depends on, and records the hash of every file
a stage wrote; a stage whose files no longer match is not done.

Example:
    >>> import tempfile, torch
    >>> d = Path(tempfile.mkdtemp())
    >>> save_artifact(d / "x", tensors={"a": torch.ones(2)}, meta={"n": 3})
    >>> load_artifact(d / "x", meta_schema={"n": int}).meta
    {'n': 3}
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from refusal_core.errors import ArtifactError, NonFiniteError
from refusal_core.records import (
    RECORD_KINDS,
    Record,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_with,
    file_sha256,
    json_default,
    read_json,
)

__all__ = [
    "ARTIFACT_KIND",
    "FORMAT_VERSION",
    "NUMBER",
    "Artifact",
    "JsonSchema",
    "StageStore",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_count",
    "check_finite_model",
    "check_finite_number",
    "check_finite_rate",
    "check_flag",
    "dict_of",
    "file_sha256",
    "list_of",
    "load_artifact",
    "optional",
    "save_artifact",
    "save_model_weights",
    "settings_key",
    "stage_output_key",
    "validate_json",
]

#: ``kind`` of an artifact's JSON (a :class:`~refusal_core.records.Record`).
ARTIFACT_KIND = "refusal_core.artifact"
#: Version 2 added the file hashes and the JSON's own hash (version 1 artifacts are refused);
#: version 3 is the common record layout (``kind``/``version`` instead of ``format_version``).
FORMAT_VERSION = RECORD_KINDS[ARTIFACT_KIND].version


# ----------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------


def settings_key(settings: Mapping[str, Any], *upstream: str) -> str:
    """A short stable hash of ``settings`` (JSON-canonical) chained with upstream keys."""
    blob = json.dumps(settings, sort_keys=True, default=json_default) + "|" + "|".join(upstream)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _body_sha256(header: Mapping[str, Any]) -> str:
    """SHA-256 of an artifact header's canonical JSON, without its own ``sha256`` field."""
    body = {k: v for k, v in header.items() if k != "sha256"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), default=json_default)
    return hashlib.sha256(blob.encode()).hexdigest()


def _write_tensors_atomically(tensors: Mapping[str, torch.Tensor], path: Path) -> str:
    """Save ``tensors`` to ``path`` atomically (:func:`~refusal_core.records.atomic_write_with`);
    returns the file's SHA-256."""
    atomic_write_with(path, lambda tmp: save_file(dict(tensors), str(tmp)))
    return file_sha256(path)


def save_artifact(
    base: Path,
    *,
    tensors: Mapping[str, torch.Tensor] | None = None,
    meta: Mapping[str, Any],
    identity: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Save ``base.safetensors`` (if tensors) then ``base.json`` (always), each atomically.

    The JSON is a :class:`~refusal_core.records.Record` of kind
    :data:`ARTIFACT_KIND` (fields ``meta`` and ``tensors``) plus its own
    ``sha256``. It is written last and records the tensors' names and shapes,
    the SHA-256 of the tensor file and its own SHA-256, so a JSON that verifies
    vouches for exactly one tensor file and for its own values. A record that
    cannot be built (e.g. ``meta`` not JSON-serializable) raises
    :class:`ArtifactError` before any file is written.
    """
    base = Path(base)
    data: dict[str, Any] = {"meta": dict(meta), "tensors": {}}
    record = Record(
        ARTIFACT_KIND, FORMAT_VERSION, identity=identity or {}, settings=settings or {}, data=data
    )
    files: dict[str, str] = {}
    if tensors:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        data["tensors"] = {k: list(v.shape) for k, v in contiguous.items()}
        tpath = base.with_suffix(".safetensors")
        files = {tpath.name: _write_tensors_atomically(contiguous, tpath)}
        record = replace(record, files=files, data=data)
    header = record.to_dict()
    header["sha256"] = _body_sha256(header)
    atomic_write_json(base.with_suffix(".json"), header)


def check_finite_model(model: torch.nn.Module) -> None:
    """Raise :class:`~refusal_core.errors.NonFiniteError` if any floating parameter or buffer
    of ``model`` holds NaN or infinity, naming the first offenders; otherwise return None.

    Call it before a model is written or evaluated: a model with ``inf``
    weights generates empty text, which a refusal judge would count as safe.
    """
    bad: list[str] = []
    seen: set[int] = set()
    named = list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    )
    with torch.no_grad():
        for name, t in named:
            if id(t) in seen or not isinstance(t, torch.Tensor) or not t.is_floating_point():
                continue
            seen.add(id(t))
            if not bool(torch.isfinite(t).all()):
                bad.append(name)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(f"model has non-finite (NaN/inf) values in {len(bad)} tensor(s): {shown}")


def save_model_weights(model: torch.nn.Module, path: Path) -> str:
    """Write ``model.state_dict()`` to ``path`` (safetensors) atomically; returns the file's SHA-256.

    Raises :class:`~refusal_core.errors.NonFiniteError` (nothing written) when
    a weight is NaN or infinite.
    """
    check_finite_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_tensors_atomically(
        {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path
    )


# ----------------------------------------------------------------------------
# schemas: a key -> spec dict; a spec is a type, a tuple of types, a nested
# schema dict, or a validator made by dict_of / list_of / optional.
# ----------------------------------------------------------------------------

#: A JSON number that is not a bool (JSON ``true`` is an ``int`` to Python).
NUMBER = (int, float)

JsonSchema = Mapping[str, Any]
_Validator = Callable[[Any, str], None]


def _check_value(value: Any, spec: Any, where: str) -> None:
    if callable(spec) and not isinstance(spec, type):
        spec(value, where)
    elif isinstance(spec, Mapping):
        validate_json(value, spec, where)
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        if isinstance(value, bool) and bool not in types:
            raise ArtifactError(f"{where} must be {_type_names(types)}, got a bool")
        if not isinstance(value, types):
            raise ArtifactError(f"{where} must be {_type_names(types)}, got {type(value).__name__}")


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def dict_of(spec: Any) -> _Validator:
    """A spec: a JSON object whose every value matches ``spec`` (keys are strings by JSON)."""

    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise ArtifactError(f"{where} must be an object, got {type(value).__name__}")
        for k, v in value.items():
            _check_value(v, spec, f"{where}[{k!r}]")

    return check


def list_of(spec: Any) -> _Validator:
    """A spec: a JSON array whose every item matches ``spec``."""

    def check(value: Any, where: str) -> None:
        if not isinstance(value, list):
            raise ArtifactError(f"{where} must be an array, got {type(value).__name__}")
        for i, v in enumerate(value):
            _check_value(v, spec, f"{where}[{i}]")

    return check


def optional(spec: Any) -> _Validator:
    """A spec: ``null`` or a value matching ``spec``."""

    def check(value: Any, where: str) -> None:
        if value is not None:
            _check_value(value, spec, where)

    return check


def validate_json(obj: Any, schema: JsonSchema, where: str | Path) -> None:
    """Check that ``obj`` is a JSON object holding every key of ``schema`` with a matching value.

    Extra keys are allowed (newer writers may add fields). Raises
    :class:`ArtifactError` naming ``where`` and the first offending key.
    """
    if not isinstance(obj, dict):
        raise ArtifactError(f"{where} must be a JSON object, got {type(obj).__name__}")
    for key, spec in schema.items():
        if key not in obj:
            raise ArtifactError(f"{where}: required key {key!r} is missing")
        _check_value(obj[key], spec, f"{where}: {key!r}")


def check_finite_rate(value: Any, where: str) -> None:
    _check_value(value, NUMBER, where)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ArtifactError(f"{where} must be a rate in [0, 1], got {value!r}")


def check_flag(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise ArtifactError(f"{where} must be true or false, got {value!r}")


def check_finite_number(value: Any, where: str) -> None:
    _check_value(value, NUMBER, where)
    if isinstance(value, bool) or not math.isfinite(value):
        raise ArtifactError(f"{where} must be a finite number, got {value!r}")


def check_count(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ArtifactError(f"{where} must be a count (int >= 0), got {value!r}")


_HEADER_SCHEMA: JsonSchema = {
    "kind": str,
    "version": int,
    "identity": dict,
    "settings": dict,
    "meta": dict,
    "tensors": dict_of(list_of(int)),
    "files": dict_of(str),
    "sha256": str,
}


# ----------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------


@dataclass
class Artifact:
    """What :func:`load_artifact` returns."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    identity: dict[str, Any]
    settings: dict[str, Any]


def load_artifact(
    base: Path,
    *,
    expect_identity: Mapping[str, Any] | None = None,
    expect_settings: Mapping[str, Any] | None = None,
    meta_schema: JsonSchema | None = None,
) -> Artifact:
    """Load an artifact saved by :func:`save_artifact`, verifying it first.

    Raises :class:`ArtifactError` naming the file when a file is missing, when
    the JSON is not valid, does not fit the artifact schema (or ``meta_schema``
    for its ``meta``) or was edited (its own hash), when the tensor file's
    SHA-256 differs from the recorded one (corrupt, replaced, or from another
    save), when the tensors do not match the recorded names/shapes, or when
    the identity or settings differ from the expected ones.
    """
    base = Path(base)
    jpath = base.with_suffix(".json")
    header = read_json(jpath, "artifact")
    if isinstance(header, dict) and "kind" not in header and "format_version" in header:
        # Version 2 wrote ``format_version`` where records now have ``kind`` and ``version``.
        header = {"kind": ARTIFACT_KIND, "version": header["format_version"], **header}
        legacy_body = {k: v for k, v in header.items() if k not in ("kind", "version")}
    else:
        legacy_body = None
    readable = RECORD_KINDS[ARTIFACT_KIND].readable
    if isinstance(header, dict) and (
        header.get("kind") != ARTIFACT_KIND or header.get("version") not in readable
    ):
        raise ArtifactError(
            f"artifact {jpath} is a {header.get('kind')!r} record of version {header.get('version')!r}; this "
            f"version reads {ARTIFACT_KIND} versions {readable} only (older artifacts carry no file hashes; "
            "re-create it)"
        )
    validate_json(header, _HEADER_SCHEMA, f"artifact {jpath}")
    if header["sha256"] != _body_sha256(legacy_body if legacy_body is not None else header):
        raise ArtifactError(f"artifact {jpath} was modified after it was written (its content hash differs)")
    Record.from_dict(
        {k: v for k, v in header.items() if k not in ("sha256", "format_version")},
        ARTIFACT_KIND,
        where=f"artifact {jpath}",
    )
    for what, expected in (("identity", expect_identity), ("settings", expect_settings)):
        if expected is not None:
            recorded = header[what]
            diff = sorted(
                k for k in set(expected) | set(recorded) if _canon(expected.get(k)) != _canon(recorded.get(k))
            )
            if diff:
                raise ArtifactError(
                    f"artifact {jpath} was made with a different {what}: keys {diff} differ "
                    f"(recorded {[recorded.get(k) for k in diff]}, "
                    f"expected {[expected.get(k) for k in diff]})"
                )
    if meta_schema is not None:
        validate_json(header["meta"], meta_schema, f"artifact {jpath}: meta")
    tensors: dict[str, torch.Tensor] = {}
    spec = header["tensors"]
    tpath = base.with_suffix(".safetensors")
    if set(header["files"]) != ({tpath.name} if spec else set()):
        raise ArtifactError(
            f"artifact {jpath} records files {sorted(header['files'])}, expected {tpath.name}"
        )
    if spec:
        try:
            data = tpath.read_bytes()
        except OSError as exc:
            raise ArtifactError(f"artifact file {tpath} is missing or unreadable: {exc}") from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != header["files"][tpath.name]:
            raise ArtifactError(
                f"artifact file {tpath} is corrupt or was replaced: its sha256 hash {digest[:12]}… does "
                f"not match the hash {header['files'][tpath.name][:12]}… that {jpath.name} records"
            )
        try:
            tensors = load_safetensors_bytes(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise ArtifactError(f"artifact file {tpath} is corrupt: {exc}") from exc
        got = {k: list(v.shape) for k, v in tensors.items()}
        if got != spec:
            raise ArtifactError(f"artifact file {tpath} holds tensors {got} but {jpath.name} records {spec}")
    return Artifact(
        meta=dict(header["meta"]),
        tensors=tensors,
        identity=dict(header["identity"]),
        settings=dict(header["settings"]),
    )


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=json_default)


# ----------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------

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
        for name, expected in sorted(files.items()):
            path = d / name
            if not path.is_file():
                raise ArtifactError(f"stage {stage}: file {path} is missing")
            got = file_sha256(path)
            if got != expected:
                raise ArtifactError(
                    f"stage {stage}: file {path} was modified or corrupted (sha256 {got[:12]}…, "
                    f"recorded {expected[:12]}…)"
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
