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

__version__ = "0.1.0"

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
