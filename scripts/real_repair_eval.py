"""Finish the 1.5B study's Wanda part: the held-out evaluation of its three AIRD repairs.

The first part of the real study (``fixtures/real_study/qwen1.5b/partial``) measured the base, Wanda
50 % and the three repaired variants' mechanism, and evaluated the base and Wanda on the held-out
prompts; the run directory holding the repaired models was lost with its machine before their
evaluation. This script rebuilds exactly those models with the study's own steps and settings
(:func:`refusal_core.real.real_study_config`, the same :class:`~refusal_core.bench.Bench` stages) and
evaluates them, then pairs every result with the committed base and Wanda evaluations prompt by
prompt. It proves the rebuild before using it:

- the base's selected source must equal the committed selection's;
- the Wanda model's ``weights_sha256`` must equal the identity recorded in the committed Wanda
  evaluation;
- each repaired variant is built from its committed checkpoint record (blocks, placement, gains) and
  its saved ``model.safetensors`` must hash to the committed record's; otherwise nothing is evaluated.

Wanda's KL and cross-entropy against the base (not in the committed files) are computed here on the
same prompts. Stages resume from ``--out``; results go to ``<out>/repairs_eval.json`` and ``.md``.

Usage:
    python scripts/real_repair_eval.py --out DIR [--variants 'wanda+aird*,wanda+aird-sparse*,wanda+aird']
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

PARTIAL = Path(__file__).resolve().parents[1] / "fixtures" / "real_study" / "qwen1.5b" / "partial" / "files"
ATTACKS = ("vanilla", "vanilla_system", "decoding")


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def committed_eval(name: str) -> dict[str, Any]:
    """A committed evaluation's per-prompt flags (ASR per attack, over-refusal) read from its files."""
    d = PARTIAL / "eval" / name
    out: dict[str, Any] = {
        "jailbroken": {
            a: [bool(r["jailbroken"]) for r in _json(d / f"asr_{a}.json")["records"]] for a in ATTACKS
        },
        # over_refusal.json marks a harmless prompt answered (not refused) as "jailbroken"
        "refused_harmless": [not r["jailbroken"] for r in _json(d / "over_refusal.json")["records"]],
        "model": _json(d / "asr_vanilla.json")["model"],
    }
    return out


