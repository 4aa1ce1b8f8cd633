"""Data loader of refusal_core's local lm-eval tasks, for plain ``lm_eval --include_path``.

lm-eval hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset`` as they are, so a
relative path resolves from the directory lm-eval was started in. Each task's YAML names
``custom_dataset: !function rc_tasks.load_json_splits``; lm-eval imports this file from beside
the YAML and calls the function with the task's ``dataset_kwargs`` (and ``metadata``), and the
data files resolve from this folder instead, wherever lm-eval runs. refusal_core itself reads
the YAML with its own loader and resolves the same paths the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load_json_splits(data_files: dict[str, str] | None = None, **_: Any) -> Any:
    """``datasets.DatasetDict`` of the JSON-lines ``data_files`` (``{split: path}``), relative
    paths taken from this folder; other keyword arguments (lm-eval's metadata) are ignored."""
    import datasets

    if not data_files:
        raise ValueError("rc_tasks.load_json_splits needs dataset_kwargs.data_files ({split: file})")
    files = {split: str(p if Path(p).is_absolute() else HERE / p) for split, p in data_files.items()}
    return datasets.load_dataset("json", data_files=files)
