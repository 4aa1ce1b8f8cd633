"""Refusal scores of prompts and per-tokenizer refusal tokens."""

from __future__ import annotations

import math

import pytest
import torch

from refusal_core.errors import EmptyInputError, InvalidArgumentError
from refusal_core.evaluation.scores import continuation_token_ids, refusal_scores, refusal_token_ids_for
from refusal_core.model import encode_prompts, format_prompt
from refusal_core.testing.tiny import TINY_FAMILIES, tiny_model, tiny_prompts, tiny_tokenizer

TOK = tiny_tokenizer()
PROMPTS = tiny_prompts(5, "harmful", seed=4) + tiny_prompts(5, "harmless", seed=4) + ["Hi"]
IDS = refusal_token_ids_for(TOK, ["I'm sorry", "I cannot", "As an assistant"])


def reference_scores(model: torch.nn.Module, prompts: list[str], ids: list[int]) -> torch.Tensor:
    """One unpadded forward per prompt; the log-odds formula written out in float64."""
    out = []
    with torch.no_grad():
        for seq in encode_prompts(TOK, prompts):
            logits = model(torch.tensor([seq])).logits[0, -1].to(torch.float64)
            p = float(torch.softmax(logits, -1)[ids].sum())
            out.append(math.log(p + 1e-8) - math.log(1 - p + 1e-8))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_scores_match_unpadded_reference(family: str) -> None:
    model = tiny_model(family, dtype=torch.float64, seed=2)
    ref = reference_scores(model, PROMPTS, IDS)
    for batch_size in (1, 4, 32):
        got = refusal_scores(model, TOK, PROMPTS, IDS, batch_size=batch_size, progress=False)
        assert got.dtype == torch.float64, f"{family}: dtype {got.dtype}"
        assert got.shape == (len(PROMPTS),), f"{family}: shape {tuple(got.shape)}"
        err = float((got - ref).norm() / ref.norm())
        assert err < 1e-10, (
            f"{family}, batch_size={batch_size}: refusal_scores vs reference, rel. error {err:.2e}"
        )


def test_scores_are_order_independent_in_float32() -> None:
    model = tiny_model("llama", seed=3)
    a = refusal_scores(model, TOK, PROMPTS, IDS, batch_size=3, progress=False)
    b = refusal_scores(model, TOK, PROMPTS[::-1], IDS, batch_size=3, progress=False).flip(0)
    err = float((a - b).norm() / a.norm())
    assert err < 1e-5, f"reversing the prompt order changed scores: rel. error {err:.2e}"


def test_system_prompt_changes_the_scored_prompt() -> None:
    model = tiny_model("llama", dtype=torch.float64, seed=3)
    plain = refusal_scores(model, TOK, PROMPTS[:3], IDS, progress=False)
    system = refusal_scores(
        model, TOK, PROMPTS[:3], IDS, system="You are a careful assistant.", progress=False
    )
    assert not torch.equal(plain, system), "a system prompt had no effect on the refusal scores"


def test_refusal_tokens_are_first_tokens_in_context() -> None:
    prompt = format_prompt(TOK, "Hello.")
    n = len(TOK(prompt, add_special_tokens=False)["input_ids"])
    for phrase in ("I'm sorry", "Sorry", "As an assistant"):
        joint = TOK(prompt + phrase, add_special_tokens=False)["input_ids"]
        (got,) = refusal_token_ids_for(TOK, [phrase])
        assert got == joint[n], (
            f"{phrase!r}: refusal token {got} is not the first completion token {joint[n]}"
        )
        assert continuation_token_ids(TOK, phrase) == joint[n:], f"{phrase!r}: continuation ids differ"


def test_refusal_tokens_follow_the_phrases() -> None:
    sorry = refusal_token_ids_for(TOK, ["Sorry, no."])
    i_tokens = refusal_token_ids_for(TOK, ["I cannot", "I'm sorry"])
    assert sorry != i_tokens, "different refusal openings gave the same tokens: ids look hard-coded"
    both = refusal_token_ids_for(TOK, ["Sorry, no.", "I cannot", "I'm sorry"])
    assert both == sorted(set(sorry) | set(i_tokens)), f"ids of a phrase union {both} are not the union"
    special = set(TOK.all_special_ids)
    assert not special & set(both), f"special tokens {special & set(both)} among refusal tokens"


def test_bad_inputs_raise() -> None:
    model = tiny_model("llama")
    with pytest.raises(EmptyInputError):
        refusal_token_ids_for(TOK, [])
    with pytest.raises(InvalidArgumentError, match=r"phrases\[1\]"):
        refusal_token_ids_for(TOK, ["Sorry", "  "])
    with pytest.raises(InvalidArgumentError, match="refusal_token_ids"):
        refusal_scores(model, TOK, PROMPTS, [10**6], progress=False)
    with pytest.raises(EmptyInputError):
        refusal_scores(model, TOK, PROMPTS, [], progress=False)
    with pytest.raises(EmptyInputError):
        refusal_scores(model, TOK, [], IDS, progress=False)
