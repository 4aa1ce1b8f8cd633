"""AIRD and weight orthogonalization on quantized models (refusal_core.quantized_edit).

Each quantization scheme (the reference Int8LinearSim, bitsandbytes int8 and
nf4) is checked on both paths: ``requantize=False`` must be exactly the float
edit of the dequantized weight, ``requantize=True`` exactly the scheme's
quantizer applied to that edited weight. The plain ``apply_aird_`` must keep
refusing quantized modules, and every bad input must leave the model as it was.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from refusal_core.aird import AirdConfig, apply_aird_
from refusal_core.compression import CompressionConfig, Int8Config, Int8LinearSim, compress_
from refusal_core.compression.bnb import BnbInt8Config, BnbNf4Config, bnb_available
from refusal_core.errors import (
    InvalidArgumentError,
    ShapeMismatchError,
    UnsupportedModuleError,
    ZeroDirectionError,
)
from refusal_core.functional import aird_update, int8_quantize, orthogonalize_embedding, orthogonalize_weight
from refusal_core.interventions import orthogonalize_model_
from refusal_core.model import get_layout
from refusal_core.quantized_edit import (
    QuantizedEditRecord,
    apply_aird_quantized_,
    dequantize_module,
    orthogonalize_model_quantized_,
    quantization_scheme,
)
from refusal_core.testing.tiny import tiny_model

needs_bnb = pytest.mark.skipif(
    not bnb_available(), reason="bitsandbytes is not installed (pip install 'refusal_core[bnb]')"
)

#: scheme name -> (config, expected quantization_scheme). nf4 uses blocksize 32: the tiny
#: model's narrowest input width is 32 and bitsandbytes' CPU kernel needs whole blocks per row.
SCHEMES: dict[str, CompressionConfig] = {
    "int8-sim": Int8Config(),
    "bnb-int8": BnbInt8Config(),
    "bnb-4bit": BnbNf4Config(blocksize=32),
}
SCHEME_PARAMS = [
    pytest.param("int8-sim", id="int8-sim"),
    pytest.param("bnb-int8", id="bnb-int8", marks=needs_bnb),
    pytest.param("bnb-4bit", id="bnb-4bit", marks=needs_bnb),
]

LAYER = 1
IDS = torch.tensor([[1, 5, 300, 7, 6], [1, 9, 41, 250, 6]])


def quantized_model(scheme: str, seed: int = 0) -> nn.Module:
    model = tiny_model("llama", seed=seed)
    compress_(model, SCHEMES[scheme])
    return model


def direction(width: int = 32, seed: int = 3) -> torch.Tensor:
    """A raw difference-in-means-like direction: ‖r‖² ≈ 2·width, so α‖r‖² is a visible gain."""
    return torch.randn(width, generator=torch.Generator().manual_seed(seed)) * 1.4


def writers(model: nn.Module, layer: int) -> dict[str, nn.Module]:
    layout = get_layout(model)
    return {"o_proj": layout.attn_out(layer), "down_proj": layout.mlp_out(layer)}


def snapshot(model: nn.Module) -> tuple[list[tuple[str, type]], dict[str, torch.Tensor]]:
    """Module types by name and every tensor (parameters and buffers, incl. bitsandbytes' int8 data)."""
    kinds = [(n, type(m)) for n, m in model.named_modules()]
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return kinds, tensors


def assert_unchanged(
    model: nn.Module, before: tuple[list[tuple[str, type]], dict[str, torch.Tensor]]
) -> None:
    kinds, tensors = snapshot(model)
    assert kinds == before[0], "a rejected call replaced modules of the model"
    assert tensors.keys() == before[1].keys(), "a rejected call changed the model's state dict keys"
    changed = [k for k in tensors if not torch.equal(tensors[k], before[1][k])]
    assert not changed, f"a rejected call changed tensors {changed}"


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


# ----------------------------------------------------------------------------
# AIRD, float path: exactly the float edit of the dequantized weights
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEME_PARAMS)
def test_aird_float_path_equals_aird_of_dequantized_weights(scheme: str) -> None:
    model = quantized_model(scheme)
    r = direction()
    config = AirdConfig()
    old = writers(model, LAYER)
    assert {quantization_scheme(m) for m in old.values()} == {scheme}, f"{scheme}: fixture not quantized"
    dequantized = {name: dequantize_module(m) for name, m in old.items()}
    untouched = {n: m for n, m in model.named_modules() if "layers.0." in n}

    record = apply_aird_quantized_(model, r, LAYER, config, requantize=False)

    alphas = {"o_proj": config.alpha_attn, "down_proj": config.alpha_mlp}
    for name, new in writers(model, LAYER).items():
        assert type(new) is nn.Linear, (
            f"{scheme} AIRD float path: {name} is {type(new).__name__}, not nn.Linear"
        )
        expected = aird_update(dequantized[name], r, alphas[name])
        assert new.weight.dtype == torch.float32, f"{scheme} float path: {name} kept {new.weight.dtype}"
        assert torch.equal(new.weight, expected), (
            f"{scheme} AIRD float path: {name} weight differs from aird_update(dequantized W, r, "
            f"{alphas[name]}) by {float((new.weight - expected).abs().max()):.3g}"
        )
    for n, m in model.named_modules():
        if "layers.0." in n and n in untouched:
            assert m is untouched[n], f"{scheme} AIRD on layer {LAYER} replaced {n} of layer 0"
    assert len(record.modules) == 2, f"{scheme}: record lists modules {sorted(record.modules)}"
    assert not record.float_modules, f"{scheme}: record lists float modules {record.float_modules}"
    for name, edit in record.modules.items():
        assert (edit.scheme, edit.requantized) == (scheme, False), f"{scheme}: record of {name} is {edit}"
        assert edit.update_retained == 1.0, f"{scheme} float path at float32 keeps the whole edit: {edit}"
        assert edit.rounding_error == 0.0, f"{scheme} float path at float32 rounds nothing: {edit}"
    assert record.aird is not None, f"{scheme}: the record has no AIRD record"
    assert record.aird.layer == LAYER, f"{scheme}: AIRD record of layer {record.aird.layer}"
    assert bool(torch.isfinite(logits(model)).all()), f"{scheme}: edited model gives non-finite logits"


