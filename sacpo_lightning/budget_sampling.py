"""The budget step of the pipeline: sample the reference K times per prompt, score the samples, solve for lambda*.

Run after SACPO's step 1 with the step-1 model as the reference (see :mod:`sacpo_lightning.budget` for why the samples
of pi_r need only the safety score g, and the reward only to report what safety costs in helpfulness). Files under
``output_dir``:

- ``samples/prompts.jsonl``: every prompt repeated K times (row ``i`` is prompt ``i // K``, sample ``i % K``);
- ``samples/samples.jsonl`` (+ ``.meta.json``): the sampled responses, written and cached by
  :func:`sacpo_lightning.evaluation.generation.generate_to_file`: a rerun with the same model files, prompts, K and
  generation settings reuses them;
- ``samples/scores.json``: raw cost (and reward) scores, each keyed by the samples file and the scorer folder's
  fingerprint, so a rerun (another b, beta, transform or lambda grid) scores nothing again;
- ``budget.json`` (:func:`sacpo_lightning.budget.budget_report` plus the sample files) and ``lambda_curve.png``,
  rewritten atomically on every call.

Samples must come from pi_ref itself, which is what the importance weights assume: sampling at temperature 1 with
top_p 1 (generation uses no top-k when sampling). Stop strings and ``max_new_tokens`` cut responses, as they will cut
those of the aligned model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from sacpo_lightning.budget import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    SAFETY_TRANSFORMS,
    budget_from_costs,
    plot_curve,
    write_budget_json,
)
from sacpo_lightning.checks import check_finite, check_positive
from sacpo_lightning.errors import UserError
from sacpo_lightning.evaluation.generation import (
    GenerationSettings,
    ModelSpec,
    generate_to_file,
    load_prompts,
    model_fingerprint,
    parse_model_spec,
    read_generations,
)
from sacpo_lightning.evaluation.score_models import ScoreModel
from sacpo_lightning.io import atomic_write_json, atomic_write_text, file_fingerprint

__all__ = ["BUDGET_FILE", "CURVE_FILE", "estimate_budget", "sampling_settings"]

BUDGET_FILE = "budget.json"
CURVE_FILE = "lambda_curve.png"
SAMPLES_DIR = "samples"
SCORES_FILE = "scores.json"


def sampling_settings(generation: GenerationSettings | None = None) -> GenerationSettings:
    """Checks that ``generation`` draws exact samples of the model (``do_sample``, temperature 1, top_p 1).

    None gives ``GenerationSettings(do_sample=True, max_new_tokens=128)``.

    Raises:
        ValueError: Greedy decoding, or a temperature or top_p that would sample another distribution than pi_ref.
    """
    if generation is None:
        return GenerationSettings(do_sample=True, max_new_tokens=128)
    if not generation.do_sample or generation.temperature != 1.0 or generation.top_p != 1.0:
        raise UserError(
            "the budget needs samples of the reference policy itself: set do_sample=True, temperature=1.0, top_p=1.0 "
            f"(got do_sample={generation.do_sample}, temperature={generation.temperature}, top_p={generation.top_p})"
        )
    return generation


def _scorer_key(scorer: str | os.PathLike | ScoreModel, samples_fp: str, kind: str) -> str | None:
    """Cache key of one scorer's scores of one samples file; None for an in-memory scorer (not cached)."""
    if isinstance(scorer, ScoreModel):
        return None
    payload = {"samples": samples_fp, "scorer": str(scorer), "files": model_fingerprint(ModelSpec((str(scorer),))),
               "kind": kind}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _score(
    scorer: str | os.PathLike | ScoreModel,
    prompts: list[str],
    responses: list[str],
    *,
    dtype: str | None,
    device: str | None,
    batch_size: int,
    desc: str,
) -> list[float]:
    if isinstance(scorer, ScoreModel):
        _check_bradley_terry(scorer, str(scorer))
        return scorer.score(prompts, responses, desc=desc)
    model = ScoreModel.from_pretrained(str(scorer), dtype=dtype, device=device, batch_size=batch_size)
    try:
        _check_bradley_terry(model, str(scorer))
        return model.score(prompts, responses, desc=desc)
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _check_bradley_terry(model: ScoreModel, name: str) -> None:
    """The budget's tilt is a Bradley-Terry score (one output): a label classifier's logits are not one."""
    num_labels = int(getattr(model.model.config, "num_labels", 1))
    if num_labels != 1:
        raise UserError(
            f"the safety budget's scorer {name} has {num_labels} outputs (a label classifier): its scores are not on "
            "the Bradley-Terry scale of the safety preference data, which step 2 (DPO at beta / lambda) tilts by, so "
            "it cannot supply the budget's tilt. Use a one-output cost model trained on safety preference pairs "
            "(safety_budget.cost_model, or evaluate.cost_model to train one)."
        )


