"""The project's Wanda and AWQ vs llmcompressor's, side by side on one model (issue 4 target).

Target: ours not slower, and equal or lower output error. For each pair the
same model, the same calibration token ids and the same held-out prompts are
used; each method starts from a fresh copy of the dense model (the copy is not
timed). Printed per method: wall time (best of ``--repeats``), the relative
Frobenius error of the held-out logits and of the last block's output against
the dense model, then the ratios time(llmc)/time(ours) (> 1: ours faster) and
error(ours)/error(llmc) (<= 1: ours lower or equal).

The model is the packaged toy refusal model when its weights are present, else
a tiny random Llama (``--layers`` blocks of width ``--width``, at least 128).
llmcompressor's time includes what its backend must do for every call
(``oneshot`` on a deep copy, then copying the weights back); the deep copy's own
time is printed separately. One untimed warm-up call per llmcompressor method
runs first (its first call traces the model and sets up its session).

Run in the llmc environment (llmcompressor pins transformers <= 5.17):
``OMP_NUM_THREADS=1 /work/venv-llmc/bin/python benchmarks/bench_compression.py``.
Not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from torch import nn

from refusal_core.compression import AwqConfig, CompressionConfig, WandaConfig, compress_
from refusal_core.compression.llmc import LlmcAwqConfig, LlmcWandaConfig, llmc_available
from refusal_core.testing.tiny import tiny_model, tiny_prompts, tiny_tokenizer


def _load(args: argparse.Namespace) -> tuple[str, nn.Module, list[list[int]], list[list[int]]]:
    """(description, dense model, calibration ids, held-out ids)."""
    from refusal_core.toy import toy_model_path

    if not args.tiny and (toy_model_path() / "model.safetensors").is_file():
        from refusal_core.prompts import load_prompts
        from refusal_core.toy import load_toy_model

        model, tok = load_toy_model()

        def chat_ids(texts: list[str]) -> list[list[int]]:
            return [
                list(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True))
                for t in texts
            ]

        half = args.calibration // 2
        calibration = chat_ids(load_prompts("harmful_train")[:half] + load_prompts("harmless_train")[:half])
        held = args.heldout // 2
        heldout = chat_ids(load_prompts("harmful_val")[:held] + load_prompts("harmless_val")[:held])
        return "toy refusal model", model, calibration, heldout

    if args.width < 128:
        raise SystemExit("--width must be at least 128")
    tok = tiny_tokenizer()
    model = tiny_model("llama", n_layers=args.layers, d_model=args.width, n_heads=args.width // 32, seed=0)

    def ids(texts: list[str]) -> list[list[int]]:
        return [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts]

    half, held = args.calibration // 2, args.heldout // 2
    calibration = ids(tiny_prompts(half, "harmful", seed=0) + tiny_prompts(half, "harmless", seed=0))
    heldout = ids(tiny_prompts(held, "harmful", seed=11) + tiny_prompts(held, "harmless", seed=11))
    d_ff = 4 * args.width
    return (
        f"tiny random Llama ({args.layers} blocks, width {args.width}, MLP {d_ff})",
        model,
        calibration,
        heldout,
    )


def _errors(model: nn.Module, dense: nn.Module, heldout: list[list[int]]) -> tuple[float, float]:
    """Relative Frobenius error vs ``dense`` of the logits and of the last block's output (float64)."""
    sums = [0.0, 0.0, 0.0, 0.0]
    with torch.no_grad():
        for seq in heldout:
            ids = torch.tensor([seq])
            a = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            b = dense(input_ids=ids, output_hidden_states=True, use_cache=False)
            la, lb = a.logits.double(), b.logits.double()
            ha, hb = a.hidden_states[-1].double(), b.hidden_states[-1].double()
            sums[0] += float((la - lb).pow(2).sum())
            sums[1] += float(lb.pow(2).sum())
            sums[2] += float((ha - hb).pow(2).sum())
            sums[3] += float(hb.pow(2).sum())
    return math.sqrt(sums[0] / sums[1]), math.sqrt(sums[2] / sums[3])


