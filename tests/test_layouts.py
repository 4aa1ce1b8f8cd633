"""The layouts added beside Llama/Qwen2/Mistral/Gemma: Qwen3, Gemma 2, Gemma 3 (text) and Phi-3.

What is special about each and checked here (the family-parametrized tests elsewhere run them too):

- Gemma 2/3 normalise attention and MLP outputs (post-norms) before the residual add. Directional
  ablation hooks those norms; weight orthogonalization is refused there, and the test shows why:
  the same edit done by hand does not equal ablation.
- Gemma 2/3 feed the MLP from ``pre_feedforward_layernorm``: AWQ must fold its MLP scales there.
- Phi-3 fuses q/k/v and gate/up: pruning and int8 work per fused matrix, AWQ is refused.
- Gemma 2 soft-caps attention logits; the float64 tiny-model attention must do the same.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from refusal_core.aird import AirdConfig, apply_aird_
from refusal_core.compression import (
    Int8LinearSim,
    compress_,
    method_config,
    prune_magnitude_,
    prune_wanda_,
    quantize_awq_,
    quantize_llm_int8_,
)
from refusal_core.errors import UnsupportedArchitectureError
from refusal_core.functional import magnitude_mask, orthogonalize_embedding, orthogonalize_weight, wanda_mask
from refusal_core.interventions import ablation_hooks, orthogonalize_model_
from refusal_core.model import batch_inputs, encode_prompts, get_layout
from refusal_core.testing.tiny import tiny_model, tiny_prompts, tiny_tokenizer

NEW_FAMILIES = ("qwen3", "gemma2", "gemma3_text", "phi3")
POST_NORM = ("gemma2", "gemma3_text")
TOK = tiny_tokenizer()
PROMPTS = [*tiny_prompts(3, "harmful", seed=2), *tiny_prompts(2, "harmless", seed=2), "Hi"]
BATCH = batch_inputs(encode_prompts(TOK, PROMPTS), TOK.pad_token_id)
CALIBRATION = encode_prompts(TOK, tiny_prompts(4, "harmful", seed=5) + tiny_prompts(4, "harmless", seed=5))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**BATCH).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return float((a64 - b64).norm() / b64.norm())


def direction(d: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    after = model.state_dict()
    return [k for k, v in before.items() if not torch.equal(v, after[k])]


# ----------------------------------------------------------------------------
# post-norm families: ablation, orthogonalization
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_ablation_leaves_no_component_along_r_in_the_residual_stream(family: str) -> None:
    """Under the hooks every block's output (the stream after its two residual adds) has no r̂ part."""
    model = tiny_model(family, dtype=torch.float64, n_kv_heads=2, seed=1)
    r = direction(seed=4)
    u = r / r.norm()
    outputs: list[torch.Tensor] = []
    handles = [
        block.register_forward_hook(
            lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out)
        )
        for block in get_layout(model).blocks
    ]
    try:
        with ablation_hooks(model, r):
            logits(model)
        plain = list(outputs)
        outputs.clear()
        model(**BATCH)  # without hooks the stream does carry r̂
    finally:
        for h in handles:
            h.remove()
    real = BATCH["attention_mask"].bool()
    for layer, (hooked, free) in enumerate(zip(plain, outputs)):
        along = float((hooked[real] @ u).abs().max() / hooked[real].norm(dim=-1).max())
        assert along < 1e-12, f"{family}: block {layer} output keeps a relative r̂ component {along:.2e}"
        free_along = float((free[real] @ u).abs().max() / free[real].norm(dim=-1).max())
        assert free_along > 1e-3, f"{family}: precondition, block {layer} output has no r̂ part even unhooked"


@pytest.mark.parametrize("family", POST_NORM)
def test_orthogonalization_is_refused_for_post_norm_families(family: str) -> None:
    model = tiny_model(family, dtype=torch.float64, seed=2)
    before = state(model)
    with pytest.raises(UnsupportedArchitectureError, match="post-norm"):
        orthogonalize_model_(model, direction(seed=1))
    assert not unchanged(model, before), (
        f"{family}: refused orthogonalization changed {unchanged(model, before)}"
    )
    assert get_layout(model).embeddings_tied, f"{family}: refused orthogonalization untied the lm_head"


