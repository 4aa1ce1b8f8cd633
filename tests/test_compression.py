"""The compression entry point: configs, the method registry, CompressionRecord save/load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from refusal_core.artifacts import save_artifact
from refusal_core.compression import (
    METHODS,
    AwqConfig,
    CompressionConfig,
    CompressionRecord,
    Int8Config,
    Int8LinearSim,
    MagnitudeConfig,
    WandaConfig,
    compress_,
    config_from_dict,
    config_to_dict,
    method_config,
    register_method,
)
from refusal_core.compression._registry import unregister_method
from refusal_core.errors import ArtifactError, EmptyInputError, InvalidArgumentError
from refusal_core.model import get_layout, model_identity
from refusal_core.testing.tiny import tiny_model


def calibration_lists(n: int = 5, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(8, 600, (int(k),), generator=g).tolist()
        for k in torch.randint(3, 10, (n,), generator=g)
    ]


#: The methods the reference implements (the backends add bnb-* and llmc-* / sparsegpt-* names).
REFERENCE_METHODS = ["magnitude", "wanda", "wanda-2:4", "wanda-4:8", "llm-int8", "awq-w8", "awq-w4"]


def test_methods_table_names_the_documented_methods() -> None:
    assert list(METHODS)[: len(REFERENCE_METHODS)] == REFERENCE_METHODS, f"METHODS names: {list(METHODS)}"
    for backend in ("bnb-int8", "bnb-nf4", "llmc-wanda", "sparsegpt-50", "llmc-awq-w4"):
        assert backend in METHODS, f"backend method {backend!r} is not offered by name"
    assert METHODS["wanda-2:4"] == WandaConfig(n_m=(2, 4)), "wanda-2:4 must be WandaConfig(n_m=(2, 4))"
    assert METHODS["awq-w4"] == AwqConfig(w_bit=4), "awq-w4 must be AwqConfig(w_bit=4)"
    with pytest.raises(TypeError):
        METHODS["new"] = MagnitudeConfig()  # type: ignore[index]


def test_unknown_method_name_lists_the_valid_ones() -> None:
    with pytest.raises(InvalidArgumentError, match="sparsegpt") as info:
        method_config("sparsegpt")
    for name in METHODS:
        assert name in str(info.value), f"the error for an unknown method does not list {name!r}"


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (MagnitudeConfig, {"sparsity": 1.0}, "sparsity"),
        (WandaConfig, {"sparsity": -0.2}, "sparsity"),
        (WandaConfig, {"n_m": (4, 4)}, "n_m"),
        (WandaConfig, {"n_m": (2,)}, "n_m"),
        (Int8Config, {"threshold": -1.0}, "threshold"),
        (AwqConfig, {"w_bit": 16}, "w_bit"),
        (AwqConfig, {"group_size": 0}, "group_size"),
        (AwqConfig, {"grid": 0}, "grid"),
        (AwqConfig, {"clip": "yes"}, "clip"),
    ],
)
def test_configs_validate_their_fields(cls: type, kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        cls(**kwargs)


@pytest.mark.parametrize("config", [*METHODS.values(), AwqConfig(clip=True, zero_point=False)])
def test_config_dict_round_trip(config: CompressionConfig) -> None:
    back = config_from_dict(config_to_dict(config))
    assert back == config, f"config round trip: {config} came back as {back}"
    assert isinstance(hash(back), int), "configs are frozen dataclasses and must be hashable"


def test_config_from_dict_rejects_unknown_type_and_fields() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown config type"):
        config_from_dict({"type": "GptqConfig"})
    with pytest.raises(InvalidArgumentError, match="unknown fields"):
        config_from_dict({"type": "MagnitudeConfig", "sparsity": 0.5, "blocksize": 3})


@pytest.mark.parametrize("name", REFERENCE_METHODS)
def test_compress_applies_each_method_and_records_it(name: str) -> None:
    model = tiny_model("llama")
    identity = model_identity(model)
    config = METHODS[name]
    record = compress_(model, config, calibration_lists())
    assert record.config == config, f"{name}: record.config {record.config} != {config}"
    assert record.identity_before == identity, f"{name}: identity_before is not the uncompressed model's"
    assert len(record.module_sparsity) == 14, f"{name}: sparsity for {len(record.module_sparsity)} modules"
    layout = get_layout(model)
    if isinstance(config, (MagnitudeConfig, WandaConfig)):
        expected = config.n_m[0] / config.n_m[1] if isinstance(config, WandaConfig) and config.n_m else 0.5
        assert abs(record.sparsity - expected) < 1e-12, (
            f"{name}: sparsity {record.sparsity}, expected {expected}"
        )
        assert record.quantization_error == {}, f"{name}: pruning recorded quantization errors"
    else:
        assert len(record.quantization_error) == 14, (
            f"{name}: errors for {len(record.quantization_error)} modules"
        )
        assert all(0 < e < 0.2 for e in record.quantization_error.values()), (
            f"{name}: rounding errors {sorted(record.quantization_error.values())[-3:]} outside (0, 0.2)"
        )
    if isinstance(config, Int8Config):
        assert isinstance(layout.linears(1)["down_proj"], Int8LinearSim), "llm-int8 did not replace down_proj"
    needs_calibration = isinstance(config, (WandaConfig, AwqConfig))
    assert (record.calibration_tokens > 0) == needs_calibration, (
        f"{name}: calibration_tokens {record.calibration_tokens} (needs calibration: {needs_calibration})"
    )


def test_record_saves_and_loads(tmp_path: Path) -> None:
    model = tiny_model("llama")
    record = compress_(model, WandaConfig(n_m=(2, 4)), calibration_lists())
    path = record.save(tmp_path / "wanda")
    assert path.suffix == ".json", f"save() wrote {path}, expected a .json file"
    assert path.is_file(), f"save() reported {path} but it does not exist"
    back = CompressionRecord.load(tmp_path / "wanda", expect_identity=record.identity_before)
    assert back == record, "CompressionRecord changed through save/load"
    with pytest.raises(ArtifactError, match="identity"):
        CompressionRecord.load(
            tmp_path / "wanda", expect_identity=model_identity(tiny_model("llama", seed=5))
        )


def test_record_load_rejects_a_malformed_file(tmp_path: Path) -> None:
    # A verified artifact (hashes intact) whose record is malformed: from_dict must still refuse it.
    save_artifact(tmp_path / "bad", meta={"compression_record": {"method": 1}})
    with pytest.raises(ArtifactError, match="malformed"):
        CompressionRecord.load(tmp_path / "bad")


@pytest.mark.parametrize("config", [WandaConfig(), AwqConfig(w_bit=8)])
def test_missing_calibration_raises_before_modifying(config: CompressionConfig) -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EmptyInputError, match="calibration"):
        compress_(model, config)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), (
        f"{config}: model changed despite the error"
    )


def test_unregistered_config_type_is_refused() -> None:
    @dataclass(frozen=True)
    class SparseGptConfig(CompressionConfig):
        sparsity: float = 0.5

    with pytest.raises(InvalidArgumentError, match="SparseGptConfig"):
        compress_(tiny_model("llama"), SparseGptConfig())


def test_register_method_dispatches_on_config_type() -> None:
    @dataclass(frozen=True)
    class ZeroFirstRowConfig(CompressionConfig):
        pass

    calls: list[str] = []

    @register_method(
        ZeroFirstRowConfig,
        "zero-first-row",
        needs_calibration=False,
        kind="pruning",
        storage="dense",
        requantize="keep-zeros",
    )
    def _apply(
        model: nn.Module, config: ZeroFirstRowConfig, calibration: object, *, batch_size: int, progress: bool
    ) -> dict:
        calls.append("called")
        with torch.no_grad():
            get_layout(model).linears(0)["q_proj"].weight[0] = 0.0
        return {}

    try:
        record = compress_(tiny_model("llama"), ZeroFirstRowConfig())
    finally:
        unregister_method(ZeroFirstRowConfig)
    assert calls == ["called"], f"registered method called {len(calls)} times"
    assert record.method == "zero-first-row", f"record.method is {record.method!r}"
    assert record.sparsity > 0, "the registered method's pruning is not reflected in the record"


@pytest.mark.parametrize("objective", ["linear", "module"])
def test_compress_passes_the_awq_objective_through(objective: str) -> None:
    from refusal_core.compression.quantization import quantize_awq_

    via_entry, direct = tiny_model("llama"), tiny_model("llama")
    compress_(via_entry, AwqConfig(w_bit=4, objective=objective), calibration_lists())
    quantize_awq_(direct, calibration_lists(), 4, 128, objective=objective)
    for (name, a), b in zip(via_entry.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), (
            f"compress_ with objective={objective!r} differs from quantize_awq_ at {name}"
        )


# ----------------------------------------------------------------------------
# dispatch: each config type reaches its own handler
# ----------------------------------------------------------------------------


def _equal_length_calibration(n: int = 6, length: int = 9, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 200, (n, length), generator=g).tolist()


def _expected_magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of magnitude pruning, by hand: the ⌊s·numel⌋ smallest |w| of the matrix go."""
    k = int(sparsity * w.numel())
    order = w.abs().flatten().argsort()
    keep = torch.ones(w.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    return keep.view_as(w)


def _expected_wanda_mask_q0(model: nn.Module, calibration: list[list[int]], sparsity: float) -> torch.Tensor:
    """Keep-mask of Wanda on layer 0's q_proj, by hand: inputs captured by a plain forward hook,
    score |W|·‖X_j‖₂, per row the ⌊s·d_in⌋ lowest scores go."""
    q = get_layout(model).linears(0)["q_proj"]
    xs: list[torch.Tensor] = []
    handle = q.register_forward_hook(lambda m, args, out: xs.append(args[0].detach().double()))
    try:
        with torch.no_grad():
            model(torch.tensor(calibration))
    finally:
        handle.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
    score = q.weight.detach().double().abs() * x.pow(2).sum(0).sqrt()
    k = int(sparsity * q.weight.shape[1])
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(1, score.argsort(dim=1)[:, :k], False)
    return keep


@pytest.mark.parametrize("config_type", [MagnitudeConfig, WandaConfig])
def test_pruning_configs_reach_their_own_handler(config_type: type) -> None:
    """Magnitude and Wanda zero different entries; each config's result is its own method's mask."""
    model = tiny_model("llama", seed=4)
    calibration = _equal_length_calibration()
    w0 = get_layout(model).linears(0)["q_proj"].weight.detach().clone()
    expected = (
        _expected_magnitude_mask(w0, 0.5)
        if config_type is MagnitudeConfig
        else _expected_wanda_mask_q0(model, calibration, 0.5)
    )
    other = (
        _expected_wanda_mask_q0(model, calibration, 0.5)
        if config_type is MagnitudeConfig
        else _expected_magnitude_mask(w0, 0.5)
    )
    assert not torch.equal(expected, other), "fixture: the two methods must disagree on this matrix"
    record = compress_(model, config_type(sparsity=0.5), calibration)
    got = get_layout(model).linears(0)["q_proj"].weight != 0
    assert torch.equal(got, expected), (
        f"{config_type.__name__} (record.method {record.method!r}) zeroed {int((got != expected).sum())} "
        f"entries of layer 0 q_proj other than its own method would"
    )


def test_quantization_configs_reach_their_own_handler() -> None:
    """Int8Config gives Int8LinearSim modules; AwqConfig keeps nn.Linear weights on a 2^w_bit grid."""

    model = tiny_model("llama")
    assert compress_(model, Int8Config()).method == "llm-int8", "Int8Config's record names another method"
    assert all(isinstance(m, Int8LinearSim) for m in get_layout(model).linears(0).values()), (
        "Int8Config did not produce Int8LinearSim modules"
    )
    model = tiny_model("llama")
    compress_(model, AwqConfig(w_bit=2, group_size=32, grid=2), _equal_length_calibration())
    lin = get_layout(model).linears(0)["q_proj"]
    assert type(lin) is nn.Linear, f"AwqConfig replaced the linear by {type(lin).__name__}"
    levels = max(len(torch.unique(row)) for row in lin.weight.detach())  # group 32 = a whole row here
    assert levels <= 4, f"AwqConfig(w_bit=2) left a row with {levels} distinct values (> 2^2)"


def test_missing_calibration_is_refused_by_the_registry_before_the_handler() -> None:
    from refusal_core.compression._registry import MethodSpec

    def spec(label: str, needs_calibration: bool) -> MethodSpec:
        return MethodSpec(
            label, MagnitudeConfig, handler, "pruning", needs_calibration, "dense", "keep-zeros", {}
        )

    calls: list[object] = []

    def handler(model, config, calibration, *, batch_size, progress):  # type: ignore[no-untyped-def]
        calls.append(calibration)
        return {}

    with pytest.raises(EmptyInputError, match="needs calibration data"):
        spec("needs-it", needs_calibration=True).run(
            tiny_model("llama"), MagnitudeConfig(), None, batch_size=1, progress=False
        )
    assert calls == [], "the handler ran without its calibration data"
    spec("no-need", needs_calibration=False).run(
        tiny_model("llama"), MagnitudeConfig(), [[1, 2]], batch_size=1, progress=False
    )
    assert calls == [None], f"a method without calibration was handed {calls}"


def test_backends_do_not_import_the_package_they_register_in() -> None:
    """bnb and llmc register through compression._registry: no import cycle with the package."""
    import ast

    import refusal_core.compression as package

    root = Path(package.__file__).parent
    for name in ("bnb.py", "llmc.py", "schemes.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "refusal_core.compression":
                names = {a.name for a in node.names}
                submodules = {p.stem for p in root.glob("*.py")}
                assert names <= submodules, f"{name} imports {sorted(names - submodules)} from the package"


# ----------------------------------------------------------------------------
# the method table: one registration feeds every reader
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _FakeQuantConfig(CompressionConfig):
    w_bit: int = 8


@dataclass(frozen=True)
class _FakePruneConfig(CompressionConfig):
    sparsity: float = 0.25


@pytest.fixture
def fake_methods():  # type: ignore[no-untyped-def]
    """A quantizing and a pruning method registered for one test, each once, then removed."""

    def handler(model, config, calibration, *, batch_size, progress):  # type: ignore[no-untyped-def]
        return {}

    register_method(
        _FakeQuantConfig,
        "fake-quant",
        needs_calibration=False,
        kind="simulation",
        storage="dequantized-simulation",
        requantize="weight-groups",
        names={"fake-q8": _FakeQuantConfig(8), "fake-q4": _FakeQuantConfig(4)},
        bits=lambda c: c.w_bit,
    )(handler)
    register_method(
        _FakePruneConfig,
        "fake-prune",
        needs_calibration=False,
        kind="pruning",
        storage="dense",
        requantize="keep-zeros",
    )(handler)
    yield
    unregister_method(_FakeQuantConfig)
    unregister_method(_FakePruneConfig)


@pytest.mark.usefixtures("fake_methods")
def test_one_registration_feeds_names_records_study_checkpoint_and_gpu_tier() -> None:
    from refusal_core.bench import is_pruning as _is_pruning
    from refusal_core.checkpoint import _infer_format
    from refusal_core.compression import method_spec
    from refusal_core.testing.gpu_tier import quantized_8bit_methods

    assert METHODS["fake-q4"] == _FakeQuantConfig(4), "the CLI names come from the registration"
    assert method_config("fake-prune@0.5") == _FakePruneConfig(0.5), "@SPARSITY works on a new pruner"
    assert config_from_dict(config_to_dict(_FakeQuantConfig(4))) == _FakeQuantConfig(4), (
        "records read the new config class back by name"
    )
    assert _is_pruning("fake-prune"), "the study reads the kind (pruning)"
    assert not _is_pruning("fake-q8"), "the study reads the kind (simulation)"
    no_modules: dict[str, list[str]] = {"bnb-int8": [], "bnb-4bit": [], "int8-sim": []}
    assert _infer_format(no_modules, "fake-q4+aird", None) == "dequantized-simulation", (
        "the checkpoint writer reads the storage of a float simulation from the table"
    )
    assert _infer_format(no_modules, "fake-prune", None) == "dense"
    assert "fake-q8" in quantized_8bit_methods(), "the GPU tier's 8-bit quantizers come from the table"
    assert "fake-q4" not in quantized_8bit_methods(), "the GPU tier reads the bits of each name"
    assert method_spec("fake-q4").requantize == "weight-groups"


def test_every_registered_method_states_its_whole_spec() -> None:
    from refusal_core.compression import method_spec
    from refusal_core.compression._registry import KINDS, REQUANTIZE_RULES, STORAGE_FORMATS

    expected_storage = {
        "magnitude": "dense",
        "wanda": "dense",
        "wanda-2:4": "dense",
        "llm-int8": "dequantized-simulation",
        "awq-w8": "dequantized-simulation",
        "awq-w4": "dequantized-simulation",
        "bnb-int8": "bitsandbytes-int8",
        "bnb-nf4": "bitsandbytes-nf4",
        "llmc-wanda": "dense",
        "sparsegpt-2:4": "dense",
        "llmc-awq-w4": "dequantized-simulation",  # was recorded as dense by a name-prefix guess
        "llmc-awq-w8": "dequantized-simulation",
    }
    for name, storage in expected_storage.items():
        assert method_spec(name).storage == storage, f"{name}: checkpoints stored as {storage}"
    for name in METHODS:
        spec = method_spec(name)
        assert spec.kind in KINDS, f"{name}: kind {spec.kind!r}"
        assert spec.storage in STORAGE_FORMATS, f"{name}: storage {spec.storage!r}"
        assert spec.requantize in REQUANTIZE_RULES, f"{name}: requantize {spec.requantize!r}"
        assert spec.prunes == (spec.requantize == "keep-zeros"), (
            f"{name}: pruners keep zeros, others re-round"
        )


@pytest.mark.parametrize("call", ["method_spec", "method_config", "check_methods_available"])
def test_an_unknown_method_is_one_clear_error(call: str) -> None:
    import refusal_core.compression as compression

    fn = getattr(compression, call)
    with pytest.raises(
        InvalidArgumentError, match=r"unknown compression method 'wandaa'.*valid: magnitude, wanda"
    ):
        fn(["wandaa"] if call == "check_methods_available" else "wandaa")


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("awq", "unknown compression method 'awq'"),
        ("awq-w4@0.5", "takes no @SPARSITY"),
        ("wanda@x", "not a number"),
    ],
)
def test_check_methods_available_refuses_labels_and_bad_suffixes(name: str, match: str) -> None:
    from refusal_core.compression import check_methods_available

    with pytest.raises(InvalidArgumentError, match=match):
        check_methods_available([name])


