"""GGUF models are converted once into a cached safetensors directory keyed by the file's sha256.

Two levels: a real GGUF, written in the test from a tiny Qwen2 model and its
byte-level BPE tokenizer with the ``gguf`` package and read by transformers'
``gguf_file=`` loader (the very path the real tier takes); and, for the cache
mechanics (atomic write, keys, failures), a stand-in for the one step that reads
the GGUF (``refusal_core.model.loading._read_gguf``), which returns a tiny model chosen by the file's
bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from refusal_core.errors import InvalidArgumentError
from refusal_core.model import gguf_cache_root, gguf_cached_dir, load_model
from refusal_core.model import loading as models
from refusal_core.testing.tiny import tiny_model, tiny_tokenizer


def write_tiny_gguf(path: Path, seed: int = 0, tied: bool = False) -> tuple[Any, Any]:
    """Write a tiny random Qwen2 and the tiny tokenizer as a float32 GGUF; returns (model, tokenizer)."""
    gguf = pytest.importorskip("gguf")
    tok = tiny_tokenizer()
    model = tiny_model("qwen2", seed=seed, tie_word_embeddings=tied)
    cfg = model.config
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = dict(spec["model"]["vocab"])
    vocab.update({a["content"]: a["id"] for a in spec["added_tokens"]})
    by_id = {i: t for t, i in vocab.items()}
    special = {a["id"] for a in spec["added_tokens"]}
    tokens = [by_id.get(i, f"<unused{i}>") for i in range(cfg.vocab_size)]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(cfg.vocab_size)])  # 3 control, 1 normal
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    # llama.cpp tensor names (written from its naming scheme, not copied code).
    top = {
        "model.embed_tokens.weight": "token_embd",
        "model.norm.weight": "output_norm",
        "lm_head.weight": "output",
    }
    block = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, value in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # a tied model's GGUF has no output matrix (as Qwen2.5-0.5B's)
        if name in top:
            gname = f"{top[name]}.weight"
        else:
            _, _, layer, *rest = name.split(".")
            gname = f"blk.{layer}.{block['.'.join(rest[:-1])]}.{rest[-1]}"
        w.add_tensor(gname, np.ascontiguousarray(value.detach().float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_a_real_gguf_is_converted_once_with_bit_identical_weights_and_logits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tied: bool
) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("REFUSAL_CORE_CACHE", str(tmp_path / "cache"))
    gguf_path = tmp_path / "tiny-qwen2.gguf"
    original, tok = write_tiny_gguf(gguf_path, seed=6, tied=tied)
    direct = AutoModelForCausalLM.from_pretrained(
        str(tmp_path),
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        local_files_only=True,
        attn_implementation="eager",  # as load_model loads
    )
    reads: list[Path] = []
    real_reader = models._read_gguf
    monkeypatch.setattr(models, "_read_gguf", lambda p: reads.append(p) or real_reader(p))

    first, tok1 = load_model(str(gguf_path))
    second, _ = load_model(str(gguf_path))
    assert len(reads) == 1, f"two loads of the same GGUF read it {len(reads)} times, expected once"
    for name, value in direct.state_dict().items():
        assert torch.equal(first.state_dict()[name], value), (
            f"cached weight {name} differs from the GGUF load"
        )
        assert torch.equal(second.state_dict()[name], value), (
            f"reloaded weight {name} differs from the GGUF load"
        )
        assert torch.equal(value, original.state_dict()[name]), f"the GGUF round trip changed {name}"
    text = "Tell me a story about the sea."
    lm_head, embed = second.get_output_embeddings().weight, second.get_input_embeddings().weight
    assert (lm_head.data_ptr() == embed.data_ptr()) == tied, f"tied={tied}: lm_head tying not preserved"
    assert tok1(text)["input_ids"] == tok(text)["input_ids"], "the cached tokenizer encodes differently"
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        want = direct(input_ids=ids).logits
        got = second(input_ids=ids).logits
    assert torch.equal(got, want), "logits of the cached model differ from transformers' direct GGUF load"


class FakeReader:
    """Stands in for ``_read_gguf``: a tiny Llama whose seed is the file's fifth byte; counts calls."""

    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(self, path: Path) -> tuple[Any, Any]:
        self.calls.append(path)
        return tiny_model("llama", seed=path.read_bytes()[4]), tiny_tokenizer()  # the byte after b"GGUF"


