"""Hugging Face checkpoints out: a directory that plain transformers loads, plus a refusal_core record.

:func:`save_checkpoint` writes what ``AutoModelForCausalLM.from_pretrained(dir)``
and ``AutoTokenizer.from_pretrained(dir)`` load (``config.json``,
``model.safetensors``, the tokenizer files with its chat template,
``generation_config.json``) and ``refusal_core.json``, which says what the
model is and vouches for every other file by its sha256.
:func:`read_checkpoint_record` reads that record back and checks the hashes (the record's
format, its sealing and reading live in the saving layer, :mod:`refusal_core.saving.checkpoints`;
this module decides what a model's modules are and how they are written).

How each kind of model is stored (``format`` in the record):

==========================  ====================================================================
format                      written as
==========================  ====================================================================
``dense``                   plain float weights (base, pruned: zeros included, AIRD-edited, ...)
``dequantized-simulation``  the simulations (``Int8LinearSim``, AWQ fake quantization; the method table's
                            ``storage`` names them, :func:`~refusal_core.compression.method_spec`):
                            their exact dequantized float weights in plain ``nn.Linear`` weights;
                            ``simulated_method`` names the scheme. Plain transformers computes
                            with those weights only: LLM.int8's activation quantization is not
                            in the file, :func:`~refusal_core.model.load_model` re-applies it
``bitsandbytes-int8``,      transformers' own bitsandbytes serialization (int8 weights + scales,
``bitsandbytes-nf4``        packed 4-bit + quant state; ``quantization_config`` in config.json);
                            transformers reloads it on CPU and CUDA, and a model it loaded saves again
==========================  ====================================================================

The directory is built in a temporary sibling and renamed into place
(:func:`~refusal_core.saving.files.staged_directory`), so a killed process leaves
the previous checkpoint or the new one, never a mix.

Example:
    >>> import tempfile
    >>> from refusal_core.testing.tiny import tiny_model, tiny_tokenizer
    >>> out = Path(tempfile.mkdtemp()) / "ckpt"
    >>> model = tiny_model("llama")
    >>> path = save_checkpoint(model, tiny_tokenizer(), out, record={"method": None})
    >>> read_checkpoint_record(path)["format"]
    'dense'
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusal_core._finite import all_finite
from refusal_core.compression import effective_weight, spec_of_recorded_method
from refusal_core.compression.bnb import four_bit_settings, is_bnb_4bit, is_bnb_int8
from refusal_core.compression.quantization import Int8ExpertsSim
from refusal_core.errors import InvalidArgumentError, NonFiniteError, UnsupportedModuleError
from refusal_core.model import get_layout, model_identity
from refusal_core.model.simulated import Int8LinearSim, restore_checkpoint_modules_
from refusal_core.saving.checkpoints import (
    CHECKPOINT_FORMATS,
    CHECKPOINT_KIND,
    CHECKPOINT_RECORD,
    CHECKPOINT_VERSION,
    is_checkpoint_dir,
    read_checkpoint_record,
    seal_checkpoint_dir,
)
from refusal_core.saving.files import finite_or_null, json_default, staged_directory

__all__ = [
    "CHECKPOINT_FORMATS",
    "CHECKPOINT_KIND",
    "CHECKPOINT_RECORD",
    "CHECKPOINT_VERSION",
    "read_checkpoint_record",
    "restore_checkpoint_modules_",
    "save_checkpoint",
]


def _package_versions(fmt: str) -> dict[str, str]:
    names = ["torch", "transformers", "safetensors", "refusal_core"]
    if fmt.startswith("bitsandbytes"):
        names.append("bitsandbytes")
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def _json_record(record: object) -> dict[str, Any]:
    """``record`` as a strict-JSON dict: NaN and ±infinity become null (strict parsers reject them)."""
    if not isinstance(record, Mapping):
        raise InvalidArgumentError(f"record must be a mapping, got {type(record).__name__}")
    try:
        data = json.loads(json.dumps(finite_or_null(dict(record)), allow_nan=False, default=json_default))
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"record is not JSON-serializable: {exc}") from None
    assert isinstance(data, dict)
    return data


# ----------------------------------------------------------------------------
# what the model is
# ----------------------------------------------------------------------------


def _module_kinds(model: nn.Module) -> dict[str, list[str]]:
    """Full names of the bitsandbytes int8 / 4-bit and simulated int8 modules of ``model``."""
    kinds: dict[str, list[str]] = {"bnb-int8": [], "bnb-4bit": [], "int8-sim": []}
    for name, module in model.named_modules():
        if isinstance(module, Int8ExpertsSim):  # its per-expert linears have no fused form to write back
            raise UnsupportedModuleError(
                f"{name} is a per-expert LLM.int8 simulation; it cannot be saved as a checkpoint yet "
                f"(save before quantizing, or quantize the experts with AWQ)"
            )
        if is_bnb_int8(module):
            kinds["bnb-int8"].append(name)
        elif is_bnb_4bit(module):
            kinds["bnb-4bit"].append(name)
        elif isinstance(module, Int8LinearSim):
            kinds["int8-sim"].append(name)
    return kinds


def _recorded_storage(method: object) -> str | None:
    """The storage format the method table gives the compression a recorded ``method`` names."""
    spec = spec_of_recorded_method(method)
    return None if spec is None else spec.storage


def _infer_format(kinds: Mapping[str, list[str]], method: object, declared: object) -> str:
    present = [k for k, names in kinds.items() if names]
    if len(present) > 1:
        raise InvalidArgumentError(
            f"model mixes quantized module kinds {present}; cannot store it as one format"
        )
    if present == ["bnb-int8"]:
        fmt = "bitsandbytes-int8"
    elif present == ["bnb-4bit"]:
        fmt = "bitsandbytes-nf4"
    elif present == ["int8-sim"] or _recorded_storage(method) == "dequantized-simulation":
        # AWQ's fake quantization (reference or llmcompressor) leaves float weights on the grid:
        # the method table, not the module types, says that they are a simulation.
        fmt = "dequantized-simulation"
    else:
        fmt = "dense"
    if declared is not None and declared != fmt:
        # A record may say that float weights are a simulation (e.g. AIRD on an AWQ model), not
        # contradict what the modules are.
        if not (declared == "dequantized-simulation" and fmt == "dense"):
            raise InvalidArgumentError(
                f"record declares format {declared!r} but the model's modules make it {fmt!r}"
            )
        fmt = str(declared)
    if fmt not in CHECKPOINT_FORMATS:  # pragma: no cover - guarded above
        raise InvalidArgumentError(f"format {fmt!r} is not one of {CHECKPOINT_FORMATS}")
    return fmt


def _check_finite(model: nn.Module) -> None:
    """Raise :class:`NonFiniteError` naming the first non-finite float weight (also dequantized ones)."""
    for name, module in model.named_modules():
        # bitsandbytes keeps integer codes and scales in its own objects: check what it computes with.
        # Everything else (Int8LinearSim included: q, scale, bias) is checked tensor by tensor.
        if is_bnb_int8(module) or is_bnb_4bit(module):
            tensors = {"weight (dequantized)": effective_weight(module)}
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                tensors["bias"] = bias
        else:
            tensors = {
                k: v
                for k, v in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
                if isinstance(v, torch.Tensor)
            }
        for key, t in tensors.items():
            if t.is_floating_point() and t.device.type != "meta" and not all_finite(t):
                where = f"{name}.{key}" if name else key
                raise NonFiniteError(f"{where} contains NaN or infinity; refusing to save the checkpoint")


def _skip_modules(model: nn.Module, quantized: list[str]) -> list[str]:
    """Full names of the plain ``nn.Linear`` modules (not quantized), for transformers' skip list."""
    done = set(quantized)
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in done)


