"""The ``refusal-core`` command line.

``refusal-core study`` runs the whole experiment (on the embedded toy model by
default); its options are generated from :class:`~refusal_core.study.StudyConfig`
(nested configs flattened: ``--aird-alpha-attn``, ``--selection-kl-threshold``)
and ``--config FILE.toml`` sets any of them (command-line values win over the
file, the file over the defaults); the resolved config is written to the run
directory as ``config.toml`` before the work starts.

``extract``, ``compress``, ``aird`` and ``evaluate`` run one step each, and
chain by directory: ``compress`` and ``aird`` write Hugging Face checkpoint
directories that ``--model`` of every step accepts, ``extract --select`` writes
the direction that ``aird --direction`` reads::

    refusal-core compress --model toy --method magnitude --out c
    refusal-core extract --model toy --select --out d
    refusal-core aird --model c --direction d --out a
    refusal-core evaluate --model a --out e

``--method`` on ``extract``, ``aird`` and ``evaluate`` compresses the loaded
model in memory first (``aird --method llm-int8`` edits through
dequantize-edit-requantize). Every error of refusal_core, and every bad
command line, prints one line and exits with status 2; the output location is
checked before any model is loaded, and a failing command leaves no empty
output directory behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from refusal_core import _cli_config as cc
from refusal_core._version import version_line
from refusal_core.errors import InvalidArgumentError, RefusalCoreError

if TYPE_CHECKING:
    from refusal_core.study import StudyResults

__all__ = ["COMMANDS", "build_parser", "check_output_location", "judge_from_spec", "main"]

#: Help of config fields that carry no comment or docstring in their own class.
HELP: dict[tuple[str, str], str] = {
    ("StudyConfig", "model"): (
        "'toy' or 'toy-moe' (the packaged organisms), a local HF model directory (one this tool "
        "wrote too), or a .gguf file"
    ),
    ("StudyConfig", "methods"): "comma-separated compression methods (pruning methods take @SPARSITY)",
    ("StudyConfig", "harmful_train"): "harmful prompts for extraction (built-in split name or file)",
    ("StudyConfig", "harmless_train"): "harmless prompts for extraction (built-in split name or file)",
    ("StudyConfig", "harmful_val"): "harmful prompts for selection (built-in split name or file)",
    ("StudyConfig", "harmless_val"): "harmless prompts for selection (built-in split name or file)",
    ("StudyConfig", "harmful_test"): "harmful prompts for evaluation (built-in split name or file)",
    ("StudyConfig", "harmless_test"): "harmless prompts for evaluation (built-in split name or file)",
    ("StudyConfig", "calibration"): "calibration data of Wanda and AWQ: harmless, harmful, mix, a prompt "
    "set or file (.txt: one prompt per line), or text:FILE (plain text)",
    ("StudyConfig", "n_train"): "prompts per class for extraction",
    ("StudyConfig", "n_val"): "prompts per class for selection",
    ("StudyConfig", "n_test"): "prompts per class for evaluation",
    ("StudyConfig", "n_calibration"): "calibration prompts",
    ("StudyConfig", "noise_splits"): "random half splits of the split-half noise floor",
    ("StudyConfig", "zero_shot_tasks"): "comma-separated zero-shot tasks ('' for none)",
    (
        "StudyConfig",
        "refusal_token_ids",
    ): "token ids whose probability is the refusal score (none: per model)",
    ("StudyConfig", "max_new_tokens"): "tokens generated per completion",
    ("StudyConfig", "batch_size"): "prompts per forward pass",
    ("StudyConfig", "seed"): "seed of every random choice",
    ("AirdConfig", "alpha_attn"): "AIRD step size at o_proj (paper: 0.02; none when the gain is given)",
    ("AirdConfig", "alpha_mlp"): "AIRD step size at down_proj (paper: 0.01; none when the gain is given)",
    ("AirdConfig", "gain_attn"): "AIRD gain along r/|r| at o_proj, g = 1 + alpha |r|^2 (instead of alpha)",
    ("AirdConfig", "gain_mlp"): "AIRD gain along r/|r| at down_proj, g = 1 + alpha |r|^2 (instead of alpha)",
    ("RepairConfig", "gains"): "gains of the AIRD sweep on every compressed model",
    ("RepairConfig", "include_paper_alpha"): "also sweep the paper's alphas (alpha_attn, alpha_mlp)",
    ("RepairConfig", "layers"): "where the repair edits: base (base model's source layer), own, or both",
    ("RepairConfig", "sparse"): "on pruned models, also sweep the sparsity-preserving update",
    ("RepairConfig", "max_over_refusal_increase"): "admissible: over-refusal at most the base model's + this",
    ("RepairConfig", "max_kl_increase"): "admissible: KL to the base at most the compressed model's + this",
    ("RepairConfig", "generate"): "score the sweep on generations (--no-...: on the refusal score, cheaper)",
    ("AirdConfig", "normalize"): "AIRD with the unit direction r/|r| instead of the raw difference in means",
    (
        "AirdConfig",
        "preserve_sparsity",
    ): "restrict the AIRD update to the nonzero weights (sparsity unchanged)",
    ("AttackSettings", "system_prompt"): "system prompt of the system-prompt attack",
    ("AttackSettings", "decoding_temperatures"): "temperatures of the decoding attack's grid",
    ("AttackSettings", "decoding_top_ps"): "top-p values of the decoding attack's grid",
    ("AttackSettings", "decoding_top_ks"): "top-k values of the decoding attack's grid (0: off)",
    ("AttackSettings", "decoding_samples"): "samples per prompt and grid point",
    (
        "AttackSettings",
        "gcg_prompts",
    ): "harmful prompts GCG optimises its universal suffix on (0 disables GCG)",
    ("AttackSettings", "gcg_steps"): "GCG optimisation steps (0 disables GCG)",
    ("AttackSettings", "gcg_suffix_len"): "GCG suffix length in tokens",
    ("AttackSettings", "gcg_topk"): "GCG top-k token substitutions per position",
    ("AttackSettings", "gcg_candidates"): "GCG candidate suffixes per step",
    ("AttackSettings", "gcg_target"): "GCG target completion",
}

#: Flags of older command lines, kept as aliases of the generated ones.
STUDY_ALIASES: dict[str, tuple[str, ...]] = {
    "aird.alpha_attn": ("--alpha-attn",),
    "aird.alpha_mlp": ("--alpha-mlp",),
    "attacks.gcg_steps": ("--gcg-steps",),
    "zero_shot_tasks": ("--tasks",),
}

#: Every spelling ``--dtype`` takes (every command, and ``dtype`` in a study config) → the dtype
#: name ``load_model`` takes; ``auto``/``none``: float32 on CPU, the checkpoint's own on a GPU.
DTYPE_SPELLINGS: dict[str, str | None] = {
    "auto": None,
    "none": None,
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
DTYPES = tuple(DTYPE_SPELLINGS)
_DEVICE = re.compile(r"^(cpu|auto|cuda|cuda:\d+)$")


# ----------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default; options without one (required, or with the default in the text) show none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required or action.default is None or "(default:" in text:
            return text
        return super()._get_help_string(action)


def _dtype_spelling(text: str) -> str:
    if text.strip().lower() not in DTYPE_SPELLINGS:
        raise argparse.ArgumentTypeError(f"--dtype must be one of {', '.join(DTYPES)}, got {text!r}")
    return text.strip().lower()


def _device(text: str) -> str:
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"--device must be cpu, cuda, cuda:N or auto, got {text!r}")
    return text


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonnegative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _attack_names(text: str) -> tuple[str, ...]:
    """``--attacks``: comma-separated names of registered attacks."""
    from refusal_core.evaluation.attacks import check_attack_names

    try:
        return check_attack_names(tuple(n.strip() for n in text.split(",") if n.strip()))
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_JUDGE = re.compile(r"^(substring|classifier(-llamaguard|-harmbench)?:.+)$", re.DOTALL)


def _judge_spec(text: str) -> str:
    if not _JUDGE.match(text):
        raise argparse.ArgumentTypeError(
            f"--judge must be 'substring' or 'classifier[-llamaguard|-harmbench]:DIR', got {text!r}"
        )
    return text


def _add_load_args(p: argparse.ArgumentParser, *, method: str | None) -> None:
    """Options of every command that loads a model."""
    p.add_argument(
        "--model",
        default="toy",
        help=(
            "'toy' or 'toy-moe' (the packaged organisms), a local HF model directory (also one this "
            "tool wrote), or a .gguf file"
        ),
    )
    if method == "optional":
        p.add_argument(
            "--method",
            default=None,
            help="compress the model in memory first (e.g. wanda, wanda-2:4, magnitude@0.3, llm-int8)",
        )
    elif method == "required":
        p.add_argument(
            "--method",
            required=True,
            help="compression method (e.g. wanda, wanda-2:4, magnitude@0.3, llm-int8)",
        )
    p.add_argument(
        "--device", type=_device, default="cpu", help="cpu, cuda, cuda:N, or auto (all visible GPUs)"
    )
    p.add_argument(
        "--dtype",
        type=_dtype_spelling,
        default="auto",
        metavar="{auto,float32,bfloat16,float16}",
        help="dtype of the model's weights (auto: float32 on CPU, the checkpoint's own on a GPU)",
    )
    p.add_argument(
        "--chat-template",
        metavar="FILE",
        default=None,
        help="Jinja chat template for a tokenizer without one",
    )
    p.add_argument("--seed", type=_nonnegative, default=0, help="seed of every random choice")
    _add_progress(p)


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="hide every progress bar, also the libraries' (always hidden when stderr is not a terminal)",
    )


def _add_verbosity(p: argparse.ArgumentParser, *, top: bool) -> None:
    """``-v``/``-q`` (before or after the subcommand: a subcommand's copy only counts when given)."""
    default = 0 if top else argparse.SUPPRESS
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default,
        help="more messages on stderr: -v notes, -vv also debug and the libraries' warnings "
        "(default: warnings and errors)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=default,
        help="errors only on stderr, warnings hidden (default: off)",
    )


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    from refusal_core.study import StudyConfig

    d = StudyConfig()
    p.add_argument(
        "--calibration",
        default=d.calibration,
        help="calibration data of Wanda and AWQ: harmless, harmful, mix, a prompt set or file "
        "(.txt: one prompt per line), or text:FILE (plain text)",
    )
    p.add_argument("--n-calibration", type=_count, default=d.n_calibration, help="calibration prompts")
    p.add_argument("--batch-size", type=_count, default=d.batch_size, help="prompts per forward pass")