# ----------------------------------------------------------------------------
# AIRD, requantized path: exactly the scheme's quantizer of the edited weight
# ----------------------------------------------------------------------------


def _expected_requantized(scheme: str, old: nn.Module, edited: torch.Tensor) -> dict[str, torch.Tensor]:
    """The quantized state the scheme's own quantizer gives for the edited float weight."""
    if scheme == "int8-sim":
        q, scale = int8_quantize(edited)
        return {"codes": q, "scale": scale}
    import bitsandbytes.functional as bnbf

    if scheme == "bnb-int8":
        cb, scb, _ = bnbf.int8_vectorwise_quant(edited.to(torch.float16))  # bitsandbytes casts to fp16 first
        return {"codes": cb, "scale": scb}
    state = old.weight.quant_state
    packed, qs = bnbf.quantize_4bit(
        edited.to(state.dtype).contiguous(),
        blocksize=state.blocksize,
        compress_statistics=state.nested,
        quant_type=state.quant_type,
    )
    return {"codes": packed, "dequantized": bnbf.dequantize_4bit(packed, qs)}


def _actual_requantized(scheme: str, new: nn.Module) -> dict[str, torch.Tensor]:
    if scheme == "int8-sim":
        assert isinstance(new, Int8LinearSim)
        return {"codes": new.q, "scale": new.scale}
    if scheme == "bnb-int8":
        return {
            "codes": new.weight.data,
            "scale": new.weight.SCB if new.weight.SCB is not None else new.state.SCB,
        }
    return {"codes": new.weight.data, "dequantized": dequantize_module(new)}


