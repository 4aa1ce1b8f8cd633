"""JSON schemas: a key -> spec dict checked by :func:`validate_json`, for every JSON file read back.

A spec is a type, a tuple of types, a nested schema dict, or a validator made by
:func:`dict_of` / :func:`list_of` / :func:`optional` (or one of the ``check_*``
functions). The artifact header and the stage marker are checked with these
(:mod:`refusal_core.saving.artifacts`, :mod:`refusal_core.saving.stages`); the
study's stage files have their schemas beside the study
(:mod:`refusal_core.study.schemas`).

Example:
    >>> validate_json({"n": 3, "rates": [0.5]}, {"n": check_count, "rates": list_of(check_finite_rate)}, "x")
    >>> validate_json({"n": -1}, {"n": check_count}, "x.json")
    Traceback (most recent call last):
    ...
    refusal_core.errors.ArtifactError: x.json: 'n' must be a count (int >= 0), got -1
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from refusal_core.errors import ArtifactError

__all__ = [
    "NUMBER",
    "JsonSchema",
    "check_count",
    "check_finite_number",
    "check_finite_rate",
    "check_flag",
    "dict_of",
    "list_of",
    "optional",
    "validate_json",
]

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
