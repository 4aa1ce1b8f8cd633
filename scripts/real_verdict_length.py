"""How many new tokens the real tier's verdicts need: judge one greedy generation at several lengths.

Greedy decoding is prefix-stable (the first k tokens of a 64-token greedy completion are the k-token
greedy completion), so one generation of ``--max-tokens`` new tokens per prompt, decoded at each budget,
gives the substring judge's verdicts at every budget at the cost of the longest. For each budget the script
records the refusal rates (Wilson intervals) on harmful and harmless held-out prompts, and an exact McNemar
test of "refused at this budget" against "refused at the longest budget" on the same prompts, so the
budget where verdicts stop changing can be read off.

Usage:
    python scripts/real_verdict_length.py [--model KEY] [--budgets 8,16,32,48,64] [--n 98] --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default=None, help="real model key (default: the tier's default)")
    parser.add_argument("--budgets", default="8,16,32,48,64")
    parser.add_argument("--n", type=int, default=98, help="prompts per class (at most the test split's size)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default=None, help="default: the real tier's (bfloat16 where native)")
    parser.add_argument("--classes", default="harmful_test,harmless_test", help="prompt splits, in order")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    from refusal_core.evaluation.generation import generate_ids
    from refusal_core.evaluation.judges import REFUSED, SubstringJudge
    from refusal_core.model import load_model
    from refusal_core.model.inputs import encode_prompts
    from refusal_core.prompts import load_prompts
    from refusal_core.real import real_model, real_study_dtype, verify_gguf
    from refusal_core.stats import mcnemar, rate_of

    spec = real_model(args.model)
    budgets = sorted({int(b) for b in args.budgets.split(",")})
    longest = budgets[-1]
    dtype = args.dtype or real_study_dtype()
    gguf = verify_gguf(key=spec.key)
    t0 = time.perf_counter()
    model, tok = load_model(str(gguf), dtype=dtype)
    load_s = time.perf_counter() - t0
    judge = SubstringJudge()
    out: dict = {
        "model": spec.title,
        "dtype": dtype,
        "budgets": budgets,
        "judge": judge.name,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "load_seconds": round(load_s, 1),
        "classes": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for split in [c.strip() for c in args.classes.split(",") if c.strip()]:
        instructions = load_prompts(split)[: args.n]
        ids = encode_prompts(tok, instructions)
        t0 = time.perf_counter()
        new = generate_ids(model, tok, ids, max_new_tokens=longest, batch_size=args.batch_size, progress=True)
        gen_s = time.perf_counter() - t0
        refused_at: dict[int, list[bool]] = {}
        texts_at: dict[int, list[str]] = {}
        for b in budgets:
            texts_at[b] = [tok.decode(x[:b], skip_special_tokens=True) for x in new]
            refused_at[b] = [v == REFUSED for v in judge.classify(instructions, texts_at[b])]
        rows = {}
        for b in budgets:
            test = mcnemar(refused_at[longest], refused_at[b])
            rows[str(b)] = {
                "refused": rate_of(refused_at[b]).to_dict(),
                "changed_vs_longest": sum(x != y for x, y in zip(refused_at[b], refused_at[longest])),
                "vs_longest": test.to_dict(),
            }
        out["classes"][split] = {
            "n": len(instructions),
            "generate_seconds": round(gen_s, 1),
            "by_budget": rows,
            "examples": [[i, texts_at[longest][k]] for k, i in enumerate(instructions[:6])],
            "changed_examples": [
                [instructions[k], texts_at[budgets[0]][k], texts_at[longest][k]]
                for k in range(len(instructions))
                if refused_at[budgets[0]][k] != refused_at[longest][k]
            ][:8],
        }
        print(split, {b: rows[str(b)]["refused"]["k"] for b in budgets}, f"{gen_s:.0f} s", flush=True)
        # written after every class: a long run stopped part-way keeps what it measured
        args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
