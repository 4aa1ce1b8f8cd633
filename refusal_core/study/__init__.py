"""The study: does compression break the refusal direction, and can AIRD repair it?

- :mod:`~refusal_core.study.config` — what a study depends on (:class:`StudyConfig` and its parts);
- :mod:`~refusal_core.study.sweep` — the AIRD strength sweep and the rule that picks a strength;
- :mod:`~refusal_core.study.run` — :func:`run_study`: the steps of :mod:`refusal_core.bench` in order;
- :mod:`~refusal_core.study.schemas` — what each stage's JSON file must hold;
- :mod:`~refusal_core.study.results` — the typed results (:class:`StudyResults`, one
  :class:`VariantResult` per model) that results.json holds;
- :mod:`~refusal_core.study.report` — results.json, report.md and the plots.
"""

from typing import TYPE_CHECKING, Any

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
from refusal_core.study.sweep import RepairChoice, SweepPoint, ValidationScores, choose_repair

if TYPE_CHECKING:
    from refusal_core.study.run import default_refusal_token_ids, load_variant_model, run_study

#: Names served by :mod:`refusal_core.study.run`, imported on first use: the run is built on
#: :mod:`refusal_core.bench`, which itself reads this package's config and results.
_FROM_RUN = ("default_refusal_token_ids", "load_variant_model", "run_study")


def __getattr__(name: str) -> Any:
    if name in _FROM_RUN:
        from refusal_core.study import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
