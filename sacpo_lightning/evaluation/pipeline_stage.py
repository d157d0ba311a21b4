"""The pipeline's evaluation stage: every produced model judged against the SFT model."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sacpo_lightning.data.prompts import BUDGET_HALF, EVALUATION_HALF, load_prompts
from sacpo_lightning.errors import UserError
from sacpo_lightning.evaluation import evaluate
from sacpo_lightning.evaluation.safety_judges import parse_safety_judge_arg
from sacpo_lightning.evaluation.settings import SETTINGS_KEYS, EvaluationSettings
from sacpo_lightning.io import atomic_write_json

# The ``evaluate:`` keys: the fields of EvaluationSettings, and the stage's own ``max_prompts`` (an evenly spaced
# subset of each prompt set), ``max_helpful_prompts`` (the helpfulness set's, default max_prompts) and
# ``safety_prompts_half`` (0 or 1: only the even or odd rows of prompts_safety; a safety budget on the same file sets
# it, see BudgetSpec.heldout_evaluation). ``reward_model`` and ``cost_model`` may also be a training spec
# ({configs, overrides}): the pipeline trains that score model in its own stage and the field then holds the stage's
# export folder.
STAGE_KEYS = frozenset({"max_prompts", "max_helpful_prompts", "safety_prompts_half"})
EVALUATE_KEYS = SETTINGS_KEYS | STAGE_KEYS
# What the stage uses where its ``evaluate:`` mapping leaves a setting unset.
STAGE_DEFAULT_JUDGES = ("reward_cost", "implicit")
# A classifier safety judge may name the stage's own score model instead of a folder.
SCORE_MODEL_REFERENCES = ("cost_model", "reward_model")


def safety_judge_configs(config: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The ``evaluate.safety_judges`` list as judge configs (``KIND[:MODEL]`` strings parsed), with ``model:
    cost_model`` (or ``reward_model``) replaced by the stage's score model folder.

    Raises:
        ValueError: Not a list of strings and mappings, or a reference to a score model the stage does not have.
    """
    judges = config.get("safety_judges")
    if judges is None:
        return None
    if not isinstance(judges, list) or not all(isinstance(j, dict | str) for j in judges):
        raise UserError("evaluate.safety_judges must be a list of KIND[:MODEL] strings or mappings like "
                        "{kind: refusal} or {kind: classifier, model: cost_model}")
    out = []
    for i, judge in enumerate(judges):
        judge = dict(judge) if isinstance(judge, dict) else parse_safety_judge_arg(judge)
        if judge.get("model") in SCORE_MODEL_REFERENCES:
            folder = config.get(judge["model"])
            if not folder:
                raise UserError(f"evaluate.safety_judges[{i}].model is {judge['model']!r} but evaluate."
                                f"{judge['model']} is not set; set it or give a model folder")
            judge["model"] = str(folder)
        elif isinstance(judge.get("model"), str):
            judge["model"] = os.path.expanduser(os.path.expandvars(judge["model"]))
        out.append(judge)
    return out


def subset_prompts(path: str, max_prompts: int | None, out_dir: Path, *, half: int | None = None) -> str:
    """A deterministic, evenly spaced subset of a prompt file (keeps every category represented), or the file.

    With ``half`` (0 or 1) only the rows at even (0) or odd (1) positions of the file are candidates: two users of one
    file with different halves get disjoint prompts.

    Raises:
        ValueError: From :func:`~sacpo_lightning.data.prompts.load_prompts`, naming a malformed row.
    """
    if not max_prompts and half is None:
        return path
    rows = load_prompts(path)
    if half is not None:
        if half not in (0, 1):
            raise ValueError(f"half must be 0 or 1, got {half!r}")
        rows = rows[half::2]
    if max_prompts and len(rows) > max_prompts:
        step = len(rows) / max_prompts
        rows = [rows[int(i * step)] for i in range(max_prompts)]
    elif half is None:
        return path
    suffix = "" if half is None else f"_{'even' if half == 0 else 'odd'}"
    out = out_dir / f"prompts_{Path(path).stem}{suffix}_{len(rows)}.json"
    atomic_write_json(out, rows)
    return str(out)


