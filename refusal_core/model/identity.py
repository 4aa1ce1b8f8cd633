"""The identity of a model, recorded in every artifact so a result is never read against another model."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from refusal_core.model.inputs import device_label
from refusal_core.model.layout import get_layout

__all__ = ["model_identity", "weights_sha256"]


def weights_sha256(model: nn.Module) -> str:
    """sha256 over every parameter and buffer of ``model``: name, dtype, shape and raw bytes.

    Tensors are visited in ``named_parameters`` then ``named_buffers`` order (tied
    tensors once) and streamed into the hash one at a time, so the extra memory
    is one tensor's CPU copy (none for a CPU tensor that is already contiguous).
    A change of any single weight, in any layer, changes the digest; moving the
    model to another device does not (the bytes are the same), casting it does.
    Tensors on the meta device (offloaded) enter by name, dtype and shape only.
    """
    h = hashlib.sha256()
    for kind, named in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, t in named:
            h.update(f"{kind}:{name}:{str(t.dtype).removeprefix('torch.')}:{tuple(t.shape)};".encode())
            if t.device.type == "meta" or t.numel() == 0:
                continue
            data = t.detach().to("cpu").contiguous().reshape(-1)
            raw: Any = data.view(torch.uint8).numpy()  # read through the buffer protocol, no bytes copy
            h.update(raw)
    return h.hexdigest()


def model_identity(model: nn.Module) -> dict[str, Any]:
    """A JSON-able identity of a model: architecture, sizes, source path, dtype, device, weight hashes.

    ``weights_sha256`` (:func:`weights_sha256`) changes when any parameter or
    buffer changes, so an edit in a middle layer (AIRD, one pruned matrix) gives
    a new identity. ``fingerprint`` is the older float64 checksum of three fixed
    weights (embedding, a writer of the first and of the last block), kept so that
    identities recorded before the hash existed still compare. ``dtype`` is
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
        digest = weights_sha256(model)
    return {
        "model_type": cfg.model_type,
        "name_or_path": str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "name_or_path", "")),
        "n_layers": layout.n_layers,
        "d_model": layout.d_model,
        "vocab_size": int(layout.embedding.weight.shape[0]),
        "dtype": str(layout.embedding.weight.dtype).removeprefix("torch."),
        "device": device_label(model),
        "fingerprint": fingerprint,
        "weights_sha256": digest,
    }
