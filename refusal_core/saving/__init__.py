"""The one saving layer: every file refusal_core writes goes through here, and every one it reads back.

It sits below everything that walks a model (it imports torch and safetensors,
nothing of refusal_core but :mod:`~refusal_core.errors`), so the model adapter,
compression, the checkpoint writer and the study all save the same way.

==================  =====================================================================
module              what it holds
==================  =====================================================================
``files``           the one atomic writer (temp file, fsync, rename; a directory staged and
                    renamed whole), the one JSON reader, the JSON spellings (:func:`json_text`
                    for files, :func:`canonical_json` for content hashes), file and content
                    SHA-256, safetensors writing, umask-respecting modes
``records``         :class:`Record`: kind, version, model identity, settings, file hashes and
                    the kind's fields; :data:`RECORD_KINDS`
``schemas``         the JSON schema checks every JSON file read back goes through
``artifacts``       ``NAME.safetensors`` + ``NAME.json`` pairs that vouch for each other
``stages``          :class:`StageStore`: resumable stages keyed by their settings and files
``checkpoints``     ``refusal_core.json`` of a checkpoint directory: sealed, then read back with
                    every file's hash checked
==================  =====================================================================

The formats on disk, and who writes them:

==========================================  =============================================================
file                                        written by
==========================================  =============================================================
``NAME.json`` + ``NAME.safetensors``        :func:`save_artifact` (kind ``refusal_core.artifact``)
a record ``*.json``                         :func:`write_record` (AIRD, quantized-edit, damage records)
``<stage>/stage.json``                      :meth:`StageStore.mark_done`
checkpoint ``refusal_core.json``            :func:`seal_checkpoint_dir`, called by
                                            :func:`refusal_core.checkpoint.save_checkpoint`
ASR / over-refusal ``*.json``               :meth:`refusal_core.evaluation.results.AsrResult.save`
                                            (``format`` ``refusal_core.asr/1``) via :func:`atomic_write_json`
results.json, audit.json, report.md, plots  the study, the audit and the report, via
                                            :func:`atomic_write_json` / :func:`atomic_write_bytes`
weights ``*.safetensors``                   :func:`save_model_weights`, :func:`atomic_write_tensors`
==========================================  =============================================================

The study's own stage-file schemas sit beside the study (:mod:`refusal_core.study.schemas`).
``refusal_core.records`` and ``refusal_core.artifacts`` are the older import paths of the same
names.
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
from refusal_core.saving.checkpoints import (
    CHECKPOINT_FORMATS,
    CHECKPOINT_KIND,
    CHECKPOINT_RECORD,
    CHECKPOINT_VERSION,
    is_checkpoint_dir,
    read_checkpoint_record,
    seal_checkpoint_dir,
)
from refusal_core.saving.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_tensors,
    atomic_write_with,
    canonical_json,
    current_umask,
    file_sha256,
    finite_or_null,
    first_changed_file,
    json_default,
    json_sha256,
    json_text,
    read_json,
    respect_umask_,
    staged_directory,
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
    "CHECKPOINT_FORMATS",
    "CHECKPOINT_KIND",
    "CHECKPOINT_RECORD",
    "CHECKPOINT_VERSION",
    "COMMON_KEYS",
    "FORMAT_VERSION",
    "NUMBER",
    "RECORD_KINDS",
    "Artifact",
    "FileStamps",
    "JsonSchema",
    "Record",
    "RecordKind",
    "StageStore",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_tensors",
    "atomic_write_with",
    "canonical_json",
    "check_count",
    "check_finite_model",
    "check_finite_number",
    "check_finite_rate",
    "check_flag",
    "current_umask",
    "dict_of",
    "file_sha256",
    "finite_or_null",
    "first_changed_file",
    "is_checkpoint_dir",
    "json_default",
    "json_sha256",
    "json_text",
    "list_of",
    "load_artifact",
    "load_record_as",
    "optional",
    "read_checkpoint_record",
    "read_json",
    "read_record",
    "register_kind",
    "respect_umask_",
    "save_artifact",
    "save_model_weights",
    "seal_checkpoint_dir",
    "settings_key",
    "stage_output_key",
    "staged_directory",
    "validate_json",
    "write_record",
]
