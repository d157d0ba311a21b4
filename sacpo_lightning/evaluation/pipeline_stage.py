"""The pipeline's evaluation stage: every produced model judged against the SFT model."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sacpo_lightning.data.prompts import DEFAULT_XSTEST_PROMPTS, load_prompts, load_xstest_prompts
from sacpo_lightning.evaluation.evaluate import SUITES, EvaluationSettings
from sacpo_lightning.evaluation.generation import GenerationSettings
from sacpo_lightning.io import atomic_write_json

# ``evaluate:`` keys that are EvaluationSettings fields (key -> field); the others the stage reads itself.
SETTINGS_KEYS = {
    "reward_model": "reward_model_dir", "cost_model": "cost_model_dir", "judges": "judges",
    "score_batch_size": "score_batch_size", "score_dtype": "score_dtype", "bootstrap_samples": "bootstrap_samples",
    "confidence": "confidence", "elo_shuffles": "elo_shuffles", "elo_k": "elo_k", "tie_eps": "tie_eps",
    "safety_threshold": "safety_threshold", "safety_constraint_on": "safety_constraint_on", "suites": "suites",
    "xstest_prompts": "xstest_prompts", "xstest_per_type": "xstest_per_type",
}
STAGE_KEYS = {"prompts_safety", "prompts_helpful", "max_prompts", "generation", "implicit", "safety_judges"}
EVALUATE_KEYS = set(SETTINGS_KEYS) | STAGE_KEYS
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


def check_suites(config: dict[str, Any]) -> None:
    """Checks the suite keys of an ``evaluate`` mapping (``suites``, ``xstest_prompts``, ``xstest_per_type``) and
    reads the XSTest prompt file, so that a mistake stops the pipeline before any training.

    Raises:
        ValueError: Naming the key (or the prompt file and line) and how to fix it.
    """
    suites = config.get("suites") or []
    if not isinstance(suites, list) or any(s not in SUITES for s in suites):
        raise ValueError(f"evaluate.suites must be a list of {', '.join(SUITES)}, got {config.get('suites')!r}")
    per_type = config.get("xstest_per_type")
    if per_type is not None and (isinstance(per_type, bool) or not isinstance(per_type, int) or per_type < 1):
        raise ValueError(f"evaluate.xstest_per_type must be an integer >= 1 (or absent for every prompt), got "
                         f"{per_type!r}")
    if "xstest" not in suites:
        if per_type is not None or config.get("xstest_prompts") is not None:
            raise ValueError("evaluate.xstest_prompts and evaluate.xstest_per_type set the XSTest suite; add "
                             "suites: [xstest]")
        return
    path = config.get("xstest_prompts") or DEFAULT_XSTEST_PROMPTS
    if not isinstance(path, str):
        raise ValueError(f"evaluate.xstest_prompts must be a path, got {path!r}")
    load_xstest_prompts(os.path.expanduser(os.path.expandvars(path)), option="evaluate.xstest_prompts")


def subset_prompts(path: str, max_prompts: int | None, out_dir: Path) -> str:
    """A deterministic, evenly spaced subset of a prompt file (keeps every category represented), or the file.

    Raises:
        ValueError: From :func:`~sacpo_lightning.data.prompts.load_prompts`, naming a malformed row.
    """
    if not max_prompts:
        return path
    rows = load_prompts(path)
    if len(rows) <= max_prompts:
        return path
    step = len(rows) / max_prompts
    picked = [rows[int(i * step)] for i in range(max_prompts)]
    out = out_dir / f"prompts_{Path(path).stem}_{max_prompts}.json"
    atomic_write_json(out, picked)
    return str(out)


def _scalar(key: str, value: Any, kind: type) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"evaluate.{key} must be a {kind.__name__}, got {value!r}") from None


def evaluation_settings(
    config: dict[str, Any], models: dict[str, str], stage_dir: Path, *,
    predicted_safety: dict[str, dict[str, Any]] | None = None,
) -> EvaluationSettings:
    """The :class:`~sacpo_lightning.evaluation.evaluate.EvaluationSettings` of the pipeline's ``evaluate`` mapping.

    Args:
        config: The ``evaluate`` mapping with model references already resolved to folders.
        models: ``{name: resolved folder}``; ``sft`` is the implicit-reward reference and tokenizer.
        stage_dir: Output folder of the stage (prompt subsets of ``max_prompts`` go there).
        predicted_safety: The budget solver's predictions, per model name.

    Raises:
        ValueError: A value of the wrong type or out of range.
    """
    prompts = {
        key: subset_prompts(os.path.expanduser(os.path.expandvars(config[key])), config.get("max_prompts"), stage_dir)
        if config.get(key) else None
        for key in ("prompts_safety", "prompts_helpful")
    }
    judges = list(config.get("judges") or ["reward_cost", "implicit"])
    implicit_sets = None
    if "implicit" in judges:
        implicit_sets = {name: dict(spec) for name, spec in (config.get("implicit") or {}).items()}
        for spec in implicit_sets.values():
            spec.setdefault("tokenizer", models["sft"])
        if not implicit_sets:
            judges.remove("implicit")
    kinds = {"score_batch_size": int, "bootstrap_samples": int, "elo_shuffles": int, "confidence": float,
             "elo_k": float, "tie_eps": float, "safety_threshold": float}
    values = {SETTINGS_KEYS[key]: _scalar(key, value, kinds[key]) if key in kinds else value
              for key, value in config.items() if key in SETTINGS_KEYS and value is not None}
    values["judges"] = judges
    if values.get("xstest_prompts"):
        values["xstest_prompts"] = os.path.expanduser(os.path.expandvars(values["xstest_prompts"]))
    return EvaluationSettings(
        **prompts, generation=GenerationSettings(**(config.get("generation") or {})), implicit_sets=implicit_sets,
        implicit_reference=models["sft"], safety_judges=safety_judge_configs(config),
        predicted_safety=predicted_safety, **values,
    )


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
    from sacpo_lightning.evaluation import evaluate
    from sacpo_lightning.models import resolve_model_path

    stage_dir.mkdir(parents=True, exist_ok=True)
    sft = models["sft"]
    models = {name: resolve_model_path(spec) for name, spec in models.items()}
    settings = evaluation_settings(config, models, stage_dir, predicted_safety=predicted_safety)
    training_logs = {}
    for name, folder in models.items():
        logs = sorted(Path(folder).parent.glob("logs/version_*/metrics.csv"))
        if logs:
            training_logs[name] = str(logs[-1])
    settings.training_logs = training_logs
    log(f"  evaluating {len(models)} models ({', '.join(models)}) against sft={sft} with judges {settings.judges}")
    report = evaluate.evaluate_models(models, "sft", output_dir=stage_dir, **settings.keywords())
    log(f"  report: {stage_dir / 'report.md'}")
    return {"report": str(stage_dir / "report.json"), "models": sorted(report.get("models", {}))}
