"""Capability damage (refusal_core.evaluation.damage): next-token KL(base ‖ model) and completion CE.

The references are written here from their definitions, on one un-padded
prompt at a time: ``torch.nn.functional.kl_div`` for the KL, an explicit
``Σ p (log p − log q)`` for its reverse, and a per-token loop for the
cross-entropy. Float64 tiny models make them agree to 1e-10.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from refusal_core.aird import AirdConfig, apply_aird_
from refusal_core.errors import (
    ArtifactError,
    EmptyInputError,
    InvalidArgumentError,
    NonFiniteError,
    ShapeMismatchError,
)
from refusal_core.evaluation.damage import (
    DamageResult,
    capability_damage,
    completion_cross_entropy,
    kl_divergence,
    next_token_kl,
    next_token_logp,
)
from refusal_core.evaluation.generation import generate_ids
from refusal_core.model import encode_prompts, get_layout
from refusal_core.testing.tiny import tiny_model, tiny_prompts, tiny_tokenizer

TOK = tiny_tokenizer()
PROMPTS = tiny_prompts(5, "harmless", seed=3)


def prompt_ids() -> list[list[int]]:
    ids = encode_prompts(TOK, PROMPTS)
    assert len({len(p) for p in ids}) > 1, "fixture prompts must differ in length, or padding goes untested"
    return ids


def completions(n: int = 5) -> list[list[int]]:
    """Completions of different lengths (1..9 tokens) with ids drawn from the tiny vocabulary."""
    g = torch.Generator().manual_seed(11)
    lengths = [1, 3, 9, 2, 5, 4, 7][:n]
    return [torch.randint(10, 1000, (k,), generator=g).tolist() for k in lengths]


def models64() -> tuple[nn.Module, nn.Module]:
    return tiny_model("llama", dtype=torch.float64, seed=0), tiny_model("llama", dtype=torch.float64, seed=1)


@torch.no_grad()
def logp_alone(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """log-softmax of every position of one un-padded sequence: ``[T, V]`` float64."""
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].to(torch.float64), dim=-1)


def test_kl_of_a_model_against_itself_is_exactly_zero() -> None:
    base = tiny_model("qwen2")
    kl_same = next_token_kl(base, base, TOK, PROMPTS, batch_size=2)
    kl_copy = next_token_kl(base, copy.deepcopy(base), TOK, PROMPTS, batch_size=2)
    assert kl_same.dtype == torch.float64, f"next_token_kl dtype {kl_same.dtype}"
    assert kl_same.shape == (len(PROMPTS),), f"next_token_kl shape {tuple(kl_same.shape)}"
    assert torch.equal(kl_same, torch.zeros(len(PROMPTS), dtype=torch.float64)), f"KL(base‖base) = {kl_same}"
    assert torch.equal(kl_copy, torch.zeros(len(PROMPTS), dtype=torch.float64)), f"KL(base‖copy) = {kl_copy}"


def test_kl_matches_kl_div_on_unpadded_single_prompts() -> None:
    base, model = models64()
    ids = prompt_ids()
    got = next_token_kl(base, model, TOK, ids, batch_size=3)
    for i, p in enumerate(ids):
        log_p, log_q = logp_alone(base, p)[-1], logp_alone(model, p)[-1]
        ref = float(F.kl_div(log_q, log_p, log_target=True, reduction="sum"))  # Σ p (log p − log q)
        assert ref > 1e-3, f"fixture: base and model agree on prompt {i} (KL {ref})"
        assert math.isclose(float(got[i]), ref, rel_tol=1e-10), (
            f"next_token_kl(prompt {i}, batch_size=3) = {float(got[i])}, kl_div on the unpadded prompt {ref}"
        )


def test_kl_is_base_against_model_not_the_reverse() -> None:
    base = tiny_model("mistral", dtype=torch.float64, seed=2)
    sharp = copy.deepcopy(base)
    with torch.no_grad():
        sharp.get_output_embeddings().weight.mul_(50.0)  # far sharper: the KL is clearly asymmetric
    ids = prompt_ids()
    got = next_token_kl(base, sharp, TOK, ids, batch_size=2)
    for i, p in enumerate(ids):
        log_p, log_q = logp_alone(base, p)[-1], logp_alone(sharp, p)[-1]
        forward = float((log_p.exp() * (log_p - log_q)).sum())
        reverse = float((log_q.exp() * (log_q - log_p)).sum())
        assert abs(forward - reverse) > 0.2 * forward, (
            f"fixture: KL symmetric on prompt {i} ({forward}, {reverse})"
        )
        assert math.isclose(float(got[i]), forward, rel_tol=1e-10), (
            f"next_token_kl(base, sharp) on prompt {i} = {float(got[i])}: KL(base‖sharp) = {forward}, "
            f"KL(sharp‖base) = {reverse}"
        )


def test_kl_from_separately_computed_log_probs_is_next_token_kl_bit_for_bit() -> None:
    """What the study does to compute the base's distributions once: no number may change."""
    base, model = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = prompt_ids()
    together = next_token_kl(base, model, TOK, ids, batch_size=2)
    logp_base = next_token_logp(base, TOK, ids, batch_size=2)
    apart = kl_divergence(logp_base, next_token_logp(model, TOK, ids, batch_size=2))
    assert torch.equal(together, apart), (
        f"next_token_kl {together.tolist()} vs next_token_logp's {apart.tolist()}"
    )
    for i, p in enumerate(ids):
        ref = logp_alone(base, p)[-1].to(torch.float64)
        gap = float((logp_base[i] - ref).abs().max())
        assert gap < 1e-5, f"next_token_logp(prompt {i}) differs from the un-padded forward by {gap}"


