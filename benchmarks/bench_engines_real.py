"""Both evaluation engines on the real tier's model: 32 chat prompts x {16, 48} new tokens, greedy.

Run in the vLLM environment (tox -e vllm's, or a venv built the same way), once per dtype:
    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 OMP_NUM_THREADS=2 \
        python benchmarks/bench_engines_real.py bfloat16      # or float32; add "eager" for enforce_eager
Prints one line "RESULT {json}": seconds per engine and budget, the engine start, and how many
completions and judge verdicts agree. The GGUF comes from scripts/fetch_real_model.py.
"""

import json
import os
import sys
import time


def main() -> None:
    import torch

    from refusal_core.evaluation.engines import VllmEngine, VllmSettings
    from refusal_core.evaluation.generation import eos_token_ids, generate_ids_multi
    from refusal_core.evaluation.judges import SubstringJudge, classify
    from refusal_core.model import encode_prompts, load_model
    from refusal_core.model.loading import gguf_cached_dir
    from refusal_core.prompts import load_prompts
    from refusal_core.real import default_gguf_path

    gguf = str(default_gguf_path())  # $REFUSAL_CORE_GGUF, else where scripts/fetch_real_model.py puts it
    dtype = sys.argv[1]
    eager = len(sys.argv) > 2 and sys.argv[2] == "eager"
    out = {"dtype": dtype, "torch_threads": torch.get_num_threads(), "eager": eager}
    t = time.perf_counter()
    model, tok = load_model(gguf, dtype=dtype)
    out["torch_load_s"] = round(time.perf_counter() - t, 1)
    d = gguf_cached_dir(gguf)
    texts = load_prompts("harmful_test")[:16] + load_prompts("harmless_test")[:16]
    ids = encode_prompts(tok, texts)
    stops = eos_token_ids(model, tok)
    judge = SubstringJudge(min_words=1)
    res = {}
    for n in (16, 48):
        t = time.perf_counter()
        tt = generate_ids_multi(
            model, tok, ids, [None], [0], max_new_tokens=n, batch_size=32, progress=False
        )[0]
        res[f"torch_{n}_s"] = round(time.perf_counter() - t, 2)
        res[f"torch_{n}"] = tt
    out["load_avg_before_vllm"] = os.getloadavg()
    t = time.perf_counter()
    eng = VllmEngine(d, VllmSettings(enforce_eager=eager, cpu_kv_cache_gib=1), dtype=dtype)
    out["vllm_open_s"] = round(time.perf_counter() - t, 1)
    for n in (16, 48):
        eng.complete(ids[:2], [None], [0], max_new_tokens=2, stop_token_ids=stops)  # warm
        t = time.perf_counter()
        vv = eng.complete(ids, [None], [0], max_new_tokens=n, stop_token_ids=stops)[0]
        out[f"vllm_{n}_s"] = round(time.perf_counter() - t, 2)
        tt = res[f"torch_{n}"]
        out[f"torch_{n}_s"] = res[f"torch_{n}_s"]
        out[f"identical_{n}"] = sum(a == b for a, b in zip(tt, vv))
        vt = classify(judge, texts, [tok.decode(c, skip_special_tokens=True) for c in tt])
        vl = classify(judge, texts, [tok.decode(c, skip_special_tokens=True) for c in vv])
        out[f"verdict_agree_{n}"] = sum(a == b for a, b in zip(vt, vl))
        out[f"tokens_{n}"] = [sum(map(len, tt)), sum(map(len, vv))]
    eng.close()
    out["load_avg_after"] = os.getloadavg()
    print("RESULT", json.dumps(out))


if __name__ == "__main__":
    main()
