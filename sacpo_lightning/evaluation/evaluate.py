"""Evaluating several models against a baseline: generations, judges, win rates, Elo and the report.

Judges (any combination):

``reward_cost``  A reward model scores responses to the helpfulness prompts and a cost model responses to the safety
                 prompts (:class:`~sacpo_lightning.evaluation.score_models.ScoreModel`). On each prompt a response
                 wins over the baseline's when its reward (helpfulness) or its negative cost (harmlessness) is higher;
                 equal within ``tie_eps`` is a tie. Elo is computed over all models, round-robin on every prompt.
``llm``          A pairwise LLM judge (:class:`~sacpo_lightning.evaluation.judge.PairwiseJudge`) compares each
                 model's response with the baseline's, with the helpfulness rubric on the helpfulness prompts and the
                 harmlessness rubric on the safety prompts. Elo uses these model-versus-baseline matches.
``implicit``     Implicit-reward preference accuracy of each model against a reference on held-out pairs
                 (:mod:`~sacpo_lightning.evaluation.implicit`); needs no generation.

Everything expensive is cached under ``output_dir``: generations (``generations/<set>/<model>.jsonl``), scores
(``scores/<set>/<model>.<reward|cost>.json``, keyed by the generation file and the score model's files) and LLM
judgements (``judgements.jsonl``), so a rerun with one more model only pays for that model.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from sacpo_lightning.evaluation.generation import (
    GenerationSettings,
    generate_to_file,
    model_fingerprint,
    parse_model_spec,
    read_generations,
)
from sacpo_lightning.evaluation.report import (
    category_win_rates,
    elo_ratings,
    outcome,
    win_rate_summary,
    write_report,
)
from sacpo_lightning.io import atomic_write_json, file_fingerprint

__all__ = ["JUDGES", "default_model_name", "evaluate_models", "parse_named_models"]

JUDGES = ("reward_cost", "llm", "implicit")
SETS = ("helpful", "safety")
DIMENSION = {"helpful": "helpfulness", "safety": "harmlessness"}


def default_model_name(spec: str) -> str:
    """A short name for a model spec: the folder name, or ``A+B@q`` for a mixture."""
    parsed = parse_model_spec(spec)
    names = [Path(p.rstrip("/")).name or p for p in parsed.paths]
    return names[0] if not parsed.is_mixture else f"{names[0]}+{names[1]}@{parsed.q:g}"


def parse_named_models(items: Sequence[str]) -> dict[str, str]:
    """``["sft=DIR", "DIR2", ...]`` to ``{name: spec}`` (the name defaults to :func:`default_model_name`).

    Raises:
        ValueError: Two models with one name.
    """
    models: dict[str, str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or item.startswith("mix:"):
            name, spec = default_model_name(item), item
        if name in models:
            raise ValueError(f"Two models are named {name!r}; name them explicitly as NAME=SPEC")
        models[name] = spec
    return models


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _score_file(
    scorer_dir: str,
    generation_path: Path,
    cache_path: Path,
    state: dict[str, Any],
    score_kwargs: Mapping[str, Any],
) -> list[float]:
    """Scores of a generation file with the score model at ``scorer_dir``, cached next to the report."""
    key = hashlib.sha256(json.dumps([file_fingerprint(generation_path), model_fingerprint(
        parse_model_spec(scorer_dir)), dict(score_kwargs)], sort_keys=True).encode()).hexdigest()[:16]
    if cache_path.is_file():
        cached = json.loads(cache_path.read_text())
        if cached.get("key") == key:
            return cached["scores"]
    if state.get("scorer") is None:
        from sacpo_lightning.evaluation.score_models import ScoreModel

        state["scorer"] = ScoreModel.from_pretrained(scorer_dir, **score_kwargs)
    rows = read_generations(generation_path)
    scores = state["scorer"].score([r["prompt"] for r in rows], [r["response"] for r in rows])
    atomic_write_json(cache_path, {"key": key, "score_model": scorer_dir, "scores": scores})
    return scores


def _check_aligned(gens: Mapping[str, list[dict[str, Any]]], baseline: str, set_name: str) -> None:
    base_prompts = [r["prompt"] for r in gens[baseline]]
    for name, rows in gens.items():
        if [r["prompt"] for r in rows] != base_prompts:
            raise ValueError(f"Generations of {name!r} on the {set_name} prompts do not match the baseline's prompts")


def _outcome_summaries(
    outcomes: list[float], categories: list[str | None] | None, stats: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    summary = win_rate_summary(outcomes, **stats)
    by_category = None
    if categories is not None and any(c is not None for c in categories):
        by_category = category_win_rates(outcomes, categories, **stats)
    return summary, by_category


def evaluate_models(
    models: Mapping[str, str],
    baseline: str,
    prompts_safety: str | os.PathLike | None,
    prompts_helpful: str | os.PathLike | None,
    reward_model_dir: str | None,
    cost_model_dir: str | None,
    output_dir: str | os.PathLike,
    generation: GenerationSettings | None = None,
    *,
    judges: Sequence[str] = ("reward_cost",),
    llm_judge: Any | None = None,
    implicit_sets: Mapping[str, Mapping[str, Any]] | None = None,
    implicit_reference: str | None = None,
    training_logs: Mapping[str, str | os.PathLike] | None = None,
    score_batch_size: int = 8,
    score_dtype: str | None = None,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    elo_shuffles: int = 100,
    elo_k: float = 32.0,
    seed: int = 0,
    tie_eps: float = 1e-6,
) -> dict[str, Any]:
    """Generates (cached), judges, computes win rates against the baseline and Elo, and writes the report.

    Args:
        models: ``{name: model spec}`` (folders or ``mix:A+B@q``), the baseline included.
        baseline: Name of the baseline in ``models`` (usually the SFT model), or a spec that is added under its
            default name.
        prompts_safety: Safety prompt set (harmlessness), e.g. ``eval/safety_problem.json``; None skips it.
        prompts_helpful: Helpfulness prompt set, e.g. ``eval/helpful_problem.json``; None skips it.
        reward_model_dir: Reward model folder for the ``reward_cost`` judge (None: no helpfulness scores).
        cost_model_dir: Cost model folder for the ``reward_cost`` judge (None: no harmlessness scores).
        output_dir: Where generations, caches and the report go.
        generation: Decoding settings.
        judges: Any of ``reward_cost``, ``llm``, ``implicit`` (see the module docstring).
        llm_judge: A :class:`~sacpo_lightning.evaluation.judge.PairwiseJudge` for ``llm``.
        implicit_sets: ``{name: pair_dataloader keyword arguments}`` for ``implicit``.
        implicit_reference: Model spec of the implicit-reward reference (default: the baseline's spec).
        training_logs: ``{stage: metrics.csv}`` for ``training_curves.png``.
        score_batch_size: Batch size of the score models.
        score_dtype: Load dtype of the score models (None: as saved).
        bootstrap_samples: Bootstrap resamples of the win-rate intervals.
        confidence: Confidence level of the intervals.
        elo_shuffles: Random match orders averaged by Elo.
        elo_k: Elo update size.
        seed: Seed of the bootstrap and the Elo orders.
        tie_eps: Score differences within this are ties.

    Returns:
        The report dict (also written to ``report.json``; see :func:`sacpo_lightning.evaluation.report.write_report`).
    """
    unknown = [j for j in judges if j not in JUDGES]
    if unknown or not judges:
        raise ValueError(f"--judge must be one or more of {', '.join(JUDGES)}; got {list(judges)}")
    models = dict(models)
    if baseline not in models:
        name = default_model_name(baseline)
        if name not in models:
            models = {name: baseline, **models}
        baseline = name
    output_dir = Path(output_dir)
    generation = generation or GenerationSettings()
    stats = {"n_resamples": bootstrap_samples, "confidence": confidence, "seed": seed}
    prompt_files = {k: v for k, v in (("helpful", prompts_helpful), ("safety", prompts_safety)) if v is not None}
    needs_generation = any(j in judges for j in ("reward_cost", "llm"))
    if needs_generation and not prompt_files:
        raise ValueError("The reward_cost and llm judges need --prompts_safety and/or --prompts_helpful")
    if "llm" in judges and llm_judge is None:
        raise ValueError("--judge llm needs a judge backend (--judge_url or --judge_local)")
    if "reward_cost" in judges and reward_model_dir is None and cost_model_dir is None:
        raise ValueError("--judge reward_cost needs --reward_model and/or --cost_model")

    report: dict[str, Any] = {
        "baseline": baseline,
        "judges": list(judges),
        "confidence": confidence,
        "models": {name: {"spec": spec} for name, spec in models.items()},
        "elo": {},
        "settings": {"max_new_tokens": generation.max_new_tokens, "do_sample": generation.do_sample,
                     "template": generation.template, "seed": seed},
    }
    entries = report["models"]

    # Generations, one model loaded at a time.
    gens: dict[str, dict[str, list[dict[str, Any]]]] = {}
    gen_paths: dict[str, dict[str, Path]] = {}
    if needs_generation:
        for set_name, prompts in prompt_files.items():
            gen_paths[set_name] = {}
            for name, spec in models.items():
                path = output_dir / "generations" / set_name / f"{name}.jsonl"
                generate_to_file(spec, prompts, path, generation, name=name)
                gen_paths[set_name][name] = path
                _free()
            gens[set_name] = {name: read_generations(p) for name, p in gen_paths[set_name].items()}
            _check_aligned(gens[set_name], baseline, set_name)
            for name in models:
                entries[name].setdefault("generations", {})[set_name] = str(gen_paths[set_name][name])

    # Reward and cost scores.
    if "reward_cost" in judges:
        score_kwargs = {"batch_size": score_batch_size, "dtype": score_dtype}
        scores: dict[str, dict[str, dict[str, list[float]]]] = {"reward": {}, "cost": {}}
        for kind, scorer_dir in (("reward", reward_model_dir), ("cost", cost_model_dir)):
            if scorer_dir is None:
                continue
            state: dict[str, Any] = {}
            for set_name in gens:
                scores[kind][set_name] = {
                    name: _score_file(str(scorer_dir), gen_paths[set_name][name],
                                      output_dir / "scores" / set_name / f"{name}.{kind}.json", state, score_kwargs)
                    for name in models
                }
            state.clear()
            _free()
        for set_name in gens:
            for name in models:
                summary = entries[name].setdefault("scores", {}).setdefault(set_name, {})
                if set_name in scores["reward"]:
                    values = scores["reward"][set_name][name]
                    summary["mean_reward"] = sum(values) / len(values)
                if set_name in scores["cost"]:
                    values = scores["cost"][set_name][name]
                    summary["mean_cost"] = sum(values) / len(values)
                    summary["unsafe_fraction"] = sum(1 for c in values if c > 0) / len(values)
        # Helpfulness by reward on the helpful prompts, harmlessness by -cost on the safety prompts.
        for set_name, kind, sign in (("helpful", "reward", 1.0), ("safety", "cost", -1.0)):
            if set_name not in scores[kind]:
                continue
            values = {name: [sign * s for s in v] for name, v in scores[kind][set_name].items()}
            categories = [r.get("category") for r in gens[set_name][baseline]]
            dimension = DIMENSION[set_name]
            for name in models:
                outcomes = [outcome(s, b, eps=tie_eps) for s, b in zip(values[name], values[baseline], strict=True)]
                summary, by_category = _outcome_summaries(outcomes, categories, stats)
                entries[name][dimension] = summary
                if by_category is not None and set_name == "safety":
                    entries[name]["harmlessness_by_category"] = by_category
            names = list(models)
            matches = [(a, b, outcome(values[a][i], values[b][i], eps=tie_eps))
                       for i in range(len(values[baseline])) for j, a in enumerate(names) for b in names[j + 1 :]]
            report["elo"][dimension] = elo_ratings(matches, k=elo_k, n_shuffles=elo_shuffles, seed=seed,
                                                   players=names)

    # LLM judge against the baseline.
    if "llm" in judges:
        primary = "reward_cost" not in judges
        for set_name, rubric in (("helpful", "helpfulness"), ("safety", "harmlessness")):
            if set_name not in gens:
                continue
            base_rows = gens[set_name][baseline]
            categories = [r.get("category") for r in base_rows]
            matches = []
            for name in models:
                rows = gens[set_name][name]
                verdicts = llm_judge.judge(rubric, [r["prompt"] for r in base_rows], [r["response"] for r in rows],
                                           [r["response"] for r in base_rows])
                kept = [(v.outcome, c) for v, c in zip(verdicts, categories, strict=True) if v.outcome is not None]
                target = entries[name] if primary else entries[name].setdefault("llm_judge", {})
                if not kept:
                    target[rubric] = None
                    continue
                summary, by_category = _outcome_summaries([o for o, _ in kept], [c for _, c in kept], stats)
                summary["unparseable"] = sum(v.invalid for v in verdicts)
                summary["no_valid_judgement"] = sum(1 for v in verdicts if v.outcome is None)
                target[rubric] = summary
                if by_category is not None and set_name == "safety":
                    target["harmlessness_by_category"] = by_category
                if name != baseline:
                    matches += [(name, baseline, o) for o, _ in kept]
            key = rubric if primary else f"llm_{rubric}"
            report["elo"][key] = elo_ratings(matches, k=elo_k, n_shuffles=elo_shuffles, seed=seed,
                                             players=list(models))
        report["llm_judge"] = {"identity": llm_judge.backend.identity, **llm_judge.report_stats()}

    # Implicit-reward accuracy on held-out pairs.
    if "implicit" in judges:
        from sacpo_lightning.evaluation.implicit import implicit_accuracies

        if not implicit_sets:
            raise ValueError("--judge implicit needs pair files (--implicit_helpful_pairs / --implicit_safety_pairs)")
        reference = implicit_reference or models[baseline]
        report["implicit_reference"] = reference
        scored = {name: spec for name, spec in models.items() if spec != reference}
        for name, result in implicit_accuracies(scored, reference, implicit_sets, device=generation.device).items():
            entries[name]["implicit"] = result
        _free()

    write_report(report, output_dir, training_logs=training_logs)
    rank_zero_info(f"Evaluation report written to {output_dir / 'report.md'}")
    return report
