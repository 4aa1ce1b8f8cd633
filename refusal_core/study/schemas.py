"""The schemas of the study's stage files, beside the study: what each plain JSON file must hold.

The validators are :mod:`refusal_core.saving.schemas`' (the one saving layer); the
keys of the mechanism file are :data:`~refusal_core.study.results.MECHANISM_FLAGS`,
written in that one place. :func:`read_stage_json` reads a stage file and checks
it against its schema (by file name), so a damaged file is recomputed, never trusted.
Extra keys are allowed: files written by older versions still load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusal_core.saving import (
    JsonSchema,
    check_count,
    check_finite_number,
    check_finite_rate,
    check_flag,
    dict_of,
    list_of,
    optional,
    read_json,
    validate_json,
)
from refusal_core.study.results import MECHANISM_FLAGS

__all__ = [
    "EVALUATION_SCHEMA",
    "MECHANISM_SCHEMA",
    "RATE_SCHEMA",
    "STAGE_JSON_SCHEMAS",
    "SWEEP_SCHEMA",
    "VALIDATION_SCHEMA",
    "read_stage_json",
]

#: A rate record (:class:`refusal_core.stats.Rate` as a dict).
RATE_SCHEMA: JsonSchema = {
    "k": check_count,
    "n": check_count,
    "value": check_finite_rate,
    "low": check_finite_rate,
    "high": check_finite_rate,
}

#: ``evaluation.json`` of a study's ``eval/<variant>`` stage: per-prompt outcomes, so that every
#: rate and paired test can be recomputed from it.
EVALUATION_SCHEMA: JsonSchema = {
    "jailbroken": dict_of(list_of(check_flag)),
    "asr_per_config": dict_of(dict_of(check_finite_rate)),
    "refused_harmless": list_of(check_flag),
    "degenerate": dict_of(check_count),
    "damage": {
        "kl_per_prompt": list_of(check_finite_number),
        "ce_per_prompt": list_of(check_finite_number),
        "ce_prompts": list_of(check_count),
    },
    "accuracy": dict_of(
        {"accuracy": check_finite_rate, "stderr": optional(check_finite_number), "n": check_count}
    ),
}

#: ``mechanism.json`` of a study's ``<variant>/mechanism`` stage: per-prompt refusal flags.
MECHANISM_SCHEMA: JsonSchema = {key: list_of(check_flag) for key in MECHANISM_FLAGS}

#: ``validation.json``: one model's scores on the validation prompts.
VALIDATION_SCHEMA: JsonSchema = {
    "compliance": RATE_SCHEMA,
    "over_refusal": RATE_SCHEMA,
    "kl": check_finite_number,
    "refusal_score_harmful": check_finite_number,
    "refusal_score_harmless": check_finite_number,
    "source": str,
    "ce": check_finite_number,
    "complied": list_of(check_flag),
}

#: ``sweep.json``: the AIRD sweep of one compressed model (``edit``, the placement, is optional:
#: files from before it existed edited the source block).
SWEEP_SCHEMA: JsonSchema = {
    "points": list_of(
        {
            "strength": str,
            "sparse": check_flag,
            "placement": str,
            "layers": list_of(check_count),
            "gains": list_of(check_finite_number),
            "alphas": list_of(check_finite_number),
            "scores": VALIDATION_SCHEMA,
        }
    )
}

#: Plain JSON files of study stages, by file name, and the schema they must satisfy.
STAGE_JSON_SCHEMAS: dict[str, JsonSchema] = {
    "evaluation.json": EVALUATION_SCHEMA,
    "mechanism.json": MECHANISM_SCHEMA,
    "validation.json": VALIDATION_SCHEMA,
    "sweep.json": SWEEP_SCHEMA,
    "completions.json": {"ids": list_of(list_of(check_count))},
}


def read_stage_json(path: str | Path) -> dict[str, Any]:
    """A stage's JSON file, checked against the schema of its file name (ArtifactError if not)."""
    data = read_json(path, "stage file")
    validate_json(data, STAGE_JSON_SCHEMAS.get(Path(path).name, {}), path)
    return dict(data)
