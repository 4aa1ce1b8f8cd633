"""Zero-shot multiple-choice accuracy, through lm-eval or an in-house scorer.

Each item is a context and a list of choices; the model's prediction is the
choice whose continuation (``target_delimiter + choice``) has the highest total
log-likelihood given the context (``acc``), or the highest log-likelihood per
character of the choice (``acc_norm``).

Two backends compute the same thing:

* ``"lm_eval"`` (default when installed): the in-memory model is wrapped in
  lm-eval's ``HFLM`` and evaluated by ``simple_evaluate``. It runs the project's
  local tasks and, on machines that hold their data, the standard task names
  (:data:`STANDARD_TASKS`).
* ``"native"``: the same log-likelihood scoring written here, for the local
  YAML tasks only (no ``datasets`` / lm-eval needed). It tokenizes exactly as
  lm-eval does for a causal model (the context's trailing whitespace moves to
  the continuation; the continuation's tokens are those of
  ``encode(context + continuation)`` after ``encode(context)``), so the two
  backends agree item by item; the tests check that.

The local tasks (:data:`LOCAL_TASKS`) are small multiple-choice sets written
for this project (``refusal_core/data/tasks/*.yaml`` + ``.jsonl``), so
zero-shot accuracy runs offline in CI. A task may also be given as a path to a
YAML file of the same form (``dataset_path: json``, ``data_files`` relative to
the YAML).

Example:
    >>> from refusal_core.testing.tiny import tiny_model, tiny_tokenizer
    >>> acc = zero_shot_accuracy(tiny_model(), tiny_tokenizer(), ["rc_arithmetic"], limit=4,
    ...                          backend="native", progress=False)
    >>> 0.0 <= acc["rc_arithmetic"] <= 1.0
    True
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from refusal_core.errors import ArtifactError, EmptyInputError, InvalidArgumentError
from refusal_core.evaluation.generation import _check_positive_int, eval_mode
from refusal_core.model import model_device

__all__ = [
    "LOCAL_TASKS",
    "STANDARD_TASKS",
    "TASKS_DIR",
    "McItem",
    "TaskResult",
    "choice_loglikelihoods",
    "lm_eval_available",
    "load_local_task",
    "zero_shot_accuracy",
    "zero_shot_evaluate",
]

#: Directory of the local task files shipped with refusal_core.
TASKS_DIR = Path(__file__).resolve().parent.parent / "data" / "tasks"

#: Local multiple-choice tasks written for this project (run offline).
LOCAL_TASKS: tuple[str, ...] = ("rc_arithmetic", "rc_word_knowledge", "rc_odd_one_out")

#: The zero-shot tasks of the paper; need their datasets on the machine (lm-eval backend only).
STANDARD_TASKS: tuple[str, ...] = (
    "boolq",
    "rte",
    "hellaswag",
    "winogrande",
    "arc_challenge",
    "openbookqa",
    "arc_easy",
)

_METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class McItem:
    """One multiple-choice item: the context, the choices (without delimiter) and the gold index."""

    context: str
    choices: tuple[str, ...]
    target: int
    delimiter: str = " "


@dataclass
class TaskResult:
    """Accuracy on one task plus the per-item evidence.

    ``loglikelihoods[i][c]`` is the total log-likelihood (nats) of choice ``c``
    of item ``i``; ``targets[i]`` the gold index.
    """

    task: str
    metric: str
    accuracy: float
    backend: str
    loglikelihoods: list[list[float]] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    #: Standard error of ``accuracy``: lm-eval's own (its closed form for a mean, the sample standard
    #: deviation over √n); the native backend computes the same formula. None with fewer than two items.
    stderr: float | None = None

    @property
    def n_items(self) -> int:
        return len(self.targets)


def lm_eval_available() -> bool:
    """Whether lm-eval can be imported here."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------
# local task files
# ----------------------------------------------------------------------------


def _task_yaml(task: str) -> Path | None:
    """The YAML of a local task name or path, None for anything else (a standard task name)."""
    if task in LOCAL_TASKS:
        return TASKS_DIR / f"{task}.yaml"
    if task.endswith((".yaml", ".yml")):
        path = Path(task)
        if not path.is_file():
            raise ArtifactError(f"task file {task!r} does not exist")
        return path
    return None


