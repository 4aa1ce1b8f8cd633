"""The functional core: pure tensor operations of the method.

These functions are the *oracle protocol*: an outside implementation that
exposes any subset of them under the same names and signatures can be checked
by the property suite (see ``properties/`` and the README). None of them
mutates its inputs; all of them validate their arguments and raise a
:class:`~refusal_core.errors.RefusalCoreError` subclass naming the argument.

Conventions: weights follow ``nn.Linear`` (``[out, in]``); ``d`` is the
residual width; a direction ``r`` is a 1-D tensor of length ``d`` and
``r̂ = r / ‖r‖``. The projections are computed in float64 and cast back to the
input's dtype, so a float32 result is the correctly rounded float64 answer.

Input policy (checked before any arithmetic): tensors that carry values
(``x``, ``w``, ``e``, ``r``, activations, logits, norms, scales) must be
floating point — integer and boolean tensors are rejected, never truncated.
Scalars (``coeff``, ``alpha``, ``threshold``, ``sparsity``) must be real
numbers: a Python ``int``/``float``, a NumPy integer or float, or a 0-d
integer/float tensor; ``bool``, ``None``, strings (even ``"0.1"``), lists and
tensors with any dimension are rejected. Refusal ids must be integers (Python
or NumPy ints, or an integer tensor) inside the vocabulary. A direction whose
float64 norm is not finite (entries near the float64 limit) is rejected
rather than silently ablating nothing, and a result that overflows raises
:class:`~refusal_core.errors.NonFiniteError` instead of being returned.

Example:
    >>> import torch
    >>> from refusal_core.functional import ablate
    >>> x = torch.tensor([[3.0, 4.0]]); r = torch.tensor([0.0, 2.0])
    >>> ablate(x, r)
    tensor([[3., 0.]])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from refusal_core._finite import all_finite
from refusal_core.errors import (
    EmptyInputError,
    InvalidArgumentError,
    NonFiniteError,
    ShapeMismatchError,
    ZeroDirectionError,
)

__all__ = [
    "MIN_DIRECTION_NORM",
    "ablate",
    "add_direction",
    "aird_update",
    "awq_apply_scales",
    "awq_scales",
    "cosine_similarity",
    "difference_in_means",
    "int8_dequantize",
    "int8_quantize",
    "llm_int8_linear",
    "magnitude_mask",
    "orthogonalize_embedding",
    "orthogonalize_weight",
    "pruned_count",
    "pseudo_quantize",
    "refusal_score",
    "wanda_mask",
]

#: A direction whose float64 norm is at or below this has no usable unit vector.
MIN_DIRECTION_NORM = 1e-8

#: The smoothing constant of the refusal score (log-odds of the refusal mass).
REFUSAL_SCORE_EPS = 1e-8


# ----------------------------------------------------------------------------
# argument checks (shared by the model-level code)
# ----------------------------------------------------------------------------


def check_tensor(t: object, name: str, *, ndim: int | None = None, min_ndim: int = 0) -> torch.Tensor:
    """Return ``t`` if it is a finite tensor of the required rank, else raise."""
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ShapeMismatchError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if t.ndim < min_ndim:
        raise ShapeMismatchError(
            f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}"
        )
    if not all_finite(t):
        raise NonFiniteError(f"{name} contains NaN or infinity")
    return t


def check_float_tensor(t: object, name: str, *, ndim: int | None = None, min_ndim: int = 0) -> torch.Tensor:
    """:func:`check_tensor` that also requires a real floating-point dtype (no int, bool, complex)."""
    t = check_tensor(t, name, ndim=ndim, min_ndim=min_ndim)
    if not t.is_floating_point():
        raise InvalidArgumentError(
            f"{name} must be a floating-point tensor, got {t.dtype}; integer and boolean tensors are not "
            "converted (cast explicitly, e.g. {name}.float())".replace("{name}", name)
        )
    return t


def check_real(value: object, name: str, *, allow_inf: bool = False) -> float:
    """``value`` as a Python float if it is a real number, else raise naming ``name``.

    Accepted: ``int``/``float`` (not ``bool``), NumPy integers and floats
    (anything registered as :class:`numbers.Real` except booleans), and 0-d
    integer or floating-point tensors. NaN is always rejected, infinity unless
    ``allow_inf``.

    >>> check_real(0.5, "alpha")
    0.5
    >>> check_real("0.1", "alpha")
    Traceback (most recent call last):
    ...
    refusal_core.errors.InvalidArgumentError: alpha must be a real number (int or float), got str '0.1'
    """
    if isinstance(value, torch.Tensor):
        if value.ndim != 0:
            raise InvalidArgumentError(
                f"{name} must be a real number; a tensor is accepted only 0-d, got shape {tuple(value.shape)}"
            )
        if value.dtype == torch.bool or value.is_complex():
            raise InvalidArgumentError(f"{name} must be a real number, got a 0-d {value.dtype} tensor")
        out = float(value.item())
    elif isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(
            f"{name} must be a real number (int or float), got {type(value).__name__} {value!r}"
        )
    else:
        out = float(value)
    if math.isnan(out) or (math.isinf(out) and not allow_inf):
        raise NonFiniteError(f"{name} must be finite, got {value!r}")
    return out


def _norm64(t64: torch.Tensor) -> float:
    """``‖t‖₂`` of a finite float64 tensor; inf only when the norm itself exceeds the float64 range.

    The plain sum of squares overflows for entries above ~1e154; then the norm is
    recomputed on ``t / max|t|`` (only then, so ordinary inputs keep their exact bits).
    """
    norm = float(torch.linalg.vector_norm(t64))
    if math.isinf(norm):
        m = float(t64.abs().max())
        norm = m * float(torch.linalg.vector_norm(t64 / m))
    return norm


def _direction_norm(r64: torch.Tensor, name: str) -> float:
    """The float64 norm of ``r64``, required finite and above :data:`MIN_DIRECTION_NORM`."""
    norm = _norm64(r64)
    if not math.isfinite(norm):
        raise NonFiniteError(
            f"{name} has a float64 norm that overflows ({norm}); its entries are too large to normalize"
        )
    if not norm > MIN_DIRECTION_NORM:
        raise ZeroDirectionError(
            f"{name} has norm {norm:.3g} <= {MIN_DIRECTION_NORM:g}; a direction needs a nonzero norm"
        )
    return norm


def _finite_result(t: torch.Tensor, operation: str) -> torch.Tensor:
    """``t`` if every entry is finite; an overflow of finite inputs raises naming the operation."""
    if not all_finite(t):
        raise NonFiniteError(f"{operation} overflows: the result is not finite")
    return t


def unit_direction(r: object, width: int | None = None, name: str = "r") -> torch.Tensor:
    """``r / ‖r‖`` in float64, after checking rank, dtype, width, finiteness and norm."""
    r = check_float_tensor(r, name, ndim=1)
    if width is not None and r.shape[0] != width:
        raise ShapeMismatchError(f"{name} has width {r.shape[0]} but the operand has width {width}")
    r64 = r.detach().to(torch.float64)
    return r64 / _direction_norm(r64, name)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype rounding arithmetic and weight edits run in: float64 stays, the rest is float32.

    The one place of this rule: quantizers, the AWQ search and the edits of
    quantized weights all use it, so a float16/bfloat16 weight is never
    rounded twice.
    """
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_sparsity(sparsity: object) -> float:
    s = check_real(sparsity, "sparsity", allow_inf=True)
    if not (0.0 <= s < 1.0):
        raise InvalidArgumentError(f"sparsity must lie in [0, 1), got {sparsity!r}")
    return s


