"""AIRD applied to a model: the edit, its record, the sparsity-preserving variant and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from refusal_core.aird import AirdConfig, AirdRecord, apply_aird_, dense_update_retention
from refusal_core.errors import (
    ArtifactError,
    InvalidArgumentError,
    NonFiniteError,
    ShapeMismatchError,
    UnsupportedModuleError,
    ZeroDirectionError,
)
from refusal_core.functional import aird_update, magnitude_mask, orthogonalize_weight
from refusal_core.models import get_layout
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
    with pytest.raises(ArtifactError, match="cannot read"):
        AirdRecord.load(tmp_path / "y.json")
