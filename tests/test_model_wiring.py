"""Where the model layer meets behaviour, checked against references computed here.

- the token ids :func:`encode_prompts` feeds every caller equal what the
  tokenizer's own ``apply_chat_template(..., add_generation_prompt=True)``
  gives, and the merge check fires exactly on the prompts that merge;
- the logits generation decodes from at every step equal a full forward of
  the prompt and the tokens so far, alone and unpadded, without a KV cache;
- the table of which input feeds which linear (:data:`LINEAR_INPUTS`) is what
  the models compute;
- every module swap keeps an accelerate hook of the module it replaces.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from torch import nn

from refusal_core.compression.quantization import Int8LinearSim, quantize_llm_int8_
from refusal_core.errors import InvalidArgumentError
from refusal_core.evaluation.generation import SamplingConfig, generate_ids
from refusal_core.model import (
    LINEAR_INPUTS,
    batch_inputs,
    encode_prompts,
    get_layout,
    input_taps,
    replace_module_,
)
from refusal_core.testing.tiny import TINY_FAMILIES, tiny_model, tiny_prompts, tiny_tokenizer
from refusal_core.toy import load_toy_model

TOK = tiny_tokenizer()
PROMPTS = [
    *tiny_prompts(3, "harmful", seed=7),
    *tiny_prompts(3, "harmless", seed=7),
    "Hi",
    "A much longer one.",
]
NO_STOP = [-1]


def _reference_ids(tokenizer: Any, instruction: str, system: str | None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": instruction}
    ]
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = out["input_ids"] if not isinstance(out, list) else out
    return [int(t) for t in ids]


# ----------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "toy"])
@pytest.mark.parametrize("system", [None, "You are a careful assistant."])
def test_encoding_equals_apply_chat_template(which: str, system: str | None) -> None:
    tok = TOK if which == "tiny" else load_toy_model()[1]
    for require in (False, True):
        ours = encode_prompts(tok, PROMPTS, system=system, require_post_instruction=require)
        for i, instruction in enumerate(PROMPTS):
            ref = _reference_ids(tok, instruction, system)
            assert ours[i] == ref, (
                f"{which} tokenizer, system={system!r}, require_post_instruction={require}: "
                f"encode_prompts gives {ours[i]} for {instruction!r}, apply_chat_template gives {ref}"
            )


def test_token_suffix_goes_right_before_the_generation_prompt() -> None:
    # The reference splits apply_chat_template's ids where the assistant turn begins.
    assistant = TOK.convert_tokens_to_ids("<|assistant|>")
    end = TOK.convert_tokens_to_ids("<|end|>")
    suffix = [5, 6, 7]
    ours = encode_prompts(TOK, PROMPTS[:3], suffixes=[suffix, None, "and more"])
    ref0 = _reference_ids(TOK, PROMPTS[0], None)
    cut = len(ref0) - 2
    assert ref0[cut:] == [end, assistant], f"unexpected template tail {ref0[-2:]}"
    assert ours[0] == ref0[:cut] + suffix + ref0[cut:], "a token suffix goes between instruction and <|end|>"
    assert ours[1] == _reference_ids(TOK, PROMPTS[1], None), "no suffix must leave the prompt as it is"
    assert ours[2] == _reference_ids(TOK, f"{PROMPTS[2]} and more", None), "a text suffix joins after a space"


def test_the_merge_check_fires_exactly_on_prompts_that_merge_with_the_template() -> None:
    # A template whose generation prompt is plain text, so an instruction's last characters can merge with it.
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}s{% endif %}"
    )
    post = [int(t) for t in tok("s", add_special_tokens=False)["input_ids"]]
    words = ["cat", "dog", "story", "poem", "idea", "light", "morning", "wind", "sea", "a", "the", "tool"]
    merged, kept = [], []
    for w in words:
        instruction = f"Tell me about the {w}"
        ref = _reference_ids(tok, instruction, None)
        (merged if ref[-len(post) :] != post else kept).append(instruction)
    assert merged, f"none of {words} merges with 's' in the tiny vocabulary; pick other words"
    assert kept, f"every one of {words} merges with 's'; pick other words"
    for instruction in merged:
        with pytest.raises(InvalidArgumentError, match="merges with the chat template"):
            encode_prompts(tok, [instruction], require_post_instruction=True)
        with pytest.raises(InvalidArgumentError, match="merges with the chat template"):
            encode_prompts(tok, [instruction], suffixes=[[5]])
        # Generation reads no positions: the merged prompt is encoded as the template renders it.
        assert encode_prompts(tok, [instruction]) == [_reference_ids(tok, instruction, None)]
    for instruction in kept:
        assert encode_prompts(tok, [instruction], require_post_instruction=True) == [
            _reference_ids(tok, instruction, None)
        ]


# ----------------------------------------------------------------------------
# generation's per-step logits
# ----------------------------------------------------------------------------


def _full_forward_last_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """The next-token logits after ``ids``: one prompt, no padding, no KV cache, default positions."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0, -1].to(torch.float64)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
@pytest.mark.parametrize("sampled", [False, True])
def test_every_decoding_step_sees_the_logits_of_a_full_forward(family: str, sampled: bool) -> None:
    model = tiny_model(family, dtype=torch.float64, seed=3)
    prompts = encode_prompts(TOK, PROMPTS)
    steps: list[torch.Tensor] = []

    def record(module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        steps.append(out.logits[:, -1].detach().to(torch.float64).clone())

    n_new = 6
    handle = model.register_forward_hook(record, with_kwargs=True)
    try:
        sampling = SamplingConfig(temperature=1.3) if sampled else None
        new = generate_ids(
            model,
            TOK,
            prompts,
            max_new_tokens=n_new,
            batch_size=len(prompts),
            sampling=sampling,
            seed=11,
            stop_token_ids=NO_STOP,
            progress=False,
        )
    finally:
        handle.remove()
    # One prefill, then one forward per new token but the last.
    assert len(steps) == n_new, f"{family}: {len(steps)} forward passes for {n_new} new tokens"
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # generation batches longest first
    for row, i in enumerate(order):
        assert len(new[i]) == n_new, f"{family}: prompt {i} stopped early"
        for t in range(n_new):
            ref = _full_forward_last_logits(model, prompts[i] + new[i][:t])
            got = steps[t][row]
            err = float((got - ref).abs().max())
            assert err < 1e-9, (
                f"{family}, sampled={sampled}: prompt {i} (length {len(prompts[i])}), step {t}: the logits "
                f"generation decoded from differ from a full unpadded forward by {err:.3g}"
            )
            if not sampled:
                assert new[i][t] == int(ref.argmax()), f"{family}: prompt {i} step {t} is not the argmax"


def test_batch_inputs_give_each_prompt_its_unpadded_last_logits() -> None:
    # What activation capture and selection feed the model: left padding, mask, positions.
    model = tiny_model("qwen2", dtype=torch.float64, seed=4)
    prompts = encode_prompts(TOK, PROMPTS)
    batch = batch_inputs(prompts, TOK.pad_token_id)
    width = max(len(p) for p in prompts)
    for i, ids in enumerate(prompts):
        pad = width - len(ids)
        # RoPE only sees position differences, so shifted positions would pass the logits check below:
        # the exact layout is checked too (pads first, real tokens counted from 0).
        assert batch["input_ids"][i].tolist() == [TOK.pad_token_id] * pad + ids, f"row {i}: ids"
        assert batch["attention_mask"][i].tolist() == [0] * pad + [1] * len(ids), f"row {i}: mask"
        assert batch["position_ids"][i].tolist() == [0] * pad + list(range(len(ids))), f"row {i}: positions"
    with torch.no_grad():
        out = model(**batch, use_cache=False).logits[:, -1]
    for i, ids in enumerate(prompts):
        err = float((out[i].to(torch.float64) - _full_forward_last_logits(model, ids)).abs().max())
        assert err < 1e-9, f"prompt {i}: padded batch logits differ from the prompt alone by {err:.3g}"


# ----------------------------------------------------------------------------
# layout: the input table and module swaps
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_linear_input_table_is_what_the_model_computes(family: str) -> None:
    model = tiny_model(family, seed=5)
    layout = get_layout(model)
    seen: dict[str, torch.Tensor] = {}

    def make(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen[name] = args[0].detach().clone()

        return hook

    linears = layout.linears(1)
    handles = [m.register_forward_pre_hook(make(name)) for name, m in linears.items()]
    try:
        with torch.no_grad():
            model(**batch_inputs(encode_prompts(TOK, PROMPTS[:3]), TOK.pad_token_id), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    names = list(linears)
    for a in names:
        for b in names:
            same_input = seen[a].shape == seen[b].shape and bool(torch.equal(seen[a], seen[b]))
            assert same_input == (LINEAR_INPUTS[a] == LINEAR_INPUTS[b]), (
                f"{family}: {a} and {b} {'receive' if same_input else 'do not receive'} the same input, "
                f"but LINEAR_INPUTS says {LINEAR_INPUTS[a]} and {LINEAR_INPUTS[b]}"
            )
    taps = input_taps(names)
    assert sorted(taps) == sorted({LINEAR_INPUTS[n] for n in names}), f"{family}: a source without a tap"
    for source, name in taps.items():
        assert names.index(name) == min(i for i, n in enumerate(names) if LINEAR_INPUTS[n] == source)


class _CountingHook(ModelHook):
    def __init__(self) -> None:
        self.calls = 0

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.calls += 1
        return args, kwargs


def test_replace_module_moves_the_accelerate_hook_to_the_new_module() -> None:
    layout = get_layout(tiny_model("llama", seed=6))
    old = layout.linear(0, "o_proj")
    hook = _CountingHook()
    add_hook_to_module(old, hook)
    new = nn.Linear(old.in_features, old.out_features, bias=False)
    layout.set_linear_(0, "o_proj", new)
    assert layout.linear(0, "o_proj") is new
    assert getattr(new, "_hf_hook", None) is hook, "the new module lost the accelerate hook"
    new(torch.zeros(1, old.in_features))
    assert hook.calls == 1, "the hook is attached but does not run on the new module's forward"
    plain = nn.Linear(2, 2)
    holder = nn.Module()
    holder.lin = nn.Linear(2, 2)
    replace_module_(holder, "lin", plain)
    assert holder.lin is plain
    assert not hasattr(plain, "_hf_hook"), "no hook must appear from nowhere"


def test_llm_int8_simulation_keeps_accelerate_hooks() -> None:
    model = tiny_model("llama", seed=6)
    layout = get_layout(model)
    hooks = {}
    for layer in range(layout.n_layers):
        for name, module in layout.linears(layer).items():
            hooks[layer, name] = _CountingHook()
            add_hook_to_module(module, hooks[layer, name])
    quantize_llm_int8_(model)
    with torch.no_grad():
        model(**batch_inputs(encode_prompts(TOK, PROMPTS[:2]), TOK.pad_token_id), use_cache=False)
    for (layer, name), hook in hooks.items():
        module = layout.linear(layer, name)
        assert isinstance(module, Int8LinearSim), f"{name}[{layer}] was not quantized"
        assert getattr(module, "_hf_hook", None) is hook, f"{name}[{layer}] lost its accelerate hook"
        assert hook.calls == 1, f"{name}[{layer}]: the hook ran {hook.calls} times in one forward"


def test_bad_arguments_raise_before_anything_changes() -> None:
    layout = get_layout(tiny_model("llama", seed=6))
    before = layout.linear(0, "o_proj")
    with pytest.raises(InvalidArgumentError, match="no linear"):
        layout.set_linear_(0, "out_proj", nn.Linear(2, 2))
    with pytest.raises(InvalidArgumentError, match="layer must be"):
        layout.set_linear_(7, "o_proj", nn.Linear(2, 2))
    assert layout.linear(0, "o_proj") is before, "a refused swap changed the model"
    with pytest.raises(InvalidArgumentError, match="not a block linear"):
        input_taps(["q_proj", "lm_head"])
    with pytest.raises(InvalidArgumentError, match="require_post_instruction must be a bool"):
        encode_prompts(TOK, ["Hi"], require_post_instruction=1)  # type: ignore[arg-type]