def test_registering_a_name_twice_is_refused() -> None:
    @dataclass(frozen=True)
    class AnotherWanda(CompressionConfig):
        pass

    with pytest.raises(InvalidArgumentError, match="registered already"):
        register_method(
            AnotherWanda,
            "wanda2",
            needs_calibration=False,
            kind="pruning",
            storage="dense",
            requantize="keep-zeros",
            names={"wanda": AnotherWanda()},
        )
    with pytest.raises(InvalidArgumentError, match="storage"):
        register_method(
            AnotherWanda,
            "x",
            needs_calibration=False,
            kind="pruning",
            storage="gguf",
            requantize="keep-zeros",
        )


def test_check_methods_available_refuses_a_missing_extra_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    from refusal_core.compression import bnb, check_methods_available, llmc

    monkeypatch.setattr(llmc, "llmc_available", lambda: False)
    monkeypatch.setattr(bnb, "bnb_available", lambda: True)
    check_methods_available(["magnitude", "awq-w4", "bnb-int8"])  # all present: no error
    with pytest.raises(InvalidArgumentError) as info:
        check_methods_available(["magnitude", "llmc-wanda", "sparsegpt-2:4", "bnb-nf4"])
    msg = str(info.value)
    assert "llmc-wanda, sparsegpt-2:4 need the 'llmc' extra" in msg, msg
    assert "pip install" in msg, f"the refusal says what to install: {msg}"
    assert "bnb" not in msg.split("(")[0], f"bitsandbytes is available; only llmc is missing: {msg}"
    monkeypatch.setattr(bnb, "bnb_available", lambda: False)
    with pytest.raises(InvalidArgumentError, match="method bnb-int8 needs the 'bnb' extra"):
        check_methods_available(["bnb-int8"])