def pruned_count(sparsity: float, n: int) -> int:
    """``⌊s·n⌋`` evaluated as ``int(s * n)`` in float64, the convention of Wanda's code."""
    return int(_check_sparsity(sparsity) * n)


# ----------------------------------------------------------------------------
# directions
# ----------------------------------------------------------------------------


def difference_in_means(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """Mean over the first axis of ``harmful`` minus that of ``harmless``, in float64.

    Shapes: ``[n1, ..., d]`` and ``[n2, ..., d]`` give ``[..., d]``. Never normalized.

    >>> difference_in_means(torch.ones(2, 3), torch.zeros(5, 3))
    tensor([1., 1., 1.], dtype=torch.float64)
    """
    harmful = check_float_tensor(harmful, "harmful", min_ndim=2)
    harmless = check_float_tensor(harmless, "harmless", min_ndim=2)
    if harmful.shape[0] == 0:
        raise EmptyInputError("harmful holds no examples (first dimension is 0)")
    if harmless.shape[0] == 0:
        raise EmptyInputError("harmless holds no examples (first dimension is 0)")
    if harmful.shape[1:] != harmless.shape[1:]:
        raise ShapeMismatchError(
            f"harmful has per-example shape {tuple(harmful.shape[1:])} but harmless has "
            f"{tuple(harmless.shape[1:])}"
        )
    diff = harmful.to(torch.float64).mean(0) - harmless.to(torch.float64).mean(0)
    return _finite_result(diff, "difference_in_means(harmful, harmless)")


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the angle between two same-shape tensors (flattened), in [-1, 1].

    >>> cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]))
    1.0
    """
    a = check_float_tensor(a, "a", min_ndim=1)
    b = check_float_tensor(b, "b", min_ndim=1)
    if a.shape != b.shape:
        raise ShapeMismatchError(f"a has shape {tuple(a.shape)} but b has shape {tuple(b.shape)}")
    a64 = a.detach().reshape(-1).to(torch.float64)
    b64 = b.detach().reshape(-1).to(torch.float64)
    na, nb = _norm64(a64), _norm64(b64)
    for name, n in (("a", na), ("b", nb)):
        if not math.isfinite(n):
            raise NonFiniteError(f"{name} has a float64 norm that overflows ({n}); the cosine is undefined")
        if not n > MIN_DIRECTION_NORM:
            raise ZeroDirectionError(f"{name} has norm {n:.3g}; the cosine of a zero vector is undefined")
    c = float(torch.dot(a64 / na, b64 / nb))
    return min(1.0, max(-1.0, c))


# ----------------------------------------------------------------------------
# interventions on activations and weights
# ----------------------------------------------------------------------------


def ablate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Directional ablation ``x − r̂ r̂ᵀ x`` over the last axis; ``x [..., d]``, same dtype.

    >>> ablate(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
    tensor([0., 1.])
    """
    x = check_float_tensor(x, "x", min_ndim=1)
    u = unit_direction(r, x.shape[-1])
    x64 = x.to(torch.float64)
    return _finite_result((x64 - (x64 @ u).unsqueeze(-1) * u).to(x.dtype), "ablate(x, r)")


