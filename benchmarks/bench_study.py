"""Benchmark: activation capture and candidate selection, each beside its baseline.

Prints, side by side in one run on the same model and prompts:

* activation capture (streaming float64 means at every block input ×
  post-instruction position) vs a plain forward of the base model over the
  same batches (target: capture within 1.2x);
* batched candidate selection vs the naive loop that evaluates one
  candidate at a time (target: batched at least 3x faster).

Run: ``python benchmarks/bench_study.py [--model toy|PATH] [--repeats 3]``.
Uses one torch thread unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from refusal_core.activations import batch_inputs, encode_prompts, mean_activations
from refusal_core.directions import extract_candidates
from refusal_core.models import load_model
from refusal_core.prompts import load_prompts
from refusal_core.selection import select_direction, select_direction_naive


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` wall-clock runs (seconds), after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--prompts", type=int, default=128, help="prompts per class for capture")
    ap.add_argument("--val", type=int, default=16, help="prompts per class for selection")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_model(args.model)
    harmful = load_prompts("harmful_train")[: args.prompts]
    harmless = load_prompts("harmless_train")[: args.prompts]
    prompts = harmful + harmless

    encoded = encode_prompts(tok, prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    @torch.inference_mode()
    def plain_forward() -> None:
        for start in range(0, len(encoded), args.batch_size):
            model.model(**batch_inputs(encoded[start : start + args.batch_size], pad))

    def capture() -> None:
        mean_activations(model, tok, prompts, batch_size=args.batch_size)

    t_plain = best_of(plain_forward, args.repeats)
    t_capture = best_of(capture, args.repeats)

    cands = extract_candidates(model, tok, harmful, harmless, batch_size=args.batch_size)
    hv, sv = load_prompts("harmful_val")[: args.val], load_prompts("harmless_val")[: args.val]
    from refusal_core.study import _refusal_ids

    ids = _refusal_ids(args.model, tok)
    t_batched = best_of(lambda: select_direction(model, tok, cands, hv, sv, ids), max(1, args.repeats - 1))
    t_naive = best_of(
        lambda: select_direction_naive(model, tok, cands, hv, sv, ids), max(1, args.repeats - 1)
    )
    a = select_direction(model, tok, cands, hv, sv, ids)
    b = select_direction_naive(model, tok, cands, hv, sv, ids)
    agree = a.source == b.source

    n_cand = cands.directions.shape[0] * cands.directions.shape[1]
    print(f"model: {args.model}  threads: {args.threads}  prompts: {len(prompts)}  candidates: {n_cand}")
    print(f"{'operation':<28}{'ours (s)':>10}{'baseline (s)':>14}{'ratio':>8}  target")
    print(
        f"{'capture vs plain forward':<28}{t_capture:>10.3f}{t_plain:>14.3f}"
        f"{t_capture / t_plain:>8.2f}  <= 1.20"
    )
    print(
        f"{'selection batched vs naive':<28}{t_batched:>10.3f}{t_naive:>14.3f}"
        f"{t_naive / t_batched:>8.2f}  >= 3.00 (speed-up)"
    )
    print(f"selected source agrees with the naive loop: {agree} ({a.source} vs {b.source})")


if __name__ == "__main__":
    main()
