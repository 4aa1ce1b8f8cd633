"""Model-level property of 8-bit quantization (DESIGN.md, property catalogue, "Model level").

The difference-in-means direction re-extracted from an 8-bit quantized tiny
model (the LLM.int8 simulation, AWQ w8) has cosine > 0.99 with the original
model's at the same site, where the two prompt classes are separated well
above the split-half noise floor.

Well-conditioned by construction: the two classes are bags of words from
disjoint word lists, and the tiny model gets a planted feature, a common
vector added to the embedding of every token that occurs only in the
"harmful" words, so the classes differ along it at every later layer. Each
half-sample is a balanced design (every word of its class exactly once at
every word position), so the two halves differ only in which words share a
prompt, not in how often or where each word occurs: word-frequency noise,
the dominant part of the split-half noise with independently drawn bags
(tiny gemma2, model seed 104, prompt seed 731: split-half cosines down to
0.76), cancels exactly. Should a draw still fall below the split-half floor
(:data:`MIN_SPLIT_HALF` at every checked site), the construction doubles the
number of balanced half-samples, which shrinks the remaining noise like
``1/sqrt(n)``, up to :data:`MAX_PROMPTS`; no draw is filtered out.

Sites: every block input ``l ≥ 1`` at every post-instruction position. The
input of block 0 at those positions is the embedding of the same template
tokens for every prompt, so its difference in means is exactly zero there.

This is a property of the project's own model-level compression, so it runs
against the reference only (it does not take the ``impl`` of the oracle suite).
"""

from __future__ import annotations

import copy
import random

import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from refusal_core.activations import mean_activations
from refusal_core.compression import METHODS, compress_
from refusal_core.directions import site_cosines
from refusal_core.model import encode_prompts, get_layout
from refusal_core.testing.tiny import AWQ_FAMILIES, TINY_FAMILIES, tiny_model, tiny_tokenizer

#: Required agreement between the original and the quantized model's direction at each site.
MIN_COSINE = 0.99
#: Precondition: agreement of two half-sample directions (the sampling noise floor) at each site.
MIN_SPLIT_HALF = 0.8
#: Prompts per class (first try), words per prompt, planted-feature gain (× the mean embedding row norm).
N_PROMPTS, WORDS_PER_PROMPT, PLANT_GAIN = 32, 4, 3.0
#: The construction's largest prompt count per class.
MAX_PROMPTS = 128

# Written for this test; disjoint by construction.
HARMFUL_WORDS = (
    "bomb", "poison", "steal", "hack", "weapon", "kill", "attack", "drugs",
    "fraud", "malware", "explosive", "illegal", "threaten", "scam", "forge", "harass",
)  # fmt: skip
HARMLESS_WORDS = (
    "story", "poem", "bread", "garden", "guitar", "breakfast", "book", "bicycle",
    "tomatoes", "party", "coffee", "sea", "library", "workout", "weather", "friends",
)  # fmt: skip

