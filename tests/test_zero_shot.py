"""Zero-shot multiple-choice accuracy: local task files, native scorer, lm-eval agreement, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from refusal_core.errors import ArtifactError, InvalidArgumentError
from refusal_core.evaluation.zero_shot import (
    LOCAL_TASKS,
    McItem,
    choice_loglikelihoods,
    lm_eval_available,
    load_local_task,
    zero_shot_accuracy,
    zero_shot_evaluate,
)
from refusal_core.testing.tiny import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
needs_lm_eval = pytest.mark.skipif(not lm_eval_available(), reason="lm-eval is not installed (extra 'eval')")


def write_task(tmp_path: Path, name: str, rows: list[dict[str, object]]) -> Path:
    """A local task in the same YAML + jsonl form as the shipped ones."""
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml_text = (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {name}.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml_text)
    return path


@pytest.mark.parametrize("task", LOCAL_TASKS)
def test_shipped_tasks_are_well_formed(task: str) -> None:
    name, items = load_local_task(task)
    assert name == task, f"YAML task name {name!r} differs from {task!r}"
    assert 30 <= len(items) <= 60, f"{task}: {len(items)} items, expected 30-60"
    questions = [it.context for it in items]
    assert len(set(questions)) == len(questions), f"{task}: duplicate questions"
    for i, it in enumerate(items):
        assert len(set(it.choices)) == len(it.choices) == 4, f"{task}[{i}]: choices {it.choices}"
        assert 0 <= it.target < 4, f"{task}[{i}]: target {it.target}"
        assert it.context.startswith("Question: "), f"{task}[{i}] context {it.context!r}"
        assert it.context.endswith("\nAnswer:"), f"{task}[{i}] context {it.context!r}"
    golds = [it.target for it in items]
    assert max(golds.count(k) for k in range(4)) < 0.6 * len(items), f"{task}: gold positions are unbalanced"


def test_native_loglikelihood_matches_full_sequence_reference() -> None:
    model = tiny_model("llama", dtype=torch.float64, seed=2)
    item = McItem("Question: What is 2 plus 2?\nAnswer:", ("4", "five"), 0)
    got = choice_loglikelihoods(model, TOK, [item, item], batch_size=3, progress=False)
    for c, choice in enumerate(item.choices):
        ctx = TOK.encode(item.context)
        whole = TOK.encode(item.context + " " + choice)
        assert whole[: len(ctx)] == ctx, "test setup: context is not a token prefix"
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].to(torch.float64), -1)
        ref = sum(float(logp[p - 1, whole[p]]) for p in range(len(ctx), len(whole)))
        for row in range(2):
            err = abs(got[row][c] - ref) / abs(ref)
            assert err < 1e-6, f"choice {choice!r}, copy {row}: native {got[row][c]} vs reference {ref}"


def test_single_choice_items_are_always_right(tmp_path: Path) -> None:
    """Model-independent: with one choice per item, every prediction is the gold one."""
    rows = [{"question": f"Say {w}.", "choices": [w], "answer": 0} for w in ("yes", "blue", "seven")]
    path = write_task(tmp_path, "one_choice", rows)
    acc = zero_shot_accuracy(tiny_model("llama", seed=1), TOK, [str(path)], backend="native", progress=False)
    assert acc == {"one_choice": 1.0}, f"single-choice accuracy {acc}"


def test_accuracy_follows_the_likeliest_choice(tmp_path: Path) -> None:
    """Gold = the model's own argmax gives accuracy 1; gold = its argmin gives 0."""
    model = tiny_model("llama", seed=3)
    _, items = load_local_task("rc_arithmetic")
    items = items[:8]
    lls = choice_loglikelihoods(model, TOK, items, progress=False)
    for label, pick, expected in (("argmax", max, 1.0), ("argmin", min, 0.0)):
        rows = []
        for it, ll in zip(items, lls):
            question = it.context.removeprefix("Question: ").removesuffix("\nAnswer:")
            rows.append({"question": question, "choices": list(it.choices), "answer": ll.index(pick(ll))})
        path = write_task(tmp_path, f"self_{label}", rows)
        acc = zero_shot_accuracy(model, TOK, [str(path)], backend="native", progress=False)
        assert acc[f"self_{label}"] == expected, f"gold = model {label}: accuracy {acc}"


