"""Candidate refusal directions for every (layer, position), their comparison and noise floor.

A candidate at site ``(l, i)`` is the difference in means of the block-``l``
input between harmful and harmless prompts at post-instruction position ``i``
(``-P..-1``), in float64 and never normalized
(:func:`~refusal_core.functional.difference_in_means`). Two models' candidates
are compared site by site (cosine), by their selected sources (cosine and
shift), and against a split-half noise floor: the cosine between directions
from two random halves of the same prompts, i.e. what sampling alone gives.

Results save as ``PATH.safetensors`` + ``PATH.json`` (written atomically by
:mod:`refusal_core.saving.artifacts`, with the model identity, the settings and a
SHA-256 of the tensor contents) and load with verification.

Example:
    >>> from refusal_core.testing.tiny import tiny_model, tiny_prompts, tiny_tokenizer
    >>> model, tok = tiny_model("llama"), tiny_tokenizer()
    >>> cand = extract_candidates(model, tok, tiny_prompts(8, "harmful"), tiny_prompts(8, "harmless"))
    >>> cand.directions.shape, cand.positions
    (torch.Size([2, 2, 32]), [-2, -1])
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusal_core._finite import all_finite
from refusal_core.activations import mean_activations
from refusal_core.errors import (
    ArtifactError,
    EmptyInputError,
    ForeignDirectionError,
    InvalidArgumentError,
    ShapeMismatchError,
)
from refusal_core.functional import MIN_DIRECTION_NORM, check_tensor, difference_in_means
from refusal_core.model import check_instructions, model_identity, post_instruction_tokens
from refusal_core.saving import Artifact, load_artifact, save_artifact

__all__ = [
    "Direction",
    "DirectionCandidates",
    "DirectionComparison",
    "check_direction_origin",
    "compare_candidates",
    "extract_candidates",
    "extract_candidates_with_noise_floor",
    "same_model",
    "site_cosines",
    "split_half_noise_floor",
]

_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------
# artifact I/O shared by the result classes of this module
# ----------------------------------------------------------------------------


def _tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of ``tensors`` (catches silent bit rot)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _write_artifact(
    path: str | Path,
    kind: str,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    identity: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``path.safetensors`` + ``path.json`` atomically (via :mod:`refusal_core.saving.artifacts`)."""
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    doc = {"kind": kind, "version": _FORMAT_VERSION, "sha256": _tensor_digest(tensors), **meta}
    save_artifact(base, tensors=tensors, meta=doc, identity=identity, settings=settings)
    return base


def _read_artifact(
    path: str | Path, kind: str, expect_identity: Mapping[str, Any] | nn.Module | None = None
) -> Artifact:
    """Read and integrity-check an artifact written by :func:`_write_artifact`."""
    expected = model_identity(expect_identity) if isinstance(expect_identity, nn.Module) else expect_identity
    art = load_artifact(Path(path), expect_identity=expected)
    meta = art.meta
    if meta.get("kind") != kind:
        raise ArtifactError(f"{path}.json holds a {meta.get('kind')!r}, not a {kind}")
    if meta.get("version") != _FORMAT_VERSION:
        raise ArtifactError(f"{kind} artifact {path}: version {meta.get('version')!r} unsupported")
    if meta.get("sha256") != _tensor_digest(art.tensors):
        raise ArtifactError(
            f"{kind} artifact {path}: tensor contents do not match the hash recorded in its JSON"
        )
    return art


def _require(meta: Mapping[str, Any], key: str, kind: str, typ: type | tuple[type, ...]) -> Any:
    value = meta.get(key)
    if not isinstance(value, typ):
        raise ArtifactError(f"{kind} artifact: field {key!r} is missing or has the wrong type")
    return value


