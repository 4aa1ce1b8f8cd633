"""Model-level quantization: the exact LLM.int8 simulation and AWQ fake quantization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from refusal_core.compression import (
    AwqConfig,
    Int8LinearSim,
    apply_awq_scale_,
    awq_scale_groups,
    config_from_dict,
    config_to_dict,
    quantization,
    quantize_awq_,
    quantize_llm_int8_,
)
from refusal_core.compression.calibration import SequentialBlocks, prepare_calibration
from refusal_core.compression.quantization import (
    AwqScaleGroup,
    _awq_effective_weight,
    _awq_gram_bounds,
    _awq_linear_scales,
    _awq_module_scales,
    clip_search,
)
from refusal_core.errors import EmptyInputError, InvalidArgumentError, UnsupportedModuleError
from refusal_core.functional import (
    awq_apply_scales,
    awq_scales,
    int8_dequantize,
    int8_quantize,
    llm_int8_linear,
    pseudo_quantize,
)
from refusal_core.model import get_layout
from refusal_core.testing.tiny import tiny_model

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Relative logit tolerance of a function-preserving rewrite of a float64 model. Gemma's RMSNorm
#: computes in float32 whatever the model dtype, so its outputs carry float32 rounding.
FOLD_TOL = {"gemma": 1e-6}


def calibration_lists(n: int = 6, seed: int = 0, vocab: int = 600) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 14, (n,), generator=g).tolist()
    return [torch.randint(8, vocab, (k,), generator=g).tolist() for k in lengths]


def eval_ids(seed: int = 99) -> torch.Tensor:
    return torch.randint(8, 600, (3, 10), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.to(torch.float64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b.to(torch.float64)).norm() / b.to(torch.float64).norm())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], what: str) -> None:
    after = model.state_dict()
    assert set(after) == set(before), f"{what}: the set of parameters/buffers changed"
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"{what}: modified {changed[:5]} although the call raised"


def with_outlier_channels(
    model: nn.Module, channels: tuple[int, ...] = (3, 17), gain: float = 25.0
) -> nn.Module:
    """Make a few residual channels large at every linear's input, as in real LLMs (AWQ's premise)."""
    layout = get_layout(model)
    offset = layout.spec.norm_offset
    with torch.no_grad():
        for layer in range(layout.n_layers):
            for norm in (layout.input_norm(layer), layout.post_attention_norm(layer)):
                w = norm.weight
                w[list(channels)] = (w[list(channels)] + offset) * gain - offset
    return model


# ----------------------------------------------------------------------------
# Int8LinearSim
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_features", [48, 2100])
@pytest.mark.parametrize("threshold", [6.0, 2.5, float("inf")])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_sim_is_bit_identical_to_functional_core(
    dtype: torch.dtype, in_features: int, threshold: float, bias: bool
) -> None:
    g = torch.Generator().manual_seed(in_features)
    lin = nn.Linear(in_features, 24, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, in_features, generator=g, dtype=dtype))
        lin.weight[5] = 0.0  # an all-zero row has scale 0
    x = torch.randn(2, 5, in_features, generator=g, dtype=dtype)
    x[0, 1, 7] = 9.0  # an outlier feature (|x| >= 6)
    x[1, 3, 11] = -3.0
    sim = Int8LinearSim.from_linear(lin, threshold)
    expected = llm_int8_linear(x, lin.weight, threshold)
    if bias:
        expected = expected + lin.bias
    got = sim(x)
    assert got.dtype == x.dtype, f"Int8LinearSim output dtype {got.dtype}, input {x.dtype}"
    assert got.shape == (2, 5, 24), f"Int8LinearSim output shape {tuple(got.shape)}"
    assert torch.equal(got, expected), (
        f"Int8LinearSim(in={in_features}, {dtype}, τ={threshold}) differs from llm_int8_linear: "
        f"max |Δ| = {float((got - expected).abs().max()):.3g}"
    )


def test_int8_sim_handles_empty_batch_and_bfloat16_input() -> None:
    lin = nn.Linear(16, 8)
    sim = Int8LinearSim.from_linear(lin)
    empty = torch.zeros(0, 16)
    assert sim(empty).shape == (0, 8), "Int8LinearSim on zero tokens must give [0, out]"
    x = torch.randn(3, 16).to(torch.bfloat16)
    assert torch.equal(sim(x), llm_int8_linear(x, lin.weight) + lin.bias.to(torch.bfloat16)), (
        "Int8LinearSim on bfloat16 input differs from llm_int8_linear + bias"
    )


def test_int8_sim_dequantize_and_refusal_to_look_like_a_linear() -> None:
    lin = nn.Linear(12, 6)
    sim = Int8LinearSim.from_linear(lin)
    q, s = int8_quantize(lin.weight)
    assert torch.equal(sim.dequantize(), int8_dequantize(q, s)), (
        "dequantize() != int8_dequantize(int8_quantize(w))"
    )
    assert sim.q.dtype == torch.int8, f"stored weight dtype {sim.q.dtype}, expected int8"
    assert not isinstance(sim, nn.Linear), (
        "Int8LinearSim must not be an nn.Linear (weight edits must refuse it)"
    )
    assert sim.weight is None, "Int8LinearSim must not expose a float weight to edit"
    assert not list(sim.parameters()), "Int8LinearSim must hold buffers only, no trainable parameters"


def test_int8_sim_rejects_bad_construction() -> None:
    with pytest.raises(InvalidArgumentError, match="q"):
        Int8LinearSim(torch.zeros(2, 3), torch.ones(2))
    with pytest.raises(InvalidArgumentError, match="scale"):
        Int8LinearSim(torch.zeros(2, 3, dtype=torch.int8), torch.ones(3))
    with pytest.raises(InvalidArgumentError, match="threshold"):
        Int8LinearSim(torch.zeros(2, 3, dtype=torch.int8), torch.ones(2), threshold=float("nan"))


# ----------------------------------------------------------------------------
# model-level LLM.int8
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen2"])
def test_llm_int8_replaces_every_block_linear_and_keeps_outputs_close(family: str) -> None:
    model = tiny_model(family, dtype=torch.float64, n_kv_heads=2)
    ids = eval_ids()
    ref = logits(model, ids)
    layout = get_layout(model)
    emb, head = layout.embedding.weight.clone(), layout.lm_head.weight.clone()
    originals = {(layer, n): m.weight.clone() for layer in range(2) for n, m in layout.linears(layer).items()}
    errors = quantize_llm_int8_(model)
    assert len(errors) == 14, f"llm-int8({family}): errors for {len(errors)} modules, expected 14"
    for (layer, name), w in originals.items():
        m = layout.linears(layer)[name]
        assert isinstance(m, Int8LinearSim), (
            f"llm-int8({family}) left layer {layer} {name} as {type(m).__name__}"
        )
        step = w.abs().amax(1, keepdim=True) / 127
        assert bool(((m.dequantize() - w).abs() <= step / 2 + 1e-12).all()), (
            f"llm-int8({family}) layer {layer} {name}: weight error above half a step"
        )
    assert torch.equal(layout.embedding.weight, emb), f"llm-int8({family}) changed the embedding"
    assert torch.equal(layout.lm_head.weight, head), f"llm-int8({family}) changed lm_head"
    err = rel(logits(model, ids), ref)
    assert 0 < err < 0.02, f"llm-int8({family}): logits relative error {err:.3g}, expected in (0, 0.02)"


def test_llm_int8_twice_is_refused_before_modifying() -> None:
    model = tiny_model("llama")
    quantize_llm_int8_(model)
    before = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match="Int8LinearSim"):
        quantize_llm_int8_(model)
    with pytest.raises(UnsupportedModuleError, match="Int8LinearSim"):
        quantize_awq_(model, calibration_lists())
    assert_unchanged(model, before, "quantizing an int8 model again")


@pytest.mark.parametrize("threshold", [-1.0, float("nan"), "6"])
def test_llm_int8_bad_threshold_raises_before_modifying(threshold: object) -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(InvalidArgumentError, match="threshold"):
        quantize_llm_int8_(model, threshold)  # type: ignore[arg-type]
    assert_unchanged(model, before, f"quantize_llm_int8_(threshold={threshold!r})")
    assert isinstance(get_layout(model).linears(0)["q_proj"], nn.Linear), (
        "q_proj was replaced despite the error"
    )


# ----------------------------------------------------------------------------
# AWQ
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "kv"), [("llama", None), ("gemma", None), ("qwen2", 2), ("mistral", 2)])
def test_awq_scale_fold_with_random_scales_is_function_preserving(family: str, kv: int | None) -> None:
    model = tiny_model(family, dtype=torch.float64, n_kv_heads=kv)
    ids = eval_ids()
    ref = logits(model, ids)
    layout = get_layout(model)
    g = torch.Generator().manual_seed(1)
    n_groups = 0
    for layer in range(layout.n_layers):
        for group in awq_scale_groups(layout, layer):
            s = torch.exp(torch.randn(group.linears[0].in_features, generator=g, dtype=torch.float64))
            apply_awq_scale_(group.prev, group.linears, s, norm_offset=layout.spec.norm_offset)
            n_groups += 1
    expected_groups = 2 * (4 if kv is None else 3)  # no v→o fold under grouped-query attention
    assert n_groups == expected_groups, f"{family}: {n_groups} scale groups, expected {expected_groups}"
    err = rel(logits(model, ids), ref)
    assert err < FOLD_TOL.get(family, 1e-10), (
        f"AWQ fold with random scales ({family}, kv={kv}) changed the logits: rel err {err:.3g}"
    )


@pytest.mark.parametrize("objective", ["module", "linear"])
@pytest.mark.parametrize("family", ["llama", "gemma", "qwen2"])
def test_awq_searched_scaling_before_rounding_is_function_preserving(family: str, objective: str) -> None:
    model = with_outlier_channels(tiny_model(family, dtype=torch.float64))
    ids = eval_ids()
    ref = logits(model, ids)
    norms_before = get_layout(model).input_norm(0).weight.clone()
    quantize_awq_(model, calibration_lists(), w_bit=4, scale_only=True, objective=objective)
    norms_after = get_layout(model).input_norm(0).weight
    assert not torch.equal(norms_before, norms_after), (
        f"AWQ ({family}) chose s = 1 for the outlier model; the test could not detect a wrong fold"
    )
    err = rel(logits(model, ids), ref)
    assert err < FOLD_TOL.get(family, 1e-10), (
        f"AWQ scaling before rounding ({family}) changed the logits: rel err {err:.3g}"
    )


@pytest.mark.parametrize("objective", ["module", "linear"])
@pytest.mark.parametrize(("w_bit", "zero_point"), [(4, True), (8, True), (4, False)])
def test_awq_with_only_a_equal_0_is_round_to_nearest(w_bit: int, zero_point: bool, objective: str) -> None:
    model = with_outlier_channels(tiny_model("qwen2", d_ff=64))
    rtn = {
        (layer, n): pseudo_quantize(m.weight, w_bit, min(128, m.in_features), zero_point)
        for layer in range(2)
        for n, m in get_layout(model).linears(layer).items()
    }
    layout = get_layout(model)
    others = {k: v.clone() for k, v in model.state_dict().items() if not any(n in k for n in LINEARS)}
    biases = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("bias")}
    quantize_awq_(model, calibration_lists(), w_bit=w_bit, grid=1, zero_point=zero_point, objective=objective)
    for (layer, name), expected in rtn.items():
        got = layout.linears(layer)[name].weight
        assert torch.equal(got, expected), f"AWQ grid=1 w{w_bit} layer {layer} {name} differs from RTN"
    state = model.state_dict()
    for k, v in {**others, **biases}.items():
        assert torch.equal(state[k], v), f"AWQ grid=1 changed {k}; with s = 1 nothing but rounding may change"


@pytest.mark.parametrize("objective", ["module", "linear"])
def test_awq_output_error_is_at_most_rtn_on_outlier_model(objective: str) -> None:
    base = with_outlier_channels(tiny_model("llama", d_model=64, d_ff=128, seed=2))
    calib = calibration_lists(12, seed=4)
    ids = torch.tensor([c[:4] for c in calib])
    ref = logits(base, ids)
    awq = with_outlier_channels(tiny_model("llama", d_model=64, d_ff=128, seed=2))
    rtn = with_outlier_channels(tiny_model("llama", d_model=64, d_ff=128, seed=2))
    quantize_awq_(awq, calib, w_bit=4, group_size=32, objective=objective)
    quantize_awq_(rtn, calib, w_bit=4, group_size=32, grid=1)
    err_awq, err_rtn = rel(logits(awq, ids), ref), rel(logits(rtn, ids), ref)
    assert err_awq <= err_rtn, (
        f"AWQ w4 ({objective} objective) logits error {err_awq:.4g} exceeds round-to-nearest's {err_rtn:.4g}"
    )


def test_awq_group_error_at_most_rtn_for_every_group_of_block_0() -> None:
    # Per group the search includes s = 1 (a = 0), so its chosen loss can never exceed RTN's.
    model = with_outlier_channels(tiny_model("llama", seed=3))
    layout = get_layout(model)
    x = layout.input_norm(0)(layout.embedding(torch.tensor([[t for c in calibration_lists() for t in c]])))[
        0
    ].detach()
    lin = layout.linears(0)
    w = torch.cat([lin[n].weight for n in ("q_proj", "k_proj", "v_proj")]).detach()
    s = awq_scales(w, x, 4, 32)
    loss = float(((x @ w.T - x @ awq_apply_scales(w, s, 4, 32).T) ** 2).sum())
    loss_rtn = float(((x @ w.T - x @ pseudo_quantize(w, 4, 32).T) ** 2).sum())
    assert loss <= loss_rtn, f"awq_scales loss {loss:.4g} above RTN {loss_rtn:.4g} on block 0 q/k/v"
    assert loss < loss_rtn, "outlier channels should make AWQ strictly better here; the fixture is too easy"


class _StopError(Exception):
    pass


def run_alone(
    model: nn.Module, calib: list[list[int]], layer: int, modules: dict[str, nn.Module], *, outputs: bool
) -> dict[str, torch.Tensor]:
    """Each sequence alone through the model, stopped after block ``layer``: per module its input
    (``outputs=False``) or first output, at every token, concatenated over the sequences."""
    layout = get_layout(model)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in modules}

    def make(name: str):
        def hook(mod: nn.Module, args: tuple, out: object) -> None:
            value = out[0] if isinstance(out, tuple) else out
            rows[name].append((value if outputs else args[0])[0].detach().clone())

        return hook

    def stop(mod: nn.Module, args: tuple, out: object) -> None:
        raise _StopError

    handles = [m.register_forward_hook(make(k)) for k, m in modules.items()]
    handles.append(layout.blocks[layer].register_forward_hook(stop))
    try:
        for ids in calib:
            with torch.no_grad(), pytest.raises(_StopError):
                model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in rows.items()}


def module_objective_scales(
    model: nn.Module, calib: list[list[int]], layer: int, group: object, target: nn.Module, grid: int
) -> torch.Tensor:
    """The candidate of awq_scales (formula written out here) of least squared error of ``target``'s
    output, with the group's linears set to awq_apply_scales(W, s) one candidate at a time."""
    assert isinstance(group, AwqScaleGroup)
    gs = min(128, group.linears[0].in_features)
    x = run_alone(model, calib, layer, {"x": group.linears[0]}, outputs=False)["x"].to(torch.float64)
    x_mean = x.abs().mean(dim=0)
    ref = run_alone(model, calib, layer, {"y": target}, outputs=True)["y"].to(torch.float64)
    originals = [m.weight.detach().clone() for m in group.linears]
    best_loss, best = float("inf"), torch.ones_like(x_mean)
    try:
        for i in range(grid):
            t = x_mean.pow(i / grid).clamp(min=1e-4)
            s = t / torch.sqrt(t.max() * t.min())
            with torch.no_grad():
                for m, w0 in zip(group.linears, originals):
                    m.weight.copy_(awq_apply_scales(w0.to(torch.float64), s, 4, gs))
            out = run_alone(model, calib, layer, {"y": target}, outputs=True)["y"].to(torch.float64)
            loss = float(((out - ref) ** 2).sum())
            if loss < best_loss:
                best_loss, best = loss, s
    finally:
        with torch.no_grad():
            for m, w0 in zip(group.linears, originals):
                m.weight.copy_(w0)
    return best


