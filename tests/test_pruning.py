"""Model-level pruning: magnitude and Wanda (unstructured, N:M, sequential calibration)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from refusal_core.compression import Int8LinearSim, prune_magnitude_, prune_wanda_, quantize_llm_int8_
from refusal_core.compression.pruning import _wanda_keep_mask
from refusal_core.errors import EmptyInputError, InvalidArgumentError, NonFiniteError, UnsupportedModuleError
from refusal_core.functional import wanda_mask
from refusal_core.model import get_layout
from refusal_core.testing.tiny import tiny_model

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def calibration_lists(n: int = 6, seed: int = 0, vocab: int = 600) -> list[list[int]]:
    """Ragged token-id lists (so batches need padding), ids above the special tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=g).tolist()
    return [torch.randint(8, vocab, (k,), generator=g).tolist() for k in lengths]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], what: str) -> None:
    after = model.state_dict()
    assert set(after) == set(before), f"{what}: the set of parameters changed"
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"{what}: modified {changed[:5]} although the call raised"


def linear_weights(model: nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    layout = get_layout(model)
    return {
        (layer, name): m.weight.detach().clone()
        for layer in range(layout.n_layers)
        for name, m in layout.linears(layer).items()
    }


def non_linear_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not any(n in k for n in LINEARS)}


class _StopError(Exception):
    pass


def reference_wanda_(
    model: nn.Module,
    calibration: list[list[int]],
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    *,
    sequential: bool = True,
) -> None:
    """Slow reference: for block l, a full forward of the (partly pruned) model, stopped after block l.

    Sums of squared inputs per input channel over the real tokens are gathered by
    hooks on block l's linears; each sequence is run alone (no padding at all).
    With ``sequential=False`` every block is calibrated on the unpruned model.
    """
    layout = get_layout(model)
    unpruned = None if sequential else {k: v.clone() for k, v in model.state_dict().items()}
    masks: dict[tuple[int, str], torch.Tensor] = {}
    for layer in range(layout.n_layers):
        linears = layout.linears(layer)
        sums = {n: torch.zeros(m.weight.shape[1], dtype=torch.float64) for n, m in linears.items()}
        if unpruned is not None:
            pruned_state = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(unpruned)

        def make(name: str, sums: dict[str, torch.Tensor] = sums):
            def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
                sums[name] += args[0].detach().to(torch.float64).pow(2).sum(dim=(0, 1))

            return hook

        def stop(module: nn.Module, args: tuple, out: object) -> None:
            raise _StopError

        handles = [m.register_forward_hook(make(n)) for n, m in linears.items()]
        handles.append(layout.blocks[layer].register_forward_hook(stop))
        try:
            for ids in calibration:
                with torch.no_grad(), pytest.raises(_StopError):
                    model(input_ids=torch.tensor([ids]), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        if unpruned is not None:
            model.load_state_dict(pruned_state)
        with torch.no_grad():
            for n, m in linears.items():
                masks[layer, n] = wanda_mask(m.weight, sums[n].sqrt(), sparsity, n_m)
                m.weight.mul_(masks[layer, n])


# ----------------------------------------------------------------------------
# magnitude
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen2"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_magnitude_prunes_exactly_floor_s_numel_per_matrix(family: str, sparsity: float) -> None:
    model = tiny_model(family, n_kv_heads=2)
    before = linear_weights(model)
    others = non_linear_state(model)
    per_module = prune_magnitude_(model, sparsity)
    after = linear_weights(model)
    assert len(per_module) == 7 * 2, f"magnitude({family}): expected 14 modules, got {len(per_module)}"
    for key, w in after.items():
        w0 = before[key]
        zeros = int((w == 0).sum())
        assert zeros == int(sparsity * w.numel()), (
            f"magnitude({family}, s={sparsity}) {key}: {zeros} zeros, expected {int(sparsity * w.numel())}"
        )
        kept = w != 0
        assert torch.equal(w[kept], w0[kept]), f"magnitude {key}: kept weights were altered"
        if zeros and bool(kept.any()):
            assert float(w0[~kept].abs().max()) <= float(w0[kept].abs().min()), (
                f"magnitude {key}: a pruned |w| exceeds a kept |w| (one comparison group per matrix)"
            )
    for k, v in non_linear_state(model).items():
        assert torch.equal(v, others[k]), (
            f"magnitude({family}) changed {k} (embedding/norm/lm_head must stay)"
        )


def test_magnitude_is_idempotent() -> None:
    model = tiny_model("llama")
    prune_magnitude_(model, 0.5)
    once = linear_weights(model)
    prune_magnitude_(model, 0.5)
    twice = linear_weights(model)
    assert all(torch.equal(once[k], twice[k]) for k in once), (
        "magnitude pruning twice at s=0.5 changed weights"
    )


# ----------------------------------------------------------------------------
# Wanda
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "qwen2"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.6])
def test_wanda_prunes_exactly_floor_s_din_per_row(family: str, sparsity: float) -> None:
    model = tiny_model(family, n_kv_heads=2)
    others = non_linear_state(model)
    prune_wanda_(model, calibration_lists(), sparsity)
    for key, w in linear_weights(model).items():
        per_row = (w == 0).sum(dim=1)
        expected = int(sparsity * w.shape[1])
        assert bool((per_row == expected).all()), (
            f"wanda({family}, s={sparsity}) {key}: zeros per row {per_row.unique().tolist()}, "
            f"expected {expected}"
        )
    for k, v in non_linear_state(model).items():
        assert torch.equal(v, others[k]), f"wanda({family}) changed {k} (embedding/norm/lm_head must stay)"


