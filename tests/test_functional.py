"""Example-based tests of the functional core: hand-computed values and bad input.

The properties in ``properties/`` pin the operations down in general; these examples show
the conventions on numbers small enough to check by hand (half-to-even rounding, the
zero-point clamp, the outlier split, the pruned count) and that every bad input raises the
documented error type with a message naming the argument, leaving the inputs untouched.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from refusal_core import functional as F
from refusal_core.errors import (
    EmptyInputError,
    InvalidArgumentError,
    NonFiniteError,
    RefusalCoreError,
    ShapeMismatchError,
    ZeroDirectionError,
)


def assert_tensor_equal(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-12) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, (
        f"{what}: shape {list(actual.shape)}, expected {list(expected.shape)}"
    )
    err = (
        float((actual.to(torch.float64) - expected.to(torch.float64)).abs().max()) if actual.numel() else 0.0
    )
    assert err <= atol, f"{what}: got {actual.tolist()}, expected {expected.tolist()} (max error {err:.3g})"


# ----------------------------------------------------------------------------
# hand-computed values
# ----------------------------------------------------------------------------


def test_difference_in_means_by_hand() -> None:
    harmful = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # mean [2, 3]
    harmless = torch.tensor([[0.0, 0.0], [2.0, 2.0], [4.0, 4.0]])  # mean [2, 2]
    out = F.difference_in_means(harmful, harmless)
    assert_tensor_equal(out, torch.tensor([0.0, 1.0], dtype=torch.float64), "difference_in_means")


def test_difference_in_means_keeps_position_axis_and_is_not_normalized() -> None:
    harmful = torch.full((3, 2, 4), 5.0)  # [prompts, positions, d]
    harmless = torch.ones(2, 2, 4)
    out = F.difference_in_means(harmful, harmless)
    assert_tensor_equal(out, torch.full((2, 4), 4.0, dtype=torch.float64), "difference_in_means [n, P, d]")


def test_ablate_by_hand() -> None:
    assert_tensor_equal(
        F.ablate(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0])), torch.tensor([3.0, 0.0]), "ablate"
    )
    x = torch.tensor([[1.0, 1.0], [2.0, -2.0]], dtype=torch.float64)
    out = F.ablate(x, torch.tensor([1.0, 1.0]))
    expected = torch.tensor([[0.0, 0.0], [2.0, -2.0]], dtype=torch.float64)
    assert_tensor_equal(out, expected, "ablate along [1, 1]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_ablate_keeps_dtype(dtype: torch.dtype) -> None:
    out = F.ablate(torch.tensor([[3.0, 4.0]], dtype=dtype), torch.tensor([0.0, 1.0]))
    assert_tensor_equal(out, torch.tensor([[3.0, 0.0]], dtype=dtype), f"ablate in {dtype}")


def test_add_direction_by_hand() -> None:
    out = F.add_direction(torch.zeros(2), torch.tensor([1.0, 2.0]), 0.5)
    assert_tensor_equal(out, torch.tensor([0.5, 1.0]), "add_direction")


def test_orthogonalize_weight_by_hand() -> None:
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = F.orthogonalize_weight(w, torch.tensor([1.0, 0.0]))
    assert_tensor_equal(
        out, torch.tensor([[0.0, 0.0], [3.0, 4.0]]), "orthogonalize_weight removes output row 0"
    )


def test_orthogonalize_embedding_by_hand() -> None:
    e = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = F.orthogonalize_embedding(e, torch.tensor([1.0, 0.0]))
    assert_tensor_equal(
        out, torch.tensor([[0.0, 2.0], [0.0, 4.0]]), "orthogonalize_embedding removes column 0"
    )


def test_aird_update_by_hand() -> None:
    w, r = torch.eye(2, dtype=torch.float64), torch.tensor([2.0, 0.0], dtype=torch.float64)
    # raw r: gain 1 + α‖r‖² = 1 + 0.25·4 = 2
    assert_tensor_equal(
        F.aird_update(w, r, 0.25), torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64), "raw"
    )
    # unit r: gain 1 + α = 1.25
    assert_tensor_equal(
        F.aird_update(w, r, 0.25, normalize=True),
        torch.tensor([[1.25, 0.0], [0.0, 1.0]], dtype=torch.float64),
        "normalize=True",
    )
    # α‖r‖² = −1 is weight orthogonalization
    assert_tensor_equal(F.aird_update(w, r, -0.25), F.orthogonalize_weight(w, r), "α‖r‖² = −1")


def test_aird_update_preserve_sparsity_by_hand() -> None:
    w, r = torch.eye(2), torch.tensor([1.0, 1.0])
    # dense update α r rᵀ w = [[1, 1], [1, 1]]
    assert_tensor_equal(F.aird_update(w, r, 1.0), torch.tensor([[2.0, 1.0], [1.0, 2.0]]), "dense")
    out = F.aird_update(w, r, 1.0, preserve_sparsity=True)
    assert_tensor_equal(out, torch.tensor([[2.0, 0.0], [0.0, 2.0]]), "preserve_sparsity")


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1.0, 0.0], [2.0, 0.0], 1.0),
        ([1.0, 0.0], [0.0, 3.0], 0.0),
        ([1.0, 1.0], [-1.0, -1.0], -1.0),
        ([3.0, 4.0], [4.0, 3.0], 24.0 / 25.0),
    ],
)
def test_cosine_similarity_by_hand(a: list[float], b: list[float], expected: float) -> None:
    out = F.cosine_similarity(torch.tensor(a), torch.tensor(b))
    assert isinstance(out, float), f"cosine_similarity returned {type(out).__name__}"
    assert abs(out - expected) <= 1e-7, f"cosine_similarity({a}, {b}) = {out}, expected {expected}"


def test_magnitude_mask_by_hand() -> None:
    w = torch.tensor([[1.0, -3.0], [0.5, 2.0]])
    expected = torch.tensor([[False, True], [False, True]])
    assert torch.equal(F.magnitude_mask(w, 0.5), expected), (
        f"magnitude_mask(w, 0.5) = {F.magnitude_mask(w, 0.5)}"
    )
    assert bool(F.magnitude_mask(w, 0.0).all()), "sparsity 0 keeps everything"
    # ⌊0.74·4⌋ = 2, not round(2.96) = 3
    assert int((~F.magnitude_mask(w, 0.74)).sum()) == 2, "the pruned count is ⌊s·numel⌋"


def test_magnitude_mask_exact_count_under_ties() -> None:
    mask = F.magnitude_mask(torch.ones(2, 2), 0.5)
    assert int((~mask).sum()) == 2, f"ties must still prune exactly ⌊s·numel⌋ = 2: {mask}"


def test_wanda_mask_by_hand() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([4.0, 1.0, 1.0, 1.0])
    # scores: row 0 [4, 2, 3, 4], row 1 [16, 3, 2, 1]
    expected = torch.tensor([[True, False, False, True], [True, True, False, False]])
    assert torch.equal(F.wanda_mask(w, norms, 0.5), expected), "unstructured 50%"
    assert torch.equal(F.wanda_mask(w, norms, 0.5, n_m=(2, 4)), expected), (
        "2:4 on one group equals 50% per row"
    )
    expected_1_2 = torch.tensor([[True, False, False, True], [True, False, True, False]])
    assert torch.equal(F.wanda_mask(w, norms, 0.5, n_m=(1, 2)), expected_1_2), "1:2 prunes one of each pair"


def test_int8_quantize_by_hand() -> None:
    w = torch.tensor([[127.0, -63.5, 0.0], [0.0, 0.0, 0.0], [2.54, 1.0, -0.5]], dtype=torch.float64)
    q, scale = F.int8_quantize(w)
    # −63.5 is an exact half step: round half to even gives −64
    expected_q = torch.tensor([[127, -64, 0], [0, 0, 0], [127, 50, -25]], dtype=torch.int8)
    assert torch.equal(q, expected_q), f"int8 codes {q.tolist()}, expected {expected_q.tolist()}"
    assert_tensor_equal(scale, torch.tensor([1.0, 0.0, 0.02], dtype=torch.float64), "int8 scales")


def test_int8_dequantize_by_hand() -> None:
    q = torch.tensor([[1, -2], [3, 0]], dtype=torch.int8)
    out = F.int8_dequantize(q, torch.tensor([0.5, 2.0]))
    assert_tensor_equal(out, torch.tensor([[0.5, -1.0], [6.0, 0.0]]), "int8_dequantize")


def test_llm_int8_linear_by_hand() -> None:
    x = torch.tensor([[1.0, 10.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    # w row 1: scale 2/127, −1 / (2/127) = −63.5 → −64, so its dequantized value is −128/127
    w1 = -128 / 127
    # τ = 6: feature 1 (|10| ≥ 6) is an outlier; feature 0 alone quantizes exactly
    expected = torch.tensor([[1.0 + 10.0, 2.0 + 10.0 * w1]], dtype=torch.float64)
    assert_tensor_equal(F.llm_int8_linear(x, w, 6.0), expected, "LLM.int8 with an outlier", atol=1e-12)
    # τ = inf: the token's scale is 10/127 and 1 → round(12.7) = 13 steps
    x0 = 13 * 10 / 127
    expected_inf = torch.tensor([[x0 + 10.0, 2 * x0 + 10.0 * w1]], dtype=torch.float64)
    assert_tensor_equal(
        F.llm_int8_linear(x, w, math.inf), expected_inf, "LLM.int8 without outliers", atol=1e-12
    )
    # τ = 0: every feature is an outlier, so x times the dequantized weight
    expected_0 = torch.tensor([[11.0, 2.0 + 10.0 * w1]], dtype=torch.float64)
    assert_tensor_equal(F.llm_int8_linear(x, w, 0.0), expected_0, "LLM.int8 all outliers", atol=1e-12)


def test_pseudo_quantize_symmetric_by_hand() -> None:
    w = torch.tensor([[7.0, -3.5, 1.0, 0.2]], dtype=torch.float64)
    out = F.pseudo_quantize(w, 4, 2, zero_point=False)
    # group [7, −3.5]: step 1, −3.5 → −4 (half to even); group [1, 0.2]: step 1/7, 1.4 → 1
    expected = torch.tensor([[7.0, -4.0, 1.0, 1.0 / 7.0]], dtype=torch.float64)
    assert_tensor_equal(out, expected, "symmetric 4-bit")


def test_pseudo_quantize_asymmetric_clamps_the_zero_point() -> None:
    w = torch.tensor([[0.0, 3.0, -1.0, 2.0, 2.0, 5.0]], dtype=torch.float64)
    out = F.pseudo_quantize(w, 2, 2, zero_point=True)
    # [0, 3] and [−1, 2] contain 0 and are exact; [2, 5] has zero = clamp(round(−2), 0, 3) = 0,
    # so 5 is clipped to code 3: the documented limit of groups that do not contain 0
    expected = torch.tensor([[0.0, 3.0, -1.0, 2.0, 2.0, 3.0]], dtype=torch.float64)
    assert_tensor_equal(out, expected, "asymmetric 2-bit")


def test_awq_scales_by_hand() -> None:
    w = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)
    x = torch.tensor([[1.0, 4.0, 0.1, 2.0], [3.0, 0.0, 0.3, 2.0]], dtype=torch.float64)
    ones = torch.ones(4, dtype=torch.float64)
    assert_tensor_equal(F.awq_scales(w, x, 4, 2, grid=1), ones, "grid 1 has only a = 0: s = 1")
    assert_tensor_equal(
        F.awq_scales(torch.zeros_like(w), x, 4, 2), ones, "all losses tie at w = 0: a = 0 wins"
    )
    s = F.awq_scales(w, x, 4, 2, grid=2)
    mean = torch.tensor([2.0, 2.0, 0.2, 2.0], dtype=torch.float64)
    t = mean.sqrt()
    candidate = t / torch.sqrt(t.max() * t.min())
    assert torch.allclose(s, ones) or torch.allclose(s, candidate), f"s = {s} is neither grid candidate"


def test_awq_apply_scales_with_unit_scale_is_pseudo_quantize() -> None:
    w = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)
    out = F.awq_apply_scales(w, torch.ones(4, dtype=torch.float64), 4, 2)
    assert_tensor_equal(out, F.pseudo_quantize(w, 4, 2), "Q(w·1)/1")


def test_refusal_score_by_hand() -> None:
    logits = torch.zeros(4)
    quarter = F.refusal_score(logits, [0])
    assert abs(float(quarter) - math.log((0.25 + 1e-8) / (0.75 + 1e-8))) < 1e-12, f"p = 1/4: {quarter}"
    assert abs(float(F.refusal_score(logits, [0, 1]))) < 1e-12, "p = 1/2 gives 0"
    full = F.refusal_score(logits, torch.arange(4))
    assert abs(float(full) - (math.log(1 + 1e-8) - math.log(1e-8))) < 1e-6, (
        f"p = 1 is finite (≈ 18.42): {full}"
    )
    assert full.dtype == torch.float64, f"refusal_score must be float64, got {full.dtype}"


def test_refusal_score_batches_over_leading_axes() -> None:
    logits = torch.zeros(2, 3, 5)
    out = F.refusal_score(logits, [1])
    assert out.shape == (2, 3), f"refusal_score of [2, 3, vocab] has shape {list(out.shape)}"


# ----------------------------------------------------------------------------
# bad input: type, message naming the argument, inputs untouched
# ----------------------------------------------------------------------------

X = torch.tensor([[1.0, 2.0, 3.0]])
R = torch.tensor([1.0, 0.0, 0.0])
W = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
NAN_X = torch.tensor([[1.0, float("nan"), 3.0]])

BAD_INPUTS = [
    ("ablate-zero r", ZeroDirectionError, "r", lambda: F.ablate(X, torch.zeros(3))),
    ("ablate-near-zero r", ZeroDirectionError, "r", lambda: F.ablate(X, torch.full((3,), 1e-12))),
    ("ablate-width", ShapeMismatchError, "r", lambda: F.ablate(X, torch.ones(4))),
    ("ablate-nan x", NonFiniteError, "x", lambda: F.ablate(NAN_X, R)),
    ("ablate-inf r", NonFiniteError, "r", lambda: F.ablate(X, torch.tensor([1.0, float("inf"), 0.0]))),
    ("add_direction-width", ShapeMismatchError, "r", lambda: F.add_direction(X, torch.ones(2), 1.0)),
    ("add_direction-coeff", NonFiniteError, "coeff", lambda: F.add_direction(X, R, float("nan"))),
    (
        "orthogonalize_weight-zero r",
        ZeroDirectionError,
        "r",
        lambda: F.orthogonalize_weight(W, torch.zeros(2)),
    ),
    ("orthogonalize_weight-width", ShapeMismatchError, "r", lambda: F.orthogonalize_weight(W, torch.ones(4))),
    (
        "orthogonalize_embedding-width",
        ShapeMismatchError,
        "r",
        lambda: F.orthogonalize_embedding(W, torch.ones(2)),
    ),
    ("aird_update-zero r", ZeroDirectionError, "r", lambda: F.aird_update(W, torch.zeros(2), 0.1)),
    ("aird_update-alpha", NonFiniteError, "alpha", lambda: F.aird_update(W, torch.ones(2), float("inf"))),
    (
        "difference_in_means-empty harmful",
        EmptyInputError,
        "harmful",
        lambda: F.difference_in_means(X[:0], X),
    ),
    (
        "difference_in_means-empty harmless",
        EmptyInputError,
        "harmless",
        lambda: F.difference_in_means(X, X[:0]),
    ),
    ("difference_in_means-width", ShapeMismatchError, "harmful", lambda: F.difference_in_means(X, W)),
    ("difference_in_means-nan", NonFiniteError, "harmful", lambda: F.difference_in_means(NAN_X, X)),
    ("cosine_similarity-zero a", ZeroDirectionError, "a", lambda: F.cosine_similarity(torch.zeros(3), R)),
    ("cosine_similarity-shape", ShapeMismatchError, "a", lambda: F.cosine_similarity(R, torch.ones(4))),
    ("magnitude_mask-sparsity 1", InvalidArgumentError, "sparsity", lambda: F.magnitude_mask(W, 1.0)),
    ("magnitude_mask-sparsity < 0", InvalidArgumentError, "sparsity", lambda: F.magnitude_mask(W, -0.1)),
    (
        "magnitude_mask-sparsity nan",
        InvalidArgumentError,
        "sparsity",
        lambda: F.magnitude_mask(W, float("nan")),
    ),
    ("wanda_mask-norms", ShapeMismatchError, "input_norms", lambda: F.wanda_mask(W, torch.ones(3), 0.5)),
    (
        "wanda_mask-negative norms",
        InvalidArgumentError,
        "input_norms",
        lambda: F.wanda_mask(W, -torch.ones(4), 0.5),
    ),
    ("wanda_mask-n_m", InvalidArgumentError, "n_m", lambda: F.wanda_mask(W, torch.ones(4), 0.5, n_m=(2, 3))),
    (
        "wanda_mask-n >= m",
        InvalidArgumentError,
        "n_m",
        lambda: F.wanda_mask(W, torch.ones(4), 0.5, n_m=(4, 4)),
    ),
    ("int8_quantize-nan", NonFiniteError, "w", lambda: F.int8_quantize(NAN_X)),
    ("int8_dequantize-dtype", InvalidArgumentError, "q", lambda: F.int8_dequantize(W, torch.ones(2))),
    (
        "int8_dequantize-scale",
        ShapeMismatchError,
        "scale",
        lambda: F.int8_dequantize(W.to(torch.int8), torch.ones(3)),
    ),
    ("llm_int8_linear-width", ShapeMismatchError, "x", lambda: F.llm_int8_linear(X, W)),
    ("llm_int8_linear-threshold", InvalidArgumentError, "threshold", lambda: F.llm_int8_linear(W, W, -1.0)),
    ("pseudo_quantize-group", InvalidArgumentError, "group_size", lambda: F.pseudo_quantize(W, 4, 3)),
    ("pseudo_quantize-bits", InvalidArgumentError, "w_bit", lambda: F.pseudo_quantize(W, 1, 2)),
    ("awq_scales-group", InvalidArgumentError, "group_size", lambda: F.awq_scales(W, W, 4, 3)),
    ("awq_scales-empty x", EmptyInputError, "x", lambda: F.awq_scales(W, W[:0], 4, 2)),
    ("awq_scales-width", ShapeMismatchError, "x", lambda: F.awq_scales(W, X, 4, 2)),
    ("refusal_score-empty ids", EmptyInputError, "refusal_token_ids", lambda: F.refusal_score(W, [])),
    ("refusal_score-id range", InvalidArgumentError, "refusal_token_ids", lambda: F.refusal_score(W, [4])),
    (
        "refusal_score-duplicate ids",
        InvalidArgumentError,
        "refusal_token_ids",
        lambda: F.refusal_score(W, [1, 1]),
    ),
    ("refusal_score-nan", NonFiniteError, "logits", lambda: F.refusal_score(NAN_X, [0])),
]


@pytest.mark.parametrize(("case", "error", "argument", "call"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_named_error(case: str, error: type[RefusalCoreError], argument: str, call) -> None:
    before = {name: t.clone() for name, t in (("X", X), ("R", R), ("W", W))}
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, ValueError), f"{case}: input errors are also ValueError"
    assert re.search(rf"(?<!\w){re.escape(argument)}(?!\w)", str(info.value)), (
        f"{case}: message {str(info.value)!r} does not name {argument!r}"
    )
    for name, t in (("X", X), ("R", R), ("W", W)):
        assert torch.equal(t, before[name]), f"{case}: {name} was modified"


def test_functions_never_mutate_inputs_on_success() -> None:
    x, r, w = X.clone(), R.clone(), W.clone()
    F.ablate(x, r)
    F.aird_update(w, torch.ones(2), 0.5, preserve_sparsity=True)
    F.wanda_mask(w, torch.ones(4), 0.5)
    F.pseudo_quantize(w, 4, 2)
    assert torch.equal(x, X), "ablate modified x"
    assert torch.equal(r, R), "ablate modified r"
    assert torch.equal(w, W), "an operation modified w"


# ----------------------------------------------------------------------------
# the scalar and dtype policy: what is accepted, exactly
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "coeff",
    [2, 2.0, torch.tensor(2.0), torch.tensor(2), torch.tensor(2.0, dtype=torch.float64)],
    ids=["int", "float", "0-d float tensor", "0-d int tensor", "0-d float64 tensor"],
)
def test_real_scalars_are_accepted_and_used_exactly(coeff: object) -> None:
    got = F.add_direction(torch.zeros(1, 3), torch.tensor([1.0, -0.5, 0.25]), coeff)
    assert_tensor_equal(got, torch.tensor([[2.0, -1.0, 0.5]]), f"add_direction with coeff={coeff!r}")


def test_numpy_scalars_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    for coeff in (np.float32(2.0), np.float64(2.0), np.int64(2)):
        got = F.aird_update(torch.eye(2), torch.tensor([1.0, 0.0]), coeff)
        assert_tensor_equal(got, torch.tensor([[3.0, 0.0], [0.0, 1.0]]), f"aird_update with alpha={coeff!r}")
    ids = [np.int64(0), np.int32(2)]
    got = F.refusal_score(torch.zeros(1, 4), ids)
    expected = math.log(0.5 + 1e-8) - math.log(0.5 + 1e-8)  # p = 2/4
    assert abs(float(got[0]) - expected) < 1e-12, f"refusal_score, numpy ids: {float(got[0])} != {expected}"


@pytest.mark.parametrize(
    "coeff",
    [True, None, "0.1", [0.1], torch.tensor([0.1]), torch.tensor(True), 1j],
    ids=["bool", "None", "str", "list", "1-element 1-d tensor", "0-d bool tensor", "complex"],
)
def test_loose_scalars_are_rejected_naming_the_argument(coeff: object) -> None:
    with pytest.raises(InvalidArgumentError, match=r"\bcoeff\b"):
        F.add_direction(X, R, coeff)


def test_threshold_accepts_infinity_but_not_nan() -> None:
    x, w = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0]])
    assert_tensor_equal(F.llm_int8_linear(x, w, math.inf), F.llm_int8_linear(x, w, 1e30), "threshold inf")
    with pytest.raises(NonFiniteError, match="threshold"):
        F.llm_int8_linear(x, w, math.nan)


def test_integer_tensors_are_rejected_not_truncated() -> None:
    xi = torch.tensor([[3, 4]])
    with pytest.raises(InvalidArgumentError, match=r"\bx\b.*torch.int64"):
        F.ablate(xi, torch.tensor([1.0, 0.0]))
    with pytest.raises(InvalidArgumentError, match=r"\bw\b.*torch.bool"):
        F.magnitude_mask(torch.tensor([[True, False]]), 0.5)


def test_overflowing_direction_norm_is_rejected_not_a_no_op() -> None:
    """‖(1.5e308, 1.5e308)‖ overflows float64: r̂ would be 0 and ablate would return x unchanged."""
    r = torch.tensor([1.5e308, 1.5e308], dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"\br\b.*overflows"):
        F.ablate(torch.tensor([[1.0, 2.0]]), r)
    # just below the limit the norm is finite and the ablation is exact
    r_ok = torch.tensor([1e308, 1e308], dtype=torch.float64)
    got = F.ablate(torch.tensor([[1.0, 3.0]], dtype=torch.float64), r_ok)
    assert_tensor_equal(got, torch.tensor([[-1.0, 1.0]], dtype=torch.float64), "ablate with r near the limit")


def test_refusal_ids_must_be_integers() -> None:
    for ids in ([1.7], [1.0], [True], torch.tensor([1.0]), "1", None):
        with pytest.raises(InvalidArgumentError, match="refusal_token_ids"):
            F.refusal_score(torch.zeros(1, 4), ids)
    got = F.refusal_score(torch.zeros(1, 4), torch.tensor([1, 3], dtype=torch.int32))
    assert abs(float(got[0])) < 1e-12, f"p = 1/2 gives score 0, got {float(got[0])}"


def test_aird_update_result_overflow_names_alpha() -> None:
    with pytest.raises(NonFiniteError, match=r"\balpha\b"):
        F.aird_update(torch.ones(2, 2), torch.tensor([2.0, 0.0]), 1e40)