def _bnb_quantization_config(model: nn.Module, fmt: str, kinds: Mapping[str, list[str]]) -> dict[str, Any]:
    """The ``quantization_config`` transformers needs to rebuild the bitsandbytes modules."""
    if fmt == "bitsandbytes-int8":
        modules: list[Any] = [model.get_submodule(n) for n in kinds["bnb-int8"]]
        thresholds = {float(m.state.threshold) for m in modules}
        if len(thresholds) != 1:
            raise InvalidArgumentError(
                f"bitsandbytes int8 modules use several thresholds {sorted(thresholds)}"
            )
        (thr,) = thresholds
        return {
            "quant_method": "bitsandbytes",
            "load_in_8bit": True,
            "load_in_4bit": False,
            # bitsandbytes reads threshold 0 as "no outlier split" (refusal_core's inf).
            "llm_int8_threshold": 0.0 if math.isinf(thr) else thr,
            "llm_int8_skip_modules": _skip_modules(model, kinds["bnb-int8"]),
            "llm_int8_has_fp16_weight": False,
        }
    names = kinds["bnb-4bit"]
    settings = [four_bit_settings(model.get_submodule(n)) for n in names]
    s0 = settings[0]
    for key in ("quant_type", "compress_statistics", "compute_dtype", "quant_storage"):
        if any(s[key] != s0[key] for s in settings):
            raise InvalidArgumentError(
                f"bitsandbytes 4-bit modules disagree on {key}; cannot store one config"
            )
    if s0["quant_type"] != "nf4":
        raise InvalidArgumentError(f"4-bit quant_type {s0['quant_type']!r} is not nf4")
    compute = s0["compute_dtype"] or torch.float32
    return {
        "quant_method": "bitsandbytes",
        "load_in_8bit": False,
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": bool(s0["compress_statistics"]),
        "bnb_4bit_compute_dtype": str(compute).removeprefix("torch."),
        "bnb_4bit_quant_storage": str(s0["quant_storage"]).removeprefix("torch."),
        "llm_int8_skip_modules": _skip_modules(model, names),
        # Not a transformers field (BitsAndBytesConfig drops it; save_checkpoint moves it into the record).
        "refusal_core_cpu_packing": bool(s0["cpu_packing"]),
    }