@pytest.mark.parametrize("n_m", [(2, 4), (4, 8), (1, 4)])
def test_wanda_n_m_zeroes_exactly_n_of_every_m(n_m: tuple[int, int]) -> None:
    n, m = n_m
    model = tiny_model("llama")
    per_module = prune_wanda_(model, calibration_lists(), 0.5, n_m)
    for key, w in linear_weights(model).items():
        groups = (w == 0).reshape(w.shape[0], -1, m).sum(-1)
        assert bool((groups == n).all()), f"wanda n_m={n_m} {key}: zeros per group {groups.unique().tolist()}"
    assert all(abs(v - n / m) < 1e-12 for v in per_module.values()), (
        f"wanda n_m={n_m}: reported sparsity {sorted(set(per_module.values()))}, expected {n / m}"
    )


def test_wanda_matches_slow_sequential_reference() -> None:
    # float64: the two paths (padded batches vs. one sequence at a time) then agree far below any score gap.
    calib = calibration_lists(8, seed=3)
    fast = tiny_model("llama", n_layers=3, dtype=torch.float64, seed=1)
    slow = tiny_model("llama", n_layers=3, dtype=torch.float64, seed=1)
    prune_wanda_(fast, calib, 0.5, batch_size=3)
    reference_wanda_(slow, calib, 0.5)
    wf, ws = linear_weights(fast), linear_weights(slow)
    for key in wf:
        assert torch.equal(wf[key] == 0, ws[key] == 0), f"wanda vs slow reference: masks differ at {key}"


def test_sequential_reference_differs_from_one_shot_calibration() -> None:
    # Guards the test above: calibrating later blocks on the unpruned model gives other masks,
    # so agreeing with the sequential reference is not automatic.
    calib = calibration_lists(8, seed=3)
    fast = tiny_model("llama", n_layers=3, dtype=torch.float64, seed=1)
    one_shot = tiny_model("llama", n_layers=3, dtype=torch.float64, seed=1)
    prune_wanda_(fast, calib, 0.5)
    reference_wanda_(one_shot, calib, 0.5, sequential=False)
    wf, wo = linear_weights(fast), linear_weights(one_shot)
    assert all(torch.equal(wf[0, n] == 0, wo[0, n] == 0) for n in LINEARS), (
        "block 0 sees the same (embedding) inputs either way and must get the same masks"
    )
    differing = [k for k in wf if k[0] > 0 and not torch.equal(wf[k] == 0, wo[k] == 0)]
    assert differing, "sequential and one-shot calibration gave identical masks in blocks 1-2"