def _check_site(layer: object, position: object, n_layers: int, positions: Sequence[int], name: str) -> int:
    """Validate a ``(layer, position)`` site; returns the column index of ``position``."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise InvalidArgumentError(f"{name}: layer must be an int in [0, {n_layers}), got {layer!r}")
    if isinstance(position, bool) or not isinstance(position, int) or position not in positions:
        raise InvalidArgumentError(f"{name}: position must be one of {list(positions)}, got {position!r}")
    return list(positions).index(position)


# ----------------------------------------------------------------------------
# where a direction came from
# ----------------------------------------------------------------------------

#: Identity fields that fix the architecture: a direction is only meaningful on a model that
#: shares them. ``name_or_path`` is deliberately not among them (the same weights may be
#: loaded from anywhere) and the weights are compared by ``fingerprint``.
_ARCHITECTURE_KEYS = ("model_type", "n_layers", "d_model", "vocab_size")

#: Relative tolerance on fingerprint sums: absorbs float64 summation order across devices,
#: far below what pruning or 8-bit rounding of a probed matrix changes.
_FINGERPRINT_RTOL = 1e-9


def _identity_of(value: Mapping[str, Any] | nn.Module, name: str) -> dict[str, Any]:
    if isinstance(value, nn.Module):
        return model_identity(value)
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(
            f"{name} must be a model identity dict or a model, got {type(value).__name__}"
        )
    return dict(value)


def _missing_identity_fields(identity: Mapping[str, Any]) -> list[str]:
    missing = [k for k in _ARCHITECTURE_KEYS if k not in identity]
    fp = identity.get("fingerprint")
    if not (isinstance(fp, list) and fp and all(isinstance(x, (int, float)) for x in fp)):
        missing.append("fingerprint")
    return missing


def _same_architecture(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in _ARCHITECTURE_KEYS)


def _same_weights(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    ha, hb = a.get("weights_sha256"), b.get("weights_sha256")
    if isinstance(ha, str) and isinstance(hb, str) and ha != hb:
        return False  # the hash covers every weight; identities recorded before it have only the sums
    fa, fb = a.get("fingerprint"), b.get("fingerprint")
    if not (isinstance(fa, list) and isinstance(fb, list)) or len(fa) != len(fb) or not fa:
        return False
    return all(
        math.isclose(float(x), float(y), rel_tol=_FINGERPRINT_RTOL, abs_tol=0.0) for x, y in zip(fa, fb)
    )


def same_model(a: Mapping[str, Any] | nn.Module, b: Mapping[str, Any] | nn.Module) -> bool:
    """Whether two :func:`~refusal_core.model.model_identity` records (or models) name the same model.

    Same model means the same architecture (type, layers, width, vocabulary)
    and the same weight fingerprint; the path it was loaded from does not
    matter. A compressed or repaired model is a different model from its base.
    """
    ia, ib = _identity_of(a, "a"), _identity_of(b, "b")
    return not _missing_identity_fields(ia) and _same_architecture(ia, ib) and _same_weights(ia, ib)


def _describe(identity: Mapping[str, Any]) -> str:
    fp = identity.get("fingerprint")
    fp_s = "[" + ", ".join(f"{float(x):.6g}" for x in fp) + "]" if isinstance(fp, list) else repr(fp)
    arch = ", ".join(f"{k}={identity.get(k)!r}" for k in _ARCHITECTURE_KEYS)
    path = identity.get("name_or_path")
    return f"{arch}, fingerprint={fp_s}" + (f", from {path!r}" if path else "")


def check_direction_origin(
    direction_identity: Mapping[str, Any],
    model: nn.Module | Mapping[str, Any],
    *,
    model_record: Mapping[str, Any] | None = None,
    allow_foreign: bool = False,
) -> None:
    """Refuse to use a direction on a model it does not belong to.

    ``direction_identity`` is the :func:`~refusal_core.model.model_identity`
    recorded with the direction (``DirectionCandidates.model``,
    ``Direction.model``, ``SelectionResult.identity``); ``model`` is the model
    (or its identity) it is about to be used on. Passes when both name the
    same model (:func:`same_model`), or when ``model_record`` — the record of
    how ``model`` was made, e.g. a checkpoint's ``refusal_core.json`` — holds
    a ``base_identity`` that is the direction's model and the architectures
    agree (a compressed or repaired model with its base's direction is AIRD's
    recipe), or when ``allow_foreign`` is True. Otherwise raises
    :class:`~refusal_core.errors.ForeignDirectionError` saying which models
    differ; also when the direction carries no identity to check.

    Example:
        >>> from refusal_core.testing.tiny import tiny_model
        >>> a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
        >>> check_direction_origin(model_identity(a), a)
        >>> check_direction_origin(model_identity(a), b)
        Traceback (most recent call last):
        ...
        refusal_core.errors.ForeignDirectionError: direction was extracted from another model ...
    """
    if not isinstance(allow_foreign, bool):
        raise InvalidArgumentError(f"allow_foreign must be a bool, got {allow_foreign!r}")
    if allow_foreign:
        return
    source = _identity_of(direction_identity, "direction_identity")
    target = _identity_of(model, "model")
    missing = _missing_identity_fields(source)
    if missing:
        raise ForeignDirectionError(
            f"the direction carries no usable model identity (missing {missing}), so its origin cannot be "
            "checked; pass allow_foreign=True to use it anyway"
        )
    if not _same_architecture(source, target):
        raise ForeignDirectionError(
            f"direction was extracted from a model of another architecture ({_describe(source)}) than the "
            f"target ({_describe(target)})"
        )
    if _same_weights(source, target):
        return
    hint = "pass the target's record with its base_identity, or allow_foreign=True"
    if model_record is None:
        raise ForeignDirectionError(
            f"direction was extracted from another model ({_describe(source)}) than the target "
            f"({_describe(target)}); if the target derives from it, {hint}"
        )
    if not isinstance(model_record, Mapping):
        raise InvalidArgumentError(f"model_record must be a dict, got {type(model_record).__name__}")
    base = model_record.get("base_identity")
    if not isinstance(base, Mapping) or _missing_identity_fields(base):
        raise ForeignDirectionError(
            "model_record names no usable base_identity, so it cannot vouch that the target derives from "
            f"the direction's model ({_describe(source)})"
        )
    if not _same_architecture(base, target):
        raise ForeignDirectionError(
            f"model_record's base ({_describe(base)}) has another architecture than the target "
            f"({_describe(target)}); the record belongs to another model"
        )
    if not (_same_architecture(base, source) and _same_weights(base, source)):
        raise ForeignDirectionError(
            f"direction was extracted from another model ({_describe(source)}) than the base the target "
            f"derives from ({_describe(base)})"
        )


# ----------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------


@dataclass
class Direction:
    """One direction ``vector [d]`` taken at block ``layer``'s input, position ``position`` (< 0)."""

    vector: torch.Tensor
    layer: int
    position: int
    model: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write ``path.safetensors`` + ``path.json``."""
        meta = {"layer": self.layer, "position": self.position}
        return _write_artifact(path, "Direction", {"vector": self.vector}, meta, identity=self.model)

    @classmethod
    def load(
        cls, path: str | Path, *, expect_identity: Mapping[str, Any] | nn.Module | None = None
    ) -> Direction:
        """Read a direction; :class:`ArtifactError` if corrupt or (``expect_identity``) of another model."""
        art = _read_artifact(path, "Direction", expect_identity)
        tensors, meta = art.tensors, art.meta
        vector = tensors.get("vector")
        if vector is None or vector.ndim != 1 or not all_finite(vector):
            raise ArtifactError(f"Direction artifact at {path}: vector missing, not 1-D or not finite")
        layer = _require(meta, "layer", "Direction", int)
        position = _require(meta, "position", "Direction", int)
        return cls(vector=vector, layer=layer, position=position, model=art.identity)


@dataclass
class DirectionCandidates:
    """Difference-in-means directions at every block input × post-instruction position.

    ``directions``, ``harmful_mean`` and ``harmless_mean`` are ``[L, P, d]``
    float64 with ``directions = harmful_mean − harmless_mean``; ``positions[i]``
    is the (negative) token position of column ``i``; ``model`` is
    :func:`~refusal_core.model.model_identity` of the source model.
    """

    directions: torch.Tensor
    harmful_mean: torch.Tensor
    harmless_mean: torch.Tensor
    n_harmful: int
    n_harmless: int
    positions: list[int]
    model: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.directions.shape[0])

    def direction(self, layer: int, position: int) -> Direction:
        """The candidate at block ``layer``'s input and token ``position`` (e.g. ``-1``)."""
        i = _check_site(layer, position, self.n_layers, self.positions, "direction")
        return Direction(self.directions[layer, i].clone(), layer, position, dict(self.model))

    def save(self, path: str | Path) -> Path:
        """Write ``path.safetensors`` (the three ``[L, P, d]`` tensors) + ``path.json``."""
        tensors = {
            "directions": self.directions,
            "harmful_mean": self.harmful_mean,
            "harmless_mean": self.harmless_mean,
        }
        meta = {
            "n_harmful": self.n_harmful,
            "n_harmless": self.n_harmless,
            "positions": list(self.positions),
        }
        return _write_artifact(
            path, "DirectionCandidates", tensors, meta, identity=self.model, settings=self.settings
        )

    @classmethod
    def load(
        cls, path: str | Path, *, expect_identity: Mapping[str, Any] | nn.Module | None = None
    ) -> DirectionCandidates:
        """Read and verify candidates saved by :meth:`save`.

        Raises :class:`ArtifactError` when a file is missing or corrupt, shapes
        or counts disagree, ``directions`` is not ``harmful_mean − harmless_mean``,
        or (with ``expect_identity``, a dict or a model) the model differs.
        """
        kind = "DirectionCandidates"
        art = _read_artifact(path, kind, expect_identity)
        tensors, meta = art.tensors, art.meta
        names = ("directions", "harmful_mean", "harmless_mean")
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ArtifactError(f"{kind} artifact at {path}: missing tensors {missing}")
        dirs, hmf, hml = (tensors[n] for n in names)
        positions = _require(meta, "positions", kind, list)
        shape = tuple(dirs.shape)
        if (
            dirs.ndim != 3
            or tuple(hmf.shape) != shape
            or tuple(hml.shape) != shape
            or any(t.dtype != torch.float64 for t in (dirs, hmf, hml))
            or len(positions) != shape[1]
            or positions != list(range(-shape[1], 0))
        ):
            raise ArtifactError(f"{kind} artifact at {path}: inconsistent shapes, dtypes or positions")
        if not all(all_finite(t) for t in (dirs, hmf, hml)):
            raise ArtifactError(f"{kind} artifact at {path}: tensors contain NaN or infinity")
        if not torch.allclose(dirs, hmf - hml, rtol=0.0, atol=1e-12 * (1.0 + float(hmf.abs().max()))):
            raise ArtifactError(f"{kind} artifact at {path}: directions != harmful_mean - harmless_mean")
        n_harmful = _require(meta, "n_harmful", kind, int)
        n_harmless = _require(meta, "n_harmless", kind, int)
        if n_harmful < 1 or n_harmless < 1:
            raise ArtifactError(f"{kind} artifact at {path}: prompt counts must be positive")
        return cls(dirs, hmf, hml, n_harmful, n_harmless, positions, art.identity, art.settings)


