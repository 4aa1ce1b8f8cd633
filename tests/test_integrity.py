"""Hand-corrupted study stages (issue 10, item 2): each damage is detected, said on stderr,
and repaired by recomputing exactly the stages that depend on it; outside the study the
same damage is an ArtifactError naming the file."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

import refusal_core.bench as study
from refusal_core.artifacts import StageStore
from refusal_core.directions import DirectionCandidates
from refusal_core.errors import ArtifactError
from refusal_core.study import AttackSettings, StudyConfig, run_study

CONFIG = StudyConfig(
    model="toy",
    methods=("magnitude",),
    n_train=8,
    n_val=4,
    n_test=4,
    n_calibration=4,
    noise_splits=1,
    zero_shot_tasks=(),
    max_new_tokens=4,
    attacks=AttackSettings(
        decoding_temperatures=(1.0,), decoding_top_ps=(1.0,), decoding_top_ks=(0,), gcg_prompts=0
    ),
)

#: A block linear the identity fingerprint does not probe (it sums the embedding, o_proj[0]
#: and the last down_proj), so damage here is invisible to the identity checks.
UNPROBED = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("clean_study")
    return out, run_study(CONFIG, out, progress=False).to_dict()


def _copy(clean_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(clean_dir, out)
    return out


def _markers(out: Path) -> dict[str, tuple[int, int]]:
    """Stage name -> (inode, mtime) of its marker: a redone stage gets a new marker file."""
    return {
        str(p.parent.relative_to(out / "stages")): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in (out / "stages").rglob("stage.json")
    }


def _redone(before: dict[str, tuple[int, int]], out: Path) -> set[str]:
    return {k for k, v in _markers(out).items() if before.get(k) != v}


def _tensor_byte_offset(path: Path, name: str) -> tuple[int, str]:
    """Absolute byte offset of tensor ``name``'s first element in a safetensors file, and its dtype."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return 8 + n + header[name]["data_offsets"][0], header[name]["dtype"]


def _flip_exponent_bit(path: Path, name: str) -> None:
    offset, dtype = _tensor_byte_offset(path, name)
    assert dtype == "F32", f"test expects float32 weights for {name}, got {dtype}"
    data = bytearray(path.read_bytes())
    data[offset + 3] ^= 0x40  # little-endian float32: byte 3 holds the sign and the top exponent bits
    path.write_bytes(bytes(data))


def _variants(results: dict) -> list[dict]:
    return results["variants"]