@pytest.mark.parametrize("family", POST_NORM)
def test_why_orthogonalization_is_refused_the_edit_does_not_equal_ablation(family: str) -> None:
    """The edit orthogonalize_model_ makes elsewhere, done by hand, misses the hooks by far here."""
    model = tiny_model(family, dtype=torch.float64, n_kv_heads=2, seed=3)
    r = direction(seed=5)
    u = r / r.norm()
    with ablation_hooks(model, r):
        hooked = logits(model)
    layout = get_layout(model)
    with torch.no_grad():
        head = layout.lm_head
        head.weight = nn.Parameter(layout.embedding.weight.detach().clone())  # keep the read-out as it was
        layout.embedding.weight.copy_(orthogonalize_embedding(layout.embedding.weight, u))
        for layer in range(layout.n_layers):
            for lin in (layout.attn_out(layer), layout.mlp_out(layer)):
                lin.weight.copy_(orthogonalize_weight(lin.weight, u))
    err = rel(logits(model), hooked)
    assert err > 1e-3, f"{family}: hand orthogonalization equals the ablation hooks (relative {err:.2e})"


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_orthogonalization_equals_ablation_on_pre_norm_new_families(family: str) -> None:
    model = tiny_model(family, dtype=torch.float64, n_kv_heads=2, seed=2)
    r = direction(seed=3)
    with ablation_hooks(model, r):
        hooked = logits(model)
    assert rel(hooked, logits(model)) > 1e-3, f"{family}: ablation changed almost nothing"
    orthogonalize_model_(model, r)
    err = rel(logits(model), hooked)
    assert err < 1e-10, f"{family}: orthogonalized vs ablation hooks, relative logit error {err:.2e}"


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_aird_edits_the_residual_writers_by_the_formula(family: str) -> None:
    model = tiny_model(family, dtype=torch.float64, seed=4)
    layout = get_layout(model)
    r = direction(seed=6)
    w_o, w_d = layout.attn_out(1).weight.clone(), layout.mlp_out(1).weight.clone()
    apply_aird_(model, r, 1, AirdConfig(alpha_attn=0.3, alpha_mlp=-0.2))
    want_o = w_o + 0.3 * torch.outer(r, r) @ w_o
    want_d = w_d + (-0.2) * torch.outer(r, r) @ w_d
    assert rel(layout.attn_out(1).weight, want_o) < 1e-14, f"{family}: AIRD o_proj is not W + α r rᵀ W"
    assert rel(layout.mlp_out(1).weight, want_d) < 1e-14, f"{family}: AIRD down_proj is not W + α r rᵀ W"


# ----------------------------------------------------------------------------
# compression on the new layouts
# ----------------------------------------------------------------------------


#: Gemma-family RMSNorms compute in float32 whatever the model dtype: a float64 rewrite through them
#: carries float32 rounding (measured ~2e-7); a fold into the wrong norm is off by orders more.
FOLD_TOL = {"gemma2": 1e-6, "gemma3_text": 1e-6}


def with_outlier_channels(
    model: nn.Module, channels: tuple[int, ...] = (3, 17), gain: float = 25.0
) -> nn.Module:
    """A few large residual channels at the attention and MLP inputs, so AWQ picks scales s ≠ 1."""
    layout = get_layout(model)
    offset = layout.spec.norm_offset
    with torch.no_grad():
        for layer in range(layout.n_layers):
            for norm in (layout.input_norm(layer), layout.mlp_input_norm(layer)):
                w = norm.weight
                w[list(channels)] = (w[list(channels)] + offset) * gain - offset
    return model


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "qwen3"])
def test_awq_scaling_is_function_preserving(family: str) -> None:
    """Before rounding AWQ only moves scales between a norm/linear and the next linears.

    With the MLP scales folded into the wrong norm (Gemma 2/3's post_attention_layernorm instead of
    pre_feedforward_layernorm) the function changes.
    """
    model = with_outlier_channels(tiny_model(family, dtype=torch.float64, seed=6))
    layout = get_layout(model)
    mlp_norms = [layout.mlp_input_norm(layer).weight.clone() for layer in range(layout.n_layers)]
    base = logits(model)
    errors = quantize_awq_(model, CALIBRATION, w_bit=4, scale_only=True)
    err = rel(logits(model), base)
    assert err < FOLD_TOL.get(family, 1e-10), (
        f"{family}: AWQ scale_only changed the logits by relative {err:.2e}"
    )
    moved = [not torch.equal(w, layout.mlp_input_norm(i).weight) for i, w in enumerate(mlp_norms)]
    assert all(moved), f"{family}: AWQ folded nothing into the MLP input norms ({moved}); the test is blind"
    assert len(errors) == 14, f"{family}: AWQ reported {len(errors)} modules"


@pytest.mark.parametrize("family", ["gemma2", "qwen3"])
def test_awq_w8_quantizes_every_linear_close_to_the_float_model(family: str) -> None:
    model = tiny_model(family, seed=7)
    base = logits(model)
    record = compress_(model, method_config("awq-w8"), CALIBRATION)
    assert len(record.quantization_error) == 14, f"{family}: {sorted(record.quantization_error)}"
    assert all(0 < e < 0.02 for e in record.quantization_error.values()), (
        f"{family}: {record.quantization_error}"
    )
    assert rel(logits(model), base) < 0.05, f"{family}: awq-w8 logits moved by {rel(logits(model), base):.3g}"


