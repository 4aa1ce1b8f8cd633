"""A correct outside implementation that computes differently from the reference.

It accumulates in float32 for float32 and bfloat16 inputs, rounds exact half steps away from
zero instead of to even, breaks ties between equal pruning scores the other way, multiplies
by reciprocals, and forms the softmax mass with logsumexp. The property suite, differential
checks included, must pass it: none of these differences is a bug.

Each function first runs the reference on the same arguments only to validate them, so bad
input raises the reference's RefusalCoreError subclasses; it opts into the strict error rule.
"""

from __future__ import annotations

import torch

from refusal_core import functional as ref

RAISES_REFUSAL_CORE_ERRORS = True


def _work(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def difference_in_means(harmful, harmless):
    ref.difference_in_means(harmful, harmless)
    return (harmful.mean(0) - harmless.mean(0)).to(torch.float64)


def ablate(x, r):
    ref.ablate(x, r)
    u = (r / r.to(torch.float64).norm()).to(_work(x))
    xw = x.to(_work(x))
    return (xw - (xw @ u).unsqueeze(-1) * u).to(x.dtype)


def add_direction(x, r, coeff):
    ref.add_direction(x, r, coeff)
    return (x.to(_work(x)) + coeff * r.to(_work(x))).to(x.dtype)


def orthogonalize_weight(w, r):
    ref.orthogonalize_weight(w, r)
    u = (r / r.to(torch.float64).norm()).to(_work(w))
    ww = w.to(_work(w))
    return (ww - u.unsqueeze(1) * (u @ ww).unsqueeze(0)).to(w.dtype)


def orthogonalize_embedding(e, r):
    ref.orthogonalize_embedding(e, r)
    return orthogonalize_weight(e.T, r).T.contiguous()


def aird_update(w, r, alpha, *, normalize=False, preserve_sparsity=False):
    ref.aird_update(w, r, alpha, normalize=normalize, preserve_sparsity=preserve_sparsity)
    work = _work(w)
    v = (r / r.to(torch.float64).norm()).to(work) if normalize else r.to(work)
    update = alpha * v.unsqueeze(1) * (v @ w.to(work)).unsqueeze(0)
    if preserve_sparsity:
        update = torch.where(w != 0, update, torch.zeros_like(update))
    return (w.to(work) + update).to(w.dtype)


def cosine_similarity(a, b):
    ref.cosine_similarity(a, b)
    a32, b32 = a.reshape(-1).to(_work(a)), b.reshape(-1).to(_work(b))
    c = float((a32 @ b32) / (a32.norm() * b32.norm()))
    return max(-1.0, min(1.0, c))


def _prune_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the n − k highest of the last axis; among equal scores the earlier index is kept."""
    n = score.shape[-1]
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(-1, order[..., : n - k], True)
    return mask


def magnitude_mask(w, sparsity):
    ref.magnitude_mask(w, sparsity)
    return _prune_lowest(w.abs().reshape(-1), int(sparsity * w.numel())).reshape(w.shape)


def wanda_mask(w, input_norms, sparsity, n_m=None):
    ref.wanda_mask(w, input_norms, sparsity, n_m=n_m)
    score = w.abs().to(_work(w)) * input_norms.to(_work(w))
    if n_m is not None:
        n, m = n_m
        return _prune_lowest(score.reshape(w.shape[0], -1, m), n).reshape(w.shape)
    return _prune_lowest(score, int(sparsity * w.shape[1]))


def int8_quantize(w):
    ref.int8_quantize(w)
    wf = w.to(_work(w))
    scale = wf.abs().amax(dim=1) * (1.0 / 127.0)
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, 1.0), 0.0)
    q = _round_half_away(wf * inv.unsqueeze(1)).clamp(-127, 127)
    return q.to(torch.int8), scale


def int8_dequantize(q, scale):
    ref.int8_dequantize(q, scale)
    return scale.unsqueeze(1) * q.to(scale.dtype)


def llm_int8_linear(x, w, threshold=6.0):
    ref.llm_int8_linear(x, w, threshold)
    work = _work(x)
    x2 = x.reshape(-1, x.shape[-1]).to(work)
    qw, sw = int8_quantize(w.to(work))
    outlier = (x2.abs() >= threshold).any(dim=0)
    regular = torch.where(outlier, torch.zeros_like(x2), x2)
    qx, sx = int8_quantize(regular)
    w_dq = qw.to(work) * sw.to(work).unsqueeze(1)
    out = (qx.to(work) @ qw.to(work).T) * sx.to(work).unsqueeze(1) * sw.to(work).unsqueeze(0)
    if bool(outlier.any()):
        out = out + x2[:, outlier] @ w_dq[:, outlier].T
    return out.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def pseudo_quantize(w, w_bit, group_size, zero_point=True):
    ref.pseudo_quantize(w, w_bit, group_size, zero_point)
    g = w.to(_work(w)).reshape(-1, group_size)
    if zero_point:
        max_int = 2**w_bit - 1
        hi, lo = g.amax(dim=1, keepdim=True), g.amin(dim=1, keepdim=True)
        scale = (hi - lo).clamp(min=1e-5) / max_int
        zero = _round_half_away(-lo / scale).clamp(0, max_int)
        q = (_round_half_away(g / scale) + zero).clamp(0, max_int)
        out = (q - zero) * scale
    else:
        max_int = 2 ** (w_bit - 1) - 1
        scale = g.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / max_int
        out = _round_half_away(g / scale).clamp(-max_int - 1, max_int) * scale
    return out.reshape(w.shape).to(w.dtype)


def awq_scales(w, x, w_bit, group_size, grid=20):
    ref.awq_scales(w, x, w_bit, group_size, grid=1)
    w64, x64 = w.to(torch.float64), x.to(torch.float64)
    x_mean = x64.abs().sum(dim=0) / x64.shape[0]
    target = x64 @ w64.T
    losses, scales = [], []
    for i in range(grid):
        t = x_mean.pow(i / grid).clamp(min=1e-4)
        s = t / torch.sqrt(t.max() * t.min())
        q = pseudo_quantize(w64 * s, w_bit, group_size) / s
        losses.append(float(((target - x64 @ q.T) ** 2).sum()))
        scales.append(s)
    best = min(range(grid), key=lambda i: (losses[i], i))
    return scales[best].to(_work(w))


def refusal_score(logits, refusal_token_ids):
    ref.refusal_score(logits, refusal_token_ids)
    l64 = logits.to(torch.float64)
    ids = torch.as_tensor(refusal_token_ids, dtype=torch.long).reshape(-1)
    p = torch.exp(torch.logsumexp(l64[..., ids], dim=-1) - torch.logsumexp(l64, dim=-1))
    return torch.log(p + 1e-8) - torch.log(1 - p + 1e-8)
