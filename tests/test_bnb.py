"""bitsandbytes backend (refusal_core.compression.bnb) against the reference LLM.int8 simulation.

Where the two can agree exactly they are required to (same int8 codes and
scales for float16-representable weights; same outputs for float16-representable
inputs up to the rare code that sits on a rounding tie), and at model level
they must agree within bounds measured on this machine (bitsandbytes 0.50.2,
torch 2.13 CPU) with margin:

=======================================  ==========  ===========================
quantity (tiny models, float32, seed 0)  measured    bound
=======================================  ==========  ===========================
logits, relative Frobenius, bnb vs ref   ≤ 0.0081    :data:`LOGIT_REL_TOL` 0.02
logits, relative max abs, bnb vs ref     ≤ 0.0111    :data:`LOGIT_MAX_TOL` 0.03
(bnb vs ref) / (ref vs float model)      ≤ 0.81      :data:`LOGIT_RATIO_TOL` 1.0
direction cosine bnb vs ref              ≥ 0.9999    :data:`MIN_COSINE` 0.99
=======================================  ==========  ===========================

Measured over four seeds, widths 32 and 64, all four families. The gap is
not noise in one implementation: bitsandbytes rounds weights and activations
to float16 before quantizing, and int8 activation rounding turns a small input
difference into whole-step code flips that grow through the blocks, so two
correct int8 pipelines differ at model level by a good part of the
quantization error itself. The module-level tests pin the algorithm down.

The toy refusal model (when its weights are present) gets the same checks with
its own measured bounds, re-measured on the committed weights (width 64):
last-position logits bnb vs ref 0.0107 (bound :data:`TOY_LOGIT_REL_TOL` 0.02;
the reference's own error against float is 0.0114 there, and bnb vs ref must
stay below it), max 0.0061 (bound 0.015), direction cosine
≥ 0.99995 at every site with split-half floor ≥ 0.8. It also reports nf4's error.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from refusal_core.compression import (
    CompressionRecord,
    Int8Config,
    Int8LinearSim,
    compress_,
    config_from_dict,
    config_to_dict,
)
from refusal_core.compression import bnb as bnb_backend
from refusal_core.compression.bnb import BnbInt8Config, BnbNf4Config, bnb_available
from refusal_core.directions import extract_candidates, site_cosines, split_half_noise_floor
from refusal_core.errors import ArtifactError, InvalidArgumentError, UnsupportedModuleError
from refusal_core.functional import int8_quantize, llm_int8_linear
from refusal_core.model import get_layout
from refusal_core.testing.tiny import (
    POST_NORM_FAMILIES,
    TINY_FAMILIES,
    tiny_model,
    tiny_prompts,
    tiny_tokenizer,
)

needs_bnb = pytest.mark.skipif(
    not bnb_available(), reason="bitsandbytes is not installed (pip install 'refusal_core[bnb]')"
)

LOGIT_REL_TOL = 0.02
LOGIT_MAX_TOL = 0.03
LOGIT_RATIO_TOL = 1.0
MIN_COSINE = 0.99
#: A site counts as "classes separated" when two half-sample directions agree at least this well.
MIN_SPLIT_HALF = 0.5
#: Module-level: bitsandbytes vs reference output error as a share of the reference's quantization error.
MODULE_SHARE_TOL = 0.15
#: nf4 logits vs the float model (measured ≤ 0.12 on the tiny models): a sanity bound, not a target.
NF4_LOGIT_REL_TOL = 0.25
#: Toy refusal model, bnb vs reference last-position logits: measured 0.0107 (max 0.0061) on the committed
#: width-64 weights (0.0019 on an earlier width-128 draft), where ref vs float is 0.0114.
TOY_LOGIT_REL_TOL = 0.02
TOY_LOGIT_MAX_TOL = 0.015

IDS = torch.randint(8, 600, (4, 16), generator=torch.Generator().manual_seed(0))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return float((a64 - b64).norm() / b64.norm())


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return float((a64 - b64).abs().max() / b64.abs().max())


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def fp16_grid(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to float16 and back: values both implementations see identically."""
    return t.to(torch.float16).to(t.dtype)


