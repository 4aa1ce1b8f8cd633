"""Calibration sets (compression.calibration_sets): specs, token ids, mask and scale comparisons."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from refusal_core.cli import main
from refusal_core.compression import WandaConfig, compress_, quantize_awq_
from refusal_core.compression.calibration_sets import (
    calibration_token_ids,
    check_calibration_spec,
    mask_overlap,
    scale_cosine,
)
from refusal_core.errors import EmptyInputError, InvalidArgumentError
from refusal_core.model import encode_prompts, load_model
from refusal_core.prompts import load_prompts
from refusal_core.testing.tiny import tiny_model, tiny_tokenizer


def test_keywords_and_files_resolve_to_the_expected_sequences(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    harmful, harmless = load_prompts("harmful_train"), load_prompts("harmless_train")
    enc = lambda ps: encode_prompts(tok, ps, require_post_instruction=True)  # noqa: E731
    assert calibration_token_ids(tok, "harmful", 3) == enc(harmful[:3]), "calibration 'harmful'"
    assert calibration_token_ids(tok, "harmless", 3) == enc(harmless[:3]), "calibration 'harmless'"
    mix = [harmful[0], harmless[0], harmful[1], harmless[1], harmful[2]]
    assert calibration_token_ids(tok, "mix", 5) == enc(mix), "calibration 'mix' interleaves, harmful first"
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt here\n\n  second one  \nthird\n", encoding="utf-8")
    assert calibration_token_ids(tok, str(txt), 2) == enc(["first prompt here", "second one"]), ".txt lines"
    plain = tmp_path / "plain.md"
    plain.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    ids = tok(plain.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    got = calibration_token_ids(tok, f"text:{plain}", 3, text_tokens=16)
    assert got == [ids[0:16], ids[16:32], ids[32:48]], "text:FILE gives consecutive 16-token windows"


def test_bad_specs_are_refused_with_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"harmful.*harmless.*mix"):
        check_calibration_spec("harmfull")
    with pytest.raises(InvalidArgumentError, match="is not one of"):
        check_calibration_spec(f"text:{tmp_path / 'missing.txt'}")
    empty = tmp_path / "e.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(EmptyInputError, match="holds no prompts"):
        calibration_token_ids(tiny_tokenizer(), str(empty), 4)


def test_mask_overlap_on_hand_built_masks() -> None:
    a, b = tiny_model("llama", n_layers=1), tiny_model("llama", n_layers=1)
    assert mask_overlap(a, b) == {
        "jaccard": 1.0,
        "equal_fraction": 1.0,
        "n_weights": mask_overlap(a, a)["n_weights"],
    }
    q_a, q_b = a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        q_a.view(-1)[:10] = 0  # a prunes 0..9, b prunes 5..14: 5 shared of 15 pruned in either
        q_b.view(-1)[5:15] = 0
    total = sum(m.weight.numel() for n, m in a.named_modules() if n.endswith("proj"))
    got = mask_overlap(a, b)
    assert got["jaccard"] == 5 / 15, f"mask_overlap jaccard of [0,10) vs [5,15): {got}"
    assert got["equal_fraction"] == (total - 10) / total, f"mask_overlap equal fraction: {got}"


def test_scale_cosine_recovers_hand_folded_scales() -> None:
    base = tiny_model("llama", n_layers=1)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    s_a, s_b = [], []
    with torch.no_grad():
        for (name, ma), mb in zip(a.named_modules(), b.modules()):
            if name.endswith("proj"):
                sa = torch.rand(ma.weight.shape[1], generator=gen, dtype=torch.float64) + 0.5
                sb = torch.rand(ma.weight.shape[1], generator=gen, dtype=torch.float64) + 0.5
                ma.weight.mul_(sa.to(torch.float32))
                mb.weight.mul_(sb.to(torch.float32))
                s_a.append(sa)
                s_b.append(sb)
    va, vb = torch.cat(s_a), torch.cat(s_b)
    expected = float(va @ vb / (va.norm() * vb.norm()))
    got = scale_cosine(base, a, b)
    assert math.isclose(got, expected, rel_tol=1e-6), (
        f"scale_cosine of hand-folded scales: {got} vs {expected}"
    )
    assert math.isclose(scale_cosine(base, a, a), 1.0, rel_tol=1e-12), "scale_cosine of a model with itself"


def test_awq_scales_from_different_calibration_sets_differ_and_same_set_agrees() -> None:
    model, tok = load_model("toy")
    runs = {}
    for spec in ("harmless", "harmful"):
        m = copy.deepcopy(model)
        quantize_awq_(m, calibration_token_ids(tok, spec, 8), w_bit=4, grid=5, scale_only=True)
        runs[spec] = m
    again = copy.deepcopy(model)
    quantize_awq_(again, calibration_token_ids(tok, "harmless", 8), w_bit=4, grid=5, scale_only=True)
    assert scale_cosine(model, runs["harmless"], again) == pytest.approx(1.0, abs=1e-12)
    assert scale_cosine(model, runs["harmless"], runs["harmful"]) < 1 - 1e-6, (
        "calibration set changes AWQ scales"
    )


def test_cli_compress_takes_calibration_keywords(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    args = [
        "compress",
        "--model",
        "toy",
        "--method",
        "wanda",
        "--calibration",
        "harmful",
        "--n-calibration",
        "6",
    ]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    saved, _ = load_model(str(out))
    model, tok = load_model("toy")
    reference = copy.deepcopy(model)
    compress_(reference, WandaConfig(), calibration_token_ids(tok, "harmful", 6))
    harmless = copy.deepcopy(model)
    compress_(harmless, WandaConfig(), calibration_token_ids(tok, "harmless", 6))
    assert mask_overlap(saved, reference)["equal_fraction"] == 1.0, "CLI --calibration harmful mask"
    assert mask_overlap(saved, harmless)["equal_fraction"] < 1.0, "harmful and harmless masks must differ"


def test_calibration_key_names_the_data_not_the_spelling(tmp_path: Path) -> None:
    from refusal_core.compression.calibration_sets import calibration_key

    assert calibration_key("harmless") == calibration_key("harmless_train") == "harmless_train"
    assert calibration_key("harmful") == calibration_key("harmful_train") == "harmful_train"
    assert len({calibration_key(s) for s in ("harmless", "harmful", "mix")}) == 3
    f = tmp_path / "cal.txt"
    f.write_text("Explain tides.\nName three rivers.\n", encoding="utf-8")
    k1, t1 = calibration_key(str(f)), calibration_key(f"text:{f}")
    f.write_text("Explain tides.\nName four rivers.\n", encoding="utf-8")
    assert calibration_key(str(f)) != k1, "an edited prompt file keeps its key"
    assert calibration_key(f"text:{f}") != t1, "an edited text file keeps its key"
    assert k1 != t1, "the same file as prompts and as plain text is two sets"
    with pytest.raises(InvalidArgumentError):
        calibration_key("no-such-set")


def test_the_compress_stage_is_shared_between_spellings_of_one_set(tmp_path: Path) -> None:
    """A study calibrated on ``harmless`` loads the Wanda stage one calibrated on ``harmless_train``
    saved (the same prompts), and recomputes it after a prompt file it was made with changes."""
    import os

    from refusal_core import bench as steps
    from refusal_core.frontier import seed_stages
    from refusal_core.study import StudyConfig

    def marker(d: Path) -> int:
        return os.stat(d / "stages" / "wanda" / "compress" / "stage.json").st_ino

    base = StudyConfig(model="toy", n_train=8, n_val=4, n_test=4, n_calibration=6, zero_shot_tasks=())
    a, b = tmp_path / "a", tmp_path / "b"
    steps.compress(steps.Bench(base, a), "wanda")
    seed_stages(a, b, ("wanda",))
    steps.compress(steps.Bench(StudyConfig(**{**base.__dict__, "calibration": "harmless"}), b), "wanda")
    assert marker(a) == marker(b), "harmless and harmless_train compressed twice"
    f = tmp_path / "cal.txt"
    f.write_text("\n".join(load_prompts("harmless_train")[:6]), encoding="utf-8")
    c = tmp_path / "c"
    with_file = StudyConfig(**{**base.__dict__, "calibration": str(f)})
    steps.compress(steps.Bench(with_file, c), "wanda")
    first = marker(c)
    f.write_text("\n".join(load_prompts("harmful_train")[:6]), encoding="utf-8")
    steps.compress(steps.Bench(with_file, c), "wanda")
    assert marker(c) != first, "a stage made from the file's old prompts was reused"