def _cached_scores(
    path: Path,
    samples_fp: str,
    scorers: dict[str, str | os.PathLike | ScoreModel | None],
    prompts: list[str],
    responses: list[str],
    *,
    dtype: str | None,
    device: str | None,
    batch_size: int,
    force: bool,
) -> dict[str, list[float] | None]:
    """Raw scores per scorer kind (``cost``, ``reward``), reusing those in ``path`` whose key still matches."""
    try:
        cache = json.loads(path.read_text()) if path.is_file() and not force else {}
    except json.JSONDecodeError:
        cache = {}
    out: dict[str, list[float] | None] = {}
    changed = False
    for kind, scorer in scorers.items():
        if scorer is None:
            out[kind] = None
            continue
        key = _scorer_key(scorer, samples_fp, kind)
        entry = cache.get(kind) or {}
        if key is not None and entry.get("key") == key and len(entry.get("scores", [])) == len(responses):
            rank_zero_info(f"Budget: reusing the {kind} scores in {path}")
            out[kind] = [float(s) for s in entry["scores"]]
            continue
        out[kind] = _score(scorer, prompts, responses, dtype=dtype, device=device, batch_size=batch_size,
                           desc=f"budget {kind} scores")
        if key is not None:
            cache[kind] = {"key": key, "scorer": str(scorer), "scores": out[kind]}
            changed = True
    if changed:
        atomic_write_json(path, cache)
    return out


def _sample_reference(
    reference_model: str, prompts_file: str | os.PathLike, k: int, settings: GenerationSettings, samples_dir: Path,
    *, force: bool,
) -> tuple[list[dict[str, Any]], Any, Path, list[str], list[str]]:
    """K samples of each prompt from the reference, cached: (prompt rows, model spec, samples file, prompts,
    responses), with row ``i`` of the samples drawn for prompt ``i // K``."""
    rows = load_prompts(prompts_file)
    # Contiguous repeats: row i of the samples is prompt i // K. The file's bytes (not its mtime) key the cache.
    repeated = "".join(json.dumps({"prompt": r["prompt"], "category": r["category"]}, ensure_ascii=False) + "\n"
                       for r in rows for _ in range(k))
    repeated_path = samples_dir / "prompts.jsonl"
    if not repeated_path.is_file() or repeated_path.read_text(encoding="utf-8") != repeated:
        atomic_write_text(repeated_path, repeated)
    spec = parse_model_spec(reference_model)
    samples_path = generate_to_file(spec, repeated_path, samples_dir / "samples.jsonl", settings, force=force,
                                    desc=f"budget: {k} samples per prompt from {reference_model}")
    samples = read_generations(samples_path)
    expected_prompts = [r["prompt"] for r in rows for _ in range(k)]
    if [s["prompt"] for s in samples] != expected_prompts:
        raise RuntimeError(f"{samples_path} does not hold {k} samples of each prompt of {prompts_file} in order")
    return rows, spec, samples_path, [s["prompt"] for s in samples], [s["response"] for s in samples]


def _check_budget_arguments(
    samples_per_prompt: int,
    beta: float,
    b: float,
    safety_transform: str,
    reward_in_tilt: bool,
    reward_scorer: str | os.PathLike | ScoreModel | None,
) -> tuple[float, float]:
    """Checks the arguments of :func:`estimate_budget` that need no file; returns ``(beta, b)`` as floats."""
    if not isinstance(samples_per_prompt, int) or samples_per_prompt < 2:
        raise UserError(f"samples_per_prompt must be an integer >= 2 (one sample cannot be reweighted), "
                        f"got {samples_per_prompt!r}")
    beta, b = check_positive("beta", beta), check_finite("the safety budget b", b)
    if safety_transform not in SAFETY_TRANSFORMS:
        raise UserError(f"safety_transform must be one of {SAFETY_TRANSFORMS}, got {safety_transform!r}")
    if reward_in_tilt and reward_scorer is None:
        raise ValueError("reward_in_tilt=True needs a reward_scorer")
    return beta, b