# A few examples per profile: each builds and quantizes a tiny model (~0.3 s).
_EXAMPLES = min(50, max(5, settings().max_examples // 10))


def _word_tokens(tokenizer: object, words: tuple[str, ...]) -> set[int]:
    ids: set[int] = set()
    for w in words:
        for text in (w, " " + w):
            ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    return ids


def _balanced_bags(words: tuple[str, ...], n: int, seed: int) -> list[str]:
    """``n`` prompts whose two halves each use every word exactly once per word position.

    Needs ``n / 2 == len(words) · k`` for a whole ``k``: each position of a half is ``k`` shuffled
    copies of the word list (so which words meet in a prompt is random, how often and where each
    occurs is not).
    """
    half, k = n // 2, n // 2 // len(words)
    assert k * len(words) * 2 == n, f"_balanced_bags: n = {n} is not a multiple of 2 × {len(words)} words"
    rng = random.Random(seed)
    prompts: list[str] = []
    for _ in range(2):
        columns = []
        for _position in range(WORDS_PER_PROMPT):
            column = list(words) * k
            rng.shuffle(column)
            columns.append(column)
        prompts += [" ".join(col[j] for col in columns) + "." for j in range(half)]
    return prompts


def _membership(n: int) -> torch.Tensor:
    """Groups: 0 harmful, 1 harmless, 2/3 harmful halves A/B, 4/5 harmless halves A/B."""
    member = torch.zeros(2 * n, 6, dtype=torch.bool)
    half = n // 2
    member[:n, 0] = True
    member[n:, 1] = True
    member[:half, 2] = True
    member[half:n, 3] = True
    member[n : n + half, 4] = True
    member[n + half :, 5] = True
    return member


@settings(max_examples=_EXAMPLES)
@given(
    family=st.sampled_from(TINY_FAMILIES),
    model_seed=st.integers(0, 2**16),
    prompt_seed=st.integers(0, 2**16),
    method=st.sampled_from(["llm-int8", "awq-w8"]),
)
# issue 20's draw: independently drawn bags gave split-half cosines 0.76-0.84 here
@example(family="gemma2", model_seed=104, prompt_seed=731, method="llm-int8")
def test_direction_survives_8bit_quantization(
    family: str, model_seed: int, prompt_seed: int, method: str
) -> None:
    assume(method != "awq-w8" or family in AWQ_FAMILIES)  # AWQ refuses fused-linear families
    tok = tiny_tokenizer()
    model = tiny_model(family, n_layers=3, seed=model_seed)
    marker = sorted(_word_tokens(tok, HARMFUL_WORDS) - _word_tokens(tok, HARMLESS_WORDS))
    emb = get_layout(model).embedding.weight
    g = torch.Generator().manual_seed(model_seed)
    u = torch.randn(emb.shape[1], generator=g, dtype=emb.dtype)
    with torch.no_grad():
        emb[marker] += PLANT_GAIN * emb.norm(dim=1).mean() * u / u.norm()

    label = f"{method} on tiny {family} (model seed {model_seed}, prompt seed {prompt_seed})"
    n = N_PROMPTS
    while True:  # the construction: more balanced half-samples until the classes clear the noise floor
        harmful = _balanced_bags(HARMFUL_WORDS, n, prompt_seed)
        harmless = _balanced_bags(HARMLESS_WORDS, n, prompt_seed + 1)
        member = _membership(n)
        means = mean_activations(model, tok, harmful + harmless, groups=member, n_groups=6)
        split = site_cosines(means[2] - means[4], means[3] - means[5])[1:]
        if bool((split >= MIN_SPLIT_HALF).all()) or n >= MAX_PROMPTS:
            break
        n *= 2
    # Reached only if the construction itself stopped working (it has a wide margin: every draw of a
    # 48-draw survey cleared the floor at n = 32 with minimum 0.957), so this names the construction.
    assert bool((split >= MIN_SPLIT_HALF).all()), (
        f"construction: balanced bags of {n} prompts per class still give split-half cosines "
        f"{split.tolist()} below {MIN_SPLIT_HALF} for {label}"
    )
    r = (means[0] - means[1])[1:]  # [L-1, P, d]: sites l >= 1

    quantized = copy.deepcopy(model)
    calibration = encode_prompts(tok, harmful[:4] + harmless[:4])
    compress_(quantized, METHODS[method], calibration)
    means_q = mean_activations(quantized, tok, harmful + harmless, groups=member[:, :2], n_groups=2)
    r_q = (means_q[0] - means_q[1])[1:]
    cos = site_cosines(r, r_q)
    assert bool((cos > MIN_COSINE).all()), (
        f"direction after {label}: cosine with the original per site (layers 1.., positions -P..-1) "
        f"{cos.tolist()}, expected > {MIN_COSINE}; split-half floor {split.tolist()}, "
        f"‖r‖ per site {r.norm(dim=-1).tolist()}"
    )