class _TaskYamlLoader(yaml.SafeLoader):
    """Safe YAML that reads lm-eval's ``!function module.name`` tag as the plain string."""


_TaskYamlLoader.add_constructor(
    "!function",
    lambda loader, node: f"!function {loader.construct_scalar(node)}",
)


def _local_config(yaml_path: Path) -> dict[str, Any]:
    """The config of a local task YAML, ``data_files`` made absolute (lm-eval resolves them from cwd).

    ``custom_dataset`` (the shipped tasks' loader for plain lm-eval, which resolves the same paths)
    is dropped: with absolute ``data_files`` lm-eval's own JSON loading does the same.
    """
    try:
        config = yaml.load(yaml_path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)  # a SafeLoader
    except (OSError, yaml.YAMLError) as exc:
        raise ArtifactError(f"task file {str(yaml_path)!r} cannot be read: {exc}") from exc
    if not isinstance(config, dict) or "task" not in config:
        raise ArtifactError(f"task file {str(yaml_path)!r} has no 'task' key")
    files = config.get("dataset_kwargs", {}).get("data_files")
    if config.get("dataset_path") != "json" or not isinstance(files, dict) or not files:
        raise ArtifactError(
            f"task {config['task']!r}: local tasks need dataset_path: json and dataset_kwargs.data_files"
        )
    resolved = {}
    for split, rel in files.items():
        path = Path(rel) if Path(rel).is_absolute() else yaml_path.parent / rel
        if not path.is_file():
            raise ArtifactError(f"task {config['task']!r}: data file {str(path)!r} does not exist")
        resolved[split] = str(path.resolve())
    config = {**config, "dataset_kwargs": {**config["dataset_kwargs"], "data_files": resolved}}
    config.pop("custom_dataset", None)
    return config


def _render(template: Any, doc: dict[str, Any]) -> Any:
    """lm-eval's convention: a field name, a Jinja template, or a literal."""
    if isinstance(template, str):
        if template in doc:
            return doc[template]
        import jinja2

        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        return env.from_string(template).render(**doc)
    return template


def load_local_task(task: str) -> tuple[str, list[McItem]]:
    """Name and items of a local task (a :data:`LOCAL_TASKS` name or a YAML path), for the native backend."""
    yaml_path = _task_yaml(task)
    if yaml_path is None:
        raise InvalidArgumentError(
            f"task {task!r} is not a local task; the native backend runs {list(LOCAL_TASKS)} or a YAML path"
        )
    config = _local_config(yaml_path)
    name = str(config["task"])
    if config.get("output_type") != "multiple_choice":
        raise InvalidArgumentError(f"task {name!r} is not multiple_choice")
    split = config.get("test_split") or config.get("validation_split")
    files = config["dataset_kwargs"]["data_files"]
    if split not in files:
        raise ArtifactError(f"task {name!r}: split {split!r} has no data file")
    delimiter = str(config.get("target_delimiter", " "))
    items = []
    with open(files[split], encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                context = str(_render(config["doc_to_text"], doc))
                raw_choices = _render(config["doc_to_choice"], doc)
                choices = ast.literal_eval(raw_choices) if isinstance(raw_choices, str) else raw_choices
                target = _render(config["doc_to_target"], doc)
                if isinstance(target, str):
                    target = int(target) if target.strip().isdigit() else list(choices).index(target)
                items.append(McItem(context, tuple(str(c) for c in choices), int(target), delimiter))
            except (KeyError, ValueError, SyntaxError, TypeError, json.JSONDecodeError) as exc:
                raise ArtifactError(
                    f"task {name!r}: line {line_no} of {files[split]!r} is malformed: {exc}"
                ) from exc
    if not items:
        raise EmptyInputError(f"task {name!r} has no items")
    return name, items


# ----------------------------------------------------------------------------
# native scoring
# ----------------------------------------------------------------------------


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens the way lm-eval's HFLM splits them for a causal model."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(tokenizer.encode(context + continuation))
    ctx = list(tokenizer.encode(context))
    return ctx, whole[len(ctx) :]


def _prefix_id(tokenizer: Any) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos if bos is not None else tokenizer.eos_token_id)


