"""Evaluation: generation, judges, win rates and reports.

- :mod:`~sacpo_lightning.evaluation.generation`: batched, cached generation on prompt sets (folders and mixtures).
- :mod:`~sacpo_lightning.evaluation.score_models`: loading and scoring reward/cost models (their training modules are
  :mod:`sacpo_lightning.modules.score`).
- :mod:`~sacpo_lightning.evaluation.implicit`: implicit-reward preference accuracy on held-out pairs.
- :mod:`~sacpo_lightning.evaluation.judge`: pairwise LLM judge (HTTP endpoint or local model), cached.
- :mod:`~sacpo_lightning.evaluation.safety_judges`: per-answer safety judges (guard LM, classifier, refusal rules).
- :mod:`~sacpo_lightning.evaluation.report`: win rates, bootstrap intervals, Elo, safety rates, report files and plots.
- :mod:`~sacpo_lightning.evaluation.settings`: :class:`EvaluationSettings`, what an evaluation runs (the flags of
  ``sacpo evaluate`` and the keys of a pipeline's ``evaluate:`` section).
- :mod:`~sacpo_lightning.evaluation.evaluate`: :func:`evaluate_models`, the whole evaluation in one call.

Submodules are imported on first use, so ``import sacpo_lightning.evaluation`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GenerationSettings": "generation",
    "generate_responses": "generation",
    "generate_to_file": "generation",
    "load_generation_model": "generation",
    "ScoreModel": "score_models",
    "PairwiseJudge": "judge",
    "OpenAIChatBackend": "judge",
    "HFLocalBackend": "judge",
    "SafetyJudge": "safety_judges",
    "GuardJudge": "safety_judges",
    "ClassifierJudge": "safety_judges",
    "RefusalJudge": "safety_judges",
    "build_safety_judge": "safety_judges",
    "build_safety_judges": "safety_judges",
    "win_rate_summary": "report",
    "elo_ratings": "report",
    "safety_section": "report",
    "predicted_vs_measured": "report",
    "write_report": "report",
    "EvaluationSettings": "settings",
    "evaluate_models": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