def test_cross_entropy_matches_a_per_token_loop_on_unpadded_sequences() -> None:
    _, model = models64()
    ids, comps = prompt_ids(), completions()
    got = completion_cross_entropy(model, TOK, ids, comps, batch_size=2)
    assert got.dtype == torch.float64, f"completion_cross_entropy dtype {got.dtype}"
    for i, (p, c) in enumerate(zip(ids, comps)):
        logp = logp_alone(model, p + c)
        nll = 0.0
        for j, token in enumerate(c):  # token j is predicted at position len(p) - 1 + j
            nll -= float(logp[len(p) - 1 + j, token])
        ref = nll / len(c)
        assert math.isclose(float(got[i]), ref, rel_tol=1e-10), (
            f"completion_cross_entropy(prompt {i}, {len(c)} completion tokens, batch_size=2) = "
            f"{float(got[i])}, per-token loop {ref}"
        )


def test_results_do_not_depend_on_batch_size_or_padding() -> None:
    base, model = tiny_model("gemma", seed=0), tiny_model("gemma", seed=4)  # float32, as in use
    ids, comps = prompt_ids(), completions()
    kl = {b: next_token_kl(base, model, TOK, ids, batch_size=b) for b in (1, 2, 5)}
    ce = {b: completion_cross_entropy(model, TOK, ids, comps, batch_size=b) for b in (1, 2, 5)}
    for b in (2, 5):
        dkl = float((kl[b] - kl[1]).abs().max())
        dce = float((ce[b] - ce[1]).abs().max())
        assert dkl <= 1e-6, f"next_token_kl batch_size={b} vs 1 differs by {dkl:.2e}"
        assert dce <= 1e-6, f"completion_cross_entropy batch_size={b} vs 1 differs by {dce:.2e}"


def test_string_prompts_are_chat_formatted_like_encode_prompts() -> None:
    base, model = models64()
    for system in (None, "Answer briefly."):
        ids = encode_prompts(TOK, PROMPTS, system=system)
        from_text = next_token_kl(base, model, TOK, PROMPTS, system=system)
        from_ids = next_token_kl(base, model, TOK, ids)
        assert torch.equal(from_text, from_ids), (
            f"next_token_kl on strings != on encoded ids (system={system!r})"
        )
        ce_text = completion_cross_entropy(model, TOK, PROMPTS, completions(), system=system)
        ce_ids = completion_cross_entropy(model, TOK, ids, completions())
        assert torch.equal(ce_text, ce_ids), f"CE on strings != on encoded ids (system={system!r})"


