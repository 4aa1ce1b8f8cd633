"""``audit`` of a compressed-tensors checkpoint written by llmcompressor itself (``tox -e llmc``).

The toy is saved as a Hugging Face directory, quantized by llmcompressor's
``oneshot`` with a data-free ``QuantizationModifier`` recipe (int8 symmetric weights, one
scale per output channel, activations left in float: ``W8A16`` with channel scales) and
saved by llmcompressor with ``save_compressed=True``, so the candidate on disk
holds packed integer weights and scales in the compressed-tensors format, not
float weights. The audit must load it through transformers (which decompresses
it), find it compatible with the base, and report a real difference.

The control audits the base against itself: KL(base ‖ candidate) is then
exactly 0, so the ``> 0`` check on the compressed candidate fails for an audit
that silently measured the base in the candidate's place.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llmcompressor")

import torch
from safetensors import safe_open
from torch import nn

from refusal_core.audit import AUDIT_FILE, AuditConfig, audit
from refusal_core.model import get_layout, load_model
from refusal_core.model.inputs import format_prompt
from refusal_core.prompts import load_prompts
from refusal_core.toy import toy_model_path, toy_refusal_token_ids

N_TEST = 8


def _small(base: Path, compressed: Path) -> AuditConfig:
    return AuditConfig(
        base=str(base),
        compressed=str(compressed),
        n_train=16,
        n_val=4,
        n_test=N_TEST,
        max_new_tokens=8,
        refusal_token_ids=tuple(toy_refusal_token_ids()),
    )


def _strict_json(path: Path) -> dict[str, Any]:
    def no_constant(name: str) -> None:
        raise AssertionError(f"{path} holds {name}: strict JSON parsers reject it")

    return dict(json.loads(path.read_text(), parse_constant=no_constant))


def _rates(obj: Any, where: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every rate (a mapping with k, n, value and an interval) in ``obj``, with its path."""
    if isinstance(obj, dict):
        if {"k", "n", "value"} <= set(obj):
            return [(where, obj)]
        return [r for k, v in obj.items() for r in _rates(v, f"{where}.{k}")]
    return []


def _held_out_ids(tok: Any) -> torch.Tensor:
    text = format_prompt(tok, load_prompts("harmful_test")[0])
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def _block_linears(model: nn.Module) -> dict[str, nn.Module]:
    layout = get_layout(model)
    wanted = {id(m) for layer in range(layout.n_layers) for m in layout.linears(layer).values()}
    return {n: m for n, m in model.named_modules() if id(m) in wanted}


