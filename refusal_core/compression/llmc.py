"""llmcompressor as a real compression backend: Wanda, SparseGPT, AWQ and GPTQ through ``oneshot``.

The reference implementations (:func:`~refusal_core.compression.pruning.prune_wanda_`,
:func:`~refusal_core.compression.quantization.quantize_awq_`) are the oracle;
these methods run the library users deploy, so a study can show that the two
agree (``tests/llmc/test_llmc.py``) and add SparseGPT, which has no reference
here, as a further compression method.

==============  ==========================  ======================================================
label           config                      llmcompressor recipe
==============  ==========================  ======================================================
llmc-wanda      LlmcWandaConfig()           ``WandaPruningModifier(sparsity, mask_structure)``
llmc-sparsegpt  LlmcSparseGptConfig()       ``SparseGPTModifier(sparsity, mask_structure, ...)``
llmc-awq        LlmcAwqConfig()             ``AWQModifier`` then ``QuantizationModifier`` (group-wise int)
llmc-gptq       LlmcGptqConfig()            ``GPTQModifier`` (group-wise int, GPTQ's error feedback)
==============  ==========================  ======================================================

:data:`LLMC_METHODS` maps the CLI names (``llmc-wanda``, ``sparsegpt-50``, ...)
to default configs.

How a run works. ``oneshot`` is given a *deep copy* of the model (so the
model's memory is needed twice), calibration sequences as an in-memory
``datasets.Dataset`` of token ids (one unpadded sequence per sample, batch size
1, nothing downloaded) and a recipe restricted to the seven linears of every
decoder block (the embedding and ``lm_head`` are never touched). Its
sequential pipeline calibrates block ``l`` on the outputs of the already
compressed blocks ``0..l-1``, as the reference does. The results are then
copied back into the caller's model, which stays a plain transformers model:
pruned weights as they are, AWQ weights as their dequantized (fake-quantized)
values in plain ``nn.Linear`` modules, and the norms and linears that AWQ's
scaling changed. Nothing of llmcompressor (hooks, quantization parameters,
wrapped ``forward``) is left on the caller's model.

Differences from the reference, as measured in ``tests/llmc/test_llmc.py``:

- Wanda: scores ``|W|·‖X_j‖`` are computed in float32 (the reference uses
  float64), so entries tied at a row's threshold may fall either way; all
  others agree.
- AWQ: the scale search minimizes the error of the whole parent module's output
  (attention, MLP) rather than of the group's linears, ``duo_scaling`` (the
  default) mixes weight magnitudes into the scales, the grid is ``i/(n−1)``,
  and there is no clip search.
- SparseGPT: llmcompressor masks every entry whose score is ``≤`` the
  ``(k+1)``-th smallest of a column block (``k = ⌊s·rows·b⌋``), i.e. one entry
  too many per block of ``block_size`` inputs. With ``exact=True`` (default) the
  sparsity handed to it is lowered per linear so that every block loses exactly
  ``⌊s·rows·b⌋`` entries; ``exact=False`` keeps llmcompressor's count.

On CPU, llmcompressor 0.14's AWQ pins the cached activations in page-locked
memory, which needs an accelerator; while a method runs without one, pinning is
disabled (the cache is then used as is).

llmcompressor is optional (the ``llmc`` extra) and pins transformers ≤ 5.17,
so it lives in its own environment (``tox -e llmc``). This module imports it
only when a method runs, so ``import refusal_core`` works without it; a method
then raises :class:`~refusal_core.errors.InvalidArgumentError` saying what to
install.

Example:
    >>> from refusal_core.compression import compress_
    >>> from refusal_core.testing.tiny import tiny_model
    >>> model = tiny_model("llama", d_model=64)
    >>> calibration = [[1, 5, 9, 12, 40, 41, 7]] * 4
    >>> record = compress_(model, LlmcWandaConfig(0.5), calibration)  # doctest: +SKIP
    >>> record.method, record.sparsity  # doctest: +SKIP
    ('llmc-wanda', 0.5)
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, cast

import torch
from torch import nn

from refusal_core.compression._common import BlockLinear, relative_error, require_float_linears
from refusal_core.compression._registry import method_specs, register_method, required_calibration
from refusal_core.compression.calibration import Calibration, prepare_calibration
from refusal_core.compression.config import (
    CompressionConfig,
    check_n_m,
    check_positive_int,
    check_sparsity,
)
from refusal_core.errors import InvalidArgumentError
from refusal_core.model import get_layout

__all__ = [
    "LLMC_EXTRA_HINT",
    "LLMC_METHODS",
    "LlmcAwqConfig",
    "LlmcGptqConfig",
    "LlmcSparseGptConfig",
    "LlmcWandaConfig",
    "calibration_dataset",
    "llmc_available",
    "prune_sparsegpt_llmc_",
    "prune_wanda_llmc_",
    "quantize_awq_llmc_",
    "quantize_gptq_llmc_",
    "sparsegpt_block_sparsities",
]

#: What to tell a user who asked for an llmcompressor method without the library.
LLMC_EXTRA_HINT = (
    "install the 'llmc' extra in its own environment (llmcompressor pins transformers <= 5.17): "
    "pip install 'torch==2.13.0' 'refusal_core[llmc]' (or pip install 'llmcompressor==0.14.*'); "
    "see tox -e llmc"
)


# ----------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LlmcWandaConfig(CompressionConfig):
    """llmcompressor's Wanda: per output row the ``⌊sparsity·d_in⌋`` lowest ``|W|·‖X_j‖`` zeroed.

    ``n_m = (n, m)`` zeroes the ``n`` lowest of every ``m`` consecutive inputs
    instead (``sparsity`` is then only range-checked), as the reference.
    """

    sparsity: float = 0.5
    n_m: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        object.__setattr__(self, "n_m", check_n_m(self.n_m))


@dataclass(frozen=True)
class LlmcSparseGptConfig(CompressionConfig):
    """llmcompressor's SparseGPT: OBS pruning with error compensation, ``block_size`` inputs at a time.

    ``dampening_frac``: added to the Hessian's diagonal, as a fraction of its
    mean. ``exact``: correct llmcompressor's one-extra-entry-per-block mask so
    that each block of ``block_size`` inputs loses exactly ``⌊sparsity·rows·b⌋``
    entries (see the module docstring); ignored for ``n_m``, which is exact.
    """

    sparsity: float = 0.5
    n_m: tuple[int, int] | None = None
    block_size: int = 128
    dampening_frac: float = 0.01
    exact: bool = True

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        object.__setattr__(self, "n_m", check_n_m(self.n_m))
        check_positive_int(self.block_size, "block_size")
        d = self.dampening_frac
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not float(d) >= 0.0 or math.isinf(d):
            raise InvalidArgumentError(f"dampening_frac must be a finite number >= 0, got {d!r}")
        if not isinstance(self.exact, bool):
            raise InvalidArgumentError(f"exact must be a bool, got {self.exact!r}")


@dataclass(frozen=True)
class LlmcAwqConfig(CompressionConfig):
    """llmcompressor's AWQ followed by group-wise integer weight quantization (weights only).

    ``group_size`` is capped per linear at its input width (``min(group_size,
    d_in)``), as the reference. ``zero_point``: asymmetric (True) or symmetric
    groups. ``n_grid``: grid points of the scale search. ``duo_scaling``:
    llmcompressor's choice of scale formula: True (``mean|x|^a / mean|w|^(1−a)``,
    plus the identity), False (``mean|x|^a``, the reference's formula) or
    ``"both"`` (half the grid each).
    """

    w_bit: int = 4
    group_size: int = 128
    zero_point: bool = True
    n_grid: int = 20
    duo_scaling: bool | str = True

    def __post_init__(self) -> None:
        check_positive_int(self.w_bit, "w_bit", low=2, high=8)
        check_positive_int(self.group_size, "group_size")
        if not isinstance(self.zero_point, bool):
            raise InvalidArgumentError(f"zero_point must be a bool, got {self.zero_point!r}")
        duo = self.duo_scaling
        if duo is True:
            low = 3
        elif duo is False:
            low = 2
        elif duo == "both" and isinstance(duo, str):
            low = 4
        else:
            raise InvalidArgumentError(f"duo_scaling must be True, False or 'both', got {duo!r}")
        # llmcompressor divides by n_grid − 2 (True), n_grid − 1 (False) or n_grid/2 − 1 ("both").
        check_positive_int(self.n_grid, "n_grid", low=low)


@dataclass(frozen=True)
class LlmcGptqConfig(CompressionConfig):
    """llmcompressor's GPTQ: group-wise integer weights, each column rounded in turn and its error
    spread over the columns not yet rounded through the inverse Hessian of the calibration inputs.

    ``group_size`` is capped per linear at its input width; ``zero_point``: asymmetric (True) or
    symmetric groups; ``block_size``: columns updated together; ``dampening_frac``: the fraction of
    the Hessian's mean diagonal added to it before inversion. Columns are taken in their natural
    order (llmcompressor's ``actorder=None``; its own default is the "static" act-order).
    """

    w_bit: int = 4
    group_size: int = 128
    zero_point: bool = False
    block_size: int = 128
    dampening_frac: float = 0.01

    def __post_init__(self) -> None:
        check_positive_int(self.w_bit, "w_bit", low=2, high=8)
        check_positive_int(self.group_size, "group_size")
        check_positive_int(self.block_size, "block_size")
        if not isinstance(self.zero_point, bool):
            raise InvalidArgumentError(f"zero_point must be a bool, got {self.zero_point!r}")
        d = self.dampening_frac
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not float(d) >= 0.0 or math.isinf(d):
            raise InvalidArgumentError(f"dampening_frac must be a finite number >= 0, got {d!r}")


# ----------------------------------------------------------------------------
# the optional dependency
# ----------------------------------------------------------------------------


def llmc_available() -> bool:
    """Whether llmcompressor can be imported (checked without importing it: the import takes seconds)."""
    return "llmcompressor" in sys.modules or importlib.util.find_spec("llmcompressor") is not None


def _require_llmc() -> None:
    if not llmc_available():
        raise InvalidArgumentError(
            f"this method needs llmcompressor, which is not installed; {LLMC_EXTRA_HINT}"
        )
    try:
        import llmcompressor  # noqa: F401
    except Exception as exc:  # installed but broken, e.g. against a newer transformers
        raise InvalidArgumentError(
            f"llmcompressor is installed but does not import ({type(exc).__name__}: {exc}); {LLMC_EXTRA_HINT}"
        ) from exc


# ----------------------------------------------------------------------------
# calibration data and the oneshot run
# ----------------------------------------------------------------------------


def calibration_dataset(calibration: Calibration, *, vocab_size: int | None = None) -> Any:
    """The calibration sequences as an in-memory ``datasets.Dataset`` for ``oneshot``.

    Accepts every form of :func:`~refusal_core.compression.calibration.prepare_calibration`
    (validated the same way). Columns ``input_ids`` and ``attention_mask``
    (all ones): one row per sequence with its padding removed, so that
    llmcompressor (batch size 1) sees exactly the reference's real tokens at
    the same positions.
    """
    from datasets import Dataset

    batches = prepare_calibration(calibration, vocab_size=vocab_size, batch_size=1 << 30)
    rows: list[list[int]] = []
    for batch in batches:
        for ids, mask in zip(batch.input_ids, batch.token_mask):
            rows.append([int(t) for t in ids[mask].tolist()])
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


class _PretokenizedInput:
    """Stands in for a tokenizer: ``oneshot`` insists on a processor whenever a dataset is given.

    The dataset is already tokenized and collated by truncation at batch size 1,
    so llmcompressor never calls it; nothing is saved (no ``output_dir``).
    """

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - never called
        raise InvalidArgumentError("refusal_core's llmcompressor runs do not save a processor")


@contextlib.contextmanager
def _cpu_pinning_disabled() -> Iterator[None]:
    """Make llmcompressor's activation-cache pinning a no-op while no accelerator exists.

    Pinned (page-locked) memory only speeds host→device copies; without an
    accelerator ``Tensor.pin_memory()`` raises, and llmcompressor 0.14's AWQ
    calls it unconditionally. The original method is restored on exit.
    """
    from llmcompressor.pipelines.cache import IntermediatesCache

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        yield
        return
    cache_cls: Any = IntermediatesCache
    original = cache_cls.pin_memory

    def no_pin(self: Any, batch_index: int, input_names: list[str] | None = None) -> None:
        return None

    cache_cls.pin_memory = no_pin
    try:
        yield
    finally:
        cache_cls.pin_memory = original


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence llmcompressor's per-module loguru messages unless ``enabled``."""
    if enabled:
        yield
        return
    from loguru import logger

    names = ("llmcompressor", "compressed_tensors")
    for name in names:
        logger.disable(name)
    try:
        yield
    finally:
        for name in names:
            logger.enable(name)


def _full_names(model: nn.Module, linears: list[BlockLinear]) -> list[str]:
    """Names of the block linears relative to ``model`` itself (what llmcompressor matches).

    In ``linears``' order, which must be ``model.named_modules()`` order: a
    per-target sparsity list is read in that order by llmcompressor.
    """
    order = {id(m): (i, n) for i, (n, m) in enumerate(model.named_modules())}
    positions = [order[id(bl.module)][0] for bl in linears]
    if positions != sorted(positions):
        raise InvalidArgumentError("the block linears are not in module order; cannot map targets")
    return [order[id(bl.module)][1] for bl in linears]


def _run_oneshot(
    model: nn.Module,
    calibration: Calibration,
    recipe: Any,
    *,
    progress: bool,
) -> nn.Module:
    """Run ``oneshot`` on a deep copy of ``model``; returns the compressed copy (``model`` untouched)."""
    from llmcompressor import oneshot
    from llmcompressor.core import active_session

    layout = get_layout(model)
    dataset = calibration_dataset(calibration, vocab_size=int(layout.embedding.weight.shape[0]))
    work: Any = copy.deepcopy(model)
    with tempfile.TemporaryDirectory(prefix="refusal_core_llmc_") as tmp:
        # oneshot re-reads the config from config.name_or_path (to refuse pre-quantized checkpoints);
        # a tiny or in-memory model has no such path, so point it at a copy of its own config.
        work.config.save_pretrained(tmp)
        work.config.name_or_path = tmp
        with _quiet(progress), _cpu_pinning_disabled():
            try:
                oneshot(
                    model=work,
                    processor=cast(Any, _PretokenizedInput()),
                    dataset=dataset,
                    recipe=recipe,
                    num_calibration_samples=len(dataset),
                    shuffle_calibration_samples=False,
                    batch_size=1,
                )
            finally:
                # The global session keeps the model and modifiers alive otherwise.
                active_session().reset()
    return work


def _copy_back_(model: nn.Module, work: nn.Module, linear_names: list[str]) -> dict[str, torch.Tensor]:
    """Copy every parameter of ``work`` into ``model``; block linears get their effective weight.

    The effective weight of a linear that llmcompressor quantized is its
    fake-quantized weight (what its forward computes with). Returns the
    weights of the block linears before quantization (the scaled ``W'``), by name.
    """
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    work_params = dict(work.named_parameters())
    targets = set(linear_names)
    before: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            src = work_params[name]
            if module_name in targets and leaf == "weight":
                module = work.get_submodule(module_name)
                before[module_name] = src.detach().clone()
                scheme = getattr(module, "quantization_scheme", None)
                args = getattr(scheme, "weights", None)
                if args is not None:
                    src = fake_quantize(
                        src, module.weight_scale, getattr(module, "weight_zero_point", None), args
                    )
            param.copy_(src.to(dtype=param.dtype, device=param.device))
    return before


def _check_n_m_widths(linears: list[BlockLinear], n_m: tuple[int, int] | None) -> None:
    if n_m is None:
        return
    for bl in linears:
        if bl.linear.in_features % n_m[1]:
            raise InvalidArgumentError(
                f"n_m = {n_m}: m = {n_m[1]} does not divide the input width "
                f"{bl.linear.in_features} of {bl.full_name}"
            )


def _zero_fractions(model: nn.Module, names: list[str]) -> dict[str, float]:
    out = {}
    for name in names:
        w = _weight(model, name)
        out[name] = float((w == 0).sum()) / w.numel()
    return out


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    w = model.get_submodule(name).weight
    assert isinstance(w, torch.Tensor)
    return w


# ----------------------------------------------------------------------------
# the three methods
# ----------------------------------------------------------------------------


def prune_wanda_llmc_(
    model: nn.Module,
    calibration: Calibration,
    sparsity: float = 0.5,
    n_m: tuple[int, int] | None = None,
    *,
    progress: bool = False,
) -> dict[str, float]:
    """Wanda pruning of every block linear by llmcompressor, in place.

    Same contract as :func:`~refusal_core.compression.pruning.prune_wanda_`:
    per output row ``⌊sparsity·d_in⌋`` weights zeroed (or ``n`` of every ``m``
    consecutive inputs with ``n_m``), blocks pruned in order on the outputs of
    the already pruned ones. Returns the achieved sparsity per module (name in
    ``model``). Raises before changing anything for bad arguments or a missing
    llmcompressor.
    """
    s = check_sparsity(sparsity)
    nm = check_n_m(n_m)
    layout = get_layout(model)
    linears = require_float_linears(layout, "llmcompressor Wanda")
    _check_n_m_widths(linears, nm)
    _require_llmc()
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    names = _full_names(model, linears)
    recipe = WandaPruningModifier(
        sparsity=s, mask_structure="0:0" if nm is None else f"{nm[0]}:{nm[1]}", targets=names
    )
    work = _run_oneshot(model, calibration, recipe, progress=progress)
    _copy_back_(model, work, names)
    return _zero_fractions(model, names)


def sparsegpt_block_sparsities(rows: int, columns: int, sparsity: float, block_size: int) -> float | None:
    """The sparsity to hand llmcompressor's SparseGPT so that each column block loses ``⌊s·rows·b⌋``.

    llmcompressor prunes ``int(rows·b·s') + 1`` entries of a block of ``b``
    columns (ties aside). Returns an ``s'`` with ``int(rows·b·s') = ⌊s·rows·b⌋ − 1``
    for every block width ``b`` of a ``rows × columns`` matrix, or ``None`` when
    no single value does (then ``s`` is used as is) or a block would prune nothing.
    """
    widths = {min(block_size, columns - start) for start in range(0, columns, block_size)}
    low, high = -math.inf, math.inf
    for b in widths:
        n = rows * b
        k = math.floor(sparsity * n)
        if k < 1:
            return None
        # int(n·s') = k − 1  ⇔  (k − 1)/n ≤ s' < k/n
        low, high = max(low, (k - 1) / n), min(high, k / n)
    if not low < high:
        return None
    return (low + high) / 2


def prune_sparsegpt_llmc_(
    model: nn.Module,
    calibration: Calibration,
    sparsity: float = 0.5,
    n_m: tuple[int, int] | None = None,
    *,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    exact: bool = True,
    progress: bool = False,
) -> dict[str, float]:
    """SparseGPT pruning of every block linear by llmcompressor, in place.

    Blocks are pruned in order on the outputs of the already pruned ones; the
    weights that stay are updated to compensate (OBS). With ``exact`` each
    column block of ``block_size`` inputs loses exactly ``⌊sparsity·rows·b⌋``
    entries (see :func:`sparsegpt_block_sparsities`); with ``n_m = (n, m)``
    exactly ``n`` of every ``m`` consecutive inputs of a row. Returns the
    achieved sparsity per module. Raises before changing anything for bad
    arguments or a missing llmcompressor.
    """
    return _sparsegpt_llmc_(
        model, calibration, LlmcSparseGptConfig(sparsity, n_m, block_size, dampening_frac, exact), progress
    )


def _sparsegpt_llmc_(
    model: nn.Module, calibration: Calibration, cfg: LlmcSparseGptConfig, progress: bool
) -> dict[str, float]:
    layout = get_layout(model)
    linears = require_float_linears(layout, "llmcompressor SparseGPT")
    _check_n_m_widths(linears, cfg.n_m)
    _require_llmc()
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    names = _full_names(model, linears)
    per_linear: list[float] = []
    for bl in linears:
        w = bl.linear.weight
        fixed = (
            sparsegpt_block_sparsities(int(w.shape[0]), int(w.shape[1]), cfg.sparsity, cfg.block_size)
            if cfg.exact and cfg.n_m is None
            else None
        )
        per_linear.append(cfg.sparsity if fixed is None else fixed)
    recipe = SparseGPTModifier(
        # One entry per target, in model order: the targets are the linears themselves.
        sparsity=per_linear if len(set(per_linear)) > 1 else per_linear[0],
        mask_structure="0:0" if cfg.n_m is None else f"{cfg.n_m[0]}:{cfg.n_m[1]}",
        block_size=cfg.block_size,
        dampening_frac=float(cfg.dampening_frac),
        targets=names,
    )
    work = _run_oneshot(model, calibration, recipe, progress=progress)
    _copy_back_(model, work, names)
    return _zero_fractions(model, names)


def quantize_awq_llmc_(
    model: nn.Module,
    calibration: Calibration,
    w_bit: int = 4,
    group_size: int = 128,
    *,
    zero_point: bool = True,
    n_grid: int = 20,
    duo_scaling: bool | str = True,
    progress: bool = False,
) -> dict[str, float]:
    """AWQ by llmcompressor, then group-wise int quantization of every block linear, in place.

    The scales are folded as in the reference (norm → q/k/v, v → o without
    grouped-query attention, norm → gate/up, up → down); every block linear
    is then quantized with ``w_bit`` bits in groups of ``min(group_size, d_in)``
    inputs, and the caller's model receives the dequantized weights in plain
    ``nn.Linear`` modules. Returns the relative Frobenius rounding error
    ``‖Q(W') − W'‖/‖W'‖`` per module, ``W'`` the weight after scaling (as the
    reference). Raises before changing anything for bad arguments (a group size
    that does not divide an input width) or a missing llmcompressor.
    """
    return _awq_llmc_(
        model, calibration, LlmcAwqConfig(w_bit, group_size, zero_point, n_grid, duo_scaling), progress
    )


def _awq_llmc_(
    model: nn.Module, calibration: Calibration, cfg: LlmcAwqConfig, progress: bool
) -> dict[str, float]:
    layout = get_layout(model)
    linears = require_float_linears(layout, "llmcompressor AWQ")
    groups: dict[int, list[str]] = {}
    names = _full_names(model, linears)
    for bl, name in zip(linears, names):
        gs = min(cfg.group_size, bl.linear.in_features)
        if bl.linear.in_features % gs:
            raise InvalidArgumentError(
                f"group_size {cfg.group_size} does not divide the input width "
                f"{bl.linear.in_features} of {bl.full_name}"
            )
        groups.setdefault(gs, []).append(name)
    _require_llmc()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    # One scheme per effective group size; targets are exact module names, so lm_head is never matched.
    config_groups = {
        f"group_{gs}": QuantizationScheme(
            targets=group_names,
            weights=QuantizationArgs(
                num_bits=cfg.w_bit,
                type="int",
                symmetric=not cfg.zero_point,
                strategy="group",
                group_size=gs,
            ),
        )
        for gs, group_names in groups.items()
    }
    recipe = [
        AWQModifier(duo_scaling=cast(Any, cfg.duo_scaling), n_grid=cfg.n_grid),
        QuantizationModifier(config_groups=config_groups),
    ]
    work = _run_oneshot(model, calibration, recipe, progress=progress)
    scaled = _copy_back_(model, work, names)
    with torch.no_grad():
        return {name: relative_error(_weight(model, name), scaled[name].to(torch.float64)) for name in names}


def _group_schemes(
    names: list[str], linears: list[BlockLinear], w_bit: int, group_size: int, zero_point: bool
) -> dict[str, Any]:
    """One llmcompressor scheme per effective group size, targeting exact module names (never lm_head)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    groups: dict[int, list[str]] = {}
    for bl, name in zip(linears, names):
        groups.setdefault(min(group_size, bl.linear.in_features), []).append(name)
    return {
        f"group_{gs}": QuantizationScheme(
            targets=group_names,
            weights=QuantizationArgs(
                num_bits=w_bit, type="int", symmetric=not zero_point, strategy="group", group_size=gs
            ),
        )
        for gs, group_names in groups.items()
    }


def quantize_gptq_llmc_(
    model: nn.Module,
    calibration: Calibration,
    w_bit: int = 4,
    group_size: int = 128,
    *,
    zero_point: bool = False,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    progress: bool = False,
) -> dict[str, float]:
    """GPTQ by llmcompressor on every block linear, in place (dequantized weights in plain ``nn.Linear``).

    Blocks are calibrated in order on the outputs of the already quantized ones (llmcompressor's
    sequential pipeline). Returns the relative Frobenius error ``‖Q(W) − W‖/‖W‖`` per module. Raises
    before changing anything for a group size that does not divide an input width or a missing
    llmcompressor.
    """
    cfg = LlmcGptqConfig(w_bit, group_size, zero_point, block_size, dampening_frac)
    return _gptq_llmc_(model, calibration, cfg, progress)


def _gptq_llmc_(
    model: nn.Module, calibration: Calibration, cfg: LlmcGptqConfig, progress: bool
) -> dict[str, float]:
    layout = get_layout(model)
    linears = require_float_linears(layout, "llmcompressor GPTQ")
    names = _full_names(model, linears)
    for bl in linears:
        gs = min(cfg.group_size, bl.linear.in_features)
        if bl.linear.in_features % gs:
            raise InvalidArgumentError(
                f"group_size {cfg.group_size} does not divide the input width "
                f"{bl.linear.in_features} of {bl.full_name}"
            )
    _require_llmc()
    from llmcompressor.modifiers.quantization import GPTQModifier

    original = {name: _weight(model, name).detach().clone() for name in names}
    recipe = GPTQModifier(
        config_groups=_group_schemes(names, linears, cfg.w_bit, cfg.group_size, cfg.zero_point),
        block_size=cfg.block_size,
        dampening_frac=cfg.dampening_frac,
        # Columns in their natural order (GPTQ without act-order), so the groups' scales are the
        # static min/max of the original weights and the small reference in tests/llmc reproduces it.
        actorder=None,
    )
    work = _run_oneshot(model, calibration, recipe, progress=progress)
    _copy_back_(model, work, names)
    with torch.no_grad():
        return {name: relative_error(_weight(model, name), original[name]) for name in names}


# ----------------------------------------------------------------------------
# registry entries
# ----------------------------------------------------------------------------


@register_method(
    LlmcWandaConfig,
    "llmc-wanda",
    needs_calibration=True,
    kind="pruning",
    storage="dense",
    requantize="keep-zeros",
    names={"llmc-wanda": LlmcWandaConfig(), "llmc-wanda-2:4": LlmcWandaConfig(n_m=(2, 4))},
    extra="llmc",
    available=lambda: llmc_available(),  # late-bound: a test may monkeypatch it
    install_hint=LLMC_EXTRA_HINT,
)
def _llmc_wanda(
    model: nn.Module,
    config: LlmcWandaConfig,
    calibration: Calibration | None,
    *,
    batch_size: int,
    progress: bool,
) -> dict[str, float]:
    calibration = required_calibration(calibration, "llmc-wanda")
    prune_wanda_llmc_(model, calibration, config.sparsity, config.n_m, progress=progress)
    return {}


@register_method(
    LlmcSparseGptConfig,
    "llmc-sparsegpt",
    needs_calibration=True,
    kind="pruning",
    storage="dense",
    requantize="keep-zeros",
    names={
        "llmc-sparsegpt": LlmcSparseGptConfig(),
        "sparsegpt-50": LlmcSparseGptConfig(sparsity=0.5),
        "sparsegpt-2:4": LlmcSparseGptConfig(n_m=(2, 4)),
    },
    extra="llmc",
    available=lambda: llmc_available(),  # late-bound: a test may monkeypatch it
    install_hint=LLMC_EXTRA_HINT,
)
def _llmc_sparsegpt(
    model: nn.Module,
    config: LlmcSparseGptConfig,
    calibration: Calibration | None,
    *,
    batch_size: int,
    progress: bool,
) -> dict[str, float]:
    _sparsegpt_llmc_(model, required_calibration(calibration, "llmc-sparsegpt"), config, progress)
    return {}


@register_method(
    LlmcAwqConfig,
    "llmc-awq",
    needs_calibration=True,
    kind="simulation",
    storage="dequantized-simulation",
    requantize="weight-groups",
    names={"llmc-awq-w4": LlmcAwqConfig(w_bit=4), "llmc-awq-w8": LlmcAwqConfig(w_bit=8)},
    extra="llmc",
    available=lambda: llmc_available(),  # late-bound: a test may monkeypatch it
    install_hint=LLMC_EXTRA_HINT,
    bits=lambda c: c.w_bit,
)
def _llmc_awq(
    model: nn.Module,
    config: LlmcAwqConfig,
    calibration: Calibration | None,
    *,
    batch_size: int,
    progress: bool,
) -> dict[str, float]:
    return _awq_llmc_(model, required_calibration(calibration, "llmc-awq"), config, progress)


@register_method(
    LlmcGptqConfig,
    "llmc-gptq",
    needs_calibration=True,
    kind="simulation",
    storage="dequantized-simulation",
    requantize="weight-groups",
    names={"llmc-gptq-w4": LlmcGptqConfig(w_bit=4), "llmc-gptq-w8": LlmcGptqConfig(w_bit=8)},
    extra="llmc",
    available=lambda: llmc_available(),  # late-bound: a test may monkeypatch it
    install_hint=LLMC_EXTRA_HINT,
    bits=lambda c: c.w_bit,
)
def _llmc_gptq(
    model: nn.Module,
    config: LlmcGptqConfig,
    calibration: Calibration | None,
    *,
    batch_size: int,
    progress: bool,
) -> dict[str, float]:
    return _gptq_llmc_(model, required_calibration(calibration, "llmc-gptq"), config, progress)


#: CLI name → default config of the llmcompressor methods (read from the method table). Read-only.
LLMC_METHODS: Mapping[str, CompressionConfig] = MappingProxyType(
    {name: config for spec in method_specs() if spec.extra == "llmc" for name, config in spec.names.items()}
)
