"""In-place entry points are all or nothing: bad input raises before the first write, and a
failure after it restores the model exactly (parameters, buffers, replaced submodules).

The property: for a NaN or ±inf placed in a drawn parameter (weight or bias — a bias is added
where the tiny config has none) of a drawn module of a drawn layer (or the embedding / final
norm) of each tiny family, every in-place entry point raises a ``RefusalCoreError`` and the
model's state dict is bit-identical afterwards, with the same module objects and types.
The later-failure tests poison nothing up front: the failure only shows once earlier blocks
have been compressed (non-finite calibration activations, a non-finite result, a backend
error), and the model must still come back bit for bit.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from refusal_core.aird import apply_aird_
from refusal_core.compression import (
    METHODS,
    CompressionConfig,
    _bnb_modules,
    compress_,
    pruning,
    quantization,
    register_method,
)
from refusal_core.compression._registry import unregister_method
from refusal_core.compression.bnb import quantize_bnb_int8_, quantize_bnb_nf4_
from refusal_core.compression.pruning import prune_magnitude_, prune_wanda_
from refusal_core.compression.quantization import quantize_awq_, quantize_llm_int8_
from refusal_core.errors import NonFiniteError, RefusalCoreError, UnsupportedArchitectureError
from refusal_core.interventions import orthogonalize_model_
from refusal_core.model import get_layout
from refusal_core.testing.tiny import AWQ_FAMILIES, ORTHOGONALIZABLE_FAMILIES, TINY_FAMILIES, tiny_model

CALIBRATION = [[10, 20, 30, 40, 50, 60], [70, 80, 90], [100, 110, 120, 130]]


# ----------------------------------------------------------------------------
# the model's exact state
# ----------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes, so NaN payloads and -0.0 compare exactly (torch.equal says NaN != NaN)."""
    flat = t.detach().reshape(-1).contiguous()
    return flat.view(torch.uint8).clone() if flat.numel() else flat.clone()


@dataclass
class State:
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], torch.Tensor]]
    modules: list[tuple[str, type, int]]  # name, type, id: replaced submodules show as other objects
    training: list[bool]


def state_of(model: nn.Module) -> State:
    return State(
        tensors={k: (v.dtype, tuple(v.shape), _bits(v)) for k, v in model.state_dict(keep_vars=True).items()},
        modules=[(n, type(m), id(m)) for n, m in model.named_modules()],
        training=[m.training for m in model.modules()],
    )


def assert_unchanged(model: nn.Module, before: State, op: str) -> None:
    after = state_of(model)
    assert after.modules == before.modules, (
        f"{op}: module tree changed: "
        f"{[(n, t.__name__) for (n, t, _), b in zip(after.modules, before.modules) if (n, t, _) != b][:5]}"
    )
    assert set(after.tensors) == set(before.tensors), (
        f"{op}: state-dict keys changed: added {sorted(set(after.tensors) - set(before.tensors))[:5]}, "
        f"removed {sorted(set(before.tensors) - set(after.tensors))[:5]}"
    )
    changed = [
        k
        for k, (dtype, shape, bits) in before.tensors.items()
        if after.tensors[k][:2] != (dtype, shape) or not torch.equal(after.tensors[k][2], bits)
    ]
    assert not changed, f"{op}: these tensors are not bit-identical afterwards: {changed[:8]}"
    assert after.training == before.training, f"{op}: train/eval flags changed"


# ----------------------------------------------------------------------------
# every in-place entry point
# ----------------------------------------------------------------------------


def _direction(model: nn.Module) -> torch.Tensor:
    d = get_layout(model).d_model
    return torch.linspace(-1.0, 1.0, d) + 0.1


EntryPoint = Callable[[nn.Module], Any]

