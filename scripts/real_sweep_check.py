"""Re-run the 1.5B study's Wanda AIRD sweep with today's sweep and compare it with the committed one.

The sweep now edits the compressed model in place and undoes each point (``scoped_edit``) instead of
scoring a deep copy per point, and checks finiteness with one reduction per tensor. This script runs
the whole 20-point sweep again on the rebuilt Wanda model (stages of ``--out`` from
``real_repair_eval.py``: the base direction and the Wanda weights load from there), requires every
point's validation scores to equal the committed ``sweep.json``'s exactly, and times a few points
both ways in the same run: the old way (a repaired deep copy with the edit's identity records) and
the new one. Writes ``<out>/sweep_check.json``.

Usage:
    python scripts/real_sweep_check.py --out DIR [--timed-points 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SWEEP = (
    Path(__file__).resolve().parents[1]
    / "fixtures"
    / "real_study"
    / "qwen1.5b"
    / "partial"
    / "files"
    / "wanda"
    / "sweep"
    / "sweep.json"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timed-points", type=int, default=3)
    args = parser.parse_args(argv)

    from refusal_core import bench as steps
    from refusal_core.bench import Bench
    from refusal_core.compression import scoped_edit
    from refusal_core.model import get_layout
    from refusal_core.real import real_study_config, verify_gguf

    committed = json.loads(SWEEP.read_text(encoding="utf-8"))["points"]
    bench = Bench(real_study_config(verify_gguf(), methods=("wanda",)), args.out / "study")
    base = steps.base_direction(bench)
    comp = steps.compress(bench, "wanda")
    t0 = time.perf_counter()
    points = steps.sweep(
        bench, "wanda-recheck", comp.model, base, base.layer, ["recheck"], sparse_arm=True, method="wanda"
    )
    sweep_s = time.perf_counter() - t0
    got = [p.to_dict() for p in points]
    mismatches = [
        {"index": i, "committed": c["scores"], "now": g["scores"]}
        for i, (c, g) in enumerate(zip(committed, got, strict=True))
        if c["scores"] != g["scores"] or c["gains"] != g["gains"] or c.get("edit") != g.get("edit")
    ]
    # the same points timed both ways, interleaved, in this run
    plans = [
        p for s in (False, True) for _, _, p in steps.sweep_plans(bench.config, s, base.layer, base.layer)
    ]
    blocks = get_layout(comp.model).blocks
    timings: dict[str, list[float]] = {"copy": [], "scoped": []}
    for plan in plans[: args.timed_points]:
        t = time.perf_counter()
        edited, _ = steps.repaired(bench, comp.model, base.r, plan, method="wanda")
        a = steps.validation_scores(bench, edited)
        timings["copy"].append(time.perf_counter() - t)
        del edited
        t = time.perf_counter()
        with scoped_edit([blocks[b] for b in plan.edit_blocks]):
            steps._apply_plan_(
                bench, comp.model, base.r, plan, method="wanda", compression=None, check_origin=False
            )
            b = steps.validation_scores(bench, comp.model)
        timings["scoped"].append(time.perf_counter() - t)
        if a != b:
            mismatches.append({"plan": str(plan), "copy": a.to_dict(), "scoped": b.to_dict()})
    out: dict[str, Any] = {
        "points": len(got),
        "identical_to_committed": not mismatches,
        "mismatches": mismatches,
        "sweep_seconds": sweep_s,
        "point_seconds": timings,
        "load_average": list(os.getloadavg()),
    }
    (args.out / "sweep_check.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in out.items() if k != "mismatches"}, indent=1))
    return 0 if not mismatches else 1


if __name__ == "__main__":
    raise SystemExit(main())
