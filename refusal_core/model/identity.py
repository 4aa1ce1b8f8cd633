"""The identity of a model, recorded in every artifact so a result is never read against another model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from refusal_core.model.inputs import device_label
from refusal_core.model.layout import get_layout

__all__ = ["model_identity"]


def model_identity(model: nn.Module) -> dict[str, Any]:
    """A JSON-able identity of a model: architecture, sizes, source path, dtype, device, weight fingerprint.

    The fingerprint is a float64 checksum of a few fixed weights, enough to tell
    two checkpoints (or a compressed model from its base) apart. ``dtype`` is
    the embedding's dtype (``"float32"``, ``"bfloat16"``, ...), ``device`` is
    :func:`~refusal_core.model.inputs.device_label`, so every artifact records where and how it was computed.
    """
    layout = get_layout(model)
    cfg: Any = model.config
    # Dense: o_proj of block 0 and down_proj of the last block; MoE: its fused experts; Mamba: out_proj.
    last = layout.writers(layout.n_layers - 1)
    with torch.no_grad():
        probes = [layout.embedding.weight, layout.writers(0)[0].weight, last[min(1, len(last) - 1)].weight]
        fingerprint = [
            float(p.detach().to(torch.float64).sum()) for p in probes if isinstance(p, torch.Tensor)
        ]
    return {
        "model_type": cfg.model_type,
        "name_or_path": str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "name_or_path", "")),
        "n_layers": layout.n_layers,
        "d_model": layout.d_model,
        "vocab_size": int(layout.embedding.weight.shape[0]),
        "dtype": str(layout.embedding.weight.dtype).removeprefix("torch."),
        "device": device_label(model),
        "fingerprint": fingerprint,
    }
