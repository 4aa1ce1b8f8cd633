"""Run (or resume) the real tier's compression frontiers and calibration comparison (issue 16).

Three parts, each resumable stage by stage from ``--out``, run in the order given by ``--parts``:

- ``wanda``: ``refusal-core frontier --method wanda`` over ``--wanda-levels`` (``<out>/wanda``);
- ``gguf``: the GGUF family over ``--gguf-levels`` (``<out>/gguf``);
- ``calibration``: Wanda at ``--calibration-level`` with each of ``--calibrations``
  (``<out>/calibration``).

Every part uses the real study's settings (:func:`refusal_core.real.real_study_config`: 128 + 128
extraction prompts, 98 + 98 held-out test prompts, 64 new tokens, greedy plus one sampling
configuration, no GCG) with the AIRD repairs off (``repairs=False``: the sweep and three evaluated
repairs per level would cost more than the level itself). The base model's stages are computed once:
the first part to run computes them and every later part (and every calibration set) is seeded with
them (:func:`refusal_core.frontier.seed_stages`; a seeded stage is used only when its key and files
verify). ``--seed-from`` names an earlier real study directory whose base stages (and the Wanda 50 %
compression, as ``wanda@0.5``) are offered the same way.

Each part appends one line to ``<out>/timings.jsonl``: the part, its levels, wall time, the machine,
dtype, load average before and after, and the process's peak resident set size.

Usage:
    python scripts/real_frontier.py --out DIR [--parts wanda,calibration,gguf] [--seed-from STUDY_DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_real_study import machine_record

BASE_STAGES = ("base", "eval/base")
PARTS = ("wanda", "calibration", "gguf")


def _record(
    out: Path, part: str, detail: dict[str, object], wall: float, load_before: tuple[float, ...]
) -> None:
    record = {"part": part, **detail, "wall_s": round(wall, 1), **machine_record(load_before)}
    with open(out / "timings.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=2), flush=True)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="output directory (parts resume from it)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
    parser.add_argument("--wanda-levels", default="0.3,0.4,0.5")
    parser.add_argument("--gguf-levels", default="q8_0,q4_0")
    parser.add_argument("--calibration-level", default="0.5", help="the Wanda sparsity compared")
    parser.add_argument("--calibrations", default="harmless,harmful", help="the first is the reference")
    parser.add_argument("--seed-from", type=Path, default=None, help="an earlier real study's directory")
    parser.add_argument("--model", default=None, help="real model key (default: the tier's default)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 where the CPU has it natively")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    parts = _csv(args.parts)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        parser.error(f"--parts takes names from {PARTS}, got {args.parts!r}")

    from refusal_core.frontier import compare_calibrations, frontier_levels, run_frontier, seed_stages
    from refusal_core.real import real_model, real_study_config, verify_gguf

    spec = real_model(args.model)
    gguf = verify_gguf(key=spec.key)
    config = dataclasses.replace(
        real_study_config(gguf, dtype=args.dtype, key=spec.key), repairs=False, save_checkpoints=False
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    wanda_levels, gguf_levels = _csv(args.wanda_levels), _csv(args.gguf_levels)
    frontier_levels("wanda", wanda_levels)  # bad levels fail before the model loads
    frontier_levels("gguf", gguf_levels)
    cal_method = f"wanda@{args.calibration_level}"
    calibrations = _csv(args.calibrations)

    # every study directory this run may hold, in the order they are made; each is seeded from all
    studies = {"wanda": out / "wanda" / "study", "gguf": out / "gguf" / "study"}
    sources: list[Path] = [args.seed_from] if args.seed_from is not None else []

    def seed(dst: Path, extra: tuple[str | tuple[str, str], ...] = ()) -> None:
        for src in [*sources, *studies.values()]:
            if src.resolve() != dst.resolve() and (src / "stages").is_dir():
                got = seed_stages(src, dst, (*BASE_STAGES, *extra))
                if got:
                    print(f"seeded {len(got)} stage(s) of {dst} from {src}: {got}", flush=True)

    for part in parts:
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        if part in ("wanda", "gguf"):
            levels = wanda_levels if part == "wanda" else gguf_levels
            # the earlier real study's Wanda (50 %) is this frontier's wanda@0.5 when its key verifies
            seed(studies[part], (("wanda", "wanda@0.5"),) if part == "wanda" else ())
            doc = run_frontier(config, part, levels, out / part, progress=not args.no_progress)
            detail: dict[str, object] = {"levels": levels, "answer": doc["answer"]}
        else:
            cal_dir = out / "calibration"
            study0 = cal_dir / f"cal-0-{calibrations[0]}"
            # the reference set at this level is the Wanda frontier's level: its stages carry over
            seed(study0, (cal_method, f"eval/{cal_method}"))
            doc = compare_calibrations(
                config, cal_method, calibrations, cal_dir, progress=not args.no_progress
            )
            detail = {"method": cal_method, "calibrations": calibrations}
        _record(out, part, detail, time.perf_counter() - t0, load_before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