ENTRY_POINTS: dict[str, EntryPoint] = {
    **{
        f"compress_[{name}]": functools.partial(
            lambda m, config: compress_(m, config, CALIBRATION), config=METHODS[name]
        )
        for name in METHODS
    },
    "prune_magnitude_": lambda m: prune_magnitude_(m, 0.5),
    "prune_wanda_": lambda m: prune_wanda_(m, CALIBRATION, 0.5),
    "quantize_llm_int8_": lambda m: quantize_llm_int8_(m),
    "quantize_awq_": lambda m: quantize_awq_(m, CALIBRATION, 8, 32, 4),
    "quantize_bnb_int8_": lambda m: quantize_bnb_int8_(m),
    "quantize_bnb_nf4_": lambda m: quantize_bnb_nf4_(m, blocksize=32),
    "apply_aird_": lambda m: apply_aird_(m, _direction(m), get_layout(m).n_layers - 1),
    "orthogonalize_model_": lambda m: orthogonalize_model_(m, _direction(m)),
}


@functools.cache
def _base_model(family: str) -> nn.Module:
    return tiny_model(family, n_layers=2, d_model=32, n_heads=2)


def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module holding a weight: per-layer linears and norms, embedding, final norm."""
    out = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "weight", None), torch.Tensor) and (
            ".layers." in f".{name}" or name.endswith(("embed_tokens", "model.norm"))
        ):
            out.append((name, module))
    return out


@pytest.mark.parametrize("family", TINY_FAMILIES)
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_bad_value_anywhere_raises_and_leaves_model_bit_identical(family: str, data: st.DataObject) -> None:
    model = copy.deepcopy(_base_model(family))
    targets = _targets(model)
    name, module = data.draw(st.sampled_from(targets), label="module")
    which = data.draw(st.sampled_from(["weight", "bias"]), label="parameter")
    if which == "bias" and not isinstance(module, nn.Linear):
        which = "weight"  # norms and embeddings have no bias to add
    if which == "bias" and module.bias is None:
        module.bias = nn.Parameter(torch.zeros(module.out_features))  # e.g. attention_bias=True
    param: torch.Tensor = getattr(module, which)
    where = data.draw(st.integers(0, param.numel() - 1), label=f"flat position in {name}.{which}")
    value = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label="bad value")
    with torch.no_grad():
        param.reshape(-1)[where] = value
    before = state_of(model)
    for op, call in ENTRY_POINTS.items():
        label = f"{op} on {family} with {value} at {name}.{which}[{where}]"
        with pytest.raises(RefusalCoreError) as info:
            call(model)
        # An operation the family cannot take at all (orthogonalization of a post-norm family,
        # AWQ of fused linears) may refuse for that reason first; either way nothing changes.
        allowed: tuple[type[Exception], ...] = (NonFiniteError,)
        if _unsupported(op, family):
            allowed = (NonFiniteError, UnsupportedArchitectureError)
        assert isinstance(info.value, allowed), (
            f"{label}: raised {type(info.value).__name__}: {info.value}; expected {allowed}"
        )
        assert_unchanged(model, before, label)


def _unsupported(op: str, family: str) -> bool:
    if op == "orthogonalize_model_":
        return family not in ORTHOGONALIZABLE_FAMILIES
    if "awq" in op:
        return family not in AWQ_FAMILIES
    return False


# ----------------------------------------------------------------------------
# failures after the first write are rolled back
# ----------------------------------------------------------------------------


def _overflowing_block_1() -> nn.Module:
    """A 3-layer llama, all finite, whose block 1 turns the calibration stream into inf/NaN.

    Its second norm's weight is 3e38 (finite float32): the MLP input overflows, so the
    activations entering block 2 are non-finite.
    """
    model = tiny_model("llama", n_layers=3, d_model=32, n_heads=2)
    with torch.no_grad():
        get_layout(model).blocks[1].post_attention_layernorm.weight.fill_(3e38)
    return model


@pytest.mark.parametrize("method", ["wanda", "wanda-2:4", "awq-w8"])
def test_nonfinite_calibration_activations_leave_the_model_unchanged(method: str) -> None:
    model = _overflowing_block_1()
    before = state_of(model)
    with pytest.raises(NonFiniteError, match="block 2"):
        compress_(model, METHODS[method], CALIBRATION)
    assert_unchanged(model, before, f"compress_[{method}] with activations overflowing in block 1")


def _fail_on_call(fn: Callable[..., Any], n: int) -> Callable[..., Any]:
    """``fn`` that raises NonFiniteError on its ``n``-th call (1-based), as a later block's check would."""
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            raise NonFiniteError(f"simulated failure on call {n}, after earlier modules were written")
        return fn(*args, **kwargs)

    return wrapper


