"""Prompt sets: the built-in harmful/harmless splits and user prompt files.

The built-in sets were written for this project (see ``fixtures/prompts/README.md``
and ``scripts/make_prompts.py``) and ship inside the package under
``refusal_core/data/prompts/``, so an installed package finds them without the
repository. They are named ``{harmful,harmless}_{train,val,test}``.

A prompt file may be:

* CSV with a header holding a ``goal`` column (the AdvBench layout; an
  ``instruction`` or ``prompt`` column is accepted when ``goal`` is absent);
* JSON: a list of strings, or of objects with an ``instruction``, ``goal`` or
  ``prompt`` key;
* JSONL: one such string or object per non-blank line.

Example:
    >>> from refusal_core.prompts import load_prompts
    >>> prompts = load_prompts("harmful_test")
    >>> isinstance(prompts[0], str) and len(prompts) > 50
    True
"""

from __future__ import annotations

import csv
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from refusal_core.errors import EmptyInputError, InvalidArgumentError

__all__ = ["BUILTIN_PROMPT_SETS", "PROMPT_KEYS", "load_prompt_records", "load_prompts"]

#: Names of the prompt sets shipped with the package.
BUILTIN_PROMPT_SETS: tuple[str, ...] = tuple(
    f"{kind}_{split}" for kind in ("harmful", "harmless") for split in ("train", "val", "test")
)

#: Keys looked up, in this order, in an object of a JSON/JSONL file or a CSV header.
PROMPT_KEYS: tuple[str, ...] = ("instruction", "goal", "prompt")
_CSV_KEYS: tuple[str, ...] = ("goal", "instruction", "prompt")

_SUFFIXES = (".csv", ".json", ".jsonl")


def load_prompts(path_or_name: str | os.PathLike[str]) -> list[str]:
    """The instructions of a built-in prompt set or of a prompt file, in file order.

    Args:
        path_or_name: a built-in set name (one of :data:`BUILTIN_PROMPT_SETS`,
            e.g. ``"harmful_test"``) or the path of a ``.csv``, ``.json`` or
            ``.jsonl`` file.

    Returns:
        The instructions as non-empty strings (surrounding whitespace stripped).

    Raises:
        InvalidArgumentError: the file is missing, not a file, of an
            unsupported format, malformed, or holds an entry without a prompt.
        EmptyInputError: the file holds no prompts.
    """
    return [record["instruction"] for record in load_prompt_records(path_or_name)]


def load_prompt_records(path_or_name: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Like :func:`load_prompts` but keeps each entry's category (``""`` when the file has none).

    Returns:
        One ``{"instruction": str, "category": str}`` dict per prompt.
    """
    if isinstance(path_or_name, str) and path_or_name in BUILTIN_PROMPT_SETS:
        resource = resources.files("refusal_core").joinpath("data", "prompts", f"{path_or_name}.jsonl")
        with resources.as_file(resource) as builtin_path:
            return _read_file(Path(builtin_path), f"built-in prompt set {path_or_name!r}")
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise InvalidArgumentError(f"path_or_name must be a str or path, got {type(path_or_name).__name__}")
    path = Path(path_or_name)
    label = f"prompt file {str(path)!r}"
    if not path.exists():
        hint = (
            f"; built-in sets are {', '.join(BUILTIN_PROMPT_SETS)}"
            if isinstance(path_or_name, str) and not path.suffix
            else ""
        )
        raise InvalidArgumentError(f"{label} does not exist{hint}")
    if not path.is_file():
        raise InvalidArgumentError(f"{label} is not a regular file")
    if path.suffix.lower() not in _SUFFIXES:
        raise InvalidArgumentError(
            f"{label} has unsupported format {path.suffix or '(no suffix)'!r}; "
            f"supported: CSV with a 'goal' column, JSON list, JSONL"
        )
    return _read_file(path, label)


def _read_file(path: Path, label: str) -> list[dict[str, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"{label} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise InvalidArgumentError(f"{label} cannot be read: {exc}") from None
    if not text.strip():
        raise EmptyInputError(f"{label} is empty")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        records = _parse_csv(text, label)
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"{label} is not valid JSON: {exc}") from None
        if not isinstance(data, list):
            raise InvalidArgumentError(
                f"{label} must hold a JSON list of strings or objects, got {type(data).__name__}"
            )
        records = [_entry(item, f"{label}, item {i}") for i, item in enumerate(data)]
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(f"{label}, line {lineno} is not valid JSON: {exc}") from None
            records.append(_entry(item, f"{label}, line {lineno}"))
    if not records:
        raise EmptyInputError(f"{label} holds no prompts")
    return records


def _parse_csv(text: str, label: str) -> list[dict[str, str]]:
    reader = csv.DictReader(text.splitlines())
    fields = [f.strip() for f in (reader.fieldnames or [])]
    key = next((k for k in _CSV_KEYS if k in fields), None)
    if key is None:
        raise InvalidArgumentError(
            f"{label} has no 'goal' column (AdvBench layout); its columns are {fields}"
        )
    records = []
    # Row 1 is the header, so data rows start at line 2.
    for lineno, row in enumerate(reader, start=2):
        row = {(k or "").strip(): v for k, v in row.items()}
        value = row.get(key)
        if value is None or not value.strip():
            raise InvalidArgumentError(f"{label}, line {lineno} has an empty {key!r}")
        records.append({"instruction": value.strip(), "category": str(row.get("category") or "").strip()})
    return records


def _entry(item: Any, where: str) -> dict[str, str]:
    if isinstance(item, str):
        value: Any = item
        category: Any = ""
    elif isinstance(item, dict):
        key = next((k for k in PROMPT_KEYS if k in item), None)
        if key is None:
            raise InvalidArgumentError(
                f"{where} has none of the keys {list(PROMPT_KEYS)}; keys: {sorted(item)}"
            )
        value, category = item[key], item.get("category", "")
    else:
        raise InvalidArgumentError(f"{where} must be a string or an object, got {type(item).__name__}")
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgumentError(f"{where} has an empty or non-string prompt: {value!r}")
    return {"instruction": value.strip(), "category": str(category or "")}