def test_capability_damage_agrees_with_the_two_measures_and_serializes(tmp_path: Path) -> None:
    base, model = models64()
    ids, comps = prompt_ids(), completions()
    res = capability_damage(base, model, TOK, ids, comps, batch_size=2)
    kl = next_token_kl(base, model, TOK, ids)
    ce = completion_cross_entropy(model, TOK, ids, comps)
    ce_base = completion_cross_entropy(base, TOK, ids, comps)
    assert res.n == len(ids), f"DamageResult.n = {res.n}"
    for name, got, ref in (
        ("kl_per_prompt", res.kl_per_prompt, kl),
        ("ce_per_prompt", res.ce_per_prompt, ce),
        ("ce_base_per_prompt", res.ce_base_per_prompt, ce_base),
    ):
        err = float((torch.tensor(got, dtype=torch.float64) - ref).abs().max())
        assert err < 1e-10, f"capability_damage {name} differs from the standalone measure by {err:.2e}"
    # means are over prompts (each prompt weighs the same), computed here by hand
    for name, mean, values in (
        ("kl_mean", res.kl_mean, res.kl_per_prompt),
        ("ce_mean", res.ce_mean, res.ce_per_prompt),
        ("ce_base_mean", res.ce_base_mean, res.ce_base_per_prompt),
    ):
        assert math.isclose(mean, sum(values) / len(values), rel_tol=1e-12), (
            f"{name} {mean} != mean of prompts"
        )
    assert math.isclose(res.ce_increase, res.ce_mean - res.ce_base_mean), f"ce_increase {res.ce_increase}"
    assert res.base_identity["name_or_path"] == "refusal_core/tiny-llama-seed0", (
        f"base identity {res.base_identity}"
    )
    assert res.identity["name_or_path"] == "refusal_core/tiny-llama-seed1", f"model identity {res.identity}"
    doc = res.to_dict()
    text = json.dumps(doc, allow_nan=False)
    assert DamageResult.from_dict(json.loads(text)) == res, "DamageResult changed in the JSON round trip"
    assert DamageResult.load(res.save(tmp_path / "damage.json")) == res, "DamageResult changed on disk"
    (tmp_path / "other.json").write_text('{"kind": "AirdRecord"}')
    with pytest.raises(ArtifactError, match="DamageResult"):
        DamageResult.load(tmp_path / "other.json")


def test_to_dict_writes_non_finite_values_as_none() -> None:
    res = DamageResult(math.inf, [math.inf, 0.5], math.nan, [math.nan, 1.0], 0.25, 2, [0.2, 0.3])
    doc = res.to_dict()
    json.dumps(doc, allow_nan=False)  # raises on NaN / inf
    assert (doc["kl_mean"], doc["kl_per_prompt"], doc["ce_mean"], doc["ce_increase"]) == (
        None,
        [None, 0.5],
        None,
        None,
    ), f"non-finite values not written as None: {doc}"
    back = DamageResult.from_dict(doc)
    assert math.isnan(back.kl_mean), "None must load back as NaN"
    assert back.ce_base_mean == 0.25, f"ce_base_mean {back.ce_base_mean}"


# ----------------------------------------------------------------------------
# on the committed toy model: damage that is really there is seen
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy() -> tuple[nn.Module, object, list[list[int]], list[list[int]], torch.Tensor]:
    from refusal_core.activations import mean_activations
    from refusal_core.prompts import load_prompts
    from refusal_core.toy import load_toy_model, toy_model_info

    model, tok = load_toy_model()
    layer = int(toy_model_info()["direction"]["layer"])
    means = [mean_activations(model, tok, load_prompts(f"{k}_train")[:16]) for k in ("harmful", "harmless")]
    r = (means[0] - means[1])[layer, -1].float()
    ids = encode_prompts(tok, load_prompts("harmless_val")[:8])
    comps = generate_ids(model, tok, ids, max_new_tokens=8, progress=False)
    return model, tok, ids, comps, r


def test_toy_model_damage_from_a_strong_aird_gain_and_a_zeroed_down_proj(
    toy: tuple[nn.Module, object, list[list[int]], list[list[int]], torch.Tensor],
) -> None:
    from refusal_core.toy import toy_model_info

    base, tok, ids, comps, r = toy
    layer = int(toy_model_info()["direction"]["layer"])
    untouched = capability_damage(base, copy.deepcopy(base), tok, ids, comps)
    assert untouched.kl_mean == 0.0, f"toy: KL against an untouched copy is {untouched.kl_mean}"
    assert untouched.ce_mean == untouched.ce_base_mean, "toy: CE of an untouched copy differs from the base"

    repaired = copy.deepcopy(base)
    apply_aird_(repaired, r, layer, AirdConfig(gain_attn=5.0, gain_mlp=5.0))
    aird = capability_damage(base, repaired, tok, ids, comps)
    # float32 rounding alone gives ~1e-10; a gain of 5 along the refusal direction moves the output
    assert aird.kl_mean > 1e-4, f"toy: AIRD with gain 5 at layer {layer} gives KL {aird.kl_mean}"
    assert min(aird.kl_per_prompt) > 0.0, f"toy: AIRD gain 5 leaves some prompt at KL 0: {aird.kl_per_prompt}"

    broken = copy.deepcopy(base)
    with torch.no_grad():
        get_layout(broken).mlp_out(1).weight.zero_()
    zeroed = capability_damage(base, broken, tok, ids, comps)
    assert zeroed.kl_mean > untouched.kl_mean, f"toy: zeroed down_proj[1] KL {zeroed.kl_mean} not above 0"
    assert zeroed.kl_mean > 1e-2, f"toy: zeroed down_proj[1] KL {zeroed.kl_mean} is implausibly small"
    assert zeroed.ce_increase > 0.0, f"toy: zeroing down_proj[1] did not raise the CE ({zeroed.ce_increase})"