# ----------------------------------------------------------------------------
# configs and the optional dependency (no bitsandbytes needed)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.0, -1.0, math.nan, True, "6"])
def test_int8_config_rejects_bad_threshold(threshold: object) -> None:
    with pytest.raises(InvalidArgumentError, match="threshold"):
        BnbInt8Config(threshold)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("blocksize", 48),
        ("blocksize", 0),
        ("compute_dtype", "float8"),
        ("double_quant", 1),
        ("cpu_packing", None),
    ],
)
def test_nf4_config_rejects_bad_fields(field: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        BnbNf4Config(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("config", [BnbInt8Config(math.inf), BnbNf4Config("bfloat16", 128, False, True)])
def test_configs_round_trip_through_record_dicts(config: object) -> None:
    back = config_from_dict(config_to_dict(config))  # type: ignore[arg-type]
    assert back == config, f"config_from_dict(config_to_dict({config!r})) gave {back!r}"


def test_missing_bitsandbytes_raises_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bnb_backend, "bnb_available", lambda: False)
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for config in (BnbInt8Config(), BnbNf4Config()):
        with pytest.raises(InvalidArgumentError, match=r"refusal_core\[bnb\]"):
            compress_(model, config)
    assert all(isinstance(m, nn.Linear) for m in get_layout(model).linears(0).values()), (
        "a bnb method without bitsandbytes replaced modules"
    )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), (
        "a bnb method without bitsandbytes changed weights"
    )


def test_package_imports_without_bitsandbytes() -> None:
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"  # makes `import bitsandbytes` fail
        "import refusal_core.compression as c\n"
        "from refusal_core.compression.bnb import bnb_available\n"
        "from refusal_core import quantized_edit\n"
        "assert not bnb_available(), 'bnb_available() is True with bitsandbytes blocked'\n"
        "assert {m.label for m in c.REGISTRY.values()} >= {'bnb-int8', 'bnb-nf4'}\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"importing refusal_core with bitsandbytes blocked failed:\n{out.stderr}"
    assert "ok" in out.stdout, f"the import check printed {out.stdout!r}, expected 'ok'"


# ----------------------------------------------------------------------------
# one module: bitsandbytes Linear8bitLt vs the reference Int8LinearSim
# ----------------------------------------------------------------------------


def _linear_pair(seed: int = 0) -> tuple[nn.Linear, Int8LinearSim, nn.Module]:
    from refusal_core.compression import _bnb_modules as bm

    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(fp16_grid(torch.randn(48, 64, generator=g) * 0.05))
        lin.bias.copy_(fp16_grid(torch.randn(48, generator=g) * 0.1))
    sim = Int8LinearSim.from_linear(lin, 6.0)
    real = bm.int8_from_weight(lin.weight, lin.bias, 6.0, torch.device("cpu"))
    return lin, sim, real


@needs_bnb
def test_module_weight_codes_and_scales_match_reference() -> None:
    _, sim, real = _linear_pair()
    codes = real.weight.data
    diff = (codes.to(torch.int16) - sim.q.to(torch.int16)).abs()
    what = "bitsandbytes int8 codes vs int8_quantize on float16-representable weights"
    assert int(diff.max()) <= 1, f"{what}: a code differs by {int(diff.max())} steps"
    assert int((diff > 0).sum()) <= codes.numel() // 1000 + 1, (
        f"{what}: {int((diff > 0).sum())} of {codes.numel()} codes differ; only rounding ties may"
    )
    torch.testing.assert_close(
        real.weight.SCB / 127, sim.scale, rtol=1e-6, atol=0, msg="bitsandbytes row scale SCB/127 vs reference"
    )
    torch.testing.assert_close(
        real.dequantize(), sim.dequantize(), rtol=0, atol=float(sim.scale.max()) * 1.0001,
        msg="bitsandbytes dequantize() vs Int8LinearSim.dequantize() (one step at most)",
    )  # fmt: skip


