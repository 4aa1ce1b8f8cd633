"""Quantization scheme adapters (refusal_core.compression.schemes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from refusal_core.compression.quantization import Int8LinearSim
from refusal_core.compression.schemes import scheme_named, scheme_of
from refusal_core.errors import UnsupportedModuleError


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(8, 4)


def test_int8_sim_dequantize_is_q_times_scale_and_requantize_round_trips() -> None:
    sim = Int8LinearSim.from_linear(_linear(), 6.0)
    scheme = scheme_of(sim)
    assert scheme.name == "int8-sim", f"Int8LinearSim classified as {scheme.name}"
    w = scheme.dequantize(sim)
    ref = sim.q.to(sim.scale.dtype) * sim.scale[:, None]  # by hand: row scale · int8, in scale's dtype
    assert torch.equal(w, ref), "dequantize is not q · scale"
    again = scheme.requantize(sim, w, sim.bias)
    assert isinstance(again, Int8LinearSim), f"requantize gave {type(again).__name__}"
    assert torch.equal(again.q, sim.q), "requantizing the dequantized weight changed q"
    assert torch.equal(again.scale, sim.scale), "requantizing the dequantized weight changed the scale"
    assert again.threshold == sim.threshold, "requantize lost the threshold"


def test_float_scheme_copies_and_refuses_requantize() -> None:
    lin = _linear(1)
    scheme = scheme_of(lin)
    assert (scheme.name, scheme.quantized) == ("float", False), f"nn.Linear classified as {scheme}"
    w = scheme.dequantize(lin)
    assert torch.equal(w, lin.weight), "dequantize of a float linear is not its weight"
    w.add_(1.0)
    assert not torch.equal(w, lin.weight), "dequantize returned the weight itself, not a copy"
    with pytest.raises(UnsupportedModuleError, match="not quantized"):
        scheme.requantize(lin, w, None)


def test_unknown_modules_and_names_are_refused() -> None:
    with pytest.raises(UnsupportedModuleError, match="Conv1d"):
        scheme_of(nn.Conv1d(2, 2, 1))
    with pytest.raises(UnsupportedModuleError, match="no quantization scheme"):
        scheme_named("awq-int3")
    int_linear = nn.Linear(2, 2)
    int_linear.weight = nn.Parameter(torch.zeros(2, 2, dtype=torch.int8), requires_grad=False)
    with pytest.raises(UnsupportedModuleError, match=r"neither a float nn\.Linear"):
        scheme_of(int_linear)