def _study_options() -> list[cc.ConfigOption]:
    from refusal_core.study import StudyConfig

    return cc.config_options(StudyConfig, table=HELP)


def _selection_options() -> list[cc.ConfigOption]:
    from refusal_core.selection import SelectionConfig

    return cc.config_options(SelectionConfig, table=HELP, prefix=("selection",))


def _aird_options() -> list[cc.ConfigOption]:
    from refusal_core.aird import AirdConfig

    return cc.config_options(AirdConfig, table=HELP)


class _VersionAction(argparse.Action):
    """``--version``: the version line is computed (git is asked) only when the flag is given."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "print the version (and the git commit of a checkout) and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        sys.stdout.write(version_line() + "\n")  # on stdout, as argparse's own version action
        parser.exit(0)


#: One line per subcommand, for ``refusal-core --help`` (kept equal to the full parser's by a test).
COMMAND_HELP: dict[str, str] = {
    "study": "run (or resume) the whole study and write a report",
    "extract": "candidate directions (and the selected one) of a model",
    "compress": "compress a model and save it as a checkpoint directory",
    "compare": "compare two saved candidate sets",
    "aird": "apply AIRD with a saved direction and save the repaired checkpoint",
    "evaluate": "ASR per attack and over-refusal of a model",
    "audit": "audit a compressed checkpoint against its base (optionally repair it)",
    "frontier": "run one method at several levels and find the safe compression frontier",
    "export": "write a model (toy, checkpoint, repaired model) as a GGUF file for llama.cpp",
    "oracle": "run the property suite against your implementation module (exit code: pytest's)",
}

_COMMON: dict[str, Any] = {"formatter_class": _Formatter, "allow_abbrev": False}


def _top_parser() -> tuple[argparse.ArgumentParser, Any]:
    top = _Parser(
        prog="refusal-core",
        description="Did compressing this model break its refusal direction, and can AIRD repair it?",
        **_COMMON,
    )
    top.add_argument("--version", action=_VersionAction)
    _add_verbosity(top, top=True)
    return top, top.add_subparsers(dest="command", required=True, parser_class=_Parser)


def _add_study_parser(sub: Any, options: Sequence[cc.ConfigOption]) -> argparse.ArgumentParser:
    s = sub.add_parser("study", help=COMMAND_HELP["study"], **_COMMON)
    s.add_argument(
        "--config", metavar="FILE.toml", default=None, help="study settings (command-line values win)"
    )
    s.add_argument(
        "--out", default="runs/study", help="run directory (artifacts, config.toml, report.md, plots)"
    )
    _add_progress(s)
    taken = {o.flag for o in options} | {"--config", "--out", "--no-progress"}
    aliases = {k: tuple(f for f in v if f not in taken) for k, v in STUDY_ALIASES.items()}
    file_only = cc.add_config_options(s, options, aliases=aliases, title="study settings (StudyConfig)")
    if file_only:
        s.epilog = "settable only in --config: " + ", ".join(o.key for o in file_only)
    return s


#: ``study --help`` without importing the config modules (they import torch): StudyConfig's options
#: as data, kept equal to the live ones by a test (regenerate: :func:`write_study_options_cache`).
STUDY_OPTIONS_CACHE = Path(__file__).parent / "data" / "study_options.json"
_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str}


def _option_to_json(o: cc.ConfigOption) -> dict[str, Any]:
    element = next((k for k, t in _TYPES.items() if t is o.element), None)
    default = list(o.default) if isinstance(o.default, tuple) else o.default
    if o.kind == "other":
        default = None  # shown nowhere (config-file only)
    return {
        "path": list(o.path),
        "flag": o.flag,
        "kind": o.kind,
        "default": default,
        "help": o.help,
        "help_source": o.help_source,
        "optional": o.optional,
        "element": element,
        "length": o.length,
        "choices": list(o.choices),
    }


def _option_from_json(d: Mapping[str, Any]) -> cc.ConfigOption:
    default = d["default"]
    return cc.ConfigOption(
        path=tuple(d["path"]),
        flag=d["flag"],
        kind=d["kind"],
        default=tuple(default) if isinstance(default, list) else default,
        help=d["help"],
        help_source=d["help_source"],
        optional=d["optional"],
        element=_TYPES.get(d["element"]) if d["element"] else None,
        length=d["length"],
        choices=tuple(d["choices"]),
    )


def study_options_cache_text() -> str:
    """The JSON of :data:`STUDY_OPTIONS_CACHE`, from the live StudyConfig."""
    return json.dumps([_option_to_json(o) for o in _study_options()], indent=1, ensure_ascii=False) + "\n"


def write_study_options_cache() -> Path:
    """Regenerate :data:`STUDY_OPTIONS_CACHE` after a change to the study's settings."""
    STUDY_OPTIONS_CACHE.write_text(study_options_cache_text(), encoding="utf-8")
    return STUDY_OPTIONS_CACHE


