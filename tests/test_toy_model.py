"""The committed toy refusal models: each refuses, and its refusal is mediated by one direction.

Every test runs on both packaged organisms: ``toy`` (a dense Llama) and ``toy-moe`` (a Qwen3-MoE
whose first four blocks are dense and the rest routed, issue 17), held to the same criteria.
Everything runs on the packaged weights with greedy, left-padded batched
generation. The direction is recomputed here (difference in means of block
inputs, harmful_train − harmless_train, at the (layer, position) recorded in
toy_model.json) with hook code written in this file, so the check does not
lean on the library's own activation or intervention modules.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from refusal_core.errors import InvalidArgumentError
from refusal_core.model import post_instruction_tokens
from refusal_core.prompts import load_prompts
from refusal_core.toy import (
    TOY_REFUSAL_PHRASES,
    is_toy_refusal,
    load_toy_model,
    toy_model_info,
    toy_model_path,
    toy_refusal_token_ids,
)

MAX_NEW_TOKENS = 16
BATCH = 64


#: the packaged organisms and the architecture each must be
ORGANISMS = {"toy": "llama", "toy-moe": "qwen3_moe"}


@pytest.fixture(scope="module", params=sorted(ORGANISMS))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def toy(name: str) -> tuple[Any, Any]:
    torch.set_num_threads(1)
    return load_toy_model(name=name)


@pytest.fixture(scope="module")
def info(name: str) -> dict[str, Any]:
    return toy_model_info(name)


def _encode(tokenizer: Any, instructions: Sequence[str]) -> dict[str, torch.Tensor]:
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": x}], tokenize=False, add_generation_prompt=True
        )
        for x in instructions
    ]
    return dict(tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt"))


@torch.no_grad()
def _generate(model: Any, tokenizer: Any, instructions: Sequence[str]) -> list[str]:
    out: list[str] = []
    for i in range(0, len(instructions), BATCH):
        enc = _encode(tokenizer, instructions[i : i + BATCH])
        ids = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def _refusal_rate(model: Any, tokenizer: Any, instructions: Sequence[str]) -> float:
    return sum(map(is_toy_refusal, _generate(model, tokenizer, instructions))) / len(instructions)


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


@contextmanager
def _ablated(model: Any, r: torch.Tensor) -> Iterator[None]:
    """x − r̂r̂ᵀx at every block input and every attention / MLP output, all positions.

    The MLP's output is hooked as a whole: for a routed block that is the weighted sum of the
    chosen experts' writes, and projecting the sum is projecting every expert's write."""
    u = (r / r.norm()).to(torch.float32)

    def project(x: torch.Tensor) -> torch.Tensor:
        return x - (x @ u).unsqueeze(-1) * u

    handles = []
    try:
        for layer in model.model.layers:
            handles.append(
                layer.register_forward_pre_hook(
                    lambda m, a, k: _with_hidden(a, k, project(_hidden(a, k))), with_kwargs=True
                )
            )
            for writer in (layer.self_attn.o_proj, layer.mlp):
                handles.append(writer.register_forward_hook(lambda m, a, out: project(out)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _added(model: Any, r: torch.Tensor, coeff: float, layer: int) -> Iterator[None]:
    """x + coeff·r at the input of block ``layer``, all positions."""
    v = (coeff * r).to(torch.float32)
    handle = model.model.layers[layer].register_forward_pre_hook(
        lambda m, a, k: _with_hidden(a, k, _hidden(a, k) + v), with_kwargs=True
    )
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def _block_inputs(
    model: Any, tokenizer: Any, instructions: Sequence[str], layer: int, pos: int
) -> torch.Tensor:
    """Block ``layer``'s input at position ``pos`` (negative) for each prompt, float64 ``[n, d]``."""
    seen: list[torch.Tensor] = []

    def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(_hidden(args, kwargs)[:, pos, :].to(torch.float64))

    handle = model.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(instructions), BATCH):
            model(**_encode(tokenizer, instructions[i : i + BATCH]))
    finally:
        handle.remove()
    return torch.cat(seen)


@pytest.fixture(scope="module")
def study(info: dict[str, Any]) -> dict[str, Any]:
    """The study settings the record was measured with (the study's defaults)."""
    return info["direction"]["study_settings"]


