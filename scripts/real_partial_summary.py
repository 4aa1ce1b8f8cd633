"""Summarise a real-tier study from its stage files, before the study has written results.json.

The study writes results.json only when every variant is evaluated. On the 1.5B the stages before
the held-out evaluation (extraction, selection, mechanism, the AIRD sweep, the repaired variants'
analyses) take hours on 2 cores, and their files already answer part of the question: how often each
model refuses the held-out harmful prompts (the mechanism stage's greedy generations, judged by the
substring judge), whether its own direction is necessary and sufficient, where its source is, and
what the validation sweep chose. This script reads those files (``--stages DIR``, a study's
``stages/``), pairs every variant with its reference on the same prompts (compressed against the
base, repaired against its compressed model; exact McNemar), and prints markdown. With ``--copy
OUT`` it also copies the small JSON files it read (no weights) so the summary can be re-derived.

Usage:
    python scripts/real_partial_summary.py --stages RUN/study/stages [--checkpoints RUN/study/checkpoints]
        [--copy fixtures/real_study/qwen1.5b/stages]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _meta(doc: Any) -> Any:
    return doc.get("meta", doc) if isinstance(doc, dict) else doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--stages", type=Path, required=True)
    parser.add_argument(
        "--checkpoints", type=Path, default=None, help="the study's checkpoints/ (repair settings)"
    )
    parser.add_argument("--copy", type=Path, default=None, help="copy the JSON files read into this folder")
    args = parser.parse_args(argv)

    from refusal_core.stats import mcnemar, minimum_detectable_change, rate_of

    stages: Path = args.stages
    variants = sorted(
        (d.name for d in stages.iterdir() if (d / "mechanism" / "mechanism.json").is_file()),
        key=lambda n: (n != "base", "+" in n, n),
    )
    read: list[Path] = []

    def load(rel: str) -> Any:
        p = stages / rel
        read.append(p)
        return _read(p)

    flags = {v: load(f"{v}/mechanism/mechanism.json") for v in variants}

    def fmt(r: Any) -> str:
        return f"{r.value:.2f} [{r.low:.2f}, {r.high:.2f}] ({r.k}/{r.n})"

    print(
        "| variant | source (fallback?) | cos@base src | refused harmful | own dir. ablated (necessity) "
        "| own dir. added to harmless (sufficiency) | against | refused: b / c, exact p "
        "| MDE (fall, 80 %) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        f = flags[v]
        sel = (
            _meta(load(f"{v}/select/selection.json"))
            if (stages / v / "select" / "selection.json").is_file()
            else {}
        )
        comp = (
            _meta(load(f"{v}/extract/comparison.json"))
            if (stages / v / "extract" / "comparison.json").is_file()
            else {}
        )
        fallback = sel.get("selected") is None
        site = sel.get("selected") or sel.get("fallback")
        source = [site[0], sel["positions"][site[1]]] if site else comp.get("other_source", "?")
        cos = comp.get("cosine_at_base_source", 1.0 if v == "base" else None)
        ref = None if v == "base" else ("base" if "+" not in v else v.split("+")[0])
        paired = mde = "–"
        if ref is not None:
            t = mcnemar(flags[ref]["refused_harmful"], f["refused_harmful"])
            paired = f"{ref}: {t.b} / {t.c}, p = {t.p_value:.2g}{' *' if t.significant else ''}"
            # a compressed model: did refusal fall (reverse moves c)? a repair: did it rise (reverse b)?
            reverse = (t.c if ref == "base" else t.b) / t.n
            m = minimum_detectable_change(t.n, min(0.5, reverse))
            mde = "–" if m is None else f"{m:.2f}"
        print(
            f"| {v} | {tuple(source)} {'†' if fallback else ''} | {'–' if cos is None else f'{cos:.3f}'} "
            f"| {fmt(rate_of(f['refused_harmful']))} | {fmt(rate_of(f['refused_ablated']))} "
            f"| {fmt(rate_of(f['refused_added']))} | {ref or '–'} | {paired} | {mde} |"
        )
    evaluated = [v for v in variants if (stages / "eval" / v / "evaluation.json").is_file()]
    if evaluated:
        evals = {v: load(f"eval/{v}/evaluation.json") for v in evaluated}
        attacks = sorted(evals[evaluated[0]]["jailbroken"])
        print(
            "\nHeld-out evaluation (the variants whose evaluation stage is complete; `*`: exact McNemar "
            "p < 0.05 against the reference named, b / c = prompts leaving / entering the rate):\n"
        )
        cols = [f"ASR {a}" for a in attacks] + ["over-refusal (harmless)"]
        print("| variant | vs | " + " | ".join(cols) + " |")
        print("|---|---|" + "---|" * len(cols))
        for v in evaluated:
            ref = None if v == "base" else ("base" if "+" not in v else v.split("+")[0])
            ref = ref if ref in evals else None
            cells = []
            for _key, flag in [
                *((a, ("jailbroken", a)) for a in attacks),
                ("over", ("refused_harmless", None)),
            ]:
                now = evals[v][flag[0]] if flag[1] is None else evals[v][flag[0]][flag[1]]
                cell = fmt(rate_of(now))
                if ref is not None:
                    before = evals[ref][flag[0]] if flag[1] is None else evals[ref][flag[0]][flag[1]]
                    t = mcnemar(before, now)
                    cell += f", {t.b} / {t.c}, p = {t.p_value:.2g}{' *' if t.significant else ''}"
                cells.append(cell)
            print(f"| {v} | {ref or '–'} | " + " | ".join(cells) + " |")
    for v in variants:
        sweep = stages / v / "sweep" / "sweep.json"
        if not sweep.is_file():
            continue
        doc = load(f"{v}/sweep/sweep.json")
        points = doc["points"] if isinstance(doc, dict) else doc
        print(f"\nAIRD sweep of {v} (validation prompts only; refusal-score verdicts):\n")
        print(
            "| strength | arm | placement | gains (attn, mlp) | compliance | over-refusal | KL(base‖edit) |"
        )
        print("|---|---|---|---|---|---|---|")
        for p in points:
            s = p["scores"]
            g = p["gains"]
            print(
                f"| {p['strength']} | {'sparse' if p['sparse'] else 'dense'} "
                f"| {p.get('edit', 'source-block')} "
                f"| ({g[0]:.2f}, {g[1]:.2f}) | {s['compliance']['value']:.3f} ({s['compliance']['k']}/"
                f"{s['compliance']['n']}) | {s['over_refusal']['value']:.3f} | {s['kl']:.3f} |"
            )
    if args.checkpoints is not None:
        print("\nRepaired variants (from each checkpoint's record):\n")
        for d in sorted(args.checkpoints.iterdir()):
            rec = args.checkpoints / d.name / "refusal_core.json"
            if not rec.is_file():
                continue
            read.append(rec)
            aird = _read(rec)["settings"]["aird"]
            edit = aird["edits"][0]
            mods = {k: (round(m["gain"], 3), m["alpha"]) for k, m in edit["modules"].items()}
            print(
                f"- {d.name}: blocks {aird['layers']}, placement {aird.get('placement', 'source-block')}, "
                f"(gain, α) per writer {mods}, sparsity lost {edit['repair']['sparsity_lost']}"
            )
    if args.copy is not None:
        for p in read:
            rel = (
                p.relative_to(stages)
                if p.is_relative_to(stages)
                else Path("checkpoints") / p.parent.name / p.name
            )
            dest = args.copy / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