#: Commands whose ``--help`` is answered from the cached option table (they take StudyConfig's options).
CACHED_HELP_COMMANDS = ("study", "frontier")


def build_study_help_parser() -> argparse.ArgumentParser:
    """The parser that answers ``study --help`` and ``frontier --help``: the study's options from the
    cached table, so neither imports torch."""
    top, sub = _top_parser()
    data = json.loads(STUDY_OPTIONS_CACHE.read_text(encoding="utf-8"))
    options = [_option_from_json(d) for d in data]
    _add_study_parser(sub, options)
    _add_frontier_parser(sub, options)
    for name, text in COMMAND_HELP.items():
        if name not in CACHED_HELP_COMMANDS:
            sub.add_parser(name, help=text, add_help=False)
    for name in CACHED_HELP_COMMANDS:
        _add_verbosity(sub.choices[name], top=False)
    return top


def build_command_list_parser() -> argparse.ArgumentParser:
    """The parser of a command line that names no subcommand (``--help``, ``--version``, an error):
    the subcommands with one line each and none of their options, so nothing heavy is imported
    (the full parser generates options from the config dataclasses, whose modules import torch)."""
    top, sub = _top_parser()
    for name, text in COMMAND_HELP.items():
        sub.add_parser(name, help=text, add_help=False)
    return top


def build_parser() -> argparse.ArgumentParser:
    """The ``refusal-core`` parser; config options are generated from the config dataclasses."""
    from refusal_core.study import StudyConfig

    d = StudyConfig()
    top, sub = _top_parser()
    options = _study_options()
    _add_study_parser(sub, options)
    _add_frontier_parser(sub, options)
    _add_extract_parser(sub, d)
    _add_model_file_parsers(sub)
    _add_aird_parser(sub)
    _add_evaluate_parser(sub, d)
    _add_audit_parser(sub, _COMMON)
    _add_oracle_parser(sub)
    for name, command_parser in sub.choices.items():
        if name != "oracle":  # its -v goes to pytest
            _add_verbosity(command_parser, top=False)
    return top


def _add_frontier_parser(sub: Any, options: Sequence[cc.ConfigOption]) -> None:
    """``frontier``: one method at several levels; the study's settings apply to every level."""
    common = _COMMON
    f = sub.add_parser(
        "frontier", help="run one method at several levels and find the safe compression frontier", **common
    )
    # Its own dest: --method of the other commands is a compression method name, checked as one.
    f.add_argument(
        "--method", dest="frontier_method", required=True, help="magnitude, wanda, awq, gguf or bnb"
    )
    f.add_argument(
        "--levels", required=True, help="comma-separated: 0.2,0.5,2:4 | w8,w4,w3 | q8_0,q4_0 | int8,nf4"
    )
    f.add_argument(
        "--calibrations",
        default=None,
        help="also compare calibration sets at every level (comma-separated, the reference first, "
        "e.g. harmless,harmful,mix): mask overlap or AWQ scale cosine, direction, ASR",
    )
    f.add_argument("--config", metavar="FILE.toml", default=None, help="study settings of every level")
    f.add_argument("--out", default="runs/frontier", help="run directory (study/, frontier.json, report.md)")
    _add_progress(f)
    f_options = [o for o in options if o.key != "methods"]  # the levels are the methods
    f_taken = {o.flag for o in f_options} | {"--config", "--out", "--no-progress", "--method", "--levels"}
    f_aliases = {k: tuple(x for x in v if x not in f_taken) for k, v in STUDY_ALIASES.items()}
    cc.add_config_options(f, f_options, aliases=f_aliases, title="study settings (StudyConfig)")


def _add_extract_parser(sub: Any, d: Any) -> None:
    """``extract``: candidates (and with ``--select`` the selected direction) of a model."""
    common = _COMMON
    e = sub.add_parser("extract", help="candidate directions (and the selected one) of a model", **common)
    _add_load_args(e, method="optional")
    e.add_argument("--harmful", default=d.harmful_train, help="harmful prompts (built-in split or file)")
    e.add_argument("--harmless", default=d.harmless_train, help="harmless prompts (built-in split or file)")
    e.add_argument("--n", type=_count, default=d.n_train, help="prompts per class for extraction")
    e.add_argument("--select", action="store_true", help="also score and select among the candidates")
    e.add_argument("--harmful-val", default=d.harmful_val, help="harmful prompts for --select")
    e.add_argument("--harmless-val", default=d.harmless_val, help="harmless prompts for --select")
    e.add_argument("--n-val", type=_count, default=d.n_val, help="prompts per class for --select")
    _add_calibration_args(e)
    cc.add_config_options(
        e, _selection_options(), title="selection settings (SelectionConfig, with --select)"
    )
    e.add_argument("--out", required=True, help="directory for candidates (and selection) artifacts")


def _add_model_file_parsers(sub: Any) -> None:
    """``compress``, ``export`` and ``compare``: a model or candidate set in, a file out."""
    common = _COMMON
    c = sub.add_parser("compress", help="compress a model and save it as a checkpoint directory", **common)
    _add_load_args(c, method="required")
    _add_calibration_args(c)
    c.add_argument("--out", required=True, help="checkpoint directory to write")

    x = sub.add_parser(
        "export",
        help="write a model (toy, checkpoint, repaired model) as a GGUF file for llama.cpp",
        **common,
    )
    _add_load_args(x, method=None)
    x.add_argument("--format", choices=("gguf",), default="gguf", help="file format")
    x.add_argument(
        "--type",
        dest="tensor_type",
        choices=("f32", "f16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1"),
        default="f32",
        help="tensor type of the 2-D weights (1-D tensors stay f32)",
    )
    x.add_argument("--out", required=True, help="the .gguf file to write")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    m = sub.add_parser("compare", help="compare two saved candidate sets", **common)
    m.add_argument("--base", required=True, help="directory written by 'extract --select' for the base model")
    m.add_argument("--other", required=True, help="directory written by 'extract' for the other model")


def _add_aird_parser(sub: Any) -> None:
    """``aird``: AIRD with a saved direction, keeping the model's storage; a checkpoint out."""
    from refusal_core.study.config import PLACEMENTS

    common = _COMMON
    a = sub.add_parser(
        "aird", help="apply AIRD with a saved direction and save the repaired checkpoint", **common
    )
    _add_load_args(a, method="optional")
    _add_calibration_args(a)
    a.add_argument("--direction", required=True, help="directory written by 'extract --select'")
    a.add_argument(
        "--allow-foreign-direction",
        action="store_true",
        help="use a direction extracted from a model that is neither this one nor the base its "
        "checkpoint record names (refused by default)",
    )
    a.add_argument(
        "--dense",
        action="store_true",
        help="on a pruned model: the paper's dense edit (its zeros at the edited layer are lost, and the "
        "command says how many); by default the edit keeps the zero pattern",
    )
    cc.add_config_options(a, _aird_options(), title="AIRD settings (AirdConfig)")
    a.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default="source-block",
        help="edit the source block l's writers (its output enters block l+1), or block l-1's "
        "(into-source: its output is the residual stream where the direction was measured)",
    )
    a.add_argument("--out", required=True, help="checkpoint directory to write")


