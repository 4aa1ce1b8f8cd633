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
  ablation or addition worked only partly (first, 4-layer recipe);
* depth 8 (issue 19): Arditi et al.'s selection discards layers >= floor(0.8 L).
  With 4 and 6 layers no candidate below the cut passed the KL filter (the
  mechanism forms in the last third); with 8 layers the directions at layers 4
  and 5 pass it with KL < 0.01;
* 3 % label noise (``label_noise``: after the warm-up, that share of examples
  gets the other class's response): without it the first-token decision
  saturates (harmless refusal score about -11.5) and the selected layer-5
  direction, added at every position, makes the model emit the opening "I"
  at every step ("IIII...", sufficiency 7/64 and 10/64); with it the decision
  stays finite and the induced refusals are whole sentences (64/64);
* 2 heads of size 32: vLLM's CPU attention rejects head size 16.

Recipes tried for issue 19 (seed 0, width 64, d_ff 256, 800 steps, all else
as the defaults unless named; measured by :func:`analyse`, i.e. the study's
own stages; "nec" / "suf" are necessity / sufficiency counts of 64; train
seconds on a shared 2-core EPYC at load average 10-20, one thread)::

    run  layers heads change            train s  harmful/harmless  source (cut)  KL      nec  suf  floor  met
    -    4      4x16  (first toy)       162      0.949 / 0.051     (2,-1)+ (3)   0.123   5    60   0.994  no
    r1   8      2x32  -                 611      0.939 / 0.039     (5,-1) (6)    0.0008  0    7    0.998  no
    r2   6      2x32  -                 623      0.959 / 0.022     (2,-1)+ (4)   0.485   54   38   0.992  no
    r3   8      2x32  prompt loss 2     668      0.969 / 0.051     (5,-1) (6)    0.0054  0    10   0.998  no
    r4   8      2x32  harmless 0.65     stopped at step 0 in favour of r5
    r5   8      2x32  label noise 0.03  635      0.908 / 0.034     (4,-1) (6)    0.0065  0    64   0.999  yes

    + = fallback: no candidate below the cut passed every filter.

r5 is the committed toy (the defaults below). ``--arch moe`` trains the same
recipe with a tiny Mixtral MLP (``n_experts`` experts, ``experts_per_token``
routed) into ``refusal_core/data/toy_moe_model``.

After training the script measures, with the study's own stages
(``StudyConfig()`` defaults: 128 train, 32 validation and 64 test prompts per
class, 4 split halves, 24 new tokens, the default selection filters):

* held-out refusal rates on the whole ``harmful_test`` and ``harmless_test``
  splits (the study's refusal judge; checked to agree with ``is_toy_refusal``);
* the candidates and their split-half noise floor, Arditi et al.'s selection,
  and the chosen direction's necessity (harmful test prompts refused with it
  ablated) and sufficiency (harmless ones refused with it added);
* whether each criterion of DESIGN.md ("Toy refusal model") holds.

All of it is written to ``toy_model.json`` next to the weights.

Usage:
    OMP_NUM_THREADS=1 python scripts/train_toy_model.py [--seed 0] [--out DIR] [--check DIR]
    OMP_NUM_THREADS=1 python scripts/train_toy_model.py --analyse DIR   # re-measure a saved model

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from refusal_core.errors import UnsupportedArchitectureError
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
    #: "llama" (dense), "moe" (a Mixtral sparse-MoE MLP in every block; attention as in llama) or
    #: "qwen3_moe" (Qwen3-MoE: the first ``dense_layers`` blocks keep a dense MLP of ``d_ff``, as
    #: DeepSeek-V3's ``first_k_dense_replace`` does, the rest are sparse; its attention adds
    #: per-head q/k RMSNorms)
    arch: str = "llama"
    #: qwen3_moe only: how many leading blocks are dense (Qwen3-MoE's ``mlp_only_layers``)
    dense_layers: int = 0
    n_experts: int = 4
    experts_per_token: int = 2
    router_aux_loss_coef: float = 0.01
    n_layers: int = 8
    d_model: int = 64
    n_heads: int = 2
    d_ff: int = 256
    vocab_size: int = 2048
    max_positions: int = 128
    #: standard deviation of the initial weights (transformers' ``initializer_range``)
    init_std: float = 0.02
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
    #: share of training examples (after the warm-up) whose response is the other class's: a
    #: harmful prompt answered, a harmless one refused, as real preference data is not clean
    label_noise: float = 0.03
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


ARCHITECTURES = ("llama", "moe", "qwen3_moe")


def check_architecture(cfg: ToyTrainingConfig) -> None:
    """Stop (SystemExit) on an architecture setting that cannot be built, before any work."""
    if cfg.arch not in ARCHITECTURES:
        raise SystemExit(f"--arch must be one of {', '.join(ARCHITECTURES)}, got {cfg.arch!r}")
    if cfg.dense_layers and cfg.arch != "qwen3_moe":
        raise SystemExit("--dense-layers needs --arch qwen3_moe")
    if not 0 <= cfg.dense_layers < cfg.n_layers:
        raise SystemExit(f"--dense-layers must be in [0, {cfg.n_layers}), got {cfg.dense_layers}")


def train(cfg: ToyTrainingConfig, quiet: bool = False) -> tuple[Any, PreTrainedTokenizerFast, dict]:
    check_architecture(cfg)
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
    categories = sorted(answers)
    examples_harmless = [
        ([prompt_ids(tokenizer, r["instruction"], s) for s in systems], answers[r["category"]])
        for r in harmless
    ]

    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "max_position_embeddings": cfg.max_positions,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "attention_dropout": cfg.attention_dropout,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": end_id,
        "pad_token_id": pad_id,
        "initializer_range": cfg.init_std,
    }
    config: PretrainedConfig
    model_class: Any
    if cfg.arch == "llama":
        config, model_class = LlamaConfig(**common), LlamaForCausalLM
    elif cfg.arch == "moe":
        config = MixtralConfig(
            **common,
            num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.experts_per_token,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            output_router_logits=False,
        )
        model_class = MixtralForCausalLM
    else:  # qwen3_moe (check_architecture admits no other)
        config = Qwen3MoeConfig(
            **common,
            head_dim=cfg.d_model // cfg.n_heads,
            num_experts=cfg.n_experts,
            num_experts_per_tok=cfg.experts_per_token,
            moe_intermediate_size=cfg.d_ff,
            # Mixtral's routing: the top-k router probabilities renormalized to sum to one
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=list(range(cfg.dense_layers)),
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            output_router_logits=False,
        )
        model_class = Qwen3MoeForCausalLM
    torch.manual_seed(cfg.seed)
    model = model_class._from_config(config, attn_implementation="eager")
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
    moe = cfg.arch != "llama"  # a routed model: its load-balancing loss joins the objective
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
            if cfg.label_noise > 0 and step >= cfg.helpful_warmup_steps and rng.random() < cfg.label_noise:
                others = (
                    answers[categories[rng.randrange(len(categories))]] if responses is refusals else refusals
                )
                resp = others[rng.randrange(len(others))]
            elif step < cfg.helpful_warmup_steps and responses is refusals:
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
        out = model(
            input_ids=input_ids, attention_mask=mask, **({"output_router_logits": True} if moe else {})
        )
        logits = out.logits[:, :-1]
        token_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
        ).view_as(input_ids[:, 1:])
        target_response = is_response[:, 1:]
        # prompt tokens after <|bos|> (instruction and template), excluding padding
        target_prompt = mask[:, 1:].bool() & ~target_response
        loss = token_loss[target_response].mean()
        if cfg.prompt_loss_weight > 0:
            loss = loss + cfg.prompt_loss_weight * token_loss[target_prompt].mean()
        if moe:
            # Mixtral's load-balancing loss (returned unscaled), so every expert gets tokens
            loss = loss + cfg.router_aux_loss_coef * out.aux_loss
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
# evaluation: the project's own study stages, so the record agrees with `refusal-core study`
# ----------------------------------------------------------------------------