def extract_candidates(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    batch_size: int = 16,
    system: str | None = None,
    progress: bool = False,
) -> DirectionCandidates:
    """Difference-in-means candidates at every (block input, post-instruction position).

    One streaming pass over both prompt sets (two groups); see
    :func:`~refusal_core.activations.mean_activations` for the site and batching.
    """
    harmful = check_instructions(harmful, "harmful")
    harmless = check_instructions(harmless, "harmless")
    groups = torch.tensor([0] * len(harmful) + [1] * len(harmless))
    means = mean_activations(
        model,
        tokenizer,
        harmful + harmless,
        batch_size=batch_size,
        system=system,
        groups=groups,
        n_groups=2,
        progress=progress,
    )
    return _candidates_from_means(
        model, tokenizer, means[0], means[1], len(harmful), len(harmless), batch_size, system
    )


def _candidates_from_means(
    model: nn.Module,
    tokenizer: Any,
    harmful_mean: torch.Tensor,
    harmless_mean: torch.Tensor,
    n_harmful: int,
    n_harmless: int,
    batch_size: int,
    system: str | None,
) -> DirectionCandidates:
    # difference_in_means over a one-element "batch" of means is exactly mean_h − mean_l.
    directions = difference_in_means(harmful_mean.unsqueeze(0), harmless_mean.unsqueeze(0))
    n_pos = harmful_mean.shape[1]
    settings = {
        "site": "resid_pre",
        "batch_size": batch_size,
        "system": system,
        "post_instruction_tokens": post_instruction_tokens(tokenizer, system),
        "model_dtype": str(next(iter(model.parameters())).dtype),
    }
    return DirectionCandidates(
        directions=directions,
        harmful_mean=harmful_mean.clone(),
        harmless_mean=harmless_mean.clone(),
        n_harmful=n_harmful,
        n_harmless=n_harmless,
        positions=list(range(-n_pos, 0)),
        model=model_identity(model),
        settings=settings,
    )


