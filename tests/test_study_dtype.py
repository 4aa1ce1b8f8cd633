"""A low-precision study: compression runs on float32 weights, the result is cast for evaluation.

The reference is built here from the public pieces: the toy model loaded in
float32, compressed by ``compress_`` with the study's calibration prompts,
then cast; the study's compressed bfloat16 model must equal it exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refusal_core.activations import encode_prompts
from refusal_core.bench import Bench, compress
from refusal_core.compression import compress_, method_config
from refusal_core.compression.quantization import Int8LinearSim, cast_floating_
from refusal_core.errors import InvalidArgumentError
from refusal_core.model import load_model
from refusal_core.prompts import load_prompts
from refusal_core.study import StudyConfig


def _reference(method: str, n_calibration: int, dtype: torch.dtype) -> torch.nn.Module:
    model, tok = load_model("toy", dtype="float32")
    calibration = encode_prompts(tok, load_prompts("harmless_train")[:n_calibration])
    compress_(model, method_config(method), calibration, batch_size=32)
    return cast_floating_(model, dtype)


@pytest.mark.parametrize("method", ["awq-w4", "llm-int8"])
def test_bfloat16_study_compresses_the_float32_base_then_casts(tmp_path: Path, method: str) -> None:
    cfg = StudyConfig(dtype="bfloat16", methods=(method,), n_calibration=8)
    run = Bench(cfg, tmp_path / "run")
    assert next(run.model.parameters()).dtype == torch.bfloat16, "fixture: the study model is not bfloat16"
    compressed = compress(run, method).model
    expected = _reference(method, 8, torch.bfloat16)
    got, want = compressed.state_dict(), expected.state_dict()
    assert set(got) == set(want), f"state dict keys differ: {sorted(set(got) ^ set(want))[:5]}"
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, f"{name}: dtype {got[name].dtype}, expected {tensor.dtype}"
        assert torch.equal(got[name], tensor), (
            f"{method}: {name} differs from compressing the float32 base and casting "
            f"(max |diff| {float((got[name].double() - tensor.double()).abs().max())})"
        )
    # resuming restores the same model from the saved float32 weights
    again = compress(Bench(cfg, tmp_path / "run"), method).model
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, got[name]), f"{method}: resumed {name} differs from the computed one"


def test_cast_floating_keeps_the_int8_simulation_in_its_own_precision() -> None:
    model = _reference("llm-int8", 4, torch.float32)
    sims = [m for m in model.modules() if isinstance(m, Int8LinearSim)]
    assert sims, "fixture: llm-int8 made no simulated layers"
    scales = [m.scale.clone() for m in sims]
    cast_floating_(model, torch.bfloat16)
    for m, s in zip(sims, scales):
        assert m.scale.dtype == torch.float32, f"the int8 row scales were cast to {m.scale.dtype}"
        assert torch.equal(m.scale, s), "the int8 row scales changed"
        assert m.q.dtype == torch.int8, f"q became {m.q.dtype}"
    embed = model.get_input_embeddings().weight
    assert embed.dtype == torch.bfloat16, f"the embedding stayed {embed.dtype}"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16, f"the forward returned {logits.dtype}"
    assert bool(torch.isfinite(logits).all()), "the bfloat16 forward is not finite"


@pytest.mark.bad_input
def test_cast_floating_refuses_a_non_floating_dtype() -> None:
    model, _ = load_model("toy")
    before = model.get_input_embeddings().weight.clone()
    with pytest.raises(InvalidArgumentError, match="floating"):
        cast_floating_(model, torch.int8)
    assert torch.equal(model.get_input_embeddings().weight, before)


def test_a_low_precision_bench_keeps_no_float32_model_between_compressions(
    tmp_path: Path,
) -> None:
    """Each compression gets a fresh float32 base it owns; none is kept (1.5B: 7 GB each)."""
    cfg = StudyConfig(dtype="bfloat16", methods=("magnitude", "wanda"), n_calibration=8)
    run = Bench(cfg, tmp_path / "run")
    first = compress(run, "magnitude").model
    second = compress(run, "wanda").model
    assert first is not second
    held = [v for v in [*vars(run).values(), *run._cached.values()] if isinstance(v, torch.nn.Module)]
    dtypes = {str(next(m.parameters()).dtype) for m in held}
    assert dtypes == {"torch.bfloat16"}, f"the bench holds models in {sorted(dtypes)} between compressions"
    # the base the study evaluates is untouched by either compression
    fresh, _ = load_model("toy", dtype="bfloat16")
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(run.model.state_dict()[name], tensor), f"compression modified the base's {name}"
