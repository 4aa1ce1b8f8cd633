"""Ablation and addition hooks, weight orthogonalization on tiny models of every family."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from refusal_core.errors import (
    InvalidArgumentError,
    NonFiniteError,
    ShapeMismatchError,
    UnsupportedModuleError,
    ZeroDirectionError,
)
from refusal_core.functional import ablate, add_direction
from refusal_core.interventions import ablation_hooks, addition_hooks, orthogonalize_model_
from refusal_core.model import batch_inputs, encode_prompts, get_layout
from refusal_core.testing.tiny import ORTHOGONALIZABLE_FAMILIES, tiny_model, tiny_prompts, tiny_tokenizer

TOK = tiny_tokenizer()
PROMPTS = [*tiny_prompts(3, "harmful", seed=7), "Hi", "Write a poem about the sea and the wind, please."]
BATCH = batch_inputs(encode_prompts(TOK, PROMPTS), TOK.pad_token_id)


def logits(model: nn.Module, batch: dict[str, torch.Tensor] = BATCH) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    return float(torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(b64))


def hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def capture_block_inputs(model: nn.Module, batch: dict[str, torch.Tensor] = BATCH) -> list[torch.Tensor]:
    """The input of every block (all positions), recorded by pre-hooks registered after any others."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in get_layout(model).blocks]
    try:
        logits(model, batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def direction(d: int = 32, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("family", ORTHOGONALIZABLE_FAMILIES)  # post-norm families: tests/test_layouts.py
def test_orthogonalized_model_equals_ablation_hooks(family: str) -> None:
    model = tiny_model(family, dtype=torch.float64, n_kv_heads=2, seed=2)
    r = direction(seed=3)
    base = logits(model)
    with ablation_hooks(model, r):
        hooked = logits(model)
    assert rel_err(hooked, base) > 1e-3, f"{family}: ablation changed the logits by almost nothing"
    orthogonalize_model_(model, r)
    err = rel_err(logits(model), hooked)
    assert err < 1e-10, f"{family}: orthogonalized vs ablation hooks, relative logit error {err:.2e}"


def test_orthogonalized_float32_model_matches_hooks_to_rounding() -> None:
    model = tiny_model("llama", seed=4)
    r = direction(seed=4, dtype=torch.float32)
    with ablation_hooks(model, r):
        hooked = logits(model)
    orthogonalize_model_(model, r)
    err = rel_err(logits(model), hooked)
    assert err < 1e-5, f"float32 orthogonalized vs hooks: relative logit error {err:.2e}"


def test_orthogonalize_unties_lm_head_and_edits_biases() -> None:
    model = tiny_model("gemma", dtype=torch.float64)
    layout = get_layout(model)
    assert layout.embeddings_tied, "precondition: tiny Gemma ties lm_head to the embedding"
    for layer in range(layout.n_layers):  # give the writers biases so their projection is exercised
        for lin in (layout.attn_out(layer), layout.mlp_out(layer)):
            lin.bias = nn.Parameter(
                torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(layer))
            )
    emb_before = layout.embedding.weight.detach().clone()
    r = direction(seed=5)
    with ablation_hooks(model, r):
        hooked = logits(model)
    orthogonalize_model_(model, r)
    assert not layout.embeddings_tied, "lm_head still shares the embedding after orthogonalization"
    assert model.config.tie_word_embeddings is False, "config still says tie_word_embeddings"
    assert torch.equal(layout.lm_head.weight, emb_before), "the unembedding was changed"
    u = r / r.norm()
    with torch.no_grad():
        assert float((layout.embedding.weight @ u).abs().max()) < 1e-12, "embedding rows keep an r̂ component"
        for lin in layout.residual_writers():
            assert float((u @ lin.weight).abs().max()) < 1e-12, "a writer weight keeps an r̂ component"
            assert abs(float(u @ lin.bias)) < 1e-12, "a writer bias keeps an r̂ component"
    err = rel_err(logits(model), hooked)
    assert err < 1e-10, f"with biases: orthogonalized vs hooks, relative logit error {err:.2e}"


def test_ablation_hooks_apply_functional_ablate_at_block_inputs() -> None:
    model = tiny_model("qwen2", dtype=torch.float64)
    r = direction(seed=6)
    u = r / r.norm()
    with ablation_hooks(model, r):
        inputs = capture_block_inputs(model)
    for layer, x in enumerate(inputs):
        ratio = float((x @ u).abs().max() / x.norm(dim=-1).max())
        assert ratio < 1e-14, f"block {layer} input keeps an r̂ component (relative {ratio:.2e})"
    # The first block input is the ablated embedding output, exactly functional.ablate.
    clean = capture_block_inputs(model)
    assert torch.equal(inputs[0], ablate(clean[0], r)), "block-0 input under hooks != functional.ablate"


def test_per_row_directions_equal_separate_runs() -> None:
    model = tiny_model("mistral", dtype=torch.float64)
    n = BATCH["input_ids"].shape[0]
    rs = torch.stack([direction(seed=10 + i) for i in range(n)])
    with ablation_hooks(model, rs):
        batched = logits(model)
    for i in range(n):
        with ablation_hooks(model, rs[i]):
            single = logits(model)[i]
        assert rel_err(batched[i], single) < 1e-12, f"row {i}: per-row ablation differs from its own run"
    with addition_hooks(model, rs, 2.0, layer=1):
        batched = logits(model)
    for i in range(n):
        with addition_hooks(model, rs[i], 2.0, layer=1):
            single = logits(model)[i]
        assert rel_err(batched[i], single) < 1e-12, f"row {i}: per-row addition differs from its own run"
    with pytest.raises(ShapeMismatchError, match="per-row"), ablation_hooks(model, rs[:2]):
        logits(model)
    assert hook_counts(model) == 0, "hooks left after a per-row shape error"


@pytest.mark.parametrize("layer", [0, 1])
def test_addition_shifts_block_input_by_coeff_r(layer: int) -> None:
    model = tiny_model("llama", dtype=torch.float64)
    r = direction(seed=8)
    clean = capture_block_inputs(model)
    with addition_hooks(model, r, -1.5, layer=layer):
        shifted = capture_block_inputs(model)
        out = logits(model)
    assert torch.equal(shifted[layer], add_direction(clean[layer], r, -1.5)), "block input != x + coeff·r"
    for other in range(layer):
        assert torch.equal(shifted[other], clean[other]), f"addition at {layer} changed block {other}'s input"
    assert rel_err(out, logits(model)) > 1e-4, "addition had no visible effect on the logits"


def test_hooks_leave_no_trace_even_through_an_exception() -> None:
    model = tiny_model("gemma")
    before = logits(model)
    r = direction(dtype=torch.float32)

    def run_and_fail() -> None:
        with ablation_hooks(model, r):
            logits(model)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_and_fail()
    assert hook_counts(model) == 0, "ablation hooks survived an exception"
    assert torch.equal(logits(model), before), "logits changed after the ablation context"
    handle = addition_hooks(model, r, 3.0, layer=0)
    assert handle.active, "addition_hooks returned an inactive handle"
    assert hook_counts(model) == 1, f"addition_hooks registered {hook_counts(model)} hooks, expected 1"
    handle.remove()
    handle.remove()  # idempotent
    assert hook_counts(model) == 0, "addition hook left after remove()"
    assert torch.equal(logits(model), before), "logits changed after the addition hook was removed"


def test_generation_under_hooks_matches_orthogonalized_model() -> None:
    # With a KV cache every new token passes the hooks too ("all positions").
    model = tiny_model("llama", dtype=torch.float64, seed=11)
    r = direction(seed=12)
    batch = batch_inputs(encode_prompts(TOK, PROMPTS[:2]), TOK.pad_token_id)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": TOK.pad_token_id}
    with torch.no_grad(), ablation_hooks(model, r):
        hooked = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
        )
    orthogonalize_model_(model, r)
    with torch.no_grad():
        edited = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
        )
    assert torch.equal(hooked, edited), f"greedy generations differ:\n{hooked}\n{edited}"