def test_wanda_excludes_padding_positions() -> None:
    calib = calibration_lists(6, seed=5)
    padded = tiny_model("qwen2", dtype=torch.float64)
    alone = tiny_model("qwen2", dtype=torch.float64)
    prune_wanda_(padded, calib, 0.5, batch_size=6)  # one left-padded batch
    prune_wanda_(alone, calib, 0.5, batch_size=1)  # no padding anywhere
    wp, wa = linear_weights(padded), linear_weights(alone)
    for key in wp:
        assert torch.equal(wp[key] == 0, wa[key] == 0), f"wanda: padding changed the mask of {key}"


def test_wanda_padding_would_matter_if_counted() -> None:
    # Guards the test above: pad positions carry large activations, so counting them would change norms.
    calib = calibration_lists(6, seed=5)
    ids = torch.tensor([[0] * (12 - len(c)) + c for c in calib])
    masked, unmasked = tiny_model("qwen2", dtype=torch.float64), tiny_model("qwen2", dtype=torch.float64)
    prune_wanda_(masked, (ids, (ids != 0).long()), 0.5)
    prune_wanda_(unmasked, (ids, torch.ones_like(ids)), 0.5)  # pads counted as tokens
    wm, wu = linear_weights(masked), linear_weights(unmasked)
    assert any(not torch.equal(wm[k] == 0, wu[k] == 0) for k in wm), (
        "counting pad tokens gave the same masks; the padding test could not fail"
    )


def test_wanda_accepts_tensor_mapping_and_lists_alike() -> None:
    calib = torch.randint(8, 600, (4, 7), generator=torch.Generator().manual_seed(0))
    results = []
    for form in (calib, {"input_ids": calib}, (calib, torch.ones_like(calib)), calib.tolist(), list(calib)):
        model = tiny_model("llama")
        prune_wanda_(model, form, 0.5)
        results.append(linear_weights(model))
    for i, r in enumerate(results[1:], start=1):
        assert all(torch.equal(r[k], results[0][k]) for k in r), f"calibration form #{i} gave other weights"


# ----------------------------------------------------------------------------
# the fast Wanda mask equals functional.wanda_mask exactly, ties included
# ----------------------------------------------------------------------------


def mask_case(kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [12, 48], input norms [48]) of a given tie structure."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 48, generator=g, dtype=torch.float64)
    norms = torch.rand(48, generator=g, dtype=torch.float64) * 3
    if kind == "integer weights, equal norms":  # a handful of distinct scores per row: ties everywhere
        w, norms = torch.randint(-3, 4, (12, 48), generator=g).to(torch.float64), torch.ones(48)
    elif kind == "dead inputs":  # zero input norms: those columns all score 0
        norms[::3] = 0.0
    elif kind == "zero rows and signed zeros":
        w[2] = 0.0
        w[5, ::2] = -0.0
        w[7] = torch.where(torch.arange(48) % 2 == 0, 0.0, -0.0)
    elif kind == "float32 weights":
        w = w.to(torch.float32)
    elif kind == "one value":
        w, norms = torch.full((12, 48), -2.5, dtype=torch.float64), torch.full((48,), 0.5)
    return w, norms


MASK_KINDS = [
    "random",
    "integer weights, equal norms",
    "dead inputs",
    "zero rows and signed zeros",
    "float32 weights",
    "one value",
]


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("sparsity", [0.0, 0.02, 0.25, 0.5, 0.77, 0.99])
def test_fast_wanda_mask_equals_functional_unstructured(kind: str, sparsity: float) -> None:
    for seed in range(3):
        w, norms = mask_case(kind, seed)
        fast = _wanda_keep_mask(w, norms, sparsity, None)
        core = wanda_mask(w, norms, sparsity)
        assert torch.equal(fast, core), (
            f"fast Wanda mask != wanda_mask ({kind}, s={sparsity}, seed {seed}): "
            f"{int((fast != core).sum())} entries differ"
        )


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("n_m", [(2, 4), (4, 8), (1, 4), (3, 4), (5, 6)])
def test_fast_wanda_mask_equals_functional_n_m(kind: str, n_m: tuple[int, int]) -> None:
    for seed in range(3):
        w, norms = mask_case(kind, seed)
        fast = _wanda_keep_mask(w, norms, 0.5, n_m)
        core = wanda_mask(w, norms, 0.5, n_m)
        assert torch.equal(fast, core), (
            f"fast Wanda mask != wanda_mask ({kind}, n_m={n_m}, seed {seed}): "
            f"{int((fast != core).sum())} entries differ"
        )


