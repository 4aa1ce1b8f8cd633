"""The K-quant methods against llama.cpp itself (``tox -e llamacpp``; skipped without llama-cpp-python).

* The ctypes call is right: for the 32-wide types, the bytes of ``ggml_quantize_chunk`` equal the
  ``gguf`` package's independent reference quantizer's, bit for bit.
* The methods equal a whole llama.cpp file: a tiny qwen2 is exported to an F32 GGUF, quantized by
  ``llama_model_quantize`` (llama.cpp's own tensor-type rule and quantizer), and every block linear's
  tensor in that file has the type the method chose and exactly the bytes of the method's
  quantization; the method's weights are those bytes dequantized.
* Storage: every 32-wide sub-block of a Q4_K weight holds at most 16 values, of Q5_K 32; the error
  falls from Q4_K_M to Q6_K.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from refusal_core.compression import compress_, method_config  # noqa: E402
from refusal_core.compression.kquants import (  # noqa: E402
    GGML_TYPE_IDS,
    ggml_dequantized,
    ggml_quantize,
    kquant_tensor_types,
)
from refusal_core.export import export_gguf, gguf_tensor_name  # noqa: E402
from refusal_core.testing.tiny import tiny_model, tiny_tokenizer  # noqa: E402

FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}  # enum llama_ftype (llama.h)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1"])
def test_ggml_bytes_equal_the_gguf_reference_quantizer(qtype: str) -> None:
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)).numpy()
    ours = ggml_quantize(w, qtype)
    ref = gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, qtype))
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref), f"{qtype}: llama.cpp's bytes differ from gguf.quants'"


def _model() -> torch.nn.Module:
    return tiny_model("qwen2", n_layers=8, d_model=256, n_heads=4, d_ff=512, seed=3)


@pytest.mark.parametrize("ftype", list(FTYPES))
def test_method_equals_a_llama_cpp_quantized_file(tmp_path: Path, ftype: str) -> None:
    model = _model()
    src = export_gguf(model, tiny_tokenizer(), tmp_path / "f32.gguf", tensor_type="f32")
    dst = tmp_path / f"{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    assert rc == 0, f"llama_model_quantize returned {rc}"
    tensors = {t.name: t for t in gguf.GGUFReader(dst).tensors}
    compressed = copy.deepcopy(model)
    compress_(compressed, method_config(f"gguf-{ftype.lower()}"))
    types = kquant_tensor_types(model, ftype)
    mods = dict(model.named_modules())
    got = dict(compressed.named_modules())
    checked = 0
    for name, qtype in types.items():
        t = tensors[gguf_tensor_name(f"{name}.weight")]
        assert t.tensor_type.name == qtype, (
            f"{name}: llama.cpp chose {t.tensor_type.name}, the method {qtype}"
        )
        w = mods[name].weight.detach().numpy()
        file_bytes = np.asarray(t.data).reshape(w.shape[0], -1)
        assert np.array_equal(file_bytes, ggml_quantize(w, qtype)), f"{name}: bytes differ from the file's"
        deq = gguf.quants.dequantize(file_bytes, t.tensor_type)
        assert torch.equal(got[name].weight, torch.from_numpy(np.ascontiguousarray(deq))), name
        checked += 1
    assert checked == 8 * 7


def test_k_quant_storage_and_error_order() -> None:
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    errors = {}
    for qtype, levels in (("Q4_K", 16), ("Q5_K", 32), ("Q6_K", 64)):
        d = ggml_dequantized(w, qtype)
        sub = d.reshape(64, -1, 32 if qtype != "Q6_K" else 16)
        most = max(len(torch.unique(s)) for s in sub.reshape(-1, sub.shape[-1]))
        assert most <= levels, f"{qtype}: a sub-block holds {most} values"
        errors[qtype] = float((d - w).norm() / w.norm())
    assert errors["Q4_K"] > errors["Q5_K"] > errors["Q6_K"] > 0, errors
    assert set(GGML_TYPE_IDS) >= {"Q4_K", "Q5_K", "Q6_K"}


def test_repair_of_a_k_quant_model_is_refused_before_anything_changes() -> None:
    """The repair path cannot put an edit back on a K-quant grid: refused up front, in one line,
    the model unchanged (the study records "repair refused" and goes on)."""
    from refusal_core.aird import AirdConfig
    from refusal_core.bench import repair_refusal
    from refusal_core.errors import UnsupportedModuleError
    from refusal_core.repair import repair_

    model = _model()
    compress_(model, method_config("gguf-q4_k_m"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    r = torch.randn(256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UnsupportedModuleError, match=r"llama\.cpp") as info:
        repair_(model, r, 2, AirdConfig(gain_attn=3.0, gain_mlp=3.0), method="gguf-q4_k_m")
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()), "refused but changed"
    assert repair_refusal(model, 2, "gguf-q4_k_m") is not None