# ----------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------


def _other_vocab() -> nn.Module:
    model = tiny_model("llama", seed=5)
    model.resize_token_embeddings(1100)
    return model


BASE = tiny_model("llama", seed=0)
MODEL = tiny_model("llama", seed=1)
IDS = encode_prompts(TOK, PROMPTS[:2])
COMPS = [[5, 6, 7], [8]]

BAD_CALLS = {
    "completions shorter than prompts": (
        lambda: completion_cross_entropy(MODEL, TOK, IDS, COMPS[:1]),
        ShapeMismatchError,
        "1 entries but there are 2 prompts",
    ),
    "no prompts": (lambda: next_token_kl(BASE, MODEL, TOK, []), EmptyInputError, "prompts is empty"),
    "an empty prompt": (
        lambda: next_token_kl(BASE, MODEL, TOK, [IDS[0], []]),
        EmptyInputError,
        r"prompts\[1\]",
    ),
    "an empty completion": (
        lambda: completion_cross_entropy(MODEL, TOK, IDS, [[5], []]),
        EmptyInputError,
        r"completions\[1\]",
    ),
    "vocabulary mismatch": (
        lambda: next_token_kl(BASE, _other_vocab(), TOK, IDS),
        ShapeMismatchError,
        "vocabulary",
    ),
    "vocabulary mismatch (capability_damage)": (
        lambda: capability_damage(_other_vocab(), MODEL, TOK, IDS, COMPS),
        ShapeMismatchError,
        "vocabulary",
    ),
    "prompt id outside the vocabulary": (
        lambda: next_token_kl(BASE, MODEL, TOK, [[1, 2, 5000]]),
        InvalidArgumentError,
        "outside the vocabulary",
    ),
    "negative completion id": (
        lambda: completion_cross_entropy(MODEL, TOK, IDS, [[5], [-1]]),
        InvalidArgumentError,
        "outside the vocabulary",
    ),
    "bool token id": (
        lambda: completion_cross_entropy(MODEL, TOK, IDS, [[True], [5]]),
        InvalidArgumentError,
        "int token id",
    ),
    "float token id": (
        lambda: next_token_kl(BASE, MODEL, TOK, [[1, 2.0]]),
        InvalidArgumentError,
        "int token id",
    ),
    "strings mixed with ids": (
        lambda: next_token_kl(BASE, MODEL, TOK, [PROMPTS[0], IDS[1]]),
        InvalidArgumentError,
        "mixes",
    ),
    "system with token ids": (
        lambda: next_token_kl(BASE, MODEL, TOK, IDS, system="Be brief."),
        InvalidArgumentError,
        "system",
    ),
    "a bare string as prompts": (
        lambda: next_token_kl(BASE, MODEL, TOK, "Tell me a story."),
        InvalidArgumentError,
        "sequence",
    ),
    "batch_size 0": (
        lambda: next_token_kl(BASE, MODEL, TOK, IDS, batch_size=0),
        InvalidArgumentError,
        "batch_size",
    ),
    "batch_size True": (
        lambda: completion_cross_entropy(MODEL, TOK, IDS, COMPS, batch_size=True),
        InvalidArgumentError,
        "batch_size",
    ),
    "not a model": (lambda: next_token_kl("gpt", MODEL, TOK, IDS), InvalidArgumentError, "base_model"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS), ids=list(BAD_CALLS))
def test_bad_input_raises_the_projects_errors(case: str) -> None:
    call, error, match = BAD_CALLS[case]
    with pytest.raises(error, match=match):
        call()


def test_non_finite_logits_raise_and_models_are_left_as_they_were() -> None:
    base, broken = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    with torch.no_grad():
        get_layout(broken).mlp_out(0).weight[0, 0] = float("nan")
    base.train()  # the measures must run in eval mode and put the flags back
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(NonFiniteError, match="model produced NaN"):
        next_token_kl(base, broken, TOK, IDS)
    with pytest.raises(NonFiniteError, match="NaN"):
        completion_cross_entropy(broken, TOK, IDS, COMPS)
    kl = next_token_kl(base, base, TOK, IDS)
    assert torch.equal(kl, torch.zeros(2, dtype=torch.float64)), f"KL(base‖base) in train mode {kl}"
    assert all(m.training for m in base.modules()), "the training flags of base_model were not restored"
    changed = [k for k, v in base.state_dict().items() if not torch.equal(before[k], v)]
    assert not changed, f"next_token_kl changed the base model: {changed}"
