"""Implementations that the meta-tests run the property suite against.

* ``wrong_*``: the reference with one deliberately wrong function (the module docstring
  says what is wrong). :data:`WRONG` lists, for each, the protocol function it breaks and
  the property tests that must fail for it (``file::test`` or ``file::test[case]``).
* ``correct_float32``: correct, but computing differently from the reference; the whole
  suite, differential checks included, must pass it.
* ``partial_two``: provides only ``ablate`` and ``cosine_similarity``; the tests of the
  other functions must skip, naming the missing function.
* ``lenient_three``: three correct functions, no input validation and no
  ``RAISES_REFUSAL_CORE_ERRORS``: no failure in a plain run (the bad-input policy does not
  apply); with ``-m bad_input`` the tests in :data:`LENIENT_FAILS_WHEN_SELECTED` must fail.
"""

from __future__ import annotations

ABL = "test_ablation.py::"
ORTH = "test_orthogonalization.py::"
AIRD = "test_aird.py::"
DIR = "test_directions.py::"
PRUNE = "test_pruning.py::"
INT8 = "test_int8.py::"
GROUP = "test_group_quantization.py::"
SCORE = "test_refusal_score.py::"
DIFF = "test_differential.py::"
BAD = "test_bad_input.py::test_rejects_bad_input"

