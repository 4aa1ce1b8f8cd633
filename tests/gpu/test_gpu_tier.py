"""GPU tier (marker ``gpu``, deselected by default; ``tox -e gpu`` or ``scripts/gpu_check.sh``).

Part (a), CUDA on tiny models: bitsandbytes' CUDA LLM.int8 against the
reference simulation (also run on CUDA): logits, direction cosine, one module
on the float16 grid, and the quantized-edit round trip. Seconds on any GPU.
The bounds are the CPU tier's (tests/test_bnb.py) with a little more room,
because the CUDA kernel writes float16 outputs where the CPU path keeps
float32; they are provisional until measured on a GPU, and every test prints
what it measured.

Part (b), the paper's regressions (arXiv 2504.04215) on Llama-2-7B-chat and
Llama-3-8B-Instruct: directions from 128 harmful / 128 harmless prompts,
selection on 32 + 32 validation prompts, Wanda and magnitude at 50%,
LLM.int8 (bitsandbytes) and AWQ 8-bit, AIRD with α 0.02 (attention) / 0.01
(MLP) using the original model's direction at its source layer, ASR of the
plain AdvBench requests (greedy, substring judge). Written against the
building blocks, not the study pipeline. Expected values with tolerance
bands, and where each comes from, are in ``fixtures/gpu_expected.json``.

Environment:

====================================  =================================================
``REFUSAL_CORE_LLAMA2_PATH``          local HF directory of Llama-2-7b-chat-hf
``REFUSAL_CORE_LLAMA3_PATH``          local HF directory of Meta-Llama-3-8B-Instruct
``REFUSAL_CORE_ADVBENCH_PATH``        AdvBench ``harmful_behaviors.csv`` (``goal`` column)
``REFUSAL_CORE_GPU_N_ADVBENCH``       prompts evaluated (default: all)
``REFUSAL_CORE_GPU_MAX_NEW_TOKENS``   tokens generated per prompt (default 64)
``REFUSAL_CORE_GPU_OUT``              directory for the measured values (JSON), optional
====================================  =================================================

Models larger than one GPU are spread over all visible GPUs with
accelerate's ``device_map="auto"``. Everything skips, with the reason, when
CUDA, bitsandbytes or a path is missing.
"""

from __future__ import annotations

import copy
import gc
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from refusal_core.aird import AirdConfig, apply_aird_
from refusal_core.compression import (
    AwqConfig,
    CompressionConfig,
    Int8Config,
    Int8LinearSim,
    MagnitudeConfig,
    WandaConfig,
    compress_,
)
from refusal_core.compression.bnb import BnbInt8Config, BnbNf4Config, bnb_available
from refusal_core.directions import DirectionCandidates, extract_candidates, site_cosines
from refusal_core.evaluation.attacks import VanillaAttack, evaluate_asr
from refusal_core.evaluation.judges import SubstringJudge
from refusal_core.evaluation.scores import refusal_token_ids_for
from refusal_core.model import encode_prompts, get_layout
from refusal_core.prompts import load_prompts
from refusal_core.quantized_edit import apply_aird_quantized_, dequantize_module
from refusal_core.selection import SelectionConfig, select_direction
from refusal_core.testing.tiny import tiny_model, tiny_prompts, tiny_tokenizer

pytestmark = pytest.mark.gpu

EXPECTED_PATH = Path(__file__).resolve().parents[2] / "fixtures" / "gpu_expected.json"


def require_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available (torch.cuda.is_available() is False)")


def require_bnb() -> None:
    if not bnb_available():
        pytest.skip("bitsandbytes is not installed (pip install 'refusal_core[bnb]')")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a64 - b64).norm() / b64.norm())