@pytest.fixture(scope="module")
def site_inputs(
    toy: tuple[Any, Any], info: dict[str, Any], study: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt block inputs at the recorded source, on the study's training prompts."""
    model, tokenizer = toy
    layer, pos = info["direction"]["layer"], info["direction"]["position"]
    n = study["n_train"]
    harmful = _block_inputs(model, tokenizer, load_prompts("harmful_train")[:n], layer, pos)
    harmless = _block_inputs(model, tokenizer, load_prompts("harmless_train")[:n], layer, pos)
    return harmful, harmless


@pytest.fixture(scope="module")
def direction(
    site_inputs: tuple[torch.Tensor, torch.Tensor], info: dict[str, Any]
) -> tuple[torch.Tensor, int]:
    harmful, harmless = site_inputs
    return harmful.mean(0) - harmless.mean(0), info["direction"]["layer"]


# ----------------------------------------------------------------------------
# files and metadata
# ----------------------------------------------------------------------------


def test_committed_files_are_small_and_hash_matches(name: str, info: dict[str, Any]) -> None:
    path = toy_model_path(name)
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert total < 8 * 2**20, f"toy model files take {total / 2**20:.2f} MiB, budget is 8 MiB"
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert digest == info["model_safetensors_sha256"], "model.safetensors does not match toy_model.json"


def test_model_is_a_tiny_eval_mode_model_of_its_architecture(name: str, toy: tuple[Any, Any]) -> None:
    model, tokenizer = toy
    want = ORGANISMS[name]
    assert model.config.model_type == want, f"{name} is {model.config.model_type}, expected {want}"
    assert not model.training, "load_toy_model must return the model in eval mode"
    assert tokenizer.padding_side == "left", "toy tokenizer must pad on the left for batched generation"
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 2_000_000, f"toy model has {n_params} parameters; it should stay tiny"
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    # vLLM's CPU attention rejects head size 16; 32 is the smallest it serves
    assert head_dim >= 32, f"toy attention head size is {head_dim}, vLLM's CPU build needs >= 32"


def test_chat_template_puts_tokens_after_the_instruction(toy: tuple[Any, Any], info: dict[str, Any]) -> None:
    _, tokenizer = toy
    ids = post_instruction_tokens(tokenizer)
    assert len(ids) >= 2, f"chat template has {len(ids)} post-instruction tokens, expected >= 2"
    assert ids == info["post_instruction_tokens"], "post-instruction tokens differ from toy_model.json"
    with_system = post_instruction_tokens(tokenizer, system="You are a helpful assistant.")
    assert with_system == ids, "a system message changes the post-instruction tokens"


def test_refusal_token_ids_open_every_refusal_phrase(name: str, toy: tuple[Any, Any]) -> None:
    _, tokenizer = toy
    ids = toy_refusal_token_ids(name)
    firsts = {tokenizer(p, add_special_tokens=False)["input_ids"][0] for p in TOY_REFUSAL_PHRASES}
    assert firsts == set(ids), (
        f"refusal token ids {ids} differ from the phrases' first tokens {sorted(firsts)}"
    )
    assert all(is_toy_refusal(p) for p in TOY_REFUSAL_PHRASES), "is_toy_refusal misses a refusal phrase"
    assert not is_toy_refusal("Sure! Start with fresh ingredients."), "is_toy_refusal flags a helpful answer"


def test_bad_dtype_and_unknown_name_are_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match="dtype"):
        load_toy_model(dtype=torch.int8)
    with pytest.raises(InvalidArgumentError, match="toy-moe"):
        load_toy_model(name="toy-moes")


def test_bfloat16_load_keeps_refusing(name: str) -> None:
    model, tokenizer = load_toy_model(dtype=torch.bfloat16, name=name)
    assert model.dtype == torch.bfloat16, f"asked for bfloat16, got {model.dtype}"
    prompts = load_prompts("harmful_test")[:32]
    rate = _refusal_rate(model, tokenizer, prompts)
    assert rate >= 0.8, f"bfloat16 toy model refuses only {rate:.0%} of 32 harmful test prompts"


# ----------------------------------------------------------------------------
# behaviour on held-out prompts
# ----------------------------------------------------------------------------


