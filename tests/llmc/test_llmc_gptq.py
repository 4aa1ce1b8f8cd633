"""llmcompressor's GPTQ (refusal_core.compression.llmc, ``llmc-gptq``) against a small GPTQ written here.

Runs only where llmcompressor is installed (``tox -e llmc``). The reference below is the algorithm of
Frantar et al. (2022) for one linear, in float64: H = XᵀX over the calibration tokens, dampened by a
fraction of its mean diagonal, the upper Cholesky factor of H⁻¹, then column by column: round to the
group's grid (static min/max scales of the original weights, symmetric int4), and spread the error
over the remaining columns. Block 0's q/k/v see the same inputs in the float and the compressed model,
so their GPTQ weights can be compared with the reference directly.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("llmcompressor")

import torch

from refusal_core.compression import compress_, method_config
from refusal_core.compression.llmc import LlmcGptqConfig
from refusal_core.errors import InvalidArgumentError
from refusal_core.model import encode_prompts
from refusal_core.testing.tiny import tiny_model, tiny_prompts, tiny_tokenizer

BITS, GROUP = 4, 32


def _calibration() -> list[list[int]]:
    tok = tiny_tokenizer()
    return encode_prompts(tok, tiny_prompts(16, "harmless", seed=3), require_post_instruction=True)


def _block0_inputs(model: torch.nn.Module, calibration: list[list[int]]) -> torch.Tensor:
    """Inputs of block 0's q/k/v at every calibration token (input_layernorm of the embeddings)."""
    layer = model.model.layers[0]
    with torch.no_grad():
        xs = [layer.input_layernorm(model.model.embed_tokens(torch.tensor([ids]))) for ids in calibration]
    return torch.cat([x[0] for x in xs]).to(torch.float64)


def _group_scales(w: torch.Tensor) -> torch.Tensor:
    # Symmetric int4: the group's absmax maps to half the code range (qmax − qmin)/2 = 7.5.
    groups = w.reshape(w.shape[0], -1, GROUP)
    return (groups.abs().amax(dim=-1) / ((2**BITS - 1) / 2)).repeat_interleave(GROUP, dim=1)


def _reference_gptq(w: torch.Tensor, x: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    w = w.detach().to(torch.float64).clone()
    scales = _group_scales(w)
    h = x.T @ x
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    lo, hi = -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1
    for i in range(w.shape[1]):
        col = w[:, i]
        q[:, i] = torch.clamp(torch.round(col / scales[:, i]), lo, hi) * scales[:, i]
        err = (col - q[:, i]) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
    return q


def _rtn(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().to(torch.float64)
    s = _group_scales(w)
    return torch.clamp(torch.round(w / s), -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1) * s


def _output_error(q: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    """‖(Q − W) Xᵀ‖_F: what the layer's outputs lose on the calibration tokens."""
    return float(torch.linalg.matrix_norm((q - w) @ x.T))


def test_llmc_gptq_matches_the_reference_and_beats_round_to_nearest() -> None:
    model = tiny_model("llama", d_model=64, n_layers=2, seed=4)
    calibration = _calibration()
    x = _block0_inputs(model, calibration)
    gptq = copy.deepcopy(model)
    record = compress_(gptq, LlmcGptqConfig(w_bit=BITS, group_size=GROUP), calibration)
    assert record.method == "llmc-gptq"
    attn, attn_q = model.model.layers[0].self_attn, gptq.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        w = getattr(attn, name).weight.detach().to(torch.float64)
        got = getattr(attn_q, name).weight.detach().to(torch.float64)
        ref = _reference_gptq(w, x)
        same = float((torch.isclose(got, ref, rtol=1e-5, atol=1e-7)).float().mean())
        assert same >= 0.999, f"llmc GPTQ vs reference GPTQ, block 0 {name}: only {same:.4f} of weights agree"
        e_gptq, e_rtn = _output_error(got, w, x), _output_error(_rtn(w), w, x)
        assert e_gptq < 0.8 * e_rtn, f"GPTQ {name}: output error {e_gptq:.4g}, round-to-nearest {e_rtn:.4g}"
    for n, p in gptq.named_parameters():
        if n.endswith("proj.weight"):
            groups = p.detach().reshape(p.shape[0], -1, GROUP)
            distinct = max(len(torch.unique(g)) for row in groups for g in row)
            assert distinct <= 2**BITS, f"GPTQ {n}: a group holds {distinct} values, more than 2^{BITS}"


def test_llmc_gptq_names_and_bad_group_size() -> None:
    assert method_config("llmc-gptq-w4") == LlmcGptqConfig(w_bit=4)
    model = tiny_model("llama", d_model=48, d_ff=64)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidArgumentError, match="group_size 32 does not divide the input width 48"):
        compress_(model, LlmcGptqConfig(group_size=32), _calibration())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"refused GPTQ changed {k}"
