"""Candidate directions: extraction, save/load, comparison, split-half noise floor."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from refusal_core.activations import mean_activations
from refusal_core.aird import AirdConfig, apply_aird_
from refusal_core.directions import (
    Direction,
    DirectionCandidates,
    DirectionComparison,
    check_direction_origin,
    compare_candidates,
    extract_candidates,
    same_model,
    site_cosines,
    split_half_noise_floor,
)
from refusal_core.errors import (
    ArtifactError,
    EmptyInputError,
    ForeignDirectionError,
    InvalidArgumentError,
    ShapeMismatchError,
)
from refusal_core.functional import cosine_similarity
from refusal_core.model import model_identity
from refusal_core.testing.tiny import tiny_model, tiny_prompts, tiny_tokenizer

TOK = tiny_tokenizer()
HARMFUL = tiny_prompts(12, "harmful", seed=0)
HARMLESS = tiny_prompts(12, "harmless", seed=0)


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return tiny_model("llama", n_layers=3, dtype=torch.float64, seed=0)


@pytest.fixture(scope="module")
def cand(model) -> DirectionCandidates:  # type: ignore[no-untyped-def]
    return extract_candidates(model, TOK, HARMFUL, HARMLESS, batch_size=5)


def test_layer_zero_candidates_are_exactly_zero(cand: DirectionCandidates) -> None:
    # Block 0's input at the post-instruction positions is the embedding of the same template
    # tokens in every prompt, so the difference in means there is exactly zero.
    assert torch.equal(cand.directions[0], torch.zeros_like(cand.directions[0])), "layer 0 direction nonzero"
    assert bool((torch.linalg.vector_norm(cand.directions[1:], dim=-1) > 0).all()), (
        "a later direction is zero"
    )


def test_candidates_are_difference_of_class_means(model, cand: DirectionCandidates) -> None:  # type: ignore[no-untyped-def]
    harmful = mean_activations(model, TOK, HARMFUL, batch_size=12)
    harmless = mean_activations(model, TOK, HARMLESS, batch_size=12)
    ref = harmful - harmless
    err = float(torch.linalg.vector_norm(cand.directions - ref) / torch.linalg.vector_norm(ref))
    assert err < 1e-6, f"extract_candidates vs separate means: relative error {err:.2e}"
    assert torch.equal(cand.directions, cand.harmful_mean - cand.harmless_mean), "directions != hmf - hml"
    assert cand.positions == [-2, -1], f"positions {cand.positions}"
    assert (cand.n_harmful, cand.n_harmless) == (12, 12), "prompt counts"
    assert cand.model == model_identity(model), "candidates record another model identity"
    d = cand.direction(1, -1)
    assert torch.equal(d.vector, cand.directions[1, 1]), "direction(1, -1) is not column -1 of layer 1"


def test_save_load_roundtrip(tmp_path: Path, model, cand: DirectionCandidates) -> None:  # type: ignore[no-untyped-def]
    cand.save(tmp_path / "c")
    back = DirectionCandidates.load(tmp_path / "c", expect_identity=model)
    for name in ("directions", "harmful_mean", "harmless_mean"):
        assert torch.equal(getattr(back, name), getattr(cand, name)), f"{name} changed in the round trip"
    assert (back.positions, back.model) == (cand.positions, cand.model), "metadata changed in the round trip"
    assert back.settings == cand.settings, f"settings changed: {back.settings} vs {cand.settings}"
    d = cand.direction(0, -2)
    d.save(tmp_path / "d")
    d2 = Direction.load(tmp_path / "d", expect_identity=cand.model)
    assert torch.equal(d2.vector, d.vector), "Direction vector changed in the round trip"
    assert (d2.layer, d2.position) == (0, -2), f"Direction site changed: {(d2.layer, d2.position)}"


def test_load_rejects_corrupt_and_foreign(tmp_path: Path, cand: DirectionCandidates) -> None:
    path = cand.save(tmp_path / "c")
    other = model_identity(tiny_model("llama", dtype=torch.float64, seed=9))
    with pytest.raises(ArtifactError, match="identity"):
        DirectionCandidates.load(path, expect_identity=other)
    with pytest.raises(ArtifactError, match="does not exist"):
        DirectionCandidates.load(tmp_path / "nowhere")
    tensor_file = path.with_suffix(".safetensors")
    raw = bytearray(tensor_file.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the tensor data: shapes still parse
    tensor_file.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="hash"):
        DirectionCandidates.load(path)
    tensor_file.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated
    with pytest.raises(ArtifactError, match="corrupt"):
        DirectionCandidates.load(path)
    path2 = cand.save(tmp_path / "c2")
    path2.with_suffix(".json").write_text("{not json")
    with pytest.raises(ArtifactError, match="JSON"):
        DirectionCandidates.load(path2)
    # A consistent file whose directions were replaced (hash recomputed) is still caught.
    path3 = tmp_path / "c3"
    bad = DirectionCandidates(
        cand.directions + 1.0, cand.harmful_mean, cand.harmless_mean, 12, 12, [-2, -1], cand.model, {}
    )
    bad.save(path3)
    with pytest.raises(ArtifactError, match="harmful_mean - harmless_mean"):
        DirectionCandidates.load(path3)
    # An edited kind is an edit (the JSON's own hash); a valid artifact of another kind is named.
    header = json.loads(path3.with_suffix(".json").read_text())
    header["meta"]["kind"] = "Direction"
    path3.with_suffix(".json").write_text(json.dumps(header))
    with pytest.raises(ArtifactError, match=r"c3\.json was modified"):
        DirectionCandidates.load(path3)
    cand.direction(1, -1).save(tmp_path / "d")
    with pytest.raises(ArtifactError, match="not a DirectionCandidates"):
        DirectionCandidates.load(tmp_path / "d")


def test_site_cosines_agree_with_functional() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, 16, generator=gen), torch.randn(3, 2, 16, generator=gen)
    b[1, 0] = -2.5 * a[1, 0]
    cos = site_cosines(a, b)
    for layer in range(3):
        for i in range(2):
            ref = cosine_similarity(a[layer, i], b[layer, i])
            assert abs(float(cos[layer, i]) - ref) < 1e-12, (
                f"site ({layer},{i}): {float(cos[layer, i])} vs {ref}"
            )
    assert abs(float(cos[1, 0]) + 1.0) < 1e-12, f"anti-parallel site gives {float(cos[1, 0])}"
    b[2, 1] = 0.0
    assert math.isnan(float(site_cosines(a, b)[2, 1])), "zero vector site should be NaN"


def test_compare_candidates(cand: DirectionCandidates, tmp_path: Path) -> None:
    other = DirectionCandidates(
        cand.directions.flip(0),  # layers swapped: a deliberately different model
        cand.harmful_mean.flip(0),
        cand.harmless_mean.flip(0),
        12,
        12,
        [-2, -1],
        {"model_type": "llama", "name": "other"},
    )
    same = compare_candidates(cand, cand, base_source=(1, -1))
    assert torch.allclose(same.per_site_cosine[1:], torch.ones(2, 2, dtype=torch.float64), atol=1e-12), (
        f"self-comparison per-site cosine {same.per_site_cosine}"
    )
    assert bool(same.per_site_cosine[0].isnan().all()), "layer 0 (zero directions) should compare as NaN"
    assert same.source_shift is None, "no other source given, yet a source shift was reported"
    assert same.selected_cosine == same.cosine_at_base_source, "without other_source both cosines agree"
    cmp = compare_candidates(cand, other, base_source=(2, -1), other_source=(0, -2))
    # other[2] = cand[0], a zero direction: the cosine is undefined
    assert math.isnan(cmp.cosine_at_base_source), (
        f"base source vs zero direction: {cmp.cosine_at_base_source}"
    )
    cmp = compare_candidates(cand, other, base_source=(1, -1), other_source=(0, -2))
    ref_site = cosine_similarity(cand.directions[1, 1], cand.directions[1, 1])  # other[1] = cand[1]
    assert abs(cmp.cosine_at_base_source - ref_site) < 1e-12, "cosine at base source"
    ref_sel = cosine_similarity(cand.directions[1, 1], cand.directions[2, 0])  # other[0] = cand[2]
    assert abs(cmp.selected_cosine - ref_sel) < 1e-12, f"selected cosine {cmp.selected_cosine} vs {ref_sel}"
    assert cmp.source_shift == (-1, -1), f"source shift {cmp.source_shift}"
    cmp.save(tmp_path / "cmp")
    back = DirectionComparison.load(tmp_path / "cmp")
    same_cos = torch.allclose(back.per_site_cosine, cmp.per_site_cosine, rtol=0, atol=0, equal_nan=True)
    assert same_cos, "per-site cosines changed in the DirectionComparison round trip"
    assert back.source_shift == (-1, -1), f"source shift changed in the round trip: {back.source_shift}"
    with pytest.raises(InvalidArgumentError, match="base_source"):
        compare_candidates(cand, other, base_source=(3, -1))
    with pytest.raises(InvalidArgumentError, match="position"):
        compare_candidates(cand, other, base_source=(0, -3))
    short = DirectionCandidates(
        cand.directions[:1], cand.harmful_mean[:1], cand.harmless_mean[:1], 1, 1, [-2, -1], {}
    )
    with pytest.raises(ShapeMismatchError, match="shape"):
        compare_candidates(cand, short, base_source=(0, -1))


def test_noise_floor_high_for_separated_classes(model) -> None:  # type: ignore[no-untyped-def]
    harmful, harmless = tiny_prompts(48, "harmful", seed=3), tiny_prompts(48, "harmless", seed=3)
    floor = split_half_noise_floor(model, TOK, harmful, harmless, n_splits=3, seed=1, batch_size=32)
    assert (floor.shape, floor.dtype) == ((3, 2), torch.float64), f"floor {floor.dtype} {tuple(floor.shape)}"
    assert bool(floor[0].isnan().all()), f"layer 0 directions are zero, their cosine must be NaN: {floor}"
    assert bool(((floor[1:] >= -1) & (floor[1:] <= 1)).all()), f"floor outside [-1, 1]: {floor}"
    assert float(floor[1:].min()) > 0.8, f"well-separated classes should give a high floor: {floor}"


def test_noise_floor_low_for_random_split_of_one_class(model) -> None:  # type: ignore[no-untyped-def]
    pool = tiny_prompts(24, "harmless", seed=4)
    # "Harmful" and "harmless" drawn from the same class: directions are pure sampling noise.
    floor = split_half_noise_floor(model, TOK, pool[:12], pool[12:], n_splits=4, seed=0, batch_size=8)
    assert float(floor[1:].abs().max()) < 0.8, f"same-class halves should not agree strongly: {floor}"


def test_noise_floor_bad_input(model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EmptyInputError, match="at least 2"):
        split_half_noise_floor(model, TOK, HARMFUL[:1], HARMLESS)
    with pytest.raises(InvalidArgumentError, match="n_splits"):
        split_half_noise_floor(model, TOK, HARMFUL, HARMLESS, n_splits=0)
    with pytest.raises(EmptyInputError, match="harmless"):
        extract_candidates(model, TOK, HARMFUL, [])


# ----------------------------------------------------------------------------
# where a direction came from (issue 10, item 5)
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unrelated():  # type: ignore[no-untyped-def]
    """Another tiny model of the same family, depth and width: only the weights differ."""
    return tiny_model("llama", n_layers=3, dtype=torch.float64, seed=1)


def _pruned_copy(model):  # type: ignore[no-untyped-def]
    """The model with the smaller-magnitude half of block 0's o_proj zeroed, by hand."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        w = pruned.model.layers[0].self_attn.o_proj.weight
        cut = w.abs().flatten().kthvalue(w.numel() // 2).values
        w[w.abs() <= cut] = 0.0
    return pruned


def test_direction_from_an_unrelated_model_of_the_same_width_is_refused(
    cand: DirectionCandidates, unrelated
) -> None:  # type: ignore[no-untyped-def]
    target = model_identity(unrelated)
    assert target["d_model"] == cand.model["d_model"], "fixture: same width, so shapes alone cannot tell"
    assert target["n_layers"] == cand.model["n_layers"], "fixture: same depth"
    with pytest.raises(ForeignDirectionError, match="extracted from another model") as info:
        check_direction_origin(cand.model, unrelated)
    assert isinstance(info.value, ArtifactError), "ForeignDirectionError is an ArtifactError"
    assert not same_model(cand.model, unrelated), "same_model(seed 0 identity, seed 1 model)"


def test_direction_of_the_same_model_passes(model, cand: DirectionCandidates) -> None:  # type: ignore[no-untyped-def]
    check_direction_origin(cand.model, model)
    check_direction_origin(cand.model, copy.deepcopy(model))
    # The same weights loaded from another path are the same model.
    check_direction_origin({**cand.model, "name_or_path": "/elsewhere/copy"}, model_identity(model))
    assert same_model(cand.model, model), "same_model(identity of the model, the model)"


def test_fingerprint_tolerance_is_tight(model, cand: DirectionCandidates) -> None:  # type: ignore[no-untyped-def]
    def scaled(rel: float) -> dict:
        return {**cand.model, "fingerprint": [x * (1.0 + rel) for x in cand.model["fingerprint"]]}

    check_direction_origin(scaled(1e-12), model)  # float64 summation-order noise
    with pytest.raises(ForeignDirectionError):
        check_direction_origin(scaled(1e-7), model)  # far below what pruning or 8-bit rounding changes


def test_compressed_copy_passes_only_with_a_record_naming_its_base(
    model, cand: DirectionCandidates, unrelated
) -> None:  # type: ignore[no-untyped-def]
    pruned = _pruned_copy(model)
    with pytest.raises(ForeignDirectionError, match="base_identity"):
        check_direction_origin(cand.model, pruned)
    check_direction_origin(cand.model, pruned, model_record={"base_identity": model_identity(model)})
    with pytest.raises(ForeignDirectionError, match="than the base the target derives from"):
        check_direction_origin(cand.model, pruned, model_record={"base_identity": model_identity(unrelated)})
    with pytest.raises(ForeignDirectionError, match="names no usable base_identity"):
        check_direction_origin(cand.model, pruned, model_record={"method": "magnitude"})
    # The record cannot launder a direction onto an unrelated model either way round.
    with pytest.raises(ForeignDirectionError, match="than the base"):
        check_direction_origin(
            model_identity(unrelated), pruned, model_record={"base_identity": model_identity(model)}
        )


def test_override_allows_a_foreign_direction(cand: DirectionCandidates, unrelated) -> None:  # type: ignore[no-untyped-def]
    check_direction_origin(cand.model, unrelated, allow_foreign=True)
    check_direction_origin({}, unrelated, allow_foreign=True)
    with pytest.raises(InvalidArgumentError, match="allow_foreign"):
        check_direction_origin(cand.model, unrelated, allow_foreign="yes")  # type: ignore[arg-type]


def test_other_architecture_and_missing_identity_are_refused(model, cand: DirectionCandidates) -> None:  # type: ignore[no-untyped-def]
    shallow = tiny_model("llama", n_layers=2, dtype=torch.float64, seed=0)
    with pytest.raises(ForeignDirectionError, match="another architecture"):
        check_direction_origin(cand.model, shallow)
    with pytest.raises(ForeignDirectionError, match="another architecture"):
        check_direction_origin(cand.model, shallow, model_record={"base_identity": cand.model})
    with pytest.raises(ForeignDirectionError, match="no usable model identity"):
        check_direction_origin(Direction(torch.ones(32), 1, -1).model, model)
    with pytest.raises(ForeignDirectionError, match="fingerprint"):
        check_direction_origin({k: v for k, v in cand.model.items() if k != "fingerprint"}, model)
    with pytest.raises(InvalidArgumentError, match="direction_identity"):
        check_direction_origin("llama", model)  # type: ignore[arg-type]


def test_saved_candidates_and_direction_keep_their_origin(
    tmp_path: Path, model, cand: DirectionCandidates, unrelated
) -> None:  # type: ignore[no-untyped-def]
    cand.save(tmp_path / "c")
    back = DirectionCandidates.load(tmp_path / "c")
    check_direction_origin(back.model, model)
    with pytest.raises(ForeignDirectionError):
        check_direction_origin(back.model, unrelated)
    d = cand.direction(2, -1)
    d.save(tmp_path / "d")
    with pytest.raises(ForeignDirectionError):
        check_direction_origin(Direction.load(tmp_path / "d").model, unrelated)


def test_apply_aird_refuses_a_foreign_direction_before_editing(
    model, cand: DirectionCandidates, unrelated
) -> None:  # type: ignore[no-untyped-def]
    r = cand.directions[2, 1]
    target = copy.deepcopy(unrelated)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ForeignDirectionError):
        apply_aird_(target, r, 2, AirdConfig(), direction_identity=cand.model)
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused AIRD modified the model"
    # Without an identity a raw tensor is used as given (today's behaviour).
    apply_aird_(target, r, 2, AirdConfig())
    assert not torch.equal(
        before["model.layers.2.self_attn.o_proj.weight"],
        target.state_dict()["model.layers.2.self_attn.o_proj.weight"],
    ), "AIRD without direction_identity edits o_proj"
    # The paper's recipe: the base direction on a compressed copy that names its base.
    pruned = _pruned_copy(model)
    with pytest.raises(ForeignDirectionError):
        apply_aird_(pruned, r, 2, AirdConfig(), direction_identity=cand.model)
    rec = apply_aird_(
        pruned, r, 2, AirdConfig(), direction_identity=cand.model, model_record={"base_identity": cand.model}
    )
    assert rec.layer == 2, "AIRD with the base direction and a record naming the base runs"