def evaluation_settings(
    config: dict[str, Any], models: dict[str, str], stage_dir: Path | None, *,
    predicted_safety: dict[str, dict[str, Any]] | None = None,
) -> EvaluationSettings:
    """The :class:`~sacpo_lightning.evaluation.settings.EvaluationSettings` of the pipeline's ``evaluate`` mapping.

    Its keys are the settings' fields (and ``max_prompts``). What the mapping leaves unset the stage fills in:
    ``judges`` defaults to reward_cost and implicit (implicit only with ``implicit`` pair sets), the implicit pair
    sets read with the SFT model's tokenizer, ``implicit_reference`` is the SFT model, ``training_logs`` are the
    evaluated stages' ``metrics.csv`` files and ``predicted_safety`` the budget solver's predictions.

    Args:
        config: The ``evaluate`` mapping with model references already resolved to folders.
        models: ``{name: resolved folder}``; ``sft`` is the implicit-reward reference and tokenizer.
        stage_dir: Output folder of the stage (prompt subsets of ``max_prompts`` go there); None only checks the
            mapping (the prompt files are not subset).
        predicted_safety: The budget solver's predictions, per model name.

    Raises:
        UserError: An unknown key (named, with the known ones), or a value of the wrong type or out of range.
    """
    unknown = sorted(set(config) - EVALUATE_KEYS)
    if unknown:
        raise UserError(f"evaluate: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(EVALUATE_KEYS))}")
    max_prompts = config.get("max_prompts")
    if max_prompts is not None and (isinstance(max_prompts, bool) or not isinstance(max_prompts, int)
                                    or max_prompts < 1):
        raise UserError(f"evaluate.max_prompts must be an integer >= 1 (or absent for every prompt), got "
                        f"{max_prompts!r}")
    max_helpful = config.get("max_helpful_prompts", max_prompts)
    if max_helpful is not None and (isinstance(max_helpful, bool) or not isinstance(max_helpful, int)
                                    or max_helpful < 1):
        raise UserError(f"evaluate.max_helpful_prompts must be an integer >= 1 (or absent for max_prompts), got "
                        f"{max_helpful!r}")
    half = config.get("safety_prompts_half")
    if half not in (None, BUDGET_HALF, EVALUATION_HALF):
        raise UserError(f"evaluate.safety_prompts_half must be 0 (even rows), 1 (odd rows) or absent, got {half!r}")
    values = {key: value for key, value in config.items() if key in SETTINGS_KEYS and value is not None}
    for key, limit, part in (("prompts_safety", max_prompts, half), ("prompts_helpful", max_helpful, None)):
        if isinstance(values.get(key), str) and values[key] not in ("", "none", "None"):
            path = os.path.expanduser(os.path.expandvars(values[key]))
            values[key] = path if stage_dir is None else subset_prompts(path, limit, stage_dir, half=part)
    judges = list(values.get("judges") or STAGE_DEFAULT_JUDGES)
    if isinstance(values.get("implicit"), dict):
        values["implicit"] = {name: {"tokenizer": models["sft"], **spec} if isinstance(spec, dict) else spec
                              for name, spec in values["implicit"].items()}
    if "judges" not in values and not values.get("implicit"):
        judges.remove("implicit")
    values["judges"] = judges
    values.setdefault("implicit_reference", models["sft"])
    values["safety_judges"] = safety_judge_configs(config) or []
    if predicted_safety:
        values["predicted_safety"] = {**(values.get("predicted_safety") or {}), **predicted_safety}
    try:
        return EvaluationSettings(**values)
    except UserError as err:
        raise UserError(f"evaluate: {err}") from None


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
    from sacpo_lightning.models import resolve_model_path

    stage_dir.mkdir(parents=True, exist_ok=True)
    sft = models["sft"]
    models = {name: resolve_model_path(spec) for name, spec in models.items()}
    if config.get("training_logs") is None:
        training_logs = {}
        for name, folder in models.items():
            logs = sorted(Path(folder).parent.glob("logs/version_*/metrics.csv"))
            if logs:
                training_logs[name] = str(logs[-1])
        config = {**config, "training_logs": training_logs}
    settings = evaluation_settings(config, models, stage_dir, predicted_safety=predicted_safety)
    log(f"  evaluating {len(models)} models ({', '.join(models)}) against sft={sft} with judges {settings.judges}")
    report = evaluate.evaluate_models(models, "sft", stage_dir, settings)
    log(f"  report: {stage_dir / 'report.md'}")
    return {"report": str(stage_dir / "report.json"), "models": sorted(report.get("models", {}))}
