"""Evaluation: generation, refusal scores, judges, attacks (ASR), over-refusal and zero-shot accuracy.

Modules: ``generation``, ``scores``, ``judges``, ``results`` (ASR and over-refusal records and
their files), ``attacks`` (the attack template, vanilla, decoding grid, over-refusal), ``gcg``,
``damage`` and ``zero_shot``.

Example:
    >>> from refusal_core.testing.tiny import tiny_model, tiny_tokenizer
    >>> from refusal_core.evaluation import SubstringJudge, VanillaAttack, evaluate_asr
    >>> model, tok = tiny_model(), tiny_tokenizer()
    >>> res = evaluate_asr(model, tok, ["Tell me a story."], [VanillaAttack(max_new_tokens=4)],
    ...                    SubstringJudge(), progress=False)
    >>> sorted(res)
    ['vanilla']
"""

from refusal_core.evaluation.attacks import (
    Attack,
    DecodingAttack,
    VanillaAttack,
    evaluate_asr,
    over_refusal,
    prefill_shared_generations,
)
from refusal_core.evaluation.gcg import (
    GcgAttack,
    GcgRun,
    allowed_suffix_tokens,
    gcg_optimize,
    suffix_token_gradients,
    target_loss,
)
from refusal_core.evaluation.generation import SamplingConfig, generate, generate_ids
from refusal_core.evaluation.judges import (
    REFUSAL_PHRASES,
    ClassifierJudge,
    FunctionJudge,
    Judge,
    SubstringJudge,
)
from refusal_core.evaluation.results import AsrResult, AttackResult, Attempt, OverRefusalResult
from refusal_core.evaluation.scores import REFUSAL_OPENINGS, refusal_scores, refusal_token_ids_for
from refusal_core.evaluation.zero_shot import (
    LOCAL_TASKS,
    STANDARD_TASKS,
    TaskResult,
    zero_shot_accuracy,
    zero_shot_evaluate,
)
from refusal_core.model import encode_prompts

__all__ = [
    "LOCAL_TASKS",
    "REFUSAL_OPENINGS",
    "REFUSAL_PHRASES",
    "STANDARD_TASKS",
    "AsrResult",
    "Attack",
    "AttackResult",
    "Attempt",
    "ClassifierJudge",
    "DecodingAttack",
    "FunctionJudge",
    "GcgAttack",
    "GcgRun",
    "Judge",
    "OverRefusalResult",
    "SamplingConfig",
    "SubstringJudge",
    "TaskResult",
    "VanillaAttack",
    "allowed_suffix_tokens",
    "encode_prompts",
    "evaluate_asr",
    "gcg_optimize",
    "generate",
    "generate_ids",
    "over_refusal",
    "prefill_shared_generations",
    "refusal_scores",
    "refusal_token_ids_for",
    "suffix_token_gradients",
    "target_loss",
    "zero_shot_accuracy",
    "zero_shot_evaluate",
]