@pytest.fixture
def exact_fp32_matmul() -> Iterator[None]:
    """TF32 off: the reference's int8 products must stay exact integers in float32."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# ----------------------------------------------------------------------------
# (a) CUDA path on tiny models
# ----------------------------------------------------------------------------

CUDA_LOGIT_REL_TOL = 0.03  # CPU tier: 0.02 (measured <= 0.0081)
CUDA_MODULE_SHARE_TOL = 0.25  # CPU tier: 0.15 (measured 0.072); CUDA adds float16 output rounding
MIN_COSINE = 0.99
MIN_SPLIT_HALF = 0.5
TINY_IDS = torch.randint(8, 600, (4, 16), generator=torch.Generator().manual_seed(0))


def tiny_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TINY_IDS.to("cuda"), use_cache=False).logits.float().cpu()


@pytest.mark.usefixtures("exact_fp32_matmul")
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_cuda_tiny_int8_logits_agree_with_reference(family: str) -> None:
    require_cuda()
    require_bnb()
    base = tiny_model(family, d_model=64).to("cuda")
    ref, real = copy.deepcopy(base), copy.deepcopy(base)
    compress_(ref, Int8Config())
    compress_(real, BnbInt8Config())
    l_float, l_ref, l_real = tiny_logits(base), tiny_logits(ref), tiny_logits(real)
    err, own = rel(l_real, l_ref), rel(l_ref, l_float)
    print(f"CUDA tiny {family}: bnb-int8 vs reference {err:.4g}, reference vs float {own:.4g}")
    assert err <= CUDA_LOGIT_REL_TOL, f"CUDA bnb-int8 vs reference on tiny {family}: logits error {err:.4g}"
    assert err <= own, (
        f"CUDA bnb-int8 on tiny {family} is further from the reference ({err:.4g}) than the reference is "
        f"from the float model ({own:.4g})"
    )


@pytest.mark.usefixtures("exact_fp32_matmul")
def test_cuda_tiny_int8_direction_agrees_with_reference() -> None:
    require_cuda()
    require_bnb()
    from refusal_core.directions import split_half_noise_floor

    tok = tiny_tokenizer()
    harmful, harmless = tiny_prompts(24, "harmful", seed=5), tiny_prompts(24, "harmless", seed=5)
    base = tiny_model("llama", n_layers=3, d_model=64).to("cuda")
    ref, real = copy.deepcopy(base), copy.deepcopy(base)
    compress_(ref, Int8Config())
    compress_(real, BnbInt8Config())
    floor = split_half_noise_floor(ref, tok, harmful, harmless, n_splits=3)
    separated = torch.nan_to_num(floor, nan=0.0) >= MIN_SPLIT_HALF
    assert int(separated.sum()) >= 2, f"precondition: too few separated sites (floor {floor.tolist()})"
    cos = site_cosines(
        extract_candidates(ref, tok, harmful, harmless).directions,
        extract_candidates(real, tok, harmful, harmless).directions,
    )
    print(f"CUDA tiny llama direction cosine per site: {cos.tolist()}")
    assert bool((cos[separated] > MIN_COSINE).all()), (
        f"CUDA bnb-int8 vs reference direction: cosine {cos.tolist()} at separated sites {separated.tolist()}"
    )


@pytest.mark.usefixtures("exact_fp32_matmul")
def test_cuda_module_matches_reference_on_float16_grid() -> None:
    require_cuda()
    require_bnb()
    from refusal_core.compression import _bnb_modules as bm

    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_((torch.randn(48, 64, generator=g) * 0.05).half().float())
        lin.bias.copy_((torch.randn(48, generator=g) * 0.1).half().float())
    lin = lin.to("cuda")
    sim = Int8LinearSim.from_linear(lin, 6.0)
    real = bm.int8_from_weight(lin.weight, lin.bias, 6.0, torch.device("cuda"))
    x = torch.randn(2, 10, 64, generator=g).half().float().to("cuda")
    x[..., 5] = torch.sign(x[..., 5]) * (7 + x[..., 5].abs())  # a whole outlier column
    with torch.no_grad():
        y_ref, y_real, y_float = sim(x), real(x), lin(x)
    share = rel(y_real, y_ref) / rel(y_ref, y_float)
    codes_differ = int((real.weight.data.cpu() != sim.q.cpu()).sum())
    print(f"CUDA module: output share {share:.4f}, weight codes differing {codes_differ} of {sim.q.numel()}")
    assert codes_differ <= sim.q.numel() // 1000 + 1, (
        f"CUDA int8 weight codes differ in {codes_differ} entries"
    )
    assert share <= CUDA_MODULE_SHARE_TOL, (
        f"CUDA Linear8bitLt vs Int8LinearSim: output error is {share:.3f} of the quantization error"
    )


def test_cuda_quantized_aird_round_trip() -> None:
    require_cuda()
    require_bnb()
    import bitsandbytes.functional as bnbf

    model = tiny_model("llama", d_model=64).to("cuda")
    compress_(model, BnbInt8Config())
    layout = get_layout(model)
    w0 = dequantize_module(layout.attn_out(1))
    r = torch.randn(64, generator=torch.Generator().manual_seed(3))
    record = apply_aird_quantized_(model, r, 1, AirdConfig(), requantize=True)
    from refusal_core.functional import aird_update

    expected = bnbf.int8_vectorwise_quant(aird_update(w0, r.to(w0.device), 0.02).half())[0]
    new = layout.attn_out(1)
    assert torch.equal(new.weight.data, expected), "CUDA re-quantized o_proj is not int8 of the edited weight"
    assert new.weight.device.type == "cuda", f"re-quantized module landed on {new.weight.device}"
    assert all(abs(e.update_retained - 1) < 0.05 for e in record.modules.values()), f"record {record}"
    assert bool(torch.isfinite(tiny_logits(model)).all()), (
        "CUDA model after quantized AIRD: non-finite logits"
    )


def test_cuda_tiny_nf4_runs() -> None:
    require_cuda()
    require_bnb()
    base = tiny_model("llama", d_model=64).to("cuda")
    nf4 = copy.deepcopy(base)
    compress_(nf4, BnbNf4Config())
    err = rel(tiny_logits(nf4), tiny_logits(base))
    print(f"CUDA tiny llama nf4: logits relative error {err:.4g} (CPU tier measured 0.117)")
    assert err <= 0.25, f"CUDA nf4 on tiny llama: logits relative error {err:.4g}"


# ----------------------------------------------------------------------------
# (b) Llama-2-7B-chat / Llama-3-8B-Instruct regressions
# ----------------------------------------------------------------------------

MODEL_ENV = {"llama2-7b-chat": "REFUSAL_CORE_LLAMA2_PATH", "llama3-8b-instruct": "REFUSAL_CORE_LLAMA3_PATH"}
ADVBENCH_ENV = "REFUSAL_CORE_ADVBENCH_PATH"

#: The paper's compression settings.
METHODS: dict[str, CompressionConfig] = {
    "wanda": WandaConfig(sparsity=0.5),
    "magnitude": MagnitudeConfig(sparsity=0.5),
    "llm-int8": BnbInt8Config(threshold=6.0),
    "awq-w8": AwqConfig(w_bit=8),
}
N_EXTRACT, N_VAL, N_CALIBRATION = 128, 32, 64


def require_path(env: str) -> Path:
    value = os.environ.get(env)
    if not value:
        pytest.skip(f"{env} is not set (a local path is needed; nothing is downloaded)")
    path = Path(value)
    if not path.exists():
        pytest.skip(f"{env}={value} does not exist")
    return path


def expected() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(EXPECTED_PATH.read_text())
    return data


def check_band(value: float, entry: dict[str, Any], what: str) -> None:
    lo, hi = entry["band"]
    assert lo <= value <= hi, (
        f"{what} = {value:.4g} outside the expected band [{lo}, {hi}] ({entry['source']})"
    )


def load_local(path: Path) -> tuple[nn.Module, Any]:
    """Half precision, spread over the visible GPUs, eval mode, left padding; never downloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float16, device_map="auto", local_files_only=True, attn_implementation="eager"
    )
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok


