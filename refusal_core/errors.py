"""The single exception hierarchy of refusal_core.

Every check on user input raises a subclass of :class:`RefusalCoreError`
before anything (tensor, module, file) has been modified. The input-shaped
errors also derive from :class:`ValueError` so callers that already catch
``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "EmptyInputError",
    "ForeignDirectionError",
    "ImplementationError",
    "IncompatibleModelsError",
    "InvalidArgumentError",
    "ModelNotFoundError",
    "NonFiniteError",
    "RefusalCoreError",
    "ShapeMismatchError",
    "UnsupportedArchitectureError",
    "UnsupportedModuleError",
    "ZeroDirectionError",
]


class RefusalCoreError(Exception):
    """Base class of every error raised on purpose by refusal_core."""


class InvalidArgumentError(RefusalCoreError, ValueError):
    """An argument is outside its documented domain (sparsity, group size, ...)."""


class ShapeMismatchError(InvalidArgumentError):
    """Two arguments disagree on a width or a shape."""


class NonFiniteError(InvalidArgumentError):
    """A tensor holds NaN or infinity."""


class ZeroDirectionError(InvalidArgumentError):
    """A direction has zero (or numerically zero) norm, so it has no unit vector."""


class EmptyInputError(InvalidArgumentError):
    """A prompt set, activation batch or other collection is empty."""


class UnsupportedArchitectureError(RefusalCoreError):
    """The model's architecture has no layout in refusal_core."""


class UnsupportedModuleError(RefusalCoreError):
    """A module cannot be edited by the requested operation (e.g. a quantized linear)."""


class ArtifactError(RefusalCoreError):
    """A saved artifact is missing, corrupt, or belongs to another model or setting."""


class ForeignDirectionError(ArtifactError):
    """A direction (or candidates, or a selection) came from a model the target does not derive from."""


class ImplementationError(RefusalCoreError):
    """The implementation named for the reference-oracle suite cannot be loaded."""


class ModelNotFoundError(InvalidArgumentError):
    """A model spec names no local path, and no hub id in the local Hugging Face cache."""


class IncompatibleModelsError(InvalidArgumentError):
    """Two models that must share a tokenizer and an architecture (a base and its compressed
    candidate) do not."""
