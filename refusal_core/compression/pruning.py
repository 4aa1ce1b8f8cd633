"""Pruning a whole model in place: magnitude and Wanda (unstructured and N:M).

Only the seven linears of every decoder block are pruned (``q_proj`` …
``down_proj``); the embedding, the final norm and ``lm_head`` never are.
In a Mixture-of-Experts block the attention linears, any shared expert's
linears and every routed expert's ``gate_up_proj[e]`` and ``down_proj[e]``
(each one matrix) are pruned; the router never is. Wanda scores an expert's
columns with the norms of the calibration tokens *routed to it*; an expert no
calibration token reaches is left as it is and named in ``unrouted`` (no
silent fallback to magnitude). Mamba: the mixer's four linears. The
masks are those of the functional core (:func:`~refusal_core.functional.magnitude_mask`,
:func:`~refusal_core.functional.wanda_mask`; Wanda's is computed here without
a full sort, to the same mask); this module walks the model and gathers
Wanda's input norms.

Example:
    >>> from refusal_core.testing.tiny import tiny_model
    >>> model = tiny_model("llama")
    >>> per_module = prune_magnitude_(model, 0.5)
    >>> min(per_module.values()) == 0.5
    True
"""

from __future__ import annotations

import logging

import torch

from refusal_core.compression._common import block_linears, effective_weight, require_float_linears
from refusal_core.compression._experts import (
    ExpertMatrix,
    expert_effective_weights,
    expert_matrices,
    routed_inputs,
)
from refusal_core.compression._transaction import transactional
from refusal_core.compression.calibration import Calibration, SequentialBlocks
from refusal_core.compression.config import check_n_m, check_sparsity
from refusal_core.errors import InvalidArgumentError
from refusal_core.functional import check_tensor, magnitude_mask
from refusal_core.model import LINEAR_INPUTS, ModelLayout, get_layout, input_taps

__all__ = ["model_sparsity", "prune_magnitude_", "prune_wanda_"]

_log = logging.getLogger(__name__)


def _zero_fraction(w: torch.Tensor) -> float:
    return float((w == 0).sum()) / w.numel()


