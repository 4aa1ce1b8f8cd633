"""Which data Wanda and AWQ calibrate on: a spec string, resolved to token id sequences.

=====================  ========================================================
spec                   calibration sequences
=====================  ========================================================
``harmless``           the built-in ``harmless_train`` prompts, chat-formatted (the default)
``harmful``            the built-in ``harmful_train`` prompts, chat-formatted
``mix``                the two interleaved (harmful, harmless, harmful, ...)
a built-in set name    that set (e.g. ``harmless_train``), chat-formatted
``PATH.txt``           one prompt per non-empty line, chat-formatted
``PATH.csv/json/l``    a prompt file as :func:`~refusal_core.prompts.load_prompts` reads it
``text:PATH``          plain text, no chat template: the file's tokens cut into
                       consecutive windows of ``text_tokens`` tokens
=====================  ========================================================

The first ``n`` sequences are used. Which set is used changes what a pruning
mask or an AWQ scale sees (the paper's open question 3): :func:`mask_overlap`
and :func:`scale_cosine` compare two results.

Example:
    >>> from refusal_core.testing.tiny import tiny_tokenizer
    >>> ids = calibration_token_ids(tiny_tokenizer(), "mix", 4)
    >>> len(ids)
    4
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusal_core.compression._common import block_linears, effective_weight
from refusal_core.errors import EmptyInputError, InvalidArgumentError, ShapeMismatchError
from refusal_core.model import encode_prompts, get_layout
from refusal_core.prompts import BUILTIN_PROMPT_SETS, load_prompts

__all__ = [
    "CALIBRATION_KEYWORDS",
    "calibration_key",
    "calibration_prompts",
    "calibration_token_ids",
    "check_calibration_spec",
    "mask_overlap",
    "mask_overlap_files",
    "scale_cosine",
]

#: Spec keywords → built-in prompt sets ("mix" interleaves the two).
CALIBRATION_KEYWORDS = {"harmless": "harmless_train", "harmful": "harmful_train", "mix": None}

_TEXT_PREFIX = "text:"


def check_calibration_spec(spec: object) -> str:
    """``spec`` if it names a calibration set that exists, else :class:`InvalidArgumentError` (no loading)."""
    if not isinstance(spec, str) or not spec:
        raise InvalidArgumentError(f"calibration must be a non-empty str, got {spec!r}")
    if spec in CALIBRATION_KEYWORDS or spec in BUILTIN_PROMPT_SETS:
        return spec
    path = Path(spec[len(_TEXT_PREFIX) :] if spec.startswith(_TEXT_PREFIX) else spec)
    if not path.is_file():
        raise InvalidArgumentError(
            f"calibration {spec!r} is not one of {sorted(CALIBRATION_KEYWORDS)}, a built-in prompt set, "
            "an existing prompt file (.txt one per line, .csv, .json, .jsonl) or text:FILE"
        )
    return spec


def calibration_key(spec: str) -> str:
    """What results made with calibration set ``spec`` are keyed by: the same for two specs that
    name the same data, different when the data differ. ``harmless`` / ``harmful`` are the built-in
    sets they name (``harmless_train`` / ``harmful_train``); a file (a prompt file, ``text:FILE``)
    adds the SHA-256 of its bytes, so an edited file is not mistaken for the one a stage used."""
    import hashlib

    spec = check_calibration_spec(spec)
    named = CALIBRATION_KEYWORDS.get(spec)
    if named is not None:
        return named
    if spec == "mix" or spec in BUILTIN_PROMPT_SETS:
        return spec
    path = Path(spec[len(_TEXT_PREFIX) :] if spec.startswith(_TEXT_PREFIX) else spec)
    if path.is_file():
        return f"{spec}@sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    return spec


def calibration_prompts(spec: str, n: int) -> list[str] | None:
    """The first ``n`` instructions of a prompt spec; None for ``text:`` (plain text has no prompts)."""
    check_calibration_spec(spec)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgumentError(f"n must be an int >= 1, got {n!r}")
    if spec.startswith(_TEXT_PREFIX):
        return None
    if spec == "mix":
        harmful, harmless = load_prompts("harmful_train"), load_prompts("harmless_train")
        mixed = [p for pair in zip(harmful, harmless) for p in pair]
        return mixed[:n]
    if spec in CALIBRATION_KEYWORDS:
        return load_prompts(str(CALIBRATION_KEYWORDS[spec]))[:n]
    if spec.endswith(".txt"):
        lines = [line.strip() for line in Path(spec).read_text(encoding="utf-8").splitlines()]
        prompts = [line for line in lines if line]
        if not prompts:
            raise EmptyInputError(f"calibration file {spec!r} holds no prompts")
        return prompts[:n]
    return load_prompts(spec)[:n]


def calibration_token_ids(tokenizer: Any, spec: str, n: int, *, text_tokens: int = 128) -> list[list[int]]:
    """Token id sequences of the calibration set ``spec`` (see the module docstring), at most ``n``."""
    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens < 2:
        raise InvalidArgumentError(f"text_tokens must be an int >= 2, got {text_tokens!r}")
    prompts = calibration_prompts(spec, n)
    if prompts is not None:
        return encode_prompts(tokenizer, prompts, require_post_instruction=True)
    text = Path(spec[len(_TEXT_PREFIX) :]).read_text(encoding="utf-8")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    windows = [ids[i : i + text_tokens] for i in range(0, len(ids), text_tokens)][:n]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise EmptyInputError(f"calibration text {spec!r} has fewer than 2 tokens")
    return windows


def _block_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {bl.full_name: effective_weight(bl.module) for bl in block_linears(get_layout(model))}


def mask_overlap(a: nn.Module, b: nn.Module) -> dict[str, float]:
    """How alike two pruned models' masks are, over all block linears (pruned = exactly zero).

    Returns ``{"jaccard": |Z_a ∩ Z_b| / |Z_a ∪ Z_b|, "equal_fraction": share of
    weights pruned in both or kept in both, "n_weights": ...}``; ``jaccard`` is
    1 when neither model has a zero.
    """
    wa, wb = _block_weights(a), _block_weights(b)
    if wa.keys() != wb.keys():
        raise ShapeMismatchError("mask_overlap: the two models have different block linears")
    return _overlap((name, x, wb[name]) for name, x in wa.items())


def mask_overlap_files(a: str | Path, b: str | Path, modules: Sequence[str]) -> dict[str, float]:
    """:func:`mask_overlap` of two saved state dicts (safetensors), over the ``<module>.weight``
    tensors of ``modules``, read one tensor pair at a time (two pruned real models never need to be
    in memory together). Raises :class:`ShapeMismatchError` when a file lacks a module's weight or
    the two differ in shape, :class:`EmptyInputError` for no modules.
    """
    from safetensors import safe_open

    if not modules:
        raise EmptyInputError("mask_overlap_files: no modules to compare")
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        ka, kb = set(fa.keys()), set(fb.keys())
        missing = [m for m in modules if f"{m}.weight" not in ka or f"{m}.weight" not in kb]
        if missing:
            raise ShapeMismatchError(f"mask_overlap_files: no weight for {missing[:3]} in {a} or {b}")
        return _overlap((m, fa.get_tensor(f"{m}.weight"), fb.get_tensor(f"{m}.weight")) for m in modules)


def _overlap(pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    inter = union = equal = total = 0
    for name, x, y in pairs:
        if x.shape != y.shape:
            raise ShapeMismatchError(f"mask_overlap: {name} is {tuple(x.shape)} vs {tuple(y.shape)}")
        za, zb = x == 0, y == 0
        inter += int((za & zb).sum())
        union += int((za | zb).sum())
        equal += int((za == zb).sum())
        total += za.numel()
    return {
        "jaccard": inter / union if union else 1.0,
        "equal_fraction": equal / total if total else 1.0,
        "n_weights": float(total),
    }


def scale_cosine(base: nn.Module, a: nn.Module, b: nn.Module) -> float:
    """Cosine between the AWQ input-channel scales folded into ``a`` and into ``b`` (both from ``base``).

    AWQ multiplies column ``j`` of a linear by ``s_j`` (and divides the
    preceding norm or linear), so ``s_j = ‖W'[:, j]‖ / ‖W[:, j]‖`` for every
    block linear; the vectors of all linears are concatenated, in float64.
    Compare models made with ``scale_only=True`` (no rounding blurs the ratio).
    """
    w0, wa, wb = _block_weights(base), _block_weights(a), _block_weights(b)
    sa, sb = [], []
    for name, w in w0.items():
        n0 = torch.linalg.vector_norm(w.to(torch.float64), dim=0)
        keep = n0 > 0
        sa.append(torch.linalg.vector_norm(wa[name].to(torch.float64), dim=0)[keep] / n0[keep])
        sb.append(torch.linalg.vector_norm(wb[name].to(torch.float64), dim=0)[keep] / n0[keep])
    va, vb = torch.cat(sa), torch.cat(sb)
    return float(va @ vb / (torch.linalg.vector_norm(va) * torch.linalg.vector_norm(vb)))