@contextmanager
def _dequantized_simulations(model: nn.Module, names: list[str]) -> Iterator[dict[str, float]]:
    """Swap every ``Int8LinearSim`` for an ``nn.Linear`` with its exact dequantized weight, then back.

    Yields ``{module name: threshold}``. The dequantized weight is cast to the
    model's dtype: ``q · scale`` is already rounded to it (``scale`` has that dtype).
    """
    originals: dict[str, nn.Module] = {}
    thresholds: dict[str, float] = {}
    try:
        for name in names:
            sim: Any = model.get_submodule(name)
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            w = sim.dequantize()
            lin = nn.Linear(sim.in_features, sim.out_features, bias=sim.bias is not None, device="meta")
            lin.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
            if sim.bias is not None:
                lin.bias = nn.Parameter(sim.bias.detach().clone(), requires_grad=False)
            originals[name] = sim
            thresholds[name] = float(sim.threshold)
            setattr(parent, attr, lin)
        yield thresholds
    finally:
        for name, sim in originals.items():
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, sim)


@contextmanager
def _without_quantizer_load_conversions(model: nn.Module) -> Iterator[None]:
    """While saving, hide the load-time weight conversions of transformers' bitsandbytes quantizer.

    A model loaded from a bitsandbytes checkpoint keeps the converters that built
    its modules from the saved int8 codes / 4-bit blocks and their scales; they
    have no reverse (``save_pretrained`` raises NotImplementedError), and none is
    needed: the bitsandbytes modules write their own state (codes, scales, quant
    state) into the state dict, the layout transformers loads. Other conversions stay.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    qc: Any = getattr(quantizer, "quantization_config", None)
    qm = getattr(qc, "quant_method", None)
    conversions = getattr(model, "_weight_conversions", None)
    if quantizer is None or str(getattr(qm, "value", qm)) != "bitsandbytes" or not conversions:
        yield
        return
    kept = []
    for conversion in conversions:
        try:
            conversion.reverse_transform()
        except NotImplementedError:
            continue  # a quantizer load step (see above)
        kept.append(conversion)
    model._weight_conversions = kept  # type: ignore[assignment]
    try:
        yield
    finally:
        model._weight_conversions = conversions


# ----------------------------------------------------------------------------
# the target directory
# ----------------------------------------------------------------------------


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"checkpoint target {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not is_checkpoint_dir(out):
        raise InvalidArgumentError(
            f"checkpoint target {str(out)!r} is a non-empty directory that is not a refusal_core "
            f"checkpoint; pass overwrite=True to replace it"
        )


def save_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    record: Mapping[str, Any],
    base_identity: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` and ``tokenizer`` as a Hugging Face directory with a ``refusal_core.json``; returns it.

    ``record`` holds the method and its settings (JSON-able, e.g.
    ``CompressionRecord.to_dict()`` or an AIRD record; ``record["method"]`` is
    the method's name, None for an unmodified model). ``base_identity`` is
    :func:`~refusal_core.model.model_identity` of the model the compression
    started from; without it, ``record["base_identity"]`` or
    ``record["identity_before"]`` is used, and a record with neither and no
    method means the model is its own base. ``format`` is inferred from the
    model's modules (see the module docstring); ``record["format"]`` may only
    say ``"dequantized-simulation"`` for float weights (e.g. AIRD applied to an
    AWQ model).

    Raises before anything is written: :class:`~refusal_core.errors.NonFiniteError`
    for NaN/inf weights, :class:`~refusal_core.errors.InvalidArgumentError` for
    a record that is not JSON-serializable (NaN and inf are stored as null), a compressed model without a base
    identity, or a non-empty ``out_dir`` that is not a previous checkpoint
    (``overwrite=True`` replaces it). A previous checkpoint is replaced.

    The model is not changed (simulated int8 modules are swapped for their
    dequantized ``nn.Linear`` while saving and put back).
    """
    layout = get_layout(model)
    out = Path(out_dir)
    if not isinstance(overwrite, bool):
        raise InvalidArgumentError(f"overwrite must be a bool, got {overwrite!r}")
    if not callable(getattr(tokenizer, "save_pretrained", None)):
        raise InvalidArgumentError(
            f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}"
        )
    rec = _json_record(record)
    method = rec.get("method")
    if base_identity is not None:
        base = _json_record(base_identity)
    elif isinstance(rec.get("base_identity"), dict):
        base = rec["base_identity"]
    elif isinstance(rec.get("identity_before"), dict):
        base = rec["identity_before"]
    elif method in (None, "none", "base"):
        base = model_identity(model)
    else:
        raise InvalidArgumentError(
            f"record of method {method!r} names no base model: pass base_identity=model_identity(base) "
            "(or a record with 'base_identity' / 'identity_before')"
        )
    kinds = _module_kinds(model)
    fmt = _infer_format(kinds, method, rec.get("format"))
    _check_finite(model)
    _check_target(out, overwrite)
    quantization_config = (
        _bnb_quantization_config(model, fmt, kinds) if fmt.startswith("bitsandbytes") else None
    )

    cpu_packing = (
        bool(quantization_config.pop("refusal_core_cpu_packing", False)) if quantization_config else False
    )

    with staged_directory(out) as tmp:
        identity = model_identity(model)
        with _dequantized_simulations(model, kinds["int8-sim"]) as thresholds:
            config: Any = layout.model.config
            had_qc = hasattr(config, "quantization_config")
            old_qc = getattr(config, "quantization_config", None)
            try:
                if quantization_config is not None:
                    config.quantization_config = quantization_config
                with _without_quantizer_load_conversions(layout.model):
                    layout.model.save_pretrained(str(tmp))
            finally:
                if quantization_config is not None:
                    if had_qc:
                        config.quantization_config = old_qc
                    else:
                        del config.quantization_config
        tokenizer.save_pretrained(str(tmp))
        if not (tmp / "generation_config.json").is_file():
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
        data: dict[str, Any] = {
            "format": fmt,
            "method": method,
            "base_identity": base,
            "packages": _package_versions(fmt),
        }
        if fmt == "bitsandbytes-nf4":
            data["bitsandbytes_cpu_packing"] = cpu_packing
        if fmt == "dequantized-simulation":
            data["simulated_method"] = method
            if thresholds:
                data["int8_simulation"] = {
                    "modules": sorted(thresholds),
                    "threshold": _one_threshold(thresholds),
                }
        seal_checkpoint_dir(tmp, identity=identity, settings=rec, data=data)
    return out


def _one_threshold(thresholds: Mapping[str, float]) -> float | None:
    """The common LLM.int8 threshold (None for infinity: strict JSON has no inf); raise if they differ."""
    values = set(thresholds.values())
    if len(values) != 1:
        raise InvalidArgumentError(f"simulated int8 modules use several thresholds {sorted(values)}")
    (thr,) = values
    return None if math.isinf(thr) else thr