def _lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` lowest entries along the last dim, ties going to the lower index.

    That is exactly the first ``k`` of a stable ascending argsort: every entry
    below the ``k``-th smallest value ``v``, then the leftmost entries equal to
    ``v`` until ``k`` are taken. ``v`` comes from ``kthvalue`` (its value is
    unambiguous under ties), several times cheaper than the sort.
    """
    v = torch.kthvalue(score, k, dim=-1, keepdim=True).values
    below = score < v
    at = score == v
    need = k - below.sum(dim=-1, keepdim=True)  # >= 1: fewer than k entries lie below v
    if bool((at.sum(dim=-1, keepdim=True) == need).all()):
        return below | at  # no surplus ties anywhere (the usual case): no running count needed
    return below | (at & (at.cumsum(dim=-1) <= need))


def _wanda_keep_mask(
    w: torch.Tensor, input_norms: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None
) -> torch.Tensor:
    """:func:`~refusal_core.functional.wanda_mask` for checked inputs: the same mask, without a sort.

    ``w [out, in]`` finite, ``input_norms [in]`` finite and nonnegative; the
    scores are computed by the same expression as in ``wanda_mask``, and each
    row (or N:M group) prunes what the first ``k`` entries of its stable argsort
    would (:func:`_lowest_k`).
    """
    score = w.detach().abs().to(torch.float64) * input_norms.detach().to(torch.float64).to(w.device)
    out_f, in_f = score.shape
    if n_m is not None:
        n, m = n_m
        return ~_lowest_k(score.reshape(out_f, in_f // m, m), n).reshape(out_f, in_f)
    k = int(sparsity * in_f)  # the same float64 expression as wanda_mask's ⌊s·in⌋
    if k == 0:
        return torch.ones_like(score, dtype=torch.bool)
    return ~_lowest_k(score, k)


def model_sparsity(layout: ModelLayout) -> tuple[float, dict[str, float]]:
    """Fraction of exact zeros over all block linears and routed expert matrices, and per module."""
    per: dict[str, float] = {}
    zeros = total = 0
    weights = [(bl.full_name, effective_weight(bl.module)) for bl in block_linears(layout)]
    for full_name, w in weights + expert_effective_weights(layout):  # MoE: each routed expert matrix too
        z = int((w == 0).sum())
        per[full_name] = z / w.numel()
        zeros += z
        total += w.numel()
    return (zeros / total if total else 0.0), per


@transactional  # all or nothing: restored exactly if anything raises after a write
def prune_magnitude_(model: torch.nn.Module, sparsity: float) -> dict[str, float]:
    """Zero exactly ``⌊sparsity·numel⌋`` smallest-``|W|`` entries of every block linear, in place.

    One comparison group per matrix. Returns the achieved sparsity per module
    (full module name → fraction of zeros). Raises before changing anything for
    a sparsity outside [0, 1), a non-float or non-finite linear, or an
    unsupported architecture.
    """
    s = check_sparsity(sparsity)
    layout = get_layout(model)
    linears = require_float_linears(layout, "magnitude pruning")
    experts = expert_matrices(layout, "magnitude pruning")
    out: dict[str, float] = {}
    with torch.no_grad():
        for bl in linears:
            w = bl.linear.weight
            w.masked_fill_(~magnitude_mask(w, s), 0.0)
            out[bl.full_name] = _zero_fraction(w)
        for em in experts:  # one comparison group per expert matrix, as for a linear
            w = em.weight
            w.masked_fill_(~magnitude_mask(w, s), 0.0)
            out[em.full_name] = _zero_fraction(w)
    return out


@transactional  # all or nothing: restored exactly if anything raises after a write
def prune_wanda_(
    model: torch.nn.Module,
    calibration: Calibration,
    sparsity: float = 0.5,
    n_m: tuple[int, int] | None = None,
    *,
    batch_size: int = 8,
    progress: bool = False,
    unrouted: list[str] | None = None,
) -> dict[str, float]:
    """Wanda pruning of every block linear, in place, with sequential calibration.

    Scores ``|W[i, j]|·‖X[:, j]‖₂`` where ``X`` are the linear's inputs at the
    real (non-padding) calibration tokens. Blocks are pruned in order; block
    ``l`` is calibrated on the outputs of blocks ``0..l-1`` as already pruned,
    while all linears of block ``l`` see inputs computed with block ``l``
    still unpruned (as in Wanda). Per output row ``⌊sparsity·d_in⌋`` weights
    are zeroed, or with ``n_m = (n, m)`` the ``n`` lowest of every ``m``
    consecutive inputs.

    Routed experts (MoE blocks): ``gate_up_proj[e]`` is scored with the norms
    of the tokens routed to expert ``e`` (those whose top-k includes it),
    ``down_proj[e]`` with the norms of ``act(gate)·up`` on them. An expert no
    calibration token reaches is not pruned; its matrices' full names are
    appended to ``unrouted`` (when given) and logged as a warning.

    ``calibration``: token ids, see :func:`~refusal_core.compression.calibration.prepare_calibration`.
    Returns the achieved sparsity per module. Everything is validated (sparsity,
    ``n_m`` dividing every input width, calibration tokens, finite weights and
    activations) before the first weight changes.
    """
    s = check_sparsity(sparsity)
    nm = check_n_m(n_m)
    layout = get_layout(model)
    linears = require_float_linears(layout, "Wanda pruning")
    experts = expert_matrices(layout, "Wanda pruning")
    if unrouted is not None and not isinstance(unrouted, list):
        raise InvalidArgumentError(
            f"unrouted must be a list to append to, or None; got {type(unrouted).__name__}"
        )
    if nm is not None:
        widths = [(bl.linear.in_features, bl.full_name) for bl in linears]
        widths += [(int(em.weight.shape[1]), em.full_name) for em in experts]
        for width, full_name in widths:
            if width % nm[1]:
                raise InvalidArgumentError(
                    f"n_m = {nm}: m = {nm[1]} does not divide the input width {width} of {full_name}"
                )
    runner = SequentialBlocks.from_calibration(layout, calibration, batch_size=batch_size, progress=progress)
    by_layer: dict[int, dict[str, torch.nn.Linear]] = {}
    full_names: dict[tuple[int, str], str] = {}
    for bl in block_linears(layout):
        by_layer.setdefault(bl.layer, {})[bl.name] = bl.linear
        full_names[bl.layer, bl.name] = bl.full_name

    experts_by_layer: dict[int, list[ExpertMatrix]] = {}
    for em in experts:
        experts_by_layer.setdefault(em.layer, []).append(em)

    out: dict[str, float] = {}
    for layer in runner.layers("Wanda"):
        modules = by_layer[layer]
        fused = layout.experts(layer) if layer in experts_by_layer else None
        # Linears fed the very same tensor (q/k/v, gate/up) share one accumulation.
        first = input_taps(modules)
        source = {n: first[LINEAR_INPUTS[n]] for n in modules}
        taps = {name: modules[name] for name in first.values()}
        sq_sums = {
            name: torch.zeros(m.weight.shape[1], dtype=torch.float64, device=m.weight.device)
            for name, m in taps.items()
        }

        seen = dict.fromkeys(sq_sums, 0)

        def accumulate(
            name: str,
            x: torch.Tensor,
            sq_sums: dict[str, torch.Tensor] = sq_sums,
            seen: dict[str, int] = seen,
        ) -> None:
            sq_sums[name] += x.to(torch.float64).pow(2).sum(0)
            seen[name] += x.shape[0]

        calls = runner.collect(layer, taps, accumulate, record=None if fused is None else {"experts": fused})
        # Each expert's inputs: only the tokens routed to it (computed before anything in the block changes).
        routed = None if fused is None else routed_inputs(fused, calls["experts"])
        blind = [name for name, n in seen.items() if n == 0]
        if blind:  # a linear whose module is never called (its weight used directly) has no input norms
            raise InvalidArgumentError(f"Wanda: block {layer} linears {blind} received no calibration input")
        with torch.no_grad():
            for name, m in modules.items():
                w = m.weight
                # Checked as wanda_mask would: an activation that overflowed inside the block.
                norms = check_tensor(sq_sums[source[name]].sqrt(), f"input norms of {name}")
                w.masked_fill_(~_wanda_keep_mask(w, norms, s, nm), 0.0)
                out[full_names[layer, name]] = _zero_fraction(w)
            for em in experts_by_layer.get(layer, []):
                assert routed is not None
                w = em.weight
                if routed[em.expert].n_tokens == 0:
                    _log.warning("Wanda: no calibration token is routed to %s; left unpruned", em.full_name)
                    if unrouted is not None:
                        unrouted.append(em.full_name)
                else:
                    x = routed[em.expert].gate_up if em.name == "gate_up_proj" else routed[em.expert].down
                    sq = x.to(torch.float64).pow(2).sum(0)
                    norms = check_tensor(sq.sqrt(), f"routed input norms of {em.full_name}")
                    w.masked_fill_(~_wanda_keep_mask(w, norms, s, nm), 0.0)
                out[em.full_name] = _zero_fraction(w)
        if layer + 1 < layout.n_layers:
            runner.advance(layer)
    return out