@pytest.mark.parametrize(
    ("r", "error", "match"),
    [
        (torch.zeros(32), ZeroDirectionError, "norm"),
        (torch.ones(31), ShapeMismatchError, "width"),
        (torch.full((32,), float("nan")), NonFiniteError, "NaN"),
        (torch.ones(32, dtype=torch.long), InvalidArgumentError, "floating"),
        (torch.ones(2, 2, 32), ShapeMismatchError, "shape"),
        (torch.stack([torch.ones(32), torch.zeros(32)]), ZeroDirectionError, "rows"),
    ],
)
def test_bad_direction_raises_before_any_hook(r: torch.Tensor, error: type[Exception], match: str) -> None:
    model = tiny_model("llama")
    with pytest.raises(error, match=match):
        ablation_hooks(model, r)
    with pytest.raises(error, match=match):
        addition_hooks(model, r, 1.0, layer=0)
    assert hook_counts(model) == 0, f"a hook was registered before {error.__name__}"


def test_bad_addition_arguments() -> None:
    model = tiny_model("llama")
    r = direction(dtype=torch.float32)
    with pytest.raises(InvalidArgumentError, match="layer"):
        addition_hooks(model, r, 1.0, layer=2)
    with pytest.raises(NonFiniteError, match="coeff"):
        addition_hooks(model, r, float("inf"), layer=0)
    assert hook_counts(model) == 0, "a hook was registered despite bad arguments"


class OpaqueLinear(nn.Module):
    """Stands in for a quantized linear: not an nn.Linear."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_orthogonalize_rejects_unsupported_module_before_editing() -> None:
    model = tiny_model("llama")
    layout = get_layout(model)
    layout.mlp(1).down_proj = OpaqueLinear(layout.mlp_out(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModuleError, match=r"down_proj\[1\].*OpaqueLinear"):
        orthogonalize_model_(model, direction(dtype=torch.float32))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a weight was edited before the error"


def test_orthogonalize_rejects_nan_weights_before_editing() -> None:
    model = tiny_model("qwen2")
    with torch.no_grad():
        get_layout(model).attn_out(1).weight[0, 0] = float("nan")
    emb = get_layout(model).embedding.weight.detach().clone()
    with pytest.raises(NonFiniteError, match=r"o_proj\[1\]"):
        orthogonalize_model_(model, direction(dtype=torch.float32))
    assert torch.equal(get_layout(model).embedding.weight, emb), "embedding edited before the error"
    with pytest.raises(ShapeMismatchError, match="shape"):
        orthogonalize_model_(model, torch.ones(2, 32))