@needs_bnb
@pytest.mark.parametrize("outliers", ["none", "whole columns"])
def test_module_output_matches_reference(outliers: str) -> None:
    lin, sim, real = _linear_pair()
    x = fp16_grid(torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(1)))
    if outliers == "whole columns":
        # Every entry of columns 5 and 40 is an outlier: bitsandbytes and the reference then
        # decompose identically (they differ only on sub-threshold entries of an outlier column).
        x[..., 5] = torch.sign(x[..., 5]) * (7 + x[..., 5].abs())
        x[..., 40] = -9.0
    with torch.no_grad():
        y_ref, y_real, y_float = sim(x), real(x), lin(x)
        y_nosplit = llm_int8_linear(x, lin.weight, math.inf) + lin.bias
    share = rel(y_real, y_ref) / rel(y_ref, y_float)
    assert share <= MODULE_SHARE_TOL, (
        f"Linear8bitLt vs Int8LinearSim ({outliers} outliers): output error {rel(y_real, y_ref):.3g} "
        f"is {share:.3f} of the reference's quantization error {rel(y_ref, y_float):.3g} "
        f"(bound {MODULE_SHARE_TOL})"
    )
    if outliers == "whole columns":
        assert rel(y_real, y_nosplit) > 5 * rel(y_real, y_ref), (
            f"bitsandbytes output is as close to int8 without outlier split ({rel(y_real, y_nosplit):.3g}) "
            f"as to the reference with it ({rel(y_real, y_ref):.3g}): the outlier decomposition did not run"
        )


@needs_bnb
def test_int8_modules_stay_in_eval_mode() -> None:
    model = tiny_model("llama")
    compress_(model, BnbInt8Config())
    x = fp16_grid(torch.randn(3, 32)) * 4
    x[:, 3] = 8.0
    o_proj = get_layout(model).attn_out(0)
    with torch.no_grad():
        y_eval = o_proj(x)
    model.train()
    quantized = [m for m in model.modules() if bnb_backend.is_bnb_int8(m)]
    assert len(quantized) == 14, f"expected 14 bitsandbytes int8 linears, found {len(quantized)}"
    assert not any(m.training for m in quantized), "model.train() put a Linear8bitLt in training mode"
    with torch.no_grad():
        y_train = o_proj(x)
    assert torch.equal(y_train, y_eval), "Linear8bitLt output changed after model.train()"


# ----------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_int8_logits_agree_with_reference(family: str) -> None:
    base = tiny_model(family, d_model=64)
    ref = copy.deepcopy(base)
    compress_(ref, Int8Config())
    real = copy.deepcopy(base)
    record = compress_(real, BnbInt8Config())
    l_float, l_ref, l_real = logits(base), logits(ref), logits(real)
    label = f"bnb-int8 vs reference llm-int8 on tiny {family} (d=64)"
    # Post-norms rescale each block's (quantized) outputs to unit RMS: measured 0.026 / 0.049 there.
    rel_tol, max_tol = (0.035, 0.06) if family in POST_NORM_FAMILIES else (LOGIT_REL_TOL, LOGIT_MAX_TOL)
    assert rel(l_real, l_ref) <= rel_tol, f"{label}: logits relative error {rel(l_real, l_ref):.4g}"
    assert rel_max(l_real, l_ref) <= max_tol, f"{label}: logits max error {rel_max(l_real, l_ref):.4g}"
    ratio = rel(l_real, l_ref) / rel(l_ref, l_float)
    assert ratio <= LOGIT_RATIO_TOL, (
        f"{label}: bnb is further from the reference ({rel(l_real, l_ref):.4g}) than the reference is from "
        f"the float model ({rel(l_ref, l_float):.4g})"
    )
    assert record.method == "bnb-int8", f"{label}: record method {record.method!r}"
    n_linears = 2 * len(get_layout(base).linears(0))  # 7 per block, 4 for Phi-3's fused linears
    assert len(record.quantization_error) == n_linears, (
        f"{label}: errors for {sorted(record.quantization_error)}"
    )
    assert all(0 < e < 0.02 for e in record.quantization_error.values()), (
        f"{label}: per-module int8 rounding errors {record.quantization_error} outside (0, 0.02)"
    )