def test_fast_wanda_mask_with_overflowing_scores_equals_functional() -> None:
    # Scores that overflow to inf would tie with the retired picks of the N:M rounds.
    w, norms = mask_case("random", 0)
    w[1, :8] = 1e300
    norms[:4] = 1e10
    for n_m in (None, (2, 4)):
        fast = _wanda_keep_mask(w, norms, 0.5, n_m)
        core = wanda_mask(w, norms, 0.5, n_m)
        assert torch.equal(fast, core), f"fast Wanda mask != wanda_mask with inf scores (n_m={n_m})"


def test_fast_wanda_mask_breaks_ties_by_position_like_the_stable_sort() -> None:
    # By hand: row scores [1, 0, 1, 1, 0, 2] at s = 0.5 prune k = 3: both zeros, then the first 1.
    w = torch.tensor([[1.0, 0.0, -1.0, 1.0, 0.0, 2.0]])
    keep = _wanda_keep_mask(w, torch.ones(6), 0.5, None)
    assert keep.tolist() == [[False, False, True, True, False, True]], f"tie-breaking by position: {keep}"
    keep = _wanda_keep_mask(torch.tensor([[3.0, 3.0, 3.0, 3.0]]), torch.ones(4), 0.5, (2, 4))
    assert keep.tolist() == [[False, False, True, True]], f"2:4 on four equal scores: {keep}"


# ----------------------------------------------------------------------------
# bad input: raises before anything is modified
# ----------------------------------------------------------------------------

BAD_WANDA = [
    pytest.param({"sparsity": 1.0}, InvalidArgumentError, "sparsity", id="sparsity=1"),
    pytest.param({"sparsity": -0.1}, InvalidArgumentError, "sparsity", id="sparsity<0"),
    pytest.param({"sparsity": True}, InvalidArgumentError, "sparsity", id="sparsity-bool"),
    pytest.param({"n_m": (3, 5)}, InvalidArgumentError, "n_m", id="n_m-not-dividing"),
    pytest.param({"n_m": (4, 2)}, InvalidArgumentError, "n_m", id="n_m-n>=m"),
    pytest.param({"calibration": []}, EmptyInputError, "calibration", id="calib-empty"),
    pytest.param({"calibration": [[5, 9], []]}, EmptyInputError, "calibration", id="calib-empty-seq"),
    pytest.param({"calibration": [[5, 10_000]]}, InvalidArgumentError, "calibration", id="calib-oov"),
    pytest.param({"calibration": torch.ones(2, 3)}, InvalidArgumentError, "calibration", id="calib-float"),
    pytest.param(
        {"calibration": (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))},
        InvalidArgumentError,
        "attention_mask",
        id="calib-mask-shape",
    ),
    pytest.param({"calibration": ["a text"]}, InvalidArgumentError, "calibration", id="calib-text"),
    pytest.param({"calibration": None}, EmptyInputError, "calibration", id="calib-none"),
]


@pytest.mark.parametrize(("kwargs", "error", "names"), BAD_WANDA)
def test_wanda_bad_input_raises_before_modifying(kwargs: dict, error: type, names: str) -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    args = {"calibration": calibration_lists(), "sparsity": 0.5, "n_m": None, **kwargs}
    with pytest.raises(error, match=names):
        prune_wanda_(model, args["calibration"], args["sparsity"], args["n_m"])
    assert_unchanged(model, before, f"prune_wanda_({kwargs})")


@pytest.mark.parametrize("sparsity", [1.0, -0.5, 2, float("nan")])
def test_magnitude_bad_sparsity_raises_before_modifying(sparsity: float) -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(InvalidArgumentError, match="sparsity"):
        prune_magnitude_(model, sparsity)
    assert_unchanged(model, before, f"prune_magnitude_(s={sparsity})")


