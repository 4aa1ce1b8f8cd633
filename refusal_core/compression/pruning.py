"""Pruning a whole model in place: magnitude and Wanda (unstructured and N:M).

Only the seven linears of every decoder block are pruned (``q_proj`` …
``down_proj``); the embedding, the final norm and ``lm_head`` never are. The
masks come from the functional core (:func:`~refusal_core.functional.magnitude_mask`,
:func:`~refusal_core.functional.wanda_mask`); this module only walks the model
and gathers Wanda's input norms.

Example:
    >>> from refusal_core.testing.tiny import tiny_model
    >>> model = tiny_model("llama")
    >>> per_module = prune_magnitude_(model, 0.5)
    >>> min(per_module.values()) == 0.5
    True
"""

from __future__ import annotations

import torch

from refusal_core.compression._common import block_linears, require_float_linears
from refusal_core.compression.calibration import Calibration, SequentialBlocks, prepare_calibration
from refusal_core.compression.config import check_n_m, check_sparsity
from refusal_core.errors import InvalidArgumentError
from refusal_core.functional import magnitude_mask, wanda_mask
from refusal_core.models import get_layout

__all__ = ["prune_magnitude_", "prune_wanda_"]


def _zero_fraction(w: torch.Tensor) -> float:
    return float((w == 0).sum()) / w.numel()


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
    out: dict[str, float] = {}
    with torch.no_grad():
        for bl in linears:
            w = bl.linear.weight
            w.masked_fill_(~magnitude_mask(w, s), 0.0)
            out[bl.full_name] = _zero_fraction(w)
    return out


def prune_wanda_(
    model: torch.nn.Module,
    calibration: Calibration,
    sparsity: float = 0.5,
    n_m: tuple[int, int] | None = None,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, float]:
    """Wanda pruning of every block linear, in place, with sequential calibration.

    Scores ``|W[i, j]|·‖X[:, j]‖₂`` where ``X`` are the linear's inputs at the
    real (non-padding) calibration tokens. Blocks are pruned in order; block
    ``l`` is calibrated on the outputs of blocks ``0..l-1`` as already pruned,
    while all linears of block ``l`` see inputs computed with block ``l``
    still unpruned (as in Wanda). Per output row ``⌊sparsity·d_in⌋`` weights
    are zeroed, or with ``n_m = (n, m)`` the ``n`` lowest of every ``m``
    consecutive inputs.

    ``calibration``: token ids, see :func:`~refusal_core.compression.calibration.prepare_calibration`.
    Returns the achieved sparsity per module. Everything is validated (sparsity,
    ``n_m`` dividing every input width, calibration tokens, finite weights and
    activations) before the first weight changes.
    """
    s = check_sparsity(sparsity)
    nm = check_n_m(n_m)
    layout = get_layout(model)
    linears = require_float_linears(layout, "Wanda pruning")
    if nm is not None:
        for bl in linears:
            if bl.linear.in_features % nm[1]:
                raise InvalidArgumentError(
                    f"n_m = {nm}: m = {nm[1]} does not divide the input width "
                    f"{bl.linear.in_features} of {bl.full_name}"
                )
    batches = prepare_calibration(
        calibration,
        vocab_size=int(layout.embedding.weight.shape[0]),
        batch_size=batch_size,
        device=layout.embedding.weight.device,
    )
    runner = SequentialBlocks(layout, batches, progress=progress)
    by_layer: dict[int, dict[str, torch.nn.Linear]] = {}
    full_names: dict[tuple[int, str], str] = {}
    for bl in block_linears(layout):
        by_layer.setdefault(bl.layer, {})[bl.name] = bl.linear
        full_names[bl.layer, bl.name] = bl.full_name

    out: dict[str, float] = {}
    for layer in runner.layers("Wanda"):
        modules = by_layer[layer]
        sq_sums = {
            name: torch.zeros(m.weight.shape[1], dtype=torch.float64, device=m.weight.device)
            for name, m in modules.items()
        }

        def accumulate(name: str, x: torch.Tensor, sq_sums: dict[str, torch.Tensor] = sq_sums) -> None:
            sq_sums[name] += x.to(torch.float64).pow(2).sum(0)

        runner.collect(layer, modules, accumulate)
        with torch.no_grad():
            for name, m in modules.items():
                w = m.weight
                w.masked_fill_(~wanda_mask(w, sq_sums[name].sqrt(), s, nm), 0.0)
                out[full_names[layer, name]] = _zero_fraction(w)
        if layer + 1 < layout.n_layers:
            runner.advance(layer)
    return out
