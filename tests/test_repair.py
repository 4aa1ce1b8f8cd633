"""The one repair step (refusal_core.repair.repair_) and the aird command that goes through it.

Every compression method's storage invariant is checked here with an
independent reading of the weights (zero masks compared entry by entry,
distinct values counted per group with ``torch.unique``, module types), on
the model in memory and on the checkpoint that plain transformers loads back.
The bug tests at the end (aird on awq-w4, on the quick start's Wanda, on a
saved bitsandbytes checkpoint; identity after a middle-layer edit) name the
issue they come from and import nothing that did not exist before the fix at
module level, so they fail, not error, on the code they were written against.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from refusal_core.aird import AirdConfig
from refusal_core.checkpoint import read_checkpoint_record, save_checkpoint
from refusal_core.cli import main
from refusal_core.compression import METHODS, compress_, method_config, method_spec
from refusal_core.compression.bnb import bnb_available
from refusal_core.errors import InvalidArgumentError, RefusalCoreError, UnsupportedModuleError
from refusal_core.model import get_layout, model_identity
from refusal_core.testing.tiny import tiny_model, tiny_tokenizer

CALIBRATION = [[1, 5, 9, 12, 40, 41, 7, 3, 2, 8], [30, 31, 200, 201, 7, 9, 4]] * 2
LAYER = 1
#: A strength the rounding cannot erase entirely on a tiny model (the paper's α is tiny there).
STRONG = AirdConfig(gain_attn=3.0, gain_mlp=3.0)


def _available(name: str) -> bool:
    return method_spec(name).available()  # the registry knows every method's extra


#: Every method whose repair keeps its storage (a ``requantize="refuse"`` method, the K-quants, is
#: refused up front instead: tests/llamacpp checks that).
ALL_METHODS = [
    pytest.param(n, marks=pytest.mark.skipif(not _available(n), reason=f"{n}: its extra is not installed"))
    for n in METHODS
    if method_spec(n).requantize != "refuse"
]


def _writers(model: nn.Module, layer: int = LAYER) -> dict[str, nn.Module]:
    layout = get_layout(model)
    return {"o_proj": layout.attn_out(layer), "down_proj": layout.mlp_out(layer)}


def _float_weight(module: nn.Module) -> torch.Tensor:
    """What the module computes with, read without refusal_core's scheme adapters."""
    if hasattr(module, "q") and hasattr(module, "scale"):  # Int8LinearSim: q · row scale
        return module.q.double() * module.scale.double().unsqueeze(1)
    weight: Any = module.weight
    if weight.dtype == torch.int8:  # bitsandbytes int8: codes · row absmax / 127
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = module.state.SCB
        return weight.double() * scb.double().unsqueeze(1) / 127.0
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bf

        return bf.dequantize_4bit(weight.data, weight.quant_state).double()
    return weight.detach().double()


def _max_levels_per_group(w: torch.Tensor, group_size: int) -> int:
    """Most distinct values in any group of ``group_size`` consecutive inputs of a row (torch.unique)."""
    rows = w.detach().reshape(-1, group_size)
    return max(int(torch.unique(row).numel()) for row in rows)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _compressed(name: str, d_model: int = 64) -> nn.Module:
    model = tiny_model("llama", d_model=d_model, n_layers=3)
    compress_(model, method_config(name), CALIBRATION)
    return model