# ----------------------------------------------------------------------------
# comparison
# ----------------------------------------------------------------------------


def site_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine over the last axis of ``a, b [..., d]`` → ``[...]`` float64, clamped to [-1, 1].

    Agrees with :func:`~refusal_core.functional.cosine_similarity` at every
    site; a site where either vector has norm ≤ ``MIN_DIRECTION_NORM`` (where
    that function raises) is NaN.
    """
    a = check_tensor(a, "a", min_ndim=1)
    b = check_tensor(b, "b", min_ndim=1)
    if a.shape != b.shape:
        raise ShapeMismatchError(f"a has shape {tuple(a.shape)} but b has shape {tuple(b.shape)}")
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    na = torch.linalg.vector_norm(a64, dim=-1)
    nb = torch.linalg.vector_norm(b64, dim=-1)
    ok = (na > MIN_DIRECTION_NORM) & (nb > MIN_DIRECTION_NORM)
    safe_a = torch.where(ok, na, torch.ones_like(na)).unsqueeze(-1)
    safe_b = torch.where(ok, nb, torch.ones_like(nb)).unsqueeze(-1)
    cos = ((a64 / safe_a) * (b64 / safe_b)).sum(-1).clamp(-1.0, 1.0)
    return torch.where(ok, cos, torch.full_like(cos, math.nan))


@dataclass
class DirectionComparison:
    """How a model's candidate directions relate to a base model's.

    ``per_site_cosine [L, P]``: cosine between the two models' candidates at
    the same site. ``cosine_at_base_source``: that cosine at the base model's
    selected source. ``selected_cosine``: cosine between the base direction at
    its source and the other's at its own source (equal to the former when the
    other has no source). ``source_shift``: ``(Δlayer, Δposition)`` other minus
    base, or None. ``noise_floor [L, P]`` (optional): a split-half noise floor
    to read the cosines against.
    """

    per_site_cosine: torch.Tensor
    base_source: tuple[int, int]
    other_source: tuple[int, int] | None
    cosine_at_base_source: float
    selected_cosine: float
    source_shift: tuple[int, int] | None
    positions: list[int]
    base_model: dict[str, Any]
    other_model: dict[str, Any]
    noise_floor: torch.Tensor | None = None

    def save(self, path: str | Path) -> Path:
        tensors = {"per_site_cosine": self.per_site_cosine}
        if self.noise_floor is not None:
            tensors["noise_floor"] = self.noise_floor
        meta = {
            "base_source": list(self.base_source),
            "other_source": None if self.other_source is None else list(self.other_source),
            "cosine_at_base_source": self.cosine_at_base_source,
            "selected_cosine": self.selected_cosine,
            "source_shift": None if self.source_shift is None else list(self.source_shift),
            "positions": self.positions,
            "base_model": self.base_model,
            "other_model": self.other_model,
        }
        return _write_artifact(path, "DirectionComparison", tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> DirectionComparison:
        kind = "DirectionComparison"
        art = _read_artifact(path, kind)
        tensors, meta = art.tensors, art.meta
        per_site = tensors.get("per_site_cosine")
        if per_site is None or per_site.ndim != 2:
            raise ArtifactError(f"{kind} artifact at {path}: per_site_cosine missing or not [L, P]")
        noise = tensors.get("noise_floor")
        if noise is not None and noise.shape != per_site.shape:
            raise ArtifactError(f"{kind} artifact at {path}: noise_floor shape differs from per_site_cosine")

        def pair(key: str, optional: bool) -> tuple[int, int] | None:
            v = meta.get(key)
            if v is None and optional:
                return None
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v)):
                raise ArtifactError(f"{kind} artifact: field {key!r} must be a pair of ints")
            return (v[0], v[1])

        base_source = pair("base_source", False)
        assert base_source is not None  # pair() raised otherwise
        return cls(
            per_site_cosine=per_site,
            base_source=base_source,
            other_source=pair("other_source", True),
            cosine_at_base_source=float(_require(meta, "cosine_at_base_source", kind, (int, float))),
            selected_cosine=float(_require(meta, "selected_cosine", kind, (int, float))),
            source_shift=pair("source_shift", True),
            positions=_require(meta, "positions", kind, list),
            base_model=_require(meta, "base_model", kind, dict),
            other_model=_require(meta, "other_model", kind, dict),
            noise_floor=noise,
        )


def compare_candidates(
    base: DirectionCandidates,
    other: DirectionCandidates,
    *,
    base_source: tuple[int, int],
    other_source: tuple[int, int] | None = None,
    noise_floor: torch.Tensor | None = None,
) -> DirectionComparison:
    """Compare two models' candidates: per-site cosine, cosine at the sources, source shift.

    Sources are ``(layer, position)`` with a negative position, e.g. ``(14, -1)``.
    """
    for name, c in (("base", base), ("other", other)):
        if not isinstance(c, DirectionCandidates):
            raise InvalidArgumentError(f"{name} must be DirectionCandidates, got {type(c).__name__}")
    if base.directions.shape != other.directions.shape or base.positions != other.positions:
        raise ShapeMismatchError(
            f"base candidates have shape {tuple(base.directions.shape)} (positions {base.positions}) but "
            f"other has {tuple(other.directions.shape)} (positions {other.positions})"
        )
    if not (isinstance(base_source, tuple) and len(base_source) == 2):
        raise InvalidArgumentError(f"base_source must be a (layer, position) pair, got {base_source!r}")
    bl, bp = base_source
    bi = _check_site(bl, bp, base.n_layers, base.positions, "base_source")
    per_site = site_cosines(base.directions, other.directions)
    if noise_floor is not None:
        noise_floor = check_tensor(noise_floor, "noise_floor", ndim=2)
        if noise_floor.shape != per_site.shape:
            raise ShapeMismatchError(
                f"noise_floor has shape {tuple(noise_floor.shape)}, expected {tuple(per_site.shape)}"
            )
        noise_floor = noise_floor.to(torch.float64).cpu().clone()
    at_base = float(per_site[bl, bi])
    shift: tuple[int, int] | None = None
    selected = at_base
    if other_source is not None:
        if not (isinstance(other_source, tuple) and len(other_source) == 2):
            raise InvalidArgumentError(f"other_source must be a (layer, position) pair, got {other_source!r}")
        ol, op = other_source
        oi = _check_site(ol, op, other.n_layers, other.positions, "other_source")
        selected = float(site_cosines(base.directions[bl, bi], other.directions[ol, oi]))
        shift = (ol - bl, op - bp)
    return DirectionComparison(
        per_site_cosine=per_site,
        base_source=(bl, bp),
        other_source=other_source,
        cosine_at_base_source=at_base,
        selected_cosine=selected,
        source_shift=shift,
        positions=list(base.positions),
        base_model=dict(base.model),
        other_model=dict(other.model),
        noise_floor=noise_floor,
    )


def _split_membership(n_h: int, n_l: int, n_splits: int, seed: int) -> torch.Tensor:
    """``[n_h + n_l, 4·n_splits]`` bool: columns 4s+0/4s+1 are split s's harmful halves A/B,
    4s+2/4s+3 its harmless halves (sizes ⌊n/2⌋ and ⌈n/2⌉, drawn with ``random.Random(seed)``)."""
    member = torch.zeros((n_h + n_l, 4 * n_splits), dtype=torch.bool)
    rng = random.Random(seed)
    for s in range(n_splits):
        for offset, n, group in ((0, n_h, 4 * s), (n_h, n_l, 4 * s + 2)):
            perm = list(range(n))
            rng.shuffle(perm)
            half = n // 2
            for k, i in enumerate(perm):
                member[offset + i, group + (0 if k < half else 1)] = True
    return member


def _floor_from_means(means: torch.Tensor, n_splits: int) -> torch.Tensor:
    """The mean over splits of the per-site cosine between half A's and half B's direction."""
    cosines = []
    for s in range(n_splits):
        dir_a = means[4 * s] - means[4 * s + 2]
        dir_b = means[4 * s + 1] - means[4 * s + 3]
        cosines.append(site_cosines(dir_a, dir_b))
    return torch.stack(cosines).mean(0)


def _check_split_inputs(
    harmful: Sequence[str], harmless: Sequence[str], n_splits: object
) -> tuple[list[str], list[str]]:
    harmful = check_instructions(harmful, "harmful")
    harmless = check_instructions(harmless, "harmless")
    if isinstance(n_splits, bool) or not isinstance(n_splits, int) or n_splits < 1:
        raise InvalidArgumentError(f"n_splits must be a positive int, got {n_splits!r}")
    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        if len(prompts) < 2:
            raise EmptyInputError(f"{name} needs at least 2 prompts to split in halves, got {len(prompts)}")
    return harmful, harmless


def split_half_noise_floor(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    n_splits: int = 4,
    seed: int = 0,
    batch_size: int = 16,
    system: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Mean over random splits of the per-site cosine between two half-sample directions, ``[L, P]``.

    Each split partitions the harmful prompts into two halves at random (sizes
    ⌊n/2⌋ and ⌈n/2⌉), and independently the harmless ones; the difference in
    means of half A and of half B are compared site by site. All splits share
    one forward pass (prompts belong to several groups). A cosine between two
    models' directions reads as meaningful only when well above this floor.
    Each class needs at least two prompts. Sites where a half-direction is zero
    give NaN. :func:`extract_candidates_with_noise_floor` gives the same floor
    from the extraction's own forward pass.
    """
    harmful, harmless = _check_split_inputs(harmful, harmless, n_splits)
    member = _split_membership(len(harmful), len(harmless), n_splits, seed)
    means = mean_activations(
        model,
        tokenizer,
        harmful + harmless,
        batch_size=batch_size,
        system=system,
        groups=member,
        n_groups=4 * n_splits,
        progress=progress,
    )
    return _floor_from_means(means, n_splits)