def _run(
    dense: nn.Module, config: CompressionConfig, calibration: list[list[int]], repeats: int
) -> tuple[float, nn.Module]:
    """Best wall time of ``repeats`` compress_ calls, each on a fresh copy; returns (seconds, last model)."""
    best, model = float("inf"), dense
    for _ in range(repeats):
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        compress_(model, config, calibration)
        best = min(best, time.perf_counter() - t0)
    return best, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="use the tiny random Llama even if the toy model exists"
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--calibration", type=int, default=64, help="calibration prompts")
    parser.add_argument("--heldout", type=int, default=32, help="held-out prompts for the error")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not llmc_available():
        raise SystemExit(
            "llmcompressor is not installed here: run this in the llmc environment (tox -e llmc)"
        )
    import llmcompressor  # noqa: F401  (imported before timing: the import alone takes seconds)

    what, dense, calibration, heldout = _load(args)
    n_tokens = sum(len(s) for s in calibration)
    print(
        f"model: {what}; calibration: {len(calibration)} prompts, {n_tokens} tokens; held-out: {len(heldout)}"
    )
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (best time reported)")

    t0 = time.perf_counter()
    copy.deepcopy(dense)
    print(f"one deep copy of the model (inside every llmcompressor call): {time.perf_counter() - t0:.3f} s")

    pairs: list[tuple[str, CompressionConfig, CompressionConfig]] = [
        ("Wanda 50%", WandaConfig(0.5), LlmcWandaConfig(0.5)),
        ("Wanda 2:4", WandaConfig(0.5, (2, 4)), LlmcWandaConfig(0.5, (2, 4))),
        ("AWQ w4 g128", AwqConfig(w_bit=4), LlmcAwqConfig(w_bit=4)),
        ("AWQ w4 g128 (llmc no duo)", AwqConfig(w_bit=4), LlmcAwqConfig(w_bit=4, duo_scaling=False)),
        ("AWQ w8 g128", AwqConfig(w_bit=8), LlmcAwqConfig(w_bit=8)),
    ]
    warmed: set[type] = set()
    rows: list[tuple[str, float, float, float, float, float, float]] = []
    cache: dict[CompressionConfig, tuple[float, tuple[float, float]]] = {}
    for label, ours_cfg, llmc_cfg in pairs:
        if type(llmc_cfg) not in warmed:
            compress_(copy.deepcopy(dense), llmc_cfg, calibration[:4])
            warmed.add(type(llmc_cfg))
        results = []
        for cfg in (ours_cfg, llmc_cfg):
            if cfg not in cache:
                seconds, model = _run(dense, cfg, calibration, args.repeats)
                cache[cfg] = (seconds, _errors(model, dense, heldout))
            results.append(cache[cfg])
        (t_ours, (e_ours, h_ours)), (t_llmc, (e_llmc, h_llmc)) = results
        rows.append((label, t_ours, t_llmc, e_ours, e_llmc, h_ours, h_llmc))
        print(f"  done: {label}", flush=True)

    header = (
        f"{'method':<27} {'ours s':>8} {'llmc s':>8} {'llmc/ours':>9} "
        f"{'ours err':>9} {'llmc err':>9} {'ours/llmc':>9} {'last-block err ours / llmc':>27}"
    )
    print()
    print(header)
    print("-" * len(header))
    for label, t_o, t_l, e_o, e_l, h_o, h_l in rows:
        print(
            f"{label:<27} {t_o:8.3f} {t_l:8.3f} {t_l / t_o:9.2f} "
            f"{e_o:9.3e} {e_l:9.3e} {e_o / e_l:9.3f} {f'{h_o:.3e} / {h_l:.3e}':>27}"
        )
    print("\nerr: relative Frobenius error of held-out logits vs the dense model.")
    print("llmc/ours > 1: ours faster; ours/llmc <= 1: ours equal or lower error.")


if __name__ == "__main__":
    main()