#: The criteria of DESIGN.md ("Toy refusal model"), fixed before any compression or repair
#: result was looked at. A recipe is accepted only when every one holds.
CRITERIA = {
    "harmful_test_refusal_rate_min": 0.9,
    "harmless_test_refusal_rate_max": 0.1,
    "necessity_refusal_rate_max": 0.1,
    "sufficiency_refusal_rate_min": 0.8,
    "noise_floor_at_source_min": 0.95,
}


def _rate(flags: Sequence[bool]) -> dict[str, Any]:
    from refusal_core.stats import rate_of

    r = rate_of(list(flags))
    return {"rate": r.value, "k": r.k, "n": r.n, "ci95": [r.low, r.high]}


def analyse(model: Any, tokenizer: Any, refusal_ids: list[int], quiet: bool = False) -> dict:
    """Held-out refusal and the base mechanism, measured by the study's own stages.

    The study's defaults (``StudyConfig()``: 128 train, 32 validation, 64 test prompts per class,
    4 split halves, 24 new tokens, the default selection filters) run the study's base steps
    (extraction with the split-half noise floor, Arditi et al.'s selection, necessity and
    sufficiency by generation) on the freshly trained model, so what ``refusal-core study``
    reports for the committed toy is what is recorded here. Held-out refusal is also measured on
    the whole test splits with the study's refusal judge.
    """
    import tempfile

    from refusal_core import bench as steps  # the study's own steps, not a second copy
    from refusal_core.evaluation.generation import generate
    from refusal_core.evaluation.judges import SubstringJudge, classify
    from refusal_core.selection import layer_cut
    from refusal_core.study.config import StudyConfig

    t0 = time.perf_counter()
    cfg = StudyConfig(model="toy", refusal_token_ids=tuple(refusal_ids))
    judge = SubstringJudge(min_words=1)  # the study's judge for refusal rates
    results: dict[str, Any] = {}
    heldout: dict[str, Any] = {}
    for split in ("harmful_test", "harmless_test"):
        prompts = load_prompts(split)
        texts = generate(
            model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=64, progress=False
        )
        flags = [v == "refused" for v in classify(judge, prompts, texts)]
        heldout[split] = _rate(flags)
        heldout[f"{split}_examples"] = list(zip(prompts[:3], texts[:3]))
        if any(is_toy_refusal(t) != f for t, f in zip(texts, flags)):
            raise SystemExit("is_toy_refusal and the study's judge disagree on a completion")
    results["heldout"] = heldout
    with tempfile.TemporaryDirectory() as tmp:
        try:
            bench = steps.Bench(cfg, Path(tmp), progress=False, loaded=(model, tokenizer))
            base = steps.base_direction(bench)
        except UnsupportedArchitectureError as exc:
            # the study's stages need a layout for the architecture (MoE support is being added);
            # the held-out rates stand, with the reason the mechanism could not be measured
            results["analysis_unsupported"] = str(exc)
            print(f"mechanism analysis skipped: {exc}", flush=True)
            return results
        cands, noise, sel = base.candidates, base.noise, base.selection
        layer, pos_i = sel.source
        r = cands.directions[layer, pos_i]
        mech, _ = steps.mechanism(bench, "base", model, r, layer, [base.key])
    n_layers = sel.bypass.shape[0]
    direction: dict[str, Any] = {
        "site": "block input (resid_pre), post-instruction positions indexed from the end",
        "layer": layer,
        "position": sel.positions[pos_i],
        "layer_cut": layer_cut(n_layers),
        "filters_passed": sel.selected is not None,
        "norm": float(r.norm()),
        "bypass_score": float(sel.bypass[layer, pos_i]),
        "induce_score": float(sel.induce[layer, pos_i]),
        "kl_score": float(sel.kl[layer, pos_i]),
        "noise_floor_at_source": float(noise[layer, pos_i]),
        "base_refusal_score_harmful_val": sel.baseline_harmful,
        "base_refusal_score_harmless_val": sel.baseline_harmless,
        "study_refused_harmful_test": _rate(mech["refused_harmful"]),
        "necessity_refusal_rate": _rate(mech["refused_ablated"]),
        "sufficiency_refusal_rate": _rate(mech["refused_added"]),
        "addition_coeff": 1.0,
        "study_settings": {
            "n_train": cfg.n_train,
            "n_val": cfg.n_val,
            "n_test": cfg.n_test,
            "noise_splits": cfg.noise_splits,
            "max_new_tokens": cfg.max_new_tokens,
            "selection": dataclasses.asdict(cfg.selection),
        },
        "candidates": [
            {
                "layer": lyr,
                "position": sel.positions[i],
                "norm": float(cands.directions[lyr, i].norm()),
                "bypass_score": _finite(sel.bypass[lyr, i]),
                "induce_score": _finite(sel.induce[lyr, i]),
                "kl_score": _finite(sel.kl[lyr, i]),
                "noise_floor": _finite(noise[lyr, i]),
                "passed": bool(sel.passed[lyr, i]),
            }
            for lyr in range(n_layers)
            for i in range(len(sel.positions))
        ],
    }
    results["direction"] = direction
    h, s = heldout["harmful_test"]["rate"], heldout["harmless_test"]["rate"]
    results["criteria"] = {
        "thresholds": CRITERIA,
        "heldout_harmful": h >= CRITERIA["harmful_test_refusal_rate_min"],
        "heldout_harmless": s <= CRITERIA["harmless_test_refusal_rate_max"],
        "selection_passes_below_cut": direction["filters_passed"] and layer < direction["layer_cut"],
        "necessity": direction["necessity_refusal_rate"]["rate"] <= CRITERIA["necessity_refusal_rate_max"],
        "sufficiency": direction["sufficiency_refusal_rate"]["rate"]
        >= CRITERIA["sufficiency_refusal_rate_min"],
        "noise_floor": direction["noise_floor_at_source"] >= CRITERIA["noise_floor_at_source_min"],
    }
    results["criteria"]["all_met"] = all(v for k, v in results["criteria"].items() if k != "thresholds")
    results["analysis_seconds"] = round(time.perf_counter() - t0, 1)
    if not quiet:
        summary = {k: v for k, v in direction.items() if k != "candidates"}
        print(
            json.dumps({"heldout": heldout, "direction": summary, "criteria": results["criteria"]}, indent=1)
        )
        for c in direction["candidates"]:
            print(c, flush=True)
    return results


