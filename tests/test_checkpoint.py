"""Checkpoints out and back in: plain transformers in a fresh process, load_model, record and hashes."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from refusal_core.checkpoint import (
    CHECKPOINT_RECORD,
    read_checkpoint_record,
    save_checkpoint,
)
from refusal_core.compression import compress_, method_config
from refusal_core.compression.bnb import bnb_available
from refusal_core.compression.quantization import Int8LinearSim
from refusal_core.errors import ArtifactError, InvalidArgumentError, NonFiniteError
from refusal_core.interventions import orthogonalize_model_
from refusal_core.model import encode_prompts, format_prompt, load_model, model_identity
from refusal_core.testing.tiny import TINY_FAMILIES, tiny_model, tiny_prompts, tiny_tokenizer
from refusal_core.toy import load_toy_model

TOK = tiny_tokenizer()
TEXTS = ["Tell me a story about a small dog who finds a ball.", "Hi", tiny_prompts(1, "harmful", seed=3)[0]]
CALIBRATION = encode_prompts(TOK, tiny_prompts(4, "harmful", seed=1) + tiny_prompts(4, "harmless", seed=1))
#: plain transformers' stock Linear4bit repacks nf4 weights for the AVX512-BF16 CPU kernel (bfloat16
#: block scales); measured 3.4e-3 max / ~1e-3 relative logit difference on the tiny llama.
NF4_PLAIN_REL_TOL = 0.02
#: LLM.int8 simulation vs its dequantized weights alone (activation quantization dropped): a sanity bound.
INT8_WEIGHTS_ONLY_REL_TOL = 0.05


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    return float((a64 - b64).norm() / b64.norm())


def batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    texts = [format_prompt(tokenizer, t) for t in TEXTS]
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def logits_of(model: nn.Module, tokenizer: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch(tokenizer)).logits.detach().to(torch.float32)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights_only(model: nn.Module) -> nn.Module:
    """A copy with every Int8LinearSim replaced by an nn.Linear of weight q·scale (written out here)."""
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, Int8LinearSim):
            parent_name, _, attr = name.rpartition(".")
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(module.q.to(torch.float64).mul(module.scale.to(torch.float64)[:, None]))
                if module.bias is not None:
                    lin.bias.copy_(module.bias)
            setattr(out.get_submodule(parent_name), attr, lin)
    return out


# ----------------------------------------------------------------------------
# the cases: (name, builder → (model, tokenizer, record, base identity), expected format, plain comparison)
# ----------------------------------------------------------------------------

Case = tuple[str, Callable[[], tuple[nn.Module, Any, dict[str, Any], dict[str, Any]]], str, str]


def _compressed(family: str, method: str, d_model: int = 32) -> Callable[[], Any]:
    def build() -> tuple[nn.Module, Any, dict[str, Any], dict[str, Any]]:
        model = tiny_model(family, d_model=d_model, n_kv_heads=2, seed=5)
        base = model_identity(model)
        record = compress_(model, method_config(method), CALIBRATION).to_dict()
        return model, tiny_tokenizer(), record, base

    return build


def _dense(family: str) -> Callable[[], Any]:
    def build() -> tuple[nn.Module, Any, dict[str, Any], dict[str, Any]]:
        model = tiny_model(family, n_kv_heads=2, seed=4)
        return model, tiny_tokenizer(), {"method": None}, model_identity(model)

    return build


def _toy(method: str | None) -> Callable[[], Any]:
    def build() -> tuple[nn.Module, Any, dict[str, Any], dict[str, Any]]:
        model, tok = load_toy_model()
        base = model_identity(model)
        if method is None:
            return model, tok, {"method": None}, base
        return model, tok, compress_(model, method_config(method), CALIBRATION).to_dict(), base

    return build


def _orthogonalized_gemma() -> tuple[nn.Module, Any, dict[str, Any], dict[str, Any]]:
    # Tied embeddings get untied by orthogonalization: the checkpoint must keep both matrices.
    model = tiny_model("gemma", seed=2)
    base = model_identity(model)
    orthogonalize_model_(model, torch.randn(32, generator=torch.Generator().manual_seed(0)))
    return model, tiny_tokenizer(), {"method": "orthogonalize", "layer": None}, base


CASES: list[Case] = [(f"{f}-dense", _dense(f), "dense", "exact") for f in TINY_FAMILIES]
CASES += [(f"{f}-magnitude", _compressed(f, "magnitude"), "dense", "exact") for f in TINY_FAMILIES]
CASES += [
    ("toy-base", _toy(None), "dense", "exact"),
    ("toy-wanda", _toy("wanda"), "dense", "exact"),
    ("toy-llm-int8", _toy("llm-int8"), "dequantized-simulation", "int8-weights"),
    ("gemma-orthogonalized", _orthogonalized_gemma, "dense", "exact"),
    ("phi3-wanda", _compressed("phi3", "wanda"), "dense", "exact"),
    ("llama-wanda-2:4", _compressed("llama", "wanda-2:4"), "dense", "exact"),
    ("llama-llm-int8", _compressed("llama", "llm-int8"), "dequantized-simulation", "int8-weights"),
    ("phi3-llm-int8", _compressed("phi3", "llm-int8"), "dequantized-simulation", "int8-weights"),
    ("gemma2-llm-int8", _compressed("gemma2", "llm-int8"), "dequantized-simulation", "int8-weights"),
    ("llama-awq-w4", _compressed("llama", "awq-w4"), "dequantized-simulation", "exact"),
    ("qwen3-awq-w8", _compressed("qwen3", "awq-w8"), "dequantized-simulation", "exact"),
]
if bnb_available():
    CASES += [
        ("llama-bnb-int8", _compressed("llama", "bnb-int8", 64), "bitsandbytes-int8", "exact"),
        ("phi3-bnb-int8", _compressed("phi3", "bnb-int8", 64), "bitsandbytes-int8", "exact"),
        ("llama-bnb-nf4", _compressed("llama", "bnb-nf4", 64), "bitsandbytes-nf4", "nf4"),
        ("gemma3_text-bnb-nf4", _compressed("gemma3_text", "bnb-nf4", 64), "bitsandbytes-nf4", "nf4"),
    ]

# Loads every checkpoint with plain transformers (no refusal_core import), tokenizes the prompts with
# the saved tokenizer and chat template, and writes the logits.
_RELOAD_SCRIPT = r"""
import json, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
jobs = json.load(open(sys.argv[1]))
out = {}
for name, path in jobs["dirs"].items():
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    model.eval()
    chat = [[{"role": "user", "content": t}] for t in jobs["texts"]]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chat]
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        out[name] = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
    out[name + "/ids"] = enc["input_ids"]
    assert "refusal_core" not in sys.modules, "the reload must not import refusal_core"