def free(model: nn.Module) -> None:
    del model
    gc.collect()
    torch.cuda.empty_cache()


def env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else default


def asr(model: nn.Module, tok: Any, prompts: list[str]) -> float:
    attack = VanillaAttack(max_new_tokens=env_int("REFUSAL_CORE_GPU_MAX_NEW_TOKENS", 64) or 64, batch_size=32)
    return evaluate_asr(model, tok, prompts, [attack], SubstringJudge(), progress=False)[attack.name].asr


def write_measured(name: str, values: dict[str, Any]) -> None:
    out = os.environ.get("REFUSAL_CORE_GPU_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    print(f"{name}: {json.dumps(values, sort_keys=True)}")


@dataclass
class BaseAnalysis:
    """What the uncompressed model gives: candidates, the selected source, its raw direction, ASR."""

    name: str
    path: Path
    candidates: DirectionCandidates
    layer: int
    position: int
    direction: torch.Tensor
    asr: float
    advbench: list[str]


@pytest.fixture(scope="module", params=list(MODEL_ENV))
def base_analysis(request: pytest.FixtureRequest) -> BaseAnalysis:
    require_cuda()
    name: str = request.param
    path = require_path(MODEL_ENV[name])
    advbench = load_prompts(require_path(ADVBENCH_ENV))[: env_int("REFUSAL_CORE_GPU_N_ADVBENCH", None)]
    model, tok = load_local(path)
    harmful, harmless = load_prompts("harmful_train")[:N_EXTRACT], load_prompts("harmless_train")[:N_EXTRACT]
    candidates = extract_candidates(model, tok, harmful, harmless, batch_size=32)
    selection = select_direction(
        model,
        tok,
        candidates,
        load_prompts("harmful_val")[:N_VAL],
        load_prompts("harmless_val")[:N_VAL],
        refusal_token_ids_for(tok),
        SelectionConfig(rows_per_forward=128),
    )
    layer, pos_index = selection.source
    position = candidates.positions[pos_index]
    analysis = BaseAnalysis(
        name=name,
        path=path,
        candidates=candidates,
        layer=layer,
        position=position,
        direction=candidates.directions[layer, pos_index].clone(),
        asr=asr(model, tok, advbench),
        advbench=advbench,
    )
    free(model)
    return analysis


def test_llama_base_model(base_analysis: BaseAnalysis) -> None:
    name = base_analysis.name
    bands = expected()["models"][name]["base"]
    write_measured(
        f"{name}-base",
        {"asr": base_analysis.asr, "source": [base_analysis.layer, base_analysis.position]},
    )
    check_band(base_analysis.asr, bands["asr"], f"{name} base ASR")
    check_band(base_analysis.layer, bands["source_layer"], f"{name} selected source layer")


@pytest.mark.parametrize("method", list(METHODS))
def test_llama_compressed_model_and_aird(base_analysis: BaseAnalysis, method: str) -> None:
    name = base_analysis.name
    spec = expected()
    bands = spec["models"][name]["methods"][method]
    model, tok = load_local(base_analysis.path)
    # Calibration as in the study: formatted harmless prompts (no download of C4 here).
    calibration = encode_prompts(tok, load_prompts("harmless_train")[:N_CALIBRATION])
    compress_(model, METHODS[method], calibration, batch_size=8)

    # The compressed model's own candidates, read at the original model's source.
    harmful, harmless = load_prompts("harmful_train")[:N_EXTRACT], load_prompts("harmless_train")[:N_EXTRACT]
    own = extract_candidates(model, tok, harmful, harmless, batch_size=32)
    pos_index = base_analysis.candidates.positions.index(base_analysis.position)
    cosine = float(
        site_cosines(
            base_analysis.candidates.directions[base_analysis.layer, pos_index],
            own.directions[base_analysis.layer, pos_index],
        )
    )
    asr_before = asr(model, tok, base_analysis.advbench)

    # AIRD with the ORIGINAL model's raw direction at its source layer (paper defaults α 0.02 / 0.01).
    r = base_analysis.direction.to(torch.float32)
    if method == "llm-int8":
        apply_aird_quantized_(model, r, base_analysis.layer, AirdConfig(), requantize=False)
    else:
        apply_aird_(model, r, base_analysis.layer, AirdConfig())
    asr_after = asr(model, tok, base_analysis.advbench)
    free(model)

    write_measured(
        f"{name}-{method}", {"cosine_at_base_source": cosine, "asr": asr_before, "asr_aird": asr_after}
    )
    check_band(
        cosine, bands["cosine_at_base_source"], f"{name} {method}: direction cosine at the base source"
    )
    check_band(asr_before, bands["asr"], f"{name} {method}: ASR")
    check_band(asr_after, bands["asr_aird"], f"{name} {method}: ASR after AIRD")
    relations = spec["relations"]
    assert asr_after <= asr_before + relations["aird_max_asr_increase"]["value"], (
        f"{name} {method}: AIRD raised ASR from {asr_before:.3f} to {asr_after:.3f} "
        f"({relations['aird_max_asr_increase']['source']})"
    )
    if method in ("llm-int8", "awq-w8"):
        limit = relations["quantized_max_asr_increase_over_base"]
        assert asr_before <= base_analysis.asr + limit["value"], (
            f"{name} {method}: ASR {asr_before:.3f} vs base {base_analysis.asr:.3f} ({limit['source']})"
        )
