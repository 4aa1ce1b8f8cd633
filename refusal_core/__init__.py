"""refusal_core: did compressing this model break its refusal mechanism, and can it be repaired?

A reference implementation of the refusal-direction method of arXiv 2504.04215
(refusal in compressed models, AIRD) on top of Arditi et al. 2024, and a
Hypothesis property suite that doubles as a reference oracle.

Example:
    >>> import torch, refusal_core as rc
    >>> r = rc.difference_in_means(torch.ones(4, 3), torch.zeros(4, 3))
    >>> rc.cosine_similarity(r, torch.ones(3))
    1.0
"""

from typing import TYPE_CHECKING, Any

from refusal_core._version import __version__
from refusal_core.errors import (
    ArtifactError,
    EmptyInputError,
    ImplementationError,
    InvalidArgumentError,
    NonFiniteError,
    RefusalCoreError,
    ShapeMismatchError,
    UnsupportedArchitectureError,
    UnsupportedModuleError,
    ZeroDirectionError,
)

# The functional core imports torch, which takes seconds: load it on first use, so that
# `refusal-core --help` and `--version` (which import this package) answer at once.
_FUNCTIONAL = (
    "ablate",
    "add_direction",
    "aird_update",
    "awq_scales",
    "cosine_similarity",
    "difference_in_means",
    "int8_dequantize",
    "int8_quantize",
    "llm_int8_linear",
    "magnitude_mask",
    "orthogonalize_embedding",
    "orthogonalize_weight",
    "pseudo_quantize",
    "refusal_score",
    "wanda_mask",
)

if TYPE_CHECKING:
    from refusal_core.functional import (
        ablate,
        add_direction,
        aird_update,
        awq_scales,
        cosine_similarity,
        difference_in_means,
        int8_dequantize,
        int8_quantize,
        llm_int8_linear,
        magnitude_mask,
        orthogonalize_embedding,
        orthogonalize_weight,
        pseudo_quantize,
        refusal_score,
        wanda_mask,
    )


def __getattr__(name: str) -> Any:
    if name in _FUNCTIONAL:
        from refusal_core import functional

        return getattr(functional, name)
    raise AttributeError(f"module 'refusal_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ArtifactError",
    "EmptyInputError",
    "ImplementationError",
    "InvalidArgumentError",
    "NonFiniteError",
    "RefusalCoreError",
    "ShapeMismatchError",
    "UnsupportedArchitectureError",
    "UnsupportedModuleError",
    "ZeroDirectionError",
    "__version__",
    "ablate",
    "add_direction",
    "aird_update",
    "awq_scales",
    "cosine_similarity",
    "difference_in_means",
    "int8_dequantize",
    "int8_quantize",
    "llm_int8_linear",
    "magnitude_mask",
    "orthogonalize_embedding",
    "orthogonalize_weight",
    "pseudo_quantize",
    "refusal_score",
    "wanda_mask",
]
