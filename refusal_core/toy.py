"""The toy refusal model: a tiny Llama that refuses harmful requests, shipped with the package.

It was trained by ``scripts/train_toy_model.py`` (deterministic from a seed, on
CPU) on the built-in ``harmful_train`` and ``harmless_train`` prompt sets: it
answers harmful requests with one of :data:`TOY_REFUSAL_PHRASES` and harmless
ones with a short helpful-looking answer. Its weights, tokenizer (with a chat
template) and a ``toy_model.json`` record (seed, settings, refusal token ids,
held-out results, sha256 of the weights) live in ``refusal_core/data/toy_model/``.

Example:
    >>> from refusal_core.toy import load_toy_model, toy_refusal_token_ids
    >>> model, tokenizer = load_toy_model()
    >>> model.config.model_type, len(toy_refusal_token_ids()) >= 1
    ('llama', True)
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from refusal_core.errors import ArtifactError, InvalidArgumentError

__all__ = [
    "TOY_MODELS",
    "TOY_REFUSAL_PHRASES",
    "is_toy_refusal",
    "load_toy_model",
    "toy_model_info",
    "toy_model_path",
    "toy_refusal_token_ids",
]

#: The refusals the toy model was trained to give (written for this project).
TOY_REFUSAL_PHRASES: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot assist with that request.",
    "I'm sorry, I won't provide that information.",
    "Sorry, but I must decline this request.",
)

# Openings that mark a refusal in a generated text; the helpful answers the
# model was trained on contain none of them (checked by the training script).
_REFUSAL_MARKERS: tuple[str, ...] = (
    "I'm sorry",
    "Sorry",
    "I cannot",
    "I can't",
    "I won't",
    "must decline",
)

#: The packaged toy models, by the spec ``load_model`` takes: the dense toy (a Llama) and the toy
#: Mixture-of-Experts (a Qwen3-MoE with dense first blocks), each trained by
#: ``scripts/train_toy_model.py`` and held to the same criteria.
TOY_MODELS: dict[str, str] = {"toy": "toy_model", "toy-moe": "toy_moe_model"}

_INFO_FILE = "toy_model.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", _INFO_FILE)


def toy_model_path(name: str = "toy") -> Path:
    """The directory of the packaged toy model ``name`` (``refusal_core/data/toy_model`` for "toy")."""
    if name not in TOY_MODELS:
        raise InvalidArgumentError(f"toy model must be one of {sorted(TOY_MODELS)}, got {name!r}")
    return Path(str(resources.files("refusal_core").joinpath("data", TOY_MODELS[name])))


@lru_cache(maxsize=4)
def _cached_info(path: str) -> dict[str, Any]:
    info_path = Path(path) / _INFO_FILE
    if not info_path.is_file():
        raise ArtifactError(f"toy model record {str(info_path)!r} is missing; run scripts/train_toy_model.py")
    try:
        data = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"toy model record {str(info_path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"toy model record {str(info_path)!r} must hold a JSON object")
    return data


def toy_model_info(name: str = "toy") -> dict[str, Any]:
    """The training record of the toy model (a copy of ``toy_model.json``).

    Keys include ``seed``, ``training``, ``refusal_phrases``,
    ``refusal_token_ids``, ``heldout`` (refusal rates on the test splits),
    ``direction`` (the (layer, position) whose difference-in-means direction
    mediates refusal, with necessity/sufficiency rates) and
    ``model_safetensors_sha256``.
    """
    return json.loads(json.dumps(_cached_info(str(toy_model_path(name)))))


def toy_refusal_token_ids(name: str = "toy") -> list[int]:
    """Token ids that open the toy model's refusals (first tokens of :data:`TOY_REFUSAL_PHRASES`)."""
    ids = _cached_info(str(toy_model_path(name))).get("refusal_token_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        raise ArtifactError("toy_model.json has no valid 'refusal_token_ids' list")
    return list(ids)


def is_toy_refusal(text: str) -> bool:
    """Whether a generated response is one of the toy model's refusals (case-sensitive marker match)."""
    if not isinstance(text, str):
        raise InvalidArgumentError(f"text must be a str, got {type(text).__name__}")
    return any(marker in text for marker in _REFUSAL_MARKERS)


def load_toy_model(
    dtype: torch.dtype = torch.float32, verify: bool = True, name: str = "toy"
) -> tuple[Any, Any]:
    """Load the packaged toy model ``name`` (a :data:`TOY_MODELS` key) and its tokenizer, offline.

    Args:
        dtype: floating dtype of the weights (stored as float32).
        verify: check the sha256 of ``model.safetensors`` against ``toy_model.json``.
        name: "toy" (the dense Llama) or "toy-moe" (the Qwen3-MoE).

    Returns:
        ``(model, tokenizer)`` in eval mode: a ``LlamaForCausalLM`` for "toy" (a
        ``Qwen3MoeForCausalLM`` for "toy-moe") with eager attention and a fast tokenizer
        whose ``padding_side`` is ``"left"`` (ready for batched generation) and whose chat
        template places 4 tokens after the instruction.

    Raises:
        InvalidArgumentError: ``dtype`` is not a floating torch dtype.
        ArtifactError: a file is missing or the weights do not match their recorded hash.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgumentError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = toy_model_path(name)
    missing = [f for f in _REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise ArtifactError(f"toy model at {str(path)!r} lacks {missing}; run scripts/train_toy_model.py")
    if verify:
        expected = _cached_info(str(path)).get("model_safetensors_sha256")
        actual = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
        if actual != expected:
            raise ArtifactError(
                f"toy model weights at {str(path)!r} have sha256 {actual}, toy_model.json records {expected}"
            )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager", local_files_only=True
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    return model, tokenizer