@pytest.mark.parametrize("scheme", SCHEME_PARAMS)
def test_aird_requantized_path_equals_quantizer_of_edited_weight(scheme: str) -> None:
    model = quantized_model(scheme)
    r = direction()
    config = AirdConfig()
    old = writers(model, LAYER)
    old_types = {name: type(m) for name, m in old.items()}
    dequantized = {name: dequantize_module(m) for name, m in old.items()}

    record = apply_aird_quantized_(model, r, LAYER, config, requantize=True)

    alphas = {"o_proj": config.alpha_attn, "down_proj": config.alpha_mlp}
    for name, new in writers(model, LAYER).items():
        assert type(new) is old_types[name], (
            f"{scheme} requantized path: {name} became {type(new).__name__}, "
            f"expected {old_types[name].__name__}"
        )
        assert quantization_scheme(new) == scheme, (
            f"{scheme}: re-quantized {name} is {quantization_scheme(new)}"
        )
        edited = aird_update(dequantized[name].to(torch.float32), r, alphas[name])
        expected = _expected_requantized(scheme, old[name], edited)
        actual = _actual_requantized(scheme, new)
        for key, value in expected.items():
            assert torch.equal(actual[key], value), (
                f"{scheme} requantized path: {name} {key} differs from the quantizer applied to "
                f"aird_update(dequantized W, r, {alphas[name]})"
            )
        if scheme == "int8-sim":
            assert new.threshold == old[name].threshold, f"int8-sim: {name} threshold not kept"
        if scheme == "bnb-int8":
            assert new.state.threshold == old[name].state.threshold, f"bnb-int8: {name} threshold not kept"
            assert not new.training, f"bnb-int8: re-quantized {name} is in training mode"
    for name, edit in record.modules.items():
        assert edit.requantized, f"{scheme}: record of {name} says not re-quantized: {edit}"
        assert edit.scheme == scheme, f"{scheme}: record of {name} names scheme {edit.scheme}"
        assert math.isfinite(edit.update_retained), f"{scheme}: {name} retention {edit.update_retained}"
    assert bool(torch.isfinite(logits(model)).all()), f"{scheme}: re-quantized model gives non-finite logits"


def test_requantized_int8_keeps_most_of_the_aird_edit() -> None:
    """Rounding the edit onto the int8 grid keeps it up to about half a step per entry."""
    model = quantized_model("int8-sim")
    record = apply_aird_quantized_(model, direction(), LAYER, requantize=True)
    for name, edit in record.modules.items():
        assert abs(edit.update_retained - 1.0) < 0.05, (
            f"int8 re-quantization of AIRD's edit of {name}: retained {edit.update_retained:.4f}, "
            f"expected within 0.05 of 1"
        )
        assert 0.0 < edit.rounding_error < 0.02, (
            f"int8 re-quantization of {name}: relative rounding error {edit.rounding_error:.4g} "
            f"outside (0, 0.02)"
        )


# ----------------------------------------------------------------------------
# orthogonalization
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("requantize", [False, True])
@pytest.mark.parametrize("scheme", SCHEME_PARAMS)
def test_orthogonalization_of_quantized_model(scheme: str, requantize: bool) -> None:
    model = quantized_model(scheme)
    r = direction()
    layout = get_layout(model)
    embedding = layout.embedding.weight.detach().clone()
    head = layout.lm_head.weight.detach().clone()
    dequantized = {
        (layer, name): dequantize_module(m)
        for layer in range(layout.n_layers)
        for name, m in writers(model, layer).items()
    }
    old = {(layer, name): m for layer in range(layout.n_layers) for name, m in writers(model, layer).items()}

    record = orthogonalize_model_quantized_(model, r, requantize=requantize)

    label = f"{scheme} orthogonalization (requantize={requantize})"
    assert torch.equal(layout.embedding.weight, orthogonalize_embedding(embedding, r)), (
        f"{label}: embedding is not E(I - r̂r̂ᵀ)"
    )
    assert torch.equal(layout.lm_head.weight, head), f"{label}: lm_head changed"
    for (layer, name), w in dequantized.items():
        new = writers(model, layer)[name]
        edited = orthogonalize_weight(w.to(torch.float32), r)
        if requantize:
            expected = _expected_requantized(scheme, old[layer, name], edited)
            actual = _actual_requantized(scheme, new)
            assert all(torch.equal(actual[k], v) for k, v in expected.items()), (
                f"{label}: {name}[{layer}] is not the quantizer applied to (I - r̂r̂ᵀ)·dequantized W"
            )
        else:
            assert type(new) is nn.Linear, f"{label}: {name}[{layer}] is {type(new).__name__}"
            assert torch.equal(new.weight, edited), f"{label}: {name}[{layer}] is not (I - r̂r̂ᵀ)·dequantized W"
    assert len(record.modules) == 2 * layout.n_layers, f"{label}: record covers {sorted(record.modules)}"
    assert record.operation == "orthogonalization", f"{label}: record operation {record.operation!r}"
    assert record.aird is None, f"{label}: orthogonalization record carries an AIRD record"


