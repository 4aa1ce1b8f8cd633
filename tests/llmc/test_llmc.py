"""llmcompressor backend (refusal_core.compression.llmc) against the reference implementations.

Runs only where llmcompressor is installed (its own environment: ``tox -e llmc``,
since it pins transformers <= 5.17); elsewhere the whole module is skipped.

* Wanda: llmcompressor's masks equal the reference masks on every entry whose
  score is not tied at its row's (or N:M group's) threshold.
* AWQ: the output error of llmcompressor's AWQ model and of the reference AWQ
  model against the float model, per block and for the logits, on held-out
  prompts; both numbers are recorded (``record_property``) and compared.
* SparseGPT: runs, and gives exactly the documented number of zeros.
* The caller's model is left a plain transformers model; bad input raises
  before anything changes; a missing llmcompressor raises naming the extra.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llmcompressor")

import torch
from torch import nn

from refusal_core.compression import (
    AwqConfig,
    CompressionRecord,
    MagnitudeConfig,
    WandaConfig,
    compress_,
)
from refusal_core.compression import llmc as llmc_module
from refusal_core.compression.llmc import (
    LLMC_METHODS,
    LlmcAwqConfig,
    LlmcSparseGptConfig,
    LlmcWandaConfig,
    sparsegpt_block_sparsities,
)
from refusal_core.errors import InvalidArgumentError
from refusal_core.model import get_layout
from refusal_core.testing.tiny import tiny_model, tiny_prompts, tiny_tokenizer

#: Relative half-width of the band around a row's Wanda threshold inside which the two
#: implementations may order entries differently: llmcompressor accumulates ‖X_j‖² in
#: float32 (rounding ~1e-7 per add, over a few hundred tokens) and runs unpadded batches of
#: one, the reference float64 over left-padded batches; 1e-5 is ~100x that rounding.
TIE_RTOL = 1e-5

#: At most this fraction of a model's entries may fall in the tie band, or the
#: comparison would say little.
MAX_TIED_FRACTION = 0.01


# ----------------------------------------------------------------------------
# models and data
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    name: str
    model: nn.Module
    calibration: list[list[int]]
    heldout: list[list[int]]


def _toy_present() -> bool:
    from refusal_core.toy import toy_model_path

    return (toy_model_path() / "model.safetensors").is_file()


def _tiny_case(name: str) -> Case:
    tok = tiny_tokenizer()
    kwargs: dict[str, Any] = {"llama": {}, "qwen2-gqa": {"n_kv_heads": 2}, "gemma": {}}[name]
    family = name.split("-")[0]
    model = tiny_model(family, n_layers=2, d_model=64, n_heads=4, seed=3, **kwargs)

    def ids(texts: list[str]) -> list[list[int]]:
        return [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts]

    calibration = ids(tiny_prompts(8, "harmful", seed=0) + tiny_prompts(8, "harmless", seed=0))
    heldout = ids(tiny_prompts(6, "harmful", seed=7) + tiny_prompts(6, "harmless", seed=7))
    return Case(name, model, calibration, heldout)


def _toy_case() -> Case:
    from refusal_core.prompts import load_prompts
    from refusal_core.toy import load_toy_model

    model, tok = load_toy_model()

    def ids(texts: list[str]) -> list[list[int]]:
        chats = [[{"role": "user", "content": t}] for t in texts]
        return [list(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True)) for c in chats]

    calibration = ids(load_prompts("harmful_train")[:16] + load_prompts("harmless_train")[:16])
    heldout = ids(load_prompts("harmful_val")[:8] + load_prompts("harmless_val")[:8])
    return Case("toy", model, calibration, heldout)


CASES = ["llama", "qwen2-gqa", "gemma", "toy"]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> Case:
    if request.param == "toy":
        if not _toy_present():
            pytest.skip("toy model weights are not in refusal_core/data/toy_model")
        return _toy_case()
    return _tiny_case(request.param)


def _block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Block linears by their name in ``model``."""
    layout = get_layout(model)
    wanted = {id(m) for layer in range(layout.n_layers) for m in layout.linears(layer).values()}
    out = {n: m for n, m in model.named_modules() if id(m) in wanted}
    assert all(isinstance(m, nn.Linear) for m in out.values()), "block linears must be nn.Linear"
    return out  # type: ignore[return-value]


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


# ----------------------------------------------------------------------------
# Wanda
# ----------------------------------------------------------------------------


