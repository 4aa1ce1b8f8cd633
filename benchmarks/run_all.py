"""Every benchmark side by side in one process, written as one JSON object of named ratios.

Run from the repository root:
``python benchmarks/run_all.py [--quick] [--threads N] --json FILE``.

Each entry of the JSON object is ``{"ratio": float, "meaning": str, "target":
str | None, "meets_target": bool | None, "conditions": {...}, ...}`` or, for a
benchmark that cannot run here, ``{"status": "skipped" | "missing", "reason":
str}``. A ratio is always "baseline time / our time" for a speed-up and "our
time / baseline time" for an overhead; ``meaning`` says which. Every timing is
the best of ``repeats`` runs after one warm-up, and every pair of timed
operations is also checked to give the same result (``identical`` in the
entry), so a speed-up never hides a changed output. The top-level
``"conditions"`` record the machine: torch version and threads, CPU count and
the load average before and after.

``--quick`` (about a minute on two busy cores) shrinks prompt counts, token
budgets and matrix sizes; the full run takes several minutes. Not a test:
nothing asserts on time.

Entries: ``decoding_grid_shared_prefill``, ``generation_batched_vs_single``,
``capture_vs_forward``, ``bf16_vs_fp32_forward``, ``magnitude_select_vs_sort``,
``int8_sim_int_mm_decode`` / ``_prefill`` (LLM.int8 simulation, integer vs float32 matmul),
``toy_threads_one_vs_two_toy`` / ``_toy_moe`` (a study's generation on one torch thread vs two),
``finite_check_aminmax`` (the whole-model NaN/inf guard),
``sweep_edit_scoped_vs_copy`` (one AIRD sweep point's edit),
``generation_gflops_fp32`` / ``generation_gflops_bf16``
(achieved GFLOP/s during generation against a measured matmul peak),
``wanda_vs_llmcompressor`` / ``awq_vs_llmcompressor`` (when llmcompressor is
importable) and ``selection_vs_naive`` (from ``benchmarks.bench_study``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# `python benchmarks/run_all.py` puts benchmarks/ on sys.path; the repository root is needed for
# `benchmarks.bench_study` and for a checkout that is not installed.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from refusal_core.evaluation.attacks import DecodingAttack, _config_seed  # noqa: E402
from refusal_core.evaluation.generation import (  # noqa: E402
    encode_prompts,
    generate_ids,
    generate_ids_multi,
)
from refusal_core.testing.tiny import tiny_model, tiny_prompts, tiny_tokenizer  # noqa: E402

NO_STOP = [-1]  # no model emits id -1: every row decodes the full budget, token counts are fixed


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Fastest wall time (s) of ``repeats`` runs after one untimed warm-up, and the last result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def best_of_pair(repeats: int, a: Callable[[], Any], b: Callable[[], Any]) -> tuple[float, Any, float, Any]:
    """Like :func:`best_of` for two operations, alternating a, b, a, b, ... so that a busy spell on a
    shared machine hits both instead of whichever happened to run then."""
    out_a, out_b = a(), b()
    best_a = best_b = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out_a = a()
        best_a = min(best_a, time.perf_counter() - t0)
        t0 = time.perf_counter()
        out_b = b()
        best_b = min(best_b, time.perf_counter() - t0)
    return best_a, out_a, best_b, out_b


def speedup(
    baseline_s: float,
    ours_s: float,
    *,
    meaning: str,
    target: float | None,
    conditions: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    ratio = baseline_s / ours_s
    return {
        "ratio": round(ratio, 3),
        "meaning": meaning,
        "target": None if target is None else f">= {target}",
        "meets_target": None if target is None else ratio >= target,
        "baseline_s": round(baseline_s, 4),
        "ours_s": round(ours_s, 4),
        "conditions": conditions,
        **extra,
    }


def _toy() -> tuple[Any, Any]:
    from refusal_core.toy import load_toy_model

    return load_toy_model()


def _mixed_prompts(n: int, seed: int) -> list[str]:
    half = n // 2
    return tiny_prompts(half, "harmful", seed=seed) + tiny_prompts(n - half, "harmless", seed=seed)


def _model_desc(model: Any) -> str:
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    return (
        f"{cfg.model_type} L={cfg.num_hidden_layers} d={cfg.hidden_size} ff={cfg.intermediate_size} "
        f"params={n / 1e6:.2f}M {next(model.parameters()).dtype}"
    )


def _prefill_heavy_model(quick: bool) -> Any:
    # Sized like a scaled-down chat model: prefill compute dominates a short decode window.
    return tiny_model("llama", n_layers=4, d_model=128 if quick else 256, n_heads=4, seed=0)


def _long_prompts(n: int, seed: int) -> list[str]:
    # Real chat prompts carry a long template and instruction; tiny_prompts are short, so join three.
    base = _mixed_prompts(3 * n, seed)
    return [" ".join(base[3 * i : 3 * i + 3]) for i in range(n)]


# ----------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------


def bench_decoding_grid(quick: bool, repeats: int) -> dict[str, Any]:
    """Default 12-configuration grid: one prefill forked per configuration vs one run per configuration."""
    grid = DecodingAttack().configs
    seeds = [_config_seed(0, c.label) for c in grid]
    n_prompts, new = (16, 8) if quick else (64, 8)
    rows: dict[str, Any] = {}
    cases: list[tuple[str, Any, Any, list[str]]] = []
    model, tok = _toy()
    cases.append(("toy", model, tok, _mixed_prompts(n_prompts, 1)))
    cases.append(
        ("prefill_heavy", _prefill_heavy_model(quick), tiny_tokenizer(), _long_prompts(n_prompts, 2))
    )
    for name, m, t, texts in cases:
        ids = encode_prompts(t, texts)
        kw: dict[str, Any] = {
            "max_new_tokens": new,
            "batch_size": 16,
            "stop_token_ids": NO_STOP,
            "progress": False,
        }

        def shared(m: Any = m, t: Any = t, ids: Any = ids, kw: dict[str, Any] = kw) -> Any:
            return generate_ids_multi(m, t, ids, grid, seeds, **kw)

        def unshared(m: Any = m, t: Any = t, ids: Any = ids, kw: dict[str, Any] = kw) -> Any:
            return [generate_ids(m, t, ids, sampling=c, seed=s, **kw) for c, s in zip(grid, seeds)]

        t_shared, out_shared, t_unshared, out_unshared = best_of_pair(repeats + 1, shared, unshared)
        rows[name] = speedup(
            t_unshared,
            t_shared,
            meaning="time(one generate per configuration) / time(one prefill forked per configuration)",
            target=1.8,
            conditions={
                "model": _model_desc(m),
                "prompts": len(ids),
                "mean_prompt_tokens": round(sum(map(len, ids)) / len(ids), 1),
                "new_tokens": new,
                "batch_size": 16,
                "configurations": len(grid),
            },
            identical=out_shared == out_unshared,
        )
    # The headline is the prefill-heavy case (real chat prompts are long); the toy is kept beside it.
    head = dict(rows["prefill_heavy"])
    head["toy"] = rows["toy"]
    return head


def bench_generation_batched(quick: bool, repeats: int) -> dict[str, Any]:
    model, tok = _toy()
    n, new, bs = (16, 8, 16) if quick else (64, 32, 32)
    ids = encode_prompts(tok, _mixed_prompts(n, 1))
    kw: dict[str, Any] = {"max_new_tokens": new, "stop_token_ids": NO_STOP, "progress": False}
    t_b, out_b = best_of(repeats, lambda: generate_ids(model, tok, ids, batch_size=bs, **kw))
    t_s, out_s = best_of(
        max(1, repeats - 1), lambda: [generate_ids(model, tok, [p], batch_size=1, **kw)[0] for p in ids]
    )
    return speedup(
        t_s,
        t_b,
        meaning="time(greedy one prompt at a time) / time(batched greedy, left padding)",
        target=4.0,
        conditions={"model": _model_desc(model), "prompts": n, "new_tokens": new, "batch_size": bs},
        same_tokens_prompts=f"{sum(a == b for a, b in zip(out_b, out_s))}/{n}",
    )


def bench_toy_threads(quick: bool, repeats: int) -> dict[str, dict[str, Any]]:
    """A study's dominant work on each packaged toy (batched greedy generation of the study's batch
    and length) on one torch thread against two (``StudyConfig.threads``)."""
    from refusal_core.toy import load_toy_model

    n, new, bs = (32, 8, 32) if quick else (64, 24, 32)
    before = torch.get_num_threads()
    out: dict[str, dict[str, Any]] = {}
    try:
        for name in ("toy", "toy-moe"):
            model, tok = load_toy_model(name=name)
            ids = encode_prompts(tok, _mixed_prompts(n, 2))

            def on(threads: int, model: Any = model, tok: Any = tok, ids: Any = ids) -> Callable[[], Any]:
                def run() -> Any:
                    torch.set_num_threads(threads)
                    return generate_ids(
                        model,
                        tok,
                        ids,
                        batch_size=bs,
                        max_new_tokens=new,
                        stop_token_ids=NO_STOP,
                        progress=False,
                    )

                return run

            t_two, out_two, t_one, out_one = best_of_pair(repeats, on(2), on(1))
            out[f"toy_threads_one_vs_two_{name.replace('-', '_')}"] = speedup(
                t_two,
                t_one,
                meaning="time(2 torch threads) / time(1 thread), batched greedy generation",
                target=None,
                conditions={"model": _model_desc(model), "prompts": n, "new_tokens": new, "batch_size": bs},
                identical=out_one == out_two,
            )
    finally:
        torch.set_num_threads(before)
    return out


# ----------------------------------------------------------------------------
# capture and dtype
# ----------------------------------------------------------------------------


def bench_capture(quick: bool, repeats: int) -> dict[str, Any]:
    from refusal_core.activations import mean_activations
    from refusal_core.model import batch_inputs
    from refusal_core.model import encode_prompts as encode_for_capture

    model, tok = _toy()
    n, bs = (64, 32) if quick else (256, 32)
    texts = _mixed_prompts(n, 3)
    pad = tok.pad_token_id

    @torch.inference_mode()
    def plain() -> None:
        # The same work a forward needs before it runs: chat-formatting and tokenizing the
        # prompts (mean_activations does it inside; comparing it with a forward on pre-encoded
        # ids charged the template rendering, ~1/3 of the toy's time, to the capture).
        encoded = encode_for_capture(tok, texts, require_post_instruction=True)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for start in range(0, n, bs):
            model.model(**batch_inputs([encoded[i] for i in order[start : start + bs]], pad), use_cache=False)

    t_plain, _, t_cap, _ = best_of_pair(
        repeats, plain, lambda: mean_activations(model, tok, texts, batch_size=bs)
    )
    ratio = t_cap / t_plain
    return {
        "ratio": round(ratio, 3),
        "meaning": (
            "time(capture: float64 means at every block input x position) / time(plain forward); "
            "both include encoding the prompts with the chat template"
        ),
        "target": "<= 1.2",
        "meets_target": ratio <= 1.2,
        "baseline_s": round(t_plain, 4),
        "ours_s": round(t_cap, 4),
        "conditions": {"model": _model_desc(model), "prompts": n, "batch_size": bs},
    }


def _forward(model: Any, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    @torch.inference_mode()
    def run() -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits[:, -1].float()

    return run


def bench_bf16(quick: bool, repeats: int) -> dict[str, Any]:
    """Forward (prefill-shaped) in bfloat16 vs float32, on the toy and on a wider tiny Llama."""
    out: dict[str, Any] = {}
    width = 256 if quick else 512
    cases = [
        ("toy", _toy()[0]),
        ("wide", tiny_model("llama", n_layers=4, d_model=width, n_heads=8, seed=0)),
    ]
    gen = torch.Generator().manual_seed(0)
    for name, model in cases:
        ids = torch.randint(3, model.config.vocab_size, (16, 64), generator=gen)
        m16 = copy.deepcopy(model).to(torch.bfloat16)
        t32, l32, t16, l16 = best_of_pair(repeats, _forward(model, ids), _forward(m16, ids))
        agree = float((l32.argmax(-1) == l16.argmax(-1)).float().mean())
        out[name] = speedup(
            t32,
            t16,
            meaning="time(float32 forward) / time(bfloat16 forward)",
            target=None,
            conditions={"model": _model_desc(model), "batch": 16, "tokens": 64},
            next_token_argmax_agreement=round(agree, 3),
        )
    head = dict(out["wide"])
    head["toy"] = out["toy"]
    return head


# ----------------------------------------------------------------------------
# FLOP/s: achieved during generation vs a measured matmul peak
# ----------------------------------------------------------------------------


def _matmul_peak(dtype: torch.dtype, m: int, n: int, k: int, repeats: int) -> float:
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    t, _ = best_of(repeats, lambda: a @ b)
    return 2 * m * n * k / t / 1e9


def _linear_params(model: Any) -> int:
    return sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear))


def bench_gflops(quick: bool, repeats: int) -> dict[str, dict[str, Any]]:
    size = 1024 if quick else 2048
    width = 256 if quick else 512
    n, new, bs = (16, 8, 16) if quick else (32, 16, 32)
    base = tiny_model("llama", n_layers=4, d_model=width, n_heads=8, seed=0)
    tok = tiny_tokenizer()
    ids = encode_prompts(tok, _long_prompts(n, 4))
    lin = _linear_params(base)
    tokens_processed = sum(len(p) for p in ids) + n * (new - 1)  # prefill rows + decode rows
    flops = 2 * lin * tokens_processed  # matmuls with the weights; attention scores are a small extra
    out: dict[str, dict[str, Any]] = {}
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        model = base if dtype == torch.float32 else copy.deepcopy(base).to(dtype)
        t, _ = best_of(
            repeats,
            lambda model=model: generate_ids(
                model, tok, ids, max_new_tokens=new, batch_size=bs, stop_token_ids=NO_STOP, progress=False
            ),
        )
        achieved = flops / t / 1e9
        square = _matmul_peak(dtype, size, size, size, repeats)
        prefill_shaped = _matmul_peak(dtype, bs * 32, width * 4, width, max(repeats, 3))
        decode_shaped = _matmul_peak(dtype, bs, width * 4, width, max(repeats, 3))
        # On a shared machine one shape's timing can catch a busy moment: the peak is the best seen.
        peak = max(square, prefill_shaped, decode_shaped)
        out[f"generation_gflops_{label}"] = {
            "ratio": round(achieved / peak, 4),
            "meaning": "achieved GFLOP/s in greedy generation / measured matmul peak GFLOP/s (best shape)",
            "target": None,
            "meets_target": None,
            "achieved_gflops": round(achieved, 2),
            "matmul_peak_gflops": round(peak, 2),
            "square_matmul_gflops": round(square, 2),
            "prefill_shaped_matmul_gflops": round(prefill_shaped, 2),
            "decode_shaped_matmul_gflops": round(decode_shaped, 2),
            "conditions": {
                "model": _model_desc(model),
                "prompts": n,
                "new_tokens": new,
                "batch_size": bs,
                "flop_count": "2 x linear weights x (prompt tokens + decoded tokens fed back)",
                "square_matmul": f"{size}x{size}x{size}",
                "prefill_matmul": f"{bs * 32}x{width}x{width * 4}",
                "decode_matmul": f"{bs}x{width}x{width * 4}",
            },
        }
    return out


# ----------------------------------------------------------------------------
# compression internals
# ----------------------------------------------------------------------------


def _sort_magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(sparsity * w.numel())
    mask = torch.ones(w.numel(), dtype=torch.bool)
    order = torch.argsort(w.detach().abs().reshape(-1).to(torch.float64), stable=True)
    mask[order[:k]] = False
    return mask.reshape(w.shape)


def bench_magnitude(quick: bool, repeats: int) -> dict[str, Any]:
    from refusal_core.functional import magnitude_mask

    shape = (448, 2432) if quick else (896, 4864)  # (half) Qwen2.5-0.5B's MLP matrix
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    t_sort, ref, t_sel, got = best_of_pair(
        repeats, lambda: _sort_magnitude_mask(w, 0.5), lambda: magnitude_mask(w, 0.5)
    )
    return speedup(
        t_sort,
        t_sel,
        meaning="time(stable argsort mask) / time(kthvalue selection mask), one matrix, sparsity 0.5",
        target=None,
        conditions={"shape": list(shape), "dtype": "float32 (scores in float64)"},
        identical=bool(torch.equal(got, ref)),
    )


def bench_int8(quick: bool, repeats: int) -> dict[str, Any]:
    """Int8LinearSim's forward with integer matmuls against its float32 route, at a real MLP
    projection's shape (Qwen2.5-1.5B's gate/up: 1536 -> 8960; quick: half of each), for a
    decode step (16 tokens) and a prefill (16 prompts x 40 tokens)."""
    from refusal_core.compression import Int8LinearSim

    d_in, d_out = (768, 4480) if quick else (1536, 8960)
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=gen))
    sim = Int8LinearSim.from_linear(lin)
    entry: dict[str, Any] = {}
    for label, tokens in (("decode", 16), ("prefill", 640)):
        x = torch.randn(tokens, d_in, generator=gen)
        x[3, 7] = 9.0  # one outlier feature

        def route(use_int_mm: bool, x: torch.Tensor = x) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                sim.use_int_mm = use_int_mm
                return sim(x)

            return run

        t_float, y_float, t_int, y_int = best_of_pair(repeats, route(False), route(True))
        entry[label] = speedup(
            t_float,
            t_int,
            meaning="time(Int8LinearSim, float32 route) / time(integer matmul route)",
            target=None,
            conditions={"in": d_in, "out": d_out, "tokens": tokens, "threshold": 6.0},
            identical=bool(torch.equal(y_float, y_int)),
        )
    sim.use_int_mm = True
    return {"int8_sim_int_mm_" + k: v for k, v in entry.items()}


def _wide_bf16_model(quick: bool) -> Any:
    """A random bfloat16 qwen2 wide enough that whole-model passes cost what they cost on real models."""
    n_layers, width = (4, 256) if quick else (8, 512)
    return tiny_model("qwen2", n_layers=n_layers, d_model=width, n_heads=8, seed=0, dtype=torch.bfloat16)


def bench_finite_check(quick: bool, repeats: int) -> dict[str, Any]:
    """Whole-model NaN/inf guard: ``torch.isfinite(t).all()`` per tensor vs one ``aminmax`` per tensor."""
    from refusal_core._finite import all_finite

    model = _wide_bf16_model(quick)
    tensors = [p.detach() for p in model.parameters()]
    t_old, ok_old, t_new, ok_new = best_of_pair(
        repeats,
        lambda: all(bool(torch.isfinite(t).all()) for t in tensors),
        lambda: all(all_finite(t) for t in tensors),
    )
    tensors[-1].view(-1)[7] = float("nan")  # and both see a NaN
    caught_old = not all(bool(torch.isfinite(t).all()) for t in tensors)
    caught = caught_old and not all(all_finite(t) for t in tensors)
    return speedup(
        t_old,
        t_new,
        meaning="time(isfinite().all() per tensor) / time(all_finite: aminmax per tensor), whole model",
        target=None,
        conditions={"model": _model_desc(model), "dtype": "bfloat16"},
        identical=bool(ok_old == ok_new and caught),
    )


def bench_sweep_edit(quick: bool, repeats: int) -> dict[str, Any]:
    """One AIRD sweep point's edit, without its scoring: a repaired deep copy with the edit's records
    (two whole-model hashes, as every sweep point paid before) vs the in-place edit undone by
    ``scoped_edit`` (the study's sweep now). The scoring that follows is the same for both."""
    from types import SimpleNamespace

    from refusal_core import bench as steps
    from refusal_core.aird import AirdConfig
    from refusal_core.compression import scoped_edit
    from refusal_core.model import get_layout, model_identity
    from refusal_core.model.identity import weights_sha256

    model = _wide_bf16_model(quick)
    layout = get_layout(model)
    ident = model_identity(model)
    fake_bench: Any = SimpleNamespace(identity=ident)
    r = torch.randn(layout.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plan = steps.RepairPlan(AirdConfig(gain_attn=3.0, gain_mlp=3.0), (layout.n_layers // 2,), "into-source")
    block = layout.blocks[plan.edit_blocks[0]]

    def copy_path() -> str:
        edited, _ = steps.repaired(fake_bench, model, r, plan)
        return str(edited.config.model_type)

    def scoped_path() -> str:
        with scoped_edit([block]):
            steps._apply_plan_(fake_bench, model, r, plan, method=None, compression=None, check_origin=False)
        return str(model.config.model_type)

    digest = weights_sha256(model)
    t_old, _, t_new, _ = best_of_pair(repeats, copy_path, scoped_path)
    edited, _ = steps.repaired(fake_bench, model, r, plan)
    with scoped_edit([block]):
        steps._apply_plan_(fake_bench, model, r, plan, method=None, compression=None, check_origin=False)
        same_edit = weights_sha256(model) == weights_sha256(edited)
    return speedup(
        t_old,
        t_new,
        meaning="time(repaired deep copy + identity hashes) / time(in-place edit undone by scoped_edit)",
        target=None,
        conditions={"model": _model_desc(model), "dtype": "bfloat16", "placement": plan.placement},
        identical=bool(same_edit and weights_sha256(model) == digest),
    )


def bench_llmc(quick: bool, repeats: int) -> dict[str, dict[str, Any]]:
    from refusal_core.compression.llmc import llmc_available

    if not llmc_available():
        reason = "llmcompressor is not importable in this environment (run in the llmc venv: tox -e llmc)"
        return {
            name: {"status": "skipped", "reason": reason}
            for name in ("wanda_vs_llmcompressor", "awq_vs_llmcompressor")
        }
    from benchmarks import bench_compression as bc
    from refusal_core.compression import AwqConfig, WandaConfig
    from refusal_core.compression.llmc import LlmcAwqConfig, LlmcWandaConfig

    args = argparse.Namespace(
        tiny=False, layers=4, width=256, calibration=16 if quick else 64, heldout=8 if quick else 32
    )
    what, dense, calibration, heldout = bc._load(args)
    out: dict[str, dict[str, Any]] = {}
    for name, ours_cfg, llmc_cfg in (
        ("wanda_vs_llmcompressor", WandaConfig(0.5), LlmcWandaConfig(0.5)),
        ("awq_vs_llmcompressor", AwqConfig(w_bit=4), LlmcAwqConfig(w_bit=4)),
    ):
        bc.compress_(copy.deepcopy(dense), llmc_cfg, calibration[:4])  # warm-up: tracing, session set-up
        t_ours, m_ours = bc._run(dense, ours_cfg, calibration, repeats)
        t_llmc, m_llmc = bc._run(dense, llmc_cfg, calibration, repeats)
        e_ours, _ = bc._errors(m_ours, dense, heldout)
        e_llmc, _ = bc._errors(m_llmc, dense, heldout)
        out[name] = speedup(
            t_llmc,
            t_ours,
            meaning="time(llmcompressor) / time(ours); error_ratio = logit error ours / llmcompressor",
            target=1.0,
            conditions={
                "model": what,
                "calibration_prompts": len(calibration),
                "heldout_prompts": len(heldout),
            },
            error_ratio=round(e_ours / e_llmc, 4) if e_llmc else None,
        )
    return out


def bench_selection_entry(quick: bool) -> dict[str, Any]:
    try:
        from benchmarks.bench_study import bench_selection  # type: ignore[attr-defined]
    except ImportError as exc:
        return {
            "status": "missing",
            "reason": f"benchmarks.bench_study.bench_selection not importable: {exc}",
        }
    result = bench_selection(quick)
    if not isinstance(result, dict):
        return {"ratio": result}
    # one named ratio per model (toy and a 24-layer tiny model), each with its own conditions
    conditions = result.get("conditions", {})
    return {
        f"selection_vs_naive_{which}": {
            "ratio": result[f"selection_vs_naive_{which}"],
            "target": ">= 1.5",
            "meets_target": result[f"selection_vs_naive_{which}"] >= 1.5,
            "conditions": {k: v for k, v in conditions.items() if k not in ("toy", "tiny24")}
            | {"model": conditions.get(which, {})},
        }
        for which in ("toy", "tiny24")
        if f"selection_vs_naive_{which}" in result
    }


# ----------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run_all(quick: bool, repeats: int, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every benchmark; one that raises is recorded with its error instead of stopping the rest."""
    conditions = {
        "quick": quick,
        "repeats": repeats,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "load_average_before": _load(),
    }
    results: dict[str, Any] = {}
    single: list[tuple[str, Callable[[], Any]]] = [
        ("decoding_grid_shared_prefill", lambda: bench_decoding_grid(quick, repeats)),
        ("generation_batched_vs_single", lambda: bench_generation_batched(quick, repeats)),
        ("capture_vs_forward", lambda: bench_capture(quick, repeats)),
        ("bf16_vs_fp32_forward", lambda: bench_bf16(quick, repeats)),
        ("magnitude_select_vs_sort", lambda: bench_magnitude(quick, repeats)),
        ("int8_sim_int_mm", lambda: bench_int8(quick, repeats)),
        ("toy_threads", lambda: bench_toy_threads(quick, repeats)),
        ("finite_check_aminmax", lambda: bench_finite_check(quick, repeats)),
        ("sweep_edit_scoped_vs_copy", lambda: bench_sweep_edit(quick, repeats)),
        ("generation_gflops", lambda: bench_gflops(quick, repeats)),
        ("llmcompressor", lambda: bench_llmc(quick, repeats)),
        ("selection_vs_naive", lambda: bench_selection_entry(quick)),
    ]
    for name, fn in single:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
        try:
            value = fn()
        except Exception as exc:  # one broken benchmark must not hide the others
            value = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
        wall = round(time.perf_counter() - t0, 2)
        if (
            name
            in ("generation_gflops", "llmcompressor", "selection_vs_naive", "int8_sim_int_mm", "toy_threads")
            and "status" not in value
        ):
            for sub, entry in value.items():
                entry.setdefault("wall_s", wall)
                results[sub] = entry
        else:
            value.setdefault("wall_s", wall)
            results[name] = value
        print(f"[run_all] {name}: {wall:.1f} s", file=sys.stderr, flush=True)
    conditions["load_average_after"] = _load()
    return {"conditions": conditions, **results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: about a minute on two busy cores")
    ap.add_argument("--json", required=True, help="where to write the JSON object")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 2 quick, 3 full)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--only", nargs="*", default=None, help="run only these benchmark names")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    result = run_all(args.quick, repeats, args.only)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for name, entry in result.items():
        if name == "conditions":
            continue
        if "ratio" in entry:
            mark = (
                "" if entry.get("meets_target") is None else (" ok" if entry["meets_target"] else " MISSES")
            )
            print(f"{name:<34} {entry['ratio']:>8.3f}  {entry.get('target') or ''}{mark}")
        else:
            print(f"{name:<34} {entry.get('status')}: {entry.get('reason')}")
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
