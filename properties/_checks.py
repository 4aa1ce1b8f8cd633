"""Assertion helpers and float64 reference formulas shared by the property tests.

The formulas here are written again from DESIGN.md's definitions, independently of
``refusal_core.functional``, so the reference is judged by something other than itself.
Every assertion message names the operation and describes the inputs (shapes, dtypes,
norms, key scalars) so it reads on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from refusal_core.testing.oracle import tolerance

# ----------------------------------------------------------------------------
# messages
# ----------------------------------------------------------------------------


def _one(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        text = f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
        if value.is_floating_point() and value.numel():
            v64 = value.detach().to(torch.float64)
            text += f" (‖·‖={float(v64.norm()):.4g}, max|·|={float(v64.abs().max()):.4g})"
        return text
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


def describe(inputs: dict[str, Any]) -> str:
    """``name=dtype[shape] (norms)`` for tensors, repr for the rest, comma-separated."""
    return ", ".join(f"{k}={_one(v)}" for k, v in inputs.items())


def fail_message(op: str, inputs: dict[str, Any], detail: str) -> str:
    return f"{op}: {detail}; inputs: {describe(inputs)}"


def check(condition: bool, op: str, inputs: dict[str, Any], detail: str) -> None:
    """Assert ``condition`` with a message naming ``op`` and describing ``inputs``."""
    assert condition, fail_message(op, inputs, detail)


def as64(t: Any) -> torch.Tensor:
    """Any tensor-like result as a detached float64 CPU tensor."""
    return torch.as_tensor(t).detach().cpu().to(torch.float64)


def assert_close(
    op: str,
    inputs: dict[str, Any],
    actual: Any,
    expected: Any,
    *,
    dtype: torch.dtype,
    scale: float,
    what: str = "result",
    rtol: float | None = None,
) -> None:
    """``‖actual − expected‖ ≤ TOLERANCE[dtype] · scale`` (Frobenius norms, float64).

    ``rtol`` replaces ``TOLERANCE[dtype]`` where the protocol fixes the precision (e.g. float64).
    """
    a, e = as64(actual), as64(expected)
    check(
        a.shape == e.shape,
        op,
        inputs,
        f"{what} has shape {list(a.shape)}, expected {list(e.shape)}",
    )
    check(bool(torch.isfinite(a).all()), op, inputs, f"{what} holds NaN or infinity")
    err = float((a - e).norm())
    tol = tolerance(dtype) if rtol is None else rtol
    bound = tol * scale
    why = f"norm-relative tolerance for {str(dtype).removeprefix('torch.')}" if rtol is None else "tolerance"
    check(err <= bound, op, inputs, f"{what} is off by ‖Δ‖={err:.4g} > {tol:g}·{scale:.4g} ({why})")


def assert_layout(
    op: str, inputs: dict[str, Any], out: Any, *, shape: Sequence[int], dtype: torch.dtype
) -> None:
    """``out`` is a tensor of exactly ``shape`` and ``dtype``."""
    check(isinstance(out, torch.Tensor), op, inputs, f"returned {type(out).__name__}, not a tensor")
    check(
        tuple(out.shape) == tuple(shape) and out.dtype == dtype,
        op,
        inputs,
        f"returned {str(out.dtype).removeprefix('torch.')}{list(out.shape)}, "
        f"expected {str(dtype).removeprefix('torch.')}{list(shape)}",
    )


def first_bad(bad: torch.Tensor, **values: torch.Tensor) -> str:
    """``"3 entries, e.g. at (i, j): got=…, expected=…"`` for the first True entry of ``bad``."""
    if not bool(bad.any()):
        return "no entries"
    where = tuple(torch.nonzero(bad)[0].tolist())
    shown = ", ".join(f"{k}={float(as64(v)[where]):.8g}" for k, v in values.items())
    return f"{int(bad.sum())} entries, e.g. at {where}: {shown}"


def norm(t: torch.Tensor) -> float:
    return float(as64(t).norm())


# ----------------------------------------------------------------------------
# float64 formulas (the definitions, restated)
# ----------------------------------------------------------------------------


def unit64(r: torch.Tensor) -> torch.Tensor:
    r64 = as64(r)
    return r64 / r64.norm()


def ablate64(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x − r̂ r̂ᵀ x over the last axis."""
    u = unit64(r)
    x64 = as64(x)
    return x64 - (x64 @ u).unsqueeze(-1) * u


def int8_scale64(w: torch.Tensor) -> torch.Tensor:
    """Row absmax / 127."""
    return as64(w).abs().amax(dim=1) / 127.0


def int8_codes64(w: torch.Tensor) -> torch.Tensor:
    """round(w / scale) per row; 0 for an all-zero row."""
    scale = int8_scale64(w)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale.unsqueeze(1) > 0, torch.round(as64(w) / safe.unsqueeze(1)), 0.0)