def _reference_input_norms(
    dense: nn.Module, pruned: nn.Module, calibration: list[list[int]]
) -> dict[str, Any]:
    """‖X_j‖₂ of every block linear's inputs as the reference's sequential Wanda sees them.

    For block l: blocks 0..l-1 pruned (from ``pruned``), block l and later dense.
    One unpadded sequence at a time, sums of squares in float64.
    """
    dense_lin, pruned_lin = _block_linears(dense), _block_linears(pruned)
    n_layers = get_layout(dense).n_layers
    norms: dict[str, torch.Tensor] = {}
    for layer in range(n_layers):
        hybrid = copy.deepcopy(dense)
        hyb_lin = _block_linears(hybrid)
        with torch.no_grad():
            for name, m in hyb_lin.items():
                if _layer_of(name) < layer:
                    m.weight.copy_(pruned_lin[name].weight)
        sq: dict[str, torch.Tensor] = {
            n: torch.zeros(m.in_features, dtype=torch.float64)
            for n, m in hyb_lin.items()
            if _layer_of(n) == layer
        }

        def hook(name: str, sq: dict[str, torch.Tensor] = sq) -> Callable[..., None]:
            def fn(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
                sq[name] += x.pow(2).sum(0)

            return fn

        handles = [hyb_lin[n].register_forward_hook(hook(n)) for n in sq]
        try:
            with torch.no_grad():
                for seq in calibration:
                    hybrid(input_ids=torch.tensor([seq]), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        norms.update({n: v.sqrt() for n, v in sq.items()})
    assert set(norms) == set(dense_lin), "every block linear needs reference input norms"
    return norms


def _tie_band(score: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None) -> torch.Tensor:
    """Bool mask of entries whose score lies within TIE_RTOL of their comparison group's threshold.

    The threshold of a group (a row, or m consecutive inputs of a row for N:M) is
    the midpoint between the largest pruned and the smallest kept score.
    """
    out_f, in_f = score.shape
    if n_m is None:
        groups, k = score, int(sparsity * in_f)
    else:
        groups, k = score.reshape(out_f, in_f // n_m[1], n_m[1]), n_m[0]
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    srt = groups.sort(dim=-1).values
    thr = (srt[..., k - 1] + srt[..., k]) / 2
    band = (groups - thr.unsqueeze(-1)).abs() <= TIE_RTOL * thr.unsqueeze(-1).abs()
    return band.reshape(out_f, in_f)


@pytest.mark.parametrize("n_m", [None, (2, 4)], ids=["unstructured", "2:4"])
def test_wanda_masks_agree_with_reference_outside_ties(case: Case, n_m: tuple[int, int] | None) -> None:
    sparsity = 0.5
    dense = case.model
    ours, theirs = copy.deepcopy(dense), copy.deepcopy(dense)
    compress_(ours, WandaConfig(sparsity, n_m), case.calibration)
    record = compress_(theirs, LlmcWandaConfig(sparsity, n_m), case.calibration)
    assert record.method == "llmc-wanda", f"llmc Wanda on {case.name}: record label is {record.method!r}"

    norms = _reference_input_norms(dense, ours, case.calibration)
    dense_lin, ours_lin, theirs_lin = _block_linears(dense), _block_linears(ours), _block_linears(theirs)
    total = tied_total = 0
    for name, m in dense_lin.items():
        score = m.weight.detach().abs().to(torch.float64) * norms[name]
        tied = _tie_band(score, sparsity, n_m)
        kept_ours = ours_lin[name].weight != 0
        kept_theirs = theirs_lin[name].weight != 0
        disagree = (kept_ours != kept_theirs) & ~tied
        assert not bool(disagree.any()), (
            f"Wanda {n_m or 'unstructured'} on {case.name}: {name} masks differ at "
            f"{int(disagree.sum())} of {int((~tied).sum())} untied entries, e.g. "
            f"{disagree.nonzero()[:3].tolist()} (llmcompressor vs reference)"
        )
        assert torch.equal(theirs_lin[name].weight[kept_theirs], m.weight[kept_theirs]), (
            f"Wanda on {case.name}: llmcompressor changed kept weights of {name} (Wanda only zeroes)"
        )
        total += score.numel()
        tied_total += int(tied.sum())
    assert tied_total <= MAX_TIED_FRACTION * total, (
        f"Wanda on {case.name}: {tied_total} of {total} entries lie in the tie band (rtol {TIE_RTOL}); "
        "the comparison would be vacuous"
    )


# ----------------------------------------------------------------------------
# AWQ
# ----------------------------------------------------------------------------


def _output_errors(model: nn.Module, dense: nn.Module, heldout: list[list[int]]) -> tuple[list[float], float]:
    """Relative Frobenius error vs ``dense`` of every block's output and of the logits, float64."""
    num = den = None
    lnum = lden = 0.0
    with torch.no_grad():
        for seq in heldout:
            ids = torch.tensor([seq])
            a = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            b = dense(input_ids=ids, output_hidden_states=True, use_cache=False)
            # hidden_states[l + 1] is block l's output (the last one after the final norm in HF).
            ha = [h.to(torch.float64) for h in a.hidden_states[1:]]
            hb = [h.to(torch.float64) for h in b.hidden_states[1:]]
            n = [float((x - y).pow(2).sum()) for x, y in zip(ha, hb)]
            d = [float(y.pow(2).sum()) for y in hb]
            num = n if num is None else [p + q for p, q in zip(num, n)]
            den = d if den is None else [p + q for p, q in zip(den, d)]
            la, lb = a.logits.to(torch.float64), b.logits.to(torch.float64)
            lnum += float((la - lb).pow(2).sum())
            lden += float(lb.pow(2).sum())
    assert num is not None, "no held-out prompts"
    assert den is not None, "no held-out prompts"
    return [math.sqrt(p / q) for p, q in zip(num, den)], math.sqrt(lnum / lden)


#: llmcompressor's AWQ may be worse than the reference by at most this factor (and vice versa)
#: in held-out logit error: both search scales on the same data with the same quantizer, so
#: they should land in the same range; a broken scale fold gives errors many times larger.
AWQ_ERROR_RATIO_BOUND = 1.5


@pytest.mark.parametrize("w_bit", [4, 8])
def test_awq_output_error_comparable_to_reference(
    case: Case, w_bit: int, record_property: Callable[[str, object], None]
) -> None:
    dense = case.model
    rtn, ours, theirs, theirs_plain = (copy.deepcopy(dense) for _ in range(4))
    # a = 0 only: round to nearest, the baseline both searches include.
    compress_(rtn, AwqConfig(w_bit=w_bit, grid=1), case.calibration)
    compress_(ours, AwqConfig(w_bit=w_bit), case.calibration)
    compress_(theirs, LlmcAwqConfig(w_bit=w_bit), case.calibration)
    compress_(theirs_plain, LlmcAwqConfig(w_bit=w_bit, duo_scaling=False), case.calibration)
    results = {
        "rtn": _output_errors(rtn, dense, case.heldout),
        "reference": _output_errors(ours, dense, case.heldout),
        "llmc": _output_errors(theirs, dense, case.heldout),
        "llmc-noduo": _output_errors(theirs_plain, dense, case.heldout),
    }
    for key, (blocks, logits) in results.items():
        record_property(f"awq_w{w_bit}_{key}_block_errors", [round(e, 6) for e in blocks])
        record_property(f"awq_w{w_bit}_{key}_logit_error", round(logits, 6))
    summary = ", ".join(
        f"{k}: blocks {[f'{e:.2e}' for e in b]} logits {lg:.2e}" for k, (b, lg) in results.items()
    )
    print(f"\nAWQ w{w_bit} on {case.name}: {summary}")

    ref, llmc = results["reference"][1], results["llmc"][1]
    for key, (_, err) in results.items():
        assert math.isfinite(err), f"AWQ w{w_bit} on {case.name}: {key} logit error is {err}"
        assert err > 0, f"AWQ w{w_bit} on {case.name}: {key} logit error is 0 (nothing was rounded?)"
    ratio = llmc / ref
    assert 1 / AWQ_ERROR_RATIO_BOUND <= ratio <= AWQ_ERROR_RATIO_BOUND, (
        f"AWQ w{w_bit} on {case.name}: held-out logit error llmcompressor {llmc:.3e} vs reference "
        f"{ref:.3e}, ratio {ratio:.3f} outside [1/{AWQ_ERROR_RATIO_BOUND}, {AWQ_ERROR_RATIO_BOUND}] "
        f"({summary})"
    )
    rtn_err = results["rtn"][1]
    for key in ("reference", "llmc", "llmc-noduo"):
        assert results[key][1] <= AWQ_ERROR_RATIO_BOUND * rtn_err, (
            f"AWQ w{w_bit} on {case.name}: {key} logit error {results[key][1]:.3e} is far above "
            f"round-to-nearest's {rtn_err:.3e} ({summary})"
        )


def test_awq_weights_sit_on_the_quantization_grid(case: Case) -> None:
    """Every group of an llmc-AWQ weight holds at most 2^w_bit distinct values (it was rounded)."""
    model = copy.deepcopy(case.model)
    cfg = LlmcAwqConfig(w_bit=4, group_size=32)
    record = compress_(model, cfg, case.calibration)
    for name, m in _block_linears(model).items():
        groups = m.weight.detach().reshape(m.out_features, -1, min(cfg.group_size, m.in_features))
        distinct = max(len(torch.unique(g)) for g in groups.reshape(-1, groups.shape[-1]))
        assert distinct <= 2**cfg.w_bit, (
            f"llmc AWQ w4 g32 on {case.name}: a group of {name} holds {distinct} distinct values"
        )
        err = record.quantization_error[name]
        assert 0 < err < 0.5, f"llmc AWQ w4 on {case.name}: rounding error of {name} is {err}"


# ----------------------------------------------------------------------------
# SparseGPT
# ----------------------------------------------------------------------------


def _block_zero_counts(w: torch.Tensor, block_size: int) -> list[int]:
    return [int((w[:, i : i + block_size] == 0).sum()) for i in range(0, w.shape[1], block_size)]


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_sparsegpt_gives_exact_sparsity(case: Case, sparsity: float) -> None:
    dense = case.model
    exact, raw = copy.deepcopy(dense), copy.deepcopy(dense)
    cfg = LlmcSparseGptConfig(sparsity=sparsity, block_size=32)
    record = compress_(exact, cfg, case.calibration)
    compress_(raw, dataclasses.replace(cfg, exact=False), case.calibration)
    assert record.method == "llmc-sparsegpt", f"SparseGPT on {case.name}: label {record.method!r}"
    for name, m in _block_linears(exact).items():
        w = m.weight.detach()
        want = [math.floor(sparsity * w.shape[0] * min(32, w.shape[1] - i)) for i in range(0, w.shape[1], 32)]
        assert _block_zero_counts(w, 32) == want, (
            f"SparseGPT s={sparsity} exact on {case.name}: {name} zeros per 32-column block "
            f"{_block_zero_counts(w, 32)}, expected ⌊s·rows·b⌋ = {want}"
        )
        assert bool(torch.isfinite(w).all()), f"SparseGPT on {case.name}: {name} has NaN/inf weights"
        # Pins llmcompressor's own count (one extra per block); if this fails upstream changed
        # its mask rule and the `exact` correction must be revisited.
        raw_w = _block_linears(raw)[name].weight.detach()
        assert _block_zero_counts(raw_w, 32) == [k + 1 for k in want], (
            f"SparseGPT s={sparsity} exact=False on {case.name}: {name} zeros per block "
            f"{_block_zero_counts(raw_w, 32)}; llmcompressor 0.14 gives ⌊s·rows·b⌋ + 1 = "
            f"{[k + 1 for k in want]}"
        )


def test_sparsegpt_2_4_structure_and_beats_magnitude(case: Case) -> None:
    dense = case.model
    sgpt, mag = copy.deepcopy(dense), copy.deepcopy(dense)
    compress_(sgpt, LLMC_METHODS["sparsegpt-2:4"], case.calibration)
    for name, m in _block_linears(sgpt).items():
        zeros = (m.weight.detach().reshape(m.out_features, -1, 4) == 0).sum(-1)
        assert bool((zeros == 2).all()), (
            f"SparseGPT 2:4 on {case.name}: {name} has groups with {zeros.unique()} zeros"
        )
    unstructured = copy.deepcopy(dense)
    compress_(unstructured, LLMC_METHODS["sparsegpt-50"], case.calibration)
    compress_(mag, MagnitudeConfig(0.5), None)
    err_sgpt = _output_errors(unstructured, dense, case.heldout)[1]
    err_mag = _output_errors(mag, dense, case.heldout)[1]
    assert err_sgpt < err_mag, (
        f"SparseGPT 50% on {case.name}: held-out logit error {err_sgpt:.3e} "
        f"not below magnitude's {err_mag:.3e}"
    )


def test_sparsegpt_block_sparsities_arithmetic() -> None:
    for rows, cols, s, bs in [
        (64, 256, 0.5, 128),
        (64, 200, 0.5, 128),
        (7, 64, 0.3, 32),
        (256, 64, 0.5, 128),
    ]:
        fixed = sparsegpt_block_sparsities(rows, cols, s, bs)
        assert fixed is not None, f"no corrected sparsity for {rows}x{cols} s={s} block {bs}"
        for start in range(0, cols, bs):
            n = rows * min(bs, cols - start)
            assert int(n * fixed) + 1 == math.floor(s * n), (
                f"{rows}x{cols} s={s} block {bs}: corrected {fixed} prunes {int(n * fixed) + 1}, "
                f"want {math.floor(s * n)}"
            )
    assert sparsegpt_block_sparsities(1, 1, 0.5, 128) is None, "a block that prunes nothing has no correction"


# ----------------------------------------------------------------------------
# the caller's model, records, bad input, missing library
# ----------------------------------------------------------------------------


def test_model_is_left_plain_and_record_round_trips(tmp_path: Path) -> None:
    case = _tiny_case("llama")
    model = case.model
    name_or_path = model.config.name_or_path
    save_fn = type(model).save_pretrained
    record = compress_(model, LlmcAwqConfig(w_bit=4), case.calibration)
    for n, m in model.named_modules():
        assert not hasattr(m, "quantization_scheme"), f"llmc AWQ left a quantization scheme on {n}"
        assert "forward" not in vars(m), f"llmc AWQ left a wrapped forward on {n}"
        assert not m._forward_hooks, f"llmc AWQ left forward hooks on {n}"
        assert not m._forward_pre_hooks, f"llmc AWQ left forward pre-hooks on {n}"
        assert not any(p.startswith("weight_") for p, _ in m.named_parameters(recurse=False)), (
            f"llmc AWQ left quantization parameters on {n}"
        )
    assert "save_pretrained" not in vars(model), "llmc AWQ replaced the model's save_pretrained"
    assert type(model).save_pretrained is save_fn, "llmc AWQ patched the model class's save_pretrained"
    assert model.config.name_or_path == name_or_path, "llmc AWQ changed config.name_or_path"
    # A fresh model with the same weights computes the same logits: nothing hidden remains.
    fresh = tiny_model("llama", n_layers=2, d_model=64, n_heads=4, seed=3)
    fresh.load_state_dict(model.state_dict())
    ids = torch.tensor([case.heldout[0]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits), "llmc AWQ model differs from its state dict"
    path = record.save(tmp_path / "rec")
    back = CompressionRecord.load(path.with_suffix(""))
    assert back.config == record.config, f"record round trip gave config {back.config}"
    assert back.method == "llmc-awq", f"record round trip gave method {back.method!r}"


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (LlmcAwqConfig(group_size=48), "group_size"),
        (LlmcWandaConfig(n_m=(2, 3)), "n_m"),
        (LlmcSparseGptConfig(n_m=(3, 5)), "n_m"),
    ],
    ids=["awq-group", "wanda-nm", "sparsegpt-nm"],
)
def test_bad_input_raises_before_anything_changes(config: Any, needle: str) -> None:
    case = _tiny_case("llama")
    before = _snapshot(case.model)
    with pytest.raises(InvalidArgumentError, match=needle):
        compress_(case.model, config, case.calibration)
    after = case.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), (
        f"{config} changed the model although it raised"
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda: LlmcAwqConfig(duo_scaling="yes"),
        lambda: LlmcAwqConfig(duo_scaling=True, n_grid=2),
        lambda: LlmcAwqConfig(w_bit=9),
        lambda: LlmcSparseGptConfig(dampening_frac=-0.1),
        lambda: LlmcSparseGptConfig(exact=1),
        lambda: LlmcWandaConfig(sparsity=1.0),
    ],
)
def test_bad_configs_raise(build: Callable[[], Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        build()


def test_missing_llmcompressor_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    case = _tiny_case("llama")
    before = _snapshot(case.model)
    monkeypatch.setattr(llmc_module, "llmc_available", lambda: False)
    with pytest.raises(InvalidArgumentError, match="'llmc' extra"):
        compress_(case.model, LlmcWandaConfig(), case.calibration)
    after = case.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), (
        "a missing-library error changed the model"
    )