def _score_tensors(
    raw: dict[str, list[float] | None], num_prompts: int, k: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(costs, rewards or None)`` as float64 (P, K) tensors from the raw scores of the P * K samples."""
    costs = torch.tensor(raw["cost"], dtype=torch.float64).reshape(num_prompts, k)
    rewards = None
    if raw["reward"] is not None:
        rewards = torch.tensor(raw["reward"], dtype=torch.float64).reshape(num_prompts, k)
    return costs, rewards


def _budget_inputs(
    spec: Any,
    prompts_file: str | os.PathLike,
    num_prompts: int,
    k: int,
    beta: float,
    b: float,
    safety_scorer: str | os.PathLike | ScoreModel,
    reward_scorer: str | os.PathLike | ScoreModel | None,
    safety_transform: str,
    reward_in_tilt: bool,
    lam_max: float | None,
    settings: GenerationSettings,
) -> dict[str, Any]:
    """The ``inputs`` section of ``budget.json``: what was sampled and scored, with the files' fingerprints."""
    return {
        "reference_model": str(spec),
        "reference_fingerprint": model_fingerprint(spec),
        "prompts_file": str(prompts_file),
        "prompts_fingerprint": file_fingerprint(prompts_file),
        "num_prompts": num_prompts,
        "samples_per_prompt": k,
        "beta": beta,
        "b": b,
        "safety_scorer": _scorer_name(safety_scorer),
        "reward_scorer": _scorer_name(reward_scorer),
        "safety_transform": safety_transform,
        "reward_in_tilt": reward_in_tilt,
        "lam_max": lam_max,
        "generation": asdict(settings),
    }


def _write_budget(
    report: dict[str, Any], solution, curve, output_dir: Path, b: float, interval: dict[str, Any]
) -> dict[str, Any]:
    """Plots the curve, writes ``budget.json`` and returns its content as read back."""
    lam_star = solution.lam if solution.status in ("interior", "at_max") else None
    plot_curve(curve, output_dir / CURVE_FILE, b=b, lam_star=lam_star, interval=interval)
    path = write_budget_json(output_dir / BUDGET_FILE, report)
    rank_zero_info(f"Budget: {solution.message} Wrote {path}")
    return json.loads(path.read_text())


def estimate_budget(
    reference_model: str,
    prompts_file: str | os.PathLike,
    samples_per_prompt: int,
    beta: float,
    b: float,
    safety_scorer: str | os.PathLike | ScoreModel,
    reward_scorer: str | os.PathLike | ScoreModel | None,
    output_dir: str | os.PathLike,
    *,
    lambdas: list[float] | None = None,
    lambda_fractions: Sequence[float] = (),
    safety_transform: str = "prob_safe",
    reward_in_tilt: bool = False,
    lam_max: float | None = None,
    allow_at_max: bool = False,
    num_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    generation: GenerationSettings | None = None,
    scorer_batch_size: int = 8,
    scorer_dtype: str | None = None,
    scorer_device: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Samples the reference, scores the samples, solves for lambda* and writes ``budget.json`` and the curve.

    The tilt score is ``h = -cost``: a cost model trained on safety preference pairs is a Bradley-Terry score of
    them (up to sign), the scale on which step 2's DPO at ``beta / lambda`` tilts the step-1 model. The constraint
    score g is ``safety_transform`` of the cost (the scale of b). See :mod:`sacpo_lightning.budget`.

    Args:
        reference_model: The reference policy's folder (or model spec): SACPO's step-1 model.
        prompts_file: JSON list or JSON lines of ``{prompt, category?}``.
        samples_per_prompt: K, >= 2 (``DEFAULT_SAMPLES_PER_PROMPT`` = 16 in a pipeline; fewer biases lambda*
            upward).
        beta: KL coefficient of the alignment, > 0.
        b: Safety budget, on the scale of g (``safety_transform``): the constraint is ``E[g] >= b``.
        safety_scorer: Cost model (folder or loaded :class:`ScoreModel`; ``cost > 0`` reads as unsafe).
        reward_scorer: Reward model, or None. With ``reward_in_tilt=False`` it only reports E[r] along the curve.
        output_dir: Where the samples, ``budget.json`` and ``lambda_curve.png`` go.
        lambdas: Grid of the curve; None: :func:`sacpo_lightning.budget.default_lambdas` around lambda*.
        lambda_fractions: Fractions q whose q * lambda* join the curve's grid once lambda* is known (predictions for
            P-SACPO merges at q, which approximate lambda = q * lambda*).
        safety_transform: ``"prob_safe"`` (g = sigmoid(-cost), b a target probability of being safe) or
            ``"neg_cost"`` (g = -cost).
        reward_in_tilt: True only when ``reference_model`` is the SFT model and the reward is the one being aligned
            (see :mod:`sacpo_lightning.budget`); needs ``reward_scorer``.
        lam_max: Largest multiplier searched (:func:`sacpo_lightning.budget.solve_lambda`).
        allow_at_max: Give an ``at_max`` solution a step-2 coefficient (:func:`sacpo_lightning.budget.solve_lambda`).
        num_resamples, level: The bootstrap over prompts and samples behind the intervals of lambda* and of the
            predicted E[g] (:func:`sacpo_lightning.budget.bootstrap_budget`).
        generation: Sampling settings; must sample at temperature 1 and top_p 1 (:func:`sampling_settings`).
        scorer_batch_size, scorer_dtype, scorer_device: How scorer folders are loaded and run.
        force: Sample and score again even when the cached files match.

    Returns:
        The content of ``budget.json``: ``lambda_star``, ``status``, ``message``, ``step2_beta`` (``beta / lambda*``,
        the step-2 KL coefficient; null for ``zero`` or ``infeasible``), ``predicted`` and ``reference`` (safety,
        reward, KL, ESS at lambda* and at 0), ``solution`` (every field of the
        :class:`~sacpo_lightning.budget.BudgetSolution`), ``curve``, ``inputs`` (reference model and fingerprint,
        prompts file and fingerprint, K, beta, b, scorer folders, transform, generation settings) and ``files``.
    """
    beta, b = _check_budget_arguments(samples_per_prompt, beta, b, safety_transform, reward_in_tilt, reward_scorer)
    settings = sampling_settings(generation)
    k = samples_per_prompt
    output_dir = Path(output_dir)
    samples_dir = output_dir / SAMPLES_DIR
    rows, spec, samples_path, prompts, responses = _sample_reference(
        reference_model, prompts_file, k, settings, samples_dir, force=force)
    num_prompts = len(rows)
    raw = _cached_scores(samples_dir / SCORES_FILE, file_fingerprint(samples_path),
                         {"cost": safety_scorer, "reward": reward_scorer}, prompts, responses,
                         dtype=scorer_dtype, device=scorer_device, batch_size=scorer_batch_size, force=force)
    costs, rewards = _score_tensors(raw, num_prompts, k)
    inputs = _budget_inputs(spec, prompts_file, num_prompts, k, beta, b, safety_scorer, reward_scorer,
                            safety_transform, reward_in_tilt, lam_max, settings)
    solution, curve, interval, report = budget_from_costs(
        costs, beta, b, rewards=rewards, safety_transform=safety_transform, reward_in_tilt=reward_in_tilt,
        lam_max=lam_max, allow_at_max=allow_at_max, lambdas=lambdas, lambda_fractions=lambda_fractions,
        num_resamples=num_resamples, level=level, seed=settings.seed, inputs=inputs)
    report["samples"] = {
        "cost_mean": float(costs.mean()),
        "empty_responses": sum(1 for r in responses if not r),
    }
    report["files"] = {"samples": str(samples_path), "scores": str(samples_dir / SCORES_FILE), "plot": CURVE_FILE}
    return _write_budget(report, solution, curve, output_dir, b, interval)


def _scorer_name(scorer: str | os.PathLike | ScoreModel | None) -> str | None:
    if scorer is None:
        return None
    if isinstance(scorer, ScoreModel):
        return f"<in-memory {scorer.kind or 'score'} model>"
    return str(scorer)