def extract_candidates_with_noise_floor(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    n_splits: int = 4,
    seed: int = 0,
    batch_size: int = 16,
    system: str | None = None,
    progress: bool = False,
) -> tuple[DirectionCandidates, torch.Tensor]:
    """:func:`extract_candidates` and :func:`split_half_noise_floor` from ONE forward pass.

    The two whole classes and every split half are groups of the same streaming
    pass, so the noise floor costs no second pass over the prompts. Equal to the
    two functions called separately (to float64 rounding).
    """
    harmful, harmless = _check_split_inputs(harmful, harmless, n_splits)
    n_h, n_l = len(harmful), len(harmless)
    whole = torch.zeros((n_h + n_l, 2), dtype=torch.bool)
    whole[:n_h, 0] = True
    whole[n_h:, 1] = True
    member = torch.cat([whole, _split_membership(n_h, n_l, n_splits, seed)], dim=1)
    means = mean_activations(
        model,
        tokenizer,
        harmful + harmless,
        batch_size=batch_size,
        system=system,
        groups=member,
        n_groups=member.shape[1],
        progress=progress,
    )
    candidates = _candidates_from_means(model, tokenizer, means[0], means[1], n_h, n_l, batch_size, system)
    return candidates, _floor_from_means(means[2:], n_splits)