#: method -> (module, attribute, call that fails): each a step of the real method that runs once
#: per linear (or scale group), failing in block 1 after block 0 was written
MID_WAY = {
    "llm-int8": (quantization.Int8LinearSim, "from_linear", 9),  # 7 linears per block
    "wanda": (pruning, "_wanda_keep_mask", 9),
    "awq-w8": (quantization, "apply_awq_scale_", 5),  # 4 scale groups per block
}


#: direct entry points (not through compress_): entry point -> (module, attribute, failing call)
DIRECT_MID_WAY = {
    "prune_wanda_": (pruning, "_wanda_keep_mask", 9),
    "prune_magnitude_": (pruning, "magnitude_mask", 9),
    "quantize_llm_int8_": (quantization.Int8LinearSim, "from_linear", 9),
    "quantize_awq_": (quantization, "apply_awq_scale_", 5),
    "quantize_bnb_int8_": (_bnb_modules, "int8_from_weight", 9),
}


@pytest.mark.parametrize("entry", sorted(DIRECT_MID_WAY))
def test_direct_entry_point_failing_in_block_1_restores_the_model(
    entry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, attribute, n = DIRECT_MID_WAY[entry]
    monkeypatch.setattr(owner, attribute, _fail_on_call(getattr(owner, attribute), n))
    model = copy.deepcopy(_base_model("qwen2"))
    before = state_of(model)
    with pytest.raises(NonFiniteError, match="simulated failure"):
        ENTRY_POINTS[entry](model)
    assert_unchanged(model, before, f"{entry} failing in block 1")


@pytest.mark.parametrize("method", sorted(MID_WAY))
def test_failure_in_block_1_after_block_0_was_written_restores_the_model(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10's case: LLM.int8 replaced layer 0 by Int8LinearSim, then raised on layer 1."""
    owner, attribute, n = MID_WAY[method]
    monkeypatch.setattr(owner, attribute, _fail_on_call(getattr(owner, attribute), n))
    model = copy.deepcopy(_base_model("qwen2"))
    before = state_of(model)
    with pytest.raises(NonFiniteError, match="simulated failure"):
        compress_(model, METHODS[method], CALIBRATION)
    assert_unchanged(model, before, f"compress_[{method}] failing in block 1")


@dataclass(frozen=True)
class _ExplodingConfig(CompressionConfig):
    """Test-only method: edits layer 0 every way a method can, then fails (or writes NaN)."""

    mode: str = "raise"


@pytest.fixture
def exploding_method():
    @register_method(
        _ExplodingConfig,
        "exploding",
        needs_calibration=False,
        kind="pruning",
        storage="dense",
        requantize="keep-zeros",
    )
    def _apply(model, config, calibration, batch_size, progress):
        layout = get_layout(model)
        attn = layout.attn(0)
        with torch.no_grad():
            first, second = list(layout.linears(0).values())[:2]  # q/k, or Phi-3's fused qkv and o
            first.weight.zero_()  # in place
            layout.embedding.weight.data = layout.embedding.weight.data.double()  # dtype swap
            attn.o_proj = nn.Linear(attn.o_proj.in_features, attn.o_proj.out_features)  # replaced
            second.bias = nn.Parameter(torch.ones(second.out_features))
            layout.blocks[0].register_buffer("extra", torch.ones(3))  # a new buffer
            model.train()
            if config.mode == "nan":
                layout.linears(1)["v_proj"].weight[0, 0] = math.nan
                return {}
        raise RuntimeError("backend failed half-way")

    yield
    unregister_method(_ExplodingConfig)


@pytest.mark.usefixtures("exploding_method")
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_failure_after_writes_restores_params_buffers_and_submodules(family: str) -> None:
    model = copy.deepcopy(_base_model(family))
    before = state_of(model)
    with pytest.raises(RuntimeError, match="half-way"):
        compress_(model, _ExplodingConfig("raise"))
    assert_unchanged(model, before, f"compress_ raising after writes ({family})")


@pytest.mark.usefixtures("exploding_method")
def test_nonfinite_result_is_not_committed() -> None:
    model = copy.deepcopy(_base_model("llama"))
    before = state_of(model)
    with pytest.raises(NonFiniteError, match="after compression"):
        compress_(model, _ExplodingConfig("nan"))
    assert_unchanged(model, before, "compress_ producing a NaN weight")


def test_successful_compression_is_committed() -> None:
    """The transaction does not undo a good run: the pruned zeros stay."""
    model = copy.deepcopy(_base_model("llama"))
    record = compress_(model, METHODS["magnitude"])
    zeros = float((get_layout(model).linears(0)["q_proj"].weight == 0).float().mean())
    assert record.sparsity == 0.5, f"compress_[magnitude]: record sparsity {record.sparsity}, expected 0.5"
    assert zeros == 0.5, f"compress_[magnitude]: q_proj zero fraction {zeros} after commit, expected 0.5"


# ----------------------------------------------------------------------------
# the snapshot spilled to a file (large models): the same guarantee, no copy in memory
# ----------------------------------------------------------------------------


@pytest.fixture
def spill_everything(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> dict[str, Any]:
    """Every model counts as large; the spy records each snapshot and the files present in its folder."""
    from refusal_core.compression import _transaction

    monkeypatch.setenv("REFUSAL_CORE_SNAPSHOT_SPILL_BYTES", "0")
    monkeypatch.setattr(_transaction.tempfile, "tempdir", str(tmp_path))
    seen: dict[str, Any] = {"snapshots": []}
    real_init = _transaction.ModelSnapshot.__init__

    def spy(self: Any, model: nn.Module, spill_dir: Any = None) -> None:
        real_init(self, model, spill_dir)
        seen["snapshots"].append(self)
        seen["files_during"] = sorted(p.name for p in tmp_path.rglob("*.pt"))

    monkeypatch.setattr(_transaction.ModelSnapshot, "__init__", spy)
    seen["tmp"] = tmp_path
    return seen


@pytest.mark.usefixtures("exploding_method")
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_spilled_snapshot_restores_params_buffers_and_submodules(
    family: str, spill_everything: dict[str, Any]
) -> None:
    model = copy.deepcopy(_base_model(family))
    before = state_of(model)
    with pytest.raises(RuntimeError, match="half-way"):
        compress_(model, _ExplodingConfig("raise"))
    assert_unchanged(model, before, f"compress_ raising after writes, snapshot spilled to disk ({family})")
    (snap,) = spill_everything["snapshots"]
    assert snap._data == {}, "a spilled snapshot must hold no tensor copies in memory"
    files = spill_everything["files_during"]
    assert len(files) == 1, f"one snapshot file while the transaction runs: {files}"
    leftovers = list(spill_everything["tmp"].rglob("*"))
    assert leftovers == [], f"the snapshot folder must be removed when the transaction ends: {leftovers}"


@pytest.mark.parametrize("method", sorted(MID_WAY))
def test_spilled_snapshot_restores_a_failure_in_block_1(
    method: str, monkeypatch: pytest.MonkeyPatch, spill_everything: dict[str, Any]
) -> None:
    owner, attribute, n = MID_WAY[method]
    monkeypatch.setattr(owner, attribute, _fail_on_call(getattr(owner, attribute), n))
    model = copy.deepcopy(_base_model("qwen2"))
    before = state_of(model)
    with pytest.raises(NonFiniteError, match="simulated failure"):
        compress_(model, METHODS[method], CALIBRATION)
    assert_unchanged(model, before, f"compress_[{method}] failing in block 1, snapshot spilled to disk")
    assert spill_everything["snapshots"][0]._data == {}, "the spilled snapshot holds no copies in memory"


def test_small_models_are_snapshotted_in_memory(spill_everything: dict[str, Any], monkeypatch: Any) -> None:
    monkeypatch.setenv("REFUSAL_CORE_SNAPSHOT_SPILL_BYTES", str(1 << 40))
    model = copy.deepcopy(_base_model("llama"))
    compress_(model, METHODS["magnitude"])
    (snap,) = spill_everything["snapshots"]
    assert snap._data, "below the threshold the snapshot holds its copies in memory"
    assert snap._spill_file is None, "below the threshold nothing is written to disk"