def add_direction(x: torch.Tensor, r: torch.Tensor, coeff: float) -> torch.Tensor:
    """Activation addition ``x + coeff·r`` over the last axis; same dtype as ``x``.

    >>> add_direction(torch.zeros(2), torch.tensor([1.0, 2.0]), 0.5)
    tensor([0.5000, 1.0000])
    """
    x = check_float_tensor(x, "x", min_ndim=1)
    r = check_float_tensor(r, "r", ndim=1)
    if r.shape[0] != x.shape[-1]:
        raise ShapeMismatchError(f"r has width {r.shape[0]} but x has width {x.shape[-1]}")
    c = check_real(coeff, "coeff")
    out = (x.to(torch.float64) + c * r.to(torch.float64)).to(x.dtype)
    return _finite_result(out, f"add_direction(x, r, coeff={c!r}): x + coeff·r")


def orthogonalize_weight(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``(I − r̂ r̂ᵀ) w`` for a matrix writing into the residual stream; ``w [d, k]``.

    >>> orthogonalize_weight(torch.eye(2), torch.tensor([0.0, 1.0]))
    tensor([[1., 0.],
            [0., 0.]])
    """
    w = check_float_tensor(w, "w", ndim=2)
    u = unit_direction(r, w.shape[0])
    w64 = w.to(torch.float64)
    return _finite_result((w64 - torch.outer(u, u @ w64)).to(w.dtype), "orthogonalize_weight(w, r)")


def orthogonalize_embedding(e: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``e (I − r̂ r̂ᵀ)`` for an embedding table ``e [vocab, d]``: every row loses its r̂ part."""
    e = check_float_tensor(e, "e", ndim=2)
    u = unit_direction(r, e.shape[1])
    e64 = e.to(torch.float64)
    return _finite_result((e64 - torch.outer(e64 @ u, u)).to(e.dtype), "orthogonalize_embedding(e, r)")


def aird_update(
    w: torch.Tensor,
    r: torch.Tensor,
    alpha: float,
    *,
    normalize: bool = False,
    preserve_sparsity: bool = False,
) -> torch.Tensor:
    """AIRD's rank-1 edit ``w + α r rᵀ w`` of an output projection ``w [d, k]``.

    ``r`` is used as given (the paper's raw difference in means) unless
    ``normalize`` is set, in which case ``r̂`` replaces it. The gain along r̂ is
    ``1 + α‖r‖²`` (``1 + α`` when normalized); ``α‖r‖² = −1`` is exactly
    :func:`orthogonalize_weight`. With ``preserve_sparsity`` the update is
    masked to the nonzero entries of ``w``, so the zero pattern is unchanged.

    >>> aird_update(torch.eye(2), torch.tensor([1.0, 0.0]), 0.5)
    tensor([[1.5000, 0.0000],
            [0.0000, 1.0000]])
    """
    w = check_float_tensor(w, "w", ndim=2)
    r = check_float_tensor(r, "r", ndim=1)
    if r.shape[0] != w.shape[0]:
        raise ShapeMismatchError(f"r has width {r.shape[0]} but w has {w.shape[0]} output rows")
    a = check_real(alpha, "alpha")
    u = unit_direction(r, w.shape[0])  # also rejects a zero direction, which makes no edit
    v = u if normalize else r.to(torch.float64)
    w64 = w.to(torch.float64)
    update = a * torch.outer(v, v @ w64)
    if preserve_sparsity:
        update = update * (w != 0)
    # A huge alpha (e.g. 1e40) must not hand back inf weights that a caller would then write.
    return _finite_result((w64 + update).to(w.dtype), f"aird_update(w, r, alpha={a!r}): w + alpha·r rᵀ w")


# ----------------------------------------------------------------------------
# pruning masks
# ----------------------------------------------------------------------------


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask (True = kept) zeroing exactly ``⌊s·numel⌋`` entries of lowest ``|w|``.

    One comparison group per matrix; ties at the threshold are broken by position.

    >>> magnitude_mask(torch.tensor([[1.0, -3.0], [0.5, 2.0]]), 0.5)
    tensor([[False,  True],
            [False,  True]])
    """
    w = check_float_tensor(w, "w", min_ndim=1)
    k = pruned_count(sparsity, w.numel())
    if not k:
        return torch.ones(w.shape, dtype=torch.bool, device=w.device)
    # A selection, not a sort, to the mask of a stable ascending argsort's first k:
    # every entry below the k-th smallest value v, then the first entries equal
    # to v (in flat position order) until k are pruned. kthvalue's value is
    # unambiguous under ties; only which tied entry it reports is not.
    score = w.detach().abs().reshape(-1).to(torch.float64)
    v = torch.kthvalue(score, k).values
    below = score < v
    at = score == v
    need = k - int(below.sum())  # >= 1: fewer than k entries lie strictly below v
    pruned = below | (at & (at.cumsum(0) <= need))
    return (~pruned).reshape(w.shape)


def wanda_mask(
    w: torch.Tensor,
    input_norms: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Wanda keep-mask for ``w [out, in]`` with ``input_norms[j] = ‖X[:, j]‖₂``.

    Scores ``|w[i, j]| · input_norms[j]`` are compared within each output row:
    the ``⌊s·in⌋`` lowest are pruned, or, with ``n_m = (n, m)``, the ``n``
    lowest of every ``m`` consecutive inputs (``sparsity`` is then only
    range-checked; the achieved sparsity is ``n/m``).
    """
    w = check_float_tensor(w, "w", ndim=2)
    input_norms = check_float_tensor(input_norms, "input_norms", ndim=1)
    out_f, in_f = w.shape
    if input_norms.shape[0] != in_f:
        raise ShapeMismatchError(f"input_norms has length {input_norms.shape[0]} but w has {in_f} inputs")
    if bool((input_norms < 0).any()):
        raise InvalidArgumentError("input_norms must be nonnegative (they are L2 norms)")
    s = _check_sparsity(sparsity)
    score = w.detach().abs().to(torch.float64) * input_norms.detach().to(torch.float64).to(w.device)
    mask = torch.ones_like(score, dtype=torch.bool)
    if n_m is not None:
        n, m = _check_n_m(n_m, in_f)
        groups = score.reshape(out_f, in_f // m, m)
        order = torch.argsort(groups, dim=-1, stable=True)[..., :n]
        mask.reshape(out_f, in_f // m, m).scatter_(-1, order, False)
        return mask
    k = int(s * in_f)
    if k:
        order = torch.argsort(score, dim=-1, stable=True)[:, :k]
        mask.scatter_(1, order, False)
    return mask


def _check_n_m(n_m: object, width: int) -> tuple[int, int]:
    if not (isinstance(n_m, tuple) and len(n_m) == 2 and all(isinstance(v, int) for v in n_m)):
        raise InvalidArgumentError(f"n_m must be a pair of ints (n, m), got {n_m!r}")
    n, m = n_m
    if not 1 <= n < m:
        raise InvalidArgumentError(f"n_m = {n_m}: need 1 <= n < m")
    if width % m:
        raise InvalidArgumentError(f"n_m = {n_m}: m = {m} does not divide the input width {width}")
    return n, m


# ----------------------------------------------------------------------------
# quantization
# ----------------------------------------------------------------------------


def int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-wise absmax int8: one scale per output row.

    Returns ``(q int8 [out, in], scale [out])`` with ``scale = absmax/127`` and
    ``q = round(w / scale)`` (round half to even); an all-zero row gives
    ``scale = 0`` and ``q = 0``. ``scale`` is float64 for float64 input and
    float32 otherwise.
    """
    w = check_float_tensor(w, "w", ndim=2)
    wf = w.detach().to(compute_dtype(w))
    scale = wf.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(wf / safe.unsqueeze(1)).clamp(-127, 127)
    q = torch.where(scale.unsqueeze(1) > 0, q, torch.zeros_like(q))
    return q.to(torch.int8), scale


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q · scale`` per row; ``q int8 [out, in]``, ``scale [out]``; dtype of ``scale``."""
    q = check_tensor(q, "q", ndim=2)
    scale = check_float_tensor(scale, "scale", ndim=1)
    if q.dtype != torch.int8:
        raise InvalidArgumentError(f"q must be int8, got {q.dtype}")
    if scale.shape[0] != q.shape[0]:
        raise ShapeMismatchError(f"scale has length {scale.shape[0]} but q has {q.shape[0]} rows")
    if not scale.is_floating_point():
        raise InvalidArgumentError(f"scale must be floating point, got {scale.dtype}")
    return q.to(scale.dtype) * scale.unsqueeze(1)


def llm_int8_linear(x: torch.Tensor, w: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """LLM.int8 matmul ``x wᵀ`` with outlier decomposition; ``x [..., in]`` → ``[..., out]``.

    Input features where any token has ``|x| ≥ threshold`` are multiplied
    unquantized against the dequantized int8 weight columns; the rest use
    per-token absmax int8 activations (over the non-outlier features only)
    times the int8 weights, rescaled by both scales. ``threshold = inf`` is
    plain vector-wise int8; the integer products are exact (float64).
    """
    x = check_float_tensor(x, "x", min_ndim=1)
    w = check_float_tensor(w, "w", ndim=2)
    if x.shape[-1] != w.shape[1]:
        raise ShapeMismatchError(f"x has width {x.shape[-1]} but w has {w.shape[1]} inputs")
    thr = check_real(threshold, "threshold", allow_inf=True)
    if thr < 0:
        raise InvalidArgumentError(f"threshold must be >= 0 (inf disables outliers), got {threshold!r}")
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, x.shape[-1]).to(compute_dtype(x))
    qw, sw = int8_quantize(w)
    outlier = (x2.abs() >= thr).any(dim=0) if x2.shape[0] else torch.zeros(x.shape[-1], dtype=torch.bool)
    xr = torch.where(outlier, torch.zeros_like(x2), x2)
    sx = xr.abs().amax(dim=1) / 127.0 if x2.shape[0] else torch.zeros(0, dtype=x2.dtype)
    safe = torch.where(sx > 0, sx, torch.ones_like(sx))
    qx = torch.round(xr / safe.unsqueeze(1)).clamp(-127, 127)
    acc = qx.to(torch.float64) @ qw.to(torch.float64).T  # exact: integers below 2**53
    out = acc * sx.to(torch.float64).unsqueeze(1) * sw.to(torch.float64).unsqueeze(0)
    if bool(outlier.any()):
        wdq = int8_dequantize(qw, sw)
        out = out + x2[:, outlier].to(torch.float64) @ wdq[:, outlier].to(torch.float64).T
    return out.to(x.dtype).reshape(*lead, w.shape[0])


def _check_group(w: torch.Tensor, w_bit: object, group_size: object) -> tuple[int, int]:
    if isinstance(w_bit, bool) or not isinstance(w_bit, int) or not 2 <= w_bit <= 8:
        raise InvalidArgumentError(f"w_bit must be an int in [2, 8], got {w_bit!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise InvalidArgumentError(f"group_size must be a positive int, got {group_size!r}")
    if w.shape[-1] % group_size:
        raise InvalidArgumentError(f"group_size {group_size} does not divide the input width {w.shape[-1]}")
    return w_bit, group_size


def pseudo_quantize(w: torch.Tensor, w_bit: int, group_size: int, zero_point: bool = True) -> torch.Tensor:
    """Group-wise quantize then dequantize ``w [out, in]`` (AWQ's ``pseudo_quantize_tensor``).

    Per group of ``group_size`` consecutive inputs of a row. Asymmetric
    (``zero_point``): ``max_int = 2^b − 1``, ``scale = max((max − min)/max_int, 1e-5)``
    (the clamp is applied to ``max − min`` before dividing, as AWQ does),
    ``zero = clamp(round(−min/scale), 0, max_int)``; a group that does not
    contain 0 therefore cannot be represented to half a step. Symmetric:
    ``max_int = 2^(b−1) − 1``, ``scale = max(absmax, 1e-5)/max_int``, codes in
    ``[−2^(b−1), max_int]``. Same dtype as ``w``.
    """
    w = check_float_tensor(w, "w", ndim=2)
    w_bit, group_size = _check_group(w, w_bit, group_size)
    g = w.detach().to(compute_dtype(w)).reshape(-1, group_size)
    if zero_point:
        max_int = 2**w_bit - 1
        hi, lo = g.amax(dim=1, keepdim=True), g.amin(dim=1, keepdim=True)
        scale = (hi - lo).clamp(min=1e-5) / max_int
        zero = torch.round(-lo / scale).clamp(0, max_int)
        q = (torch.round(g / scale) + zero).clamp(0, max_int)
        out = (q - zero) * scale
    else:
        max_int = 2 ** (w_bit - 1) - 1
        min_int = -(2 ** (w_bit - 1))
        scale = g.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / max_int
        out = torch.round(g / scale).clamp(min_int, max_int) * scale
    return out.reshape(w.shape).to(w.dtype)


def _awq_candidate_scales(x_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    t = x_mean.pow(ratio).clamp(min=1e-4)
    return t / torch.sqrt(t.max() * t.min())


def awq_apply_scales(w: torch.Tensor, s: torch.Tensor, w_bit: int, group_size: int) -> torch.Tensor:
    """The effective weight ``Q(w·s)/s`` that AWQ's scaling yields for inputs ``x``.

    ``x wᵀ ≈ (x/s) Q(w·s)ᵀ = x (Q(w·s)/s)ᵀ``; with ``s = 1`` this is
    :func:`pseudo_quantize` (round to nearest).
    """
    w = check_float_tensor(w, "w", ndim=2)
    s = check_float_tensor(s, "s", ndim=1)
    if s.shape[0] != w.shape[1]:
        raise ShapeMismatchError(f"s has length {s.shape[0]} but w has {w.shape[1]} inputs")
    if not bool((s > 0).all()):
        raise InvalidArgumentError("s must be strictly positive")
    ws = w.to(torch.float64) * s.to(torch.float64)
    return (pseudo_quantize(ws, w_bit, group_size) / s.to(torch.float64)).to(w.dtype)


def awq_scales(w: torch.Tensor, x: torch.Tensor, w_bit: int, group_size: int, grid: int = 20) -> torch.Tensor:
    """AWQ's activation-aware per-input-channel scales ``s [in]`` for ``w [out, in]``.

    ``x [tokens, in]`` are calibration inputs. For each ``a`` in
    ``{0, 1/grid, …, (grid−1)/grid}``: ``t = max(mean|x|^a, 1e-4)``,
    ``s = t / sqrt(max(t)·min(t))``; the ``a`` minimizing
    ``‖x wᵀ − x (Q(w·s)/s)ᵀ‖²`` wins, the first on ties. Computed in float64.
    """
    w = check_float_tensor(w, "w", ndim=2)
    x = check_float_tensor(x, "x", ndim=2)
    if x.shape[1] != w.shape[1]:
        raise ShapeMismatchError(f"x has width {x.shape[1]} but w has {w.shape[1]} inputs")
    if x.shape[0] == 0:
        raise EmptyInputError("x holds no calibration tokens")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise InvalidArgumentError(f"grid must be a positive int, got {grid!r}")
    _check_group(w, w_bit, group_size)
    w64, x64 = w.detach().to(torch.float64), x.detach().to(torch.float64)
    x_mean = x64.abs().mean(dim=0)
    ref = x64 @ w64.T
    best_loss, best = math.inf, torch.ones_like(x_mean)
    for i in range(grid):
        s = _awq_candidate_scales(x_mean, i / grid)
        loss = float(((ref - x64 @ awq_apply_scales(w64, s, w_bit, group_size).T) ** 2).sum())
        if loss < best_loss:
            best_loss, best = loss, s
    return best.to(compute_dtype(w))


# ----------------------------------------------------------------------------
# refusal score
# ----------------------------------------------------------------------------


def check_refusal_ids(refusal_token_ids: object, vocab: int | None = None) -> torch.Tensor:
    """The ids as a 1-D long CPU tensor, each an integer in ``[0, vocab)`` when ``vocab`` is given.

    Anything that is not an integer (1.7, 1.0, True, "3", a float tensor) raises
    :class:`~refusal_core.errors.InvalidArgumentError` naming ``refusal_token_ids``.
    """
    ids = _refusal_ids(refusal_token_ids)
    if vocab is not None and bool(((ids < 0) | (ids >= vocab)).any()):
        raise InvalidArgumentError(f"refusal_token_ids must lie in [0, {vocab}), got {ids.tolist()}")
    return ids


def _refusal_ids(refusal_token_ids: object) -> torch.Tensor:
    name = "refusal_token_ids"
    if isinstance(refusal_token_ids, torch.Tensor):
        if refusal_token_ids.is_floating_point() or refusal_token_ids.is_complex():
            raise InvalidArgumentError(f"{name} must hold integers, got a {refusal_token_ids.dtype} tensor")
        if refusal_token_ids.dtype == torch.bool:
            raise InvalidArgumentError(f"{name} must hold integers, got a bool tensor")
        return refusal_token_ids.detach().to("cpu", torch.long).reshape(-1)
    if isinstance(refusal_token_ids, (str, bytes)) or not isinstance(refusal_token_ids, Sequence):
        raise InvalidArgumentError(
            f"{name} must be a sequence of ints or an integer tensor, got {type(refusal_token_ids).__name__}"
        )
    for i in refusal_token_ids:
        if isinstance(i, bool) or type(i).__name__ == "bool_" or not isinstance(i, numbers.Integral):
            raise InvalidArgumentError(
                f"{name} must hold integers, got {type(i).__name__} {i!r} in {list(refusal_token_ids)!r}"
            )
    return torch.tensor([int(i) for i in refusal_token_ids], dtype=torch.long)


def refusal_score(logits: torch.Tensor, refusal_token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Log-odds of the next-token probability mass on the refusal tokens.

    ``logits [..., vocab]`` → ``[...]`` float64:
    ``log(p + 1e-8) − log(1 − p + 1e-8)`` with ``p = Σ softmax(logits)[ids]``.
    """
    logits = check_float_tensor(logits, "logits", min_ndim=1)
    ids = check_refusal_ids(refusal_token_ids)
    if ids.numel() == 0:
        raise EmptyInputError("refusal_token_ids is empty")
    check_refusal_ids(ids, logits.shape[-1])
    if ids.unique().numel() != ids.numel():
        raise InvalidArgumentError(f"refusal_token_ids has duplicates: {ids.tolist()}")
    probs = torch.softmax(logits.detach().to(torch.float64), dim=-1)
    p = probs[..., ids.to(logits.device)].sum(-1)
    return torch.log(p + REFUSAL_SCORE_EPS) - torch.log(1 - p + REFUSAL_SCORE_EPS)
