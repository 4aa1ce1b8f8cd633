"""The model adapter: every caller feeds a model and swaps its modules through here.

==================  ==========================================================================
module              what it holds
==================  ==========================================================================
``layout``          which decoder families are supported and where their parts live
                    (:class:`ModelLayout`, :func:`get_layout`); the block linears' names and the
                    one table of which input feeds which linear (:data:`LINEAR_INPUTS`);
                    :func:`replace_module_`, the one module swap (keeps accelerate's hooks)
``inputs``          instructions → chat template → token ids → left-padded batch with
                    positions, on the model's device; the post-instruction positions
``identity``        :func:`model_identity`, recorded in every artifact
``loading``         :func:`load_model` (toy, directory, checkpoint, GGUF, cached hub id), dtype
                    and device resolution, the GGUF conversion cache
``simulated``       the modules refusal_core puts into a model that transformers does not know
                    (``Int8LinearSim``) and how a checkpoint's record rebuilds them on load; here,
                    below compression, so that loading never imports compression
==================  ==========================================================================

Example:
    >>> from refusal_core.model import get_layout, load_model
    >>> model, tok = load_model("toy")
    >>> get_layout(model).spec.family
    'llama'
"""

from refusal_core.model.identity import model_identity
from refusal_core.model.inputs import (
    Suffix,
    batch_inputs,
    check_instructions,
    device_label,
    encode_prompts,
    format_prompt,
    left_pad,
    model_device,
    pad_token_id,
    positions,
    post_instruction_tokens,
)
from refusal_core.model.layout import (
    ATTN_LINEARS,
    BLOCK_LINEARS,
    FUSED_BLOCK_LINEARS,
    LINEAR_INPUTS,
    SUPPORTED_ARCHITECTURES,
    ArchitectureSpec,
    ModelLayout,
    get_layout,
    input_taps,
    replace_module_,
)
from refusal_core.model.loading import (
    CACHE_ENV_VAR,
    DTYPES,
    check_device,
    gguf_cache_root,
    gguf_cached_dir,
    hub_cache_dir,
    load_model,
    model_record,
    read_chat_template,
    resolve_dtype,
)

__all__ = [
    "ATTN_LINEARS",
    "BLOCK_LINEARS",
    "CACHE_ENV_VAR",
    "DTYPES",
    "FUSED_BLOCK_LINEARS",
    "LINEAR_INPUTS",
    "SUPPORTED_ARCHITECTURES",
    "ArchitectureSpec",
    "ModelLayout",
    "Suffix",
    "batch_inputs",
    "check_device",
    "check_instructions",
    "device_label",
    "encode_prompts",
    "format_prompt",
    "get_layout",
    "gguf_cache_root",
    "gguf_cached_dir",
    "hub_cache_dir",
    "input_taps",
    "left_pad",
    "load_model",
    "model_device",
    "model_identity",
    "model_record",
    "pad_token_id",
    "positions",
    "post_instruction_tokens",
    "read_chat_template",
    "replace_module_",
    "resolve_dtype",
]
