"""Architecture layouts: where each part of a supported decoder lives, and swapping its linears.

A :class:`ModelLayout` is the thin adapter between a Hugging Face causal LM
and the functional core: it names the decoder blocks, the embedding, the
matrices that write into the residual stream (attention ``o_proj`` and MLP
``down_proj``) and the norms that precede the linears (AWQ folds its scales
into them). Supported families: Llama, Qwen2, Qwen3, Mistral, Gemma, Gemma 2,
Gemma 3 (text) and Phi-3. Anything else raises
:class:`~refusal_core.errors.UnsupportedArchitectureError`.

How the families differ, as data in :class:`ArchitectureSpec`:

=============  ===========  ==========================  =================  =========================
family         norm weight  block linears               MLP input norm     residual writes through
=============  ===========  ==========================  =================  =========================
llama, qwen2,  ``w``        q/k/v/o, gate/up/down       post_attention     ``self_attn``, ``mlp``
mistral
qwen3          ``w``        same (+ q/k norms inside    post_attention     ``self_attn``, ``mlp``
                            attention)
gemma          ``1 + w``    same                        post_attention     ``self_attn``, ``mlp``
gemma2,        ``1 + w``    same (gemma3: + q/k norms)  pre_feedforward    post-norms: post_attention,
gemma3_text                                                                post_feedforward
phi3           ``w``        fused ``qkv_proj``, ``o``,  post_attention     ``self_attn``, ``mlp``
                            fused ``gate_up_proj``,
                            ``down_proj``
=============  ===========  ==========================  =================  =========================

Post-norm families (Gemma 2/3) normalise what attention and MLP produce
before it is added to the residual stream, so the modules that *write* into
the stream are those norms (:meth:`ModelLayout.attn_writer`): directional
ablation hooks them, and weight orthogonalization (an edit of ``o_proj`` /
``down_proj``) cannot equal it there and is refused.

Example:
    >>> from refusal_core.testing.tiny import tiny_model  # doctest: +SKIP
    >>> layout = get_layout(tiny_model("llama"))            # doctest: +SKIP
    >>> layout.n_layers, layout.d_model                      # doctest: +SKIP
    (2, 32)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from refusal_core.errors import InvalidArgumentError, UnsupportedArchitectureError

__all__ = [
    "ATTN_LINEARS",
    "BLOCK_LINEARS",
    "FUSED_BLOCK_LINEARS",
    "LINEAR_INPUTS",
    "SUPPORTED_ARCHITECTURES",
    "ArchitectureSpec",
    "ModelLayout",
    "get_layout",
    "input_taps",
    "replace_module_",
]


#: Names of the linears of one block, in the order AWQ and pruning visit them.
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Phi-3's block linears: q/k/v and gate/up are fused into one matrix each.
FUSED_BLOCK_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

#: Which input feeds each block linear, the one table of it. Linears with the same input receive
#: the very same tensor: ``attn_in`` is the normed block input (q/k/v), ``o_in`` the attention's
#: mixed values, ``mlp_in`` the normed MLP input (gate/up), ``down_in`` the MLP's gated product.
#: Pruning accumulates one input statistic per entry; AWQ scales one group per entry.
LINEAR_INPUTS: dict[str, str] = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "qkv_proj": "attn_in",
    "o_proj": "o_in",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "gate_up_proj": "mlp_in",
    "down_proj": "down_in",
}
#: Linears that live in the attention module (the others live in the MLP).
ATTN_LINEARS = frozenset(name for name, src in LINEAR_INPUTS.items() if src in ("attn_in", "o_in"))


def input_taps(names: Iterable[str]) -> dict[str, str]:
    """For each input of :data:`LINEAR_INPUTS` among the linears ``names``, the first linear fed it.

    Hooking that one linear sees the input of all the linears that share it.

    Example:
        >>> input_taps(BLOCK_LINEARS)
        {'attn_in': 'q_proj', 'o_in': 'o_proj', 'mlp_in': 'gate_proj', 'down_in': 'down_proj'}
    """
    taps: dict[str, str] = {}
    for name in names:
        if name not in LINEAR_INPUTS:
            raise InvalidArgumentError(f"{name!r} is not a block linear; known: {sorted(LINEAR_INPUTS)}")
        taps.setdefault(LINEAR_INPUTS[name], name)
    return taps


def replace_module_(parent: nn.Module, name: str, new: nn.Module) -> None:
    """``parent.<name> = new``, carrying over an accelerate hook of the old module (device maps).

    A model loaded with ``device_map`` moves each module's inputs to its device
    through a hook on the module; a bare ``setattr`` would drop it with the old
    module. Every module swap in refusal_core goes through here.
    """
    old = getattr(parent, name)
    hook = getattr(old, "_hf_hook", None)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)
    setattr(parent, name, new)


@dataclass(frozen=True)
class ArchitectureSpec:
    """What differs between the supported decoder families.

    ``norm_offset`` is 1.0 where the RMSNorm multiplies by ``1 + weight``
    (Gemma family) and 0.0 where it multiplies by ``weight``.
    ``linear_names`` are the block linears (:data:`BLOCK_LINEARS`, or
    :data:`FUSED_BLOCK_LINEARS` for Phi-3). ``mlp_norm`` is the attribute name
    of the norm whose output feeds the MLP. ``post_norms`` names the norms that
    attention and MLP outputs pass through before the residual add (Gemma 2/3),
    ``None`` where they are added as they are. ``qk_norms``: attention
    normalises queries and keys per head (Qwen3, Gemma 3); it changes nothing
    outside attention.
    """

    family: str
    norm_offset: float = 0.0
    linear_names: tuple[str, ...] = BLOCK_LINEARS
    mlp_norm: str = "post_attention_layernorm"
    post_norms: tuple[str, str] | None = None
    qk_norms: bool = False

    @property
    def fused_linears(self) -> bool:
        """Whether q/k/v and gate/up are single fused matrices (Phi-3)."""
        return "qkv_proj" in self.linear_names

    @property
    def has_post_norms(self) -> bool:
        """Whether attention / MLP outputs are normalised before the residual add (Gemma 2/3)."""
        return self.post_norms is not None


_GEMMA2_POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")

#: model_type (from the HF config) → spec. A registry, not an if-chain.
SUPPORTED_ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec("llama"),
    "qwen2": ArchitectureSpec("qwen2"),
    "qwen3": ArchitectureSpec("qwen3", qk_norms=True),
    "mistral": ArchitectureSpec("mistral"),
    "gemma": ArchitectureSpec("gemma", norm_offset=1.0),
    "gemma2": ArchitectureSpec(
        "gemma2", norm_offset=1.0, mlp_norm="pre_feedforward_layernorm", post_norms=_GEMMA2_POST_NORMS
    ),
    "gemma3_text": ArchitectureSpec(
        "gemma3_text",
        norm_offset=1.0,
        mlp_norm="pre_feedforward_layernorm",
        post_norms=_GEMMA2_POST_NORMS,
        qk_norms=True,
    ),
    "phi3": ArchitectureSpec("phi3", linear_names=FUSED_BLOCK_LINEARS),
}


class ModelLayout:
    """Named access to the parts of a supported decoder-only model."""

    def __init__(self, model: nn.Module, spec: ArchitectureSpec) -> None:
        # Any: the HF methods used here (get_output_embeddings, config) are not on nn.Module.
        self.model: Any = model
        self.spec = spec
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if inner is None or layers is None:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no .model.layers; expected a *ForCausalLM of "
                f"family {spec.family}"
            )
        self.inner: nn.Module = inner
        self.blocks: Sequence[nn.Module] = list(layers)
        if not self.blocks:
            raise UnsupportedArchitectureError(f"{type(model).__name__} has no decoder blocks")

    # -- sizes ---------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.embedding.weight.shape[1])

    # -- parts ---------------------------------------------------------------
    @property
    def embedding(self) -> nn.Embedding:
        emb = self.inner.embed_tokens
        assert isinstance(emb, nn.Embedding)
        return emb

    @property
    def lm_head(self) -> nn.Module:
        head = self.model.get_output_embeddings()
        assert head is not None
        return head

    @property
    def embeddings_tied(self) -> bool:
        head = self.model.get_output_embeddings()
        return head is not None and head.weight is self.embedding.weight

    def attn(self, layer: int) -> nn.Module:
        return self._block(layer).self_attn

    def mlp(self, layer: int) -> nn.Module:
        return self._block(layer).mlp

    def attn_out(self, layer: int) -> nn.Module:
        """The attention output projection (``o_proj``) of block ``layer``."""
        return cast(nn.Module, self.attn(layer).o_proj)

    def mlp_out(self, layer: int) -> nn.Module:
        """The MLP down projection (``down_proj``) of block ``layer``."""
        return cast(nn.Module, self.mlp(layer).down_proj)

    def attn_writer(self, layer: int) -> nn.Module:
        """The module whose output block ``layer`` adds to the residual stream for attention.

        ``self_attn`` itself, or for post-norm families (Gemma 2/3) the norm applied to its output.
        """
        post = self.spec.post_norms
        return self.attn(layer) if post is None else cast(nn.Module, getattr(self._block(layer), post[0]))

    def mlp_writer(self, layer: int) -> nn.Module:
        """The module whose output block ``layer`` adds to the residual stream for the MLP."""
        post = self.spec.post_norms
        return self.mlp(layer) if post is None else cast(nn.Module, getattr(self._block(layer), post[1]))

    def input_norm(self, layer: int) -> nn.Module:
        """The norm whose output feeds attention (``input_layernorm``)."""
        return cast(nn.Module, self._block(layer).input_layernorm)

    def post_attention_norm(self, layer: int) -> nn.Module:
        """The block's ``post_attention_layernorm`` (the MLP input norm except in Gemma 2/3)."""
        return cast(nn.Module, self._block(layer).post_attention_layernorm)

    def mlp_input_norm(self, layer: int) -> nn.Module:
        """The norm whose output feeds the MLP (Gemma 2/3: ``pre_feedforward_layernorm``)."""
        return cast(nn.Module, getattr(self._block(layer), self.spec.mlp_norm))

    def linear_parent(self, layer: int, name: str) -> nn.Module:
        """The module (attention or MLP of block ``layer``) that holds linear ``name`` as an attribute."""
        if name not in self.spec.linear_names:
            raise InvalidArgumentError(
                f"{self.spec.family} blocks have no linear {name!r}; they have {self.spec.linear_names}"
            )
        return self.attn(layer) if name in ATTN_LINEARS else self.mlp(layer)

    def linears(self, layer: int) -> dict[str, nn.Module]:
        """All linears of a block by name, in :attr:`ArchitectureSpec.linear_names` order.

        Seven (``q_proj`` … ``down_proj``) for most families, four for Phi-3
        (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``).
        """
        return {name: self.linear(layer, name) for name in self.spec.linear_names}

    def linear(self, layer: int, name: str) -> nn.Module:
        """Linear ``name`` of block ``layer`` (one of :attr:`ArchitectureSpec.linear_names`)."""
        return cast(nn.Module, getattr(self.linear_parent(layer, name), name))

    def set_linear_(self, layer: int, name: str, new: nn.Module) -> None:
        """Put ``new`` in place of linear ``name`` of block ``layer`` (:func:`replace_module_`)."""
        replace_module_(self.linear_parent(layer, name), name, new)

    def residual_writers(self) -> list[nn.Module]:
        """Every matrix that writes into the residual stream: ``o_proj`` and ``down_proj`` of each block."""
        return [m for layer in range(self.n_layers) for m in (self.attn_out(layer), self.mlp_out(layer))]

    def _block(self, layer: int) -> Any:
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int)
            or not -self.n_layers <= layer < self.n_layers
        ):
            raise InvalidArgumentError(f"layer must be an int in [0, {self.n_layers}), got {layer!r}")
        return self.blocks[layer]

    def __repr__(self) -> str:
        return f"ModelLayout(family={self.spec.family!r}, n_layers={self.n_layers}, d_model={self.d_model})"


def get_layout(model: nn.Module) -> ModelLayout:
    """The layout of a supported causal LM; raises for any other architecture."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = SUPPORTED_ARCHITECTURES.get(str(model_type))
    if spec is None:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported; supported: "
            f"{sorted(SUPPORTED_ARCHITECTURES)}"
        )
    return ModelLayout(model, spec)