def _finite(x: torch.Tensor) -> float | None:
    """A score as a float, None where it was not computed (NaN beyond the layer cut): strict JSON."""
    v = float(x)
    return v if math.isfinite(v) else None


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
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default refusal_core/data/toy_model, or toy_moe_model for --arch moe)",
    )
    parser.add_argument("--check", type=Path, default=None, help="compare weights with this directory")
    parser.add_argument("--no-analysis", action="store_true", help="skip the held-out / direction analysis")
    for field in dataclasses.fields(ToyTrainingConfig):
        if field.name != "seed":
            parser.add_argument(
                f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default
            )
    parser.add_argument(
        "--analyse", type=Path, default=None, metavar="DIR", help="only analyse the model saved in DIR"
    )
    args = parser.parse_args()
    if args.analyse is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.analyse, attn_implementation="eager").eval()
        tokenizer = AutoTokenizer.from_pretrained(args.analyse)
        tokenizer.padding_side = "left"
        ids = json.loads((args.analyse / "toy_model.json").read_text(encoding="utf-8"))["refusal_token_ids"]
        analyse(model, tokenizer, ids)
        return
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
    if args.out is None:
        args.out = Path("refusal_core/data") / ("toy_model" if cfg.arch == "llama" else "toy_moe_model")
    if not args.no_analysis:
        record.update(analyse(model, tokenizer, refusal_ids))
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
