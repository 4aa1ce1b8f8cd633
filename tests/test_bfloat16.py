"""bfloat16 models: agreement with float32 on the toy model, and float64 capture whatever the dtype.

Bounds, measured first (toy model, 32 + 32 extraction prompts, torch 2.13 CPU):
the worst cosine between the float32 and bfloat16 difference-in-means
directions over every site of layers 1-3 was 1 - 2.4e-5 (1 - 2.2e-6 at the
selected source, layer 3, position -1); layer 0's directions are exactly zero
in both dtypes (every prompt ends in the same template tokens, so block 0's
input there is the same embedding). Greedy refusal verdicts agreed on 32 of 32
held-out prompts. The test requires cosine >= 0.999 at every such site
(40x the measured gap, and stricter than the 0.99 the issue asks for) and
agreement on at least 30 of 32 prompts (93.75 %, above the asked 90 %).
"""

from __future__ import annotations

import pytest
import torch

from refusal_core.activations import mean_activations
from refusal_core.directions import extract_candidates
from refusal_core.evaluation.generation import generate
from refusal_core.model import format_prompt, get_layout, post_instruction_tokens
from refusal_core.prompts import load_prompts
from refusal_core.toy import is_toy_refusal, load_toy_model

COSINE_BOUND = 0.999
MIN_AGREEING = 30  # of 32


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module, object]:
    m32, tok = load_toy_model()
    m16, _ = load_toy_model(dtype=torch.bfloat16)
    return m32, m16, tok


def test_bf16_directions_agree_with_float32_at_every_site(models: tuple) -> None:  # type: ignore[type-arg]
    m32, m16, tok = models
    harmful, harmless = load_prompts("harmful_train")[:32], load_prompts("harmless_train")[:32]
    d32 = extract_candidates(m32, tok, harmful, harmless).directions
    d16 = extract_candidates(m16, tok, harmful, harmless).directions
    assert d16.dtype == torch.float64, f"bfloat16 model's directions are {d16.dtype}, expected float64"
    assert float(d32[0].abs().max()) == 0.0 == float(d16[0].abs().max()), (
        "layer 0 directions should be exactly zero (same template tokens at every post-instruction position)"
    )
    # Cosine written out here rather than with directions.site_cosines.
    a, b = d32[1:], d16[1:]
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    worst = float(cos.min())
    where = divmod(int(cos.argmin()), cos.shape[1])
    assert worst >= COSINE_BOUND, (
        f"bf16 vs float32 difference in means on the toy model: cosine {worst:.6f} < {COSINE_BOUND} "
        f"at layer {where[0] + 1}, position index {where[1]}"
    )


def test_bf16_greedy_verdicts_agree_with_float32(models: tuple) -> None:  # type: ignore[type-arg]
    m32, m16, tok = models
    prompts = load_prompts("harmful_test")[:16] + load_prompts("harmless_test")[:16]
    v32 = [is_toy_refusal(c) for c in generate(m32, tok, prompts, max_new_tokens=12, progress=False)]
    v16 = [is_toy_refusal(c) for c in generate(m16, tok, prompts, max_new_tokens=12, progress=False)]
    assert sum(v32[:16]) >= 12, f"float32 toy model refused only {sum(v32[:16])}/16 harmful prompts"
    agreeing = sum(a == b for a, b in zip(v32, v16))
    assert agreeing >= MIN_AGREEING, (
        f"bf16 vs float32 greedy refusal verdicts agree on {agreeing}/32 prompts (< {MIN_AGREEING}); "
        f"float32 {v32}, bf16 {v16}"
    )


def test_capture_accumulates_in_float64_on_a_bf16_model(models: tuple) -> None:  # type: ignore[type-arg]
    """mean_activations on a bf16 model equals a float64 mean of its bf16 block inputs to float64 rounding."""
    _, m16, tok = models
    prompts = load_prompts("harmful_train")[:24]
    n_pos = len(post_instruction_tokens(tok))
    layout = get_layout(m16)
    # batch_size 1 on both sides: no padding, so the bf16 activations are the very same numbers.
    got = mean_activations(m16, tok, prompts, batch_size=1)
    assert got.dtype == torch.float64, f"mean_activations on a bf16 model returned {got.dtype}"

    rows: list[torch.Tensor] = []
    grabbed: dict[int, torch.Tensor] = {}
    handles = [
        block.register_forward_pre_hook(
            lambda mod, args, kwargs, layer=layer: grabbed.__setitem__(
                layer, (args[0] if args else kwargs["hidden_states"])[0, -n_pos:].clone()
            ),
            with_kwargs=True,
        )
        for layer, block in enumerate(layout.blocks)
    ]
    try:
        with torch.no_grad():
            for text in prompts:
                ids = tok(format_prompt(tok, text), add_special_tokens=False)["input_ids"]
                m16(input_ids=torch.tensor([ids]), use_cache=False)
                assert all(t.dtype == torch.bfloat16 for t in grabbed.values()), "block inputs are not bf16"
                rows.append(torch.stack([grabbed[layer] for layer in range(layout.n_layers)]).double())
    finally:
        for h in handles:
            h.remove()
    reference = torch.stack(rows).sum(0) / len(rows)  # [L, P, d], float64 from bf16 values
    err = float((got - reference).abs().max() / reference.abs().max())
    # float64 accumulation in another order differs by ~1e-16; a running sum in the model's dtype
    # (bf16) deviates by ~1e-2 here. (A float32 sum of 24 bf16 values of similar size is exact, so
    # float32 accumulation cannot be told apart on this input; the float64 dtype is checked above.)
    assert err < 1e-12, (
        f"mean_activations on a bf16 model: max relative deviation {err:.3g} from a float64 mean of the "
        "bf16 block inputs (the sum is not accumulated in float64)"
    )