def reference_awq_(
    model: nn.Module,
    calib: list[list[int]],
    *,
    objective: str = "linear",
    sequential: bool = True,
    grid: int = 20,
) -> None:
    """Slow AWQ w4 reference: per block, full forwards of the model (one sequence at a time, stopped
    after the block) capture the group inputs; then scale search, fold and rounding. The linear
    objective calls functional.awq_scales; the module objective scores every candidate on the
    attention / MLP output seen in such full forwards. With ``sequential=False`` the inputs come
    from the unquantized model instead (linear objective only)."""
    assert sequential or objective == "linear", "one-shot calibration is only written for 'linear'"
    layout = get_layout(model)
    unquantized = None if sequential else snapshot(model)
    for layer in range(layout.n_layers):
        lin = layout.linears(layer)
        taps = {
            "attn_in": lin["q_proj"],
            "o_in": lin["o_proj"],
            "mlp_in": lin["gate_proj"],
            "down_in": lin["down_proj"],
        }
        current = snapshot(model)
        if unquantized is not None:
            model.load_state_dict(unquantized)
        inputs = run_alone(model, calib, layer, taps, outputs=False)
        model.load_state_dict(current)
        groups = awq_scale_groups(layout, layer)
        targets = {"attn_in": layout.attn(layer), "mlp_in": layout.mlp(layer)}
        scales = [
            module_objective_scales(model, calib, layer, g, targets[g.source], grid)
            if objective == "module" and g.source in targets
            else awq_scales(
                torch.cat([m.weight for m in g.linears]),
                inputs[g.source],
                4,
                min(128, g.linears[0].in_features),
                grid,
            )
            for g in groups
        ]
        for g, s in zip(groups, scales):
            apply_awq_scale_(g.prev, g.linears, s, norm_offset=layout.spec.norm_offset)
        with torch.no_grad():
            for m in lin.values():
                m.weight.copy_(pseudo_quantize(m.weight, 4, min(128, m.in_features)))


