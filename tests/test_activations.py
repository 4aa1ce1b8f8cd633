"""Activation capture at block inputs × post-instruction positions."""

from __future__ import annotations

import pytest
import torch

from refusal_core.activations import mean_activations
from refusal_core.errors import EmptyInputError, InvalidArgumentError, NonFiniteError, ShapeMismatchError
from refusal_core.model import batch_inputs, encode_prompts, get_layout, post_instruction_tokens
from refusal_core.testing.tiny import TINY_FAMILIES, tiny_model, tiny_prompts, tiny_tokenizer

TOK = tiny_tokenizer()
#: Relative tolerance between differently padded or batched float64 runs (tiny float64 models
#: take their attention softmax in float64, so only float64 rounding separates them).
PAD_TOL = 1e-12
PROMPTS = (
    tiny_prompts(6, "harmful", seed=2)
    + tiny_prompts(5, "harmless", seed=2)
    + ["Hi", "A much longer one, " * 4]
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    return float(torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(b64))


def naive_block_inputs(model: torch.nn.Module, prompts: list[str]) -> torch.Tensor:
    """Reference: one unpadded forward per prompt with output_hidden_states; ``[n, L, P, d]`` float64."""
    n_layers = get_layout(model).n_layers
    n_pos = len(post_instruction_tokens(TOK))
    out = []
    with torch.no_grad():
        for ids in encode_prompts(TOK, prompts):
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            # hidden_states[l] is the input of block l for l < L (the last entry is after the final norm).
            out.append(torch.stack([hs[layer][0, -n_pos:] for layer in range(n_layers)]).to(torch.float64))
    return torch.stack(out)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_capture_matches_per_prompt_hidden_states(family: str) -> None:
    model = tiny_model(family, dtype=torch.float64, seed=1)
    ref = naive_block_inputs(model, PROMPTS)
    got = mean_activations(model, TOK, PROMPTS, batch_size=4)
    assert (got.dtype, got.shape) == (torch.float64, ref.shape[1:]), (
        f"{family}: {got.dtype} {tuple(got.shape)}"
    )
    err = rel_err(got, ref.mean(0))
    assert err < PAD_TOL, f"{family}: mean_activations vs per-prompt hidden_states, relative error {err:.2e}"


def test_left_padding_does_not_change_means() -> None:
    model = tiny_model("llama", seed=5)  # float32: padding must not matter beyond rounding
    one = mean_activations(model, TOK, PROMPTS, batch_size=1)
    seven = mean_activations(model, TOK, PROMPTS, batch_size=7)
    err = rel_err(seven, one)
    assert err < 1e-5, f"batch_size 7 vs 1 (left padding): relative error {err:.2e}"


def test_prompt_order_does_not_matter() -> None:
    model = tiny_model("qwen2", dtype=torch.float64)
    a = mean_activations(model, TOK, PROMPTS, batch_size=3)
    b = mean_activations(model, TOK, PROMPTS[::-1], batch_size=3)
    assert rel_err(a, b) < PAD_TOL, f"reversed prompt order changed the means: {rel_err(a, b):.2e}"


def test_groups_equal_separate_calls() -> None:
    model = tiny_model("gemma", dtype=torch.float64)
    groups = torch.tensor([i % 3 for i in range(len(PROMPTS))])
    got = mean_activations(model, TOK, PROMPTS, groups=groups, n_groups=3, batch_size=5)
    assert got.shape[0] == 3, f"expected 3 groups, got shape {tuple(got.shape)}"
    for g in range(3):
        sub = [p for p, gi in zip(PROMPTS, groups.tolist()) if gi == g]
        ref = mean_activations(model, TOK, sub, batch_size=2)
        assert rel_err(got[g], ref) < PAD_TOL, f"group {g}: relative error {rel_err(got[g], ref):.2e}"


def test_membership_matrix_allows_overlapping_groups() -> None:
    model = tiny_model("llama", dtype=torch.float64)
    n = len(PROMPTS)
    member = torch.zeros((n, 2), dtype=torch.bool)
    member[:, 0] = True  # everyone
    member[:4, 1] = True  # the first four
    got = mean_activations(model, TOK, PROMPTS, groups=member, n_groups=2)
    full = mean_activations(model, TOK, PROMPTS)
    first = mean_activations(model, TOK, PROMPTS[:4])
    assert rel_err(got[0], full) < PAD_TOL, "membership group 0 (all prompts) differs from the plain mean"
    assert rel_err(got[1], first) < PAD_TOL, "membership group 1 (first four) differs from their mean"


def test_bad_input_raises_and_leaves_no_hooks() -> None:
    model = tiny_model("llama")
    blocks = get_layout(model).blocks
    with pytest.raises(EmptyInputError, match="instructions"):
        mean_activations(model, TOK, [])
    with pytest.raises(InvalidArgumentError, match="sequence of str"):
        mean_activations(model, TOK, "a single string")
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        mean_activations(model, TOK, PROMPTS, batch_size=0)
    with pytest.raises(EmptyInputError, match="groups"):
        mean_activations(model, TOK, PROMPTS[:2], groups=torch.tensor([0, 0]), n_groups=2)
    with pytest.raises(ShapeMismatchError, match="groups"):
        mean_activations(model, TOK, PROMPTS[:2], groups=torch.tensor([0, 1, 1]), n_groups=2)
    with torch.no_grad():
        get_layout(model).attn_out(0).weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        mean_activations(model, TOK, PROMPTS[:3])
    leftover = [len(b._forward_pre_hooks) for b in blocks]
    assert leftover == [0] * len(blocks), f"hooks left on blocks after an error: {leftover}"


def test_inputs_not_mutated_and_hooks_removed() -> None:
    model = tiny_model("mistral")
    prompts = list(PROMPTS)
    mean_activations(model, TOK, prompts, batch_size=4)
    assert prompts == PROMPTS, "mean_activations mutated its prompt list"
    leftover = [len(b._forward_pre_hooks) for b in get_layout(model).blocks]
    assert leftover == [0, 0], f"hooks left on blocks: {leftover}"


def test_batch_inputs_left_pads_with_real_token_positions() -> None:
    batch = batch_inputs([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]], f"padding {batch['input_ids'].tolist()}"
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]], "attention mask"
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]], "position ids must count real tokens"