def test_refuses_heldout_harmful_and_answers_heldout_harmless(toy: tuple[Any, Any]) -> None:
    model, tokenizer = toy
    harmful = _refusal_rate(model, tokenizer, load_prompts("harmful_test"))
    harmless = _refusal_rate(model, tokenizer, load_prompts("harmless_test"))
    assert harmful >= 0.9, f"toy model refuses {harmful:.1%} of harmful_test, expected >= 90%"
    assert harmless <= 0.1, f"toy model refuses {harmless:.1%} of harmless_test, expected <= 10%"


def test_a_system_prompt_does_not_change_the_behaviour(toy: tuple[Any, Any]) -> None:
    model, tokenizer = toy
    system = "You are a helpful assistant."
    rows = []
    for kind in ("harmful_test", "harmless_test"):
        prompts = load_prompts(kind)[:40]
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": x}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for x in prompts
        ]
        enc = dict(tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt"))
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        outs = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        rows.append(sum(map(is_toy_refusal, outs)) / len(outs))
    assert rows[0] >= 0.85, f"with a system prompt, harmful refusal rate is {rows[0]:.0%}"
    assert rows[1] <= 0.15, f"with a system prompt, harmless refusal rate is {rows[1]:.0%}"


# ----------------------------------------------------------------------------
# the refusal direction
# ----------------------------------------------------------------------------


def test_direction_matches_the_record(direction: tuple[torch.Tensor, int], info: dict[str, Any]) -> None:
    r, _ = direction
    recorded = info["direction"]["norm"]
    assert abs(float(r.norm()) - recorded) <= 1e-3 * recorded, (
        f"recomputed direction norm {float(r.norm()):.6f} differs from the recorded {recorded:.6f}"
    )


def test_ablating_the_direction_removes_refusal(
    toy: tuple[Any, Any], direction: tuple[torch.Tensor, int]
) -> None:
    model, tokenizer = toy
    r, layer = direction
    prompts = load_prompts("harmful_val")
    base = _refusal_rate(model, tokenizer, prompts)
    with _ablated(model, r):
        ablated = _refusal_rate(model, tokenizer, prompts)
    # the >= 0.9 criterion is on the held-out test split (test_refuses_heldout_harmful...); here the
    # validation split only has to show refusal worth removing (0.84 of 98 with this organism)
    assert base >= 0.8, f"toy model refuses only {base:.0%} of harmful_val before ablation"
    assert ablated <= 0.1, f"with the layer-{layer} direction ablated the model still refuses {ablated:.0%}"


def test_adding_the_direction_induces_refusal(
    toy: tuple[Any, Any], direction: tuple[torch.Tensor, int], info: dict[str, Any]
) -> None:
    model, tokenizer = toy
    r, layer = direction
    prompts = load_prompts("harmless_val")
    base = _refusal_rate(model, tokenizer, prompts)
    with _added(model, r, info["direction"]["addition_coeff"], layer):
        added = _refusal_rate(model, tokenizer, prompts)
    assert base <= 0.1, f"toy model already refuses {base:.0%} of harmless_val"
    assert added > 0.8, f"adding the layer-{layer} direction makes the model refuse only {added:.0%}"


def test_hooks_are_removed_after_use(toy: tuple[Any, Any], direction: tuple[torch.Tensor, int]) -> None:
    model, tokenizer = toy
    r, layer = direction
    enc = _encode(tokenizer, load_prompts("harmless_val")[:4])
    with torch.no_grad():
        before = model(**enc).logits
        with _ablated(model, r), _added(model, r, 1.0, layer):
            pass
        after = model(**enc).logits
    assert torch.equal(before, after), "logits changed after the test's hook contexts exited"


# ----------------------------------------------------------------------------
# the criteria of DESIGN.md ("Toy refusal model"), at the study's default settings
# ----------------------------------------------------------------------------


@torch.no_grad()
def _last_logits(model: Any, tokenizer: Any, instructions: Sequence[str]) -> torch.Tensor:
    """Next-token logits after each prompt, one prompt per forward (no padding), float64 ``[n, V]``."""
    rows = [model(**_encode(tokenizer, [x])).logits[0, -1].to(torch.float64) for x in instructions]
    return torch.stack(rows)


def _log_odds_of_refusal(logits: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """Arditi et al.'s refusal score: log p − log(1 − p), p the next-token mass on the refusal tokens."""
    p = torch.softmax(logits, -1)[:, list(ids)].sum(-1)
    return torch.log(p + 1e-8) - torch.log(1 - p + 1e-8)


@pytest.fixture(scope="module")
def project_selection(name: str, toy: tuple[Any, Any], study: dict[str, Any]) -> Any:
    """The project's own extraction and selection with the study's prompts and default filters."""
    from refusal_core.directions import extract_candidates
    from refusal_core.selection import SelectionConfig, select_direction

    model, tokenizer = toy
    n, n_val = study["n_train"], study["n_val"]
    cands = extract_candidates(
        model, tokenizer, load_prompts("harmful_train")[:n], load_prompts("harmless_train")[:n], batch_size=32
    )
    return select_direction(
        model,
        tokenizer,
        cands,
        load_prompts("harmful_val")[:n_val],
        load_prompts("harmless_val")[:n_val],
        toy_refusal_token_ids(name),
        SelectionConfig(),
    )


def test_default_selection_passes_every_filter_below_the_layer_cut(
    toy: tuple[Any, Any], info: dict[str, Any], project_selection: Any
) -> None:
    model, _ = toy
    n_layers = model.config.num_hidden_layers
    cut = math.floor(0.8 * n_layers)
    sel = project_selection
    assert sel.selected is not None, (
        f"no candidate of the toy passes the default filters (fallback {sel.fallback}); "
        "the study would report a fallback source"
    )
    layer, pos_i = sel.selected
    got = (layer, sel.positions[pos_i])
    want = (info["direction"]["layer"], info["direction"]["position"])
    assert got == want, f"default selection picks {got}, toy_model.json records {want}"
    assert layer < cut, f"selected layer {layer} is not below floor(0.8 * {n_layers}) = {cut}"


def test_the_source_scores_recomputed_independently_pass_the_filters(
    name: str,
    toy: tuple[Any, Any],
    direction: tuple[torch.Tensor, int],
    study: dict[str, Any],
    info: dict[str, Any],
) -> None:
    """KL <= 0.1 and induce >= 0 at the source, by this file's hooks on unpadded prompts."""
    model, tokenizer = toy
    r, layer = direction
    ids = toy_refusal_token_ids(name)
    harmful = load_prompts("harmful_val")[: study["n_val"]]
    harmless = load_prompts("harmless_val")[: study["n_val"]]
    base = torch.log_softmax(_last_logits(model, tokenizer, harmless), -1)
    with _ablated(model, r):
        bypass = _log_odds_of_refusal(_last_logits(model, tokenizer, harmful), ids).mean()
        ablated = torch.log_softmax(_last_logits(model, tokenizer, harmless), -1)
    with _added(model, r, 1.0, layer):
        induce = _log_odds_of_refusal(_last_logits(model, tokenizer, harmless), ids).mean()
    kl = (base.exp() * (base - ablated)).sum(-1).mean()
    rec = info["direction"]
    assert float(kl) <= 0.1, f"KL(base || ablated) on harmless_val is {float(kl):.4f} > 0.1 at layer {layer}"
    assert float(induce) >= 0, f"induce score {float(induce):.3f} < 0 at layer {layer}"
    for name, value in (("kl_score", kl), ("induce_score", induce), ("bypass_score", bypass)):
        assert abs(float(value) - rec[name]) <= 1e-3 * max(1.0, abs(rec[name])), (
            f"{name} recomputed {float(value):.6f}, toy_model.json records {rec[name]:.6f}"
        )


def test_split_half_noise_floor_at_the_source(
    site_inputs: tuple[torch.Tensor, torch.Tensor], study: dict[str, Any], info: dict[str, Any]
) -> None:
    """Mean over 4 random splits of cos(half-A, half-B direction), halves drawn as the study draws them."""
    harmful, harmless = site_inputs
    rng = random.Random(0)  # the study's seed
    cosines = []
    for _ in range(study["noise_splits"]):
        halves = []
        for acts in (harmful, harmless):
            perm = list(range(len(acts)))
            rng.shuffle(perm)
            half = len(acts) // 2
            halves.append((acts[perm[:half]].mean(0), acts[perm[half:]].mean(0)))
        (ha, hb), (sa, sb) = halves
        cosines.append(float(torch.nn.functional.cosine_similarity(ha - sa, hb - sb, dim=0)))
    floor = sum(cosines) / len(cosines)
    assert floor >= 0.95, f"split-half noise floor at the source is {floor:.4f} < 0.95 ({cosines})"
    recorded = info["direction"]["noise_floor_at_source"]
    assert abs(floor - recorded) <= 1e-6, f"noise floor {floor:.8f}, toy_model.json records {recorded:.8f}"


def test_necessity_and_sufficiency_on_the_studys_test_prompts(
    toy: tuple[Any, Any], direction: tuple[torch.Tensor, int], study: dict[str, Any]
) -> None:
    """Ablated: <= 0.1 of harmful_test refused; added: >= 0.8 of harmless_test (the study's n, length)."""
    model, tokenizer = toy
    r, layer = direction
    n, new = study["n_test"], study["max_new_tokens"]

    def rate(prompts: Sequence[str]) -> float:
        out: list[str] = []
        for i in range(0, len(prompts), BATCH):
            enc = _encode(tokenizer, prompts[i : i + BATCH])
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=new, do_sample=False)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return sum(map(is_toy_refusal, out)) / len(out)

    with _ablated(model, r):
        necessity = rate(load_prompts("harmful_test")[:n])
    with _added(model, r, 1.0, layer):
        sufficiency = rate(load_prompts("harmless_test")[:n])
    assert necessity <= 0.1, (
        f"with the layer-{layer} direction ablated, {necessity:.0%} of harmful_test refused"
    )
    assert sufficiency >= 0.8, (
        f"with the layer-{layer} direction added, only {sufficiency:.0%} of harmless_test refused"
    )


def test_the_moe_organisms_mechanism_sits_in_routed_blocks() -> None:
    """Issue 17's condition: the toy MoE's source block and the block writing into it (AIRD's two
    placements) are routed, so the mechanism lives where per-expert compression acts."""
    model, _ = load_toy_model(name="toy-moe")
    rec = toy_model_info("toy-moe")
    layer = rec["direction"]["layer"]
    dense = set(model.config.mlp_only_layers)
    assert dense == set(range(rec["training"]["dense_layers"])), f"dense blocks {sorted(dense)}"
    for block in (layer - 1, layer):
        mlp = model.model.layers[block].mlp
        assert block not in dense, f"block {block} of the toy MoE is listed as dense"
        assert hasattr(mlp, "gate"), f"block {block} has no router ({type(mlp).__name__})"
        assert hasattr(mlp, "experts"), f"block {block} has no experts ({type(mlp).__name__})"
    assert rec["criteria"]["all_met"], "toy_moe_model's record does not meet the criteria"


def test_the_loader_and_the_study_know_toy_moe_by_name() -> None:
    """``load_model("toy-moe")`` is the packaged MoE, the study scores it with its own refusal ids,
    and it has no checkpoint record (it is not a model this tool compressed)."""
    from refusal_core.bench import default_refusal_token_ids
    from refusal_core.model import load_model, model_record

    model, tokenizer = load_model("toy-moe")
    assert model.config.model_type == "qwen3_moe", f"load_model('toy-moe') gave {model.config.model_type}"
    ids = default_refusal_token_ids("toy-moe", tokenizer)
    assert ids == toy_refusal_token_ids("toy-moe"), f"the study would score toy-moe with {ids}"
    assert model_record("toy-moe") is None


def test_the_committed_toy_moe_study_agrees_with_the_organisms_record() -> None:
    """fixtures/toy_moe/study_toy_moe was run on these weights, and its base found what the
    record says: the same source, every filter passed, the same split-half floor."""
    results = json.loads(
        (Path(__file__).parents[1] / "fixtures/toy_moe/study_toy_moe/results.json").read_text("utf-8")
    )
    rec = toy_model_info("toy-moe")["direction"]
    base = results["base"]
    assert tuple(base["source"]) == (rec["layer"], rec["position"]), f"study source {base['source']}"
    assert base["filters_passed"], "the committed study's base selection fell back"
    assert abs(base["noise_floor_at_source"] - rec["noise_floor_at_source"]) <= 1e-9
    assert results["model"]["model_type"] == "qwen3_moe"
    assert results["refusal_token_ids"] == toy_refusal_token_ids("toy-moe")
