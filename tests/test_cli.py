"""The command line: every subcommand has help; errors exit 2 with one line naming the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from refusal_core.cli import main
from refusal_core.testing.tiny import tiny_model, tiny_tokenizer


@pytest.mark.parametrize("command", ["study", "extract", "compress", "compare", "aird", "evaluate"])
def test_every_subcommand_has_help(command: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "refusal_core.cli", command, "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"{command} --help failed: {proc.stderr}"
    assert "--model" in proc.stdout or "--base" in proc.stdout, f"{command} --help lists its options"


def test_console_script_entry_point_is_declared() -> None:
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'refusal-core = "refusal_core.cli:main"' in text, "pyproject declares the refusal-core script"


def test_errors_exit_2_with_a_message(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["study", "--model", "/nonexistent/model", "--out", str(tmp_path / "o")]) == 2
    assert "/nonexistent/model" in capsys.readouterr().err, "the error names the model path"
    assert main(["study", "--methods", "quantum-7", "--out", str(tmp_path / "o")]) == 2
    assert "unknown compression method" in capsys.readouterr().err, "the error names the bad method"


def test_extract_compress_aird_compare_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tmp_path / "m"
    tiny_model("llama", n_layers=3, d_model=32, seed=2).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    m = str(model_dir)
    common = ["--model", m, "--no-progress"]
    assert main(["extract", *common, "--n", "8", "--select", "--out", str(tmp_path / "base")]) == 0
    assert (tmp_path / "base" / "candidates.safetensors").is_file(), "extract writes candidates"
    assert (
        main(["extract", *common, "--method", "wanda", "--n", "8", "--select", "--out", str(tmp_path / "w")])
        == 0
    )
    assert main(["compare", "--base", str(tmp_path / "base"), "--other", str(tmp_path / "w")]) == 0
    assert "cosine_at_base_source" in capsys.readouterr().out, "compare prints the cosine"
    assert main(["compress", *common, "--method", "magnitude", "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "record.json").is_file(), "compress writes its record"
    assert main(["aird", *common, "--direction", str(tmp_path / "base"), "--out", str(tmp_path / "a")]) == 0
    weights = tmp_path / "a" / "weights.safetensors"
    assert weights.is_file(), "aird writes the edited weights"
    capsys.readouterr()
    assert (
        main(["evaluate", *common, "--weights", str(weights), "--n-test", "2", "--out", str(tmp_path / "e")])
        == 0
    )
    assert "over_refusal" in capsys.readouterr().out, "evaluate prints over-refusal"
    assert (
        main(
            [
                "evaluate",
                *common,
                "--weights",
                str(tmp_path / "c" / "record.json"),
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 2
    )