def test_flipped_exponent_bit_in_compressed_weights_recomputes_that_stage_only(
    clean: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_dir, clean_results = clean
    out = _copy(clean_dir, tmp_path)
    weights = out / "stages" / "magnitude" / "compress" / "weights.safetensors"
    original = weights.read_bytes()
    _flip_exponent_bit(weights, UNPROBED)
    before = _markers(out)
    capsys.readouterr()
    results = run_study(CONFIG, out, progress=False).to_dict()
    err = capsys.readouterr().err
    assert "stage magnitude/compress is damaged" in err, f"stderr names the damaged stage: {err!r}"
    assert "weights.safetensors" in err, f"stderr names the damaged file: {err!r}"
    assert weights.read_bytes() == original, "the damaged weights were recomputed bit-identically"
    assert _redone(before, out) == {"magnitude/compress"}, (
        "an identical recomputation keeps every downstream stage valid; "
        f"redone: {sorted(_redone(before, out))}"
    )
    assert _variants(results) == _variants(clean_results), "results after the repair equal the clean run"
    # Outside the study the same damage is a clear error naming the file.
    _flip_exponent_bit(weights, UNPROBED)
    with pytest.raises(ArtifactError, match=r"magnitude/compress: file .*weights\.safetensors was modified"):
        StageStore(out / "stages").verify("magnitude/compress")


def test_recomputed_stage_with_different_files_redoes_everything_downstream(
    clean: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean_dir, _ = clean
    out = _copy(clean_dir, tmp_path)
    _flip_exponent_bit(out / "stages" / "magnitude" / "compress" / "weights.safetensors", UNPROBED)
    real = study.compress_

    def drifting(model, *args, **kw):  # type: ignore[no-untyped-def]
        # A recomputation that does not reproduce the old output (new library version, say).
        record = real(model, *args, **kw)
        with torch.no_grad():
            model.get_parameter(UNPROBED).mul_(1.5)
        return record

    monkeypatch.setattr(study, "compress_", drifting)
    before = _markers(out)
    run_study(CONFIG, out, progress=False)
    downstream = {
        "magnitude/compress",
        "magnitude/extract",
        "magnitude/select",
        "magnitude/mechanism",
        "magnitude/sweep",
        "magnitude+aird/extract",
        "magnitude+aird/select",
        "magnitude+aird/mechanism",
        "eval/magnitude",
        "eval/magnitude+aird",
    }
    redone = _redone(before, out)
    # the chosen-strength variants (magnitude+aird*, -sparse*) are redone too when the choice is an edit
    assert all(s.startswith(("magnitude", "eval/magnitude")) for s in redone), f"redid {sorted(redone)}"
    assert downstream <= redone, (
        f"a recomputed compress stage with new weights must redo exactly its downstream stages "
        f"{sorted(downstream)} (+ the chosen repairs), redid {sorted(redone)}"
    )
    # The files recorded for the redone stages are the ones they wrote (not leftovers that
    # other code rewrites later, like the comparison next to the candidates): a rerun redoes nothing.
    settled = _markers(out)
    run_study(CONFIG, out, progress=False)
    assert _redone(settled, out) == set(), f"a rerun after the repair redid {sorted(_redone(settled, out))}"


def test_emptied_evaluation_json_is_recomputed(
    clean: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_dir, clean_results = clean
    out = _copy(clean_dir, tmp_path)
    path = out / "stages" / "eval" / "magnitude" / "evaluation.json"
    path.write_text("{}")
    before = _markers(out)
    capsys.readouterr()
    results = run_study(CONFIG, out, progress=False).to_dict()
    assert "stage eval/magnitude is damaged" in capsys.readouterr().err, "stderr names the damaged stage"
    assert _redone(before, out) == {"eval/magnitude"}, f"redone: {sorted(_redone(before, out))}"
    assert _variants(results) == _variants(clean_results), "evaluation recomputed to the clean values"


def test_edited_evaluation_value_is_not_used(clean: tuple[Path, dict], tmp_path: Path) -> None:
    clean_dir, clean_results = clean
    out = _copy(clean_dir, tmp_path)
    path = out / "stages" / "eval" / "magnitude" / "evaluation.json"
    doc = json.loads(path.read_text())
    true_value = sum(doc["refused_harmless"])
    doc["refused_harmless"] = [not v for v in doc["refused_harmless"]]
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    results = run_study(CONFIG, out, progress=False).to_dict()
    got = next(v for v in results["variants"] if v["name"] == "magnitude")["evaluation"]["over_refusal"]["k"]
    assert got == true_value, (
        f"over-refusal count of magnitude after editing evaluation.json: {got}, clean value {true_value}"
    )
    assert _variants(results) == _variants(clean_results), "every value equals the clean run"


def test_evaluation_json_failing_its_schema_is_recomputed_even_when_its_hash_was_rerecorded(
    clean: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A writer bug (not a disk error) would record a hash for a wrong file: the schema still refuses it.
    clean_dir, clean_results = clean
    out = _copy(clean_dir, tmp_path)
    stage = out / "stages" / "eval" / "base"
    doc = json.loads((stage / "evaluation.json").read_text())
    doc["jailbroken"] = {"vanilla": "0.0"}
    (stage / "evaluation.json").write_text(json.dumps(doc))
    StageStore(out / "stages").mark_done("eval/base", json.loads((stage / "stage.json").read_text())["key"])
    capsys.readouterr()
    results = run_study(CONFIG, out, progress=False).to_dict()
    err = capsys.readouterr().err
    assert "stage eval/base is damaged" in err, f"stderr names the damaged stage: {err!r}"
    assert "'jailbroken'" in err, f"stderr names the key that fails the schema: {err!r}"
    assert _variants(results) == _variants(clean_results), "evaluation recomputed to the clean values"


def test_edited_prompt_count_in_candidates_json(
    clean: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_dir, clean_results = clean
    out = _copy(clean_dir, tmp_path)
    path = out / "stages" / "base" / "extract" / "candidates.json"
    doc = json.loads(path.read_text())
    assert doc["meta"]["n_harmful"] == CONFIG.n_train, "fixture: candidates.json records n_harmful"
    doc["meta"]["n_harmful"] = 999
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    # Outside the study: a clear error naming the file.
    with pytest.raises(ArtifactError, match=r"candidates\.json was modified"):
        DirectionCandidates.load(path.with_suffix(""))
    capsys.readouterr()
    results = run_study(CONFIG, out, progress=False).to_dict()
    assert "stage base/extract is damaged" in capsys.readouterr().err, "stderr names the damaged stage"
    assert json.loads(path.read_text())["meta"]["n_harmful"] == CONFIG.n_train, "candidates rewritten"
    assert _variants(results) == _variants(clean_results), "results equal the clean run"
