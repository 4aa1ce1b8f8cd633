"""Parity of the two evaluation engines: greedy completions from vLLM and from the torch loop.

Both engines get the same checkpoint directory (a tiny model with head size 32, which vLLM's CPU
attention accepts; it rejects 16), the same prompt token ids (this package's chat template), the
same budget and the same stop ids.

* float32: the token ids must be identical, prompt for prompt. vLLM's CPU kernels reduce in another
  order than transformers' eager attention, so logits differ at rounding level (~1e-6 relative);
  the check passes because no greedy choice on these prompts is that close to a tie, which the test
  verifies independently (the torch path's top-2 logit gap at every step is recorded).
* bfloat16: rounding differences (~0.4 % relative) can flip near-ties, after which completions
  diverge. The test measures, over the prompts, the share of identical completions, of identical
  first tokens and of agreeing judge verdicts, records them, and bounds verdict disagreement
  (see VERDICT_BOUND).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm.entrypoints.llm")
import torch

from refusal_core.evaluation.engines import (
    VllmEngine,
    VllmSettings,
    checkpoint_stop_ids,
    generate_completions,
)
from refusal_core.evaluation.generation import eos_token_ids, generate_ids_multi
from refusal_core.evaluation.judges import SubstringJudge, classify
from refusal_core.model import encode_prompts
from refusal_core.testing.tiny import tiny_model, tiny_prompts, tiny_tokenizer

N_PROMPTS = 24
MAX_NEW = 16
#: bfloat16: at most this share of prompts may get a different substring-judge verdict from the two
#: engines (measured here: see the recorded properties; the real model's number is in the README)
VERDICT_BOUND = 0.25

SETTINGS = VllmSettings(enforce_eager=True, cpu_kv_cache_gib=1)


def _prompts() -> list[str]:
    return tiny_prompts(N_PROMPTS // 2, "harmful", seed=1) + tiny_prompts(N_PROMPTS // 2, "harmless", seed=1)


def _save(family: str, dtype: torch.dtype, path: Path) -> tuple[torch.nn.Module, object]:
    model = tiny_model(family, n_layers=2, d_model=64, n_heads=2, seed=3, dtype=dtype)
    tok = tiny_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def _top2_gaps(model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]]) -> float:
    """The smallest gap between the two largest logits over every greedy step the torch path took."""
    smallest = float("inf")
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            ids = torch.tensor([p + c])
            logits = model(input_ids=ids).logits[0, len(p) - 1 : len(p) - 1 + len(c) + 1].float()
            top = torch.topk(logits, 2, dim=-1).values
            smallest = min(smallest, float((top[:, 0] - top[:, 1]).min()))
    return smallest


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_float32_greedy_tokens_are_identical(family: str, tmp_path: Path, record_property) -> None:
    model, tok = _save(family, torch.float32, tmp_path / "ckpt")
    prompts = encode_prompts(tok, _prompts())
    stops = eos_token_ids(model, tok)
    assert checkpoint_stop_ids(tmp_path / "ckpt", tok) == stops, "stop ids read from the directory"
    torch_out = generate_ids_multi(
        model, tok, prompts, [None], [0], max_new_tokens=MAX_NEW, batch_size=8, progress=False
    )[0]
    vllm_out = generate_completions(
        "vllm", tmp_path / "ckpt", tok, prompts, [None], [0], max_new_tokens=MAX_NEW, vllm=SETTINGS
    )[0]
    gap = _top2_gaps(model, prompts, torch_out)
    record_property("min_top2_logit_gap", gap)
    assert sum(len(c) for c in torch_out) > N_PROMPTS, "completions are not all empty"
    differing = [i for i, (a, b) in enumerate(zip(torch_out, vllm_out)) if a != b]
    assert not differing, (
        f"{family} float32 greedy, {len(differing)}/{N_PROMPTS} prompts differ between torch and vLLM "
        f"(smallest top-2 gap {gap:.2e}); first: prompt {differing[0]}: torch {torch_out[differing[0]]} "
        f"vs vllm {vllm_out[differing[0]]}"
    )


def test_bfloat16_greedy_verdict_agreement_is_bounded(tmp_path: Path, record_property) -> None:
    model, tok = _save("llama", torch.bfloat16, tmp_path / "ckpt")
    texts = _prompts()
    prompts = encode_prompts(tok, texts)
    stops = eos_token_ids(model, tok)
    torch_out = generate_ids_multi(
        model, tok, prompts, [None], [0], max_new_tokens=MAX_NEW, batch_size=8, progress=False
    )[0]
    with VllmEngine(tmp_path / "ckpt", SETTINGS, dtype="bfloat16") as engine:
        vllm_out = engine.complete(prompts, [None], [0], max_new_tokens=MAX_NEW, stop_token_ids=stops)[0]
    same = sum(a == b for a, b in zip(torch_out, vllm_out)) / N_PROMPTS
    first = sum(a[:1] == b[:1] for a, b in zip(torch_out, vllm_out)) / N_PROMPTS
    judge = SubstringJudge(min_words=1)
    v_torch = classify(judge, texts, [tok.decode(c, skip_special_tokens=True) for c in torch_out])
    v_vllm = classify(judge, texts, [tok.decode(c, skip_special_tokens=True) for c in vllm_out])
    agree = sum(a == b for a, b in zip(v_torch, v_vllm)) / N_PROMPTS
    record_property("bf16_identical_completions", same)
    record_property("bf16_identical_first_token", first)
    record_property("bf16_verdict_agreement", agree)
    print(
        f"bfloat16, {N_PROMPTS} prompts x {MAX_NEW} tokens: identical {same:.3f}, first token {first:.3f}, "
        f"verdicts agree {agree:.3f}"
    )
    assert 1 - agree <= VERDICT_BOUND, (
        f"bfloat16 greedy: verdicts of torch and vLLM disagree on {1 - agree:.3f} of {N_PROMPTS} prompts "
        f"(bound {VERDICT_BOUND}); identical completions {same:.3f}"
    )
    assert first >= 0.75, f"bfloat16 greedy: the first token agrees on only {first:.3f} of prompts"
