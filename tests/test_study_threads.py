"""The study's torch thread count: the config's, else torch's own, and always given back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refusal_core.errors import InvalidArgumentError
from refusal_core.study import StudyConfig
from refusal_core.study import run as study_run


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_the_configs_threads_else_torchs_setting(restore_threads: int) -> None:
    torch.set_num_threads(2)
    assert study_run.study_threads(StudyConfig()) == 2
    assert study_run.study_threads(StudyConfig(threads=3)) == 3
    assert study_run.study_threads(StudyConfig(threads=1)) == 1


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_bad_threads_are_refused(bad: object) -> None:
    with pytest.raises(InvalidArgumentError, match="threads"):
        StudyConfig(threads=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("threads", [None, 1, 2])
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
    assert seen == [3 if threads is None else threads], f"the study ran on {seen} threads"
    assert torch.get_num_threads() == 3, "the study did not give torch's thread setting back"
