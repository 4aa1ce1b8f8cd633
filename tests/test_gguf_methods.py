"""GGUF methods (refusal_core.compression.gguf) against the ``gguf`` package's reference quantizers.

Every quantized weight must equal ``gguf.quants.dequantize(gguf.quants.quantize(W))``
bit for bit, computed here from the original weight; every other tensor must
be untouched; and for Q8_0 and Q4_0 the test also re-derives llama.cpp's
block formulas in numpy (``quantize_row_q8_0_ref`` / ``quantize_row_q4_0_ref``:
a float16 scale per block of 32, round-to-nearest codes) so a change in the
package itself would show.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from refusal_core.compression import CompressionRecord, compress_, method_config  # noqa: E402
from refusal_core.compression.gguf import GGUF_TYPES, GgufConfig, gguf_plan  # noqa: E402
from refusal_core.errors import (  # noqa: E402
    InvalidArgumentError,
    ShapeMismatchError,
    UnsupportedArchitectureError,
    UnsupportedModuleError,
)
from refusal_core.testing.tiny import tiny_model  # noqa: E402

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_block_linear_weight(name: str) -> bool:
    return ".layers." in name and name.endswith(".weight") and name.split(".")[-2] in LINEAR_NAMES


def _reference(w: torch.Tensor, qtype: str) -> torch.Tensor:
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    w32 = w.detach().to(torch.float32).numpy()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w32, kind), kind)).to(w.dtype)


def _q8_0_by_formula(w: np.ndarray) -> np.ndarray:
    # llama.cpp: d = amax/127, codes round(x/d) with the float32 d, stored d as float16.
    blocks = w.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.clip(np.sign(blocks * inv) * np.floor(np.abs(blocks * inv) + 0.5), -128, 127)
    return (q.astype(np.float32) * d.astype(np.float16).astype(np.float32)).reshape(w.shape)


def _q4_0_by_formula(w: np.ndarray) -> np.ndarray:
    # llama.cpp: the signed value of largest magnitude maps to -8: d = max/-8,
    # codes min(15, trunc(x/d + 8.5)).
    blocks = w.astype(np.float32).reshape(-1, 32)
    idx = np.abs(blocks).argmax(axis=1)
    mx = blocks[np.arange(len(blocks)), idx][:, None]
    d = mx / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.minimum(np.float32(15), np.trunc(blocks * inv + np.float32(8.5)))
    return ((q - 8).astype(np.float32) * d.astype(np.float16).astype(np.float32)).reshape(w.shape)


@pytest.mark.parametrize("qtype", GGUF_TYPES)
@pytest.mark.parametrize(
    ("family", "dtype"), [("llama", torch.float32), ("qwen2", torch.float32), ("llama", torch.float64)]
)
def test_gguf_method_equals_gguf_quants_bit_for_bit(qtype: str, family: str, dtype: torch.dtype) -> None:
    model = tiny_model(family, dtype=dtype, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = compress_(model, method_config(f"gguf-{qtype.lower()}"))
    after = dict(model.named_parameters())
    n_quantized = 0
    for name, old in before.items():
        new = after[name].detach()
        if _is_block_linear_weight(name):
            n_quantized += 1
            expected = _reference(old, qtype)
            assert new.dtype == old.dtype, f"gguf-{qtype} on {family}: {name} changed dtype"
            assert torch.equal(new, expected), (
                f"gguf-{qtype} on {family} {dtype}: {name} differs from gguf.quants' dequantized weight "
                f"(max |diff| {float((new - expected).abs().max()):.3g})"
            )
            assert not torch.equal(new, old), f"gguf-{qtype} on {family}: {name} was not quantized at all"
        else:
            assert torch.equal(new, old), (
                f"gguf-{qtype} on {family}: {name} is not a block linear but changed"
            )
    assert n_quantized == 7 * model.config.num_hidden_layers, f"gguf-{qtype}: quantized {n_quantized} weights"
    assert set(record.quantization_error) == {
        n.removesuffix(".weight") for n in before if _is_block_linear_weight(n)
    }
    assert record.method == "gguf", f"gguf-{qtype}: record.method is {record.method!r}"
    assert record.config == GgufConfig(qtype), f"gguf-{qtype}: record.config is {record.config!r}"


@pytest.mark.parametrize(("qtype", "formula"), [("Q8_0", _q8_0_by_formula), ("Q4_0", _q4_0_by_formula)])
def test_gguf_method_matches_llama_cpp_block_formula(qtype: str, formula: object) -> None:
    model = tiny_model("llama", seed=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if _is_block_linear_weight(n)}
    compress_(model, GgufConfig(qtype))
    after = dict(model.named_parameters())
    for name, old in before.items():
        expected = torch.from_numpy(formula(old.numpy()))  # type: ignore[operator]
        assert torch.equal(after[name].detach(), expected), (
            f"GGUF {qtype} of {name}: not llama.cpp's block formula (float16 scale per 32 weights)"
        )


def test_gguf_record_names_what_llama_cpp_keeps_at_higher_precision(tmp_path: object) -> None:
    untied = tiny_model("qwen2", d_model=256, n_heads=4, n_layers=1, d_ff=256)
    plan = gguf_plan(untied, "Q4_0")
    linear_names = {n for n, _ in untied.named_parameters() if _is_block_linear_weight(n)}
    assert set(plan["quantized"]) == linear_names, "GGUF plan: the quantized set must be the block linears"
    kept = plan["kept"]
    assert kept["model.embed_tokens.weight"]["llama.cpp"] == "Q4_0", "untied token_embd gets the file type"
    assert kept["lm_head.weight"]["llama.cpp"] == "Q6_K", "output.weight of a Q4_0 file is Q6_K at width 256"
    assert gguf_plan(untied, "Q8_0")["kept"]["lm_head.weight"]["llama.cpp"] == "Q8_0", "Q8_0 file keeps Q8_0"
    for name, p in untied.named_parameters():
        if p.ndim == 1:
            assert kept[name]["llama.cpp"] == "F32", f"GGUF plan: 1-D tensor {name} must stay F32"
    # Width 32 rows do not split into Q6_K's 256-blocks: llama.cpp falls back to Q8_0 for the head.
    narrow = gguf_plan(tiny_model("llama"), "Q4_1")["kept"]
    assert narrow["lm_head.weight"]["llama.cpp"] == "Q8_0", "GGUF plan: a 32-wide head falls back to Q8_0"
    tied = gguf_plan(tiny_model("gemma", d_model=256, n_layers=1, d_ff=256), "Q5_0")["kept"]
    assert tied["model.embed_tokens.weight"]["llama.cpp"] == "Q6_K", "a tied token_embd follows the head"
    # The record carries the plan and survives its JSON round trip.
    record = compress_(untied, GgufConfig("Q4_0"))
    assert record.details == plan
    path = record.save(tmp_path / "rec")  # type: ignore[operator]
    assert CompressionRecord.load(path.with_suffix("")).details == plan


def test_gguf_refuses_rows_not_multiple_of_32_before_changing_anything() -> None:
    model = tiny_model("llama", d_model=48, n_heads=4, d_ff=64)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        ShapeMismatchError, match=r"blocks of 32 inputs; model\.layers\.0\.self_attn\.q_proj has rows of 48"
    ):
        compress_(model, GgufConfig("Q8_0"))
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), f"refused GGUF Q8_0 still changed {name}"


def test_gguf_refuses_half_precision_weights_and_unknown_types() -> None:
    model = tiny_model("llama", dtype=torch.bfloat16)
    with pytest.raises(UnsupportedModuleError, match="float32 or float64"):
        compress_(model, GgufConfig("Q4_0"))
    with pytest.raises(InvalidArgumentError, match="K-quants"):
        GgufConfig("Q4_K")
    with pytest.raises(InvalidArgumentError, match="unknown compression method 'gguf-q3_k_s'"):
        method_config("gguf-q3_k_s")


def test_gguf_refuses_fused_experts_instead_of_leaving_them_float() -> None:
    from refusal_core.testing.tiny import MOE_FAMILIES

    model = tiny_model(MOE_FAMILIES[0])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedArchitectureError, match="fused 3-D parameters"):
        compress_(model, GgufConfig("Q8_0"))
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), f"refused GGUF Q8_0 on an MoE model changed {name}"
