"""The record type, the atomic writers and the JSON reader, under their older import path.

They live in the saving layer (:mod:`refusal_core.saving`: :mod:`~refusal_core.saving.files`
and :mod:`~refusal_core.saving.records`); this module names the same objects.
"""

from refusal_core.saving.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_with,
    current_umask,
    file_sha256,
    finite_or_null,
    json_default,
    read_json,
    respect_umask_,
)
from refusal_core.saving.records import (
    COMMON_KEYS,
    RECORD_KINDS,
    Record,
    RecordKind,
    load_record_as,
    read_record,
    register_kind,
    write_record,
)

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
