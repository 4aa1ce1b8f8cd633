"""The command line: generated options, config file precedence, output checks before work, chaining.

Parse-level tests load no model: ``load_model`` is replaced by a function that
fails the test if called, so "refused before the model is loaded" is checked,
not assumed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import refusal_core.model
from refusal_core import _cli_config as cc
from refusal_core import cli
from refusal_core.cli import build_parser, main
from refusal_core.study import StudyConfig

COMMANDS = ["study", "extract", "compress", "compare", "aird", "evaluate"]


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make any model load fail the test (records the spec for the message)."""
    calls: list[str] = []

    def forbidden(spec: str, **_: Any) -> Any:
        calls.append(spec)
        raise AssertionError(f"load_model({spec!r}) was called; the command should have failed before")

    monkeypatch.setattr(refusal_core.model, "load_model", forbidden)
    return calls


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    top = build_parser()
    action = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _one_error_line(err: str, command: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"{command}: expected one error line, got {lines}"
    return lines[0]


# ----------------------------------------------------------------------------
# help and generated options
# ----------------------------------------------------------------------------


def test_console_script_entry_point_is_declared() -> None:
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'refusal-core = "refusal_core.cli:main"' in text, "pyproject declares the refusal-core script"


def test_module_runs_as_a_script_and_prints_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "refusal_core.cli", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"python -m refusal_core.cli --help failed: {proc.stderr}"
    for command in COMMANDS:
        assert command in proc.stdout, f"top-level help lists {command}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_every_default_is_shown(command: str) -> None:
    parser = _subparsers()[command]
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        assert action.help, f"{command} {flag} has help text"
        assert action.help.strip(), f"{command} {flag} has non-blank help text"
        shown = (
            action.help if "(default:" in action.help else parser._get_formatter()._get_help_string(action)
        )
        if not action.required and action.default is not None:
            assert "(default:" in (shown or ""), f"{command} {flag} shows its default"
    assert "--help" in text


def test_study_options_come_from_every_studyconfig_field() -> None:
    options = cc.config_options(StudyConfig, table=cli.HELP)
    flags = {a for act in _subparsers()["study"]._actions for a in act.option_strings}
    for o in options:
        if o.kind != "other":
            assert o.flag in flags, f"StudyConfig field {o.key} has the option {o.flag}"
        assert o.help_source != "none", f"StudyConfig field {o.key} has documentation (comment or cli.HELP)"
    assert "--selection-kl-threshold" in flags, "nested SelectionConfig fields are prefixed"
    assert "--aird-alpha-attn" in flags, "nested AirdConfig fields are prefixed"


def test_aird_options_come_from_airdconfig() -> None:
    from refusal_core.aird import AirdConfig

    flags = {a for act in _subparsers()["aird"]._actions for a in act.option_strings}
    for o in cc.config_options(AirdConfig):
        assert o.flag in flags, f"aird has {o.flag} for AirdConfig.{o.key}"


# ----------------------------------------------------------------------------
# refused at parse time
# ----------------------------------------------------------------------------

#: Bad command lines: (id, argv with {tmp} for the test directory, text the one error line contains).
#: Each must exit 2 with one line on stderr, load no model and write nothing under {tmp}.
BAD_INPUT_CASES: list[tuple[str, list[str], str]] = [
    ("study-method-is-not-an-option", ["study", "--method", "wanda", "--out", "{tmp}/o"], "--method"),
    ("study-abbreviation-refused", ["study", "--meth", "wanda", "--out", "{tmp}/o"], "--meth"),
    ("study-n-train-zero", ["study", "--n-train", "0", "--out", "{tmp}/o"], "n_train must be"),
    ("study-n-test-negative", ["study", "--n-test", "-4", "--out", "{tmp}/o"], "--n-test"),
    ("study-batch-size-zero", ["study", "--batch-size", "0", "--out", "{tmp}/o"], "batch_size"),
    ("study-bad-float", ["study", "--aird-alpha-attn", "big", "--out", "{tmp}/o"], "--aird-alpha-attn"),
    ("study-unknown-method", ["study", "--methods", "quantum-7", "--out", "{tmp}/o"], "quantum-7"),
    ("study-config-missing", ["study", "--config", "{tmp}/none.toml", "--out", "{tmp}/o"], "none.toml"),
    ("study-config-unknown-key", ["study", "--config", "{tmp}/unknown.toml", "--out", "{tmp}/o"], "n_trian"),
    ("study-config-bad-count", ["study", "--config", "{tmp}/zero.toml", "--out", "{tmp}/o"], "n_val"),
    ("study-out-is-a-file", ["study", "--out", "{tmp}/file"], "not a directory"),
    ("study-out-under-a-file", ["study", "--out", "{tmp}/file/sub"], "lies under"),
    ("extract-n-zero", ["extract", "--n", "0", "--out", "{tmp}/o"], "--n"),
    ("extract-n-val-negative", ["extract", "--select", "--n-val", "-1", "--out", "{tmp}/o"], "--n-val"),
    (
        "extract-selection-without-select",
        ["extract", "--selection-kl-threshold", "0.2", "--out", "{tmp}/o"],
        "--select",
    ),
    ("extract-out-is-a-file", ["extract", "--out", "{tmp}/file"], "not a directory"),
    ("compress-no-method", ["compress", "--out", "{tmp}/o"], "--method"),
    ("compress-unknown-method", ["compress", "--method", "zip", "--out", "{tmp}/o"], "zip"),
    (
        "compress-out-under-a-file",
        ["compress", "--method", "magnitude", "--out", "{tmp}/file/c"],
        "lies under",
    ),
    ("aird-out-is-a-file", ["aird", "--direction", "{tmp}", "--out", "{tmp}/file"], "not a directory"),
    (
        "aird-nonfinite-alpha",
        ["aird", "--direction", "{tmp}", "--alpha-attn", "inf", "--out", "{tmp}/o"],
        "finite",
    ),
    ("evaluate-n-test-zero", ["evaluate", "--n-test", "0", "--out", "{tmp}/o"], "--n-test"),
    ("evaluate-gcg-negative", ["evaluate", "--gcg-steps", "-1", "--out", "{tmp}/o"], "--gcg-steps"),
    ("evaluate-bad-judge", ["evaluate", "--judge", "llm", "--out", "{tmp}/o"], "--judge"),
    (
        "evaluate-judge-dir-missing",
        ["evaluate", "--judge", "classifier:{tmp}/nope", "--out", "{tmp}/o"],
        "nope",
    ),
    ("evaluate-bad-device", ["evaluate", "--device", "gpu0", "--out", "{tmp}/o"], "--device"),
    (
        "evaluate-unknown-attack",
        ["evaluate", "--attacks", "vanilla,telepathy", "--out", "{tmp}/o"],
        "telepathy",
    ),
    ("evaluate-bad-dtype", ["evaluate", "--dtype", "int8", "--out", "{tmp}/o"], "--dtype"),
    (
        "evaluate-template-missing",
        ["evaluate", "--chat-template", "{tmp}/t.jinja", "--out", "{tmp}/o"],
        "t.jinja",
    ),
    # issue 20: a method whose backend is missing fails before any stage (it failed after the base's)
    *(
        [
            (
                "study-llmc-without-extra",
                ["study", "--methods", "llmc-wanda", "--out", "{tmp}/o"],
                "llmcompressor",
            )
        ]
        if importlib.util.find_spec("llmcompressor") is None
        else []
    ),
]


def _prepare(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "unknown.toml").write_text("n_trian = 5\n")
    (tmp_path / "zero.toml").write_text("n_val = 0\n")


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(("case", "argv", "fragment"), BAD_INPUT_CASES, ids=[c[0] for c in BAD_INPUT_CASES])
def test_bad_command_lines_exit_2_with_one_line_and_write_nothing(
    case: str,
    argv: list[str],
    fragment: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_model_load: list[str],
) -> None:
    _prepare(tmp_path)
    before = _snapshot(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, f"{case}: exit code {code}, stderr {err!r}"
    line = _one_error_line(err, case)
    assert fragment.replace("{tmp}", str(tmp_path)) in line, f"{case}: the error names {fragment!r}: {line}"
    assert not no_model_load, f"{case}: a model was loaded before the error"
    assert _snapshot(tmp_path) == before, f"{case}: files were written: {_snapshot(tmp_path) - before}"


def test_unwritable_output_directory_is_refused_before_work(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_model_load: list[str],
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Root may write anywhere, so the permission answer is faked for this one directory.
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    for argv in (["study", "--out", str(locked / "run")], ["extract", "--out", str(locked)]):
        assert main(argv) == 2, f"{argv} on a read-only directory"
        assert "not writable" in _one_error_line(capsys.readouterr().err, argv[0])
    assert list(locked.iterdir()) == [], "nothing was created in the read-only directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_for_real(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["extract", "--out", str(locked / "x")]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


# ----------------------------------------------------------------------------
# study: config file, precedence, resolved config written before work
# ----------------------------------------------------------------------------


@pytest.fixture
def fake_study(monkeypatch: pytest.MonkeyPatch) -> list[tuple[StudyConfig, bool, set[str]]]:
    """Replace run_study; records (config, progress, files in the run dir when the work started)."""
    import refusal_core.study

    seen: list[tuple[StudyConfig, bool, set[str]]] = []

    def run(config: StudyConfig, out_dir: Path, *, progress: bool = True) -> Any:
        from types import SimpleNamespace

        from refusal_core.stats import Rate
        from refusal_core.study import DamageSummary, EvaluationSummary, VariantResult

        seen.append((config, progress, {p.name for p in Path(out_dir).iterdir()}))
        rate = Rate(k=1, n=4, value=0.25, low=0.05, high=0.7)
        evaluation = EvaluationSummary(
            asr={"vanilla": rate},
            asr_per_config={},
            over_refusal=rate,
            degenerate={},
            damage=DamageSummary(None, None, 0),
            accuracy={},
        )
        variant = VariantResult("base", "base", None, source=[1, -1], evaluation=evaluation)
        # only what the command's summary reads of a StudyResults
        return SimpleNamespace(variants=[variant], timings={"total_seconds": 0.0})

    monkeypatch.setattr(refusal_core.study, "run_study", run)
    return seen


def test_study_precedence_default_file_command_line(
    tmp_path: Path,
    fake_study: list[tuple[StudyConfig, bool, set[str]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg_file = tmp_path / "study.toml"
    cfg_file.write_text('methods = ["wanda"]\nn_train = 5\nn_val = 7\n[attacks]\ngcg_steps = 3\n')
    out = tmp_path / "run"
    argv = ["study", "--config", str(cfg_file), "--n-val", "9", "--gcg-steps", "0", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    cfg, progress, files = fake_study[0]
    d = StudyConfig()
    assert (cfg.methods, cfg.n_train, cfg.n_val, cfg.n_test) == (("wanda",), 5, 9, d.n_test), (
        "default < file < command line for methods, n_train, n_val, n_test"
    )
    assert cfg.attacks.gcg_steps == 0, "the --gcg-steps alias overrides [attacks] gcg_steps of the file"
    assert progress is False, "--no-progress reaches run_study"
    assert "config.toml" in files, "the resolved config is in the run directory before the work starts"
    written = cc.read_config_file(out / "config.toml", StudyConfig, cc.config_options(StudyConfig))
    assert cc.build_config(StudyConfig, written) == cfg, "config.toml holds the resolved config"
    out_text = capsys.readouterr().out
    assert "| base | (1, -1) |" in out_text, f"the summary has a row per variant: {out_text}"
    assert "0.250 [0.050, 0.700]" in out_text, f"the summary shows each rate with its interval: {out_text}"


def test_study_failing_early_leaves_no_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new" / "run"
    assert main(["study", "--model", str(tmp_path / "missing"), "--no-progress", "--out", str(out)]) == 2
    assert "missing" in _one_error_line(capsys.readouterr().err, "study")
    assert not (tmp_path / "new").exists(), "the directories this run created are removed on an early error"


def test_existing_output_directory_is_kept_on_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    assert main(["extract", "--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    capsys.readouterr()
    assert out.is_dir(), "a directory the user had is not removed"


# ----------------------------------------------------------------------------
# model loading options
# ----------------------------------------------------------------------------


def _spy_load(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    calls: list[tuple[str, dict[str, Any]]] = []
    real: Callable[..., Any] = refusal_core.model.load_model

    def spy(spec: str, **kwargs: Any) -> Any:
        calls.append((spec, kwargs))
        return real(spec, **kwargs)

    monkeypatch.setattr(refusal_core.model, "load_model", spy)
    return calls


def test_device_and_dtype_reach_load_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:

    calls = _spy_load(monkeypatch)
    argv = ["evaluate", "--dtype", "bfloat16", "--device", "cpu", "--n-test", "1", "--max-new-tokens", "2"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path / "e")]) == 0
    assert calls[0][0] == "toy"
    assert calls[0][1]["device"] == "cpu", "--device is passed to load_model"
    assert calls[0][1]["dtype"] == "bfloat16", "--dtype is passed to load_model"
    saved = json.loads((tmp_path / "e" / "asr_vanilla.json").read_text())
    assert saved["model"]["dtype"] == "bfloat16", "the evaluated model was loaded in bfloat16"


def test_chat_template_reaches_load_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from refusal_core.model import load_model

    template = tmp_path / "chat.jinja"
    template.write_text(load_model("toy")[1].chat_template)  # the toy's own, so the model still works
    calls = _spy_load(monkeypatch)
    argv = ["extract", "--chat-template", str(template), "--n", "2", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "x")]) == 0, capsys.readouterr().err
    assert calls[0][1]["chat_template"] == str(template), "--chat-template is passed to load_model"


def test_select_uses_n_val_and_the_selection_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import refusal_core.bench

    real = refusal_core.bench.select_direction
    seen: list[tuple[int, int, Any]] = []

    def spy(
        model: Any, tok: Any, cands: Any, harmful: Any, harmless: Any, ids: Any, config: Any, **kw: Any
    ) -> Any:
        seen.append((len(harmful), len(harmless), config))
        return real(model, tok, cands, harmful, harmless, ids, config, **kw)

    monkeypatch.setattr(refusal_core.bench, "select_direction", spy)  # the select step's selection
    argv = ["extract", "--n", "4", "--select", "--n-val", "3", "--selection-kl-threshold", "0.5"]
    assert main([*argv, "--selection-layers", "0,1", "--no-progress", "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    n_harmful, n_harmless, config = seen[0]
    assert (n_harmful, n_harmless) == (3, 3), "--n-val sets the validation prompts per class"
    assert config.kl_threshold == 0.5, "--selection-kl-threshold reaches SelectionConfig"
    assert config.layers == (0, 1), "--selection-layers reaches SelectionConfig"


def test_extract_runs_the_benchs_steps_and_a_rerun_reloads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``extract`` is the study's extract and select steps on a Bench (it used to call the direction
    functions itself): the same stages, so a rerun with the same settings computes nothing again."""
    import refusal_core.bench as steps

    calls: list[str] = []
    for name in ("extract", "select", "extract_candidates"):
        real = getattr(steps, name)

        def spy(*args: Any, _name: str = name, _real: Callable[..., Any] = real, **kwargs: Any) -> Any:
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(steps, name, spy)
    out = tmp_path / "d"
    argv = ["extract", "--n", "4", "--select", "--n-val", "3", "--no-progress", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    first = {p.name: p.read_bytes() for p in out.glob("*.*")}
    assert calls == ["extract", "extract_candidates", "select"], f"extract ran {calls}, not the bench's steps"
    assert (out / "stages" / "model" / "extract" / "stage.json").is_file(), "no stage store under --out"
    assert main(argv) == 0, capsys.readouterr().err
    assert calls[3:] == ["extract", "select"], f"the rerun recomputed: {calls[3:]}"
    again = {p.name: p.read_bytes() for p in out.glob("*.*")}
    assert set(first) == {
        "candidates.json",
        "candidates.safetensors",
        "selection.json",
        "selection.safetensors",
    }
    assert again == first, "the rerun wrote other candidates or another selection"


def test_classifier_judge_from_a_model_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from refusal_core.evaluation.judges import ClassifierJudge
    from refusal_core.testing.tiny import tiny_model, tiny_tokenizer

    judge_dir = tmp_path / "judge"
    tiny_model("llama", n_layers=2, d_model=32, seed=3).save_pretrained(judge_dir)
    tiny_tokenizer().save_pretrained(judge_dir)
    capsys.readouterr()  # bars drawn while saving it are not the command's
    argv = ["evaluate", "--judge", f"classifier:{judge_dir}", "--n-test", "2", "--max-new-tokens", "2"]
    # A random model is no classifier (issue 20: it used to be accepted and report ASR 0): refused.
    assert main([*argv, "--no-progress", "--out", str(tmp_path / "r")]) == 2
    line = _one_error_line(capsys.readouterr().err, "evaluate")
    assert "is not a harmbench safety classifier" in line, line
    assert not (tmp_path / "r").exists(), "a refused judge leaves no output directory"
    # One that answers HarmBench's labels is used, and its raw verdicts are kept beside the completions.
    monkeypatch.setattr(
        ClassifierJudge, "verdicts", lambda self, i, c: [("Yes", "no")[k % 2] for k in range(len(i))]
    )
    assert main([*argv, "--no-progress", "--out", str(tmp_path / "e")]) == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "e" / "asr_vanilla.json").read_text())
    assert saved["judge"] == "classifier-harmbench", f"judged by the classifier, not {saved['judge']!r}"
    said = [a["verdict"] for r in saved["records"] for a in r["attempts"]]
    assert said, "the attempts carry the classifier's verdicts"
    assert set(said) <= {"Yes", "no"}, f"raw verdicts on disk: {said}"


def test_cuda_without_cuda_is_refused_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_load: list[str]
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["extract", "--device", "cuda:0", "--out", str(tmp_path / "o")]) == 2
    assert "CUDA" in _one_error_line(capsys.readouterr().err, "extract")


# ----------------------------------------------------------------------------
# progress bars
# ----------------------------------------------------------------------------


def test_no_progress_silences_every_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from refusal_core.testing.tiny import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "m"  # loading a directory draws transformers' own "Loading weights" bar
    tiny_model("llama", n_layers=2, d_model=32, seed=1).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    capsys.readouterr()  # bars drawn while saving it are not the command's
    argv = [
        "evaluate",
        "--model",
        str(model_dir),
        "--n-test",
        "2",
        "--max-new-tokens",
        "2",
        "--method",
        "wanda",
    ]
    assert main([*argv, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    quiet = capsys.readouterr().err
    assert "it/s]" not in quiet, f"--no-progress still drew a bar: {quiet[-300:]!r}"
    assert "%|" not in quiet, f"--no-progress still drew a bar: {quiet[-300:]!r}"
    import unittest.mock

    # Bars are drawn only on a terminal (never into a log or a pipe): stand in for one.
    with unittest.mock.patch.object(sys.stderr, "isatty", return_value=True):
        assert main([*argv, "--out", str(tmp_path / "loud")]) == 0
    loud = capsys.readouterr().err
    assert "it/s]" in loud, "without --no-progress bars are drawn (so the check above can fail)"


def test_quiet_progress_overrides_an_explicit_disable_false_and_is_undone() -> None:
    import os

    import tqdm

    env_before = os.environ.get("TQDM_DISABLE")
    with cli._quiet_progress(True):
        bar = tqdm.tqdm(range(2), disable=False)
        assert bar.disable, "a library bar created with disable=False is silenced under --no-progress"
        bar.close()
        assert os.environ.get("TQDM_DISABLE") == "1", "TQDM_DISABLE is set for subprocesses"
    bar = tqdm.tqdm(range(2), disable=False, file=open(os.devnull, "w"))  # noqa: SIM115
    assert not bar.disable, "tqdm is restored after the command"
    bar.close()
    assert os.environ.get("TQDM_DISABLE") == env_before, "the environment is restored"


# ----------------------------------------------------------------------------
# chaining on the toy model
# ----------------------------------------------------------------------------


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main([*argv, "--no-progress"]) if argv[0] != "compare" else main(argv)
    captured = capsys.readouterr()
    assert code == 0, f"{' '.join(argv)} failed: {captured.err}"
    return captured.out


def test_chain_compress_aird_evaluate_and_compress_extract(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    c, d, a, e, x = (str(tmp_path / n) for n in ("compress", "direction", "aird", "eval", "extract"))
    _run(["compress", "--model", "toy", "--method", "magnitude", "--out", c], capsys)
    pruned = AutoModelForCausalLM.from_pretrained(c).requires_grad_(False)
    w = pruned.model.layers[0].mlp.down_proj.weight
    assert abs(float((w == 0).double().mean()) - 0.5) < 0.01, "compress wrote the pruned weights (50 % zeros)"
    from refusal_core.toy import toy_refusal_token_ids

    assert cli._refusal_ids(c, None) == toy_refusal_token_ids(), (
        "a checkpoint of the toy keeps the toy's refusal ids"
    )

    _run(["extract", "--model", "toy", "--n", "8", "--select", "--n-val", "4", "--out", d], capsys)
    assert (tmp_path / "direction" / "selection.json").is_file(), "extract --select writes the selection"

    # aird takes compress's output by directory, with no --method repeated
    _run(["aird", "--model", c, "--direction", d, "--alpha-attn", "0.5", "--out", a], capsys)
    repaired = AutoModelForCausalLM.from_pretrained(a).requires_grad_(False)
    from refusal_core.directions import DirectionCandidates
    from refusal_core.selection import SelectionResult

    sel = SelectionResult.load(Path(d) / "selection")
    layer, pi = sel.source
    r = DirectionCandidates.load(Path(d) / "candidates").directions[layer, pi].double()
    w0 = pruned.model.layers[layer].self_attn.o_proj.weight.double()
    w1 = repaired.model.layers[layer].self_attn.o_proj.weight.double()
    # W' = W + α r rᵀ W on the pruned W's nonzero entries (a pruned model keeps its zeros), written out here
    expected = w0 + 0.5 * torch.outer(r, r @ w0) * (w0 != 0)
    err = float((w1 - expected).norm() / expected.norm())
    assert err < 1e-5, (
        f"aird on the pruned checkpoint: o_proj differs from W + α (r rᵀ W) ⊙ mask by {err:.2e}"
    )

    out = _run(["evaluate", "--model", a, "--n-test", "2", "--max-new-tokens", "4", "--out", e], capsys)
    assert '"over_refusal"' in out, "evaluate prints over-refusal"
    assert (tmp_path / "eval" / "over_refusal.json").is_file()
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    from refusal_core.stats import wilson_interval

    for name, r in [*summary["asr"].items(), ("over_refusal", summary["over_refusal"])]:
        assert r["n"] == 2, f"evaluate: {name} is over the 2 test prompts, n = {r['n']}"
        assert (r["low"], r["high"]) == wilson_interval(r["k"], r["n"]), (
            f"evaluate: {name} carries its interval"
        )

    _run(["extract", "--model", c, "--n", "8", "--out", x], capsys)
    assert (tmp_path / "extract" / "candidates.safetensors").is_file(), "extract reads compress's output"
    out = _run(["compare", "--base", d, "--other", x], capsys)
    assert "cosine_at_base_source" in out, "compare reads both extract outputs"


def test_aird_with_llm_int8_in_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, a = str(tmp_path / "d"), str(tmp_path / "a")
    _run(["extract", "--model", "toy", "--n", "8", "--select", "--n-val", "4", "--out", d], capsys)
    out = _run(["aird", "--method", "llm-int8", "--direction", d, "--out", a], capsys)
    assert "dequantize, edit, re-quantize" in out, "aird --method llm-int8 edits through the quantized path"
    from refusal_core.checkpoint import read_checkpoint_record

    doc = read_checkpoint_record(a)
    assert doc is not None, "aird wrote a checkpoint"
    assert doc["format"] == "dequantized-simulation", "the re-quantized int8 simulation is saved as such"
    assert doc["method"] == "llm-int8+aird"
    _run(
        ["evaluate", "--model", a, "--n-test", "1", "--max-new-tokens", "2", "--out", str(tmp_path / "e")],
        capsys,
    )


def _toy_variant_dir(tmp_path: Path, name: str, edit: Any) -> str:
    """The toy model with one weight edited, saved as a plain HF directory (no refusal_core record)."""
    import torch

    from refusal_core.toy import load_toy_model

    model, tok = load_toy_model()
    with torch.no_grad():
        edit(model)
    out = tmp_path / name
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_aird_refuses_a_direction_from_an_unrelated_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path / "d")
    _run(["extract", "--model", "toy", "--n", "8", "--select", "--n-val", "4", "--out", d], capsys)
    other = _toy_variant_dir(tmp_path, "other", lambda m: m.model.layers[0].self_attn.o_proj.weight.mul_(1.5))
    out = tmp_path / "a"
    capsys.readouterr()  # drop the bars of building the other model
    code = main(["aird", "--model", other, "--direction", d, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, f"a foreign direction must be refused (exit 2), got {code}: {err}"
    assert "another model" in _one_error_line(err, "aird"), err
    assert not out.exists(), "nothing is written when the direction is refused"
    _run(["aird", "--model", other, "--direction", d, "--allow-foreign-direction", "--out", str(out)], capsys)
    assert (out / "refusal_core.json").is_file(), "the explicit override applies the direction"


def test_evaluate_refuses_a_model_with_non_finite_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _toy_variant_dir(
        tmp_path, "nan", lambda m: m.model.layers[1].mlp.down_proj.weight[0, 0].fill_(float("inf"))
    )
    out = tmp_path / "e"
    capsys.readouterr()
    code = main(["evaluate", "--model", broken, "--n-test", "2", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, f"evaluating a model with inf weights must fail (exit 2), got {code}"
    assert "down_proj" in _one_error_line(err, "evaluate"), f"the error names the module: {err}"
    assert not (out / "over_refusal.json").exists(), "no rate is reported for a broken model"


def test_evaluate_runs_the_studys_attacks_including_the_decoding_grid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``evaluate --attacks`` reads the attack registry: the study's decoding grid (temperature × top-p ×
    top-k) and the system-prompt attack run beside vanilla, each with its rate and n."""
    from refusal_core.evaluation.attacks import DecodingAttack
    from refusal_core.evaluation.results import AsrResult

    out = tmp_path / "e"
    argv = ["evaluate", "--model", "toy", "--n-test", "3", "--max-new-tokens", "3", "--out", str(out)]
    _run([*argv, "--attacks", "vanilla,vanilla_system,decoding"], capsys)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["asr"]) == {"vanilla", "vanilla_system", "decoding"}, f"attacks: {summary['asr']}"
    assert all(r["n"] == 3 for r in summary["asr"].values()), f"each rate has its n: {summary['asr']}"
    grid = AsrResult.load(out / "asr_decoding.json")
    want = {c.label for c in DecodingAttack().configs}
    got = set(grid.config_rates)
    assert got == want, f"decoding configs {sorted(got)}, want {sorted(want)}"
    assert len(want) == 12, "fixture: the default grid is 3 temperatures × 2 top-p × 2 top-k"
