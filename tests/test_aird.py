"""AIRD applied to a model: the edit, its record, the sparsity-preserving variant and bad input."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from refusal_core.aird import (
    AirdConfig,
    AirdRecord,
    alpha_from_gain,
    apply_aird_,
    dense_update_retention,
    gain_from_alpha,
)
from refusal_core.compression import Int8Config, Int8LinearSim, compress_
from refusal_core.errors import (
    ArtifactError,
    InvalidArgumentError,
    NonFiniteError,
    ShapeMismatchError,
    UnsupportedModuleError,
    ZeroDirectionError,
)
from refusal_core.functional import aird_update, magnitude_mask, orthogonalize_weight
from refusal_core.model import get_layout
from refusal_core.quantized_edit import QuantizedEditRecord, apply_aird_quantized_, dequantize_module
from refusal_core.testing.tiny import tiny_model


def direction(seed: int = 0, d: int = 32) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_default_config_is_the_papers() -> None:
    cfg = AirdConfig()
    assert (cfg.alpha_attn, cfg.alpha_mlp, cfg.normalize, cfg.preserve_sparsity) == (
        0.02,
        0.01,
        False,
        False,
    ), f"AirdConfig defaults {cfg}"


@pytest.mark.parametrize("normalize", [False, True])
def test_apply_aird_equals_functional_update_and_touches_nothing_else(normalize: bool) -> None:
    model = tiny_model("llama", dtype=torch.float64, n_layers=3)
    layout = get_layout(model)
    r = direction(1) * 0.3
    cfg = AirdConfig(alpha_attn=0.5, alpha_mlp=-0.25, normalize=normalize)
    before = snapshot(model)
    record = apply_aird_(model, r, layer=1, config=cfg)
    after = snapshot(model)
    edited = {"model.layers.1.self_attn.o_proj.weight": 0.5, "model.layers.1.mlp.down_proj.weight": -0.25}
    for key, alpha in edited.items():
        ref = aird_update(before[key], r, alpha, normalize=normalize)
        assert torch.equal(after[key], ref), f"{key}: apply_aird_ != functional.aird_update (α={alpha})"
    untouched = [k for k in before if k not in edited and not torch.equal(before[k], after[k])]
    assert not untouched, f"AIRD changed other parameters: {untouched}"
    scale = 1.0 if normalize else float(r.norm()) ** 2
    for name, alpha in (("o_proj", 0.5), ("down_proj", -0.25)):
        rec = record.modules[name]
        assert math.isclose(rec.gain, 1 + alpha * scale, rel_tol=1e-12), f"{name}: gain {rec.gain}"
        key = next(k for k in edited if name in k)
        ref_norm = float(torch.linalg.matrix_norm(after[key] - before[key]))
        assert math.isclose(rec.update_norm, ref_norm, rel_tol=1e-12), (
            f"{name}: update_norm {rec.update_norm}"
        )
        assert rec.retention is None, f"{name}: dense AIRD should not report retention"
    assert (record.layer, record.config) == (1, cfg), "record does not say what was applied"
    assert math.isclose(record.direction_norm, float(r.norm()), rel_tol=1e-12), "direction_norm"
    u = r / r.norm()
    # Gain along r̂: r̂ᵀ W' = (1 + α‖r‖²) r̂ᵀ W.
    w0, w1 = before["model.layers.1.self_attn.o_proj.weight"], layout.attn_out(1).weight.detach()
    err = float((u @ w1 - (1 + 0.5 * scale) * (u @ w0)).norm() / (u @ w0).norm())
    assert err < 1e-12, f"gain along r̂ not 1 + α‖r‖² (relative error {err:.2e})"


def test_alpha_at_minus_inverse_norm_squared_is_orthogonalization() -> None:
    model = tiny_model("qwen2", dtype=torch.float64)
    layout = get_layout(model)
    r = direction(2) * 2.0
    a = -1.0 / float(r.norm()) ** 2
    w_attn, w_mlp = layout.attn_out(0).weight.detach().clone(), layout.mlp_out(0).weight.detach().clone()
    apply_aird_(model, r, 0, AirdConfig(alpha_attn=a, alpha_mlp=a))
    for name, w0, w1 in (
        ("o_proj", w_attn, layout.attn_out(0).weight),
        ("down_proj", w_mlp, layout.mlp_out(0).weight),
    ):
        ref = orthogonalize_weight(w0, r)
        err = float((w1.detach() - ref).norm() / ref.norm())
        assert err < 1e-12, f"{name}: α‖r‖² = −1 should orthogonalize (relative error {err:.2e})"


def test_sparsity_preserving_keeps_zero_pattern_and_reports_retention(tmp_path: Path) -> None:
    model = tiny_model("mistral", dtype=torch.float64)
    layout = get_layout(model)
    with torch.no_grad():
        for lin in (layout.attn_out(1), layout.mlp_out(1)):
            lin.weight.mul_(magnitude_mask(lin.weight, 0.5))
    zero_before = {
        n: (m.weight == 0).clone()
        for n, m in (("o_proj", layout.attn_out(1)), ("down_proj", layout.mlp_out(1)))
    }
    r = direction(3)
    record = apply_aird_(model, r, 1, AirdConfig(alpha_attn=0.05, alpha_mlp=0.05, preserve_sparsity=True))
    for name, module in (("o_proj", layout.attn_out(1)), ("down_proj", layout.mlp_out(1))):
        assert torch.equal(module.weight == 0, zero_before[name]), f"{name}: zero pattern changed"
        rec = record.modules[name]
        assert rec.sparsity_before == rec.sparsity_after == 0.5, f"{name}: sparsity {rec.sparsity_before}"
        ret = rec.retention
        assert ret is not None, f"{name}: retention missing with preserve_sparsity"
        assert 0.0 < ret.frobenius_ratio < 1.0, f"{name}: masked update should be smaller: {ret}"
        assert 0.0 < ret.gain_retention < 1.0, f"{name}: the masked update keeps part of the gain: {ret}"
        assert 0.0 < ret.effect_cosine <= 1.0, f"{name}: effect cosine out of (0, 1]: {ret}"
        assert 0.0 < ret.off_direction_fraction < 1.0, f"{name}: a masked update leaks off r: {ret}"
    record.save(tmp_path / "aird.json")
    back = AirdRecord.load(tmp_path / "aird.json")
    assert back == record, f"AirdRecord changed in the JSON round trip:\n{back}\n{record}"


def test_retention_of_a_dense_matrix_is_complete() -> None:
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ret = dense_update_retention(w, direction(5, 16), 0.1)
    for name in ("frobenius_ratio", "gain_retention", "effect_cosine"):
        assert math.isclose(getattr(ret, name), 1.0, rel_tol=1e-12), (
            f"{name} = {getattr(ret, name)} for dense w"
        )
    assert ret.off_direction_fraction < 1e-12, f"dense update leaks off r: {ret.off_direction_fraction}"
    assert math.isnan(dense_update_retention(w, direction(5, 16), 0.0).frobenius_ratio), "α = 0 should be NaN"


class OpaqueLinear(nn.Module):
    """Stands in for refusal_core.compression's quantized linear: not an nn.Linear."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class Int8Linear(nn.Linear):
    """An nn.Linear subclass holding int8 weights (like bitsandbytes' Linear8bitLt)."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__(inner.in_features, inner.out_features, bias=False)
        self.weight = nn.Parameter(torch.zeros_like(inner.weight, dtype=torch.int8), requires_grad=False)


@pytest.mark.parametrize("wrapper", [OpaqueLinear, Int8Linear])
def test_unsupported_module_raises_before_editing(wrapper: type[nn.Module]) -> None:
    model = tiny_model("llama")
    layout = get_layout(model)
    layout.mlp(0).down_proj = wrapper(layout.mlp_out(0))
    before = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match=rf"down_proj\[0\].*{wrapper.__name__}"):
        apply_aird_(model, direction(6).float(), 0)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "o_proj was edited before the error"


def test_bad_input() -> None:
    model = tiny_model("gemma")
    before = snapshot(model)
    with pytest.raises(InvalidArgumentError, match="layer"):
        apply_aird_(model, direction(), 2)
    with pytest.raises(ZeroDirectionError, match="norm"):
        apply_aird_(model, torch.zeros(32), 0)
    with pytest.raises(ShapeMismatchError, match="width"):
        apply_aird_(model, torch.ones(16), 0)
    with pytest.raises(NonFiniteError, match="NaN"):
        apply_aird_(model, torch.full((32,), float("nan")), 0)
    with pytest.raises(InvalidArgumentError, match="config"):
        apply_aird_(model, direction(), 0, config={"alpha_attn": 1.0})  # type: ignore[arg-type]
    with pytest.raises(NonFiniteError, match="alpha_attn"):
        AirdConfig(alpha_attn=float("nan"))
    with pytest.raises(InvalidArgumentError, match="alpha_mlp"):
        AirdConfig(alpha_mlp=True)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed call edited the model"


def test_load_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"kind": "Something"}')
    with pytest.raises(ArtifactError, match="AirdRecord"):
        AirdRecord.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        AirdRecord.load(tmp_path / "y.json")


# ----------------------------------------------------------------------------
# the two spellings of strength: α and the gain g = 1 + α‖r‖² along r̂
# ----------------------------------------------------------------------------

# (gain, ‖r‖, normalize, α), worked by hand: α = (g − 1) / ‖r‖², or g − 1 when normalized.
HAND_PAIRS = [
    (1.5, 2.0, False, 0.125),  # 0.5 / 4
    (3.0, 0.5, False, 8.0),  # 2 / 0.25
    (0.0, 2.0, False, -0.25),  # orthogonalization: α‖r‖² = −1
    (1.0, 7.0, False, 0.0),  # identity
    (5.0, 4.0, False, 0.25),  # 4 / 16
    (1.5, 2.0, True, 0.5),  # normalized: ‖r‖ does not enter
    (0.0, 0.3, True, -1.0),
]


@pytest.mark.parametrize(("gain", "norm", "normalize", "alpha"), HAND_PAIRS)
def test_alpha_and_gain_convert_exactly_to_hand_values(
    gain: float, norm: float, normalize: bool, alpha: float
) -> None:
    got_alpha = alpha_from_gain(gain, norm, normalize)
    got_gain = gain_from_alpha(alpha, norm, normalize)
    assert got_alpha == alpha, f"alpha_from_gain({gain}, ‖r‖={norm}, normalize={normalize}) = {got_alpha}"
    assert got_gain == gain, f"gain_from_alpha({alpha}, ‖r‖={norm}, normalize={normalize}) = {got_gain}"


@settings(max_examples=300, deadline=None)
@given(
    gain=st.floats(-50.0, 50.0, allow_nan=False),
    norm=st.floats(1e-3, 1e3),
    normalize=st.booleans(),
)
def test_gain_to_alpha_and_back_is_the_gain_to_rounding(gain: float, norm: float, normalize: bool) -> None:
    alpha = alpha_from_gain(gain, norm, normalize)
    back = gain_from_alpha(alpha, norm, normalize)
    # three roundings (g − 1, the division, the product) of numbers no larger than |g − 1|, then + 1
    bound = 4 * math.ulp(max(abs(gain - 1.0), 1.0))
    assert abs(back - gain) <= bound, (
        f"gain_from_alpha(alpha_from_gain({gain!r}, ‖r‖={norm!r}, normalize={normalize})) = {back!r} "
        f"(α = {alpha!r}), off by {abs(back - gain):.3g} > {bound:.3g}"
    )


def test_config_resolves_each_module_in_its_own_spelling() -> None:
    mixed = AirdConfig(gain_attn=1.5, alpha_mlp=0.125)
    assert mixed.alphas(2.0) == (0.125, 0.125), f"alphas(‖r‖=2) of {mixed}: {mixed.alphas(2.0)}"
    assert mixed.gains(2.0) == (1.5, 1.5), f"gains(‖r‖=2) of {mixed}: {mixed.gains(2.0)}"
    gain_only = AirdConfig(gain_attn=0.0)
    # the module without a strength keeps the paper's α: 0.01, gain 1 + 0.01·4 = 1.04
    assert gain_only.alphas(2.0) == (-0.25, 0.01), f"alphas(‖r‖=2) of {gain_only}"
    assert gain_only.gains(2.0)[1] == 1.0 + 0.01 * 4.0, f"gains(‖r‖=2) of {gain_only}"
    normalized = AirdConfig(gain_attn=3.0, gain_mlp=0.5, normalize=True)
    assert normalized.alphas(123.0) == (2.0, -0.5), (
        f"normalized alphas ignore ‖r‖: {normalized.alphas(123.0)}"
    )
    default = AirdConfig()
    assert (default.gain_attn, default.gain_mlp) == (None, None), f"default gains {default}"
    assert default.alphas(5.0) == (0.02, 0.01), f"default alphas must be the paper's: {default.alphas(5.0)}"
    assert AirdConfig(alpha_attn=0.02, alpha_mlp=0.01) == default, "explicit paper α != AirdConfig()"
    # The study rebuilds configs from asdict(); that must work in both spellings.
    for cfg in (default, mixed, gain_only, normalized):
        assert AirdConfig(**asdict(cfg)) == cfg, f"AirdConfig(**asdict(cfg)) != cfg for {cfg}"


def test_default_config_applies_the_papers_alpha_bit_for_bit() -> None:
    model = tiny_model("llama", n_layers=3)
    layout = get_layout(model)
    r = direction(7).float() * 0.4
    w_attn, w_mlp = layout.attn_out(2).weight.detach().clone(), layout.mlp_out(2).weight.detach().clone()
    record = apply_aird_(model, r, 2)
    for name, w0, w1, alpha in (
        ("o_proj", w_attn, layout.attn_out(2).weight, 0.02),
        ("down_proj", w_mlp, layout.mlp_out(2).weight, 0.01),
    ):
        assert torch.equal(w1.detach(), aird_update(w0, r, alpha)), f"AirdConfig() {name}: not α = {alpha}"
        assert record.modules[name].alpha == alpha, f"{name}: recorded α {record.modules[name].alpha}"


def _gain_along(u: torch.Tensor, w_before: torch.Tensor, w_after: torch.Tensor) -> float:
    """‖r̂ᵀW'‖ / ‖r̂ᵀW‖, measured on the weights (independent of the package's helpers)."""
    u = u.to(torch.float64)
    return float((u @ w_after.to(torch.float64)).norm() / (u @ w_before.to(torch.float64)).norm())


@pytest.mark.parametrize("normalize", [False, True])
def test_gain_measured_on_the_edited_weights_is_the_configured_gain(normalize: bool) -> None:
    model = tiny_model("qwen2", dtype=torch.float64, n_layers=3)
    layout = get_layout(model)
    u = direction(8) / direction(8).norm()
    r = 2.0 * u  # ‖r‖ = 2 (up to rounding of the division)
    r_norm_sq = float(r.norm()) ** 2
    gains = {"o_proj": 2.5, "down_proj": 0.4}
    before = {
        "o_proj": layout.attn_out(1).weight.detach().clone(),
        "down_proj": layout.mlp_out(1).weight.detach().clone(),
    }
    cfg = AirdConfig(gain_attn=gains["o_proj"], gain_mlp=gains["down_proj"], normalize=normalize)
    record = apply_aird_(model, r, 1, cfg)
    after = {"o_proj": layout.attn_out(1).weight.detach(), "down_proj": layout.mlp_out(1).weight.detach()}
    for name, g in gains.items():
        assert float((u @ before[name]).norm()) > 1e-3, f"{name}: fixture has r̂ᵀW ≈ 0"
        measured = _gain_along(u, before[name], after[name])
        assert math.isclose(measured, g, rel_tol=1e-12), (
            f"{name}: ‖r̂ᵀW'‖/‖r̂ᵀW‖ = {measured} after AIRD with gain {g} (normalize={normalize})"
        )
        # the part of W orthogonal to r̂ is untouched: (I − r̂r̂ᵀ)W' = (I − r̂r̂ᵀ)W
        p = torch.eye(u.numel(), dtype=torch.float64) - torch.outer(u, u)
        err = float((p @ after[name] - p @ before[name]).norm() / before[name].norm())
        assert err < 1e-13, f"{name}: AIRD with gain {g} changed W off r̂ (relative {err:.2e})"
        rec = record.modules[name]
        assert rec.gain == g, f"{name}: recorded gain {rec.gain}, configured {g} (must be exact)"
        want_alpha = g - 1.0 if normalize else (g - 1.0) / r_norm_sq
        assert math.isclose(rec.alpha, want_alpha, rel_tol=1e-14), (
            f"{name}: recorded α {rec.alpha} != {want_alpha}"
        )


@pytest.mark.parametrize("normalize", [False, True])
def test_gain_zero_is_weight_orthogonalization_of_both_modules(normalize: bool) -> None:
    model = tiny_model("mistral", dtype=torch.float64)
    layout = get_layout(model)
    r = direction(9) * 0.7
    w_attn, w_mlp = layout.attn_out(1).weight.detach().clone(), layout.mlp_out(1).weight.detach().clone()
    apply_aird_(model, r, 1, AirdConfig(gain_attn=0.0, gain_mlp=0.0, normalize=normalize))
    for name, w0, w1 in (
        ("o_proj", w_attn, layout.attn_out(1).weight),
        ("down_proj", w_mlp, layout.mlp_out(1).weight),
    ):
        ref = orthogonalize_weight(w0, r)
        err = float((w1.detach() - ref).norm() / ref.norm())
        assert err < 1e-12, f"{name}: gain 0 (normalize={normalize}) is not orthogonalization ({err:.2e})"


def test_quantized_path_uses_the_resolved_alpha() -> None:
    model = tiny_model("llama", n_layers=3)
    compress_(model, Int8Config())
    layout = get_layout(model)
    r = direction(10).float() * 1.7
    dq = {"o_proj": dequantize_module(layout.attn_out(1)), "down_proj": dequantize_module(layout.mlp_out(1))}
    gains = {"o_proj": 3.0, "down_proj": 0.5}
    record = apply_aird_quantized_(model, r, 1, AirdConfig(gain_attn=3.0, gain_mlp=0.5), requantize=False)
    u = r.double() / r.double().norm()
    after = {"o_proj": layout.attn_out(1).weight.detach(), "down_proj": layout.mlp_out(1).weight.detach()}
    for name, g in gains.items():
        measured = _gain_along(u, dq[name], after[name])
        assert math.isclose(measured, g, rel_tol=1e-5), (
            f"quantized AIRD {name}: gain along r̂ {measured} on the float path, configured {g}"
        )
        assert record.aird is not None, "apply_aird_quantized_ returned no AIRD record"
        assert record.aird.modules[name].gain == g, f"{name}: record gain {record.aird.modules[name].gain}"


def test_record_round_trips_gains_and_loads_version_1(tmp_path: Path) -> None:
    model = tiny_model("llama", dtype=torch.float64)
    cfg = AirdConfig(gain_attn=2.0, alpha_mlp=0.3, normalize=True)
    record = apply_aird_(model, direction(11), 0, cfg)
    record.save(tmp_path / "aird.json")
    doc = json.loads((tmp_path / "aird.json").read_text())
    assert doc["config"]["gain_attn"] == 2.0, f"saved config {doc['config']}"
    assert doc["config"]["alpha_attn"] is None, f"saved config {doc['config']}"
    back = AirdRecord.load(tmp_path / "aird.json")
    assert back == record, f"AirdRecord with gains changed in the JSON round trip:\n{back}\n{record}"
    # a record written before gains existed (version 1, no gain fields) still loads, α-spelled
    old = apply_aird_(tiny_model("llama", dtype=torch.float64), direction(11), 0, AirdConfig(alpha_attn=0.5))
    v1 = old.to_dict()
    v1["version"] = 1
    for key in ("gain_attn", "gain_mlp"):
        del v1["config"][key]
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    assert AirdRecord.load(tmp_path / "v1.json") == old, "a version-1 AirdRecord no longer loads"
    # the quantized record carries the same AIRD record
    qmodel = tiny_model("llama")
    compress_(qmodel, Int8Config())
    qrec = apply_aird_quantized_(qmodel, direction(12).float(), 1, AirdConfig(gain_mlp=1.5), requantize=True)
    qrec.save(tmp_path / "q.json")
    assert QuantizedEditRecord.load(tmp_path / "q.json") == qrec, (
        "QuantizedEditRecord with a gain changed on load"
    )
    both = record.to_dict()
    both["config"]["alpha_attn"] = 0.1  # both spellings for o_proj: not a valid record
    (tmp_path / "both.json").write_text(json.dumps(both))
    with pytest.raises(ArtifactError, match="gain_attn"):
        AirdRecord.load(tmp_path / "both.json")


BAD_CONFIGS = {
    "alpha and gain for attn": ({"alpha_attn": 0.1, "gain_attn": 2.0}, InvalidArgumentError, "not both"),
    "alpha and gain for mlp": ({"alpha_mlp": 0.02, "gain_mlp": 1.5}, InvalidArgumentError, "not both"),
    "NaN gain": ({"gain_attn": float("nan")}, NonFiniteError, "gain_attn"),
    "infinite gain": ({"gain_mlp": float("inf")}, NonFiniteError, "gain_mlp"),
    "NaN alpha": ({"alpha_mlp": float("nan")}, NonFiniteError, "alpha_mlp"),
    "bool gain": ({"gain_attn": True}, InvalidArgumentError, "gain_attn"),
    "str gain": ({"gain_mlp": "1.5"}, InvalidArgumentError, "gain_mlp"),
    "str alpha": ({"alpha_attn": "0.1"}, InvalidArgumentError, "alpha_attn"),
    "tensor gain": ({"gain_attn": torch.tensor([1.5, 2.0])}, InvalidArgumentError, "gain_attn"),
    "normalize not bool": ({"normalize": 1}, InvalidArgumentError, "normalize"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS), ids=list(BAD_CONFIGS))
def test_bad_strength_is_refused_at_construction(case: str) -> None:
    kwargs, error, match = BAD_CONFIGS[case]
    with pytest.raises(error, match=match):
        AirdConfig(**kwargs)


def test_conversions_refuse_what_they_cannot_convert() -> None:
    with pytest.raises(ZeroDirectionError, match="gain"):
        alpha_from_gain(1.5, 0.0)
    with pytest.raises(ZeroDirectionError, match="gain"):
        alpha_from_gain(1.5, 1e-200)  # ‖r‖² underflows to 0
    with pytest.raises(ZeroDirectionError, match="gain"):
        AirdConfig(gain_attn=2.0).alphas(0.0)
    assert alpha_from_gain(1.0, 0.0) == 0.0, "gain 1 on a zero direction is α = 0"
    assert gain_from_alpha(0.3, 0.0) == 1.0, "a zero raw direction's update is zero: gain 1"
    with pytest.raises(ZeroDirectionError, match="unit vector"):
        gain_from_alpha(0.3, 0.0, normalize=True)
    with pytest.raises(NonFiniteError, match="overflows"):
        alpha_from_gain(1e300, 1e-10)
    with pytest.raises(NonFiniteError, match="overflows"):
        gain_from_alpha(1e300, 1e10)
    for bad, error in (
        (-1.0, InvalidArgumentError),
        (float("nan"), NonFiniteError),
        (True, InvalidArgumentError),
        ("2", InvalidArgumentError),
    ):
        with pytest.raises(error, match="direction_norm"):
            alpha_from_gain(1.5, bad)  # type: ignore[arg-type]
        with pytest.raises(error, match="direction_norm"):
            AirdConfig().alphas(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="gain"):
        alpha_from_gain(None, 2.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="normalize"):
        gain_from_alpha(0.1, 2.0, normalize="yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="module"):
        AirdConfig().strength("o_proj", 1.0)


# ----------------------------------------------------------------------------
# an edit that would write non-finite weights is refused before either module changes
# ----------------------------------------------------------------------------

NON_FINITE = {
    "huge alpha_attn": AirdConfig(alpha_attn=1e40),
    "huge alpha_mlp (second module)": AirdConfig(alpha_mlp=1e40),
    "huge gain_mlp (second module)": AirdConfig(gain_mlp=1e45),
}


@pytest.mark.parametrize("case", list(NON_FINITE), ids=list(NON_FINITE))
def test_non_finite_edit_raises_before_any_write(case: str) -> None:
    model = tiny_model("llama")  # float32: α = 1e40 overflows when the edit is cast back
    before = snapshot(model)
    with pytest.raises(NonFiniteError, match=r"non-finite|not finite"):
        apply_aird_(model, direction(13).float(), 1, NON_FINITE[case])
    changed = [k for k, v in snapshot(model).items() if not torch.equal(before[k], v)]
    assert not changed, f"apply_aird_ with {case} raised but had already changed {changed}"


def test_non_finite_quantized_edit_restores_the_quantized_modules() -> None:
    model = tiny_model("llama")
    compress_(model, Int8Config())
    layout = get_layout(model)
    before = snapshot(model)
    with pytest.raises(NonFiniteError, match=r"non-finite|not finite"):
        apply_aird_quantized_(model, direction(14).float(), 1, AirdConfig(alpha_mlp=1e40), requantize=True)
    kinds = (type(layout.attn_out(1)), type(layout.mlp_out(1)))
    assert kinds == (Int8LinearSim, Int8LinearSim), f"quantized modules not restored after the error: {kinds}"
    after = snapshot(model)
    assert before.keys() == after.keys(), "apply_aird_quantized_ with α_mlp = 1e40 left other modules"
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"apply_aird_quantized_ with α_mlp = 1e40 changed {changed} before raising"