@needs_lm_eval
def test_lm_eval_agrees_with_native_scoring() -> None:
    model = tiny_model("llama", seed=4)
    model.train()  # lm-eval calls eval(); the flags must come back
    native = zero_shot_evaluate(model, TOK, LOCAL_TASKS, limit=6, backend="native", progress=False)
    via = zero_shot_evaluate(model, TOK, LOCAL_TASKS, limit=6, backend="lm_eval", progress=False)
    assert sorted(via) == sorted(LOCAL_TASKS), f"lm-eval returned tasks {sorted(via)}"
    for task in LOCAL_TASKS:
        a = torch.tensor(native[task].loglikelihoods, dtype=torch.float64)
        b = torch.tensor(via[task].loglikelihoods, dtype=torch.float64)
        assert a.shape == b.shape == (6, 4), f"{task}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
        err = float((a - b).norm() / b.norm())
        assert err < 1e-5, f"{task}: native vs lm-eval log-likelihoods, relative error {err:.2e}"
        assert native[task].targets == via[task].targets, f"{task}: gold indices differ"
        assert native[task].accuracy == via[task].accuracy, f"{task}: accuracy differs"
        # lm-eval's standard error of a mean, written out: sqrt(p (1 - p) / (n - 1)) for 0/1 outcomes
        correct = [
            int(max(range(4), key=lambda c: ll[c]) == t) for ll, t in zip(b.tolist(), via[task].targets)
        ]
        p, n = sum(correct) / len(correct), len(correct)
        expected = (p * (1 - p) / (n - 1)) ** 0.5
        assert via[task].stderr == pytest.approx(expected, abs=1e-12), f"{task}: lm-eval stderr"
        assert native[task].stderr == pytest.approx(expected, abs=1e-12), f"{task}: native stderr"
    assert all(m.training for m in model.modules()), "lm-eval left the model in eval mode"
    assert "tie_weights" not in vars(model), "the tie_weights guard was left on the model"


@needs_lm_eval
def test_unloadable_task_data_is_a_clear_error(tmp_path: Path) -> None:
    path = write_task(tmp_path, "broken_data", [{"question": "q", "choices": ["a"], "answer": 0}])
    (tmp_path / "broken_data.jsonl").write_text('{"question": "q", "choi')
    with pytest.raises(ArtifactError, match="broken_data"):
        zero_shot_accuracy(tiny_model(), TOK, [str(path)], backend="lm_eval", progress=False)


@pytest.mark.slow
@needs_lm_eval
@pytest.mark.skipif(os.environ.get("HF_DATASETS_OFFLINE") != "1", reason="needs HF_DATASETS_OFFLINE=1")
def test_standard_task_without_data_names_the_task() -> None:
    with pytest.raises(ArtifactError, match="boolq"):
        zero_shot_accuracy(tiny_model(), TOK, ["boolq"], backend="lm_eval", progress=False)


def test_bad_task_arguments() -> None:
    model = tiny_model()
    with pytest.raises(InvalidArgumentError, match="native backend"):
        zero_shot_accuracy(model, TOK, ["boolq"], backend="native", progress=False)
    with pytest.raises(ArtifactError, match="does not exist"):
        zero_shot_accuracy(model, TOK, ["/nonexistent/task.yaml"], backend="native", progress=False)
    with pytest.raises(InvalidArgumentError, match="repeats"):
        zero_shot_accuracy(model, TOK, ["rc_arithmetic", "rc_arithmetic"], progress=False)
    with pytest.raises(InvalidArgumentError, match="backend"):
        zero_shot_accuracy(model, TOK, backend="gpu", progress=False)
    with pytest.raises(InvalidArgumentError, match="limit"):
        zero_shot_accuracy(model, TOK, limit=0, progress=False)