@needs_bnb
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_tiny_model_int8_direction_agrees_with_reference(family: str) -> None:
    tok = tiny_tokenizer()
    harmful, harmless = tiny_prompts(24, "harmful", seed=5), tiny_prompts(24, "harmless", seed=5)
    base = tiny_model(family, n_layers=3, d_model=64)
    ref = copy.deepcopy(base)
    compress_(ref, Int8Config())
    real = copy.deepcopy(base)
    compress_(real, BnbInt8Config())
    floor = split_half_noise_floor(ref, tok, harmful, harmless, n_splits=3)
    separated = torch.nan_to_num(floor, nan=0.0) >= MIN_SPLIT_HALF
    assert int(separated.sum()) >= 2, (
        f"precondition: tiny {family} separates the prompt classes at too few sites "
        f"(split-half floor {floor.tolist()})"
    )
    cos = site_cosines(
        extract_candidates(ref, tok, harmful, harmless).directions,
        extract_candidates(real, tok, harmful, harmless).directions,
    )
    assert bool((cos[separated] > MIN_COSINE).all()), (
        f"direction of bnb-int8 vs reference llm-int8 on tiny {family}: cosine per site {cos.tolist()} at "
        f"the separated sites {separated.tolist()} (split-half floor {floor.tolist()}), "
        f"expected > {MIN_COSINE}"
    )


@needs_bnb
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_tiny_model_nf4_runs_and_reports_logit_error(
    family: str, record_property: pytest.RecordProperty
) -> None:
    base = tiny_model(family, d_model=64)
    ref8 = copy.deepcopy(base)
    compress_(ref8, Int8Config())
    nf4 = copy.deepcopy(base)
    record = compress_(nf4, BnbNf4Config())
    l_float = logits(base)
    err4, err8 = rel(logits(nf4), l_float), rel(logits(ref8), l_float)
    record_property(f"nf4_logit_rel_error_{family}", err4)
    print(f"nf4 on tiny {family}: logits relative error {err4:.4f} (reference int8: {err8:.4f})")
    assert err8 < err4 <= NF4_LOGIT_REL_TOL, (
        f"nf4 on tiny {family}: logits relative error {err4:.4g}, expected in (int8's {err8:.4g}, "
        f"{NF4_LOGIT_REL_TOL}]"
    )
    assert record.method == "bnb-nf4", f"nf4 record method is {record.method!r}"
    assert all(0.05 < e < 0.15 for e in record.quantization_error.values()), (
        f"nf4 per-module rounding errors {record.quantization_error} outside (0.05, 0.15)"
    )
    assert torch.equal(logits(nf4), logits(nf4)), f"nf4 on tiny {family} is not deterministic"


@needs_bnb
def test_nf4_on_cpu_needs_whole_blocks_per_row() -> None:
    model = tiny_model("llama")  # input widths 32 and 128
    with pytest.raises(InvalidArgumentError, match="blocksize 64 does not divide"):
        compress_(model, BnbNf4Config(blocksize=64))
    assert all(isinstance(m, nn.Linear) for m in get_layout(model).linears(0).values()), (
        "a rejected nf4 blocksize replaced modules"
    )
    compress_(model, BnbNf4Config(blocksize=32))
    assert bool(torch.isfinite(logits(model)).all()), "nf4 with blocksize 32 on tiny llama: non-finite logits"


@needs_bnb
@pytest.mark.parametrize("config", [BnbInt8Config(), BnbNf4Config(blocksize=32)])
def test_compress_refuses_already_quantized_model(config: object) -> None:
    model = tiny_model("llama")
    compress_(model, config)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedModuleError):
        compress_(model, config)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedModuleError):
        compress_(model, Int8Config())