def test_float_path_orthogonalization_removes_r_from_every_writer() -> None:
    model = quantized_model("int8-sim")
    r = direction()
    orthogonalize_model_quantized_(model, r, requantize=False)
    u = r / r.norm()
    layout = get_layout(model)
    for layer in range(layout.n_layers):
        for name, m in writers(model, layer).items():
            w = m.weight.detach()
            leak = float((u @ w).norm() / w.norm())
            assert leak < 1e-6, f"float-path orthogonalization: {name}[{layer}] keeps r̂ᵀW/‖W‖ = {leak:.3g}"


# ----------------------------------------------------------------------------
# float targets, refusal of the plain edit, validation
# ----------------------------------------------------------------------------


def test_float_targets_are_edited_like_apply_aird() -> None:
    plain = tiny_model("llama")
    expected = copy.deepcopy(plain)
    r = direction()
    apply_aird_(expected, r, LAYER)
    record = apply_aird_quantized_(plain, r, LAYER, requantize=True)
    for name, m in writers(plain, LAYER).items():
        assert torch.equal(m.weight, writers(expected, LAYER)[name].weight), (
            f"AIRD on a float model through apply_aird_quantized_: {name} differs from apply_aird_"
        )
    assert not record.modules, f"float model: record lists quantized modules {sorted(record.modules)}"
    assert len(record.float_modules) == 2, f"float model: record lists float modules {record.float_modules}"


@pytest.mark.parametrize("scheme", SCHEME_PARAMS)
def test_plain_apply_aird_still_refuses_quantized_modules(scheme: str) -> None:
    model = quantized_model(scheme)
    before = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match="o_proj"):
        apply_aird_(model, direction(), LAYER)
    assert_unchanged(model, before)
    with pytest.raises(UnsupportedModuleError):
        orthogonalize_model_(model, direction())
    assert_unchanged(model, before)


BAD_CALLS: dict[str, tuple[Callable[[nn.Module], object], type[Exception]]] = {
    "r of the wrong width": (
        lambda m: apply_aird_quantized_(m, torch.ones(31), LAYER, requantize=True),
        ShapeMismatchError,
    ),
    "zero r": (
        lambda m: apply_aird_quantized_(m, torch.zeros(32), LAYER, requantize=False),
        ZeroDirectionError,
    ),
    "layer out of range": (
        lambda m: apply_aird_quantized_(m, direction(), 2, requantize=True),
        InvalidArgumentError,
    ),
    "requantize not a bool": (
        lambda m: apply_aird_quantized_(m, direction(), LAYER, requantize=1),  # type: ignore[arg-type]
        InvalidArgumentError,
    ),
    "config not an AirdConfig": (
        lambda m: apply_aird_quantized_(m, direction(), LAYER, {"alpha": 1}, requantize=True),  # type: ignore[arg-type]
        InvalidArgumentError,
    ),
    "dtype not floating": (
        lambda m: apply_aird_quantized_(m, direction(), LAYER, requantize=False, dtype=torch.int8),
        InvalidArgumentError,
    ),
    "orthogonalize, NaN in r": (
        lambda m: orthogonalize_model_quantized_(m, torch.full((32,), math.nan), requantize=True),
        InvalidArgumentError,
    ),
    "orthogonalize, requantize None": (
        lambda m: orthogonalize_model_quantized_(m, direction(), requantize=None),  # type: ignore[arg-type]
        InvalidArgumentError,
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_before_any_change(case: str) -> None:
    call, error = BAD_CALLS[case]
    model = quantized_model("int8-sim")
    before = snapshot(model)
    with pytest.raises(error):
        call(model)
    assert_unchanged(model, before)


class _OddLinear(nn.Module):
    """A quantized-looking module refusal_core does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("codes", torch.zeros(32, 32, dtype=torch.int8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_unknown_module_in_a_later_layer_is_refused_before_any_change() -> None:
    model = quantized_model("int8-sim")
    get_layout(model).mlp(1).down_proj = _OddLinear()
    before = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match="down_proj\\[1\\]"):
        orthogonalize_model_quantized_(model, direction(), requantize=True)
    assert_unchanged(model, before)


def test_record_round_trips_through_json(tmp_path: Path) -> None:
    model = quantized_model("int8-sim")
    record = apply_aird_quantized_(model, direction(), LAYER, AirdConfig(normalize=True), requantize=True)
    loaded = QuantizedEditRecord.load(record.save(tmp_path / "edit.json"))
    assert loaded == record, f"QuantizedEditRecord changed through save/load: {loaded} != {record}"
