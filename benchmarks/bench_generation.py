"""Batched generation throughput vs one prompt at a time (issue 3 target: at least 4x).

Prints, for each model, tokens/s of refusal_core's batched greedy decoding, of
the same decoder run one prompt at a time, and of transformers' ``generate``
(batched, for reference), with the ratio batched / one-at-a-time. Stop tokens
are disabled so every run decodes exactly ``--new-tokens`` tokens per prompt
and the token counts are equal. The batched and one-at-a-time outputs are
also compared token for token.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_generation.py`` (add
``--threads N`` to let torch use N threads). Not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from refusal_core.evaluation.generation import generate_ids
from refusal_core.model import encode_prompts, left_pad
from refusal_core.testing.tiny import tiny_model, tiny_prompts, tiny_tokenizer

NO_STOP = [-1]  # no model emits id -1: every prompt decodes the full budget
TARGET = 4.0


def _best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Smallest wall time of ``repeats`` runs (seconds) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_model(name: str, model: Any, tokenizer: Any, prompts: list[str], args: argparse.Namespace) -> float:
    ids = encode_prompts(tokenizer, prompts)
    n_tokens = len(ids) * args.new_tokens

    def batched() -> list[list[int]]:
        return generate_ids(
            model,
            tokenizer,
            ids,
            max_new_tokens=args.new_tokens,
            batch_size=args.batch_size,
            stop_token_ids=NO_STOP,
            progress=False,
        )

    def single() -> list[list[int]]:
        return [
            generate_ids(
                model,
                tokenizer,
                [p],
                max_new_tokens=args.new_tokens,
                batch_size=1,
                stop_token_ids=NO_STOP,
                progress=False,
            )[0]
            for p in ids
        ]

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def hf_generate() -> None:
        for start in range(0, len(ids), args.batch_size):
            x, mask = left_pad(ids[start : start + args.batch_size], pad)
            with torch.no_grad():
                model.generate(
                    input_ids=x,
                    attention_mask=mask,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )

    batched()  # warm-up (allocator, kernel selection)
    t_batched, out_batched = _best_of(args.repeats, batched)
    t_single, out_single = _best_of(args.repeats, single)
    t_hf, _ = _best_of(args.repeats, hf_generate)
    same = sum(a == b for a, b in zip(out_batched, out_single))
    ratio = t_single / t_batched
    print(
        f"\n{name}: {len(ids)} prompts x {args.new_tokens} new tokens, batch_size {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"  {'decoder':<34}{'seconds':>10}{'tokens/s':>12}")
    for label, t in (
        ("refusal_core batched", t_batched),
        ("refusal_core one prompt at a time", t_single),
        ("transformers generate (batched)", t_hf),
    ):
        print(f"  {label:<34}{t:>10.3f}{n_tokens / t:>12.0f}")
    verdict = "meets" if ratio >= TARGET else "MISSES"
    print(f"  batched / one-at-a-time throughput: {ratio:.1f}x ({verdict} the {TARGET:.0f}x target)")
    print(f"  batched output equals one-at-a-time output for {same}/{len(ids)} prompts")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--prompts", type=int, default=64, help="number of prompts (half harmful, half harmless)"
    )
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per prompt")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats; the fastest counts")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    half = args.prompts // 2
    prompts = tiny_prompts(half, "harmful", seed=1) + tiny_prompts(args.prompts - half, "harmless", seed=1)
    bench_model(
        "tiny llama (2 layers, d=64)", tiny_model("llama", d_model=64), tiny_tokenizer(), prompts, args
    )
    try:
        from refusal_core.toy import load_toy_model
    except ImportError:
        print("\ntoy model: refusal_core.toy is not available; skipped")
        return
    try:
        model, tokenizer = load_toy_model()
    except Exception as exc:  # a missing or unverified artifact: report and carry on
        print(f"\ntoy model: not loadable here ({type(exc).__name__}: {exc}); skipped")
        return
    bench_model("toy refusal model", model, tokenizer, prompts, args)


if __name__ == "__main__":
    main()
