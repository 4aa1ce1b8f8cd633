"""Run (or resume) the real tier's study in parts and record what each part cost.

The study's stages resume from ``--out``: run it with a growing ``--methods`` list (``wanda``, then
``wanda,llm-int8``, ...) and each invocation computes only the stages that are missing, then writes the
report and table for every method named so far. Each invocation appends one line to
``<out>/timings.jsonl``: the methods, wall time, the machine (CPU model, cores, torch threads, whether
bfloat16 is native), the dtype, the load average before and after, and the process's peak resident set
size (``getrusage`` high-water mark, which covers loading the GGUF, the float32 compression copy and
every stage of this invocation).

Usage:
    python scripts/run_real_study.py --out DIR [--methods wanda,llm-int8] [--model KEY] [--no-progress]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if platform.system() == "Darwin" else int(rss) * 1024


def machine_record(load_before: tuple[float, ...]) -> dict[str, object]:
    """What a timing was measured on: CPU, cores, torch threads, native bfloat16, torch version, the
    load average before (given) and now, this process's peak RSS, and the time."""
    import torch

    from refusal_core.real import cpu_has_fast_bfloat16

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_bfloat16": cpu_has_fast_bfloat16(),
        "torch": torch.__version__,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "peak_rss_bytes": peak_rss_bytes(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="study directory (stages resume from it)")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: all six)")
    parser.add_argument("--model", default=None, help="real model key (default: the tier's default)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 where the CPU has it natively")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from refusal_core.real import (
        REAL_METHODS,
        real_comparisons_table,
        real_model,
        real_results_table,
        real_study_config,
        verify_gguf,
    )
    from refusal_core.study import run_study

    spec = real_model(args.model)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else REAL_METHODS
    gguf = verify_gguf(key=spec.key)
    config = real_study_config(gguf, methods=methods, dtype=args.dtype, key=spec.key)
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    results = run_study(config, args.out / "study", progress=not args.no_progress)
    wall = time.perf_counter() - t0
    table = real_results_table(results)
    (args.out / "real_table.md").write_text(table)
    (args.out / "real_comparisons.md").write_text(real_comparisons_table(results))
    record = {
        "model": spec.title,
        "methods": list(methods),
        "wall_s": round(wall, 1),
        "stage_seconds_all_runs": results.timings.get("stage_seconds_all_runs"),
        "dtype": config.dtype,
        **machine_record(load_before),
    }
    with open(args.out / "timings.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(table)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
