"""GGUF export (refusal_core.export) round-trips through the project's GGUF loader.

The file is loaded back with :func:`refusal_core.model.load_model` (transformers'
``gguf_file=`` reader, which undoes llama.cpp's rotary row permutation on its
own), and compared with the source: f32 must give the same weights and
bit-identical logits; f16 and q8_0 must give exactly the source's weights
rounded by an independent reference written here (numpy float16,
``gguf.quants``). Tokenizer (ids of chat prompts, special tokens) and chat
template must survive too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from refusal_core.aird import AirdConfig, apply_aird_  # noqa: E402
from refusal_core.checkpoint import save_checkpoint  # noqa: E402
from refusal_core.cli import main  # noqa: E402
from refusal_core.compression import compress_, method_config  # noqa: E402
from refusal_core.errors import (  # noqa: E402
    InvalidArgumentError,
    ShapeMismatchError,
    UnsupportedArchitectureError,
    UnsupportedModuleError,
)
from refusal_core.export import export_gguf, llama_rotary_permute  # noqa: E402
from refusal_core.model import load_model  # noqa: E402
from refusal_core.testing.tiny import tiny_model, tiny_tokenizer  # noqa: E402

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "Explain how to pick a lock."]


@pytest.fixture(autouse=True)
def _gguf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The loader converts a .gguf once into a cache keyed by its hash; keep that cache per test.
    monkeypatch.setenv("REFUSAL_CORE_CACHE", str(tmp_path / "cache"))


def _chat_ids(tok: object, prompt: str) -> torch.Tensor:
    text = tok.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tok(text, return_tensors="pt", add_special_tokens=False).input_ids  # type: ignore[operator]


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # type: ignore[no-any-return]


def _q8_0(w: torch.Tensor) -> torch.Tensor:
    kind = gguf.GGMLQuantizationType.Q8_0
    a = w.detach().to(torch.float32).numpy()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, kind), kind))


MODELS = {
    "toy-llama": lambda: load_model("toy"),
    "qwen2-gqa-bias": lambda: (tiny_model("qwen2", n_kv_heads=2, seed=1), tiny_tokenizer()),
    "llama-gqa": lambda: (tiny_model("llama", n_kv_heads=1, seed=2), tiny_tokenizer()),
}


@pytest.mark.parametrize("which", sorted(MODELS))
def test_f32_export_loads_back_with_identical_weights_tokens_and_logits(which: str, tmp_path: Path) -> None:
    model, tok = MODELS[which]()
    path = export_gguf(model, tok, tmp_path / "m.gguf", tensor_type="f32")
    back, tok_back = load_model(str(path))
    assert type(back).__name__ == type(model).__name__, f"export f32 {which}: loaded as {type(back).__name__}"
    source = dict(model.named_parameters())
    for name, p in back.named_parameters():
        assert torch.equal(p.detach(), source[name].detach()), (
            f"export f32 {which}: {name} changed on round trip"
        )
    assert tok_back.chat_template == tok.chat_template, f"export f32 {which}: chat template lost"
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(tok_back, attr) == getattr(tok, attr), f"export f32 {which}: {attr} differs"
    for prompt in PROMPTS:
        ids = _chat_ids(tok, prompt)
        assert torch.equal(_chat_ids(tok_back, prompt), ids), f"export f32 {which}: token ids of {prompt!r}"
        assert torch.equal(_logits(back, ids), _logits(model, ids)), (
            f"export f32 {which}: logits of {prompt!r}"
        )


@pytest.mark.parametrize("tensor_type", ["f16", "q8_0"])
def test_f16_and_q8_0_export_hold_exactly_the_referenced_rounding(tensor_type: str, tmp_path: Path) -> None:
    model, tok = load_model("toy")
    path = export_gguf(model, tok, tmp_path / "m.gguf", tensor_type=tensor_type)
    back, _ = load_model(str(path))
    source = dict(model.named_parameters())
    for name, p in back.named_parameters():
        w = source[name].detach()
        if w.ndim < 2:
            expected = w
        elif tensor_type == "f16":
            expected = w.to(torch.float16).to(torch.float32)
        else:
            expected = _q8_0(w)  # the untied head is Q8_0 too (llama.cpp: Q8_0 file, or width 64 < 256)
        assert torch.equal(p.detach(), expected), (
            f"export {tensor_type}: {name} is not the reference rounding"
        )
    # The logits are those of the source with the same weights rounded: computed independently here.
    rounded = load_model("toy")[0]
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim == 2:
                p.copy_(p.to(torch.float16).to(torch.float32) if tensor_type == "f16" else _q8_0(p))
    ids = _chat_ids(tok, PROMPTS[0])
    assert torch.equal(_logits(back, ids), _logits(rounded, ids)), f"export {tensor_type}: logits"


def test_gguf_compressed_then_repaired_checkpoint_exports_with_its_weights(tmp_path: Path) -> None:
    model, tok = load_model("toy")
    record = compress_(model, method_config("gguf-q8_0"))
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    apply_aird_(model, r, 1, AirdConfig())  # a repaired model: the edited layer leaves the Q8_0 grid
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt", record={"method": "gguf-q8_0", **record.to_dict()})
    out = tmp_path / "repaired.gguf"
    assert main(["export", "--model", str(ckpt), "--type", "q8_0", "--out", str(out), "--no-progress"]) == 0
    back, _ = load_model(str(out))
    source = dict(model.named_parameters())
    for name, p in back.named_parameters():
        w = source[name].detach()
        expected = w if w.ndim < 2 else _q8_0(w)
        assert torch.equal(p.detach(), expected), f"export of the repaired checkpoint: {name}"
        if ".layers.0." in name and name.endswith("proj.weight"):
            # Q8_0 of an already Q8_0-dequantized weight is that weight: the compressed layers survive as is.
            assert torch.equal(p.detach(), w), f"re-quantizing gguf-q8_0's weight {name} moved it"
    # An existing file is refused without --overwrite and left alone.
    before = out.read_bytes()
    assert main(["export", "--model", str(ckpt), "--out", str(out), "--no-progress"]) == 2
    assert out.read_bytes() == before, "a refused export changed the existing file"


def test_export_refuses_before_writing(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'gemma'"):
        export_gguf(tiny_model("gemma"), tok, tmp_path / "g.gguf")
    sim = tiny_model("llama")
    compress_(sim, method_config("llm-int8"))
    with pytest.raises(UnsupportedModuleError, match="Int8LinearSim"):
        export_gguf(sim, tok, tmp_path / "s.gguf")
    with pytest.raises(ShapeMismatchError, match=r"blocks of 32; token_embd\.weight has rows of 48"):
        export_gguf(tiny_model("llama", d_model=48, d_ff=64), tok, tmp_path / "w.gguf", tensor_type="q4_0")
    with pytest.raises(InvalidArgumentError, match="tensor_type must be one of"):
        export_gguf(tiny_model("llama"), tok, tmp_path / "t.gguf", tensor_type="q4_k_m")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == [], (
        "a refused export left a file"
    )


def test_llama_rotary_permute_pairs_the_two_halves_of_each_head() -> None:
    # Two heads of width 4: rows (h, i) for i < 2 pair with (h, i + 2); llama.cpp wants them adjacent.
    rows = torch.arange(8, dtype=torch.float32)[:, None].numpy()
    got = llama_rotary_permute(rows, 2)[:, 0].tolist()
    assert got == [0, 2, 1, 3, 4, 6, 5, 7], f"llama_rotary_permute of 8 rows, 2 heads: {got}"


def test_export_metadata_names_the_architecture_for_llama_cpp(tmp_path: Path) -> None:
    model, tok = load_model("toy")
    path = export_gguf(model, tok, tmp_path / "m.gguf", tensor_type="q8_0")
    reader = gguf.GGUFReader(str(path))

    def value(key: str) -> object:
        field = reader.fields[key]
        return field.contents()

    assert value("general.architecture") == "llama"
    assert value("general.file_type") == 7, "general.file_type of a q8_0 export must be MOSTLY_Q8_0 (7)"
    assert value("llama.block_count") == model.config.num_hidden_layers
    assert value("llama.attention.head_count") == model.config.num_attention_heads
    assert value("tokenizer.ggml.model") == "gpt2"
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert names["blk.0.attn_norm.weight"] == "F32", "1-D tensors stay F32"
    assert names["blk.0.ffn_down.weight"] == "Q8_0"
    assert names["output.weight"] == "Q8_0"
