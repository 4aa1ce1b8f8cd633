"""Atomic, hash-verified, self-describing artifacts: tensors and the JSON that vouches for them.

Every artifact is a pair ``NAME.safetensors`` + ``NAME.json`` (the tensor file
is absent when there are no tensors). Each file is written to a temporary file
in the same directory and moved into place (:mod:`refusal_core.saving.files`); the
tensors go first and the JSON last, and the JSON records the SHA-256 of the
tensor file and a SHA-256 of its own content. So a killed process leaves
either the old artifact, or new tensors that the old JSON does not vouch for
(detected), never an unnoticed mix. :func:`load_artifact` recomputes every
hash, validates the JSON against a schema and checks the expected model
identity and settings; anything off raises
:class:`~refusal_core.errors.ArtifactError` naming the file.

Example:
    >>> import tempfile, torch
    >>> d = Path(tempfile.mkdtemp())
    >>> save_artifact(d / "x", tensors={"a": torch.ones(2)}, meta={"n": 3})
    >>> load_artifact(d / "x", meta_schema={"n": int}).meta
    {'n': 3}
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from refusal_core._finite import all_finite
from refusal_core.errors import ArtifactError, NonFiniteError
from refusal_core.saving.files import (
    atomic_write_json,
    atomic_write_tensors,
    canonical_json,
    json_sha256,
    read_json,
)
from refusal_core.saving.records import RECORD_KINDS, Record
from refusal_core.saving.schemas import JsonSchema, dict_of, list_of, validate_json

__all__ = [
    "ARTIFACT_KIND",
    "FORMAT_VERSION",
    "Artifact",
    "check_finite_model",
    "load_artifact",
    "save_artifact",
    "save_model_weights",
]

#: ``kind`` of an artifact's JSON (a :class:`~refusal_core.saving.records.Record`).
ARTIFACT_KIND = "refusal_core.artifact"
#: Version 2 added the file hashes and the JSON's own hash (version 1 artifacts are refused);
#: version 3 is the common record layout (``kind``/``version`` instead of ``format_version``).
FORMAT_VERSION = RECORD_KINDS[ARTIFACT_KIND].version


# ----------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------


def _body_sha256(header: Mapping[str, Any]) -> str:
    """SHA-256 of an artifact header's canonical JSON, without its own ``sha256`` field."""
    return json_sha256({k: v for k, v in header.items() if k != "sha256"})


def save_artifact(
    base: Path,
    *,
    tensors: Mapping[str, torch.Tensor] | None = None,
    meta: Mapping[str, Any],
    identity: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Save ``base.safetensors`` (if tensors) then ``base.json`` (always), each atomically.

    The JSON is a :class:`~refusal_core.saving.records.Record` of kind
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
        files = {tpath.name: atomic_write_tensors(tpath, contiguous)}
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
            if not all_finite(t):
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
    return atomic_write_tensors(
        path, {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    )


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
                k
                for k in set(expected) | set(recorded)
                if canonical_json(expected.get(k)) != canonical_json(recorded.get(k))
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