def test_select_direction_refuses_foreign_candidates_before_scoring(  # type: ignore[no-untyped-def]
    model, cand: DirectionCandidates, unrelated
) -> None:
    from refusal_core.selection import select_direction, select_direction_naive

    tok = tiny_tokenizer()
    harm, safe = tiny_prompts(3, "harmful", seed=5), tiny_prompts(3, "harmless", seed=6)
    calls = {"n": 0}

    def count(*_args: object) -> None:
        calls["n"] += 1

    handle = unrelated.register_forward_pre_hook(count)
    try:
        for select in (select_direction, select_direction_naive):
            with pytest.raises(ForeignDirectionError, match="another model"):
                select(unrelated, tok, cand, harm, safe, [5, 6])
        assert calls["n"] == 0, "a foreign direction must be refused before any forward pass"
        res = select_direction(unrelated, tok, cand, harm, safe, [5, 6], allow_foreign=True)
        assert calls["n"] > 0
        assert res.bypass.shape == cand.directions.shape[:2], "with the override the scores are computed"
    finally:
        handle.remove()
    pruned = _pruned_copy(model)
    select_direction(pruned, tok, cand, harm, safe, [5, 6], model_record={"base_identity": cand.model})


def test_noise_floor_from_the_extraction_pass_equals_the_separate_functions(model) -> None:  # type: ignore[no-untyped-def]
    from refusal_core.directions import extract_candidates_with_noise_floor

    tok = tiny_tokenizer()
    harm, safe = tiny_prompts(7, "harmful", seed=3), tiny_prompts(6, "harmless", seed=4)
    calls = {"n": 0}

    def count(*_args: object) -> None:
        calls["n"] += 1

    handle = model.register_forward_pre_hook(count)
    try:
        cands, floor = extract_candidates_with_noise_floor(
            model, tok, harm, safe, n_splits=3, seed=11, batch_size=4
        )
        shared = calls["n"]
        calls["n"] = 0
        alone = extract_candidates(model, tok, harm, safe, batch_size=4)
        alone_floor = split_half_noise_floor(model, tok, harm, safe, n_splits=3, seed=11, batch_size=4)
        separate = calls["n"]
    finally:
        handle.remove()
    assert shared * 2 == separate, f"one pass ({shared} forwards) instead of two ({separate})"
    err = float((cands.directions - alone.directions).abs().max() / alone.directions.abs().max())
    assert err < 1e-12, f"directions from the shared pass differ from extract_candidates by {err:.1e}"
    both = torch.isfinite(alone_floor)
    assert torch.equal(torch.isfinite(floor), both), "the same sites are undefined (NaN)"
    ferr = float((floor[both] - alone_floor[both]).abs().max())
    assert ferr < 1e-12, f"noise floor from the shared pass differs from split_half_noise_floor by {ferr:.1e}"
    assert (cands.n_harmful, cands.n_harmless) == (7, 6)