#: module name -> (protocol function it breaks, property tests that must fail)
WRONG: dict[str, tuple[str, tuple[str, ...]]] = {
    "wrong_difference_in_means_normalized": (
        "difference_in_means",
        (
            DIR + "test_difference_in_means_matches_float64_formula",
            DIR + "test_difference_in_means_is_linear",
            DIFF + "test_difference_in_means_agrees_with_reference",
        ),
    ),
    "wrong_difference_in_means_accepts_empty": (
        "difference_in_means",
        (BAD + "[difference_in_means-empty_harmful]", BAD + "[difference_in_means-empty_harmless]"),
    ),
    "wrong_ablate_unnormalized": (
        "ablate",
        (
            ABL + "test_ablate_is_idempotent",
            ABL + "test_ablate_leaves_no_component_along_r",
            ABL + "test_ablate_commutes_with_positive_rescaling_of_r",
            ABL + "test_ablate_matches_float64_formula",
            DIFF + "test_ablate_agrees_with_reference",
        ),
    ),
    "wrong_ablate_sign": (
        "ablate",
        (
            ABL + "test_ablate_is_idempotent",
            ABL + "test_ablate_leaves_no_component_along_r",
            ABL + "test_ablate_ignores_added_multiples_of_r",
            ABL + "test_ablate_matches_float64_formula",
            DIFF + "test_ablate_agrees_with_reference",
        ),
    ),
    "wrong_ablate_in_place": (
        "ablate",
        (ABL + "test_ablate_is_idempotent", ABL + "test_ablate_matches_float64_formula"),
    ),
    "wrong_ablate_no_zero_check": ("ablate", (BAD + "[ablate-zero_direction]",)),
    "wrong_add_direction_normalized": (
        "add_direction",
        (
            ABL + "test_add_direction_matches_float64_formula",
            DIFF + "test_add_direction_agrees_with_reference",
        ),
    ),
    "wrong_add_direction_in_place": (
        "add_direction",
        (ABL + "test_add_direction_matches_float64_formula", ABL + "test_add_direction_is_additive_in_coeff"),
    ),
    "wrong_add_direction_aliases_input": (
        "add_direction",
        (ABL + "test_add_direction_is_additive_in_coeff",),
    ),
    "wrong_orthogonalize_weight_wrong_side": (
        "orthogonalize_weight",
        (
            ORTH + "test_orthogonalize_weight_leaves_no_component_along_r",
            ORTH + "test_orthogonalize_weight_equals_ablating_its_outputs",
            DIFF + "test_orthogonalize_weight_agrees_with_reference",
        ),
    ),
    "wrong_orthogonalize_weight_vague_error": (
        "orthogonalize_weight",
        (BAD + "[orthogonalize_weight-zero_direction]",),
    ),
    "wrong_orthogonalize_embedding_wrong_side": (
        "orthogonalize_embedding",
        (
            ORTH + "test_orthogonalize_embedding_leaves_rows_orthogonal_to_r",
            ORTH + "test_orthogonalize_embedding_ablates_every_row",
            ORTH + "test_orthogonalize_embedding_is_transposed_weight_orthogonalization",
            DIFF + "test_orthogonalize_embedding_agrees_with_reference",
        ),
    ),
    "wrong_aird_always_normalized": (
        "aird_update",
        (
            AIRD + "test_aird_update_gain_along_r",
            AIRD + "test_aird_update_at_gain_zero_equals_orthogonalize_weight",
            DIFF + "test_aird_update_agrees_with_reference",
        ),
    ),
    "wrong_aird_ignores_preserve_sparsity": (
        "aird_update",
        (
            AIRD + "test_aird_update_sparse_keeps_zero_pattern",
            AIRD + "test_aird_update_sparse_equals_masked_dense_update",
            DIFF + "test_aird_update_agrees_with_reference",
        ),
    ),
    "wrong_aird_sign": (
        "aird_update",
        (
            AIRD + "test_aird_update_gain_along_r",
            AIRD + "test_aird_update_at_gain_zero_equals_orthogonalize_weight",
            DIFF + "test_aird_update_agrees_with_reference",
        ),
    ),
    "wrong_cosine_absolute": (
        "cosine_similarity",
        (
            DIR + "test_cosine_similarity_is_odd_under_negation",
            DIR + "test_cosine_similarity_matches_float64_formula",
            DIFF + "test_cosine_similarity_agrees_with_reference",
        ),
    ),
    "wrong_cosine_unclamped": ("cosine_similarity", (DIR + "test_cosine_similarity_lies_in_unit_interval",)),
    "wrong_magnitude_off_by_one": (
        "magnitude_mask",
        (
            PRUNE + "test_magnitude_mask_prunes_exact_count_per_matrix",
            DIFF + "test_magnitude_mask_agrees_with_reference",
        ),
    ),
    "wrong_magnitude_per_row": (
        "magnitude_mask",
        (
            PRUNE + "test_magnitude_mask_prunes_exact_count_per_matrix",
            PRUNE + "test_magnitude_mask_prunes_only_the_smallest",
            DIFF + "test_magnitude_mask_agrees_with_reference",
        ),
    ),
    "wrong_magnitude_accepts_full_sparsity": (
        "magnitude_mask",
        (BAD + "[magnitude_mask-sparsity_out_of_range]",),
    ),
    "wrong_wanda_global_threshold": (
        "wanda_mask",
        (
            # a global threshold still prunes the smallest of each row, just not ⌊s·in⌋ of them
            PRUNE + "test_wanda_mask_prunes_exact_count_per_row",
            PRUNE + "test_wanda_mask_with_equal_input_norms_equals_row_magnitude",
            DIFF + "test_wanda_mask_agrees_with_reference",
        ),
    ),
    "wrong_wanda_ignores_input_norms": (
        "wanda_mask",
        (
            PRUNE + "test_wanda_mask_prunes_only_the_smallest_scores_per_row",
            DIFF + "test_wanda_mask_agrees_with_reference",
        ),
    ),
    "wrong_wanda_n_m_strided": (
        "wanda_mask",
        (
            PRUNE + "test_wanda_mask_n_m_structure",
            PRUNE + "test_wanda_mask_prunes_only_the_smallest_scores_per_row",
        ),
    ),
    "wrong_wanda_unchecked_n_m": ("wanda_mask", (BAD + "[wanda_mask-n_m_does_not_divide_width]",)),
    "wrong_int8_global_scale": (
        "int8_quantize",
        (
            INT8 + "test_int8_quantize_matches_definition",
            INT8 + "test_int8_round_trip_within_half_step",
            DIFF + "test_int8_quantize_agrees_with_reference",
        ),
    ),
    "wrong_int8_truncates": (
        "int8_quantize",
        (
            INT8 + "test_int8_quantize_matches_definition",
            INT8 + "test_int8_round_trip_within_half_step",
            DIFF + "test_int8_quantize_agrees_with_reference",
        ),
    ),
    "wrong_int8_dequantize_column_scale": (
        "int8_dequantize",
        (
            INT8 + "test_int8_dequantize_matches_formula",
            INT8 + "test_int8_round_trip_within_half_step",
            DIFF + "test_int8_dequantize_agrees_with_reference",
        ),
    ),
    "wrong_llm_int8_strict_threshold": ("llm_int8_linear", (INT8 + "test_llm_int8_threshold_is_inclusive",)),
    "wrong_llm_int8_global_activation_scale": (
        "llm_int8_linear",
        (
            INT8 + "test_llm_int8_infinite_threshold_equals_vectorwise_int8",
            INT8 + "test_llm_int8_outlier_decomposition_matches_simulation",
            DIFF + "test_llm_int8_linear_agrees_with_reference",
        ),
    ),
    "wrong_llm_int8_unquantized_outlier_weights": (
        "llm_int8_linear",
        (
            INT8 + "test_llm_int8_zero_threshold_equals_dequantized_matmul",
            INT8 + "test_llm_int8_outlier_decomposition_matches_simulation",
            DIFF + "test_llm_int8_linear_agrees_with_reference",
        ),
    ),
    "wrong_pseudo_quantize_unclamped_zero": (
        "pseudo_quantize",
        (
            GROUP + "test_pseudo_quantize_matches_float64_formula",
            DIFF + "test_pseudo_quantize_agrees_with_reference",
        ),
    ),
    "wrong_pseudo_quantize_symmetric_full_range": (
        "pseudo_quantize",
        (
            GROUP + "test_pseudo_quantize_matches_float64_formula",
            DIFF + "test_pseudo_quantize_agrees_with_reference",
        ),
    ),
    "wrong_pseudo_quantize_floor": (
        "pseudo_quantize",
        (
            GROUP + "test_pseudo_quantize_symmetric_round_trip_within_half_step",
            GROUP + "test_pseudo_quantize_asymmetric_round_trip_within_half_step_on_groups_with_zero",
            GROUP + "test_pseudo_quantize_matches_float64_formula",
            DIFF + "test_pseudo_quantize_agrees_with_reference",
        ),
    ),
    "wrong_awq_max_instead_of_mean": (
        "awq_scales",
        (GROUP + "test_awq_scales_picks_the_loss_minimizing_exponent",),
    ),
    "wrong_awq_last_on_ties": ("awq_scales", (GROUP + "test_awq_scales_first_exponent_wins_ties",)),
    "wrong_awq_unnormalized": ("awq_scales", (GROUP + "test_awq_scales_picks_the_loss_minimizing_exponent",)),
    "wrong_refusal_score_no_eps": (
        "refusal_score",
        (
            SCORE + "test_refusal_score_matches_float64_formula",
            DIFF + "test_refusal_score_agrees_with_reference",
        ),
    ),
    "wrong_refusal_score_uses_logits": (
        "refusal_score",
        (
            SCORE + "test_refusal_score_matches_float64_formula",
            SCORE + "test_refusal_score_is_monotone_in_refusal_logits",
            DIFF + "test_refusal_score_agrees_with_reference",
        ),
    ),
    "wrong_refusal_score_first_id_only": (
        "refusal_score",
        (
            SCORE + "test_refusal_score_matches_float64_formula",
            DIFF + "test_refusal_score_agrees_with_reference",
        ),
    ),
    "wrong_refusal_score_plain_error": ("refusal_score", (BAD + "[refusal_score-empty_ids]",)),
}

#: the correct outside implementation and the two-function one
CORRECT = "correct_float32"
PARTIAL = "partial_two"
PARTIAL_PROVIDES = ("ablate", "cosine_similarity")
LENIENT = "lenient_three"
LENIENT_PROVIDES = ("ablate", "add_direction", "cosine_similarity")
#: bad-input tests a module that validates nothing fails once the run selects the marker
LENIENT_FAILS_WHEN_SELECTED = (
    BAD + "[ablate-zero_direction]",
    BAD + "[add_direction-nonfinite_coeff]",
    BAD + "[cosine_similarity-nonfinite_a]",
)
