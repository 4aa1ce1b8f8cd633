"""Architecture layouts, chat formatting, post-instruction positions and the tiny-model factory."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from refusal_core.errors import InvalidArgumentError, UnsupportedArchitectureError
from refusal_core.models import (
    format_prompt,
    get_layout,
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
