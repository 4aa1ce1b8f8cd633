"""The study: does compression break the refusal direction, and can AIRD repair it?

- :mod:`~refusal_core.study.config` — what a study depends on (:class:`StudyConfig` and its parts);
- :mod:`~refusal_core.study.sweep` — the AIRD strength sweep and the rule that picks a strength;
- :mod:`~refusal_core.study.run` — the resumable stages and :func:`run_study`;
- :mod:`~refusal_core.study.results` — the typed results (:class:`StudyResults`, one
  :class:`VariantResult` per model) that results.json holds;
- :mod:`~refusal_core.study.report` — results.json, report.md and the plots.
"""

from refusal_core.study.config import DEFAULT_METHODS, AttackSettings, RepairConfig, StudyConfig
from refusal_core.study.results import (
    AsrChange,
    BaseSummary,
    Comparison,
    Comparisons,
    DamageSummary,
    EvaluationSummary,
    MechanismSummary,
    RepairSummary,
    StudyResults,
    SweepSummary,
    VariantResult,
)
from refusal_core.study.run import default_refusal_token_ids, load_variant_model, run_study
from refusal_core.study.sweep import RepairChoice, SweepPoint, ValidationScores, choose_repair

__all__ = [
    "DEFAULT_METHODS",
    "AsrChange",
    "AttackSettings",
    "BaseSummary",
    "Comparison",
    "Comparisons",
    "DamageSummary",
    "EvaluationSummary",
    "MechanismSummary",
    "RepairChoice",
    "RepairConfig",
    "RepairSummary",
    "StudyConfig",
    "StudyResults",
    "SweepPoint",
    "SweepSummary",
    "ValidationScores",
    "VariantResult",
    "choose_repair",
    "default_refusal_token_ids",
    "load_variant_model",
    "run_study",
]