def max_state_difference(a: nn.Module, b: nn.Module) -> tuple[float, str]:
    sa, sb = a.state_dict(), b.state_dict()
    worst = (0.0, "")
    for k in sa:
        err = rel(sa[k], sb[k]) if sb[k].norm() > 0 else float(sa[k].abs().max())
        worst = max(worst, (err, k))
    return worst


@pytest.mark.parametrize(("family", "kv"), [("llama", None), ("qwen2", 2)])
@pytest.mark.parametrize("objective", ["linear", "module"])
def test_awq_matches_slow_sequential_reference(family: str, kv: int | None, objective: str) -> None:
    calib = calibration_lists(5, seed=7)
    grid = 10 if objective == "module" else 20  # the module reference runs the model per candidate
    fast = with_outlier_channels(tiny_model(family, n_layers=3, n_kv_heads=kv, dtype=torch.float64))
    slow = with_outlier_channels(tiny_model(family, n_layers=3, n_kv_heads=kv, dtype=torch.float64))
    quantize_awq_(fast, calib, w_bit=4, grid=grid, objective=objective, batch_size=2)
    reference_awq_(slow, calib, objective=objective, grid=grid)
    err, key = max_state_difference(fast, slow)
    assert err < 1e-12, (
        f"AWQ ({family}, objective={objective}) vs slow sequential reference: {key} differs (rel {err:.3g})"
    )


