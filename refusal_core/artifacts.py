"""Artifacts, the JSON schema checks and the stage store, under their older import path.

They live in the saving layer (:mod:`refusal_core.saving`: :mod:`~refusal_core.saving.artifacts`,
:mod:`~refusal_core.saving.schemas`, :mod:`~refusal_core.saving.stages`); this module names the
same objects. The study's stage-file schemas are :mod:`refusal_core.study.schemas`.
"""

from refusal_core.saving.artifacts import (
    ARTIFACT_KIND,
    FORMAT_VERSION,
    Artifact,
    check_finite_model,
    load_artifact,
    save_artifact,
    save_model_weights,
)
from refusal_core.saving.files import atomic_write_bytes, atomic_write_json, file_sha256
from refusal_core.saving.schemas import (
    NUMBER,
    JsonSchema,
    check_count,
    check_finite_number,
    check_finite_rate,
    check_flag,
    dict_of,
    list_of,
    optional,
    validate_json,
)
from refusal_core.saving.stages import FileStamps, StageStore, settings_key, stage_output_key

__all__ = [
    "ARTIFACT_KIND",
    "FORMAT_VERSION",
    "NUMBER",
    "Artifact",
    "FileStamps",
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