@pytest.fixture
def reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeReader:
    monkeypatch.setenv("REFUSAL_CORE_CACHE", str(tmp_path / "cache"))
    fake = FakeReader()
    monkeypatch.setattr(models, "_read_gguf", fake)
    return fake


def _gguf(tmp_path: Path, name: str, first: int) -> Path:
    path = tmp_path / name
    path.write_bytes(b"GGUF" + bytes([first]) + b" stand-in")  # the magic bytes load_model checks
    return path


def test_gguf_is_converted_once_and_loads_bit_identical(tmp_path: Path, reader: FakeReader) -> None:
    import hashlib

    gguf = _gguf(tmp_path, "m.gguf", 3)
    model, tok = load_model(str(gguf))
    assert len(reader.calls) == 1, f"first load read the GGUF {len(reader.calls)} times, expected once"
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    cached = tmp_path / "cache" / "gguf" / sha
    assert gguf_cache_root() == tmp_path / "cache" / "gguf", "REFUSAL_CORE_CACHE is not the cache root"
    assert (cached / "model.safetensors").is_file(), f"no safetensors weights in {cached}"
    record = json.loads((cached / "refusal_core_gguf.json").read_text())
    assert record["sha256"] == sha, f"cache record {record} does not name the file's sha256"
    leftovers = [p.name for p in cached.parent.iterdir() if p.name != sha]
    assert not leftovers, f"conversion left temporary entries {leftovers} in the cache"

    reference = tiny_model("llama", seed=3).state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name]), f"cached weight {name} differs from the GGUF's"
    assert model.config._name_or_path == str(gguf.resolve()), "the model's recorded name is not the GGUF"
    text = "Tell me a story about the sea."
    assert tok(text)["input_ids"] == tiny_tokenizer()(text)["input_ids"], (
        "the cached tokenizer encodes differently"
    )

    again, _ = load_model(str(gguf), dtype=torch.bfloat16)
    assert len(reader.calls) == 1, "the second load converted the GGUF again instead of using the cache"
    for name, value in again.state_dict().items():
        assert torch.equal(value, reference[name].to(torch.bfloat16)), f"bf16 weight {name} differs"

    renamed = gguf.rename(tmp_path / "other-name.gguf")
    load_model(str(renamed))
    assert len(reader.calls) == 1, "a renamed but identical file was converted again"

    changed = _gguf(tmp_path, "m.gguf", 4)
    other, _ = load_model(str(changed))
    assert len(reader.calls) == 2, "a GGUF with new content was served from the old file's cache"
    w = other.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w, tiny_model("llama", seed=4).model.layers[0].mlp.down_proj.weight), (
        "the changed file's cache holds the old weights"
    )


def test_failed_conversion_leaves_no_cache_entry(
    tmp_path: Path, reader: FakeReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = _gguf(tmp_path, "m.gguf", 5)

    def broken_save(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(type(tiny_tokenizer()), "save_pretrained", broken_save)
    with pytest.raises(InvalidArgumentError, match="disk full"):
        load_model(str(gguf))
    root = tmp_path / "cache" / "gguf"
    # issue 20: the cache folders this call created are removed again, not only its entry
    assert not (tmp_path / "cache").exists(), (
        f"a failed conversion left {[str(p.relative_to(tmp_path)) for p in (tmp_path / 'cache').rglob('*')]}"
    )
    assert not root.exists(), "a failed conversion left the cache root behind"
    monkeypatch.undo()


def test_gguf_cached_dir_rejects_what_is_not_a_gguf_file(tmp_path: Path, reader: FakeReader) -> None:
    text = tmp_path / "weights.bin"
    text.write_bytes(b"x")
    with pytest.raises(InvalidArgumentError, match="gguf"):
        gguf_cached_dir(text)
    with pytest.raises(InvalidArgumentError, match="gguf"):
        gguf_cached_dir(tmp_path / "missing.gguf")
    assert not reader.calls, "a rejected path reached the GGUF reader"
