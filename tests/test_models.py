"""Architecture layouts, chat formatting, post-instruction positions and the tiny-model factory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from refusal_core.errors import InvalidArgumentError, UnsupportedArchitectureError
from refusal_core.model import (
    format_prompt,
    get_layout,
    load_model,
    model_identity,
    post_instruction_tokens,
)
from refusal_core.testing.tiny import TINY_FAMILIES, tiny_model, tiny_prompts, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return tiny_tokenizer()


# What each family looks like, written from the Hugging Face modeling files (not from the registry):
# block linears, the norm feeding the MLP, the norms outputs pass before the residual add, norm gain.
UNFUSED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")
EXPECTED_PARTS = {
    "llama": (UNFUSED, "post_attention_layernorm", None, 0.0),
    "qwen2": (UNFUSED, "post_attention_layernorm", None, 0.0),
    "mistral": (UNFUSED, "post_attention_layernorm", None, 0.0),
    "gemma": (UNFUSED, "post_attention_layernorm", None, 1.0),
    "qwen3": (UNFUSED, "post_attention_layernorm", None, 0.0),
    "gemma2": (UNFUSED, "pre_feedforward_layernorm", POST_NORMS, 1.0),
    "gemma3_text": (UNFUSED, "pre_feedforward_layernorm", POST_NORMS, 1.0),
    "phi3": (("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), "post_attention_layernorm", None, 0.0),
}  # fmt: skip


def test_expected_parts_cover_every_tiny_family() -> None:
    assert set(EXPECTED_PARTS) == set(TINY_FAMILIES), f"families without expectations: {TINY_FAMILIES}"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_layout_finds_every_part(family: str) -> None:
    model = tiny_model(family, n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48)
    layout = get_layout(model)
    names, mlp_norm, post_norms, offset = EXPECTED_PARTS[family]
    assert layout.n_layers == 3, f"{family}: n_layers {layout.n_layers} != 3"
    assert layout.d_model == 32, f"{family}: d_model {layout.d_model} != 32"
    assert layout.embedding is model.get_input_embeddings(), f"{family}: wrong embedding module"
    assert layout.lm_head is model.get_output_embeddings(), f"{family}: wrong lm_head"
    for layer in range(3):
        block = model.model.layers[layer]
        assert layout.blocks[layer] is block, f"{family}: block {layer} not found"
        assert layout.attn_out(layer) is block.self_attn.o_proj, f"{family}: attn_out({layer}) is not o_proj"
        assert layout.mlp_out(layer) is block.mlp.down_proj, f"{family}: mlp_out({layer}) is not down_proj"
        assert tuple(layout.attn_out(layer).weight.shape) == (32, 32), f"{family}: o_proj shape"
        assert tuple(layout.mlp_out(layer).weight.shape) == (32, 48), f"{family}: down_proj shape (out x in)"
        assert layout.input_norm(layer) is block.input_layernorm, f"{family}: input_norm({layer})"
        assert layout.post_attention_norm(layer) is block.post_attention_layernorm, (
            f"{family}: post-attn norm"
        )
        assert layout.mlp_input_norm(layer) is getattr(block, mlp_norm), f"{family}: mlp_input_norm({layer})"
        want_attn_writer = block.self_attn if post_norms is None else getattr(block, post_norms[0])
        want_mlp_writer = block.mlp if post_norms is None else getattr(block, post_norms[1])
        assert layout.attn_writer(layer) is want_attn_writer, f"{family}: attn_writer({layer})"
        assert layout.mlp_writer(layer) is want_mlp_writer, f"{family}: mlp_writer({layer})"
        linears = layout.linears(layer)
        assert tuple(linears) == names, f"{family}: linears order {tuple(linears)}"
        assert all(isinstance(m, nn.Linear) for m in linears.values()), f"{family}: non-Linear in linears"
        for name, m in linears.items():
            parent = (
                block.self_attn if name in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj") else block.mlp
            )
            assert getattr(parent, name) is m, (
                f"{family}: linears()[{name!r}] is not {type(parent).__name__}.{name}"
            )
            assert layout.linear_parent(layer, name) is parent, f"{family}: linear_parent({layer}, {name!r})"
    writers = layout.residual_writers()
    assert len(writers) == 6, f"{family}: {len(writers)} residual writers, expected 2 per block"
    assert writers[0] is layout.attn_out(0), f"{family}: first writer is not o_proj of block 0"
    assert writers[1] is layout.mlp_out(0), f"{family}: second writer is not down_proj of block 0"
    assert layout.spec.norm_offset == offset, f"{family}: norm_offset {layout.spec.norm_offset}"
    assert layout.spec.has_post_norms == (post_norms is not None), f"{family}: has_post_norms"
    assert layout.spec.fused_linears == (family == "phi3"), f"{family}: fused_linears"
    tied = family in ("gemma", "gemma2", "gemma3_text")
    assert layout.embeddings_tied == tied, f"{family}: tied={layout.embeddings_tied}"


def test_linear_parent_rejects_a_name_the_family_lacks() -> None:
    with pytest.raises(InvalidArgumentError, match="q_proj"):
        get_layout(tiny_model("phi3")).linear_parent(0, "q_proj")


def test_layout_rejects_layer_out_of_range() -> None:
    layout = get_layout(tiny_model("llama"))
    with pytest.raises(InvalidArgumentError, match="layer"):
        layout.attn_out(2)
    with pytest.raises(InvalidArgumentError, match="layer"):
        layout.mlp_out(True)  # type: ignore[arg-type]


def test_unsupported_architecture_names_it() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2") as info:
        get_layout(model)
    assert "GPT2LMHeadModel" in str(info.value), f"error should name the class: {info.value}"


def test_module_without_config_is_unsupported() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="None"):
        get_layout(nn.Linear(2, 2))


@pytest.mark.parametrize("system", [None, "You are a helpful assistant."])
def test_post_instruction_tokens_are_the_template_tail(tok, system: str | None) -> None:  # type: ignore[no-untyped-def]
    ids = post_instruction_tokens(tok, system)
    assert tok.convert_ids_to_tokens(ids) == ["<|end|>", "<|assistant|>"], f"tail tokens {ids}"
    for text in [*tiny_prompts(5, "harmful"), "x", "Hello?"]:
        prompt = tok(format_prompt(tok, text, system), add_special_tokens=False)["input_ids"]
        assert prompt[-len(ids) :] == ids, f"prompt {text!r} (system={system!r}) ends in {prompt[-3:]}"
        assert prompt[0] == tok.bos_token_id, f"prompt {text!r} does not start with BOS"


def test_format_prompt_places_system_and_instruction(tok) -> None:  # type: ignore[no-untyped-def]
    text = format_prompt(tok, "Tell me a story.", system="Be brief.")
    assert text == "<|bos|><|system|>Be brief.<|end|><|user|>Tell me a story.<|end|><|assistant|>", text
    assert "<|system|>" not in format_prompt(tok, "Tell me a story."), "system turn without a system message"


def test_format_prompt_bad_input(tok) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgumentError, match="instruction"):
        format_prompt(tok, 42)  # type: ignore[arg-type]
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(InvalidArgumentError, match="chat_template"):
        format_prompt(bare, "hi")


def test_tokenizer_is_fresh_and_consistent(tok) -> None:  # type: ignore[no-untyped-def]
    other = tiny_tokenizer()
    other.padding_side = "right"
    assert tok.padding_side == "left", "a tokenizer change leaked into another tiny_tokenizer() result"
    text = "Explain how plants turn sunlight into food."
    assert tok(text)["input_ids"] == other(text)["input_ids"], "two tiny tokenizers disagree"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text, f"byte-level round trip failed: {tok.decode(ids)!r}"
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(tok, name) is not None, f"{name} is None"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_is_deterministic_and_keeps_global_rng(family: str, tok) -> None:  # type: ignore[no-untyped-def]
    state = torch.get_rng_state()
    a = tiny_model(family, seed=3)
    assert torch.equal(torch.get_rng_state(), state), f"{family}: tiny_model changed the global RNG state"
    b = tiny_model(family, seed=3)
    c = tiny_model(family, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{family}: same seed, different weights"
    assert not all(torch.equal(sa[k], sc[k]) for k in sa), f"{family}: seeds 3 and 4 give equal weights"
    assert a.config.vocab_size == len(tok), f"{family}: vocab {a.config.vocab_size} != {len(tok)}"
    assert not a.training, f"{family}: model not in eval mode"
    assert a.config._attn_implementation == "eager", f"{family}: attention {a.config._attn_implementation}"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_float64_attention_matches_hf_eager(family: str, tok) -> None:  # type: ignore[no-untyped-def]
    # float64 tiny models swap in an eager attention with a float64 softmax; same maths as HF eager.
    m32 = tiny_model(family, n_kv_heads=2, seed=6)
    m64 = tiny_model(family, n_kv_heads=2, seed=6, dtype=torch.float64)
    assert m32.config._attn_implementation == "eager", f"{family}: float32 should use HF eager attention"
    texts = [format_prompt(tok, t) for t in ("Hi", "Tell me a story about a small dog.")]
    batch = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    with torch.no_grad():
        a = m32(**batch).logits.to(torch.float64)
        b = m64(**batch).logits
    real = mask.bool()  # padded positions are not compared
    err = float((a[real] - b[real]).norm() / b[real].norm())
    assert err < 1e-5, f"{family}: float64 attention vs HF eager float32, relative logit error {err:.2e}"
    assert bool(torch.isfinite(b).all()), f"{family}: float64 model produced NaN with left padding"


def test_tiny_model_dtype_and_bad_arguments() -> None:
    model = tiny_model("qwen2", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters()), "dtype=float64 not applied"
    with pytest.raises(InvalidArgumentError, match="family"):
        tiny_model("gpt2")
    with pytest.raises(InvalidArgumentError, match="n_heads"):
        tiny_model("llama", d_model=30, n_heads=4)
    with pytest.raises(InvalidArgumentError, match="n_kv_heads"):
        tiny_model("llama", n_heads=4, n_kv_heads=3)


def test_model_identity_is_json_and_tells_models_apart() -> None:
    a, b = tiny_model("mistral", seed=0), tiny_model("mistral", seed=1)
    ia, ib = model_identity(a), model_identity(b)
    assert json.loads(json.dumps(ia)) == ia, "identity does not round-trip through JSON"
    assert (ia["model_type"], ia["n_layers"], ia["d_model"]) == ("mistral", 2, 32), f"identity {ia}"
    assert ia != ib, "two different seeds have the same identity"
    assert ia == model_identity(tiny_model("mistral", seed=0)), "identity not reproducible"


def test_tiny_prompts_classes() -> None:
    harmful, harmless = tiny_prompts(20, "harmful", seed=1), tiny_prompts(20, "harmless", seed=1)
    assert (len(harmful), len(harmless)) == (20, 20), "wrong number of prompts"
    assert harmful == tiny_prompts(20, "harmful", seed=1), "tiny_prompts not deterministic"
    assert not set(harmful) & set(harmless), "the two prompt classes overlap"
    with pytest.raises(InvalidArgumentError, match="kind"):
        tiny_prompts(2, "neutral")


# ----------------------------------------------------------------------------
# load_model
# ----------------------------------------------------------------------------


def test_load_model_toy_is_exactly_load_toy_model() -> None:
    from refusal_core.toy import load_toy_model

    model, tok = load_model("toy")
    ref, ref_tok = load_toy_model()
    sd, rsd = model.state_dict(), ref.state_dict()
    assert sd.keys() == rsd.keys(), "load_model('toy') has other parameters than load_toy_model()"
    assert all(torch.equal(sd[k], rsd[k]) for k in sd), (
        "load_model('toy') weights differ from load_toy_model()"
    )
    assert all(p.dtype == torch.float32 for p in model.parameters()), "toy not float32 by default"
    assert model.config._attn_implementation == "eager", "toy not loaded with eager attention"
    assert tok.chat_template == ref_tok.chat_template, "toy chat template changed"
    assert tok.padding_side == "left", "toy tokenizer not left-padded"
    ident = model_identity(model)
    assert (ident["dtype"], ident["device"]) == ("float32", "cpu"), f"identity dtype/device {ident}"


@pytest.mark.parametrize(
    ("dtype", "expected"), [("bfloat16", torch.bfloat16), (torch.float64, torch.float64)]
)
def test_load_model_dtype(dtype: Any, expected: torch.dtype, tmp_path: Path) -> None:
    model, _ = load_model("toy", dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}, f"toy with dtype={dtype!r}"
    assert model_identity(model)["dtype"] == str(expected).removeprefix("torch."), "identity dtype"
    tiny_model("qwen3", seed=1).save_pretrained(tmp_path / "q3")
    tiny_tokenizer().save_pretrained(tmp_path / "q3")
    model, _ = load_model(str(tmp_path / "q3"), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}, f"directory with dtype={dtype!r}"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float8"}, "dtype"),
        ({"dtype": torch.int8}, "dtype"),
        ({"device": "gpu"}, "device"),
        ({"device": "cuda:x"}, "device"),
        ({"chat_template": "no/such/template.jinja"}, "chat_template"),
        ({"chat_template": 3}, "chat_template"),
    ],
)
def test_load_model_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        load_model("toy", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_load_model_cuda_without_cuda_is_a_clear_error(device: str) -> None:
    with pytest.raises(InvalidArgumentError, match="CUDA is not available"):
        load_model("toy", device=device)


def test_load_model_auto_device_without_gpu_is_cpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback of device='auto'")
    model, _ = load_model("toy", device="auto")
    assert model_identity(model)["device"] == "cpu", "device='auto' without a GPU should stay on the CPU"


def _bare_directory(tmp_path: Path) -> Path:
    """A tiny Phi-3 directory whose tokenizer has no chat template."""
    path = tmp_path / "bare"
    tiny_model("phi3", seed=2).save_pretrained(path)
    tok = tiny_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(path)
    return path


def test_load_model_chat_template_from_file_or_string(tmp_path: Path) -> None:
    from refusal_core.testing.tiny import CHAT_TEMPLATE

    path = _bare_directory(tmp_path)
    _, tok = load_model(str(path))
    with pytest.raises(InvalidArgumentError, match="chat_template"):
        format_prompt(tok, "hi")
    (tmp_path / "t.jinja").write_text(CHAT_TEMPLATE)
    for given in (str(tmp_path / "t.jinja"), tmp_path / "t.jinja", CHAT_TEMPLATE):
        _, tok = load_model(str(path), chat_template=given)
        text = format_prompt(tok, "Tell me a story.")
        assert text == "<|bos|><|user|>Tell me a story.<|end|><|assistant|>", (
            f"template from {given!r}: {text!r}"
        )
    (tmp_path / "plain.txt").write_text("no template here")
    with pytest.raises(InvalidArgumentError, match="no Jinja"):
        load_model(str(path), chat_template=str(tmp_path / "plain.txt"))


def _fake_hub_cache(tmp_path: Path, repo: str) -> Path:
    """A Hugging Face hub cache holding ``repo`` (layout: models--org--name/{refs/main, snapshots/REV})."""
    cache = tmp_path / "hub"
    folder = cache / ("models--" + repo.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = folder / "snapshots" / rev
    tiny_model("gemma2", seed=7).save_pretrained(snap)
    tiny_tokenizer().save_pretrained(snap)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(rev)
    return cache


def test_load_model_hub_id_from_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from refusal_core.errors import ModelNotFoundError

    cache = _fake_hub_cache(tmp_path, "someorg/tiny-gemma2")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # so "someorg/..." is not a relative path that exists
    model, _ = load_model("someorg/tiny-gemma2")
    ref = tiny_model("gemma2", seed=7)
    assert model_identity(model)["fingerprint"] == model_identity(ref)["fingerprint"], (
        "wrong weights from cache"
    )
    assert model_identity(model)["name_or_path"] == "someorg/tiny-gemma2", "hub id not recorded as the name"
    with pytest.raises(ModelNotFoundError) as info:
        load_model("someorg/absent-model")
    message = str(info.value)
    assert "someorg/absent-model" in message, f"error should name the id: {message}"
    assert str(cache) in message, f"error should name the cache directory: {message}"
    assert "\n" not in message, f"error should be one line: {message!r}"
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model("no_such_dir_or_id")
    assert issubclass(ModelNotFoundError, InvalidArgumentError), "ModelNotFoundError keeps the old error type"


def test_load_model_rejects_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(InvalidArgumentError, match="gguf"):
        load_model(str(tmp_path / "weights.bin"))


def test_load_model_directory_on_new_families(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    for family in ("qwen3", "gemma2", "gemma3_text", "phi3"):
        ref = tiny_model(family, seed=3)
        ref.save_pretrained(tmp_path / family)
        tok.save_pretrained(tmp_path / family)
        model, loaded_tok = load_model(str(tmp_path / family))
        assert get_layout(model).spec.family == family, f"{family}: loaded as {get_layout(model)}"
        ids = tok([format_prompt(tok, "Tell me a story.")], add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            same = torch.equal(model(**ids).logits, ref(**ids).logits)
        assert same, f"{family}: load_model logits differ from the saved model"
        assert loaded_tok.padding_side == "left", f"{family}: tokenizer not left-padded"


def test_load_model_default_dtype_on_cpu_is_float32(tmp_path: Path) -> None:
    # A checkpoint stored in bfloat16 still loads in float32 on the CPU unless asked otherwise.
    tiny_model("llama", seed=1, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tiny_tokenizer().save_pretrained(tmp_path / "bf16")
    model, _ = load_model(str(tmp_path / "bf16"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}, "dtype=None on CPU should give float32"