save_file({k: v.contiguous() for k, v in out.items()}, jobs["out"])
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every case built, its in-memory logits taken, then saved; the models are kept for comparison."""
    root = tmp_path_factory.mktemp("checkpoints")
    out: dict[str, dict[str, Any]] = {}
    for name, build, fmt, compare in CASES:
        model, tok, record, base = build()
        before = logits_of(model, tok)
        path = save_checkpoint(model, tok, root / name, record=record, base_identity=base)
        after = logits_of(model, tok)
        out[name] = {
            "model": model,
            "tok": tok,
            "record": record,
            "base": base,
            "format": fmt,
            "compare": compare,
            "path": path,
            "logits": before,
            "unchanged": torch.equal(before, after),
            "ids": batch(tok)["input_ids"],
        }
    return out


@pytest.fixture(scope="module")
def reloaded(
    saved: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, torch.Tensor]:
    """Logits of every checkpoint loaded by plain transformers in one fresh Python process."""
    work = tmp_path_factory.mktemp("reload")
    jobs = {
        "dirs": {n: str(c["path"]) for n, c in saved.items()},
        "texts": TEXTS,
        "out": str(work / "out.st"),
    }
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # plain transformers: nothing of this checkout on the path
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, str(work / "jobs.json")],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        check=False,
    )
    assert proc.returncode == 0, f"fresh-process reload failed:\n{proc.stderr[-4000:]}"
    return load_file(str(work / "out.st"))


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_fresh_process_plain_transformers_gives_the_same_logits(
    name: str, saved: dict[str, dict[str, Any]], reloaded: dict[str, torch.Tensor]
) -> None:
    case = saved[name]
    assert torch.equal(reloaded[name + "/ids"], case["ids"]), (
        f"{name}: the saved tokenizer + chat template tokenize the prompts differently in a fresh process"
    )
    got, want = reloaded[name], case["logits"]
    if case["compare"] == "exact":
        assert torch.equal(got, want), (
            f"{name}: reloaded logits differ, max {float((got - want).abs().max()):.3g}"
        )
    elif case["compare"] == "int8-weights":
        # Plain transformers computes with the stored dequantized weights only.
        ref = logits_of(weights_only(case["model"]), case["tok"])
        assert torch.equal(got, ref), (
            f"{name}: reloaded logits differ from the model with weights q·scale, "
            f"max {float((got - ref).abs().max()):.3g}"
        )
        err = rel(got, want)
        assert 0 < err < INT8_WEIGHTS_ONLY_REL_TOL, (
            f"{name}: weights-only vs simulated int8, relative {err:.3g}"
        )
    else:
        err = rel(got, want)
        assert err < NF4_PLAIN_REL_TOL, f"{name}: plain transformers nf4 vs in memory, relative {err:.3g}"


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_load_model_gives_the_same_logits_and_modules(name: str, saved: dict[str, dict[str, Any]]) -> None:
    case = saved[name]
    assert case["unchanged"], f"{name}: save_checkpoint changed the model's logits"
    model, tok = load_model(str(case["path"]))
    got = logits_of(model, tok)
    want = case["logits"]
    assert torch.equal(got, want), (
        f"{name}: load_model logits differ, max {float((got - want).abs().max()):.3g}"
    )
    kinds = {type(m).__name__ for m in model.modules()}
    if name.endswith("llm-int8"):
        assert "Int8LinearSim" in kinds, f"{name}: load_model did not rebuild the int8 simulation ({kinds})"
    assert model_identity(model)["fingerprint"] == model_identity(case["model"])["fingerprint"], (
        f"{name}: reloaded weights have another fingerprint"
    )


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_record_describes_the_checkpoint(name: str, saved: dict[str, dict[str, Any]]) -> None:
    case = saved[name]
    path: Path = case["path"]
    doc = read_checkpoint_record(path)
    assert doc is not None, f"{name}: no record"
    assert (doc["kind"], doc["version"], doc["format"]) == ("refusal_core.checkpoint", 2, case["format"]), (
        f"{name}: kind/version/format {doc['kind']!r}/{doc['version']!r}/{doc['format']!r}"
    )
    assert doc["method"] == case["record"]["method"], f"{name}: method {doc['method']!r}"
    assert doc["settings"] == json.loads(json.dumps(case["record"])), f"{name}: record not stored as given"
    assert doc["identity"] == model_identity(case["model"]), f"{name}: identity is not the saved model's"
    assert doc["base_identity"] == case["base"], f"{name}: base_identity is not the uncompressed model's"
    packages = set(doc["packages"])
    assert {"torch", "transformers", "refusal_core"} <= packages, f"{name}: packages {packages}"
    assert ("bitsandbytes" in packages) == case["format"].startswith("bitsandbytes"), f"{name}: {packages}"
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {CHECKPOINT_RECORD}
    assert set(doc["files"]) == files, f"{name}: hashed {sorted(doc['files'])} but wrote {sorted(files)}"
    assert all(doc["files"][f] == sha256(path / f) for f in files), f"{name}: a recorded hash is wrong"
    for needed in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert needed in files, f"{name}: {needed} missing from {sorted(files)}"
    if case["format"] == "dequantized-simulation":
        assert doc["simulated_method"] == case["record"]["method"], f"{name}: simulated_method"
    config = json.loads((path / "config.json").read_text())
    assert ("quantization_config" in config) == case["format"].startswith("bitsandbytes"), (
        f"{name}: quantization_config in config.json: {'quantization_config' in config}"
    )
    stored = load_file(str(path / "model.safetensors"))
    if case["format"] in ("dense", "dequantized-simulation"):
        assert all(t.is_floating_point() for t in stored.values()), (
            f"{name}: non-float tensor in a float format"
        )
    if "magnitude" in name or "wanda" in name:
        for key, value in case["model"].state_dict().items():
            if key.endswith("_proj.weight") and ".layers." in key:
                zeros, stored_zeros = int((value == 0).sum()), int((stored[key] == 0).sum())
                assert zeros > 0, f"{name}: {key} has no zeros after pruning"
                assert stored_zeros == zeros, (
                    f"{name}: {key} stored with {stored_zeros} zeros, in memory {zeros}"
                )


def test_hashes_detect_a_flipped_byte(saved: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    import shutil

    for victim in ("model.safetensors", "tokenizer.json"):
        path = tmp_path / victim
        shutil.copytree(saved["llama-dense"]["path"], path)
        data = bytearray((path / victim).read_bytes())
        data[len(data) // 2] ^= 0x01
        (path / victim).write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match=re.escape(victim)):
            read_checkpoint_record(path)
        with pytest.raises(ArtifactError, match=re.escape(victim)):
            load_model(str(path))
    gone = tmp_path / "gone"
    shutil.copytree(saved["llama-dense"]["path"], gone)
    (gone / "generation_config.json").unlink()
    with pytest.raises(ArtifactError, match=r"generation_config\.json"):
        read_checkpoint_record(gone)


def test_plain_directory_has_no_record(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path / "plain")
    assert read_checkpoint_record(tmp_path / "plain") is None, (
        "a plain HF directory has no refusal_core record"
    )
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        read_checkpoint_record(tmp_path / "nothing")


def _no_temporaries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_non_finite_weights_are_refused_before_writing(tmp_path: Path) -> None:
    model = tiny_model("qwen3")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"layers\.1\.mlp\.up_proj"):
        save_checkpoint(model, TOK, tmp_path / "out", record={"method": None})
    assert not (tmp_path / "out").exists(), "a refused checkpoint left its directory"
    sim = tiny_model("llama")
    compress_(sim, method_config("llm-int8"))
    with torch.no_grad():
        sim.model.layers[0].self_attn.o_proj.scale[0] = float("inf")
    with pytest.raises(NonFiniteError, match="o_proj"):
        save_checkpoint(sim, TOK, tmp_path / "out", record={"method": "llm-int8"}, base_identity={})
    assert list(tmp_path.iterdir()) == [], f"refused saves left {sorted(p.name for p in tmp_path.iterdir())}"


def test_target_policy_and_atomic_replace(tmp_path: Path) -> None:
    model_a, model_b = tiny_model("mistral", seed=1), tiny_model("mistral", seed=2)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidArgumentError, match="overwrite=True"):
        save_checkpoint(model_a, TOK, other, record={"method": None})
    assert (other / "notes.txt").read_text() == "keep me", "a refused save touched the directory"
    save_checkpoint(model_a, TOK, other, record={"method": None}, overwrite=True)
    assert not (other / "notes.txt").exists(), "overwrite=True kept a file of the old directory"
    ckpt = tmp_path / "ckpt"
    save_checkpoint(model_a, TOK, ckpt, record={"method": None})
    save_checkpoint(model_b, TOK, ckpt, record={"method": None})  # a previous checkpoint is replaced
    doc = read_checkpoint_record(ckpt)
    assert doc is not None, "the replaced checkpoint has no record"
    assert doc["identity"]["fingerprint"] == model_identity(model_b)["fingerprint"], (
        "the second save did not replace the first checkpoint"
    )
    assert _no_temporaries(tmp_path) == [], f"temporary directories left: {_no_temporaries(tmp_path)}"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        save_checkpoint(model_a, TOK, tmp_path / "file", record={"method": None})


def test_bad_records_are_refused_before_writing(tmp_path: Path) -> None:
    model = tiny_model("llama")
    with pytest.raises(InvalidArgumentError, match="JSON-serializable"):
        save_checkpoint(model, TOK, tmp_path / "a", record={"method": None, "weights": model.lm_head})
    with pytest.raises(InvalidArgumentError, match="base"):
        save_checkpoint(model, TOK, tmp_path / "b", record={"method": "wanda"})
    with pytest.raises(InvalidArgumentError, match="mapping"):
        save_checkpoint(model, TOK, tmp_path / "c", record=[("method", None)])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="declares format"):
        save_checkpoint(model, TOK, tmp_path / "d", record={"method": None, "format": "bitsandbytes-int8"})
    with pytest.raises(InvalidArgumentError, match="tokenizer"):
        save_checkpoint(model, None, tmp_path / "e", record={"method": None})
    assert list(tmp_path.iterdir()) == [], f"refused saves left {sorted(p.name for p in tmp_path.iterdir())}"


def test_non_finite_record_values_are_stored_as_null(tmp_path: Path) -> None:
    model = tiny_model("llama")
    record = {
        "method": None,
        "score": float("nan"),
        "nested": {"thr": float("inf"), "xs": [1.0, float("-inf")]},
    }
    path = save_checkpoint(model, TOK, tmp_path / "x", record=record)
    text = (path / CHECKPOINT_RECORD).read_text()
    assert "NaN" not in text, "the record is not strict JSON (NaN)"
    assert "Infinity" not in text, "the record is not strict JSON (Infinity)"
    doc = json.loads(text)
    assert doc["settings"] == {"method": None, "score": None, "nested": {"thr": None, "xs": [1.0, None]}}, doc


def test_record_may_declare_float_weights_a_simulation(tmp_path: Path) -> None:
    model = tiny_model("llama")
    base = model_identity(model)
    path = save_checkpoint(
        model,
        TOK,
        tmp_path / "x",
        record={"method": "aird", "format": "dequantized-simulation"},
        base_identity=base,
    )
    doc = read_checkpoint_record(path)
    assert doc is not None, "no record"
    assert doc["format"] == "dequantized-simulation", f"declared simulation stored as {doc['format']!r}"


def test_saved_weights_are_the_exact_dequantized_simulation(saved: dict[str, dict[str, Any]]) -> None:
    case = saved["llama-llm-int8"]
    stored = load_file(str(case["path"] / "model.safetensors"))
    sim = case["model"].model.layers[0].mlp.down_proj
    assert isinstance(sim, Int8LinearSim), "the in-memory model lost its simulated module"
    want = (sim.q.to(torch.float64) * sim.scale.to(torch.float64)[:, None]).to(torch.float32)
    got = stored["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(got, want), "stored down_proj weight is not q·scale"


def test_int8_simulation_without_outlier_split_round_trips(tmp_path: Path) -> None:
    # threshold inf (no outlier split) is stored as null (strict JSON) and restored as inf.
    from refusal_core.compression.config import Int8Config

    model = tiny_model("qwen2", seed=9)
    base = model_identity(model)
    record = compress_(model, Int8Config(threshold=float("inf"))).to_dict()
    want = logits_of(model, TOK)
    path = save_checkpoint(model, TOK, tmp_path / "int8-inf", record=record, base_identity=base)
    doc = read_checkpoint_record(path)
    assert doc is not None, "no record"
    assert doc["int8_simulation"]["threshold"] is None, (
        f"stored threshold {doc['int8_simulation']['threshold']!r}"
    )
    loaded, _ = load_model(str(path))
    sims = [m for m in loaded.modules() if isinstance(m, Int8LinearSim)]
    assert len(sims) == 14, f"{len(sims)} simulated modules rebuilt"
    assert all(m.threshold == float("inf") for m in sims), "threshold inf not restored"
    assert torch.equal(logits_of(loaded, TOK), want), (
        "int8 (no outlier split) logits changed through the checkpoint"
    )


@pytest.mark.skipif(not bnb_available(), reason="bitsandbytes is not installed")
def test_nf4_with_cpu_packing_round_trips(tmp_path: Path) -> None:
    from refusal_core.compression.bnb import BnbNf4Config

    model = tiny_model("llama", d_model=64, seed=3)
    base = model_identity(model)
    record = compress_(model, BnbNf4Config(cpu_packing=True)).to_dict()
    want = logits_of(model, TOK)
    path = save_checkpoint(model, TOK, tmp_path / "nf4-packed", record=record, base_identity=base)
    doc = read_checkpoint_record(path)
    assert doc is not None, "no record"
    # bitsandbytes packs only on a CPU with AVX512-BF16 (its own detector decides); elsewhere the
    # request has no effect and the record must say the layout is the portable one.
    from bitsandbytes.nn.modules import has_avx512bf16

    packs = bool(has_avx512bf16())
    assert doc["bitsandbytes_cpu_packing"] is packs, (
        f"record says cpu_packing={doc['bitsandbytes_cpu_packing']}, bitsandbytes packs here: {packs}"
    )
    loaded, _ = load_model(str(path))
    # With CPU packing bitsandbytes' CPU kernel decides the block-scale rounding (BnbNf4Config): the
    # reload is held to the nf4 tolerance, not bit equality (measured max 2.9e-3 here).
    err = rel(logits_of(loaded, TOK), want)
    assert err < NF4_PLAIN_REL_TOL, f"nf4 (CPU packing) logits changed by relative {err:.3g}"


def test_llmc_awq_checkpoint_is_recorded_as_a_simulation(tmp_path: Path) -> None:
    from refusal_core.testing.tiny import tiny_tokenizer

    model = tiny_model("llama")
    out = save_checkpoint(
        model,
        tiny_tokenizer(),
        tmp_path / "ck",
        record={"method": "llmc-awq-w4", "identity_before": model_identity(model)},
    )
    doc = read_checkpoint_record(out)
    assert doc is not None, "save_checkpoint wrote a record"
    assert doc["format"] == "dequantized-simulation", (
        f"an llmc-awq-w4 checkpoint holds fake-quantized floats, recorded as {doc['format']!r}"
    )