def test_awq_is_refused_for_fused_linears_before_any_change() -> None:
    model = tiny_model("phi3")
    before = state(model)
    with pytest.raises(UnsupportedArchitectureError, match="fused"):
        quantize_awq_(model, CALIBRATION)
    with pytest.raises(UnsupportedArchitectureError, match="fused"):
        compress_(model, method_config("awq-w4"), CALIBRATION)
    assert not unchanged(model, before), f"refused AWQ changed {unchanged(model, before)}"


def test_phi3_int8_replaces_the_fused_linears_in_their_modules() -> None:
    model = tiny_model("phi3", seed=1)
    base = logits(model)
    quantize_llm_int8_(model)
    for block in model.model.layers:
        for parent, name in ((block.self_attn, "qkv_proj"), (block.self_attn, "o_proj"),
                             (block.mlp, "gate_up_proj"), (block.mlp, "down_proj")):  # fmt: skip
            assert isinstance(getattr(parent, name), Int8LinearSim), f"phi3: {name} not simulated int8"
        assert not hasattr(block.mlp, "qkv_proj"), "phi3: qkv_proj was attached to the MLP"
    assert 0 < rel(logits(model), base) < 0.05, "phi3: int8 logits not close to (and not equal to) float"


@pytest.mark.parametrize("family", ["phi3", "gemma2"])
def test_magnitude_pruning_counts_per_matrix(family: str) -> None:
    model = tiny_model(family, seed=2)
    weights = {n: m.weight.clone() for n, m in get_layout(model).linears(0).items()}
    per = prune_magnitude_(model, 0.5)
    assert len(per) == 2 * len(weights), f"{family}: pruned {sorted(per)}"
    for name, w in weights.items():
        got = get_layout(model).linears(0)[name].weight
        zeros = int((got == 0).sum())
        assert zeros == w.numel() // 2, f"{family}: {name} has {zeros} zeros, expected {w.numel() // 2}"
        assert torch.equal(got, w * magnitude_mask(w, 0.5)), f"{family}: {name} mask is not magnitude_mask"


@pytest.mark.parametrize("family", ["phi3", "gemma3_text"])
def test_wanda_on_the_first_block_uses_each_linears_own_input(family: str) -> None:
    """Block 0's masks equal wanda_mask with input norms captured here by hooks on the unpruned model."""
    model = tiny_model(family, seed=3)
    ref = copy.deepcopy(model)
    layout = get_layout(ref)
    sums = {n: torch.zeros(m.weight.shape[1], dtype=torch.float64) for n, m in layout.linears(0).items()}
    seqs = [list(s) for s in CALIBRATION]

    def tap(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:  # type: ignore[type-arg]
            sums[name] += args[0].detach().to(torch.float64).pow(2).sum(dim=(0, 1))

        return hook

    handles = [m.register_forward_hook(tap(n)) for n, m in layout.linears(0).items()]
    with torch.no_grad():
        for ids in seqs:  # one sequence at a time: no padding anywhere
            ref(input_ids=torch.tensor([ids]), use_cache=False)
    for h in handles:
        h.remove()
    per = prune_wanda_(model, seqs, 0.5)
    assert len(per) == 2 * len(sums), f"{family}: Wanda pruned {sorted(per)}"
    for name, m in layout.linears(0).items():
        want = m.weight * wanda_mask(m.weight, sums[name].sqrt(), 0.5)
        got = get_layout(model).linears(0)[name].weight
        assert torch.equal(got, want), f"{family}: block-0 {name} Wanda mask differs from the reference"
    for layer in range(2):
        for name, m in get_layout(model).linears(layer).items():
            per_row = (m.weight == 0).sum(dim=1)
            assert bool((per_row == m.weight.shape[1] // 2).all()), f"{family}: {name}[{layer}] per-row zeros"


# ----------------------------------------------------------------------------
# tiny-model plumbing specific to the new families
# ----------------------------------------------------------------------------


def test_float64_attention_soft_caps_like_gemma2_eager() -> None:
    """With a strong soft-cap the float64 attention must cap exactly as HF's Gemma 2 eager attention."""
    m32 = tiny_model("gemma2", seed=8)
    m64 = tiny_model("gemma2", seed=8, dtype=torch.float64)
    for model in (m32, m64):
        for block in model.model.layers:
            block.self_attn.attn_logit_softcapping = 0.05
    err = rel(logits(m32), logits(m64))
    assert err < 1e-5, f"gemma2 float64 attention vs HF eager with soft-cap 0.05: relative {err:.2e}"


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_families_have_non_trivial_norm_gains(family: str) -> None:
    """Drawn norm gains, so post-norms, q/k norms and AWQ folds are not the identity in these tests."""
    layout = get_layout(tiny_model(family))
    offset = layout.spec.norm_offset
    gain = layout.mlp_input_norm(0).weight.detach() + offset
    assert 0.05 < float(gain.std()) < 0.2, f"{family}: MLP input norm gain std {float(gain.std()):.3g}"
    assert abs(float(gain.mean()) - 1.0) < 0.1, f"{family}: MLP input norm gain mean {float(gain.mean()):.3g}"
