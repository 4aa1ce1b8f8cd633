"""Model-level properties (DESIGN.md, "Property catalogue", model level) on tiny random models.

These run the project's model-walking code (hooks, weight edits, AIRD) on tiny
models of every supported family; they do not take an ``impl`` (the oracle
protocol covers the functional core only). Models are float64 (with a float64
attention softmax, see ``tiny.FLOAT64_ATTENTION``) where a property compares
two computations, so the bounds can be tight; the no-trace property uses the
default float32 models since it demands bit-identity.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from refusal_core.activations import mean_activations
from refusal_core.aird import AirdConfig, apply_aird_
from refusal_core.functional import add_direction, aird_update, magnitude_mask
from refusal_core.interventions import ablation_hooks, addition_hooks, orthogonalize_model_
from refusal_core.model import batch_inputs, encode_prompts, get_layout
from refusal_core.testing import strategies as rs
from refusal_core.testing.tiny import (
    ORTHOGONALIZABLE_FAMILIES,
    TINY_FAMILIES,
    tiny_model,
    tiny_prompts,
    tiny_tokenizer,
)

from ._checks import check

#: Model-level examples cost forward passes: a third of the profile's count, at least 10.
N_EXAMPLES = max(10, settings.default.max_examples // 3)
D = 32
TOK = tiny_tokenizer()
PROMPTS = [*tiny_prompts(2, "harmful", seed=9), *tiny_prompts(1, "harmless", seed=9), "Hi"]
BATCH = batch_inputs(encode_prompts(TOK, PROMPTS), TOK.pad_token_id)
N_ROWS = len(PROMPTS)


@functools.lru_cache(maxsize=32)
def _cached_model(family: str, seed: int, dtype: torch.dtype) -> nn.Module:
    return tiny_model(family, n_kv_heads=2, seed=seed, dtype=dtype)


def fresh_model(
    data: st.DataObject, dtype: torch.dtype = torch.float64, families: tuple[str, ...] = TINY_FAMILIES
) -> tuple[str, nn.Module]:
    """A drawn family and seed; a private copy, so in-place edits never leak between examples."""
    family = data.draw(st.sampled_from(families), label="family")
    seed = data.draw(st.integers(0, 2), label="model seed")
    return family, copy.deepcopy(_cached_model(family, seed, dtype))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**BATCH).logits


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def block_inputs(model: nn.Module) -> list[torch.Tensor]:
    """Every block's input over the whole batch, recorded after any hooks already registered."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in get_layout(model).blocks]
    try:
        logits(model)
    finally:
        for h in handles:
            h.remove()
    return seen


@settings(max_examples=N_EXAMPLES)
@given(data=st.data())
def test_weight_orthogonalization_equals_ablation_hooks(data: st.DataObject) -> None:
    family, model = fresh_model(data, families=ORTHOGONALIZABLE_FAMILIES)
    r = data.draw(rs.directions(D, torch.float64), label="r")
    inputs = {"family": family, "r": r}
    with ablation_hooks(model, r):
        hooked = logits(model)
    orthogonalize_model_(model, r)
    err = rel_err(logits(model), hooked)
    check(
        err < 1e-9,
        "orthogonalize_model_ vs ablation_hooks",
        inputs,
        f"logits differ by relative {err:.3g} (float64 model)",
    )


@settings(max_examples=N_EXAMPLES)
@given(data=st.data())
def test_hooks_leave_no_trace(data: st.DataObject) -> None:
    family, model = fresh_model(data, torch.float32)
    kind = data.draw(st.sampled_from(["ablation", "addition"]), label="hook kind")
    per_row = data.draw(st.booleans(), label="per-row directions")
    shape_r = st.lists(rs.directions(D, torch.float32), min_size=N_ROWS, max_size=N_ROWS).map(torch.stack)
    r = data.draw(shape_r if per_row else rs.directions(D, torch.float32), label="r")
    coeff = data.draw(rs.signed_scalars(1e-2, 10.0), label="coeff")
    layer = data.draw(st.integers(0, 1), label="layer")
    exit_by = data.draw(st.sampled_from(["with", "exception", "remove"]), label="how the hooks end")
    inputs = {"family": family, "kind": kind, "r": r, "coeff": coeff, "layer": layer, "exit_by": exit_by}
    before = logits(model)

    def install() -> Any:
        return ablation_hooks(model, r) if kind == "ablation" else addition_hooks(model, r, coeff, layer)

    if exit_by == "remove":
        handle = install()
        logits(model)
        handle.remove()
        handle.remove()
    else:
        try:
            with install():
                logits(model)
                if exit_by == "exception":
                    raise KeyError("raised inside the hook context")
        except KeyError:
            pass
    check(hook_count(model) == 0, f"{kind}_hooks", inputs, f"{hook_count(model)} hooks remain after exit")
    after = logits(model)
    check(torch.equal(after, before), f"{kind}_hooks", inputs, "logits after exit are not bit-identical")


