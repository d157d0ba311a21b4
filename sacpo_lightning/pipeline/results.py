"""The pipeline's headline numbers: the budget's lambda* and each evaluated model's measured safety and helpfulness.

Read from what the stages wrote (the budget stage's ``budget.json``, the evaluate stage's ``report.json``) and used
twice: in the model cards of the exports and in the pipeline's ``logger``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sacpo_lightning.evaluation.report import wilson_interval

__all__ = ["Measure", "budget_measures", "evaluation_measures", "measure_metrics"]


@dataclass
class Measure:
    """One headline number.

    Args:
        key: A stable metric name (``implicit_helpful_accuracy``).
        label: What it is, for a reader (``implicit-reward accuracy on helpfulness pairs (n=8)``).
        value: The number.
        interval: Its interval ``[low, high]`` (an end is None when unbounded), or None.
    """

    key: str
    label: str
    value: float
    interval: list[float | None] | None = None

    def card_entry(self) -> dict[str, Any]:
        """The form :func:`sacpo_lightning.models.card.build_model_card` takes for ``evaluation``."""
        return {"value": self.value, "interval": self.interval}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _pair(low: Any, high: Any) -> list[float | None] | None:
    low, high = _number(low), _number(high)
    return None if low is None and high is None else [low, high]


def budget_measures(budget: Mapping[str, Any]) -> list[Measure]:
    """lambda* (with its bootstrap interval), b, beta / lambda* and the predicted E[g] at lambda* of a
    ``budget.json``; empty when the budget found no lambda*."""
    lam = _number(budget.get("lambda_star"))
    if lam is None:
        return []
    level = (budget.get("interval") or {}).get("level")
    shown = f"{level:.0%} interval" if isinstance(level, int | float) else "interval"
    interval = budget.get("lambda_star_interval")
    out = [Measure("lambda_star", f"lambda* ({shown}, bootstrap)", lam,
                   _pair(*interval) if isinstance(interval, list | tuple) and len(interval) == 2 else None)]
    b = _number((budget.get("solution") or {}).get("b", (budget.get("inputs") or {}).get("b")))
    if b is not None:
        out.append(Measure("b", "b (target E[g])", b))
    beta = _number(budget.get("step2_beta"))
    if beta is not None:
        out.append(Measure("step2_beta", "beta / lambda* (step 2's KL coefficient)", beta))
    predicted = budget.get("predicted") or {}
    if _number(predicted.get("safety")) is not None:
        safety_interval = predicted.get("safety_interval")
        out.append(Measure("predicted_safety", "predicted E[g] at lambda*", float(predicted["safety"]),
                           _pair(*safety_interval) if isinstance(safety_interval, list | tuple) else None))
    return out


def _safety(entry: Mapping[str, Any]) -> Measure | None:
    """The measured safety of one model of ``report["safety"]["models"]``: the constraint's (mean P(safe) or the
    fraction of safe answers), else ``1 - unsafe rate`` of the primary unsafe judge."""
    constraint = entry.get("constraint") or {}
    if _number(constraint.get("safety")) is not None:
        what = "mean P(safe)" if constraint.get("source") == "mean_safety" else "fraction of safe answers"
        return Measure("safety", f"measured safety: {what} on the safety prompts ({constraint.get('judge')})",
                       float(constraint["safety"]), _pair(constraint.get("ci_low"), constraint.get("ci_high")))
    unsafe = entry.get("unsafe_rate") or {}
    if _number(unsafe.get("rate")) is None:
        return None
    low, high = _number(unsafe.get("ci_high")), _number(unsafe.get("ci_low"))
    return Measure("safety", f"measured safety: fraction of safe answers on the safety prompts ({unsafe.get('judge')})",
                   1.0 - float(unsafe["rate"]),
                   None if low is None or high is None else [1.0 - low, 1.0 - high])


def _implicit(result: Mapping[str, Any] | None, objective: str, confidence: float) -> Measure | None:
    """Implicit-reward accuracy with its interval: the report's own (``ci_low``/``ci_high``) when it has one, else
    the Wilson interval of the pairs counted as correct."""
    accuracy, n = _number((result or {}).get("accuracy")), (result or {}).get("num_pairs")
    if accuracy is None or not isinstance(n, int) or n < 1:
        return None
    interval = _pair(result.get("ci_low"), result.get("ci_high"))
    if interval is None:
        interval = list(wilson_interval(round(accuracy * n), n, confidence=confidence))
    pairs = "helpfulness" if objective == "helpful" else "safety"
    return Measure(f"implicit_{objective}_accuracy", f"implicit-reward accuracy on {pairs} pairs (n={n})",
                   accuracy, interval)


def evaluation_measures(report: Mapping[str, Any]) -> dict[str, list[Measure]]:
    """``{model: [Measure, ...]}`` from an evaluate stage's ``report.json``: measured safety (with interval), win rates
    against the baseline (with interval; not for the baseline itself) and implicit-reward accuracies (with
    interval), each where the evaluation measured it."""
    baseline = report.get("baseline")
    confidence = _number(report.get("confidence")) or 0.95
    safety_models = (report.get("safety") or {}).get("models") or {}
    out: dict[str, list[Measure]] = {}
    for name, entry in (report.get("models") or {}).items():
        found: list[Measure | None] = [_safety(safety_models.get(name) or {})]
        if name != baseline:
            for dimension in ("harmlessness", "helpfulness"):
                rate = entry.get(dimension) or {}
                if _number(rate.get("win_rate")) is not None:
                    found.append(Measure(f"{dimension}_win_rate", f"{dimension} win rate against {baseline}",
                                         float(rate["win_rate"]), _pair(rate.get("ci_low"), rate.get("ci_high"))))
        implicit = entry.get("implicit") or {}
        found += [_implicit(implicit.get(objective), objective, confidence) for objective in ("helpful", "safety")]
        measures = [m for m in found if m is not None]
        if measures:
            out[name] = measures
    return out


def _metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./\-]+", "_", text)


def measure_metrics(prefix: str, measures: list[Measure]) -> dict[str, float]:
    """Flat metrics for a logger: ``{prefix}/{key}`` and, with an interval, ``{prefix}/{key}_low`` / ``_high``."""
    metrics: dict[str, float] = {}
    for m in measures:
        name = f"{_metric_name(prefix)}/{m.key}"
        metrics[name] = m.value
        if m.interval is not None:
            for end, value in zip(("low", "high"), m.interval, strict=True):
                if value is not None:
                    metrics[f"{name}_{end}"] = value
    return metrics
