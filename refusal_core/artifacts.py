"""Atomic, self-describing artifacts and the resumable stage store of a study.

Every artifact is a pair ``NAME.safetensors`` + ``NAME.json`` (either may be
absent when there is nothing of that kind). Both are written to a temporary
file in the same directory and moved into place with :func:`os.replace`, so a
killed process leaves either the old artifact or the new one, never half of
one. The JSON carries the model identity and the settings it was made with;
:func:`load_artifact` checks them and raises
:class:`~refusal_core.errors.ArtifactError` on any mismatch or corruption.

A :class:`StageStore` keys each stage by a hash of its own settings chained
with the keys of the stages it depends on, so changing a setting invalidates
exactly the stages downstream of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from refusal_core.errors import ArtifactError

__all__ = [
    "FORMAT_VERSION",
    "Artifact",
    "StageStore",
    "atomic_write_bytes",
    "atomic_write_json",
    "load_artifact",
    "save_artifact",
    "save_model_weights",
    "settings_key",
]

FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    atomic_write_bytes(
        path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode()
    )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def settings_key(settings: Mapping[str, Any], *upstream: str) -> str:
    """A short stable hash of ``settings`` (JSON-canonical) chained with upstream keys."""
    blob = json.dumps(settings, sort_keys=True, default=_json_default) + "|" + "|".join(upstream)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_artifact(
    base: Path,
    *,
    tensors: Mapping[str, torch.Tensor] | None = None,
    meta: Mapping[str, Any],
    identity: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Save ``base.safetensors`` (if tensors) then ``base.json`` (always), each atomically.

    The JSON is written last and records the tensors' names and shapes, so a
    JSON that exists vouches for a complete tensor file.
    """
    base = Path(base)
    header: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "identity": dict(identity or {}),
        "settings": dict(settings or {}),
        "meta": dict(meta),
        "tensors": {},
    }
    if tensors:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        header["tensors"] = {k: list(v.shape) for k, v in contiguous.items()}
        fd, tmp = tempfile.mkstemp(prefix=f".{base.name}.", suffix=".safetensors.tmp", dir=base.parent)
        os.close(fd)
        try:
            save_file(contiguous, tmp)
            os.replace(tmp, base.with_suffix(".safetensors"))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    atomic_write_json(base.with_suffix(".json"), header)


@dataclass
class Artifact:
    """What :func:`load_artifact` returns."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    identity: dict[str, Any]
    settings: dict[str, Any]


def save_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Write ``model.state_dict()`` to ``path`` (safetensors) atomically: temp file, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_artifact(
    base: Path,
    *,
    expect_identity: Mapping[str, Any] | None = None,
    expect_settings: Mapping[str, Any] | None = None,
) -> Artifact:
    """Load an artifact saved by :func:`save_artifact`.

    Raises :class:`ArtifactError` when a file is missing or corrupt, when the
    tensors do not match the recorded names/shapes, or when the identity or
    settings differ from the expected ones.
    """
    base = Path(base)
    jpath = base.with_suffix(".json")
    if not jpath.is_file():
        raise ArtifactError(f"artifact {jpath} does not exist")
    try:
        header = json.loads(jpath.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"artifact {jpath} is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or header.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"artifact {jpath} has an unknown format (format_version != {FORMAT_VERSION})")
    for what, expected in (("identity", expect_identity), ("settings", expect_settings)):
        if expected is not None:
            recorded = header.get(what, {})
            diff = sorted(
                k for k in set(expected) | set(recorded) if _canon(expected.get(k)) != _canon(recorded.get(k))
            )
            if diff:
                raise ArtifactError(
                    f"artifact {jpath} was made with a different {what}: keys {diff} differ "
                    f"(recorded {[recorded.get(k) for k in diff]}, "
                    f"expected {[expected.get(k) for k in diff]})"
                )
    tensors: dict[str, torch.Tensor] = {}
    spec = header.get("tensors", {})
    if spec:
        tpath = base.with_suffix(".safetensors")
        try:
            tensors = load_file(str(tpath))
        except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
            raise ArtifactError(f"artifact {tpath} is missing or corrupt: {exc}") from exc
        got = {k: list(v.shape) for k, v in tensors.items()}
        if got != spec:
            raise ArtifactError(f"artifact {tpath} holds tensors {got} but its JSON records {spec}")
    return Artifact(
        meta=dict(header.get("meta", {})),
        tensors=tensors,
        identity=dict(header.get("identity", {})),
        settings=dict(header.get("settings", {})),
    )


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=_json_default)


@dataclass
class StageStore:
    """Stage bookkeeping under one run directory: ``root/<stage>/``.

    A stage is complete when ``root/<stage>/stage.json`` exists and holds the
    key it is asked for; its artifacts are written before that file, so an
    interrupted stage is simply redone.
    """

    root: Path

    def stage_dir(self, stage: str) -> Path:
        d = Path(self.root) / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def is_done(self, stage: str, key: str) -> bool:
        marker = Path(self.root) / stage / "stage.json"
        if not marker.is_file():
            return False
        try:
            return bool(json.loads(marker.read_text()).get("key") == key)
        except (OSError, json.JSONDecodeError):
            return False

    def mark_done(self, stage: str, key: str, summary: Mapping[str, Any] | None = None) -> None:
        atomic_write_json(self.stage_dir(stage) / "stage.json", {"key": key, "summary": dict(summary or {})})

    def seconds(self, stage: str) -> float:
        """The recorded compute time of a completed stage (0.0 when unknown)."""
        try:
            summary = json.loads((Path(self.root) / stage / "stage.json").read_text()).get("summary", {})
            return float(summary.get("seconds", 0.0))
        except (OSError, json.JSONDecodeError, TypeError, ValueError):
            return 0.0
