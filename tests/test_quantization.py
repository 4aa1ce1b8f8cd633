"""Model-level quantization: the exact LLM.int8 simulation and AWQ fake quantization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from refusal_core.compression import (
    Int8LinearSim,
    apply_awq_scale_,
    awq_scale_groups,
    quantize_awq_,
    quantize_llm_int8_,
)
from refusal_core.compression.quantization import clip_search
from refusal_core.errors import EmptyInputError, InvalidArgumentError, UnsupportedModuleError
from refusal_core.functional import (
    awq_apply_scales,
    awq_scales,
    int8_dequantize,
    int8_quantize,
    llm_int8_linear,
    pseudo_quantize,
)
from refusal_core.models import get_layout
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


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen2"])
def test_awq_searched_scaling_before_rounding_is_function_preserving(family: str) -> None:
    model = with_outlier_channels(tiny_model(family, dtype=torch.float64))
    ids = eval_ids()
    ref = logits(model, ids)
    norms_before = get_layout(model).input_norm(0).weight.clone()
    quantize_awq_(model, calibration_lists(), w_bit=4, scale_only=True)
    norms_after = get_layout(model).input_norm(0).weight
    assert not torch.equal(norms_before, norms_after), (
        f"AWQ ({family}) chose s = 1 for the outlier model; the test could not detect a wrong fold"
    )
    err = rel(logits(model, ids), ref)
    assert err < FOLD_TOL.get(family, 1e-10), (
        f"AWQ scaling before rounding ({family}) changed the logits: rel err {err:.3g}"
    )


@pytest.mark.parametrize(("w_bit", "zero_point"), [(4, True), (8, True), (4, False)])
def test_awq_with_only_a_equal_0_is_round_to_nearest(w_bit: int, zero_point: bool) -> None:
    model = with_outlier_channels(tiny_model("qwen2", d_ff=64))
    rtn = {
        (layer, n): pseudo_quantize(m.weight, w_bit, min(128, m.in_features), zero_point)
        for layer in range(2)
        for n, m in get_layout(model).linears(layer).items()
    }
    layout = get_layout(model)
    others = {k: v.clone() for k, v in model.state_dict().items() if not any(n in k for n in LINEARS)}
    biases = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("bias")}
    quantize_awq_(model, calibration_lists(), w_bit=w_bit, grid=1, zero_point=zero_point)
    for (layer, name), expected in rtn.items():
        got = layout.linears(layer)[name].weight
        assert torch.equal(got, expected), f"AWQ grid=1 w{w_bit} layer {layer} {name} differs from RTN"
    state = model.state_dict()
    for k, v in {**others, **biases}.items():
        assert torch.equal(state[k], v), f"AWQ grid=1 changed {k}; with s = 1 nothing but rounding may change"


def test_awq_output_error_is_at_most_rtn_on_outlier_model() -> None:
    base = with_outlier_channels(tiny_model("llama", d_model=64, d_ff=128, seed=2))
    calib = calibration_lists(12, seed=4)
    ids = torch.tensor([c[:4] for c in calib])
    ref = logits(base, ids)
    awq = with_outlier_channels(tiny_model("llama", d_model=64, d_ff=128, seed=2))
    rtn = with_outlier_channels(tiny_model("llama", d_model=64, d_ff=128, seed=2))
    quantize_awq_(awq, calib, w_bit=4, group_size=32)
    quantize_awq_(rtn, calib, w_bit=4, group_size=32, grid=1)
    err_awq, err_rtn = rel(logits(awq, ids), ref), rel(logits(rtn, ids), ref)
    assert err_awq <= err_rtn, f"AWQ w4 logits error {err_awq:.4g} exceeds round-to-nearest's {err_rtn:.4g}"


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


def reference_awq_(model: nn.Module, calib: list[list[int]], *, sequential: bool = True) -> None:
    """Slow AWQ w4 reference: per block, a full forward of the model (one sequence at a time,
    stopped after the block) captures the group inputs; then scale search, fold and rounding.
    With ``sequential=False`` the inputs come from the unquantized model instead."""
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
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in taps}

        def make(src: str, rows: dict[str, list[torch.Tensor]] = rows):
            return lambda mod, args, out: rows[src].append(args[0][0].detach())

        def stop(mod: nn.Module, args: tuple, out: object) -> None:
            raise _StopError

        current = snapshot(model)
        if unquantized is not None:
            model.load_state_dict(unquantized)
        handles = [m.register_forward_hook(make(k)) for k, m in taps.items()]
        handles.append(layout.blocks[layer].register_forward_hook(stop))
        try:
            for ids in calib:
                with torch.no_grad(), pytest.raises(_StopError):
                    model(input_ids=torch.tensor([ids]), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        model.load_state_dict(current)
        inputs = {k: torch.cat(v) for k, v in rows.items()}
        groups = awq_scale_groups(layout, layer)
        scales = [
            awq_scales(
                torch.cat([m.weight for m in g.linears]),
                inputs[g.source],
                4,
                min(128, g.linears[0].in_features),
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


def test_awq_matches_slow_sequential_reference() -> None:
    calib = calibration_lists(5, seed=7)
    fast = with_outlier_channels(tiny_model("llama", n_layers=3, dtype=torch.float64))
    slow = with_outlier_channels(tiny_model("llama", n_layers=3, dtype=torch.float64))
    quantize_awq_(fast, calib, w_bit=4)
    reference_awq_(slow, calib)
    err, key = max_state_difference(fast, slow)
    assert err < 1e-12, f"AWQ vs slow sequential reference: {key} differs (rel {err:.3g})"


def test_sequential_awq_reference_differs_from_one_shot_calibration() -> None:
    # Guards the test above: calibrating on the unquantized model gives other weights.
    calib = calibration_lists(5, seed=7)
    fast = with_outlier_channels(tiny_model("llama", n_layers=3, dtype=torch.float64))
    one_shot = with_outlier_channels(tiny_model("llama", n_layers=3, dtype=torch.float64))
    quantize_awq_(fast, calib, w_bit=4)
    reference_awq_(one_shot, calib, sequential=False)
    err, _ = max_state_difference(fast, one_shot)
    assert err > 1e-6, (
        "sequential and one-shot AWQ calibration gave the same model; the test above cannot fail"
    )


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