@pytest.fixture(scope="module")
def llmc_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The toy as an HF directory and its llmcompressor W8A16 checkpoint (compressed-tensors)."""
    if not (toy_model_path() / "model.safetensors").is_file():
        pytest.skip("toy model weights are not in refusal_core/data/toy_model")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.core import active_session
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("llmc_audit")
    model, tok = load_model("toy")
    model.save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    work = AutoModelForCausalLM.from_pretrained(str(d / "base"), dtype=torch.float32, local_files_only=True)
    # The W8A16 preset quantizes in groups of 128 inputs, wider than the toy (d = 64): one scale per
    # output channel instead, the same int8 symmetric weights.
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
    )
    try:
        oneshot(model=work, recipe=QuantizationModifier(config_groups={"int8": scheme}, ignore=["lm_head"]))
    finally:
        active_session().reset()
    ids = _held_out_ids(tok)
    with torch.no_grad():
        # what llmcompressor's own (fake-quantized) model computes, before anything is saved
        fake_quant_logits = work(input_ids=ids).logits.detach().clone()
    work.save_pretrained(d / "w8a16", save_compressed=True)
    tok.save_pretrained(d / "w8a16")
    return {"base": d / "base", "candidate": d / "w8a16", "logits": fake_quant_logits, "ids": ids, "dir": d}


def test_llmc_checkpoint_is_compressed_tensors_and_loads_decompressed(
    llmc_checkpoint: dict[str, Any],
) -> None:
    cand = llmc_checkpoint["candidate"]
    qc = json.loads((cand / "config.json").read_text()).get("quantization_config")
    assert qc is not None, "llmcompressor wrote no quantization_config"
    assert qc["quant_method"] == "compressed-tensors", qc
    assert qc["format"] != "dense", f"save_compressed=True wrote format {qc['format']!r}"
    files = sorted(cand.glob("*.safetensors"))
    assert files, f"no safetensors in {cand}"
    keys: set[str] = set()
    scales: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            names = list(fh.keys())
            keys |= set(names)
            scales |= {
                n.removesuffix(".weight_scale"): fh.get_tensor(n)
                for n in names
                if n.endswith(".weight_scale")
            }
    packed = [k for k in keys if k.endswith("o_proj.weight_packed") or k.endswith("o_proj.weight")]
    assert packed, f"no o_proj weights in {sorted(keys)[:8]}"
    assert all(k.endswith("weight_packed") for k in packed), (
        f"o_proj weights on disk are not packed integers: {sorted(packed)}"
    )

    model, _ = load_model(str(cand))
    base, _ = load_model(str(llmc_checkpoint["base"]))
    base_lin, cand_lin = _block_linears(base), _block_linears(model)
    assert set(base_lin) == set(cand_lin), "the candidate's block linears differ from the base's"
    for n, m in model.named_modules():
        assert not hasattr(m, "quantization_scheme"), f"{n} still carries a compressed-tensors scheme"
        assert "forward" not in vars(m), f"{n} still has compressed-tensors' wrapped forward"
        assert not any(
            p.endswith(("_scale", "_zero_point", "_shape", "_packed"))
            for p, _ in m.named_parameters(recurse=False)
        ), f"{n} still holds quantization parameters"
    for name, m in cand_lin.items():
        assert type(m) is nn.Linear, f"{name} loaded as {type(m).__name__}"
        w, bw = m.weight.detach(), base_lin[name].weight.detach()
        assert w.dtype == torch.float32, f"{name} loaded as {w.dtype}"
        assert not torch.equal(w, bw), f"{name} equals the base: nothing was quantized"
        # on the int8 grid of the scales stored on disk: w = q * scale[row], q an integer in [-128, 127]
        q = w.to(torch.float64) / scales[name].to(torch.float64).reshape(-1, 1)
        assert float((q - q.round()).abs().max()) < 1e-3, (
            f"{name}: weights are not integer multiples of its scales"
        )
        assert float(q.round().min()) >= -128, f"{name}: q below int8"
        assert float(q.round().max()) <= 127, f"{name}: q above int8"
        rel = float((w - bw).norm() / bw.norm())
        assert 0 < rel < 0.02, f"{name}: relative rounding error {rel:.3g}"
    with torch.no_grad():
        logits = model(input_ids=llmc_checkpoint["ids"]).logits
    torch.testing.assert_close(logits, llmc_checkpoint["logits"], rtol=1e-4, atol=1e-4)


def test_audit_of_an_llmcompressor_checkpoint(llmc_checkpoint: dict[str, Any]) -> None:
    out = llmc_checkpoint["dir"] / "audit"
    res = audit(_small(llmc_checkpoint["base"], llmc_checkpoint["candidate"]), out, progress=False)
    doc = _strict_json(out / AUDIT_FILE)
    assert doc == res.to_dict(), "audit.json is not the result's document"
    assert (out / "report.md").read_text().startswith("# Audit:")

    comp = doc["compatibility"]
    assert (comp["layout"], comp["n_layers"], comp["d_model"]) == ("llama", 8, 64), comp  # the toy: 8 x 64
    assert doc["identities"]["candidate"]["name_or_path"] == str(llmc_checkpoint["candidate"].resolve())
    assert doc["identities"]["base"]["fingerprint"] != doc["identities"]["candidate"]["fingerprint"]

    c = doc["candidate"]
    cos, floor = c["cosine_at_base_source"], c["noise_floor_at_base_source"]
    assert cos is not None, c
    assert math.isfinite(cos), c
    assert -1 <= cos <= 1, c
    assert floor is not None, c
    assert math.isfinite(floor), c
    assert c["above_noise_floor"] == (cos > floor), c
    assert cos > 0.99, f"int8 per-channel weights should keep the toy's direction (cosine {cos})"

    rates = _rates({"mechanism": doc["mechanism"], "evaluation": doc["evaluation"]})
    names = {w for w, _ in rates}
    for model in ("base", "candidate"):
        for key in ("refusal_rate_harmful", "necessity", "sufficiency"):
            assert f".mechanism.{model}.{key}" in names, f"no {key} rate for {model}: {sorted(names)}"
        for attack in ("vanilla", "vanilla_system", "decoding"):
            assert f".evaluation.{model}.asr.{attack}" in names, f"no ASR {attack} for {model}"
        assert f".evaluation.{model}.over_refusal" in names, f"no over-refusal for {model}"
    for where, r in rates:
        assert r["n"] == N_TEST, f"{where}: n = {r['n']}, expected {N_TEST}"
        assert 0 <= r["low"] <= r["value"] <= r["high"] <= 1, f"{where}: interval {r} does not hold its value"
        assert r["value"] == pytest.approx(r["k"] / r["n"]), f"{where}: value is not k/n in {r}"
        if 0 < r["k"] < r["n"]:
            assert r["low"] < r["value"] < r["high"], f"{where}: degenerate Wilson interval {r}"

    print(
        f"\naudit of llmc int8 channel (compressed-tensors): cosine at base source {cos:.6f}, "
        f"noise floor {floor:.6f}, KL {doc['evaluation']['candidate']['damage']['kl_mean']:.3e}, "
        f"ASR vanilla {doc['evaluation']['candidate']['asr']['vanilla']}"
    )
    assert doc["evaluation"]["base"]["damage"]["kl_mean"] == 0.0
    kl = doc["evaluation"]["candidate"]["damage"]["kl_mean"]
    assert kl is not None, "no KL(base ‖ candidate) in audit.json"
    assert kl > 0, f"KL(base ‖ llmc W8A16) = {kl}: the candidate equals the base?"
    assert kl < 0.05, f"KL(base ‖ llmc W8A16) = {kl}: far more damage than int8 per-channel rounding"


def test_audit_of_the_base_against_itself_has_zero_kl(llmc_checkpoint: dict[str, Any]) -> None:
    """The control: what an audit that loaded the base as its candidate would report."""
    out = llmc_checkpoint["dir"] / "self"
    audit(_small(llmc_checkpoint["base"], llmc_checkpoint["base"]), out, progress=False)
    doc = _strict_json(out / AUDIT_FILE)
    assert doc["evaluation"]["candidate"]["damage"]["kl_mean"] == 0.0, doc["evaluation"]["candidate"][
        "damage"
    ]
    assert doc["candidate"]["cosine_at_base_source"] == pytest.approx(1.0, abs=1e-6)