@needs_lm_eval
def test_shipped_tasks_run_in_plain_lm_eval_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``lm_eval --model hf --model_args pretrained=DIR --include_path refusal_core/data/tasks
    --tasks ...`` does, through lm-eval's own API with its own HF loading, started in a directory
    that holds no task data: the tasks load and score exactly as refusal_core's native scorer."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from refusal_core.evaluation.zero_shot import TASKS_DIR
    from refusal_core.toy import load_toy_model, toy_model_path

    monkeypatch.chdir(tmp_path)
    tasks = ["rc_arithmetic", "rc_word_knowledge"]
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={toy_model_path()},dtype=float32,device=cpu",
        tasks=tasks,
        task_manager=manager,
        limit=3,
        log_samples=True,
        bootstrap_iters=0,
        verbosity="ERROR",
    )
    assert results is not None, "lm-eval returned no results"
    model, tok = load_toy_model()
    native = zero_shot_evaluate(model, tok, tasks, limit=3, backend="native", progress=False)
    for task in tasks:
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        plain = torch.tensor(
            [[float(r[0]) for r in s["filtered_resps"]] for s in samples], dtype=torch.float64
        )
        ours = torch.tensor(native[task].loglikelihoods, dtype=torch.float64)
        assert plain.shape == ours.shape == (3, 4), (
            f"{task}: plain lm-eval {tuple(plain.shape)}, native {ours.shape}"
        )
        err = float((plain - ours).norm() / ours.norm())
        assert err < 1e-4, f"{task}: plain lm-eval vs native log-likelihoods, relative error {err:.2e}"
        assert results["results"][task]["acc,none"] == native[task].accuracy, f"{task}: accuracy differs"


@needs_lm_eval
def test_lm_eval_outside_a_git_checkout_prints_no_git_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """lm-eval runs ``git describe`` in the working directory with the terminal's stderr: outside a
    checkout that printed "fatal: not a git repository" once per evaluation (13 lines per study)."""
    import shutil

    if shutil.which("git") is None:
        pytest.skip("git is not installed: nothing would print")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no checkout above tmp_path either
    zero_shot_evaluate(tiny_model("llama", seed=4), TOK, ["rc_arithmetic"], limit=2, backend="lm_eval")
    err = capfd.readouterr().err
    assert "not a git repository" not in err, f"lm-eval's git call reached stderr: {err[-300:]!r}"


@needs_lm_eval
def test_lm_eval_bookkeeping_runs_no_environment_probe_and_one_git_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """lm-eval's add_env_info ran torch's collect_env (about 11 subprocesses) and git describe on every
    call: half a second per evaluated model, for records refusal_core never reads. Neither runs now
    beyond one git call per directory, and lm-eval's own functions are put back afterwards."""
    import subprocess

    import lm_eval.evaluator as evaluator
    import torch.utils.collect_env as collect_env

    from refusal_core.evaluation import zero_shot

    probes: list[int] = []

    def probe() -> str:  # lm-eval catches any exception here: count the calls instead
        probes.append(1)
        return "probed"

    monkeypatch.setattr(collect_env, "get_pretty_env_info", probe)
    monkeypatch.setattr(zero_shot, "_GIT_HASHES", {})
    calls: list[list[str]] = []
    real_run = subprocess.run

    def run(args: list[str], *a: object, **kw: object) -> object:
        calls.append(list(args))
        return real_run(args, *a, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "run", run)
    before = (evaluator.add_env_info, evaluator.get_git_commit_hash)
    model = tiny_model("llama", seed=4)
    first = zero_shot_evaluate(model, TOK, ["rc_arithmetic"], limit=3, backend="lm_eval")
    second = zero_shot_evaluate(model, TOK, ["rc_arithmetic"], limit=3, backend="lm_eval")
    assert first["rc_arithmetic"].loglikelihoods == second["rc_arithmetic"].loglikelihoods, "results changed"
    assert not probes, f"torch's collect_env ran {len(probes)} times (about 11 subprocesses each)"
    git = [c for c in calls if c[:1] == ["git"]]
    assert len(git) <= 1, f"git ran {len(git)} times for two evaluations in one directory"
    assert (evaluator.add_env_info, evaluator.get_git_commit_hash) == before, (
        "lm-eval's functions not restored"
    )