@needs_bnb
def test_record_round_trips(tmp_path: Path) -> None:
    model = tiny_model("llama")
    record = compress_(model, BnbInt8Config(threshold=5.0))
    loaded = CompressionRecord.load(record.save(tmp_path / "bnb"))
    assert loaded.config == BnbInt8Config(threshold=5.0), f"record config after load: {loaded.config!r}"
    assert loaded.method == "bnb-int8", f"loaded record method {loaded.method!r}"
    assert loaded.sparsity == record.sparsity, f"sparsity {record.sparsity} became {loaded.sparsity}"
    dense = int8_quantize(tiny_model("llama").model.layers[0].self_attn.q_proj.weight.detach())[0]
    expected_zeros = float((dense == 0).to(torch.float64).mean())
    measured = record.module_sparsity["model.layers.0.self_attn.q_proj"]
    assert abs(measured - expected_zeros) < 0.01, (
        f"bnb-int8 module sparsity {measured:.4f} (zero codes) vs int8_quantize's {expected_zeros:.4f}"
    )


# ----------------------------------------------------------------------------
# the toy refusal model
# ----------------------------------------------------------------------------


def _toy() -> tuple[nn.Module, object]:
    from refusal_core.toy import load_toy_model

    try:
        return load_toy_model()  # type: ignore[no-any-return]
    except ArtifactError as exc:
        pytest.skip(f"toy refusal model weights not available: {exc}")


@needs_bnb
def test_toy_model_int8_agrees_with_reference() -> None:
    from refusal_core.model import encode_prompts
    from refusal_core.prompts import load_prompts

    base, tok = _toy()
    harmful, harmless = load_prompts("harmful_train")[:32], load_prompts("harmless_train")[:32]
    ref = copy.deepcopy(base)
    compress_(ref, Int8Config())
    real = copy.deepcopy(base)
    compress_(real, BnbInt8Config())

    # Logits at the last position of formatted prompts (what generation and the refusal score read).
    encoded = encode_prompts(tok, harmful[:8] + harmless[:8])
    width = max(len(e) for e in encoded)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = (torch.arange(width) >= torch.tensor([width - len(e) for e in encoded]).unsqueeze(1)).long()

    def last(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]

    l_float, l_ref, l_real = last(base), last(ref), last(real)
    print(
        f"toy model, last-position logits: bnb vs ref {rel(l_real, l_ref):.4f} "
        f"(max {rel_max(l_real, l_ref):.4f}), ref vs float {rel(l_ref, l_float):.4f}"
    )
    assert rel_max(l_real, l_ref) <= TOY_LOGIT_MAX_TOL, (
        f"bnb-int8 vs reference on the toy model: last-position logits max error {rel_max(l_real, l_ref):.4g}"
    )
    assert rel(l_real, l_ref) <= TOY_LOGIT_REL_TOL, (
        f"bnb-int8 vs reference on the toy model: last-position logits relative error "
        f"{rel(l_real, l_ref):.4g}"
    )
    assert rel(l_real, l_ref) <= rel(l_ref, l_float), (
        f"bnb-int8 vs reference ({rel(l_real, l_ref):.4g}) exceeds the reference's own quantization error "
        f"against float ({rel(l_ref, l_float):.4g}) on the toy model"
    )

    floor = split_half_noise_floor(ref, tok, harmful, harmless, n_splits=3)
    separated = torch.nan_to_num(floor, nan=0.0) >= MIN_SPLIT_HALF
    assert int(separated.sum()) >= 1, (
        f"precondition: the toy model separates no site (floor {floor.tolist()})"
    )
    cos = site_cosines(
        extract_candidates(ref, tok, harmful, harmless).directions,
        extract_candidates(real, tok, harmful, harmless).directions,
    )
    assert bool((cos[separated] > MIN_COSINE).all()), (
        f"toy model direction, bnb-int8 vs reference: cosine per site {cos.tolist()} at separated sites "
        f"{separated.tolist()} (floor {floor.tolist()}), expected > {MIN_COSINE}"
    )

    nf4 = copy.deepcopy(base)
    compress_(nf4, BnbNf4Config())
    err4 = rel(last(nf4), l_float)
    print(f"toy model, last-position logits: nf4 vs float {err4:.4f}")
    assert rel(l_ref, l_float) < err4 <= NF4_LOGIT_REL_TOL, (
        f"nf4 on the toy model: last-position logits error {err4:.4g}, expected in "
        f"(int8's {rel(l_ref, l_float):.4g}, {NF4_LOGIT_REL_TOL}]"
    )