def plan_from_record(record: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The RepairPlan a committed checkpoint record describes (one edit config, its blocks, placement)."""
    from refusal_core.aird import AirdConfig
    from refusal_core.bench import RepairPlan

    aird = record["settings"]["aird"]
    configs = {json.dumps(e["config"], sort_keys=True) for e in aird["edits"]}
    if len(configs) != 1:
        raise SystemExit(f"expected one AIRD config per variant, got {len(configs)}")
    cfg = AirdConfig(**json.loads(configs.pop()))
    placement = aird.get("placement", "source-block")
    layers = tuple(aird.get("source_layers", aird["layers"]))
    return RepairPlan(cfg, layers, placement), aird


MEASURES = (*ATTACKS, "over_refusal")


def _cell(k: int, n: int) -> str:
    from refusal_core.stats import rate

    r = rate(k, n)
    return f"{r.value:.2f} [{r.low:.2f}, {r.high:.2f}] ({k}/{n})"


def render(doc: dict[str, Any]) -> str:
    """A markdown table: every rate with its Wilson interval, every repair against Wanda and the base
    (b / c discordant pairs, exact McNemar p, Holm-adjusted over every test in the table)."""
    holm = {(h["variant"], h["against"], h["measure"]): h["p_holm"] for h in doc["holm"]}
    head = "| variant | " + " | ".join(
        f"{m} (ASR)" if m != "over_refusal" else "over-refusal" for m in MEASURES
    )
    lines = [
        head + " | KL(base‖·) mean |",
        "|---|" + "---|" * (len(MEASURES) + 1),
    ]
    for ref in ("base", "wanda"):
        rates = doc[ref]["rates"]
        cells = [_cell(*rates[m]) for m in MEASURES]
        lines.append(f"| {ref} | " + " | ".join(cells) + f" | {doc[ref]['kl_mean']:.3f} |")
    for v, e in doc["variants"].items():
        cells = []
        for m in MEASURES:
            text = _cell(*e["rates"][m])
            for ref in ("wanda", "base"):
                t = e[f"vs_{ref}"]["over_refusal" if m == "over_refusal" else "asr"]
                t = t if m == "over_refusal" else t[m]
                q = holm[(v, ref, m)]
                star = " *" if q < 0.05 else ""
                text += f"<br>vs {ref}: {t['b']} / {t['c']}, p = {t['p_value']:.2g}, Holm {q:.2g}{star}"
            cells.append(text)
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {e['kl_mean']:.3f} |")
    notes = [
        "",
        "n = 98 held-out prompts per rate (harmful for ASR, harmless for over-refusal); value [95 % Wilson",
        "interval] (k/n). b / c: prompts that went from jailbroken (or refused) to not, and the reverse,",
        "against the named model on the same prompts; exact McNemar p; Holm over every test in this table;",
        "* significant at 0.05 after Holm.",
    ]
    from refusal_core.stats import minimum_detectable_change

    for v, e in doc["variants"].items():
        for ref in ("wanda", "base"):
            for key in ("kl", "ce"):
                d = e[f"vs_{ref}"].get(key)
                if d:
                    sig = "significant" if d["significant"] else "not significant"
                    notes.append(
                        f"- {v} vs {ref}, {key}: mean {d['before_mean']:.4f} -> {d['after_mean']:.4f}, "
                        f"difference {d['difference']:.4f} [{d['low']:.4f}, {d['high']:.4f}] "
                        f"(paired bootstrap, n = {d['n']}): {sig}"
                    )
        # the smallest change each test could see with 80 % power, in the direction that matters:
        # an ASR fall against Wanda (reverse moves: rises, c), an over-refusal rise (reverse: b)
        for m in MEASURES:
            t = e["vs_wanda"]["over_refusal" if m == "over_refusal" else "asr"]
            t = t if m == "over_refusal" else t[m]
            reverse = (t["b"] if m == "over_refusal" else t["c"]) / t["n"]
            mde = minimum_detectable_change(t["n"], p_down=min(reverse, 0.5))
            what = "rise" if m == "over_refusal" else "fall"
            notes.append(
                f"- {v} vs wanda, {m}: smallest detectable {what} {mde if mde is None else round(mde, 3)}"
            )
    return "\n".join(lines + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default="wanda+aird*,wanda+aird-sparse*,wanda+aird")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--render", action="store_true", help="only write <out>/repairs_eval.md from the JSON"
    )
    args = parser.parse_args(argv)
    if args.render:
        doc = json.loads((args.out / "repairs_eval.json").read_text(encoding="utf-8"))
        (args.out / "repairs_eval.md").write_text(render(doc), encoding="utf-8")
        return 0

    from refusal_core import bench as steps
    from refusal_core.bench import Bench
    from refusal_core.checkpoint import save_checkpoint
    from refusal_core.model import model_identity
    from refusal_core.real import real_study_config, verify_gguf
    from refusal_core.saving import settings_key
    from refusal_core.stats import holm
    from refusal_core.study.results import Comparison

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    records = {v: _json(PARTIAL / "checkpoints" / v / "refusal_core.json") for v in variants}
    gguf = verify_gguf()
    config = real_study_config(gguf, methods=("wanda",))
    t0 = time.perf_counter()
    bench = Bench(config, args.out / "study", progress=not args.no_progress)
    timings: dict[str, float] = {}

    base = steps.base_direction(bench)
    committed_site = _json(PARTIAL / "base" / "select" / "selection.json")["meta"]["source_site"]
    if [base.layer, base.position] != committed_site:
        raise SystemExit(
            f"base source ({base.layer}, {base.position}) differs from the committed {committed_site}"
        )
    print(f"base source ({base.layer}, {base.position}) equals the committed selection's")
    compressed = steps.compress(bench, "wanda")
    wanda_id = model_identity(compressed.model)
    committed = {"base": committed_eval("base"), "wanda": committed_eval("wanda")}
    if wanda_id["weights_sha256"] != committed["wanda"]["model"]["weights_sha256"]:
        raise SystemExit(
            f"rebuilt Wanda model differs from the evaluated one: {wanda_id['weights_sha256']} vs "
            f"{committed['wanda']['model']['weights_sha256']}"
        )
    print("Wanda model rebuilt bit for bit (weights_sha256 matches the committed evaluation)")
    base_eval = _json(PARTIAL / "eval" / "base" / "evaluation.json")
    if base_eval["refused_harmless"] != committed["base"]["refused_harmless"]:
        raise SystemExit("over_refusal.json records do not give the evaluation's refused_harmless")
    committed["base"] |= {"damage": base_eval["damage"]}
    completions = steps._base_test_completions(bench)
    committed["wanda"] |= {"damage": steps._damage(bench, compressed.model, completions)}

    evals: dict[str, dict[str, Any]] = {}
    checks: dict[str, Any] = {}
    for v in variants:
        plan, aird = plan_from_record(records[v])
        t = time.perf_counter()
        model, rec = steps.repaired(bench, compressed.model, base.r, plan, method="wanda")
        target = args.out / "checkpoints" / v
        record = {  # the study's own checkpoint record (study.run._save_checkpoint)
            "operation": "study",
            "method": "wanda+aird",
            "aird": rec,
            "compression": compressed.record.to_dict(),
            "source_model": config.model,
            "refusal_token_ids": bench.refusal_ids,
        }
        save_checkpoint(
            model, bench.tokenizer, target, record=record, base_identity=bench.identity, overwrite=True
        )
        sha = hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest()
        want = records[v]["files"]["model.safetensors"]
        checks[v] = {"model_safetensors_sha256": sha, "matches_committed": sha == want}
        if sha != want:
            raise SystemExit(f"{v}: rebuilt weights differ from the committed checkpoint ({sha} vs {want})")
        print(f"{v}: rebuilt bit for bit ({aird.get('placement', 'source-block')}, blocks {rec['layers']})")
        evals[v], _ = steps.evaluate(
            bench, v, model, [settings_key(plan.key_settings(), compressed.key, base.key)]
        )
        timings[v] = time.perf_counter() - t
        del model

    out: dict[str, Any] = {"variants": {}, "checks": checks, "timings_s": timings}
    raw_p: list[tuple[str, str, str, float]] = []
    for v, ev in evals.items():
        entry: dict[str, Any] = {}
        for ref in ("wanda", "base"):
            comp = Comparison.between(ev, committed[ref], kl=ref != "base").to_dict()
            entry[f"vs_{ref}"] = comp
            for attack, test in comp["asr"].items():
                raw_p.append((v, ref, attack, test["p_value"]))
            raw_p.append((v, ref, "over_refusal", comp["over_refusal"]["p_value"]))
        entry["rates"] = {
            **{a: [sum(f), len(f)] for a, f in ev["jailbroken"].items()},
            "over_refusal": [sum(ev["refused_harmless"]), len(ev["refused_harmless"])],
        }
        entry["kl_mean"] = sum(ev["damage"]["kl_per_prompt"]) / len(ev["damage"]["kl_per_prompt"])
        entry["degenerate"] = ev["degenerate"]
        out["variants"][v] = entry
    for ref in ("base", "wanda"):
        ev = committed[ref]
        out[ref] = {
            "rates": {
                **{a: [sum(f), len(f)] for a, f in ev["jailbroken"].items()},
                "over_refusal": [sum(ev["refused_harmless"]), len(ev["refused_harmless"])],
            },
            "kl_mean": sum(ev["damage"]["kl_per_prompt"]) / len(ev["damage"]["kl_per_prompt"]),
        }
    adjusted = holm([p for *_, p in raw_p])
    out["holm"] = [
        {"variant": v, "against": ref, "measure": m, "p": p, "p_holm": q}
        for (v, ref, m, p), q in zip(raw_p, adjusted, strict=True)
    ]
    out["seconds"] = time.perf_counter() - t0
    (args.out / "repairs_eval.json").write_text(json.dumps(out, indent=1, allow_nan=False) + "\n")
    (args.out / "repairs_eval.md").write_text(render(out), encoding="utf-8")
    print(json.dumps(out["holm"], indent=0)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
