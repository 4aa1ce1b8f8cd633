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

**Residual writers** (:class:`Writer`, :meth:`ModelLayout.writers`) are data
too: for each block, every weight that writes into the residual stream, by
component. Dense families: ``self_attn.o_proj`` and ``mlp.down_proj``.
Mixture-of-Experts families (:class:`MoeSpec`; transformers 5 stores the
routed experts fused as 3-D parameters ``mlp.experts.gate_up_proj [E, 2·ff, d]``
and ``mlp.experts.down_proj [E, d, ff]``): ``o_proj``, the fused expert down
projections (one ``[d, ff]`` matrix per expert) and any shared expert's
``down_proj``. The router ``mlp.gate [E, d]`` (and Qwen2-MoE's
``shared_expert_gate [1, d]``) *read* the stream (:meth:`ModelLayout.readers`)
and are never edited or compressed. Mamba: the mixer's ``out_proj``.

=============  ==========================================  ==============================  ===============
family         writers per block                           readers (never edited)          hooked outputs
=============  ==========================================  ==============================  ===============
mixtral,       ``self_attn.o_proj``,                       ``mlp.gate``                    ``self_attn``,
qwen3_moe,     ``mlp.experts.down_proj`` [E, d, ff]                                        ``mlp``
olmoe
qwen2_moe      same + ``mlp.shared_expert.down_proj``      ``mlp.gate``,                   ``self_attn``,
                                                           ``mlp.shared_expert_gate``      ``mlp``
mamba,         ``mixer.out_proj``                          (none)                          ``mixer``
mamba2
falcon_h1      ``self_attn.o_proj``, ``mamba.out_proj``,   (none)                          ``self_attn``,
               ``feed_forward.down_proj``                                                  ``mamba``,
                                                                                           ``feed_forward``
=============  ==========================================  ==============================  ===============

A Qwen-MoE block listed in ``mlp_only_layers`` (or off ``decoder_sparse_step``)
has a dense MLP; its writers are then the dense ones (resolved per block).

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
    "MIXER_LINEARS",
    "SUPPORTED_ARCHITECTURES",
    "ArchitectureSpec",
    "ModelLayout",
    "MoeSpec",
    "Writer",
    "get_layout",
    "input_taps",
    "replace_module_",
]


#: Names of the linears of one block, in the order AWQ and pruning visit them.
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Phi-3's block linears: q/k/v and gate/up are fused into one matrix each.
FUSED_BLOCK_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
#: The attention linears of every attention family (the block linears of an MoE block beside its experts).
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
#: Qwen2-MoE's shared expert: a dense gated MLP inside the MoE block, named relative to the MLP.
SHARED_EXPERT_LINEARS = ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj")
#: Falcon-H1's block linears: attention, its Mamba2 mixer's in/out projections, and the MLP.
HYBRID_BLOCK_LINEARS = (*BLOCK_LINEARS[:4], "mamba.in_proj", "mamba.out_proj", *BLOCK_LINEARS[4:])
#: Mamba's mixer linears that are called as modules (all in ``block.mixer``); ``out_proj`` writes into
#: the residual stream. ``dt_proj`` is left out: the mixer multiplies by ``dt_proj.weight`` directly and
#: adds ``dt_proj.bias`` inside the scan, so no hook sees its input and no module swap reaches it.
MIXER_LINEARS = ("in_proj", "x_proj", "out_proj")

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
    # The shared expert reads the MLP input like gate/up; its down projection reads its own product.
    "shared_expert.gate_proj": "mlp_in",
    "shared_expert.up_proj": "mlp_in",
    "shared_expert.down_proj": "shared_down_in",
    # Mamba: each mixer linear reads a different tensor (normed input, conv output, scan output).
    "in_proj": "mixer_in",
    "x_proj": "x_in",
    "out_proj": "out_in",
    # Falcon-H1: a Mamba2 mixer beside attention in the same block (names relative to the block).
    "mamba.in_proj": "ssm_in",
    "mamba.out_proj": "ssm_out_in",
}
#: Linears that live in the attention module, or Mamba's mixer (the others live in the MLP).
ATTN_LINEARS = frozenset(
    name for name, src in LINEAR_INPUTS.items() if src in ("attn_in", "o_in", "mixer_in", "x_in", "out_in")
)


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
class MoeSpec:
    """Where a sparse Mixture-of-Experts block keeps its parts (attribute names on ``block.mlp``).

    ``experts``: the fused experts module with 3-D ``gate_up_proj [E, 2·ff, d]``
    and ``down_proj [E, d, ff]`` (``gate`` rows first, then ``up``: the forward
    splits with ``chunk(2)``). ``router``: the top-k router, a reader of the
    stream. ``shared_expert``: a dense MLP every token passes through (its
    ``down_proj`` is a writer), ``shared_expert_gate`` its scalar sigmoid gate
    (a reader); both ``None`` where the family has none.
    """

    experts: str = "experts"
    router: str = "gate"
    shared_expert: str | None = None
    shared_expert_gate: str | None = None

    @property
    def block_linears(self) -> tuple[str, ...]:
        """The ``nn.Linear`` modules of an MoE block beside the fused experts (attention, shared expert)."""
        return ATTENTION_LINEARS + (SHARED_EXPERT_LINEARS if self.shared_expert else ())