def test_sequential_awq_reference_differs_from_one_shot_calibration() -> None:
    # Guards the test above: calibrating on the unquantized model gives other weights.
    calib = calibration_lists(5, seed=7)
    fast = with_outlier_channels(tiny_model("llama", n_layers=3, dtype=torch.float64))
    one_shot = with_outlier_channels(tiny_model("llama", n_layers=3, dtype=torch.float64))
    quantize_awq_(fast, calib, w_bit=4, objective="linear")
    reference_awq_(one_shot, calib, sequential=False)
    err, _ = max_state_difference(fast, one_shot)
    assert err > 1e-6, (
        "sequential and one-shot AWQ calibration gave the same model; the test above cannot fail"
    )


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_awq_objectives_choose_different_scales(family: str) -> None:
    # Guards the module-objective reference test: scoring on the module output must matter here,
    # else agreeing with the module reference would say nothing beyond the linear one.
    calib = calibration_lists(5, seed=7)
    by_module = with_outlier_channels(tiny_model(family, n_layers=3, dtype=torch.float64))
    by_linear = with_outlier_channels(tiny_model(family, n_layers=3, dtype=torch.float64))
    quantize_awq_(by_module, calib, w_bit=4, grid=10, objective="module")  # the settings of the test above
    quantize_awq_(by_linear, calib, w_bit=4, grid=10, objective="linear")
    err, _ = max_state_difference(by_module, by_linear)
    assert err > 1e-6, f"AWQ ({family}): module and linear objectives gave the same model"


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_recorded_attention_call_replays_to_the_recorded_output(family: str) -> None:
    # The module objective scores q/k/v candidates by replaying these calls; with unchanged
    # weights a replay must reproduce the block's own attention output (padding included).
    model = tiny_model(family, dtype=torch.float64, n_kv_heads=2)
    layout = get_layout(model)
    runner = SequentialBlocks(layout, prepare_calibration(calibration_lists(5, seed=2), batch_size=3))
    attn = layout.attn(1)
    runner.advance(0)
    calls = runner.collect(1, {}, lambda name, x: None, record={"attn": attn})["attn"]
    assert len(calls) == 2, f"expected one recorded attention call per batch (2), got {len(calls)}"
    assert not bool(calls[1].token_mask.all()), "the second batch should contain left padding"
    for b, call in enumerate(calls):
        again = call.replay(attn)
        expected = call.output[call.token_mask]
        assert torch.equal(again, expected), f"{family}: replaying attention call {b} changed its output"