def _direction(d: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------
# every method keeps its storage, in memory and in the checkpoint
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_METHODS)
def test_repair_keeps_every_methods_storage_and_the_checkpoint_loads(name: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from refusal_core.compression import method_spec
    from refusal_core.repair import repair_

    spec = method_spec(name)
    model = _compressed(name)
    before = {k: _float_weight(m) for k, m in _writers(model).items()}
    types_before = {k: type(m) for k, m in _writers(model).items()}
    untouched = {k: v for k, v in _state(model).items() if f"layers.{LAYER}." not in k}
    base = model_identity(tiny_model("llama", d_model=64, n_layers=3))

    rec = repair_(model, _direction(64), LAYER, STRONG, method=name)

    after = {k: _float_weight(m) for k, m in _writers(model).items()}
    assert rec.repair is not None, f"{name}: repair_ fills the record's repair section"
    assert rec.repair["storage"] == spec.storage, f"{name}: record format {rec.repair['storage']!r}"
    for k in before:
        assert not torch.equal(before[k], after[k]), f"{name}: the repair of {k} was rounded away entirely"
        assert type(_writers(model)[k]) is types_before[k], f"{name}: {k} changed module type"
        if spec.kind == "pruning":
            assert torch.equal(before[k] == 0, after[k] == 0), f"{name}: {k}'s zero pattern changed"
        if spec.requantize == "weight-groups":
            cfg: Any = method_config(name)
            gs = min(cfg.group_size, after[k].shape[1])
            levels = _max_levels_per_group(after[k], gs)
            assert levels <= 2**cfg.w_bit, f"{name}: {k} has {levels} values in a group of {gs}"
        if spec.requantize == "gguf-blocks":
            bits = {"gguf-q8_0": 8, "gguf-q5_0": 5, "gguf-q5_1": 5, "gguf-q4_0": 4, "gguf-q4_1": 4}[name]
            levels = _max_levels_per_group(after[k], 32)  # llama.cpp's blocks: 32 inputs of a row
            assert levels <= 2**bits, f"{name}: {k} has {levels} values in a block of 32 (> 2^{bits})"
        if spec.requantize == "module-scheme" and hasattr(_writers(model)[k], "q"):
            q = _writers(model)[k].q
            assert q.dtype == torch.int8, f"{name}: {k} holds {q.dtype} codes"
    state = _state(model)
    for k, v in untouched.items():
        assert torch.equal(state[k], v), f"{name}: {k} (outside layer {LAYER}) changed"

    out = save_checkpoint(
        model, tiny_tokenizer(), tmp_path / "ck", record={"method": f"{name}+aird", "base_identity": base}
    )
    doc = read_checkpoint_record(out)
    assert doc is not None, f"{name}: the checkpoint has a record"
    assert doc["format"] == spec.storage, f"{name}: checkpoint format {doc['format']!r}, not {spec.storage!r}"
    loaded = AutoModelForCausalLM.from_pretrained(out).requires_grad_(False)
    for k, m in _writers(loaded).items():
        w = _float_weight(m)
        err = float((w - after[k]).abs().max())
        assert err <= 1e-6 * float(after[k].abs().max()), f"{name}: reloaded {k} differs by {err:.3g}"


@pytest.mark.parametrize("name", ["magnitude", "wanda", "wanda-2:4"])
def test_dense_edit_of_a_pruned_model_states_the_sparsity_lost(name: str) -> None:
    from refusal_core.repair import repair_

    model = _compressed(name)
    zeros_before = {k: float((_float_weight(m) == 0).double().mean()) for k, m in _writers(model).items()}
    rec = repair_(model, _direction(64), LAYER, STRONG, method=name, dense=True)
    assert rec.repair is not None
    for k, m in _writers(model).items():
        zeros_after = float((_float_weight(m) == 0).double().mean())
        assert zeros_after < zeros_before[k], f"{name}: the dense edit filled {k}'s zeros"
        lost = rec.repair["sparsity_lost"][k]
        assert lost == pytest.approx(zeros_before[k] - zeros_after, abs=1e-12), (
            f"{name}: record says {k} lost {lost}, measured {zeros_before[k] - zeros_after}"
        )
    assert rec.repair["rule"] == "dense-edit"


# ----------------------------------------------------------------------------
# refusals happen before anything changes; failures leave the model as it was
# ----------------------------------------------------------------------------


def _refused_unchanged(model: nn.Module, error: type[Exception], match: str, **kw: Any) -> None:
    from refusal_core.repair import repair_

    layout = get_layout(model)
    state = _state(model)
    types = [type(m) for _, m in model.named_modules()]
    with pytest.raises(error, match=match):
        repair_(model, _direction(layout.d_model), LAYER, STRONG, **kw)
    after = _state(model)
    assert all(torch.equal(v, after[k]) for k, v in state.items()), f"{kw}: refused but changed the model"
    assert [type(m) for _, m in model.named_modules()] == types, f"{kw}: a module was replaced"


def test_dense_on_a_quantized_model_is_refused_up_front() -> None:
    _refused_unchanged(
        _compressed("awq-w4"), InvalidArgumentError, "not pruning", method="awq-w4", dense=True
    )


def test_a_method_the_model_does_not_carry_is_refused_up_front() -> None:
    plain = tiny_model("llama", d_model=64, n_layers=3)
    _refused_unchanged(plain, UnsupportedModuleError, "float nn.Linear", method="llm-int8")
    # a float model that is not on the 4-bit grid is not an awq-w4 model
    _refused_unchanged(plain, UnsupportedModuleError, "not on its method's grid", method="awq-w4")
    _refused_unchanged(_compressed("llm-int8"), UnsupportedModuleError, "int8-sim", method="magnitude")


def test_unknown_method_and_refuse_rule_are_one_line_errors() -> None:
    from dataclasses import dataclass

    from refusal_core.compression import CompressionConfig, register_method
    from refusal_core.compression._registry import unregister_method

    _refused_unchanged(
        _compressed("magnitude"), InvalidArgumentError, "unknown compression method", method="x"
    )

    @dataclass(frozen=True)
    class KQuantConfig(CompressionConfig):
        pass

    register_method(
        KQuantConfig,
        "k-quant",
        needs_calibration=False,
        kind="simulation",
        storage="dequantized-simulation",
        requantize="refuse",
        repair_note="quantizing to Q4_K needs llama.cpp",
    )(lambda *a, **k: {})
    try:
        _refused_unchanged(
            tiny_model("llama", d_model=64, n_layers=3),
            UnsupportedModuleError,
            "needs llama.cpp",
            method="k-quant",
        )
    finally:
        unregister_method(KQuantConfig)


@pytest.mark.parametrize("name", ["magnitude", "llm-int8", "awq-w4"])
def test_a_failure_after_the_edit_restores_the_block_exactly(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import refusal_core.repair as repair

    model = _compressed(name)
    state = _state(model)
    modules = dict(_writers(model))

    def failing_check(*args: Any, **kwargs: Any) -> None:
        raise RefusalCoreError("injected failure after the edit")

    monkeypatch.setattr(repair, "_check_storage", failing_check)
    with pytest.raises(RefusalCoreError, match="injected"):
        repair.repair_(model, _direction(64), LAYER, STRONG, method=name)
    after = _state(model)
    changed = [k for k, v in state.items() if not torch.equal(v, after[k])]
    assert not changed, f"{name}: a failed repair left {changed} changed"
    assert all(_writers(model)[k] is m for k, m in modules.items()), (
        f"{name}: a failed repair swapped modules"
    )


# ----------------------------------------------------------------------------
# identity (bug d: three probed tensors missed a middle-layer edit)
# ----------------------------------------------------------------------------


def test_identity_changes_when_any_single_weight_changes() -> None:
    model = tiny_model("llama", n_layers=4)
    ident = model_identity(model)
    for name, p in model.named_parameters():
        with torch.no_grad():
            old = p.view(-1)[0].item()
            p.view(-1)[0] = old + 0.5
        assert model_identity(model) != ident, f"identity unchanged after editing one entry of {name}"
        with torch.no_grad():
            p.view(-1)[0] = old
    assert model_identity(model) == ident, "identity is a function of the weights (restored: same identity)"


def test_identity_changes_after_aird_in_a_middle_layer() -> None:
    from refusal_core.aird import apply_aird_
    from refusal_core.directions import same_model

    model = tiny_model("llama", n_layers=4)
    before = model_identity(model)
    apply_aird_(model, _direction(32), 2, STRONG)
    assert model_identity(model) != before, "AIRD at layer 2 of 4 left the model identity unchanged"
    assert not same_model(before, model), "same_model calls the repaired model its own base"


# ----------------------------------------------------------------------------
# the aird command (bugs a, b, c of issue 15)
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_direction(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("direction") / "d"
    code = main(
        [
            "extract",
            "--model",
            "toy",
            "--n",
            "8",
            "--select",
            "--n-val",
            "4",
            "--out",
            str(d),
            "--no-progress",
        ]
    )
    assert code == 0, "extract --select on the toy"
    return str(d)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([*argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _compress(tmp: Path, method: str, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp / f"c-{method.replace(':', '_')}"
    code, _, err = _cli(
        ["compress", "--model", "toy", "--method", method, "--n-calibration", "8", "--out", str(out)], capsys
    )
    assert code == 0, f"compress {method}: {err}"
    return out


def _aird(model: Path, direction: str, out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    code, _stdout, err = _cli(
        ["aird", "--model", str(model), "--direction", direction, *extra, "--out", str(out)], capsys
    )
    assert code == 0, f"aird on {model.name}: exit {code}: {err}"
    return err


def _source_layer(direction: str) -> int:
    from refusal_core.selection import SelectionResult

    return int(SelectionResult.load(Path(direction) / "selection").source[0])


def _hf(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).requires_grad_(False)


def test_bug_a_aird_on_awq_w4_stays_on_the_4bit_grid(
    tmp_path: Path, toy_direction: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = _compress(tmp_path, "awq-w4", capsys)
    out = tmp_path / "a"
    _aird(ck, toy_direction, out, capsys, "--gain-attn", "3", "--gain-mlp", "3")
    doc = read_checkpoint_record(out)
    assert doc is not None, "aird wrote a checkpoint record"
    assert doc["format"] == "dequantized-simulation", f"the repaired AWQ model is recorded {doc['format']!r}"
    layer = _source_layer(toy_direction)
    compressed, repaired = _hf(ck), _hf(out)
    for k, m in _writers(repaired, layer).items():
        w = m.weight.detach()
        gs = min(128, w.shape[1])
        levels = _max_levels_per_group(w, gs)
        assert levels <= 16, (
            f"aird on awq-w4: {k}[{layer}] has {levels} distinct values in a group of {gs} (> 16)"
        )
        assert not torch.equal(w, _writers(compressed, layer)[k].weight), f"aird on awq-w4 did not change {k}"


def test_bug_b_aird_on_the_quick_start_wanda_keeps_the_zero_pattern(
    tmp_path: Path, toy_direction: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = _compress(tmp_path, "wanda", capsys)
    layer = _source_layer(toy_direction)
    out = tmp_path / "a"
    _aird(ck, toy_direction, out, capsys)
    pruned, repaired = _hf(ck), _hf(out)
    for k, m in _writers(repaired, layer).items():
        w0, w1 = _writers(pruned, layer)[k].weight, m.weight
        assert torch.equal(w0 == 0, w1 == 0), (
            f"aird on wanda: {k}[{layer}] sparsity {float((w0 == 0).double().mean()):.3f} -> "
            f"{float((w1 == 0).double().mean()):.3f}, pattern changed"
        )
        assert not torch.equal(w0, w1), f"aird on wanda did not change {k}[{layer}]"
    # --dense: the paper's edit, and the command says what it cost
    err = _aird(ck, toy_direction, tmp_path / "dense", capsys, "--dense")
    assert "sparsity lost" in err, f"--dense must say the sparsity lost: {err!r}"
    assert "down_proj" in err, f"--dense names the module that lost its zeros: {err!r}"
    w = _writers(_hf(tmp_path / "dense"), layer)["down_proj"].weight
    assert float((w == 0).double().mean()) < 0.01, "--dense edits every entry of down_proj"


@pytest.mark.skipif(not bnb_available(), reason="bitsandbytes is not installed")
def test_bug_c_aird_on_a_saved_bitsandbytes_int8_checkpoint(
    tmp_path: Path, toy_direction: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = _compress(tmp_path, "bnb-int8", capsys)
    out = tmp_path / "a"
    _aird(ck, toy_direction, out, capsys, "--gain-attn", "3", "--gain-mlp", "3")
    doc = read_checkpoint_record(out)
    assert doc is not None, "aird wrote a checkpoint record"
    assert doc["format"] == "bitsandbytes-int8", f"the repair is recorded {doc['format']!r}"
    layer = _source_layer(toy_direction)
    repaired = _hf(out)
    for k, m in _writers(repaired, layer).items():
        assert m.weight.dtype == torch.int8, f"{k}[{layer}] reloads as {m.weight.dtype}, not int8 codes"

    # The same checkpoint saved by the user without refusal_core's record names no base: the command
    # says the direction is foreign and how to override, in one line and before writing anything.
    user = tmp_path / "user-saved"
    shutil.copytree(ck, user)
    (user / "refusal_core.json").unlink()
    code, _, err = _cli(
        ["aird", "--model", str(user), "--direction", toy_direction, "--out", str(tmp_path / "u")], capsys
    )
    lines = [ln for ln in err.splitlines() if ln.startswith("refusal-core aird: error:")]
    assert code == 2, f"a record-less checkpoint with the base's direction: exit {code}: {err}"
    assert len(lines) == 1, f"one error line: {err}"
    assert "--allow-foreign-direction" in lines[0], f"the refusal names the override: {err}"
    assert "than the base the target derives from" not in lines[0], (
        f"the checkpoint is not its own base: {err}"
    )
    assert not (tmp_path / "u").exists(), "nothing is written when the direction is refused"
    _aird(user, toy_direction, tmp_path / "u", capsys, "--allow-foreign-direction")
    doc = read_checkpoint_record(tmp_path / "u")
    assert doc is not None
    assert doc["format"] == "bitsandbytes-int8"


def test_aird_refuses_dense_on_a_quantized_checkpoint_before_loading(
    tmp_path: Path, toy_direction: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ck = _compress(tmp_path, "llm-int8", capsys)
    import refusal_core.model

    def no_load(*a: Any, **k: Any) -> Any:
        raise AssertionError("the model was loaded; --dense on llm-int8 must be refused first")

    monkeypatch.setattr(refusal_core.model, "load_model", no_load)
    code, _, err = _cli(
        ["aird", "--model", str(ck), "--direction", toy_direction, "--dense", "--out", str(tmp_path / "a")],
        capsys,
    )
    assert code == 2, err
    assert "--dense" in err, err
    assert "not one" in err, f"says the model is not pruned: {err}"
    assert json.dumps(err).count("\\n") == 1, f"one line: {err!r}"


DEFAULT_METHODS = ("magnitude", "wanda", "wanda-2:4", "llm-int8", "awq-w8", "awq-w4")


@pytest.mark.parametrize("name", DEFAULT_METHODS)
def test_aird_command_keeps_each_default_methods_storage(
    name: str, tmp_path: Path, toy_direction: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from refusal_core.study import DEFAULT_METHODS as STUDY_DEFAULTS

    assert name in STUDY_DEFAULTS, f"{name} is one of the study's default methods"
    prunes = name in ("magnitude", "wanda", "wanda-2:4")  # written here, not read from the table
    storage = "dense" if prunes else "dequantized-simulation"
    ck = _compress(tmp_path, name, capsys)
    out = tmp_path / "a"
    _aird(ck, toy_direction, out, capsys, "--gain-attn", "3", "--gain-mlp", "3")
    doc = read_checkpoint_record(out)
    assert doc is not None, f"aird on {name} wrote a record"
    assert doc["format"] == storage, f"aird on {name}: recorded {doc['format']!r}, not {storage!r}"
    assert doc["method"] == f"{name}+aird", f"aird on {name}: the record names {doc['method']!r}"
    layer = _source_layer(toy_direction)
    compressed, repaired = _hf(ck), _hf(out)  # both load with plain from_pretrained
    for k, m in _writers(repaired, layer).items():
        w0, w1 = _writers(compressed, layer)[k].weight.detach(), m.weight.detach()
        assert not torch.equal(w0, w1), f"aird on {name}: {k}[{layer}] unchanged"
        if prunes:
            assert torch.equal(w0 == 0, w1 == 0), f"aird on {name}: {k}[{layer}]'s zero pattern changed"
        elif name == "llm-int8":
            # saved as q · scale with one absmax/127 scale per row: every entry an integer multiple of it
            scale = w1.double().abs().amax(dim=1, keepdim=True) / 127
            codes = w1.double() / scale
            off = float((codes - codes.round()).abs().max())
            assert off < 1e-3, (
                f"aird on llm-int8: {k}[{layer}] is not int8 codes times a row scale ({off:.2e})"
            )
        else:
            bits = int(name.removeprefix("awq-w"))
            gs = min(128, w1.shape[1])
            levels = _max_levels_per_group(w1, gs)
            assert levels <= 2**bits, f"aird on {name}: {k}[{layer}] has {levels} values per group of {gs}"


def test_study_refuses_a_method_whose_extra_is_missing_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import refusal_core.model
    from refusal_core.compression import llmc
    from refusal_core.study import StudyConfig, run_study

    def no_load(*a: Any, **k: Any) -> Any:
        raise AssertionError("a model was loaded before the missing extra was reported")

    monkeypatch.setattr(llmc, "llmc_available", lambda: False)
    monkeypatch.setattr(refusal_core.model, "load_model", no_load)
    monkeypatch.setattr("refusal_core.study.run.load_model", no_load, raising=False)
    monkeypatch.setattr("refusal_core.bench.load_model", no_load, raising=False)
    config = StudyConfig(methods=("magnitude", "llmc-wanda"))  # a config may name it (run elsewhere)
    with pytest.raises(InvalidArgumentError, match="llmc-wanda needs the 'llmc' extra"):
        run_study(config, tmp_path / "study", progress=False)
    assert not (tmp_path / "study").exists(), "nothing is written when a method is unavailable"


def test_a_model_from_another_transformers_quantizer_is_refused_before_any_change() -> None:
    from types import SimpleNamespace

    model = tiny_model("llama", d_model=64, n_layers=3)
    # What transformers attaches to a model it loaded through, e.g., its GPTQ quantizer.
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gptq"))
    _refused_unchanged(model, UnsupportedModuleError, "cannot re-quantize gptq weights")


def test_awq_on_a_moe_block_is_refused_with_the_reason() -> None:
    model = tiny_model("qwen2_moe")
    compress_(model, method_config("awq-w4"), CALIBRATION)
    _refused_unchanged(model, UnsupportedModuleError, "stores no scales", method="awq-w4")


@pytest.mark.parametrize("name", ["magnitude"])
def test_repair_of_a_moe_block_keeps_every_experts_storage(name: str) -> None:
    from refusal_core.repair import repair_

    model = tiny_model("qwen2_moe")
    compress_(model, method_config(name), CALIBRATION)
    layout = get_layout(model)
    d = layout.d_model
    w = next(w for w in layout.writers(LAYER) if w.stacked)
    experts0 = w.weight.detach().clone()  # [E, d, ff]
    rec = repair_(model, _direction(d), LAYER, STRONG, method=name)
    experts1 = w.weight.detach()
    assert rec.repair is not None
    assert any(k.startswith(f"{w.name}[") for k in rec.modules), f"{name}: AIRD edited the routed experts"
    for e in range(experts0.shape[0]):
        assert not torch.equal(experts0[e], experts1[e]), f"{name}: expert {e} unchanged"
        if name == "magnitude":
            assert torch.equal(experts0[e] == 0, experts1[e] == 0), f"{name}: expert {e}'s zeros changed"
        else:
            gs = min(128, experts1.shape[2])
            levels = _max_levels_per_group(experts1[e], gs)
            assert levels <= 16, f"{name}: expert {e} has {levels} values in a group of {gs}"