def llm_int8_64(x: torch.Tensor, w: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM.int8 in float64: outlier features (any |x| ≥ τ) unquantized against dequantized
    weight columns, the rest with per-token absmax int8 activations."""
    x2 = as64(x).reshape(-1, x.shape[-1])
    w_dq = int8_codes64(w) * int8_scale64(w).unsqueeze(1)
    outlier = (x2.abs() >= threshold).any(dim=0)
    regular = torch.where(outlier, 0.0, x2)
    out = (int8_codes64(regular) * int8_scale64(regular).unsqueeze(1)) @ w_dq.T
    out = out + x2[:, outlier] @ w_dq[:, outlier].T
    return out.reshape(*x.shape[:-1], w.shape[0])


def pseudo_quantize64(
    w: torch.Tensor, w_bit: int, group_size: int, zero_point: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise quantize-dequantize in float64.

    Returns ``(dequantized, step, ambiguous)``: the step (scale) of each element's group and
    whether rounding it (or its group's zero point) sits within 1e-3 of a half step, where two
    correct implementations may round either way.
    """
    g = as64(w).reshape(-1, group_size)
    if zero_point:
        max_int = 2**w_bit - 1
        hi, lo = g.amax(dim=1, keepdim=True), g.amin(dim=1, keepdim=True)
        step = (hi - lo).clamp(min=1e-5) / max_int
        zero_raw = -lo / step
        zero = torch.round(zero_raw).clamp(0, max_int)
        raw = g / step
        q = (torch.round(raw) + zero).clamp(0, max_int)
        out = (q - zero) * step
        ambiguous = _near_half(raw) | _near_half(zero_raw)
    else:
        max_int = 2 ** (w_bit - 1) - 1
        step = g.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / max_int
        raw = g / step
        out = torch.round(raw).clamp(-(2 ** (w_bit - 1)), max_int) * step
        ambiguous = _near_half(raw)
    step_full = step.expand_as(g).reshape(w.shape)
    return out.reshape(w.shape), step_full, ambiguous.expand_as(g).reshape(w.shape)


def _near_half(y: torch.Tensor, band: float = 1e-3) -> torch.Tensor:
    return ((y - torch.floor(y)) - 0.5).abs() < band


def awq_candidates64(
    w: torch.Tensor, x: torch.Tensor, w_bit: int, group_size: int, grid: int
) -> list[tuple[float, torch.Tensor, float]]:
    """``(a, s, loss)`` for every exponent a of the grid, in grid order."""
    w64, x64 = as64(w), as64(x)
    x_mean = x64.abs().mean(dim=0)
    ref = x64 @ w64.T
    out = []
    for i in range(grid):
        a = i / grid
        t = x_mean.pow(a).clamp(min=1e-4)
        s = t / torch.sqrt(t.max() * t.min())
        out.append((a, s, awq_loss64(w64, x64, s, w_bit, group_size, ref)))
    return out


def awq_loss64(
    w: torch.Tensor, x: torch.Tensor, s: torch.Tensor, w_bit: int, group_size: int, ref: torch.Tensor
) -> float:
    """‖x wᵀ − (x/s) Q(w·s)ᵀ‖² with Q the asymmetric group quantizer."""
    s64 = as64(s)
    q, _, _ = pseudo_quantize64(as64(w) * s64, w_bit, group_size, zero_point=True)
    return float(((ref - (as64(x) / s64) @ q.T) ** 2).sum())


def _refusal_masses64(logits: torch.Tensor, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, 1 − p) in float64, each from its own logsumexp so neither loses digits near 0."""
    l64 = as64(logits)
    idx = torch.as_tensor(list(ids), dtype=torch.long)
    total = torch.logsumexp(l64, dim=-1)
    p = torch.exp(torch.logsumexp(l64[..., idx], dim=-1) - total)
    q = torch.exp(torch.logsumexp(l64[..., _complement(idx, l64.shape[-1])], dim=-1) - total)
    return p, q


def refusal_score64(logits: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """log(p + 1e-8) − log(1 − p + 1e-8), p = Σ softmax(logits)[ids], via logsumexp."""
    p, q = _refusal_masses64(logits, ids)
    return torch.log(p + 1e-8) - torch.log(q + 1e-8)


def refusal_score_slack(logits: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """Per-score rounding allowance: 1e-6, plus a float64 error of 1e-12 in p times d(score)/dp.

    Near saturation d(score)/dp reaches 1e8, so even correct float64 code moves the score by
    ~1e-6 there; any wrong formula is off by far more.
    """
    p, q = _refusal_masses64(logits, ids)
    return 1e-6 + 1e-12 * (1 / (p + 1e-8) + 1 / (q + 1e-8))


def check_scores(
    op: str,
    inputs: dict[str, Any],
    out: Any,
    expected: torch.Tensor,
    logits: torch.Tensor,
    ids: Sequence[int],
) -> None:
    """Elementwise |out − expected| ≤ the rounding allowance of each score (the protocol fixes float64)."""
    err = (as64(out) - expected).abs()
    slack = refusal_score_slack(logits, ids)
    bad = ~(err <= slack)  # NaN counts as bad
    check(
        not bool(bad.any()),
        op,
        inputs,
        "scores off by more than their rounding allowance: "
        + first_bad(bad, got=as64(out), expected=expected, allowance=slack),
    )


def _complement(idx: torch.Tensor, vocab: int) -> torch.Tensor:
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[idx] = False
    return torch.nonzero(keep).reshape(-1)


def is_finite_number(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
