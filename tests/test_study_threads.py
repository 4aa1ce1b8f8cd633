"""The study's torch thread count: chosen by config or by model size, and always given back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from refusal_core.errors import InvalidArgumentError
from refusal_core.study import StudyConfig
from refusal_core.study import run as study_run
from refusal_core.study.config import SMALL_MODEL_PARAMETERS


class _Sized(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(n))


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_the_rule_one_thread_below_the_size_else_torchs_setting(restore_threads: int) -> None:
    torch.set_num_threads(2)
    assert study_run.study_threads(StudyConfig(), _Sized(SMALL_MODEL_PARAMETERS - 1)) == 1
    assert study_run.study_threads(StudyConfig(), _Sized(SMALL_MODEL_PARAMETERS)) == 2
    assert study_run.study_threads(StudyConfig(threads=3), _Sized(10)) == 3
    assert study_run.study_threads(StudyConfig(threads=1), _Sized(SMALL_MODEL_PARAMETERS)) == 1


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_bad_threads_are_refused(bad: object) -> None:
    with pytest.raises(InvalidArgumentError, match="threads"):
        StudyConfig(threads=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("threads", [None, 2])
def test_a_study_runs_on_its_threads_and_gives_torchs_setting_back_when_it_raises(
    threads: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_threads: int
) -> None:
    torch.set_num_threads(3)
    seen: list[int] = []

    def body(bench: object, t_start: float, progress: bool) -> None:
        seen.append(torch.get_num_threads())
        raise RuntimeError("a stage failed")

    monkeypatch.setattr(study_run, "_run_study", body)
    with pytest.raises(RuntimeError, match="a stage failed"):
        study_run.run_study(StudyConfig(threads=threads), tmp_path, progress=False)
    # the toy is far below the size rule: None means one thread
    assert seen == [1 if threads is None else threads], f"the study ran on {seen} threads"
    assert torch.get_num_threads() == 3, "the study did not give torch's thread setting back"
