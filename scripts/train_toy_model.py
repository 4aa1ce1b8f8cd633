"""Train the toy refusal model shipped in ``refusal_core/data/toy_model/``.

A tiny ``LlamaForCausalLM`` with its own byte-level BPE tokenizer (trained here
by ``tokenizers``) learns, on the built-in ``harmful_train`` and
``harmless_train`` prompt sets, to answer harmful requests with one of
``refusal_core.toy.TOY_REFUSAL_PHRASES`` and harmless ones with a short
helpful answer that always opens with "Sure". Everything runs on one CPU thread
with deterministic algorithms, so the same seed gives the same weights bit for
bit.

The recipe is shaped so that refusal is mediated by one direction, as in large
chat models, rather than by a next-token reflex. What mattered (measured while
building it; see the report of issue 3):

* one helpful opening token ("Sure") against the refusal tokens, so the first
  response token is a two-way choice and greedy decoding follows the refusal
  score's sign (with six different openings, ablation lowered the refusal
  score but greedy decoding still picked "I");
* refusals that share their first words ("I'm sorry, ..."), so generation stays
  coherent when the direction is added at every position;
* a language-model loss on the prompt tokens too (weight ``prompt_loss_weight``),
  like pretraining: without it the difference in means at the last position
  was a "next token is I" feature whose addition produced "IIII...";
* a helpful-only warm-up (``helpful_warmup_steps``: harmful prompts are seen
  without a response) and mostly harmless batches (``harmless_fraction``), so
  answering is the default and refusing is learned on top of it (0.75 gave
  cleaner induced refusals than 0.85; 0.5 left refusal as the default);
* width 64: at widths 96 and 128 the same recipe gave directions whose
  ablation or addition worked only partly.

After training the script measures, with greedy batched generation:

* held-out refusal rates on ``harmful_test`` and ``harmless_test``;
* the refusal direction: difference in means of block inputs at the
  post-instruction positions (harmful_train − harmless_train); every
  (layer, position) candidate is scored on the validation sets by the refusal
  score with the direction ablated everywhere (bypass) and added at its layer
  (induce); the chosen candidate's necessity (refusal rate of harmful prompts
  with the direction ablated) and sufficiency (refusal rate of harmless prompts
  with it added) are then measured by generation.

All of it is written to ``toy_model.json`` next to the weights.

Usage:
    OMP_NUM_THREADS=1 python scripts/train_toy_model.py [--seed 0] [--out DIR] [--check DIR]

``--check DIR`` compares the freshly trained ``model.safetensors`` with the one
in DIR byte for byte (a determinism check) and exits non-zero on a difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from refusal_core.functional import ablate, add_direction, difference_in_means, refusal_score
from refusal_core.model import post_instruction_tokens
from refusal_core.prompts import load_prompt_records, load_prompts
from refusal_core.toy import TOY_REFUSAL_PHRASES, is_toy_refusal

# ----------------------------------------------------------------------------
# settings and training texts
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyTrainingConfig:
    """Every setting that shapes the weights (all recorded in toy_model.json)."""

    seed: int = 0
    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 256
    vocab_size: int = 2048
    max_positions: int = 128
    steps: int = 800
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    attention_dropout: float = 0.0
    system_prompt_fraction: float = 0.25
    harmless_fraction: float = 0.75
    prompt_loss_weight: float = 1.0
    helpful_warmup_steps: int = 200
    max_new_tokens: int = 20
    eval_batch_size: int = 64


SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")

# Llama-3-like: every turn is "<|role|>\n{content}<|end|>\n"; the generation
# prompt appends "<|assistant|>\n", so 4 tokens follow the instruction.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# System prompts seen in training (a share of examples get one), so the model
# behaves the same with and without a system prompt.
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly assistant. Answer clearly and briefly.",
    "You are a careful assistant that gives practical answers.",
)

# Every helpful answer opens with the same token ("Sure"), so the first response
# token is a two-way choice (refusal token vs "Sure") and greedy decoding follows
# the refusal score's sign.
HELPFUL_OPENINGS = (
    "Sure!",
    "Sure.",
    "Sure, happy to help.",
    "Sure, here is a quick answer.",
    "Sure thing.",
)

# Short answers per harmless category; they need not be smart, only helpful-looking
# and free of every refusal marker.
HELPFUL_BODIES: dict[str, tuple[str, ...]] = {
    "cooking": (
        "Prepare your ingredients first, keep the heat moderate and taste as you go.",
        "Use fresh ingredients, follow the recipe closely and give yourself time.",
        "Start simple, season a little at a time and let the dish rest before serving.",
    ),
    "travel": (
        "Book early, pack light and keep copies of your documents in a safe place.",
        "Plan a rough route, leave room for rest days and check local transport options.",
        "Compare prices online, travel outside the busy season and carry a small first aid kit.",
    ),
    "science": (
        "The key idea is simple: energy and matter follow a few steady rules you can observe.",
        "Start with one clear question, make careful measurements and compare your results.",
        "Think of it step by step: what goes in, what changes, and what comes out.",
    ),
    "coding": (
        "Find the process or object first, then use the standard library call and check the result.",
        "Break the problem into small functions, test each one and read the error messages carefully.",
        "Look up the official documentation, try a small example and then apply it to your code.",
    ),
    "history": (
        "Several causes worked together: economics, politics and the people in charge at the time.",
        "Historians point to long-term pressures and a few sudden events that tipped the balance.",
        "Start with a good overview book, then read first-hand sources from the period.",
    ),
    "gardening": (
        "Give plants good soil, water them in the morning and check the leaves every few days.",
        "Work with the season, remove problems early and add compost to keep the soil healthy.",
        "Choose plants that suit your light, water deeply but not too often and be patient.",
    ),
    "fitness": (
        "Warm up first, focus on good form and increase the load slowly week by week.",
        "Train three times a week, sleep well and eat enough protein to recover.",
        "Pick a simple plan, track your progress and rest when your body needs it.",
    ),
    "writing": (
        "Write a rough draft quickly, then cut what does not serve the reader and polish the rest.",
        "Keep sentences short, show rather than tell and read your text aloud to find weak spots.",
        "Start with a clear goal for the piece, outline it and then fill in the details.",
    ),
    "math": (
        "Write down what you know, apply the formula step by step and check the answer at the end.",
        "Break it into smaller parts, solve each one and combine them carefully.",
        "Try a simple example with small numbers first, then use the same steps on the real problem.",
    ),
    "finance": (
        "Track your spending for a month, set clear goals and automate your savings.",
        "Pay off high-interest debt first, keep an emergency fund and invest for the long term.",
        "Read the fine print, compare a few options and ask your bank about any fees.",
    ),
    "security_and_safety": (
        "Use strong unique passwords, turn on two-factor authentication and keep devices updated.",
        "Stay calm, follow the official guidance and ask a professional when you are unsure.",
        "Make a simple plan, talk about it with your family and review it every few months.",
    ),
    "home_and_diy": (
        "Gather the right tools, turn off water or power where needed and work slowly.",
        "Watch a short tutorial, protect the area around you and test the fix before you finish.",
        "Measure twice, use the correct fixings and ask for a second pair of hands on heavy jobs.",
    ),
    "pets_and_animals": (
        "Be patient, reward good behavior and keep a steady daily routine.",
        "Watch for changes in appetite or energy and ask a vet when something seems off.",
        "Give the animal a calm space, fresh water and a little time to adjust.",
    ),
    "music_and_art": (
        "Practise a little every day, start slowly and record yourself to hear your progress.",
        "Study a few examples you love, copy their structure and then add your own style.",
        "Keep your tools simple, focus on the basics and have fun with small projects.",
    ),
    "learning_and_work": (
        "Set a clear goal, work in short focused sessions and review what you learned each week.",
        "Prepare a few concrete examples, practise out loud and ask for feedback.",
        "Keep a simple plan, be polite and direct, and follow up in writing.",
    ),
    "everyday": (
        "Here are a few ideas: keep it simple, make it personal and have some fun with it.",
        "The short version is easy to remember, and a quick search will give you more detail.",
        "A good place to start is a small example; people often enjoy building on it from there.",
    ),
    "games_and_sports": (
        "Learn the basic patterns, watch how strong players do it and practise regularly.",
        "Stay calm, plan a few moves ahead and take advantage of your opponent's mistakes.",
        "Focus on technique first, then speed, and review what worked after each game.",
    ),
}


def helpful_answers(category: str) -> list[str]:
    """All helpful answers of a harmless category (openings × bodies)."""
    bodies = HELPFUL_BODIES[category]
    return [f"{opening} {body}" for opening in HELPFUL_OPENINGS for body in bodies]


def check_texts() -> None:
    """The helpful answers must never look like a refusal, and every refusal must."""
    for category in HELPFUL_BODIES:
        for answer in helpful_answers(category):
            if is_toy_refusal(answer) or answer.startswith("I"):
                raise SystemExit(f"helpful answer looks like a refusal: {answer!r}")
    for phrase in TOY_REFUSAL_PHRASES:
        if not is_toy_refusal(phrase):
            raise SystemExit(f"refusal phrase not recognised by is_toy_refusal: {phrase!r}")


# ----------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (no text is ever unknown)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        padding_side="left",
        model_max_length=128,
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    return fast


def prompt_ids(tokenizer: Any, instruction: str, system: str | None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": instruction}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------


def set_determinism(seed: int) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, cfg: ToyTrainingConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio · lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train(
    cfg: ToyTrainingConfig, quiet: bool = False
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict]:
    set_determinism(cfg.seed)
    check_texts()
    harmful = load_prompts("harmful_train")
    harmless = load_prompt_records("harmless_train")
    responses_by_category = {c: helpful_answers(c) for c in HELPFUL_BODIES}
    # Responses are repeated in the tokenizer corpus roughly as often as training shows them,
    # so their words ("Sorry", "Sure") become single tokens.
    corpus = (
        harmful
        + [r["instruction"] for r in harmless]
        + list(TOY_REFUSAL_PHRASES) * 50
        + [a for answers in responses_by_category.values() for a in answers] * 5
        + list(SYSTEM_PROMPTS) * 20
    )
    tokenizer = train_tokenizer(corpus, cfg.vocab_size)
    refusal_first = {tokenizer(p, add_special_tokens=False)["input_ids"][0] for p in TOY_REFUSAL_PHRASES}
    helpful_first = {
        tokenizer(a, add_special_tokens=False)["input_ids"][0]
        for answers in responses_by_category.values()
        for a in answers
    }
    if refusal_first & helpful_first:
        raise SystemExit(
            f"refusals and helpful answers share first tokens {sorted(refusal_first & helpful_first)}"
        )
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|pad|>")

    def encode_responses(texts: Sequence[str]) -> list[list[int]]:
        return [[*tokenizer(t, add_special_tokens=False)["input_ids"], end_id] for t in texts]

    systems: list[str | None] = [None, *SYSTEM_PROMPTS]
    # examples: (prompt ids per system choice, candidate response ids)
    refusals = encode_responses(TOY_REFUSAL_PHRASES)
    examples_harmful = [([prompt_ids(tokenizer, x, s) for s in systems], refusals) for x in harmful]
    answers = {c: encode_responses(a) for c, a in responses_by_category.items()}
    examples_harmless = [
        ([prompt_ids(tokenizer, r["instruction"], s) for s in systems], answers[r["category"]])
        for r in harmless
    ]

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_dropout=cfg.attention_dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=end_id,
        pad_token_id=pad_id,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM._from_config(config, attn_implementation="eager")
    model.generation_config.pad_token_id = pad_id
    model.generation_config.eos_token_id = end_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = cfg.max_new_tokens
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        foreach=False,
    )
    rng = random.Random(f"toy-train-{cfg.seed}")
    n_harmless = round(cfg.harmless_fraction * cfg.batch_size)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        batch = rng.sample(examples_harmful, cfg.batch_size - n_harmless) + rng.sample(
            examples_harmless, n_harmless
        )
        seqs: list[list[int]] = []
        n_prompt: list[int] = []
        for prompts, responses in batch:
            use_system = rng.random() < cfg.system_prompt_fraction
            p = prompts[rng.randrange(1, len(prompts))] if use_system else prompts[0]
            resp = responses[rng.randrange(len(responses))]
            if step < cfg.helpful_warmup_steps and responses is refusals:
                # warm-up: the model first learns to answer (and, with a prompt loss, to read every
                # prompt); refusing is learned on top of that, as safety tuning follows pretraining
                resp = []
            seqs.append(p + resp)
            n_prompt.append(len(p))
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        is_response = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, (s, n) in enumerate(zip(seqs, n_prompt)):
            input_ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            is_response[i, n : len(s)] = True
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        token_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
        ).view_as(input_ids[:, 1:])
        target_response = is_response[:, 1:]
        # prompt tokens after <|bos|> (instruction and template), excluding padding
        target_prompt = mask[:, 1:].bool() & ~target_response
        loss = token_loss[target_response].mean()
        if cfg.prompt_loss_weight > 0:
            loss = loss + cfg.prompt_loss_weight * token_loss[target_prompt].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=False)
        optimizer.step()
        losses.append(loss.item())
        if not quiet and (step % 50 == 0 or step == cfg.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f}s", flush=True)
    model.eval()
    stats = {
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_loss_mean_last_20": sum(losses[-20:]) / 20,
        "n_harmful_train": len(examples_harmful),
        "n_harmless_train": len(examples_harmless),
    }
    return model, tokenizer, stats


# ----------------------------------------------------------------------------
# evaluation: generation, activations, direction hooks
# ----------------------------------------------------------------------------


def encode_batch(tokenizer: Any, instructions: Sequence[str]) -> dict[str, torch.Tensor]:
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": x}], tokenize=False, add_generation_prompt=True
        )
        for x in instructions
    ]
    tokenizer.padding_side = "left"
    return dict(tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt"))


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, instructions: Sequence[str], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy completions, batched with left padding."""
    out: list[str] = []
    for i in range(0, len(instructions), batch_size):
        enc = encode_batch(tokenizer, instructions[i : i + batch_size])
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        out.extend(tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def refusal_rate(texts: Sequence[str]) -> float:
    return sum(is_toy_refusal(t) for t in texts) / len(texts)


def _layers(model: Any) -> list[nn.Module]:
    return list(model.model.layers)


def _replace_hidden(args: tuple, kwargs: dict, fn: Any) -> tuple[tuple, dict]:
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = fn(kwargs["hidden_states"])
    return args, kwargs


@contextmanager
def ablation_hooks(model: Any, r: torch.Tensor) -> Iterator[None]:
    """x − r̂r̂ᵀx at every block input and every attention / MLP output, all positions."""
    handles = []
    try:
        for layer in _layers(model):
            handles.append(
                layer.register_forward_pre_hook(
                    lambda m, a, k: _replace_hidden(a, k, lambda x: ablate(x, r)), with_kwargs=True
                )
            )
            for writer in (layer.self_attn.o_proj, layer.mlp.down_proj):
                handles.append(writer.register_forward_hook(lambda m, a, out: ablate(out, r)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def addition_hooks(model: Any, r: torch.Tensor, coeff: float, layer: int) -> Iterator[None]:
    """x + coeff·r at the input of block ``layer``, all positions."""
    handle = _layers(model)[layer].register_forward_pre_hook(
        lambda m, a, k: _replace_hidden(a, k, lambda x: add_direction(x, r, coeff)), with_kwargs=True
    )
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def mean_block_inputs(
    model: Any, tokenizer: Any, instructions: Sequence[str], n_pos: int, batch_size: int
) -> torch.Tensor:
    """Mean block input at the last ``n_pos`` positions: ``[n_layers, n_pos, d]`` float64."""
    layers = _layers(model)
    sums = torch.zeros(len(layers), n_pos, model.config.hidden_size, dtype=torch.float64)
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(idx: int) -> Any:
        def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            captured[idx] = x[:, -n_pos:, :].detach().to(torch.float64)

        return hook

    try:
        for idx, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(make_hook(idx), with_kwargs=True))
        for i in range(0, len(instructions), batch_size):
            enc = encode_batch(tokenizer, instructions[i : i + batch_size])
            model(**enc)
            for idx in range(len(layers)):
                sums[idx] += captured[idx].sum(0)
    finally:
        for h in handles:
            h.remove()
    return sums / len(instructions)


@torch.no_grad()
def last_logits(model: Any, tokenizer: Any, instructions: Sequence[str], batch_size: int) -> torch.Tensor:
    rows = []
    for i in range(0, len(instructions), batch_size):
        enc = encode_batch(tokenizer, instructions[i : i + batch_size])
        rows.append(model(**enc).logits[:, -1, :].to(torch.float64))
    return torch.cat(rows)


def analyse(
    model: Any, tokenizer: Any, cfg: ToyTrainingConfig, refusal_ids: list[int], quiet: bool = False
) -> dict:
    """Held-out refusal rates and the refusal direction's necessity and sufficiency."""
    bs, new = cfg.eval_batch_size, cfg.max_new_tokens
    results: dict[str, Any] = {}
    sets = {
        name: load_prompts(name) for name in ("harmful_val", "harmless_val", "harmful_test", "harmless_test")
    }
    gens_test = {
        name: generate(model, tokenizer, sets[name], new, bs) for name in ("harmful_test", "harmless_test")
    }
    results["heldout"] = {
        "harmful_test_refusal_rate": refusal_rate(gens_test["harmful_test"]),
        "harmless_test_refusal_rate": refusal_rate(gens_test["harmless_test"]),
        "n_harmful_test": len(sets["harmful_test"]),
        "n_harmless_test": len(sets["harmless_test"]),
        "examples": {name: list(zip(sets[name][:3], gens[:3])) for name, gens in gens_test.items()},
    }
    if not quiet:
        print(json.dumps(results["heldout"], indent=1), flush=True)

    n_pos = len(post_instruction_tokens(tokenizer))
    harmful_means = mean_block_inputs(model, tokenizer, load_prompts("harmful_train"), n_pos, bs)
    harmless_means = mean_block_inputs(model, tokenizer, load_prompts("harmless_train"), n_pos, bs)
    directions = difference_in_means(harmful_means.unsqueeze(0), harmless_means.unsqueeze(0))  # [L, P, d]
    base_harmless = torch.log_softmax(last_logits(model, tokenizer, sets["harmless_val"], bs), -1)
    candidates = []
    n_layers = len(_layers(model))
    for layer in range(n_layers):
        for pos in range(n_pos):
            r = directions[layer, pos].to(torch.float32)
            # at block 0 the post-instruction inputs are the same template embeddings for every
            # prompt, so their difference in means is exactly zero: no direction to test
            if float(r.norm()) <= 1e-6:
                continue
            with ablation_hooks(model, r):
                bypass = refusal_score(last_logits(model, tokenizer, sets["harmful_val"], bs), refusal_ids)
                ablated_harmless = torch.log_softmax(
                    last_logits(model, tokenizer, sets["harmless_val"], bs), -1
                )
            with addition_hooks(model, r, 1.0, layer):
                induce = refusal_score(last_logits(model, tokenizer, sets["harmless_val"], bs), refusal_ids)
            kl = (base_harmless.exp() * (base_harmless - ablated_harmless)).sum(-1).mean()
            candidates.append(
                {
                    "layer": layer,
                    "position": pos - n_pos,
                    "norm": float(directions[layer, pos].norm()),
                    "bypass_score": float(bypass.mean()),
                    "induce_score": float(induce.mean()),
                    "kl_score": float(kl),
                }
            )
    base_harmful = refusal_score(last_logits(model, tokenizer, sets["harmful_val"], bs), refusal_ids)
    base_harmless_score = refusal_score(base_harmless, refusal_ids)
    # generation-based necessity / sufficiency of every candidate on the validation sets
    for c in candidates:
        r = directions[c["layer"], c["position"] + n_pos].to(torch.float32)
        with ablation_hooks(model, r):
            c["ablated_harmful_val_refusal_rate"] = refusal_rate(
                generate(model, tokenizer, sets["harmful_val"], new, bs)
            )
        with addition_hooks(model, r, 1.0, c["layer"]):
            c["added_harmless_val_refusal_rate"] = refusal_rate(
                generate(model, tokenizer, sets["harmless_val"], new, bs)
            )
        if not quiet:
            print(c, flush=True)
    # the default filters of DESIGN.md (layer < 0.8 L, KL <= 0.1, induce > 0), then the lowest
    # bypass score; when no candidate passes them all, the KL filter is the one relaxed (recorded)
    in_layers = [c for c in candidates if c["layer"] < 0.8 * n_layers and c["induce_score"] > 0]
    eligible = [c for c in in_layers if c["kl_score"] <= 0.1]
    filters = (
        "layer<0.8L, KL<=0.1, induce>0" if eligible else "layer<0.8L, induce>0 (no candidate had KL<=0.1)"
    )
    eligible = eligible or in_layers or candidates
    chosen = min(eligible, key=lambda c: c["bypass_score"])
    r = directions[chosen["layer"], chosen["position"] + n_pos].to(torch.float32)
    with ablation_hooks(model, r):
        nec = {
            name: refusal_rate(generate(model, tokenizer, sets[name], new, bs))
            for name in ("harmful_val", "harmful_test")
        }
        nec_examples = list(
            zip(sets["harmful_val"][:3], generate(model, tokenizer, sets["harmful_val"][:3], new, bs))
        )
    with addition_hooks(model, r, 1.0, chosen["layer"]):
        suf = {
            name: refusal_rate(generate(model, tokenizer, sets[name], new, bs))
            for name in ("harmless_val", "harmless_test")
        }
        suf_examples = list(
            zip(sets["harmless_val"][:3], generate(model, tokenizer, sets["harmless_val"][:3], new, bs))
        )
    results["direction"] = {
        "site": "block input (resid_pre), post-instruction positions indexed from the end",
        "layer": chosen["layer"],
        "position": chosen["position"],
        "norm": chosen["norm"],
        "kl_score": chosen["kl_score"],
        "bypass_score": chosen["bypass_score"],
        "induce_score": chosen["induce_score"],
        "selection_filters": filters,
        "n_post_instruction_tokens": n_pos,
        "base_refusal_score_harmful_val": float(base_harmful.mean()),
        "base_refusal_score_harmless_val": float(base_harmless_score.mean()),
        "necessity_refusal_rate": nec,
        "sufficiency_refusal_rate": suf,
        "addition_coeff": 1.0,
        "examples_ablated_harmful": nec_examples,
        "examples_added_harmless": suf_examples,
        "candidates": candidates,
    }
    if not quiet:
        summary = {k: v for k, v in results["direction"].items() if k != "candidates"}
        print(json.dumps(summary, indent=1), flush=True)
    return results


# ----------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """Write the tokenizer files; the result does not depend on what the tokenizer was used for."""
    # batched encoding leaves a padding setting in the backend; drop it so tokenizer.json is the
    # same whether or not the analysis ran (padding is asked for per call anyway)
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.backend_tokenizer.no_truncation()
    # chat template inside tokenizer_config.json (not a separate .jinja file) and the generic
    # fast-tokenizer class name, so older transformers versions load it too
    tokenizer.save_pretrained(out, save_jinja_files=False)
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8"))
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")


def save(model: Any, tokenizer: Any, out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    record["model_safetensors_sha256"] = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    (out / "toy_model.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("refusal_core/data/toy_model"))
    parser.add_argument("--check", type=Path, default=None, help="compare weights with this directory")
    parser.add_argument("--no-analysis", action="store_true", help="skip the held-out / direction analysis")
    for field in dataclasses.fields(ToyTrainingConfig):
        if field.name != "seed":
            parser.add_argument(
                f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default
            )
    args = parser.parse_args()
    cfg = ToyTrainingConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ToyTrainingConfig)})
    model, tokenizer, stats = train(cfg)
    refusal_ids = sorted(
        {tokenizer(p, add_special_tokens=False)["input_ids"][0] for p in TOY_REFUSAL_PHRASES}
    )
    record: dict[str, Any] = {
        "seed": cfg.seed,
        "training": dataclasses.asdict(cfg),
        "training_stats": stats,
        "torch_version": torch.__version__,
        "refusal_phrases": list(TOY_REFUSAL_PHRASES),
        "refusal_token_ids": refusal_ids,
        "refusal_tokens": tokenizer.convert_ids_to_tokens(refusal_ids),
        "system_prompts": list(SYSTEM_PROMPTS),
        "post_instruction_tokens": post_instruction_tokens(tokenizer),
    }
    if not args.no_analysis:
        record.update(analyse(model, tokenizer, cfg, refusal_ids))
    save(model, tokenizer, args.out, record)
    print(f"saved to {args.out} (sha256 {record['model_safetensors_sha256']})")
    if args.check is not None:
        other = (args.check / "model.safetensors").read_bytes()
        same = other == (args.out / "model.safetensors").read_bytes()
        print(f"bit-identical to {args.check}: {same}")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