@torch.no_grad()
def choice_loglikelihoods(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[McItem],
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> list[list[float]]:
    """Total log-likelihood (nats) of every choice of every item, ``[n_items][n_choices]``.

    Sequences are right-padded (a causal model's positions are then those of
    the unpadded sequence) and scored in float32 log-softmax.
    """
    batch_size = _check_positive_int(batch_size, "batch_size")
    requests: list[tuple[int, int, list[int], list[int]]] = []
    for i, item in enumerate(items):
        for c, choice in enumerate(item.choices):
            if item.context:
                ctx, cont = _encode_pair(tokenizer, item.context, item.delimiter + choice)
            else:
                cont = list(tokenizer.encode(item.delimiter + choice, add_special_tokens=False))
                ctx = [_prefix_id(tokenizer)]
            if not cont:
                raise InvalidArgumentError(f"item {i} choice {c} ({choice!r}) tokenizes to nothing")
            requests.append((i, c, ctx, cont))
    out = [[0.0] * len(item.choices) for item in items]
    device = model_device(model)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad if pad is not None else tokenizer.eos_token_id)
    with eval_mode(model):
        for start in tqdm(range(0, len(requests), batch_size), desc="loglikelihood", disable=not progress):
            chunk = requests[start : start + batch_size]
            seqs = [(ctx + cont)[:-1] for _, _, ctx, cont in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, s in enumerate(seqs):
                ids[row, : len(s)] = torch.tensor(s)
                mask[row, : len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, (i, c, ctx, cont) in enumerate(chunk):
                first = len(ctx) - 1
                positions = torch.arange(first, first + len(cont))
                out[i][c] = float(logp[row, positions, torch.tensor(cont)].sum())
    return out


def _accuracy(lls: Sequence[Sequence[float]], items: Sequence[McItem], metric: str) -> float:
    correct = 0
    for ll, item in zip(lls, items):
        scores = torch.tensor(ll, dtype=torch.float64)
        if metric == "acc_norm":
            scores = scores / torch.tensor([float(len(c)) for c in item.choices], dtype=torch.float64)
        # argmax returns the first maximum, as numpy's does in lm-eval.
        correct += int(int(scores.argmax()) == item.target)
    return correct / len(items)


def _limit_items(items: list[McItem], limit: int | float | None) -> list[McItem]:
    if limit is None:
        return items
    # lm-eval's rule: below 1 a fraction (rounded up), else a count.
    n = math.ceil(len(items) * limit) if limit < 1.0 else int(limit)
    return items[:n]


def _native(
    model: nn.Module,
    tokenizer: Any,
    task: str,
    *,
    limit: int | float | None,
    metric: str,
    batch_size: int,
    progress: bool,
) -> TaskResult:
    name, items = load_local_task(task)
    items = _limit_items(items, limit)
    lls = choice_loglikelihoods(model, tokenizer, items, batch_size=batch_size, progress=progress)
    acc = _accuracy(lls, items, metric)
    n = len(items)
    # lm-eval's closed form for a mean: sample standard deviation (ddof 1) over sqrt(n).
    stderr = math.sqrt(acc * (1.0 - acc) / (n - 1)) if n > 1 else None
    return TaskResult(name, metric, acc, "native", lls, [it.target for it in items], stderr=stderr)


# ----------------------------------------------------------------------------
# lm-eval backend
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def _no_retie(model: nn.Module) -> Iterator[None]:
    """HFLM calls ``tie_weights()`` on the model it is given; keep an edited model exactly as it is."""
    # An instance attribute shadows the method for this block only.
    object.__setattr__(model, "tie_weights", lambda *args, **kwargs: None)
    try:
        yield
    finally:
        with contextlib.suppress(AttributeError):
            object.__delattr__(model, "tie_weights")


@contextlib.contextmanager
def _quiet_git_hash() -> Iterator[None]:
    """lm-eval's bookkeeping of where a result came from, made quiet and cheap; refusal_core reads
    only its ``results`` and ``samples``, never these records.

    * lm-eval records ``git describe`` of the working directory by running git with the terminal's
      stderr, so every evaluation outside a checkout printed "fatal: not a git repository" (13 lines
      per study). The same hash, asked with git's stderr discarded (once per directory and process).
    * ``add_env_info`` ran torch's ``collect_env`` (about 11 subprocesses: pip, compilers, GPU
      probes) on every call, half a second per evaluated model here. Skipped: the results get a
      ``pretty_env_info`` that says so, the versions still recorded.
    """
    import os
    import subprocess

    import lm_eval.evaluator as evaluator

    def git_hash() -> str | None:
        cwd = os.getcwd()
        if cwd not in _GIT_HASHES:
            try:
                done = subprocess.run(
                    ["git", "describe", "--always"], capture_output=True, text=True, timeout=10, check=False
                )
            except (OSError, subprocess.SubprocessError):
                _GIT_HASHES[cwd] = None
            else:
                _GIT_HASHES[cwd] = done.stdout.strip() or None if done.returncode == 0 else None
        return _GIT_HASHES[cwd]

    def env_info(storage: dict[str, Any]) -> None:
        from importlib.metadata import PackageNotFoundError, version

        def ver(pkg: str) -> str:
            try:
                return version(pkg)
            except PackageNotFoundError:
                return "N/A"

        storage.update(
            {
                "pretty_env_info": "not collected (torch.utils.collect_env runs subprocesses)",
                "transformers_version": ver("transformers"),
                "lm_eval_version": ver("lm_eval"),
                "upper_git_hash": None,
            }
        )

    saved = {name: getattr(evaluator, name, None) for name in ("get_git_commit_hash", "add_env_info")}
    patched = {"get_git_commit_hash": git_hash, "add_env_info": env_info}
    for name, replacement in patched.items():
        if saved[name] is not None:  # another lm-eval layout: leave what it does not have
            setattr(evaluator, name, replacement)
    try:
        yield
    finally:
        for name, original in saved.items():
            if original is not None:
                setattr(evaluator, name, original)


#: ``git describe`` per working directory, asked once per process (see :func:`_quiet_git_hash`).
_GIT_HASHES: dict[str, str | None] = {}


@functools.lru_cache(maxsize=2)
def _task_manager(include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=include_defaults)


def _lm_eval_task(spec: str, task_manager: Any) -> tuple[str, Any]:
    """Load one task (its dataset included) or raise a refusal_core error naming it."""
    from lm_eval.tasks import get_task_dict

    yaml_path = _task_yaml(spec)
    if yaml_path is not None:
        config = _local_config(yaml_path)
        entry: Any = config
        name = str(config["task"])
    else:
        if spec not in task_manager.all_tasks:
            raise InvalidArgumentError(
                f"unknown zero-shot task {spec!r}: not a local task {list(LOCAL_TASKS)}, not a YAML path, "
                f"and not an lm-eval task name (e.g. {list(STANDARD_TASKS)})"
            )
        entry, name = spec, spec
    try:
        if hasattr(task_manager, "load"):  # lm-eval >= 0.4.10: flat {"tasks": {name: Task}, ...}
            task_dict = dict(task_manager.load([entry])["tasks"])
        else:
            task_dict = get_task_dict([entry], task_manager)
    except Exception as exc:  # lm-eval and datasets raise many kinds; all mean "cannot load"
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            " (offline mode is on: the dataset must already be in the local datasets cache)"
            if offline
            else ""
        )
        raise ArtifactError(
            f"zero-shot task {name!r} could not be loaded{hint}: {type(exc).__name__}: {exc}"
        ) from exc
    return name, task_dict


def _run_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | float | None,
    metric: str,
    batch_size: int,
    progress: bool = True,
) -> dict[str, TaskResult]:
    import contextlib
    import io

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    # Indexing lm-eval's built-in tasks takes seconds; only standard task names need it.
    manager = _task_manager(include_defaults=any(_task_yaml(t) is None for t in tasks))
    loaded = [_lm_eval_task(spec, manager) for spec in tasks]
    task_objects = [obj for _, d in loaded for obj in d.values()]
    # lm-eval draws its own progress bars on stderr; without progress they are swallowed.
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet, eval_mode(model), _no_retie(model), _quiet_git_hash():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=task_objects,
            limit=limit,
            log_samples=True,
            # 1, not 0: with 0 lm-eval computes no standard error at all; for accuracy (a mean) it then
            # uses its closed form, so no resampling happens.
            bootstrap_iters=1,
            verbosity="ERROR",
            task_manager=manager,
        )
    if results is None:
        raise ArtifactError("lm-eval returned no results")
    out: dict[str, TaskResult] = {}
    for name, _ in loaded:
        task_res = results["results"].get(name, {})
        key = f"{metric},none"
        if key not in task_res:
            raise InvalidArgumentError(f"task {name!r} does not report metric {metric!r}: {sorted(task_res)}")
        samples = sorted(results.get("samples", {}).get(name, []), key=lambda s: s["doc_id"])
        lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        targets = [int(s["target"]) if not isinstance(s["target"], list) else -1 for s in samples]
        stderr = task_res.get(f"{metric}_stderr,none")
        out[name] = TaskResult(
            name,
            metric,
            float(task_res[key]),
            "lm_eval",
            lls,
            targets,
            stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
        )
    return out


