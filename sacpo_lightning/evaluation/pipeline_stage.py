"""The pipeline's evaluation stage: every produced model judged against the SFT model."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sacpo_lightning.evaluation.generation import GenerationSettings
from sacpo_lightning.io import atomic_write_json

EVALUATE_KEYS = {
    "reward_model", "cost_model", "prompts_safety", "prompts_helpful", "max_prompts", "generation", "implicit",
    "judges", "score_batch_size", "bootstrap_samples", "elo_shuffles", "safety_judges", "safety_threshold",
    "safety_constraint_on",
}
# A classifier safety judge may name the stage's own score model instead of a folder.
SCORE_MODEL_REFERENCES = ("cost_model", "reward_model")


def safety_judge_configs(config: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The ``evaluate.safety_judges`` list, with ``model: cost_model`` replaced by the stage's cost model folder.

    Raises:
        ValueError: Not a list of mappings, or a reference to a score model the stage does not have.
    """
    judges = config.get("safety_judges")
    if judges is None:
        return None
    if not isinstance(judges, list) or not all(isinstance(j, dict) for j in judges):
        raise ValueError("evaluate.safety_judges must be a list of mappings like {kind: refusal} or "
                         "{kind: classifier, model: cost_model}")
    out = []
    for i, judge in enumerate(judges):
        judge = dict(judge)
        if judge.get("model") in SCORE_MODEL_REFERENCES:
            folder = config.get(judge["model"])
            if not folder:
                raise ValueError(f"evaluate.safety_judges[{i}].model is {judge['model']!r} but evaluate."
                                 f"{judge['model']} is not set; set it or give a model folder")
            judge["model"] = str(folder)
        elif isinstance(judge.get("model"), str):
            judge["model"] = os.path.expanduser(os.path.expandvars(judge["model"]))
        out.append(judge)
    return out


def subset_prompts(path: str, max_prompts: int | None, out_dir: Path) -> str:
    """A deterministic, evenly spaced subset of a prompt file (keeps every category represented), or the file."""
    if not max_prompts:
        return path
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if len(rows) <= max_prompts:
        return path
    step = len(rows) / max_prompts
    picked = [rows[int(i * step)] for i in range(max_prompts)]
    out = out_dir / f"prompts_{Path(path).stem}_{max_prompts}.json"
    atomic_write_json(out, picked)
    return str(out)


def run_evaluation_stage(
    config: dict[str, Any], models: dict[str, str], stage_dir: Path, *, log: Callable[[str], None] = print,
    predicted_safety: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Generates on the prompt sets, scores with the reward and cost models, adds implicit-reward accuracy against
    the SFT model on held-out pairs, runs the per-answer safety judges of ``safety_judges`` (with the constraint
    check against ``safety_threshold``), and writes ``report.json``, ``report.md`` and ``pareto.png`` to ``stage_dir``.

    Args:
        config: The pipeline's ``evaluate`` mapping with model references already resolved to folders.
        models: ``{name: folder or Hub id}``; must contain ``sft`` (the baseline and implicit-reward reference).
        stage_dir: Output folder of the stage.
    """
    from sacpo_lightning.evaluation.evaluate import evaluate_models

    stage_dir.mkdir(parents=True, exist_ok=True)
    sft = models["sft"]
    from sacpo_lightning.models import resolve_model_path

    models = {name: resolve_model_path(spec) for name, spec in models.items()}
    generation = GenerationSettings(**(config.get("generation") or {}))
    prompts = {
        key: subset_prompts(os.path.expanduser(os.path.expandvars(config[key])), config.get("max_prompts"), stage_dir)
        if config.get(key) else None
        for key in ("prompts_safety", "prompts_helpful")
    }
    safety_judges = safety_judge_configs(config)
    judges = list(config.get("judges") or ["reward_cost", "implicit"])
    implicit_sets = None
    if "implicit" in judges:
        implicit_sets = {name: dict(spec) for name, spec in (config.get("implicit") or {}).items()}
        for spec in implicit_sets.values():
            spec.setdefault("tokenizer", models["sft"])
        if not implicit_sets:
            judges.remove("implicit")
    training_logs = {}
    for name, folder in models.items():
        logs = sorted(Path(folder).parent.glob("logs/version_*/metrics.csv"))
        if logs:
            training_logs[name] = str(logs[-1])
    log(f"  evaluating {len(models)} models ({', '.join(models)}) against sft={sft} with judges {judges}")
    report = evaluate_models(
        models, "sft", prompts["prompts_safety"], prompts["prompts_helpful"],
        config.get("reward_model"), config.get("cost_model"), stage_dir, generation,
        judges=judges, implicit_sets=implicit_sets, implicit_reference=models["sft"], training_logs=training_logs,
        score_batch_size=int(config.get("score_batch_size", 8)),
        bootstrap_samples=int(config.get("bootstrap_samples", 1000)), elo_shuffles=int(config.get("elo_shuffles", 100)),
        safety_judges=safety_judges,
        safety_threshold=None if config.get("safety_threshold") is None else float(config["safety_threshold"]),
        safety_constraint_on=config.get("safety_constraint_on", "verdicts"), predicted_safety=predicted_safety,
    )
    log(f"  report: {stage_dir / 'report.md'}")
    return {"report": str(stage_dir / "report.json"), "models": sorted(report.get("models", {}))}
