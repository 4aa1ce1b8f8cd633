"""The K-quant methods' type rule (llama.cpp's ``llama_tensor_get_type_impl``, written out by hand
here) and their refusal where llama-cpp-python is not installed. The llama.cpp comparisons run in
``tox -e llamacpp`` (tests/llamacpp)."""

from __future__ import annotations

import importlib.util

import pytest

from refusal_core.compression import check_methods_available, method_config
from refusal_core.compression.kquants import KquantConfig, kquant_tensor_types, use_more_bits
from refusal_core.errors import InvalidArgumentError
from refusal_core.testing.tiny import tiny_model


def test_use_more_bits_picks_llama_cpps_layers() -> None:
    # i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2, in integer arithmetic (llama-quant.cpp)
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(28) if use_more_bits(i, 28)] == [
        0,
        1,
        2,
        5,
        8,
        11,
        14,
        17,
        20,
        23,
        24,
        25,
        26,
        27,
    ]
    assert [i for i in range(2) if use_more_bits(i, 2)] == [1]  # 2/8 = 0, 7*2/8 = 1


def test_q4_k_m_types_per_tensor_on_a_256_wide_model() -> None:
    model = tiny_model("llama", n_layers=8, d_model=256, n_heads=4, seed=0)
    types = kquant_tensor_types(model, "Q4_K_M")
    more = {0, 3, 6, 7}
    for layer in range(8):
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ):
            assert types[f"model.layers.{layer}.{name}"] == "Q4_K"
        want = "Q6_K" if layer in more else "Q4_K"
        assert types[f"model.layers.{layer}.self_attn.v_proj"] == want, layer
        assert types[f"model.layers.{layer}.mlp.down_proj"] == want, layer
    assert set(kquant_tensor_types(model, "Q5_K_M").values()) == {"Q5_K", "Q6_K"}
    assert set(kquant_tensor_types(model, "Q6_K").values()) == {"Q6_K"}


def test_rows_narrower_than_a_super_block_fall_back_as_in_llama_cpp() -> None:
    # width 64: q/k/v/o/gate/up rows of 64 inputs do not split into 256-wide super-blocks;
    # down_proj's rows (d_ff = 256) do; with 2 layers only layer 1 gets more bits
    model = tiny_model("llama", n_layers=2, d_model=64, n_heads=2, d_ff=256, seed=0)
    for ftype, fallback, more in (
        ("Q4_K_M", "Q5_0", "Q6_K"),
        ("Q5_K_M", "Q5_1", "Q6_K"),
        ("Q6_K", "Q8_0", "Q6_K"),
    ):
        types = kquant_tensor_types(model, ftype)
        assert types["model.layers.1.self_attn.q_proj"] == fallback, ftype
        assert types["model.layers.0.self_attn.v_proj"] == fallback, ftype
        assert types["model.layers.1.self_attn.v_proj"] == "Q8_0", ftype  # Q6_K, then its fallback
        assert types["model.layers.1.mlp.down_proj"] == more, ftype
        assert types["model.layers.0.mlp.down_proj"] == ftype.removesuffix("_M"), ftype


def test_unknown_file_type_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="ftype"):
        KquantConfig("Q3_K_S")
    assert method_config("gguf-q6_k") == KquantConfig("Q6_K")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama-cpp-python is installed")
def test_k_quants_are_refused_in_one_line_without_llama_cpp() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        check_methods_available(["gguf-q4_k_m", "gguf-q4_0"])
    text = str(info.value)
    assert "\n" not in text
    assert "llamacpp" in text
    assert "gguf-q4_k_m" in text
    assert "gguf-q4_0" not in text