# ----------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------


def zero_shot_evaluate(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] = LOCAL_TASKS,
    *,
    limit: int | float | None = None,
    metric: str = "acc",
    backend: str = "auto",
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, TaskResult]:
    """Per-task accuracy with per-item log-likelihoods.

    ``tasks``: local names, YAML paths, or (lm-eval backend) standard task
    names. ``limit``: the first ``limit`` items per task (a float < 1: that
    fraction). ``backend``: ``"lm_eval"``, ``"native"`` or ``"auto"`` (lm-eval
    when importable, else native). A standard task whose data is missing
    raises :class:`~refusal_core.errors.ArtifactError` naming the task; an
    unknown name raises :class:`~refusal_core.errors.InvalidArgumentError`.
    """
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise EmptyInputError("tasks must be a non-empty sequence of task names or YAML paths")
    for i, t in enumerate(tasks):
        if not isinstance(t, str) or not t:
            raise InvalidArgumentError(f"tasks[{i}] must be a non-empty str, got {t!r}")
    if len(set(tasks)) != len(tasks):
        raise InvalidArgumentError(f"tasks repeats a task: {list(tasks)}")
    if metric not in _METRICS:
        raise InvalidArgumentError(f"metric must be one of {_METRICS}, got {metric!r}")
    if backend not in ("auto", "lm_eval", "native"):
        raise InvalidArgumentError(f"backend must be 'auto', 'lm_eval' or 'native', got {backend!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise InvalidArgumentError(f"limit must be a positive number or None, got {limit!r}")
    batch_size = _check_positive_int(batch_size, "batch_size")
    if backend == "auto":
        backend = "lm_eval" if lm_eval_available() else "native"
    if backend == "native":
        for t in tasks:
            if _task_yaml(t) is None:
                raise InvalidArgumentError(
                    f"task {t!r} needs the lm_eval backend (the native backend runs local YAML tasks only)"
                )
        return {
            r.task: r
            for r in (
                _native(
                    model, tokenizer, t, limit=limit, metric=metric, batch_size=batch_size, progress=progress
                )
                for t in tasks
            )
        }
    if not lm_eval_available():
        raise InvalidArgumentError(
            "backend 'lm_eval' requested but lm-eval is not installed (pip install lm-eval)"
        )
    return _run_lm_eval(
        model, tokenizer, tasks, limit=limit, metric=metric, batch_size=batch_size, progress=progress
    )


def zero_shot_accuracy(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] = LOCAL_TASKS,
    *,
    limit: int | float | None = None,
    metric: str = "acc",
    backend: str = "auto",
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, float]:
    """Accuracy in [0, 1] per task; see :func:`zero_shot_evaluate` for the arguments."""
    results = zero_shot_evaluate(
        model,
        tokenizer,
        tasks,
        limit=limit,
        metric=metric,
        backend=backend,
        batch_size=batch_size,
        progress=progress,
    )
    return {name: r.accuracy for name, r in results.items()}