@pytest.mark.parametrize("prune", ["magnitude", "wanda"])
def test_non_finite_weight_in_last_block_raises_before_first_block_changes(prune: str) -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        get_layout(model).linears(1)["down_proj"].weight[0, 0] = float("nan")
    before = snapshot(model)
    run = {
        "magnitude": lambda: prune_magnitude_(model, 0.5),
        "wanda": lambda: prune_wanda_(model, calib, 0.5),
    }
    calib = calibration_lists()
    with pytest.raises(NonFiniteError, match="down_proj"):
        run[prune]()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) or torch.isnan(v).any() for k, v in before.items()), (
        f"{prune}: weights changed although a NaN weight was rejected"
    )


def test_non_finite_activation_raises_before_modifying_and_removes_hooks() -> None:
    model = tiny_model("llama")
    calib = calibration_lists()
    layout = get_layout(model)
    with torch.no_grad():
        layout.embedding.weight[calib[0][0]] = float("inf")
    before = snapshot(model)
    with pytest.raises(NonFiniteError, match=r"block 0|embed_tokens"):  # the up-front check names it
        prune_wanda_(model, calib, 0.5)
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"wanda with infinite activations modified {changed}"
    leftover = [i for i, b in enumerate(layout.blocks) if b._forward_pre_hooks or b._forward_hooks]
    assert not leftover, f"hooks left on blocks {leftover} after the error"


def test_pruning_a_quantized_model_is_refused() -> None:
    model = tiny_model("llama")
    quantize_llm_int8_(model)
    assert isinstance(get_layout(model).linears(0)["q_proj"], Int8LinearSim), "int8 did not replace q_proj"
    before = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match="Int8LinearSim"):
        prune_magnitude_(model, 0.5)
    with pytest.raises(UnsupportedModuleError, match="Int8LinearSim"):
        prune_wanda_(model, calibration_lists(), 0.5)
    assert_unchanged(model, before, "pruning an int8 model")


# -- magnitude mask by selection -------------------------------------------------


def sort_based_magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The former formula: the first ⌊s·numel⌋ of a stable ascending argsort of |w| are pruned."""
    k = int(sparsity * w.numel())
    mask = torch.ones(w.numel(), dtype=torch.bool)
    order = torch.argsort(w.abs().reshape(-1).to(torch.float64), stable=True)
    mask[order[:k]] = False
    return mask.reshape(w.shape)


def _magnitude_inputs() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(21)
    return [
        ("random 2-D", torch.randn(37, 53, generator=gen)),
        ("random 1-D float64", torch.randn(301, generator=gen, dtype=torch.float64)),
        ("random 3-D", torch.randn(4, 9, 11, generator=gen)),
        # Few distinct magnitudes (±, zeros): the threshold value is tied many times over.
        ("ties, 5 levels", torch.randint(-2, 3, (41, 29), generator=gen).float()),
        (
            "ties, signed pairs",
            torch.randint(0, 3, (64, 16), generator=gen).float()
            * (torch.randint(0, 2, (64, 16), generator=gen) * 2 - 1),
        ),
        ("all equal", torch.full((13, 17), -0.25)),
        ("zeros and -0.0", torch.tensor([[0.0, -0.0, 1.0, -0.0], [0.0, 2.0, -1.0, 0.0]])),
        ("bfloat16 ties", (torch.randn(33, 31, generator=gen) * 3).round().to(torch.bfloat16)),
    ]


@pytest.mark.parametrize("sparsity", [0.0, 0.01, 0.25, 0.5, 0.5001, 0.9, 0.999])
def test_magnitude_mask_by_selection_equals_the_stable_sort(sparsity: float) -> None:
    from refusal_core.functional import magnitude_mask

    for name, w in _magnitude_inputs():
        got = magnitude_mask(w, sparsity)
        ref = sort_based_magnitude_mask(w, sparsity)
        assert got.shape == w.shape, f"magnitude_mask({name}, {sparsity}) has shape {tuple(got.shape)}"
        assert got.dtype == torch.bool, f"magnitude_mask({name}, {sparsity}) has dtype {got.dtype}"
        bad = (got != ref).nonzero().tolist()
        assert not bad, f"magnitude_mask({name}, s={sparsity}) differs from the stable sort at {bad[:5]}"
