"""bitsandbytes as a real compression backend: LLM.int8 and NF4, on CPU or CUDA.

The reference simulation (:func:`~refusal_core.compression.quantization.quantize_llm_int8_`)
is the oracle; these methods run the library users actually deploy, so a
study can show that the two agree (``tests/test_bnb.py``).

===========  ================  ===================================================
label        config            every block linear becomes
===========  ================  ===================================================
bnb-int8     BnbInt8Config()   ``bnb.nn.Linear8bitLt(has_fp16_weights=False, threshold)``
bnb-nf4      BnbNf4Config()    ``bnb.nn.Linear4bit(quant_type="nf4")``
===========  ================  ===================================================

The modules are :class:`~refusal_core.compression._bnb_modules.BnbLinear8bit` /
``BnbLinear4bit``: the stock classes plus ``dequantize()`` and, for int8, an
eval mode that :meth:`~torch.nn.Module.train` cannot leave (bitsandbytes' CPU
training path skips the outlier split without a word). Embedding and
``lm_head`` stay float, as in the reference.

How bitsandbytes' LLM.int8 differs from the reference, measured in
``tests/test_bnb.py``: it casts weights and activations to float16 before
quantizing them (a float32 model's linears therefore see float16-rounded
inputs), and its per-token activation scale is the absmax over all entries
below the threshold, including the sub-threshold entries of an outlier
column (the reference drops whole outlier columns). Its threshold 0 means "no
outlier split"; :class:`BnbInt8Config` takes the reference's meaning
(``inf`` disables the split) and rejects 0.

bitsandbytes is optional (the ``bnb`` extra). This module imports it only
when a method runs, so ``import refusal_core`` works without it; a method
then raises :class:`~refusal_core.errors.InvalidArgumentError` saying what to
install.

Example:
    >>> from refusal_core.compression import compress_
    >>> from refusal_core.testing.tiny import tiny_model
    >>> model = tiny_model("llama")
    >>> record = compress_(model, BnbInt8Config())  # doctest: +SKIP
    >>> record.method  # doctest: +SKIP
    'bnb-int8'
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from refusal_core.compression._common import BlockLinear, relative_error, require_float_linears
from refusal_core.compression._registry import register_method
from refusal_core.compression._transaction import transactional
from refusal_core.compression.calibration import Calibration
from refusal_core.compression.config import (
    CompressionConfig,
    check_positive_int,
    check_threshold,
)
from refusal_core.errors import InvalidArgumentError, UnsupportedArchitectureError, UnsupportedModuleError
from refusal_core.model import get_layout

__all__ = [
    "BNB_EXTRA_HINT",
    "NF4_BLOCKSIZES",
    "BnbInt8Config",
    "BnbNf4Config",
    "apply_bnb_nf4_",
    "bnb_available",
    "dequantize_bnb",
    "four_bit_settings",
    "is_bnb_4bit",
    "is_bnb_int8",
    "quantize_bnb_int8_",
    "quantize_bnb_nf4_",
]

#: What to tell a user who asked for a bitsandbytes method without the library.
BNB_EXTRA_HINT = "install the 'bnb' extra: pip install 'refusal_core[bnb]' (or pip install bitsandbytes)"

#: Block sizes bitsandbytes' 4-bit quantizer accepts.
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

_COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


# ----------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BnbInt8Config(CompressionConfig):
    """bitsandbytes LLM.int8: input features with any ``|x| ≥ threshold`` multiply in 16-bit.

    ``threshold`` has the reference's meaning (:class:`~refusal_core.compression.config.Int8Config`):
    ``inf`` disables the outlier split; it must be > 0 (bitsandbytes reads 0 as "disabled").
    """

    threshold: float = 6.0

    def __post_init__(self) -> None:
        thr = check_threshold(self.threshold)
        if thr == 0.0:
            raise InvalidArgumentError(
                "threshold must be > 0: bitsandbytes reads 0 as 'no outlier split'; use inf for that"
            )


@dataclass(frozen=True)
class BnbNf4Config(CompressionConfig):
    """bitsandbytes NF4 (QLoRA's 4-bit NormalFloat), block-wise absmax scales.

    ``compute_dtype``: ``None`` (bitsandbytes computes in the input's dtype for
    float32/bfloat16 input and in float32 for float16 input), ``"float32"``,
    ``"float16"`` or ``"bfloat16"``. ``blocksize``: weights per absmax scale,
    one of :data:`NF4_BLOCKSIZES`. ``double_quant``: quantize the scales
    themselves (8-bit, QLoRA's double quantization). ``cpu_packing``: let
    bitsandbytes repack the weight for its AVX512-BF16 CPU kernel at the first
    forward (its scales are then rounded to bfloat16, so results depend on the
    CPU); off by default.
    """

    compute_dtype: str | None = None
    blocksize: int = 64
    double_quant: bool = True
    cpu_packing: bool = False

    def __post_init__(self) -> None:
        if self.compute_dtype is not None and self.compute_dtype not in _COMPUTE_DTYPES:
            raise InvalidArgumentError(
                f"compute_dtype must be None or one of {sorted(_COMPUTE_DTYPES)}, got {self.compute_dtype!r}"
            )
        check_positive_int(self.blocksize, "blocksize")
        if self.blocksize not in NF4_BLOCKSIZES:
            raise InvalidArgumentError(f"blocksize must be one of {NF4_BLOCKSIZES}, got {self.blocksize!r}")
        for name in ("double_quant", "cpu_packing"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def torch_compute_dtype(self) -> torch.dtype | None:
        """``compute_dtype`` as a ``torch.dtype`` (None stays None)."""
        return None if self.compute_dtype is None else _COMPUTE_DTYPES[self.compute_dtype]


# ----------------------------------------------------------------------------
# the optional dependency
# ----------------------------------------------------------------------------


def bnb_available() -> bool:
    """Whether bitsandbytes can be imported (checked without importing it)."""
    if "bitsandbytes" in sys.modules:  # imported already, or blocked with a None entry
        return sys.modules["bitsandbytes"] is not None
    try:
        return importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):
        return False


def _modules() -> ModuleType:
    """The private module holding the bitsandbytes classes; raises with an install hint if absent."""
    if not bnb_available():
        raise InvalidArgumentError(
            f"this method needs bitsandbytes, which is not installed; {BNB_EXTRA_HINT}"
        )
    try:
        from refusal_core.compression import _bnb_modules
    except ImportError as exc:  # installed but broken (e.g. no binary for this platform)
        raise InvalidArgumentError(
            f"bitsandbytes is installed but does not import ({exc}); {BNB_EXTRA_HINT}"
        ) from exc
    return _bnb_modules


def _loaded_bnb() -> Any:
    # A module can only be a bitsandbytes module if bitsandbytes has been imported.
    return sys.modules.get("bitsandbytes")


def is_bnb_int8(module: object) -> bool:
    """Whether ``module`` is a ``bnb.nn.Linear8bitLt`` holding int8 weights."""
    bnb = _loaded_bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt) and module.weight.dtype == torch.int8


def is_bnb_4bit(module: object) -> bool:
    """Whether ``module`` is a quantized ``bnb.nn.Linear4bit`` (nf4 or fp4)."""
    bnb = _loaded_bnb()
    return (
        bnb is not None
        and isinstance(module, bnb.nn.Linear4bit)
        and (getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)) is not None
    )


def four_bit_settings(module: nn.Module) -> dict[str, Any]:
    """What is needed to quantize a new weight exactly as the bitsandbytes 4-bit ``module`` was
    (quant type, block size, statistics compression, dtypes, CPU packing)."""
    settings: dict[str, Any] = _modules().four_bit_settings(module)
    return settings


def dequantize_bnb(module: nn.Module) -> torch.Tensor:
    """The float weight ``[out, in]`` a bitsandbytes linear computes with, as a new tensor.

    ``Linear8bitLt`` (int8): ``CB · SCB / 127`` in float32 (bitsandbytes'
    ``int8_vectorwise_dequant``). ``Linear4bit``: bitsandbytes'
    ``dequantize_4bit``, in the dtype the weight was quantized from. Works for
    modules made by refusal_core and for stock ones (e.g. from
    ``transformers``' ``BitsAndBytesConfig``). Anything else raises
    :class:`~refusal_core.errors.UnsupportedModuleError`.
    """
    try:
        if is_bnb_int8(module):
            w: torch.Tensor = _modules().dequantize_int8(module)
            return w
        if is_bnb_4bit(module):
            w = _modules().dequantize_4bit(module)
            return w
    except ValueError as exc:  # bitsandbytes-side state the module cannot be read back from
        raise UnsupportedModuleError(f"cannot dequantize {type(module).__name__}: {exc}") from exc
    raise UnsupportedModuleError(f"{type(module).__name__} is not a quantized bitsandbytes linear")


# ----------------------------------------------------------------------------
# model-level quantization
# ----------------------------------------------------------------------------


def _checked_linears(model: nn.Module, operation: str) -> tuple[Any, list[BlockLinear]]:
    layout = get_layout(model)
    if any(layout.is_moe(layer) for layer in range(layout.n_layers)):
        # bitsandbytes swaps nn.Linear modules; fused 3-D experts would silently stay float.
        raise UnsupportedArchitectureError(
            f"{operation}: {layout.spec.family} keeps its routed experts as fused 3-D parameters, which "
            f"bitsandbytes cannot quantize; use the per-expert simulation 'llm-int8'"
        )
    linears = require_float_linears(layout, operation)
    for bl in linears:
        if bl.linear.weight.device.type == "meta":
            raise UnsupportedModuleError(
                f"{operation}: {bl.full_name} is offloaded (weights on the meta device); load it on a device"
            )
    return layout, linears


@transactional  # all or nothing: restored exactly if anything raises after a write
def quantize_bnb_int8_(model: nn.Module, threshold: float = 6.0) -> dict[str, float]:
    """Replace every block linear by a bitsandbytes int8 ``Linear8bitLt`` in eval mode, in place.

    ``threshold`` as in :class:`BnbInt8Config`. Each module stays on its
    weight's device (CPU or CUDA). Returns the relative Frobenius rounding
    error ``‖W_int8 − W‖/‖W‖`` per module (full name). Everything is checked
    (bitsandbytes present, plain float ``nn.Linear`` weights, threshold) before
    the first module changes.
    """
    thr = BnbInt8Config(threshold).threshold
    mods = _modules()
    layout, linears = _checked_linears(model, "bitsandbytes int8 quantization")
    errors: dict[str, float] = {}
    with torch.no_grad():
        for bl in linears:
            lin = bl.linear
            new = mods.int8_from_weight(lin.weight, lin.bias, thr, lin.weight.device)
            errors[bl.full_name] = relative_error(new.dequantize(), lin.weight)
            layout.set_linear_(bl.layer, bl.name, new)
    return errors


def quantize_bnb_nf4_(
    model: nn.Module,
    *,
    compute_dtype: str | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
    cpu_packing: bool = False,
) -> dict[str, float]:
    """Replace every block linear by a bitsandbytes NF4 ``Linear4bit``, in place.

    Arguments as in :class:`BnbNf4Config`; the weight is quantized from its
    own dtype. Returns the relative Frobenius rounding error per module.
    Checked before the first module changes; on the CPU ``blocksize`` must
    divide every input width (bitsandbytes 0.50's CPU kernel dequantizes
    blocks that span two rows with the wrong scales).
    """
    return apply_bnb_nf4_(model, BnbNf4Config(compute_dtype, blocksize, double_quant, cpu_packing))


@transactional  # all or nothing: restored exactly if anything raises after a write
def apply_bnb_nf4_(model: nn.Module, config: BnbNf4Config) -> dict[str, float]:
    """:func:`quantize_bnb_nf4_` with its settings as one (already validated) config."""
    mods = _modules()
    layout, linears = _checked_linears(model, "bitsandbytes nf4 quantization")
    if config.cpu_packing:
        for bl in linears:
            # bitsandbytes' CPU repacking works on 32-row tiles of whole byte pairs.
            if bl.linear.out_features % 32 or bl.linear.in_features % 2:
                raise InvalidArgumentError(
                    f"cpu_packing needs out_features % 32 == 0 and even in_features; {bl.full_name} is "
                    f"[{bl.linear.out_features}, {bl.linear.in_features}]"
                )
    for bl in linears:
        lin = bl.linear
        if lin.weight.device.type == "cpu" and not mods.cpu_4bit_rows_ok(lin.in_features, config.blocksize):
            raise InvalidArgumentError(
                f"blocksize {config.blocksize} does not divide the input width {lin.in_features} of "
                f"{bl.full_name}: bitsandbytes' CPU 4-bit kernel is wrong for blocks that span rows; "
                f"use a blocksize dividing every input width (e.g. 32) or a CUDA device"
            )
    errors: dict[str, float] = {}
    with torch.no_grad():
        for bl in linears:
            lin = bl.linear
            new = mods.nf4_from_weight(
                lin.weight,
                lin.bias,
                lin.weight.device,
                quant_type="nf4",
                blocksize=config.blocksize,
                compress_statistics=config.double_quant,
                compute_dtype=config.torch_compute_dtype,
                cpu_packing=config.cpu_packing,
            )
            errors[bl.full_name] = relative_error(new.dequantize(), lin.weight)
            layout.set_linear_(bl.layer, bl.name, new)
    return errors


@register_method(
    BnbInt8Config,
    "bnb-int8",
    needs_calibration=False,
    kind="quantization",
    storage="bitsandbytes-int8",
    requantize="module-scheme",
    extra="bnb",
    available=lambda: bnb_available(),  # late-bound: a test may monkeypatch it
    install_hint=BNB_EXTRA_HINT,
    bits=8,
)
def _bnb_int8(
    model: nn.Module,
    config: BnbInt8Config,
    calibration: Calibration | None,
    *,
    batch_size: int,
    progress: bool,
) -> dict[str, float]:
    return quantize_bnb_int8_(model, config.threshold)


@register_method(
    BnbNf4Config,
    "bnb-nf4",
    needs_calibration=False,
    kind="quantization",
    storage="bitsandbytes-nf4",
    requantize="module-scheme",
    extra="bnb",
    available=lambda: bnb_available(),  # late-bound: a test may monkeypatch it
    install_hint=BNB_EXTRA_HINT,
    bits=4,
)
def _bnb_nf4(
    model: nn.Module,
    config: BnbNf4Config,
    calibration: Calibration | None,
    *,
    batch_size: int,
    progress: bool,
) -> dict[str, float]:
    return apply_bnb_nf4_(model, config)