def test_noise_floor_halves_are_disjoint(model) -> None:  # type: ignore[no-untyped-def]
    """With two prompts per class every half is one prompt, so a split's cosine must be that of two
    DISJOINT single-prompt directions: cos(h_i − s_j, h_(1−i) − s_(1−j)). Halves drawn with overlap
    (the same prompt in both) give a cosine outside that set. Checked for the standalone floor and
    for the one the study uses (from the extraction pass), over several seeds."""
    from refusal_core.directions import extract_candidates_with_noise_floor

    harm, safe = tiny_prompts(2, "harmful", seed=5), tiny_prompts(2, "harmless", seed=5)
    # Per-prompt class means: each prompt's own activations, read directly with a one-prompt group.
    acts = {}
    for name, prompt in [("h0", harm[0]), ("h1", harm[1]), ("s0", safe[0]), ("s1", safe[1])]:
        acts[name] = mean_activations(model, TOK, [prompt], batch_size=1).to(torch.float64)

    def site_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))

    # The two disjoint pairings, up to swapping halves A and B (the cosine is symmetric).
    allowed = [
        site_cos(acts["h0"] - acts["s0"], acts["h1"] - acts["s1"]),
        site_cos(acts["h0"] - acts["s1"], acts["h1"] - acts["s0"]),
    ]
    for seed in range(8):
        alone = split_half_noise_floor(model, TOK, harm, safe, n_splits=1, seed=seed, batch_size=4)
        _, shared = extract_candidates_with_noise_floor(
            model, TOK, harm, safe, n_splits=1, seed=seed, batch_size=4
        )
        for label, floor in (("split_half_noise_floor", alone), ("extraction pass", shared)):
            got = floor[1:].to(torch.float64)
            assert any(torch.allclose(got, a[1:], atol=1e-9) for a in allowed), (
                f"{label}, seed {seed}: floor {got.flatten()[:4].tolist()} is no cosine of two disjoint "
                f"halves {[a.flatten()[2:6].tolist() for a in allowed]}: the halves overlap"
            )
