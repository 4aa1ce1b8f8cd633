"""The ``refusal-core`` command line.

``refusal-core study`` runs the whole experiment (on the embedded toy model by
default); ``extract``, ``compress``, ``compare``, ``aird`` and ``evaluate`` run
one step each on any supported local model (a Hugging Face directory, a
``.gguf`` file, or ``toy``). ``--method`` on a step compresses the model in
memory first, deterministically, so every step can work on any variant.
Errors of refusal_core print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from refusal_core.errors import RefusalCoreError

__all__ = ["main"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="toy", help="'toy', a local HF model directory, or a .gguf file")
    p.add_argument(
        "--method",
        default=None,
        help="compress the model in memory first (e.g. wanda, wanda-2:4, magnitude@0.3, llm-int8, awq-w4)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _parser() -> argparse.ArgumentParser:
    from refusal_core.compression import METHODS
    from refusal_core.study import DEFAULT_METHODS

    top = argparse.ArgumentParser(
        prog="refusal-core",
        description="Did compressing this model break its refusal direction, and can AIRD repair it?",
    )
    sub = top.add_subparsers(dest="command", required=True)

    s = sub.add_parser("study", help="run (or resume) the whole study and write a report")
    _add_model_args(s)
    s.add_argument("--out", default="runs/study", help="run directory (artifacts, report.md, plots)")
    s.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated compression methods (known: {', '.join(METHODS)}; pruning takes @SPARSITY)",
    )
    s.add_argument("--n-train", type=int, default=128, help="prompts per class for extraction")
    s.add_argument("--n-val", type=int, default=32, help="prompts per class for selection")
    s.add_argument("--n-test", type=int, default=64, help="prompts per class for evaluation")
    s.add_argument("--harmful-train", default="harmful_train", help="built-in split name or file")
    s.add_argument("--harmless-train", default="harmless_train")
    s.add_argument("--harmful-val", default="harmful_val")
    s.add_argument("--harmless-val", default="harmless_val")
    s.add_argument("--harmful-test", default="harmful_test")
    s.add_argument("--harmless-test", default="harmless_test")
    s.add_argument("--alpha-attn", type=float, default=0.02, help="AIRD alpha at o_proj (paper: 0.02)")
    s.add_argument("--alpha-mlp", type=float, default=0.01, help="AIRD alpha at down_proj (paper: 0.01)")
    s.add_argument("--aird-normalize", action="store_true", help="AIRD with the unit direction")
    s.add_argument("--gcg-steps", type=int, default=None, help="GCG steps (0 disables GCG)")
    s.add_argument("--tasks", default=None, help="comma-separated zero-shot tasks ('' for none)")
    s.add_argument("--max-new-tokens", type=int, default=24)
    s.add_argument("--batch-size", type=int, default=32)

    e = sub.add_parser("extract", help="candidate directions (and the selected one) of a model")
    _add_model_args(e)
    e.add_argument("--harmful", default="harmful_train")
    e.add_argument("--harmless", default="harmless_train")
    e.add_argument("--n", type=int, default=128, help="prompts per class")
    e.add_argument("--select", action="store_true", help="also score and select among the candidates")
    e.add_argument("--out", required=True, help="directory for candidates(.json/.safetensors)")

    c = sub.add_parser("compress", help="compress a model and save its weights and record")
    _add_model_args(c)
    c.add_argument("--out", required=True)

    m = sub.add_parser("compare", help="compare two saved candidate sets")
    m.add_argument("--base", required=True, help="directory written by 'extract' for the base model")
    m.add_argument("--other", required=True, help="directory written by 'extract' for the other model")

    a = sub.add_parser("aird", help="apply AIRD with a saved direction and save the edited weights")
    _add_model_args(a)
    a.add_argument("--direction", required=True, help="directory written by 'extract --select'")
    a.add_argument("--alpha-attn", type=float, default=0.02)
    a.add_argument("--alpha-mlp", type=float, default=0.01)
    a.add_argument("--normalize", action="store_true")
    a.add_argument("--preserve-sparsity", action="store_true")
    a.add_argument("--out", required=True)

    v = sub.add_parser("evaluate", help="ASR per attack and over-refusal of a model")
    _add_model_args(v)
    v.add_argument("--weights", default=None, help="a weights.safetensors written by 'aird' or 'compress'")
    v.add_argument("--n-test", type=int, default=64)
    v.add_argument("--gcg-steps", type=int, default=0)
    v.add_argument("--out", required=True)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        handler = globals()[f"_cmd_{args.command}"]
        return int(handler(args))
    except RefusalCoreError as exc:
        print(f"refusal-core: error: {exc}", file=sys.stderr)
        return 2


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _cmd_study(args: argparse.Namespace) -> int:
    from refusal_core.aird import AirdConfig
    from refusal_core.study import StudyConfig, run_study

    cfg = StudyConfig(
        model=args.model,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        harmful_train=args.harmful_train,
        harmless_train=args.harmless_train,
        harmful_val=args.harmful_val,
        harmless_val=args.harmless_val,
        harmful_test=args.harmful_test,
        harmless_test=args.harmless_test,
        aird=AirdConfig(alpha_attn=args.alpha_attn, alpha_mlp=args.alpha_mlp, normalize=args.aird_normalize),
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    if args.gcg_steps is not None:
        cfg = replace(cfg, attacks=replace(cfg.attacks, gcg_steps=args.gcg_steps))
    if args.tasks is not None:
        cfg = replace(cfg, zero_shot_tasks=tuple(t for t in args.tasks.split(",") if t))
    results = run_study(cfg, Path(args.out), progress=not args.no_progress)
    _print_summary(results)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _print_summary(results: dict[str, Any]) -> None:
    from refusal_core.report import markdown_table

    attacks = sorted({a for v in results["variants"] for a in v.get("asr", {})})
    rows = [
        [
            v["name"],
            v.get("source"),
            v.get("cosine_at_base_source"),
            *[v.get("asr", {}).get(a) for a in attacks],
            v.get("over_refusal"),
        ]
        for v in results["variants"]
    ]
    print(
        markdown_table(
            ["variant", "source", "cos@base", *[f"ASR {a}" for a in attacks], "over-refusal"], rows
        )
    )
    print(f"total: {results['timings']['total_seconds']:.1f} s")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from refusal_core.study import load_variant_model

    torch.manual_seed(args.seed)
    return load_variant_model(args.model, args.method)


def _cmd_extract(args: argparse.Namespace) -> int:
    from refusal_core.directions import extract_candidates
    from refusal_core.prompts import load_prompts

    harmful, harmless = load_prompts(args.harmful)[: args.n], load_prompts(args.harmless)[: args.n]
    model, tok = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cands = extract_candidates(model, tok, harmful, harmless, progress=not args.no_progress)
    cands.save(out / "candidates")
    summary: dict[str, Any] = {"candidates": str(out / "candidates"), "shape": list(cands.directions.shape)}
    if args.select:
        from refusal_core.selection import select_direction
        from refusal_core.study import default_refusal_token_ids as _refusal_ids

        sel = select_direction(
            model,
            tok,
            cands,
            load_prompts("harmful_val")[:32],
            load_prompts("harmless_val")[:32],
            _refusal_ids(args.model, tok),
            progress=not args.no_progress,
        )
        sel.save(out / "selection")
        summary |= {
            "selected": sel.selected,
            "fallback": sel.fallback,
            "source_position": sel.source_position,
        }
    _print(summary)
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from refusal_core.activations import encode_prompts
    from refusal_core.artifacts import save_model_weights
    from refusal_core.compression import compress_, method_config
    from refusal_core.models import load_model
    from refusal_core.prompts import load_prompts

    if not args.method:
        from refusal_core.errors import InvalidArgumentError

        raise InvalidArgumentError("compress needs --method")
    cfg = method_config(args.method)
    model, tok = load_model(args.model)
    calib = encode_prompts(tok, load_prompts("harmless_train")[:64])
    record = compress_(model, cfg, calib, progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_model_weights(model, out / "weights.safetensors")
    record.save(out / "record")
    _print({"sparsity": record.sparsity, "method": record.method, "out": str(out)})
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from refusal_core.directions import DirectionCandidates, compare_candidates
    from refusal_core.selection import SelectionResult

    base = DirectionCandidates.load(Path(args.base) / "candidates")
    other = DirectionCandidates.load(Path(args.other) / "candidates")
    bsel = SelectionResult.load(Path(args.base) / "selection")
    osel_path = Path(args.other) / "selection.json"
    osel = SelectionResult.load(Path(args.other) / "selection") if osel_path.exists() else None
    bl, bi = bsel.source
    other_src = (osel.source[0], osel.positions[osel.source[1]]) if osel else None
    cmp = compare_candidates(base, other, base_source=(bl, bsel.positions[bi]), other_source=other_src)
    _print(
        {
            "cosine_at_base_source": cmp.cosine_at_base_source,
            "cosine_selected": cmp.selected_cosine,
            "source_shift": cmp.source_shift,
            "per_site_cosine": cmp.per_site_cosine.tolist(),
        }
    )
    return 0


def _cmd_aird(args: argparse.Namespace) -> int:
    from refusal_core.aird import AirdConfig, apply_aird_
    from refusal_core.artifacts import save_model_weights
    from refusal_core.directions import DirectionCandidates
    from refusal_core.selection import SelectionResult

    cands = DirectionCandidates.load(Path(args.direction) / "candidates")
    sel = SelectionResult.load(Path(args.direction) / "selection")
    layer, pi = sel.source
    cfg = AirdConfig(
        alpha_attn=args.alpha_attn,
        alpha_mlp=args.alpha_mlp,
        normalize=args.normalize,
        preserve_sparsity=args.preserve_sparsity,
    )
    model, _ = _load(args)
    record = apply_aird_(model, cands.directions[layer, pi].float(), layer, cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_model_weights(model, out / "weights.safetensors")
    record.save(out / "aird.json")
    _print(record.to_dict())
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from refusal_core.errors import ArtifactError
    from refusal_core.evaluation.attacks import GcgAttack, VanillaAttack, evaluate_asr, over_refusal
    from refusal_core.evaluation.judges import SubstringJudge
    from refusal_core.prompts import load_prompts

    model, tok = _load(args)
    if args.weights:
        from safetensors.torch import load_file

        try:
            model.load_state_dict(load_file(args.weights), strict=True)
        except Exception as exc:
            raise ArtifactError(f"weights {args.weights} do not load into this model: {exc}") from exc
    harmful = load_prompts("harmful_test")[: args.n_test]
    harmless = load_prompts("harmless_test")[: args.n_test]
    attacks: list[Any] = [VanillaAttack(max_new_tokens=24)]
    if args.gcg_steps > 0:
        attacks.append(
            GcgAttack(n_steps=args.gcg_steps, suffix_len=6, topk=32, batch_size=64, universal=True)
        )
    judge = SubstringJudge()
    res = evaluate_asr(model, tok, harmful, attacks, judge, progress=not args.no_progress)
    refusal = over_refusal(model, tok, harmless, SubstringJudge(min_words=1), max_new_tokens=24)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, r in res.items():
        r.save(out / f"asr_{name}.json")
    refusal.save(out / "over_refusal.json")
    _print({"asr": {k: v.asr for k, v in res.items()}, "over_refusal": refusal.rate})
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