def _add_evaluate_parser(sub: Any, d: Any) -> None:
    """``evaluate``: ASR per registered attack and over-refusal of one model."""
    from refusal_core.evaluation.attacks import ATTACKS

    common = _COMMON
    v = sub.add_parser("evaluate", help="ASR per attack and over-refusal of a model", **common)
    _add_load_args(v, method="optional")
    _add_calibration_args(v)
    v.add_argument("--harmful", default=d.harmful_test, help="harmful prompts (built-in split or file)")
    v.add_argument("--harmless", default=d.harmless_test, help="harmless prompts for over-refusal")
    v.add_argument("--n-test", type=_count, default=d.n_test, help="prompts per class")
    v.add_argument("--max-new-tokens", type=_count, default=d.max_new_tokens, help="tokens per completion")
    v.add_argument(
        "--attacks",
        type=_attack_names,
        default=("vanilla",),
        help=f"registered attacks to run, comma-separated (of: {', '.join(ATTACKS)}); "
        "vanilla_system adds the study's system prompt, decoding is the study's decoding grid",
    )
    v.add_argument(
        "--gcg-steps",
        type=_nonnegative,
        default=0,
        help="steps of a universal GCG attack (0: none, or the study's budget when --attacks names gcg)",
    )
    v.add_argument(
        "--judge",
        type=_judge_spec,
        default="substring",
        help="ASR judge: 'substring' (refusal phrases) or 'classifier:DIR' (a LlamaGuard- or HarmBench-"
        "style classifier, checked before use; classifier-llamaguard:DIR / classifier-harmbench:DIR name "
        "the format);"
        " over-refusal always counts refusal phrases",
    )
    _add_engine_args(v)
    v.add_argument("--out", required=True, help="directory for the ASR and over-refusal results")


def _add_oracle_parser(sub: Any) -> None:
    """``oracle``: the property suite against an outside implementation."""
    common = _COMMON
    o = sub.add_parser(
        "oracle",
        help="run the property suite against your implementation module (exit code: pytest's)",
        **common,
    )
    o.add_argument("module", help="the module under test, e.g. mypkg.refusal_ops (comma-separated: several)")
    o.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed on to pytest (e.g. -k ablate -x)")


def _add_audit_parser(sub: Any, common: dict[str, Any]) -> None:
    """``audit``: its options are :class:`~refusal_core.audit.AuditConfig`'s fields."""
    from refusal_core.audit import AuditConfig

    d = AuditConfig(compressed="-")
    u = sub.add_parser(
        "audit", help="audit a compressed checkpoint against its base (optionally repair it)", **common
    )
    u.add_argument("--base", required=True, help="the base model: 'toy', HF directory, .gguf file or hub id")
    u.add_argument("--compressed", required=True, help="the compressed candidate (any spec --base takes)")
    u.add_argument(
        "--repair", action="store_true", help="AIRD the candidate with the base direction, save it"
    )
    u.add_argument(
        "--repair-gain", type=float, default=None, help="the repair's gain (default: chosen by the sweep)"
    )
    u.add_argument(
        "--repair-placements",
        type=lambda text: tuple(x.strip() for x in text.split(",") if x.strip()),
        default=d.repair_placements,
        metavar="A,...",
        help="where the sweep's edits sit: source-block (block l) and/or into-source (block l-1)",
    )
    u.add_argument(
        "--device", type=_device, default=d.device, help="cpu, cuda, cuda:N, or auto (all visible GPUs)"
    )
    u.add_argument(
        "--dtype",
        type=_dtype_spelling,
        default="auto",
        metavar="{auto,float32,bfloat16,float16}",
        help="dtype of both models (auto: float32 on CPU)",
    )
    u.add_argument("--n-train", type=_count, default=d.n_train, help="prompts per class for extraction")
    u.add_argument("--n-val", type=_count, default=d.n_val, help="prompts per class for selection and sweep")
    u.add_argument("--n-test", type=_count, default=d.n_test, help="held-out prompts per class")
    u.add_argument(
        "--max-new-tokens", type=_count, default=d.max_new_tokens, help="tokens generated per completion"
    )
    u.add_argument("--seed", type=_nonnegative, default=d.seed, help="seed of every random choice")
    u.add_argument(
        "--judge", type=_judge_spec, default=d.judge, help="ASR judge: 'substring' or 'classifier:DIR'"
    )
    _add_engine_args(u)
    _add_progress(u)
    u.add_argument("--out", required=True, help="directory for audit.json, report.md (and repaired/)")


# ----------------------------------------------------------------------------
# checks before any work
# ----------------------------------------------------------------------------