@settings(max_examples=N_EXAMPLES)
@given(data=st.data())
def test_ablation_hooks_leave_no_component_along_r_at_any_block_input(data: st.DataObject) -> None:
    family, model = fresh_model(data)
    r = data.draw(rs.directions(D, torch.float64), label="r")
    u = r / r.norm()
    inputs = {"family": family, "r": r}
    with ablation_hooks(model, r):
        seen = block_inputs(model)
        means = mean_activations(model, TOK, PROMPTS, batch_size=2)  # [L, P, d]
    for layer, x in enumerate(seen):
        along = float((x @ u).abs().max())
        scale = float(x.norm(dim=-1).max())
        check(
            along <= 1e-13 * scale,
            "ablation_hooks",
            inputs,
            f"block {layer} input keeps |x·r̂| = {along:.3g} (max ‖x‖ = {scale:.3g})",
        )
    along = float((means @ u).abs().max())
    check(
        along <= 1e-13 * float(means.norm(dim=-1).max()),
        "ablation_hooks + mean_activations",
        inputs,
        f"captured means keep |m·r̂| = {along:.3g}",
    )


@settings(max_examples=N_EXAMPLES)
@given(data=st.data())
def test_addition_hooks_shift_block_input_by_exactly_coeff_r(data: st.DataObject) -> None:
    family, model = fresh_model(data)
    r = data.draw(rs.directions(D, torch.float64), label="r")
    coeff = data.draw(rs.signed_scalars(1e-2, 1e2), label="coeff")
    layer = data.draw(st.integers(0, 1), label="layer")
    inputs = {"family": family, "r": r, "coeff": coeff, "layer": layer}
    clean = block_inputs(model)
    with addition_hooks(model, r, coeff, layer):
        shifted = block_inputs(model)
    check(
        torch.equal(shifted[layer], add_direction(clean[layer], r, coeff)),
        "addition_hooks",
        inputs,
        "block input is not exactly functional.add_direction(x, r, coeff)",
    )
    delta = shifted[layer] - clean[layer]
    err = float((delta - coeff * r).norm(dim=-1).max())
    bound = 1e-12 * (float(clean[layer].norm(dim=-1).max()) + abs(coeff) * float(r.norm()))
    check(err <= bound, "addition_hooks", inputs, f"shift differs from coeff·r by {err:.3g} > {bound:.3g}")
    for earlier in range(layer):
        check(
            torch.equal(shifted[earlier], clean[earlier]),
            "addition_hooks",
            inputs,
            f"block {earlier} (before the hooked layer) changed",
        )


@settings(max_examples=N_EXAMPLES)
@given(data=st.data())
def test_aird_on_a_model_is_the_functional_update(data: st.DataObject) -> None:
    family, model = fresh_model(data)
    layout = get_layout(model)
    r = data.draw(rs.directions(D, torch.float64, min_norm=0.1, bound=2.0), label="r")
    layer = data.draw(st.integers(0, 1), label="layer")
    config = AirdConfig(
        alpha_attn=data.draw(rs.signed_scalars(1e-3, 1.0), label="alpha_attn"),
        alpha_mlp=data.draw(rs.signed_scalars(1e-3, 1.0), label="alpha_mlp"),
        normalize=data.draw(st.booleans(), label="normalize"),
        preserve_sparsity=data.draw(st.booleans(), label="preserve_sparsity"),
    )
    modules = {"o_proj": layout.attn_out(layer), "down_proj": layout.mlp_out(layer)}
    if config.preserve_sparsity:
        sparsity = data.draw(st.sampled_from([0.25, 0.5, 0.75]), label="sparsity")
        with torch.no_grad():
            for m in modules.values():
                m.weight.mul_(magnitude_mask(m.weight, sparsity))
    inputs = {"family": family, "r": r, "layer": layer, "config": config}
    # The inputs each module saw, so its output can be compared on the same input afterwards.
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, args[0].detach().clone())
        )
        for name, m in modules.items()
    ]
    try:
        logits(model)
    finally:
        for h in handles:
            h.remove()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    w_before = {name: m.weight.detach().clone() for name, m in modules.items()}
    with torch.no_grad():
        out_before = {name: m(seen[name]) for name, m in modules.items()}
    apply_aird_(model, r, layer, config)
    u = r / r.norm()
    for name, m in modules.items():
        alpha = config.alpha_attn if name == "o_proj" else config.alpha_mlp
        ref = aird_update(
            w_before[name], r, alpha, normalize=config.normalize, preserve_sparsity=config.preserve_sparsity
        )
        check(torch.equal(m.weight, ref), "apply_aird_", inputs, f"{name} weight != functional.aird_update")
        if config.preserve_sparsity:
            check(
                torch.equal(m.weight == 0, w_before[name] == 0),
                "apply_aird_ (preserve_sparsity)",
                inputs,
                f"{name} zero pattern changed",
            )
            continue
        with torch.no_grad():
            out_after = m(seen[name])
        ortho_before = out_before[name] - (out_before[name] @ u).unsqueeze(-1) * u
        ortho_after = out_after - (out_after @ u).unsqueeze(-1) * u
        err = rel_err(ortho_after, ortho_before)
        check(
            err < 1e-12,
            "apply_aird_",
            inputs,
            f"{name} output changed orthogonally to r by relative {err:.3g}",
        )
    after = model.state_dict()
    edited = {f"model.layers.{layer}.self_attn.o_proj.weight", f"model.layers.{layer}.mlp.down_proj.weight"}
    changed = [k for k in before if k not in edited and not torch.equal(before[k], after[k])]
    check(not changed, "apply_aird_", inputs, f"other parameters changed: {changed}")