@dataclass(frozen=True)
class Writer:
    """One weight of block ``layer`` that writes into the residual stream.

    ``component``: ``"attn"`` (``o_proj``), ``"mlp"`` (a dense ``down_proj``),
    ``"experts"`` (the fused routed experts' ``down_proj [E, d, ff]``),
    ``"shared_expert"`` (its ``down_proj``) or ``"mixer"`` (Mamba's ``out_proj``).
    ``name`` is the block-relative name (``"o_proj"``, ``"experts.down_proj"``,
    ...), ``module`` the module holding parameter ``param`` (``"weight"`` of an
    ``nn.Linear``, or ``"down_proj"`` of the experts module). Every writer's
    weight has the residual width ``d`` as the output (row) dimension of each
    of its matrices.
    """

    layer: int
    component: str
    name: str
    module: nn.Module
    param: str = "weight"

    @property
    def weight(self) -> Any:
        """The parameter (``[d, in]``, or ``[E, d, ff]`` for fused experts).

        A quantized stand-in has none: ``None`` (an ``Int8LinearSim``) or a module list (per-expert LLM.int8).
        """
        return getattr(self.module, self.param)

    @property
    def stacked(self) -> bool:
        """Whether this is a fused 3-D parameter of one matrix per expert."""
        return self.component == "experts"

    @property
    def strength(self) -> str:
        """Which of AIRD's two strengths applies: ``"attn"`` (o_proj, Mamba's mixer) or ``"mlp"``."""
        return "attn" if self.component in ("attn", "mixer") else "mlp"

    def matrices(self) -> list[tuple[str, Any]]:
        """``(label, W [d, in])`` for each matrix: one, or one view per expert (``name[e]``)."""
        w = self.weight
        if self.stacked:
            return [(f"{self.name}[{e}]", w[e]) for e in range(int(w.shape[0]))]
        return [(self.name, w)]


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
    outside attention. ``moe``: the block's MLP is a sparse MoE block (see
    :class:`MoeSpec`); ``linear_names`` are then those of a dense block of the
    family, used for blocks whose MLP is dense. ``backbone`` / ``embedding`` /
    ``attn_name`` / ``mlp_name`` / ``input_norm_name``: where the parts live
    (Mamba: ``backbone``, ``embeddings``, ``mixer``, no MLP, ``norm``).
    ``ssm_name``: a state-space mixer beside attention in the same block, fed the
    same normed input and added to the stream with it (Falcon-H1's ``mamba``).
    """

    family: str
    norm_offset: float = 0.0
    linear_names: tuple[str, ...] = BLOCK_LINEARS
    mlp_norm: str = "post_attention_layernorm"
    post_norms: tuple[str, str] | None = None
    qk_norms: bool = False
    moe: MoeSpec | None = None
    backbone: str = "model"
    embedding: str = "embed_tokens"
    attn_name: str = "self_attn"
    mlp_name: str | None = "mlp"
    input_norm_name: str = "input_layernorm"
    ssm_name: str | None = None

    @property
    def state_space(self) -> bool:
        """Whether blocks are state-space mixers (Mamba) with no attention and no MLP."""
        return self.mlp_name is None

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
    "mixtral": ArchitectureSpec("mixtral", moe=MoeSpec()),
    "qwen2_moe": ArchitectureSpec(
        "qwen2_moe", moe=MoeSpec(shared_expert="shared_expert", shared_expert_gate="shared_expert_gate")
    ),
    "qwen3_moe": ArchitectureSpec("qwen3_moe", qk_norms=True, moe=MoeSpec()),
    "olmoe": ArchitectureSpec("olmoe", qk_norms=True, moe=MoeSpec()),
    # Falcon-H1: attention and a Mamba2 mixer in parallel on the normed input, then the MLP
    # (scalar "multipliers" around each commute with every projection here).
    "falcon_h1": ArchitectureSpec(
        "falcon_h1",
        linear_names=HYBRID_BLOCK_LINEARS,
        mlp_norm="pre_ff_layernorm",
        mlp_name="feed_forward",
        ssm_name="mamba",
    ),
    # Mamba2: the same block shape; x_proj/dt_proj are folded into in_proj, and a gated norm precedes
    # out_proj inside the mixer.
    "mamba2": ArchitectureSpec(
        "mamba2",
        linear_names=("in_proj", "out_proj"),
        mlp_norm="norm",
        backbone="backbone",
        embedding="embeddings",
        attn_name="mixer",
        mlp_name=None,
        input_norm_name="norm",
    ),
    "mamba": ArchitectureSpec(
        "mamba",
        linear_names=MIXER_LINEARS,
        mlp_norm="norm",
        backbone="backbone",
        embedding="embeddings",
        attn_name="mixer",
        mlp_name=None,
        input_norm_name="norm",
    ),
}


class ModelLayout:
    """Named access to the parts of a supported decoder-only model."""

    def __init__(self, model: nn.Module, spec: ArchitectureSpec) -> None:
        # Any: the HF methods used here (get_output_embeddings, config) are not on nn.Module.
        self.model: Any = model
        self.spec = spec
        inner = getattr(model, spec.backbone, None)
        layers = getattr(inner, "layers", None)
        if inner is None or layers is None:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no .{spec.backbone}.layers; expected a *ForCausalLM of "
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
        emb = getattr(self.inner, self.spec.embedding)
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
        """The block's attention (Mamba: its mixer, the token-mixing part)."""
        return cast(nn.Module, getattr(self._block(layer), self.spec.attn_name))

    def mlp(self, layer: int) -> nn.Module:
        """The block's MLP (a sparse MoE block in MoE layers); Mamba blocks have none."""
        if self.spec.mlp_name is None:
            raise UnsupportedArchitectureError(f"{self.spec.family} blocks have no MLP")
        return cast(nn.Module, getattr(self._block(layer), self.spec.mlp_name))

    def is_moe(self, layer: int) -> bool:
        """Whether block ``layer``'s MLP is a sparse MoE block (Qwen-MoE may mix in dense ones)."""
        moe = self.spec.moe
        return moe is not None and hasattr(self.mlp(layer), moe.experts)

    def experts(self, layer: int) -> nn.Module:
        """The fused experts module of MoE block ``layer`` (``gate_up_proj``, ``down_proj``, ``act_fn``)."""
        if not self.is_moe(layer):
            raise InvalidArgumentError(
                f"block {layer} of {self.spec.family} is not a Mixture-of-Experts block"
            )
        assert self.spec.moe is not None
        return cast(nn.Module, getattr(self.mlp(layer), self.spec.moe.experts))

    def readers(self, layer: int) -> dict[str, nn.Module]:
        """The gates of block ``layer`` that read the residual stream to route (never edited or compressed).

        ``{"gate": router}`` for an MoE block (plus ``"shared_expert_gate"`` for
        Qwen2-MoE), ``{}`` for a dense or Mamba block.
        """
        moe = self.spec.moe
        if moe is None or not self.is_moe(layer):
            return {}
        mlp = self.mlp(layer)
        out = {moe.router: cast(nn.Module, getattr(mlp, moe.router))}
        if moe.shared_expert_gate is not None:
            out[moe.shared_expert_gate] = cast(nn.Module, getattr(mlp, moe.shared_expert_gate))
        return out

    def writers(self, layer: int) -> list[Writer]:
        """Every weight of block ``layer`` that writes into the residual stream (see the module table).

        A family whose spec names a shared expert raises
        :class:`~refusal_core.errors.UnsupportedArchitectureError` for an MoE
        block without one, rather than leave a writer out.
        """
        if self.spec.state_space:
            return [Writer(layer, "mixer", "out_proj", self.linear(layer, "out_proj"))]
        out = [Writer(layer, "attn", "o_proj", self.attn_out(layer))]
        if self.spec.ssm_name is not None:
            name = f"{self.spec.ssm_name}.out_proj"
            out.append(Writer(layer, "mixer", name, self.linear(layer, name)))
        if not self.is_moe(layer):
            return [*out, Writer(layer, "mlp", "down_proj", self.mlp_out(layer))]
        moe = self.spec.moe
        assert moe is not None
        experts = self.experts(layer)
        if not hasattr(experts, "down_proj"):
            raise UnsupportedArchitectureError(
                f"{self.spec.family} block {layer}: experts module {type(experts).__name__} has no down_proj"
            )
        out.append(Writer(layer, "experts", f"{moe.experts}.down_proj", experts, "down_proj"))
        if moe.shared_expert is not None:
            shared = getattr(self.mlp(layer), moe.shared_expert, None)
            if shared is None:
                raise UnsupportedArchitectureError(
                    f"{self.spec.family} block {layer} has no {moe.shared_expert!r}; its layout expects one"
                )
            down = self.linear(layer, f"{moe.shared_expert}.down_proj")
            out.append(Writer(layer, "shared_expert", f"{moe.shared_expert}.down_proj", down))
        return out

    def all_writers(self) -> list[Writer]:
        """:meth:`writers` of every block, in block order."""
        return [w for layer in range(self.n_layers) for w in self.writers(layer)]

    def linear_names(self, layer: int) -> tuple[str, ...]:
        """The names of block ``layer``'s ``nn.Linear`` modules (MoE: attention, shared expert)."""
        if self.spec.moe is not None and self.is_moe(layer):
            return self.spec.moe.block_linears
        return self.spec.linear_names

    def attn_out(self, layer: int) -> nn.Module:
        """The attention output projection (``o_proj``) of block ``layer`` (Mamba: mixer ``out_proj``)."""
        if self.spec.state_space:
            return cast(nn.Module, self.attn(layer).out_proj)
        return cast(nn.Module, self.attn(layer).o_proj)

    def mlp_out(self, layer: int) -> nn.Module:
        """The MLP down projection (``down_proj``) of dense block ``layer`` (MoE: :meth:`writers`)."""
        if self.is_moe(layer):
            raise UnsupportedArchitectureError(
                f"block {layer} of {self.spec.family} is a Mixture-of-Experts block: its MLP writers are "
                f"every expert's down projection (layout.writers)"
            )
        return cast(nn.Module, self.mlp(layer).down_proj)

    def output_modules(self, layer: int) -> list[nn.Module]:
        """The modules whose outputs block ``layer`` adds to the residual stream (where ablation hooks).

        Attention and MLP writers (:meth:`attn_writer`, :meth:`mlp_writer`); for
        an MoE block the MLP writer is the whole sparse block, whose output is
        the routing-weighted sum of every expert's (and the shared expert's)
        output. Mamba: the mixer.
        """
        if self.spec.state_space:
            return [self.attn(layer)]
        if self.spec.ssm_name is not None:
            ssm = cast(nn.Module, getattr(self._block(layer), self.spec.ssm_name))
            return [self.attn_writer(layer), ssm, self.mlp_writer(layer)]
        return [self.attn_writer(layer), self.mlp_writer(layer)]

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
        """The norm whose output feeds attention (``input_layernorm``; Mamba: the block's ``norm``)."""
        return cast(nn.Module, getattr(self._block(layer), self.spec.input_norm_name))

    def post_attention_norm(self, layer: int) -> nn.Module:
        """The block's ``post_attention_layernorm`` (the MLP input norm except in Gemma 2/3)."""
        return cast(nn.Module, self._block(layer).post_attention_layernorm)

    def mlp_input_norm(self, layer: int) -> nn.Module:
        """The norm whose output feeds the MLP (Gemma 2/3: ``pre_feedforward_layernorm``)."""
        return cast(nn.Module, getattr(self._block(layer), self.spec.mlp_norm))

    def linear_parent(self, layer: int, name: str) -> nn.Module:
        """The module (attention, MLP or a submodule of it) that holds linear ``name`` as an attribute.

        ``name`` may be a dotted path relative to the MLP (``"shared_expert.down_proj"``).
        """
        names = self.linear_names(layer)
        if name not in names:
            raise InvalidArgumentError(
                f"{self.spec.family} block {layer} has no linear {name!r}; it has {names}"
            )
        if name in ATTN_LINEARS:
            return self.attn(layer)
        ssm = self.spec.ssm_name
        if ssm is not None and name.startswith(f"{ssm}."):
            return cast(nn.Module, getattr(self._block(layer), ssm))
        parent = self.mlp(layer)
        for part in name.split(".")[:-1]:
            parent = cast(nn.Module, getattr(parent, part))
        return parent

    def linears(self, layer: int) -> dict[str, nn.Module]:
        """All linears of a block by name, in :meth:`linear_names` order.

        Seven (``q_proj`` … ``down_proj``) for most families, four for Phi-3
        (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``); for an MoE
        block the attention's four and any shared expert's three (the routed
        experts are fused 3-D parameters, not linears: :meth:`experts`); for Mamba
        the mixer's three called as modules (:data:`MIXER_LINEARS`).
        """
        return {name: self.linear(layer, name) for name in self.linear_names(layer)}

    def linear(self, layer: int, name: str) -> nn.Module:
        """Linear ``name`` of block ``layer`` (one of :meth:`linear_names`)."""
        return cast(nn.Module, getattr(self.linear_parent(layer, name), name.rsplit(".", 1)[-1]))

    def set_linear_(self, layer: int, name: str, new: nn.Module) -> None:
        """Put ``new`` in place of linear ``name`` of block ``layer`` (:func:`replace_module_`)."""
        replace_module_(self.linear_parent(layer, name), name.rsplit(".", 1)[-1], new)

    def residual_writers(self) -> list[nn.Module]:
        """The module of every writer of every block (``o_proj``, ``down_proj``, fused experts, ...)."""
        return [w.module for w in self.all_writers()]

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
