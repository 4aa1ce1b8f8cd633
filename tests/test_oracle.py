"""Tests of the reference-oracle loader (refusal_core.testing.oracle)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from refusal_core import functional
from refusal_core.errors import ImplementationError
from refusal_core.testing import oracle


def _module(name: str, **functions: object) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in functions.items():
        setattr(module, key, value)
    return module


@pytest.fixture
def fake_module(monkeypatch: pytest.MonkeyPatch):
    """Register an importable in-memory module for the duration of a test."""

    def make(name: str, **functions: object) -> types.ModuleType:
        module = _module(name, **functions)
        monkeypatch.setitem(sys.modules, name, module)
        return module

    return make


def test_default_is_the_reference() -> None:
    impl = oracle.load_implementation()
    assert impl.is_reference, f"default implementation {impl} is not the reference"
    assert impl.strict_errors, "the reference must be held to the strict error rule"
    assert impl.provided() == tuple(oracle.PROTOCOL), f"reference provides {impl.provided()}"
    assert impl.missing() == (), f"reference lacks {impl.missing()}"


def test_protocol_lists_exactly_the_functional_core() -> None:
    for name in oracle.PROTOCOL:
        assert callable(getattr(functional, name, None)), (
            f"{name} is in PROTOCOL but not in refusal_core.functional"
        )
        assert oracle.PROTOCOL[name].strip(), f"{name} has no meaning in PROTOCOL"
    assert len(oracle.PROTOCOL) == 15, f"the protocol has 15 functions, PROTOCOL lists {len(oracle.PROTOCOL)}"


def test_environment_variable_selects_modules(monkeypatch: pytest.MonkeyPatch, fake_module) -> None:
    fake_module("outside_impl_a", ablate=lambda x, r: x)
    fake_module("outside_impl_b", cosine_similarity=lambda a, b: 1.0)
    monkeypatch.setenv(oracle.ENV_VAR, "outside_impl_a, outside_impl_b")
    impls = oracle.load_implementations()
    assert [i.module_name for i in impls] == ["outside_impl_a", "outside_impl_b"], f"loaded {impls}"
    assert impls[0].provided() == ("ablate",), f"provided {impls[0].provided()}"
    assert not impls[0].strict_errors, "an outside module is held to the lenient rule unless it opts in"
    monkeypatch.setenv(oracle.ENV_VAR, "")
    assert oracle.load_implementations()[0].is_reference, "an empty variable means the reference"


def test_import_failure_is_an_implementation_error() -> None:
    with pytest.raises(ImplementationError, match=r"REFUSAL_CORE_IMPL='no_such_module_xyz'.*cannot import"):
        oracle.load_implementation("no_such_module_xyz")


def test_module_without_protocol_functions_is_rejected(fake_module) -> None:
    fake_module("empty_impl_module", helper=lambda: None)
    with pytest.raises(ImplementationError, match="none of the protocol functions"):
        oracle.load_implementation("empty_impl_module")


def test_non_callable_protocol_name_is_rejected(fake_module) -> None:
    fake_module("broken_impl_module", ablate=3)
    with pytest.raises(ImplementationError, match="ablate is a int, not a function"):
        oracle.load_implementation("broken_impl_module")


def test_duplicate_module_is_rejected(fake_module) -> None:
    fake_module("twice_impl", ablate=lambda x, r: x)
    with pytest.raises(ImplementationError, match="names a module twice"):
        oracle.load_implementations("twice_impl,twice_impl")


def test_strict_errors_opt_in(fake_module) -> None:
    fake_module("strict_impl", ablate=lambda x, r: x, RAISES_REFUSAL_CORE_ERRORS=True)
    assert oracle.load_implementation("strict_impl").strict_errors, "RAISES_REFUSAL_CORE_ERRORS=True opts in"


def test_missing_function_skips_naming_it(fake_module) -> None:
    fake_module("partial_impl", ablate=lambda x, r: x.clone())
    impl = oracle.load_implementation("partial_impl")
    with pytest.raises(
        pytest.skip.Exception, match=r"partial_impl does not provide the protocol function wanda_mask\(\)"
    ):
        oracle.require(impl, "wanda_mask")
    with pytest.raises(pytest.skip.Exception, match="magnitude_mask"):
        impl.magnitude_mask  # noqa: B018 - attribute access is what skips
    with pytest.raises(ImplementationError, match="not a protocol function"):
        oracle.require(impl, "not_a_function")
    with pytest.raises(AttributeError):
        impl.not_a_function  # noqa: B018


def test_describe_names_module_and_missing_functions(fake_module) -> None:
    fake_module("described_impl", ablate=lambda x, r: x.clone())
    text = oracle.describe_implementations([oracle.load_implementation("described_impl")])
    assert "described_impl" in text, text
    assert "outside implementation" in text, text
    assert "provides 1/15" in text, text
    assert "missing: difference_in_means" in text, text
    assert "reference" in oracle.load_implementation().describe(), oracle.load_implementation().describe()


def test_wrapper_catches_mutation_even_when_raising(fake_module) -> None:
    def mutating(x, r):
        x.add_(1.0)
        return x + 0

    def mutating_then_raising(x, r):
        x.add_(2.0)
        raise ValueError("bad r")

    fake_module("mutating_impl", ablate=mutating, add_direction=mutating_then_raising)
    impl = oracle.load_implementation("mutating_impl")
    with pytest.raises(AssertionError, match=r"mutating_impl.ablate modified its input x \(float32\[3\]\)"):
        impl.ablate(torch.zeros(3), torch.ones(3))
    with pytest.raises(AssertionError, match="modified its input x"):
        impl.add_direction(torch.zeros(3), torch.ones(3))


def test_wrapper_catches_aliasing_and_nan_inputs(fake_module) -> None:
    fake_module("aliasing_impl", ablate=lambda x, r: x, add_direction=lambda x, r, c: x.clone())
    impl = oracle.load_implementation("aliasing_impl")
    with pytest.raises(AssertionError, match="sharing memory with an input"):
        impl.ablate(torch.zeros(3), torch.ones(3))
    nan = torch.tensor([float("nan"), 1.0])
    out = impl.add_direction(nan, torch.ones(2), 0.0)  # NaN compares bitwise, so no false alarm
    assert out.shape == (2,), f"wrapped call returned {out}"


def test_tolerance_table() -> None:
    assert (
        oracle.tolerance(torch.float64) < oracle.tolerance(torch.float32) < oracle.tolerance(torch.bfloat16)
    )
    assert oracle.tolerance(torch.int8) == oracle.tolerance(torch.float32), "unknown dtypes use float32's"


def test_protocol_table_lists_every_function_with_its_signature() -> None:
    table = oracle.protocol_table()
    assert table.splitlines()[0] == "| function | meaning |", table
    for name in oracle.PROTOCOL:
        assert f"| `{name}(" in table, f"{name} missing from the protocol table"
    assert "`aird_update(w, r, alpha, *, normalize=False, preserve_sparsity=False)`" in table, table