def check_output_location(path: str | Path) -> Path | None:
    """Check that ``path`` can be (or is) a writable directory, before any work.

    Returns the topmost directory the command would create (``None`` when
    ``path`` exists), so an early failure can remove what this run created.
    Raises :class:`~refusal_core.errors.InvalidArgumentError` when ``path`` is
    a file, lies under a file, or is not writable.
    """
    p = Path(path).absolute()
    if p.exists():
        if not p.is_dir():
            raise InvalidArgumentError(f"--out {str(path)!r} exists and is not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise InvalidArgumentError(f"--out {str(path)!r} is not writable")
        return None
    top = p
    for parent in p.parents:
        if parent.is_dir():
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InvalidArgumentError(
                    f"--out {str(path)!r} cannot be created: {str(parent)!r} is not writable"
                )
            return top
        if parent.exists() or parent.is_symlink():
            raise InvalidArgumentError(
                f"--out {str(path)!r} lies under {str(parent)!r}, which is not a directory"
            )
        top = parent
    raise InvalidArgumentError(f"--out {str(path)!r} has no existing parent directory")  # pragma: no cover


def _remove_created(top: Path, ours: Sequence[Path] = ()) -> None:
    """After a failure: remove ``top`` (created by this run) if it holds nothing but empty
    directories and the files in ``ours``; otherwise leave its work for a resumed run."""
    if not top.is_dir():
        return
    own = {Path(p).absolute() for p in ours}
    files = [Path(root) / f for root, _, fs in os.walk(top) for f in fs]
    if any(f.absolute() not in own for f in files):
        return
    for f in files:
        f.unlink()
    for root, _, _ in sorted(os.walk(top), key=lambda t: -len(t[0])):
        Path(root).rmdir()


def _precheck_load_args(args: argparse.Namespace) -> None:
    """Cheap checks of the model-loading options, before anything is loaded."""
    device = getattr(args, "device", "cpu")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InvalidArgumentError(f"--device {device}: CUDA is not available on this machine")
    template = getattr(args, "chat_template", None)
    if template is not None and not Path(template).is_file():
        raise InvalidArgumentError(f"--chat-template {template!r} is not a file")
    judge = getattr(args, "judge", "substring")
    if judge.startswith("classifier") and not Path(judge.partition(":")[2]).is_dir():
        raise InvalidArgumentError(f"--judge {judge!r}: {judge.partition(':')[2]!r} is not a model directory")
    if getattr(args, "method", None):
        from refusal_core.compression import check_methods_available

        check_methods_available([args.method])  # unknown (listing the valid names) or extra not installed


@contextlib.contextmanager
def _quiet_progress(enabled: bool) -> Iterator[None]:
    """While active, no tqdm bar is drawn, whoever creates it (and whatever ``disable=`` it passes)."""
    if not enabled:
        yield
        return
    import tqdm.std

    saved_env = {k: os.environ.get(k) for k in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    os.environ["TQDM_DISABLE"] = "1"  # for subprocesses and for tqdm imported later
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    original = tqdm.std.tqdm.__init__

    def silent_init(self: Any, *a: Any, **kw: Any) -> None:
        kw["disable"] = True
        original(self, *a, **kw)

    tqdm.std.tqdm.__init__ = silent_init
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = original
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Command:
    run: Callable[[argparse.Namespace, list[Path]], int]
    writes: bool = True  # whether it has an --out to check


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"refusal-core: {record.levelname.lower()}: {record.getMessage()}"


def configure_logging(verbosity: int) -> logging.Logger:
    """The ``refusal_core`` logger on stderr at ``verbosity`` (-1 errors, 0 warnings, 1 info, 2 debug);
    the libraries' own loggers (transformers, lm-eval, datasets) stay at errors below ``-vv``."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        max(-1, min(verbosity, 2)), logging.DEBUG
    )
    logger = logging.getLogger("refusal_core")
    for handler in [h for h in logger.handlers if getattr(h, "_refusal_core_cli", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    handler._refusal_core_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    library_level = logging.WARNING if verbosity >= 2 else logging.ERROR
    for name in ("transformers", "lm-eval", "lm_eval", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(library_level)
    return logger


def _names_a_command(argv: Sequence[str]) -> bool:
    """Whether a subcommand appears before any ``-h``/``--help``/``--version`` (else the light parser
    answers: it knows the same top-level flags and subcommand names)."""
    for arg in argv:
        if arg in COMMAND_HELP:
            return True
        if arg in ("-h", "--help", "--version") or not arg.startswith("-"):
            return False
    return False


def _asks_study_help(argv: Sequence[str]) -> bool:
    """``study -h``/``--help`` or ``frontier -h``/``--help``: answered from the cached option table."""
    names = [a for a in argv if a in COMMAND_HELP]
    return bool(names) and names[0] in CACHED_HELP_COMMANDS and any(a in ("-h", "--help") for a in argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not _names_a_command(argv):
        parser = build_command_list_parser()
    elif _asks_study_help(argv) and STUDY_OPTIONS_CACHE.is_file():
        parser = build_study_help_parser()
    else:
        parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(int(getattr(args, "verbose", 0)) - int(getattr(args, "quiet", 0)))
    if hasattr(args, "no_progress") and not sys.stderr.isatty():
        args.no_progress = True  # a bar redrawn with \r is noise in a log file or a pipe
    command = COMMANDS[args.command]
    created: Path | None = None
    ours: list[Path] = []
    try:
        if command.writes:
            created = check_output_location(args.out)
        _precheck_load_args(args)
        with _quiet_progress(bool(getattr(args, "no_progress", False))):
            return int(command.run(args, ours))
    except RefusalCoreError as exc:
        if created is not None:
            _remove_created(created, ours)
        print(f"refusal-core {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BaseException:
        if created is not None:
            _remove_created(created, ours)
        raise


def _print(obj: Any) -> None:
    """``obj`` as strict JSON on stdout: undefined values (NaN, ±inf) are null, as in every file."""
    from refusal_core.saving import finite_or_null

    print(json.dumps(finite_or_null(obj), indent=2, sort_keys=True, default=str, allow_nan=False))


# ----------------------------------------------------------------------------
# study
# ----------------------------------------------------------------------------


def resolve_study_config(config_file: str | None, overrides: Mapping[str, Any]) -> Any:
    """The :class:`~refusal_core.study.StudyConfig` of defaults < ``config_file`` < ``overrides``."""
    from refusal_core.study import StudyConfig

    options = _study_options()
    from_file = cc.read_config_file(config_file, StudyConfig, options) if config_file else {}
    layers = []
    for layer in (from_file, overrides):
        layer = dict(layer)
        # The same --dtype spellings as every other command (auto = none = the default).
        if isinstance(layer.get("dtype"), str):
            spelling = layer["dtype"].strip().lower()
            if spelling not in DTYPE_SPELLINGS:
                raise InvalidArgumentError(
                    f"dtype must be one of {', '.join(DTYPES)}, got {layer['dtype']!r}"
                )
            layer["dtype"] = DTYPE_SPELLINGS[spelling]
        layers.append(layer)
    return cc.build_config(StudyConfig, *layers)


#: The settings of the shipped ``study.toml`` that differ from StudyConfig's defaults: the README's
#: quick start on the toy in minutes on a laptop CPU (two methods, small prompt sets).
EXAMPLE_STUDY: dict[str, Any] = {
    "methods": ("magnitude", "wanda"),
    "n_train": 32,
    "n_val": 16,
    "n_test": 32,
    "n_calibration": 16,
    "noise_splits": 2,
    "repair.gains": (1.5, 2.0, 3.0),
    "attacks.gcg_prompts": 8,
    "zero_shot_tasks": ("rc_arithmetic",),
}

EXAMPLE_HEADER = """\
refusal-core study --config study.toml --out runs/study

Every setting of the study, with what it does; values differing from the built-in defaults
name the default. This file runs the quick start: the embedded toy model, two compression
methods, small prompt sets (a few minutes on a CPU). For a real model set `model` (a local
Hugging Face directory or a .gguf file), `device` / `dtype`, list the `methods` you compress
with, and raise the prompt counts (the defaults: n_train 128, n_val 32, n_test 64).
Command-line flags win over this file: `--n-test 16`, `--aird-gain-attn 2`, `--methods wanda`.
A `none` value means "not set" (for dtype: float32 on CPU, the checkpoint's own on a GPU).
Regenerate after a settings change: python -c "from refusal_core.cli import write_example_config
as w; w('study.toml')" (tests/test_quick_start.py checks the shipped file is current)."""


def example_study_config() -> Any:
    """The StudyConfig of the shipped ``study.toml`` (:data:`EXAMPLE_STUDY` over the defaults)."""
    from refusal_core.study import StudyConfig

    return cc.build_config(StudyConfig, EXAMPLE_STUDY)


def example_config_text() -> str:
    """The text of the shipped, commented ``study.toml``."""
    return cc.commented_config_toml(example_study_config(), _study_options(), header=EXAMPLE_HEADER)


def write_example_config(path: str | Path) -> Path:
    """Write :func:`example_config_text` to ``path`` (the repository's ``study.toml``)."""
    from refusal_core.saving import atomic_write_bytes

    return atomic_write_bytes(path, example_config_text().encode("utf-8"))


def check_methods_available(methods: Sequence[str]) -> None:
    """Refuse, before any stage runs, methods whose optional backend is not installed (a study with
    ``llmc-wanda`` used to fail only after extracting and evaluating the base model)."""
    from refusal_core.compression.llmc import LLMC_EXTRA_HINT, llmc_available

    missing = [m for m in methods if m.split("@")[0].startswith("llmc-")]
    if missing and not llmc_available():
        raise InvalidArgumentError(
            f"methods {', '.join(missing)} need llmcompressor, not installed: {LLMC_EXTRA_HINT}"
        )


def _cmd_study(args: argparse.Namespace, ours: list[Path]) -> int:
    from refusal_core.saving import atomic_write_bytes
    from refusal_core.study import run_study

    cfg = resolve_study_config(args.config, cc.cli_overrides(args))
    check_methods_available(cfg.methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = out / "config.toml"
    ours.append(written)
    header = "refusal-core study: the resolved settings of the last run in this directory"
    atomic_write_bytes(written, cc.config_to_toml(cfg, header=header).encode("utf-8"))
    results = run_study(cfg, out, progress=not args.no_progress)
    _print_summary(results)
    print(f"report: {out / 'report.md'}")
    return 0


def _print_summary(results: StudyResults) -> None:
    """One row per variant: source, cosine at the base source, ASR per attack and over-refusal
    (rates as ``value [low, high]``, from each variant's evaluation)."""
    from refusal_core.report import markdown_table
    from refusal_core.study.report import format_rate

    variants = results.variants
    attacks = sorted({a for v in variants if v.evaluation is not None for a in v.evaluation.asr})
    rows = [
        [
            v.name,
            v.source,
            v.cosine_at_base_source,
            *[format_rate(v.evaluation.asr.get(a) if v.evaluation else None) for a in attacks],
            format_rate(v.evaluation.over_refusal if v.evaluation else None),
        ]
        for v in variants
    ]
    header = ["variant", "source", "cos@base", *[f"ASR {a}" for a in attacks], "over-refusal"]
    print(markdown_table(header, rows))
    print(f"total: {results.timings['total_seconds']:.1f} s")


# ----------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------


def _dtype(name: str) -> str | None:
    """``--dtype`` for ``load_model``: None for ``auto`` (float32 on CPU, the checkpoint's own on GPU)."""
    return DTYPE_SPELLINGS[name.strip().lower()]


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``--model`` on ``--device`` in ``--dtype`` with ``--chat-template``."""
    import torch

    from refusal_core.model import load_model

    torch.manual_seed(args.seed)
    return load_model(
        args.model, device=args.device, dtype=_dtype(args.dtype), chat_template=args.chat_template
    )


def _compress_in_memory_(model: Any, tok: Any, args: argparse.Namespace) -> Any:
    """Apply ``--method`` to ``model`` in place; returns the CompressionRecord."""
    from refusal_core.compression import compress_, method_config
    from refusal_core.compression.calibration_sets import calibration_token_ids

    cfg = method_config(args.method)
    calib = calibration_token_ids(tok, args.calibration, args.n_calibration)
    return compress_(model, cfg, calib, batch_size=args.batch_size, progress=not args.no_progress)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """``--engine`` and the vLLM settings of the commands that evaluate (study: from StudyConfig)."""
    from refusal_core.evaluation.engines import ENGINES, VllmSettings

    d = VllmSettings()
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="torch",
        help="who generates the completions (vllm: pip install vllm)",
    )
    p.add_argument(
        "--vllm-tensor-parallel-size",
        type=_count,
        default=d.tensor_parallel_size,
        help="GPUs per model (vllm)",
    )
    p.add_argument(
        "--vllm-gpu-memory-utilization",
        type=float,
        default=d.gpu_memory_utilization,
        help="share of each GPU's memory vLLM may take (the torch model needs the rest)",
    )


def _vllm_settings(args: argparse.Namespace) -> Any:
    from refusal_core.evaluation.engines import VllmSettings

    return VllmSettings(
        tensor_parallel_size=args.vllm_tensor_parallel_size,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
    )


def _engine_memo(
    args: argparse.Namespace, model: Any, tok: Any, prompt_sets: list[list[str]], attack: Any
) -> Any:
    """None with ``--engine torch``; else a generation memo that vLLM filled with ``attack``'s greedy
    completions of each prompt set, served from ``--model`` itself when it is an unmodified checkpoint
    directory, else from the loaded (and compressed) model saved to a temporary directory."""
    if args.engine == "torch":
        return None
    import tempfile

    from refusal_core.evaluation.attacks import prefill_shared_generations
    from refusal_core.evaluation.engines import open_engine, open_variant_engine
    from refusal_core.evaluation.generation import GenerationCache
    from refusal_core.model import model_identity

    memo, settings = GenerationCache(), _vllm_settings(args)
    engine: Any
    with tempfile.TemporaryDirectory(prefix="refusal_core_vllm_") as tmp:
        if Path(args.model).is_dir() and not getattr(args, "method", None):
            engine = open_engine(
                args.engine, model, tok, checkpoint_dir=args.model, vllm=settings, seed=args.seed
            )
        else:
            engine = open_variant_engine(
                args.engine,
                settings,
                model,
                tok,
                Path(tmp) / "model",
                base_identity=model_identity(model),
                variant=getattr(args, "method", None) or "base",
                seed=args.seed,
            )
        try:
            for prompts in prompt_sets:
                prefill_shared_generations(model, tok, prompts, [attack], memo, progress=False, engine=engine)
        finally:
            if engine is not None:
                engine.close()
    return memo


def _load_variant(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, compression record or None)``: ``--model``, compressed by ``--method``."""
    model, tok = _load(args)
    record = _compress_in_memory_(model, tok, args) if getattr(args, "method", None) else None
    return model, tok, record


def _checkpoint_record(spec: str) -> dict[str, Any] | None:
    """The (hash-checked) refusal_core record of a checkpoint directory, else None."""
    from refusal_core.model import model_record

    return model_record(spec)


def _refusal_ids(spec: str, tok: Any) -> list[int]:
    """The refusal token ids of a model spec: those its checkpoint record names (a model this tool
    derived, e.g. from the toy), else the study's default for the spec (the toy's own, or the
    first tokens of the standard refusal phrases in this tokenizer)."""
    from refusal_core.study import default_refusal_token_ids

    return _recorded_refusal_ids(spec) or default_refusal_token_ids(spec, tok)


def _recorded_refusal_ids(spec: str) -> list[int] | None:
    """The refusal token ids the checkpoint record of ``spec`` names, else None."""
    record = _checkpoint_record(spec)
    ids = (record.get("settings") or {}).get("refusal_token_ids") if record else None
    if isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids):
        return list(ids)
    return None


def _check_checkpoint_target(out: str | Path) -> None:
    """Refuse, before any work, an ``--out`` that ``save_checkpoint`` would refuse after it."""
    from refusal_core.saving import is_checkpoint_dir

    p = Path(out)
    if p.is_dir() and any(p.iterdir()) and not is_checkpoint_dir(p):
        raise InvalidArgumentError(
            f"--out {str(out)!r} is a non-empty directory that is not a refusal_core checkpoint"
        )


def _save_checkpoint(
    model: Any, tok: Any, out: Path, record: Mapping[str, Any], base_identity: Mapping[str, Any]
) -> Path:
    from refusal_core.checkpoint import save_checkpoint

    return Path(save_checkpoint(model, tok, out, record=record, base_identity=base_identity))


def _cmd_extract(args: argparse.Namespace, ours: list[Path]) -> int:
    from refusal_core import bench as steps
    from refusal_core.selection import SelectionConfig
    from refusal_core.study import StudyConfig

    # Settings first: a bad value fails before anything is read; the bench reads the prompts
    # before it loads the model.
    overrides = cc.cli_overrides(args)
    if overrides and not args.select:
        given = ", ".join("--" + k.replace(".", "-").replace("_", "-") for k in overrides)
        raise InvalidArgumentError(f"{given} only apply with --select")
    ids = _recorded_refusal_ids(args.model)
    config = StudyConfig(
        model=args.model,
        device=args.device,
        dtype=_dtype(args.dtype),
        methods=(),
        harmful_train=args.harmful,
        harmless_train=args.harmless,
        n_train=args.n,
        harmful_val=args.harmful_val,
        harmless_val=args.harmless_val,
        n_val=args.n_val,
        calibration=args.calibration,
        n_calibration=args.n_calibration,
        batch_size=args.batch_size,
        seed=args.seed,
        selection=cc.build_config(SelectionConfig, {k.partition(".")[2]: v for k, v in overrides.items()}),
        zero_shot_tasks=(),
        refusal_token_ids=None if ids is None else tuple(ids),
    )
    out = Path(args.out)
    # The study's own steps, resumable in out/stages: a rerun with the same settings reloads them.
    bench = steps.Bench(
        config,
        out,
        progress=not args.no_progress,
        loaded=lambda: _load(args),
        chat_template=args.chat_template,
    )
    name, model, upstream = "model", bench.model, []
    if args.method:
        compressed = steps.compress(bench, args.method)
        name, model, upstream = args.method, compressed.model, [compressed.key]
    cands, key = steps.extract(bench, name, model, upstream)
    cands.save(out / "candidates")
    summary: dict[str, Any] = {"candidates": str(out / "candidates"), "shape": list(cands.directions.shape)}
    if args.select:
        sel, _ = steps.select(bench, name, model, cands, [key])
        sel.save(out / "selection")
        # Sites as (layer, position -P..-1), as every other output writes them.
        summary |= {
            "selected": sel.site(sel.selected),
            "fallback": sel.site(sel.fallback),
            "source": sel.site(sel.source),
            "source_is_fallback": sel.selected is None,
            "source_position": sel.source_position,
        }
        _note_fallback(sel)
    _print(summary)
    return 0


def _note_fallback(sel: Any) -> None:
    """One line on stderr when no candidate passed the selection filters and the fallback is used."""
    if sel.selected is None:
        layer, position = sel.site(sel.source)
        logging.getLogger("refusal_core").warning(
            "no candidate direction passed the selection filters; using the fallback source "
            "(layer %d, position %d: the lowest bypass score below the layer cut, filters relaxed)",
            layer,
            position,
        )


def _base_identity(spec: str, loaded_identity: Mapping[str, Any]) -> dict[str, Any]:
    """Identity of the model a derived checkpoint comes from: the base named by ``spec``'s own
    checkpoint record when it has one (a compressed or repaired model), else the loaded model."""
    record = _checkpoint_record(spec)
    if record is not None and isinstance(record.get("base_identity"), dict):
        return dict(record["base_identity"])
    return dict(loaded_identity)


def _cmd_compress(args: argparse.Namespace, ours: list[Path]) -> int:
    from refusal_core.model import model_identity

    _check_checkpoint_target(args.out)
    model, tok = _load(args)
    refusal_ids = _refusal_ids(args.model, tok)
    base = _base_identity(args.model, model_identity(model))
    record = _compress_in_memory_(model, tok, args)
    out = _save_checkpoint(
        model,
        tok,
        Path(args.out),
        record={
            "operation": "compress",
            "method": args.method,
            "compression": record.to_dict(),
            "source_model": args.model,
            "refusal_token_ids": refusal_ids,
        },
        base_identity=base,
    )
    _print({"sparsity": record.sparsity, "method": record.method, "out": str(out)})
    return 0


def _cmd_export(args: argparse.Namespace, ours: list[Path]) -> int:
    from refusal_core.export import export_gguf

    model, tok = _load(args)
    out = export_gguf(model, tok, args.out, tensor_type=args.tensor_type, overwrite=args.overwrite)
    _print({"format": args.format, "type": args.tensor_type, "model": args.model, "out": str(out)})
    return 0


def _cmd_frontier(args: argparse.Namespace, ours: list[Path]) -> int:
    from refusal_core.frontier import frontier_levels, run_frontier

    levels = [x for x in args.levels.split(",") if x.strip()]
    frontier_levels(args.frontier_method, levels)  # bad levels fail before the model loads
    cfg = resolve_study_config(args.config, cc.cli_overrides(args))
    doc = run_frontier(cfg, args.frontier_method, levels, Path(args.out), progress=not args.no_progress)
    if args.calibrations:
        from refusal_core.frontier import compare_calibrations

        sets = [x for x in args.calibrations.split(",") if x.strip()]
        for lv in frontier_levels(args.frontier_method, levels):
            compare_calibrations(
                cfg, lv.method, sets, Path(args.out) / "calibration" / lv.label, progress=not args.no_progress
            )
    print(doc["answer"])
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _cmd_compare(args: argparse.Namespace, ours: list[Path]) -> int:
    from refusal_core.directions import DirectionCandidates, compare_candidates
    from refusal_core.selection import SelectionResult

    base = DirectionCandidates.load(Path(args.base) / "candidates")
    other = DirectionCandidates.load(Path(args.other) / "candidates")
    bsel = SelectionResult.load(Path(args.base) / "selection")
    osel_path = Path(args.other) / "selection.json"
    osel = SelectionResult.load(Path(args.other) / "selection") if osel_path.exists() else None
    bl, bi = bsel.source
    other_src = (osel.source[0], osel.positions[osel.source[1]]) if osel else None
    cmp = compare_candidates(base, other, base_source=(bl, bsel.positions[bi]), other_source=other_src)
    _print(
        {
            "cosine_at_base_source": cmp.cosine_at_base_source,
            "cosine_selected": cmp.selected_cosine,
            "source_shift": cmp.source_shift,
            "per_site_cosine": cmp.per_site_cosine.tolist(),
        }
    )
    return 0


def _cmd_aird(args: argparse.Namespace, ours: list[Path]) -> int:
    from refusal_core.aird import AirdConfig
    from refusal_core.bench import REPAIR_PATHS, RepairPlan
    from refusal_core.compression import spec_of_recorded_method
    from refusal_core.directions import DirectionCandidates, check_direction_origin
    from refusal_core.errors import ForeignDirectionError
    from refusal_core.model import model_identity
    from refusal_core.repair import plan_repair, recorded_compression, repair_
    from refusal_core.selection import SelectionResult

    # The direction and the settings first: a bad one fails before the model is loaded.
    cfg = cc.build_config(AirdConfig, cc.cli_overrides(args))
    cands = DirectionCandidates.load(Path(args.direction) / "candidates")
    sel = SelectionResult.load(Path(args.direction) / "selection")
    layer, pi = sel.source
    r = cands.directions[layer, pi]
    (block,) = RepairPlan(cfg, (layer,), args.placement).edit_blocks  # into-source at layer 0 fails here
    _note_fallback(sel)
    _check_checkpoint_target(args.out)
    source_record = _checkpoint_record(args.model)
    # The compression this model carries: --method (applied here), else the one its record names
    # (with its exact config).
    recorded, compression = recorded_compression(source_record)
    if args.method:
        compression = None
    method = args.method or recorded
    spec = spec_of_recorded_method(method)
    if args.dense and (spec is None or not spec.prunes):
        raise InvalidArgumentError(
            f"--dense is the paper's dense edit of a pruned model; {args.model!r} is not one"
        )

    model, tok = _load(args)
    refusal_ids = _refusal_ids(args.model, tok)
    base = _base_identity(args.model, model_identity(model))
    # The direction must come from this model or from the base its checkpoint record names
    # (AIRD's recipe: the base's direction on the compressed model); else only with the override.
    # A directory without a record names no base: it is not its own base.
    try:
        check_direction_origin(
            cands.model,
            model,
            model_record={"base_identity": base} if source_record is not None else None,
            allow_foreign=args.allow_foreign_direction,
        )
    except ForeignDirectionError as exc:
        raise ForeignDirectionError(f"{exc} (command line: --allow-foreign-direction)") from None
    # Every refusal (a storage that cannot be written again, a model that is not its method's) comes
    # from the plan, before any work: on the loaded model, and again after --method compressed it.
    plan = plan_repair(
        model,
        block,
        method=None if args.method else method,
        dense=args.dense and not args.method,
        compression=compression,
    )
    record_compression = _compress_in_memory_(model, tok, args) if args.method else None
    if args.method:
        plan = plan_repair(model, block, method=method, dense=args.dense)
    rec = repair_(model, r, block, cfg, method=method, dense=args.dense, compression=compression)
    aird: dict[str, Any] = {**rec.to_dict(), "path": REPAIR_PATHS[plan.rule]}
    if args.placement != "source-block":
        aird.update(placement=args.placement, source_layer=layer)
    record: dict[str, Any] = {
        "operation": "aird",
        "method": f"{method}+aird" if method else "aird",
        "aird": aird,
        "direction": str(Path(args.direction).absolute()),
        "source": [layer, sel.positions[pi]],
        "source_is_fallback": sel.selected is None,
        "source_model": args.model,
        "refusal_token_ids": refusal_ids,
    }
    if record_compression is not None:
        record["compression"] = record_compression.to_dict()
    elif source_record is not None and (source_record.get("settings") or {}).get("compression"):
        record["compression"] = source_record["settings"]["compression"]
    if plan.storage == "dequantized-simulation":
        record["format"] = "dequantized-simulation"  # float weights that are a simulation's grid
    out = _save_checkpoint(model, tok, Path(args.out), record=record, base_identity=base)
    lost = {k: v for k, v in (rec.repair or {}).get("sparsity_lost", {}).items() if v > 0}
    if lost:
        print(
            "refusal-core aird: --dense edit: sparsity lost "
            + ", ".join(f"{k}[{layer}] {v:.1%}" for k, v in lost.items()),
            file=sys.stderr,
        )
    _print({k: aird[k] for k in ("layer", "modules", "repair", "path")} | {"out": str(out)})
    return 0


def judge_from_spec(spec: str, args: argparse.Namespace | None = None) -> Any:
    """The ASR judge of ``--judge``: ``substring`` or ``classifier:DIR`` (loaded on ``--device``)."""
    from refusal_core.evaluation.judges import judge_from_spec as from_spec

    device = args.device if args is not None else "cpu"
    dtype = _dtype(args.dtype) if args is not None else None
    return from_spec(spec, device=device, dtype=dtype)


def _cmd_evaluate(args: argparse.Namespace, ours: list[Path]) -> int:
    from refusal_core.evaluation.attacks import VanillaAttack, build_attacks, over_refusal, run_attacks
    from refusal_core.evaluation.judges import SubstringJudge, classify
    from refusal_core.prompts import load_prompts
    from refusal_core.saving import atomic_write_json, check_finite_model
    from refusal_core.stats import rate, rate_of
    from refusal_core.study import AttackSettings

    harmful = load_prompts(args.harmful)[: args.n_test]
    harmless = load_prompts(args.harmless)[: args.n_test]
    judge = judge_from_spec(args.judge, args)
    model, tok, _ = _load_variant(args)
    # NaN/inf weights give empty completions that would read as "safe": refuse, never report them.
    check_finite_model(model)
    names = tuple(args.attacks) + (("gcg",) if args.gcg_steps > 0 and "gcg" not in args.attacks else ())
    gcg_steps = {"gcg_steps": args.gcg_steps} if args.gcg_steps > 0 else {}
    # the study's attack settings (system prompt, decoding grid, GCG budget) on every given prompt
    settings = AttackSettings(names=names, gcg_prompts=len(harmful), **gcg_steps)
    planned = build_attacks(
        settings, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed
    )
    progress = not args.no_progress
    # --engine vllm: greedy completions of both prompt sets from vLLM; GCG's gradients stay in torch
    vanilla = VanillaAttack(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    memo = _engine_memo(args, model, tok, [harmful, harmless], vanilla)
    res = run_attacks(model, tok, harmful, planned, judge, memo, progress=progress)
    refusal_judge = SubstringJudge(min_words=1)
    refusal = over_refusal(
        model,
        tok,
        harmless,
        refusal_judge,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=progress,
        cache=memo,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, r in res.items():
        r.save(out / f"asr_{name}.json")
    refusal.save(out / "over_refusal.json")
    # Every rate with its n and 95 % Wilson interval; a degenerate completion is no refusal.
    refused = [
        v == "refused" for v in classify(refusal_judge, harmless, [r.completions[0] for r in refusal.records])
    ]
    summary = {
        "asr": {k: rate(v.n_jailbroken, v.n_prompts).to_dict() for k, v in res.items()},
        "over_refusal": rate_of(refused).to_dict(),
        "judge": args.judge,
    }
    atomic_write_json(out / "summary.json", summary)
    _print(summary)
    return 0


def _cmd_audit(args: argparse.Namespace, ours: list[Path]) -> int:
    from refusal_core.audit import AuditConfig, audit

    cfg = AuditConfig(
        base=args.base,
        compressed=args.compressed,
        device=args.device,
        dtype=_dtype(args.dtype),
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        judge=args.judge,
        repair=args.repair or args.repair_gain is not None,
        repair_gain=args.repair_gain,
        repair_placements=args.repair_placements,
        engine=args.engine,
        vllm=_vllm_settings(args),
    )
    res = audit(cfg, args.out, progress=not args.no_progress)
    _print({"candidate": res.candidate, "out": str(Path(args.out) / "report.md")})
    return 0


def _cmd_oracle(args: argparse.Namespace, ours: list[Path]) -> int:
    from refusal_core.testing.suite import run_oracle

    return run_oracle(args.module, list(args.pytest_args))


#: Subcommand → handler.
COMMANDS: dict[str, _Command] = {
    "study": _Command(_cmd_study),
    "extract": _Command(_cmd_extract),
    "compress": _Command(_cmd_compress),
    "compare": _Command(_cmd_compare, writes=False),
    "export": _Command(_cmd_export, writes=False),
    "frontier": _Command(_cmd_frontier),  # --out is a file, checked by export_gguf
    "aird": _Command(_cmd_aird),
    "evaluate": _Command(_cmd_evaluate),
    "audit": _Command(_cmd_audit),
    "oracle": _Command(_cmd_oracle, writes=False),
}


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
