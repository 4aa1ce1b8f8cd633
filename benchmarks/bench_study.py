"""Benchmark: activation capture and candidate selection, each beside its baseline.

Prints, side by side in one run on the same model and prompts:

* activation capture (streaming float64 means at every block input ×
  post-instruction position) vs a plain forward of the base model over the
  same batches (target: capture within 1.2x);
* batched candidate selection vs the naive loop that evaluates one
  candidate at a time (:func:`bench_selection`: on the toy model and on a
  24-layer tiny model, same dtype, target: batched at least 1.5x faster).

Run: ``python benchmarks/bench_study.py [--model toy|PATH] [--repeats 3] [--quick]``.
Uses one torch thread unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from refusal_core.activations import mean_activations
from refusal_core.directions import extract_candidates
from refusal_core.model import batch_inputs, encode_prompts, load_model
from refusal_core.prompts import load_prompts
from refusal_core.selection import SelectionConfig, select_direction, select_direction_naive
from refusal_core.testing.tiny import tiny_model, tiny_prompts, tiny_tokenizer
from refusal_core.toy import toy_refusal_token_ids

#: Token ids read as "refusal" on the random 24-layer tiny model (any fixed ids do for timing).
TINY_REFUSAL_IDS = (11, 12, 13)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` wall-clock runs (seconds), after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Fastest process-CPU and wall seconds of each function over ``repeats`` interleaved rounds.

    Interleaving (a, b, a, b, ...) exposes both to the same machine load; the
    process CPU time counts only this process's work, which a shared machine
    disturbs less than wall time (both are reported).
    """
    for fn in fns.values():
        fn()  # warm-up
    best = {k: {"cpu_s": float("inf"), "wall_s": float("inf")} for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            best[name]["cpu_s"] = min(best[name]["cpu_s"], time.process_time() - c0)
            best[name]["wall_s"] = min(best[name]["wall_s"], time.perf_counter() - w0)
    return best


def _selection_case(
    model: Any,
    tok: Any,
    harmful: list[str],
    harmless: list[str],
    hv: list[str],
    sv: list[str],
    ids: Any,
    repeats: int,
) -> dict[str, Any]:
    cands = extract_candidates(model, tok, harmful, harmless)
    config = SelectionConfig()
    times = _interleaved(
        {
            "batched": lambda: select_direction(model, tok, cands, hv, sv, ids, config),
            "naive": lambda: select_direction_naive(model, tok, cands, hv, sv, ids, config),
        },
        repeats,
    )
    a = select_direction(model, tok, cands, hv, sv, ids, config)
    b = select_direction_naive(model, tok, cands, hv, sv, ids, config)
    diff = max(
        float((getattr(a, k) - getattr(b, k)).nan_to_num().abs().max()) for k in ("bypass", "induce", "kl")
    )
    return {
        "ratio_cpu": times["naive"]["cpu_s"] / times["batched"]["cpu_s"],
        "ratio_wall": times["naive"]["wall_s"] / times["batched"]["wall_s"],
        "batched": times["batched"],
        "naive": times["naive"],
        "n_layers": int(cands.directions.shape[0]),
        "n_scored": int((~a.bypass.isnan()).sum()),
        "n_val": [len(hv), len(sv)],
        "dtype": str(next(model.parameters()).dtype),
        "same_source": a.source == b.source,
        "max_score_diff": diff,
    }


def bench_selection(quick: bool = False, *, threads: int = 1) -> dict[str, Any]:
    """Batched :func:`select_direction` vs :func:`select_direction_naive`, float32, default config.

    Cases: the toy model (L = 4, d = 64) and a random 24-layer tiny Llama
    (``tiny_model``'s default width d = 32; full runs add d = 64 as
    ``conditions["tiny24_d64"]``).
    Returns the speed-ups (naive time / batched time, process CPU seconds,
    fastest of interleaved rounds) as ``selection_vs_naive_toy`` and
    ``selection_vs_naive_tiny24``, with the conditions (wall-clock ratios,
    times, prompt counts, scored candidates, threads, load average, whether
    both picked the same source and the largest score difference).
    ``quick`` uses fewer prompts and rounds (a smoke run, noisier).
    """
    torch.set_num_threads(threads)
    n_val, n_train, repeats = (8, 32, 2) if quick else (16, 64, 4)
    load_before = os.getloadavg()
    model, tok = load_model("toy")
    toy = _selection_case(
        model,
        tok,
        load_prompts("harmful_train")[:n_train],
        load_prompts("harmless_train")[:n_train],
        load_prompts("harmful_val")[:n_val],
        load_prompts("harmless_val")[:n_val],
        toy_refusal_token_ids(),
        repeats,
    )
    tiny_cases = {}
    # d = 32 is tiny_model's default width (per-forward overhead matters, as on any small model);
    # d = 64 is compute-bound, where the ablation pass bounds the speed-up (full runs only).
    for width in (32,) if quick else (32, 64):
        tiny_cases[width] = _selection_case(
            tiny_model("llama", n_layers=24, d_model=width, seed=0),
            tiny_tokenizer(),
            tiny_prompts(n_train, "harmful", 0),
            tiny_prompts(n_train, "harmless", 0),
            tiny_prompts(n_val, "harmful", 1),
            tiny_prompts(n_val, "harmless", 1),
            list(TINY_REFUSAL_IDS),
            max(1, repeats // 2),
        )
    tiny24 = tiny_cases[32]
    return {
        "selection_vs_naive_toy": toy["ratio_cpu"],
        "selection_vs_naive_tiny24": tiny24["ratio_cpu"],
        "conditions": {
            "clock": "process CPU time, fastest of interleaved rounds (wall-clock ratios alongside)",
            "threads": threads,
            "quick": quick,
            "rows_per_forward": SelectionConfig().rows_per_forward,
            "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()),
            "toy": toy,
            "tiny24": tiny24,
            **({"tiny24_d64": tiny_cases[64]} if 64 in tiny_cases else {}),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--prompts", type=int, default=128, help="prompts per class for capture")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="fewer prompts and rounds for selection")
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
    sel = bench_selection(args.quick, threads=args.threads)
    cond = sel["conditions"]

    print(f"model: {args.model}  threads: {args.threads}  prompts: {len(prompts)}")
    print(f"{'operation':<34}{'ours (s)':>10}{'baseline (s)':>14}{'ratio':>8}  target")
    print(
        f"{'capture vs plain forward':<34}{t_capture:>10.3f}{t_plain:>14.3f}"
        f"{t_capture / t_plain:>8.2f}  <= 1.20 (wall)"
    )
    for name in ("toy", "tiny24", "tiny24_d64"):
        if name not in cond:
            continue
        case = cond[name]
        label = f"selection vs naive, {name}"
        print(
            f"{label:<34}{case['batched']['cpu_s']:>10.3f}{case['naive']['cpu_s']:>14.3f}"
            f"{case['ratio_cpu']:>8.2f}  >= 1.50 (speed-up, CPU time; wall {case['ratio_wall']:.2f})"
        )
        print(
            f"  {case['n_scored']} candidates of L={case['n_layers']} scored on {case['n_val']} prompts, "
            f"{case['dtype']}; same source as naive: {case['same_source']}; "
            f"largest score difference {case['max_score_diff']:.2g}"
        )
    print(f"load average before/after: {cond['loadavg_before']} / {cond['loadavg_after']}")


if __name__ == "__main__":
    main()