# ----------------------------------------------------------------------------
# the fast AWQ search helpers equal the functional core exactly
# ----------------------------------------------------------------------------


def awq_case(seed: int, out_f: int, in_f: int, tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Weights and inputs with per-channel input magnitudes spread over two orders (AWQ's setting)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    gain = torch.exp(2.0 * torch.randn(in_f, generator=g, dtype=torch.float64))
    x = torch.randn(tokens, in_f, generator=g, dtype=torch.float64) * gain
    return w.to(dtype), x.to(dtype)


@pytest.mark.parametrize("method", ["direct", "gram", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("w_bit", "group_size", "grid"), [(4, 16, 20), (8, 64, 20), (3, 8, 7), (2, 32, 5), (4, 16, 1)]
)
def test_fast_linear_search_equals_functional_awq_scales(
    dtype: torch.dtype, w_bit: int, group_size: int, grid: int, method: str
) -> None:
    for seed in range(4):
        tokens = 40 if seed % 2 else 300  # fewer and more tokens than inputs
        w, x = awq_case(seed, 24, 64, tokens, dtype)
        fast = _awq_linear_scales(w, x, w_bit, group_size, grid, method=method)
        core = awq_scales(w, x, w_bit, group_size, grid)
        assert fast.dtype == core.dtype, f"fast AWQ search dtype {fast.dtype}, awq_scales {core.dtype}"
        assert torch.equal(fast, core), (
            f"fast AWQ linear search ({method}) != awq_scales (seed {seed}, {dtype}, w{w_bit}, "
            f"g{group_size}, grid {grid}): max |Δs| {float((fast - core).abs().max()):.3g}"
        )


@pytest.mark.parametrize("w_bit", [2, 4, 8])
def test_gram_loss_interval_holds_the_direct_loss_and_is_tight(w_bit: int) -> None:
    # The Gram search is exact only if the interval always contains the direct form's value;
    # it is fast only if the interval is narrow enough to single out the winner.
    for seed in range(3):
        w, x = awq_case(seed, 24, 64, 300, torch.float64)
        x_mean = x.abs().mean(dim=0)
        for a in (0.0, 0.5, 0.95):
            t = x_mean.pow(a).clamp(min=1e-4)
            s = t / torch.sqrt(t.max() * t.min())
            wq = awq_apply_scales(w, s, w_bit, 16)
            direct = float(((x @ w.T - x @ wq.T) ** 2).sum())
            d = w - wq
            gram = float(((d @ (x.T @ x)) * d).sum())
            lo, hi = _awq_gram_bounds(
                gram, float((d * d).sum()), float(w.norm()), float((x * x).sum()), 300, 64, 24
            )
            assert lo <= direct <= hi, (
                f"direct loss {direct!r} outside the Gram interval [{lo!r}, {hi!r}] (w{w_bit}, a={a})"
            )
            # Worst-case bounds: far wider than the real rounding error, yet far below the gaps of
            # ~1e-3 and more between the losses of neighbouring candidates.
            assert hi - lo < 1e-4 * direct, (
                f"Gram interval width {hi - lo:.3g} not below 1e-4 of the loss {direct:.3g} (w{w_bit}, a={a})"
            )


def count_effective_weights(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = quantization._awq_effective_weight

    def counting(*args: object) -> torch.Tensor:
        calls[0] += 1
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(quantization, "_awq_effective_weight", counting)
    return calls


def test_gram_search_needs_no_direct_rescoring_without_near_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_effective_weights(monkeypatch)
    for seed in range(3):
        w, x = awq_case(seed, 24, 64, 300, torch.float64)
        calls[0] = 0
        _awq_linear_scales(w, x, 4, 16, 20, method="gram")
        assert calls[0] == 20, (
            f"Gram search built {calls[0]} candidate weights for 20 candidates (seed {seed})"
        )


def test_gram_search_rescoring_of_near_ties_keeps_the_first_lowest(monkeypatch: pytest.MonkeyPatch) -> None:
    # With huge intervals every candidate may win: all are re-scored by the direct form.
    monkeypatch.setattr(quantization, "_BOUND_SLACK", 1e30)
    calls = count_effective_weights(monkeypatch)
    for seed in range(3):
        w, x = awq_case(seed, 24, 64, 300, torch.float64)
        calls[0] = 0
        got = _awq_linear_scales(w, x, 4, 16, 20, method="gram")
        assert calls[0] == 40, f"expected 20 Gram and 20 direct candidate weights, built {calls[0]}"
        assert torch.equal(got, awq_scales(w, x, 4, 16, 20)), (
            f"Gram search with every candidate re-scored != awq_scales (seed {seed})"
        )


TIE_CASES = {
    # every candidate is s = 1: one distinct candidate, a = 0 wins
    "constant mean|x|": lambda w, x: (w, torch.ones_like(x) * torch.tensor([1.0, -1.0]).repeat(20)[:, None]),
    # every loss is 0: all tie, a = 0 wins
    "zero weights": lambda w, x: (torch.zeros_like(w), x),
    # a channel that is never active (mean|x| = 0: the 1e-4 floor) and integer weights
    "dead channel, integer w": lambda w, x: (torch.round(4 * w), x.index_fill(1, torch.tensor([3, 9]), 0.0)),
    # two channel magnitudes only: many candidates round to the same grid
    "two magnitudes": lambda w, x: (
        w,
        torch.where(torch.arange(64) % 2 == 0, 1.0, 8.0).expand(40, 64).clone(),
    ),
}


@pytest.mark.parametrize("case", list(TIE_CASES))
def test_fast_linear_search_equals_functional_awq_scales_on_ties(case: str) -> None:
    w, x = awq_case(5, 24, 64, 40, torch.float64)
    w, x = TIE_CASES[case](w, x)
    for w_bit in (2, 4, 8):
        core = awq_scales(w, x, w_bit, 16, 20)
        for method in ("direct", "gram"):
            fast = _awq_linear_scales(w, x, w_bit, 16, 20, method=method)
            assert torch.equal(fast, core), (
                f"fast AWQ linear search ({method}) != awq_scales on '{case}' (w{w_bit})"
            )


@pytest.mark.parametrize(("w_bit", "group_size"), [(4, 16), (8, 64), (2, 8)])
def test_fast_effective_weight_equals_functional_awq_apply_scales(w_bit: int, group_size: int) -> None:
    w, x = awq_case(1, 24, 64, 40, torch.float64)
    for a in (0.0, 0.35, 0.95):
        t = x.abs().mean(dim=0).pow(a).clamp(min=1e-4)
        s = t / torch.sqrt(t.max() * t.min())
        fast = _awq_effective_weight(w, s, w_bit, group_size)
        core = awq_apply_scales(w, s, w_bit, group_size)
        assert torch.equal(fast, core), (
            f"Q(w·s)/s differs from awq_apply_scales (w{w_bit}, g{group_size}, a={a})"
        )
    assert torch.equal(w, awq_case(1, 24, 64, 40, torch.float64)[0]), "the fast helper modified its input w"


def test_module_search_restores_weights_when_the_error_function_raises() -> None:
    lin = nn.Linear(16, 8).to(torch.float64)
    before = lin.weight.detach().clone()
    x = awq_case(2, 8, 16, 10, torch.float64)[1]
    calls = []

    def failing() -> float:
        calls.append(lin.weight.detach().clone())
        if len(calls) == 2:
            raise RuntimeError("boom")
        return 1.0

    with pytest.raises(RuntimeError, match="boom"):
        _awq_module_scales([lin], x, 4, 8, 20, failing)
    assert not torch.equal(calls[1], before), "the search did not set candidate weights; the test is void"
    assert torch.equal(lin.weight, before), "module scale search left candidate weights after an exception"


def test_module_search_scores_every_candidate_on_the_given_error() -> None:
    # Against awq_scales' own candidates: with the linear's output error as the module error,
    # the module search must pick exactly what awq_scales picks.
    w, x = awq_case(3, 12, 32, 30, torch.float64)
    lin = nn.Linear(32, 12, bias=False).to(torch.float64)
    with torch.no_grad():
        lin.weight.copy_(w)
    ref = x @ w.T

    def linear_error() -> float:
        return float(((ref - lin(x)) ** 2).sum())

    got = _awq_module_scales([lin], x, 4, 16, 20, linear_error)
    assert torch.equal(got, awq_scales(w, x, 4, 16, 20)), (
        "module search with the linear's own error != awq_scales"
    )
    assert torch.equal(lin.weight, w), "module search did not restore the original weight"


def test_clip_search_never_increases_group_error_and_clips_outlier_weights() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    w[:, 5] *= 12.0  # a few large weights make clipping worthwhile
    x = torch.randn(200, 64, generator=g)
    max_val, best, base = clip_search(w, x, 4, 32)
    org = w.abs().reshape(16, 2, 32).amax(-1)
    assert bool((best <= base).all()), "clip search chose a clip value with larger error than no clipping"
    assert bool((max_val <= org + 1e-6).all()), "clip search returned a clip above the group absmax"
    assert bool((max_val < org - 1e-6).any()), "clip search never clipped; the outlier fixture is too easy"


def test_awq_with_clip_runs_and_keeps_outputs_close() -> None:
    model = with_outlier_channels(tiny_model("llama"))
    ids = eval_ids()
    ref = logits(model, ids)
    errors = quantize_awq_(model, calibration_lists(), w_bit=8, clip=True)
    assert len(errors) == 14, f"AWQ(clip) returned errors for {len(errors)} modules"
    err = rel(logits(model, ids), ref)
    assert err < 0.05, f"AWQ w8 with clip: logits rel error {err:.3g}"


BAD_AWQ = [
    pytest.param({"w_bit": 1}, InvalidArgumentError, "w_bit", id="w_bit=1"),
    pytest.param({"w_bit": 9}, InvalidArgumentError, "w_bit", id="w_bit=9"),
    pytest.param({"group_size": 24}, InvalidArgumentError, "group_size", id="group-not-dividing"),
    pytest.param({"group_size": 0}, InvalidArgumentError, "group_size", id="group=0"),
    pytest.param({"grid": 0}, InvalidArgumentError, "grid", id="grid=0"),
    pytest.param({"calibration": []}, EmptyInputError, "calibration", id="calib-empty"),
    pytest.param({"calibration": None}, EmptyInputError, "calibration", id="calib-none"),
    pytest.param({"calibration": [[1, 99999]]}, InvalidArgumentError, "calibration", id="calib-oov"),
    pytest.param({"clip": 1}, InvalidArgumentError, "clip", id="clip-int"),
    pytest.param({"objective": "block"}, InvalidArgumentError, "objective", id="objective-unknown"),
]


@pytest.mark.parametrize(("kwargs", "error", "names"), BAD_AWQ)
def test_awq_bad_input_raises_before_modifying(kwargs: dict, error: type, names: str) -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    args = {"calibration": calibration_lists(), **kwargs}
    calibration = args.pop("calibration")
    with pytest.raises(error, match=names):
        quantize_awq_(model, calibration, **args)
    assert_unchanged(model, before, f"quantize_awq_({kwargs})")


def test_awq_config_objective_validates_and_round_trips() -> None:
    assert AwqConfig().objective == "module", "AwqConfig's default objective must be 'module'"
    for objective in ("module", "linear"):
        cfg = AwqConfig(w_bit=8, objective=objective)
        assert config_from_dict(config_to_dict(cfg)) == cfg, f"AwqConfig(objective={objective!r}) round trip"
    with pytest.raises(InvalidArgumentError, match="objective"):
        AwqConfig(objective="block")


def test_apply_awq_scale_rejects_bad_scales() -> None:
    model = tiny_model("llama")
    layout = get_layout(model)
    group = awq_scale_groups(layout, 0)[0]
    before = snapshot(model)
    for s, what in (
        (-torch.ones(32), "positive"),
        (torch.ones(31), "length"),
        (torch.full((32,), float("nan")), "NaN"),
    ):
        with pytest.raises(InvalidArgumentError, match=what):
            apply_awq_scale_(group.prev, group.linears, s)
    assert_unchanged(model, before, "apply_awq_scale_ with bad s")


def test_int8_sim_makes_float_codes_only_for_the_float_route_and_follows_edits_of_q() -> None:
    """The float copy of the codes is made only on the float route, once, stays bit-exact, and is
    rebuilt when ``q`` changes."""
    g = torch.Generator().manual_seed(31)
    lin = nn.Linear(40, 12)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(12, 40, generator=g))
    x = torch.randn(7, 40, generator=g)
    x[2, 5] = 8.0  # outlier column
    x[4, 30] = -11.0
    sim = Int8LinearSim.from_linear(lin)
    sim(x)  # the CPU's integer route: no float copy of the codes is made
    assert sim._q_f32 is None, "Int8LinearSim built float32 codes the integer route does not use"
    sim.use_int_mm = False  # the float32 route, as on a GPU
    first = sim._float_q()
    sim(x)
    sim(x)
    assert sim._float_q() is first, "Int8LinearSim re-derived its float codes on a forward call"
    assert torch.equal(first, sim.q.to(torch.float32)), "the cached float codes are not q"
    # The forward must compute from the cache: poisoning it (same q, so no rebuild) changes the output.
    sim._q_f32 = torch.zeros_like(first)
    assert not torch.equal(sim(x), llm_int8_linear(x, lin.weight) + lin.bias), (
        "Int8LinearSim's forward ignores its precomputed float codes (it re-derives them per call)"
    )
    sim._q_f32 = first
    # An in-place edit of q (as load_state_dict does) must reach the next forward.
    other = nn.Linear(40, 12)
    with torch.no_grad():
        other.weight.copy_(torch.randn(12, 40, generator=g) * 3)
    donor = Int8LinearSim.from_linear(other)
    sim.load_state_dict({**donor.state_dict(), "bias": lin.bias.detach()})
    expected = llm_int8_linear(x, other.weight) + lin.bias
    assert torch.equal(sim(x), expected), "after load_state_dict, Int8LinearSim still used the old codes"
    # A replaced q tensor (a fresh one may even reuse the freed address, hence the version too) as well.
    sim.q = Int8LinearSim.from_linear(lin).q.clone()
    sim.scale = Int8LinearSim.from_linear(lin).scale.clone()
    assert torch.equal(sim(x), llm_int8_linear(x, lin.weight) + lin.bias), (
        "after replacing q and scale, Int8LinearSim still used the old codes"
    )


@pytest.mark.parametrize("width", [40, 1500])
def test_int8_sim_integer_and_float_routes_are_both_the_functional_core(width: int, monkeypatch) -> None:
    """The CPU's integer matmul route and the float32 route give ``llm_int8_linear`` bit for bit,
    with outliers, across the float route's 1024-input chunks (width 1500) and, with the int32
    chunk made small, across the integer route's chunks too."""
    import refusal_core.model.simulated as simulated

    g = torch.Generator().manual_seed(7)
    lin = nn.Linear(width, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, width, generator=g) * 0.1)
        lin.weight[3, 11] = 40.0  # a row whose scale one weight dominates
    x = torch.randn(9, width, generator=g) * 2
    x[2, 5] = 8.0  # outlier columns
    x[6, width - 1] = -13.0
    expected = llm_int8_linear(x, lin.weight) + lin.bias
    sim = Int8LinearSim.from_linear(lin)
    routes = {}
    for use_int_mm in (True, False):
        sim.use_int_mm = use_int_mm
        routes[use_int_mm] = sim(x)
    monkeypatch.setattr(simulated, "_EXACT_INT32_CHUNK", 17)
    sim.use_int_mm = True
    routes["chunked"] = sim(x)
    for route, y in routes.items():
        assert torch.equal(y, expected), f"route {route!r} differs from llm_int8_linear"
    # float64 activations (quantized in float64) through the integer route, chunked, as well
    x64 = x.double()
    assert torch.equal(sim(x64), llm_int8_linear(x64, lin.weight) + lin.bias.double())
