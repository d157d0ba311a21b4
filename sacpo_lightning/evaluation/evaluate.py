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

Per-answer safety judges (``safety_judges``, :mod:`~sacpo_lightning.evaluation.safety_judges`) add, independently of
the above, unsafe and refusal rates per model and category, over-refusal on the helpfulness prompts, mean response
length, the check of ``E[safety] >= safety_threshold`` and predicted-versus-measured safety (the report's ``safety``
and ``predicted_vs_measured`` sections); their probabilities are cached as
``scores/<set>/<model>.judge.<judge name>.json``.

Suites (``suites``) are built-in prompt sets with their own measures. ``xstest``: every model answers XSTest's safe
prompts that only look unsafe and its unsafe contrast prompts (``xstest_prompts``, optionally a stratified subset of
``xstest_per_type`` prompts per type); the report's ``xstest`` section gives over-refusal (refusal rate on the safe
prompts) and unsafe compliance (non-refusal rate, and each unsafe judge's unsafe rate, on the unsafe prompts),
overall and per type (:func:`~sacpo_lightning.evaluation.report.xstest_section`). Refusals are decided by the first
``refusal`` judge of ``safety_judges``, or the rule-based one when none is given.

Everything expensive is cached under ``output_dir``: generations (``generations/<set>/<model>.jsonl``), scores
(``scores/<set>/<model>.<reward|cost>.json``, keyed by the generation file and the score model's files) and LLM
judgements (``judgements.jsonl``), so a rerun with one more model only pays for that model.

Sequence-level generation files (``GenerationSettings(sequence_level=True)``, ``--sequence_level true``) hold N
weighted samples per prompt (:mod:`~sacpo_lightning.evaluation.generation`). For them every sample is scored, and
``mean_reward``, ``mean_cost`` and ``unsafe_fraction`` are self-normalised importance-sampling means per prompt
(estimates under the sequence-level mixture, not the token-level one that was decoded), averaged over prompts; the
scores also report ``ess_mean``/``ess_min`` (effective sample size per prompt), ``samples_per_prompt`` and the
unweighted (token-level) means. Win rates, Elo and judges that take one answer per prompt use each row's resampled
``response``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from sacpo_lightning.data.prompts import load_xstest_prompts, xstest_subset
from sacpo_lightning.errors import UserError
from sacpo_lightning.evaluation.generation import (
    generate_to_file,
    model_fingerprint,
    parse_model_spec,
    read_generations,
)
from sacpo_lightning.evaluation.report import (
    category_win_rates,
    elo_ratings,
    judge_reliability,
    outcome,
    repetition_summary,
    sample_answers,
    win_rate_summary,
    write_report,
    xstest_section,
)
from sacpo_lightning.evaluation.settings import EvaluationSettings
from sacpo_lightning.io import atomic_write_json, file_fingerprint
from sacpo_lightning.models.classifier import SCORE_MODEL_FILE

__all__ = ["default_model_name", "evaluate_models", "llm_judge", "parse_named_models", "score_judge_reliability"]

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


class WeightedScores(list):
    """Per-prompt scores of each row's ``response`` (a plain ``list[float]`` to all code that uses the scores), with
    the scores and importance log-weights of every sample behind them, for sequence-level generation files.

    Attributes:
        sample_scores: Per prompt, the scores of its samples.
        log_weights: Per prompt, the samples' importance log-weights (same shape as ``sample_scores``).
    """

    def __init__(self, scores: Sequence[float], sample_scores: Sequence[Sequence[float]],
                 log_weights: Sequence[Sequence[float]]) -> None:
        super().__init__(scores)
        self.sample_scores = [list(s) for s in sample_scores]
        self.log_weights = [list(w) for w in log_weights]


def _has_samples(rows: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Whether a generation file is sequence-level (every row has ``samples``); a mix of both is refused."""
    flags = {"samples" in r for r in rows}
    if len(flags) > 1:
        raise UserError(f"{path}: some rows have 'samples' and some do not; regenerate it with one setting")
    return flags == {True}


def _file_scores(rows: Sequence[Mapping[str, Any]], cached: Mapping[str, Any], path: Path) -> list[float]:
    if "sample_scores" not in cached:
        return cached["scores"]
    log_weights = [[s["log_weight"] for s in r["samples"]] for r in rows]
    if [len(w) for w in log_weights] != [len(s) for s in cached["sample_scores"]]:
        raise UserError(f"{path}: the number of samples per prompt does not match its cached scores")
    return WeightedScores(cached["scores"], cached["sample_scores"], log_weights)


def _score_file(
    scorer_dir: str,
    generation_path: Path,
    cache_path: Path,
    state: dict[str, Any],
    score_kwargs: Mapping[str, Any],
) -> list[float]:
    """Scores of a generation file with the score model at ``scorer_dir``, cached next to the report.

    Returns:
        One score per row (of its ``response``). For a sequence-level file every sample of every row is scored and a
        :class:`WeightedScores` is returned: the rows' scores are those of their resampled samples.
    """
    key = hashlib.sha256(json.dumps([file_fingerprint(generation_path), model_fingerprint(
        parse_model_spec(scorer_dir)), dict(score_kwargs)], sort_keys=True).encode()).hexdigest()[:16]
    rows = read_generations(generation_path)
    weighted = _has_samples(rows, generation_path)
    if cache_path.is_file():
        cached = json.loads(cache_path.read_text())
        if cached.get("key") == key and weighted == ("sample_scores" in cached):
            return _file_scores(rows, cached, generation_path)
    if state.get("scorer") is None:
        from sacpo_lightning.evaluation.score_models import ScoreModel

        state["scorer"] = ScoreModel.from_pretrained(scorer_dir, **score_kwargs)
    payload: dict[str, Any] = {"key": key, "score_model": scorer_dir}
    if weighted:
        flat = state["scorer"].score([r["prompt"] for r in rows for _ in r["samples"]],
                                     [s["response"] for r in rows for s in r["samples"]])
        nested, start = [], 0
        for r in rows:
            nested.append(flat[start : start + len(r["samples"])])
            start += len(r["samples"])
        picks = []
        for lineno, (r, scores) in enumerate(zip(rows, nested, strict=True), start=1):
            index = r.get("resampled_index")
            if not isinstance(index, int) or not 0 <= index < len(scores) or (
                    r["samples"][index]["response"] != r["response"]):
                raise UserError(f"{generation_path}:{lineno}: 'resampled_index' does not point at the row's "
                                "response among its samples; regenerate the file")
            picks.append(scores[index])
        payload.update(scores=picks, sample_scores=nested)
    else:
        payload["scores"] = state["scorer"].score([r["prompt"] for r in rows], [r["response"] for r in rows])
    atomic_write_json(cache_path, payload)
    return _file_scores(rows, payload, generation_path)


def _score_summary(kind: str, values: Sequence[float]) -> dict[str, Any]:
    """``mean_reward`` (kind ``reward``) or ``mean_cost`` and ``unsafe_fraction`` (kind ``cost``) of one model on
    one prompt set; self-normalised importance-sampling means with the effective sample size for
    :class:`WeightedScores`."""
    name = f"mean_{kind}"
    if not isinstance(values, WeightedScores):
        summary = {name: sum(values) / len(values)}
        if kind == "cost":
            summary["unsafe_fraction"] = sum(1 for c in values if c > 0) / len(values)
        return summary
    from sacpo_lightning.importance import snis_mean

    means, unsafe, ess, plain = [], [], [], []
    for scores, log_w in zip(values.sample_scores, values.log_weights, strict=True):
        scores_t = torch.tensor(scores, dtype=torch.float64)
        log_w_t = torch.tensor(log_w, dtype=torch.float64)
        mean, prompt_ess = snis_mean(scores_t, log_w_t)
        means.append(float(mean))
        ess.append(float(prompt_ess))
        plain.append(float(scores_t.mean()))
        if kind == "cost":
            unsafe.append(float(snis_mean((scores_t > 0).to(torch.float64), log_w_t)[0]))
    count = len(means)
    summary = {
        name: sum(means) / count,
        f"unweighted_{name}": sum(plain) / count,
        "estimator": "snis",
        "samples_per_prompt": max(len(s) for s in values.sample_scores),
        "ess_mean": sum(ess) / count,
        "ess_min": min(ess),
    }
    if kind == "cost":
        summary["unsafe_fraction"] = sum(unsafe) / count
    return summary


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


@dataclass
class _Run:
    """What the judges share: the models, the baseline, the generations and the report they fill."""

    models: dict[str, str]
    baseline: str
    output_dir: Path
    report: dict[str, Any]
    gens: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    gen_paths: dict[str, dict[str, Path]] = field(default_factory=dict)
    # The XSTest suite: its prompt rows and each model's generation file on them.
    xstest_rows: list[dict[str, str]] | None = None
    xstest_paths: dict[str, Path] = field(default_factory=dict)
    # The llm judge (a PairwiseJudge), when it runs.
    llm_judge: Any | None = None

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        return self.report["models"]

    def categories(self, set_name: str) -> list[str | None]:
        return [r.get("category") for r in self.gens[set_name][self.baseline]]


def _text_quality(settings: EvaluationSettings, run: _Run) -> None:
    """Each model's repetition rate over all its answers, and the answers the report quotes."""
    for name in run.models:
        answers = [r["response"] for set_name in run.gens for r in run.gens[set_name][name]]
        if answers:
            run.entries[name]["repetition"] = repetition_summary(answers, confidence=settings.confidence)
    run.report["examples"] = sample_answers(run.gens)


def _prepare_safety_judges(settings: EvaluationSettings, model_names: Sequence[str]) -> list[Any]:
    """Builds (without loading) the per-answer safety judges and checks the options that depend on them, so that a
    mistake is reported before any generation."""
    from sacpo_lightning.evaluation.safety_judges import build_safety_judges

    if not settings.safety_judges:
        return []
    device, predicted = settings.generation.device, settings.predicted_safety
    # The judges run where generation runs unless their config says otherwise.
    configs = [{"device": device, **c} if device is not None and isinstance(c, Mapping)
               and c.get("kind") in ("guard", "classifier") else c for c in settings.safety_judges]
    judges = build_safety_judges(configs, where="safety_judges")
    if (settings.safety_threshold is not None or predicted) and not any(j.kind == "unsafe" for j in judges):
        raise UserError("safety_threshold and predicted_safety need an unsafe judge (guard:MODEL or "
                        "classifier:MODEL in safety_judges); a refusal judge does not measure safety")
    unknown = sorted(set(predicted or {}) - set(model_names))
    if unknown:
        raise UserError(f"predicted_safety names model(s) {', '.join(unknown)} that are not evaluated; evaluated: "
                        f"{', '.join(model_names)}")
    return judges


def _judge_file(judge: Any, generation_path: Path, cache_path: Path) -> tuple[list[float], list[list[str]] | None]:
    """Per-answer probabilities of one judge on a generation file and, for a guard judge, the category codes per
    answer (None for other judges), cached next to the report."""
    key = hashlib.sha256(json.dumps([file_fingerprint(generation_path), type(judge).__name__, judge.identity],
                                    sort_keys=True).encode()).hexdigest()[:16]
    if cache_path.is_file():
        cached = json.loads(cache_path.read_text())
        if cached.get("key") == key:
            return cached["probabilities"], cached.get("categories")
    rows = read_generations(generation_path)
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    codes = None
    if hasattr(judge, "judge_with_categories"):
        probabilities, codes = judge.judge_with_categories(prompts, responses)
    else:
        probabilities = judge.judge(prompts, responses)
    atomic_write_json(cache_path, {"key": key, "judge": judge.name, "kind": judge.kind,
                                   "probabilities": probabilities,
                                   **({"categories": codes} if codes is not None else {})})
    return probabilities, codes


def heldout_of(folder: str | os.PathLike | None) -> dict[str, Any] | None:
    """The held-out accuracy (``{"accuracy", "pairs"}``) a score model recorded in its folder's ``score_model.json``;
    None for a folder without one (a Hub model, a model this library did not train)."""
    if not folder:
        return None
    meta_file = Path(os.path.expanduser(str(folder))) / SCORE_MODEL_FILE
    return json.loads(meta_file.read_text()).get("heldout") if meta_file.is_file() else None


def describe_judge(judge: Any, *, confidence: float = 0.95) -> dict[str, Any]:
    """What the report records about a per-answer judge; an unsafe judge whose model recorded a held-out accuracy
    also carries its ``reliability`` (:func:`~sacpo_lightning.evaluation.report.judge_reliability`), so that its
    numbers are flagged when it is not better than chance."""
    info = judge.describe()
    heldout = heldout_of(info.get("model")) if info.get("kind") == "unsafe" else None
    if heldout:
        info["reliability"] = judge_reliability(heldout, confidence=confidence)
    return info


def _xstest_judges(judges: Sequence[Any]) -> list[Any]:
    """The judges of the XSTest suite: the first refusal judge (the rule-based one when none is configured) and every
    unsafe judge."""
    from sacpo_lightning.evaluation.safety_judges import RefusalJudge

    refusal = next((j for j in judges if j.kind == "refusal"), None)
    if refusal is None:
        names = {j.name for j in judges}
        refusal = RefusalJudge(name="refusal" if "refusal" not in names else "xstest-refusal")
    return [refusal, *(j for j in judges if j.kind == "unsafe")]


def _run_per_answer_judges(
    settings: EvaluationSettings, run: _Run, judges: Sequence[Any], xstest_judges: Sequence[Any]
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Runs the per-answer judges, one judge model loaded at a time: ``judges`` on every model's generations of the
    prompt sets and ``xstest_judges`` on its XSTest answers. Returns the report's ``safety`` section
    (:func:`~sacpo_lightning.evaluation.report.safety_section`; None without judges or prompt sets) and its
    ``xstest`` section (:func:`~sacpo_lightning.evaluation.report.xstest_section`; None without the suite)."""
    from sacpo_lightning.evaluation.report import safety_section
    from sacpo_lightning.models import load_tokenizer

    probabilities: dict[str, dict[str, dict[str, list[float]]]] = {name: {} for name in run.models}
    suite: dict[str, dict[str, list[float]]] = {name: {} for name in run.models}
    guard_categories: dict[str, dict[str, dict[str, list[list[str]]]]] = {name: {} for name in run.models}
    for judge in [*judges, *(j for j in xstest_judges if j not in judges)]:
        if judge in judges:
            for set_name in run.gens:
                for name in run.models:
                    cache = run.output_dir / "scores" / set_name / f"{name}.judge.{judge.name}.json"
                    probs, codes = _judge_file(judge, run.gen_paths[set_name][name], cache)
                    probabilities[name].setdefault(judge.name, {})[set_name] = probs
                    if codes is not None:
                        guard_categories[name].setdefault(judge.name, {})[set_name] = codes
        if judge in xstest_judges and run.xstest_rows is not None:
            for name in run.models:
                cache = run.output_dir / "scores" / "xstest" / f"{name}.judge.{judge.name}.json"
                suite[name][judge.name] = _judge_file(judge, run.xstest_paths[name], cache)[0]
        judge.close()
        _free()
    xstest = None
    if run.xstest_rows is not None:
        xstest = xstest_section(run.xstest_rows, suite, {j.name: describe_judge(j, confidence=settings.confidence)
                                                         for j in xstest_judges},
                                confidence=settings.confidence, prompts=str(settings.xstest_prompts))
    if not (judges and run.gens):
        return None, xstest
    categories = {set_name: run.categories(set_name) for set_name in run.gens}
    responses = {name: {set_name: [r["response"] for r in run.gens[set_name][name]] for set_name in run.gens}
                 for name in run.models}
    # One tokenizer (the baseline's) for every model, so that lengths are comparable.
    tokenizer = load_tokenizer(parse_model_spec(run.models[run.baseline]).paths[0])
    pairs = [(name, run.baseline) for name in run.models if name != run.baseline]
    pairs += [pair for pair in settings.safety_against.items() if pair not in pairs]
    if "safety" in run.gens:
        asked = {name: [r["prompt"] for r in rows] for name, rows in run.gens["safety"].items()}
        for name, other in pairs:
            if asked[name] != asked[other]:
                raise ValueError(f"the safety generations of {name} and {other} answer different prompts")
    safety = safety_section(probabilities, {j.name: describe_judge(j, confidence=settings.confidence)
                                            for j in judges}, categories,
                            guard_categories=guard_categories, responses=responses,
                            tokenizer=tokenizer, confidence=settings.confidence, threshold=settings.safety_threshold,
                            constraint_on=settings.safety_constraint_on, pairs=pairs,
                            n_resamples=settings.bootstrap_samples, seed=settings.seed)
    return safety, xstest


def _load_xstest(settings: EvaluationSettings) -> list[dict[str, str]]:
    """The XSTest prompts the suite runs on (read and checked before any generation)."""
    return xstest_subset(load_xstest_prompts(settings.xstest_prompts), settings.xstest_per_type)


def _generate_xstest(settings: EvaluationSettings, run: _Run) -> None:
    """Every model's answers to the XSTest prompts (cached), from a prompt file of the suite's rows written next to
    the report (``category`` = the prompt's type)."""
    prompts = run.output_dir / "xstest_prompts.json"
    atomic_write_json(prompts, [{"prompt": r["prompt"], "category": r["type"], **r} for r in run.xstest_rows])
    expected = [r["prompt"] for r in run.xstest_rows]
    for name, spec in run.models.items():
        path = run.output_dir / "generations" / "xstest" / f"{name}.jsonl"
        generate_to_file(spec, prompts, path, settings.generation, name=name)
        _free()
        if [r["prompt"] for r in read_generations(path)] != expected:
            raise ValueError(f"{path}: its prompts are not the XSTest prompts of {prompts}; delete it and rerun")
        run.xstest_paths[name] = path
        run.entries[name].setdefault("generations", {})["xstest"] = str(path)


def _generate(settings: EvaluationSettings, run: _Run) -> None:
    """Generations of every model on every prompt set (cached), one model loaded at a time."""
    for set_name, prompts in settings.prompt_files.items():
        run.gen_paths[set_name] = {}
        for name, spec in run.models.items():
            path = run.output_dir / "generations" / set_name / f"{name}.jsonl"
            generate_to_file(spec, prompts, path, settings.generation, name=name)
            run.gen_paths[set_name][name] = path
            _free()
        run.gens[set_name] = {name: read_generations(p) for name, p in run.gen_paths[set_name].items()}
        _check_aligned(run.gens[set_name], run.baseline, set_name)
        for name in run.models:
            run.entries[name].setdefault("generations", {})[set_name] = str(run.gen_paths[set_name][name])


def _reward_cost_scores(settings: EvaluationSettings, run: _Run) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{reward|cost: {set name: {model name: scores}}}`` (cached), one score model loaded at a time; the means
    go to each model's ``scores`` entry."""
    score_kwargs = {"batch_size": settings.score_batch_size, "dtype": settings.score_dtype}
    scores: dict[str, dict[str, dict[str, list[float]]]] = {"reward": {}, "cost": {}}
    for kind, scorer_dir in (("reward", settings.reward_model), ("cost", settings.cost_model)):
        if scorer_dir is None:
            continue
        state: dict[str, Any] = {}
        for set_name in run.gens:
            scores[kind][set_name] = {
                name: _score_file(str(scorer_dir), run.gen_paths[set_name][name],
                                  run.output_dir / "scores" / set_name / f"{name}.{kind}.json", state, score_kwargs)
                for name in run.models
            }
        state.clear()
        _free()
    for set_name in run.gens:
        for name in run.models:
            summary = run.entries[name].setdefault("scores", {}).setdefault(set_name, {})
            for kind in ("reward", "cost"):
                if set_name in scores[kind]:
                    summary.update(_score_summary(kind, scores[kind][set_name][name]))
    return scores


def _run_reward_cost(settings: EvaluationSettings, run: _Run) -> None:
    """The ``reward_cost`` judge: helpfulness by reward on the helpful prompts, harmlessness by -cost on the safety
    prompts; win rates against the baseline and round-robin Elo over all models."""
    scores = _reward_cost_scores(settings, run)
    eps, names, baseline = settings.tie_eps, list(run.models), run.baseline
    for set_name, kind, sign in (("helpful", "reward", 1.0), ("safety", "cost", -1.0)):
        if set_name not in scores[kind]:
            continue
        values = {name: [sign * s for s in v] for name, v in scores[kind][set_name].items()}
        categories = run.categories(set_name)
        dimension = DIMENSION[set_name]
        for name in names:
            outcomes = [outcome(s, b, eps=eps) for s, b in zip(values[name], values[baseline], strict=True)]
            summary, by_category = _outcome_summaries(outcomes, categories, settings.bootstrap)
            run.entries[name][dimension] = summary
            if by_category is not None and set_name == "safety":
                run.entries[name]["harmlessness_by_category"] = by_category
        matches = [(a, b, outcome(values[a][i], values[b][i], eps=eps))
                   for i in range(len(values[baseline])) for j, a in enumerate(names) for b in names[j + 1 :]]
        run.report["elo"][dimension] = elo_ratings(matches, k=settings.elo_k, n_shuffles=settings.elo_shuffles,
                                                   seed=settings.seed, players=names)


def _llm_judge_set(settings: EvaluationSettings, run: _Run, set_name: str, rubric: str,
                   primary: bool) -> list[tuple[str, str, float]]:
    """LLM-judge win rates of every model against the baseline on one prompt set; returns the Elo matches."""
    base_rows = run.gens[set_name][run.baseline]
    categories = run.categories(set_name)
    matches = []
    for name in run.models:
        rows = run.gens[set_name][name]
        verdicts = run.llm_judge.judge(rubric, [r["prompt"] for r in base_rows], [r["response"] for r in rows],
                                            [r["response"] for r in base_rows])
        kept = [(v.outcome, c) for v, c in zip(verdicts, categories, strict=True) if v.outcome is not None]
        target = run.entries[name] if primary else run.entries[name].setdefault("llm_judge", {})
        if not kept:
            target[rubric] = None
            continue
        summary, by_category = _outcome_summaries([o for o, _ in kept], [c for _, c in kept], settings.bootstrap)
        summary["unparseable"] = sum(v.invalid for v in verdicts)
        summary["no_valid_judgement"] = sum(1 for v in verdicts if v.outcome is None)
        target[rubric] = summary
        if by_category is not None and set_name == "safety":
            target["harmlessness_by_category"] = by_category
        if name != run.baseline:
            matches += [(name, run.baseline, o) for o, _ in kept]
    return matches


def _run_llm_judge(settings: EvaluationSettings, run: _Run) -> None:
    """The ``llm`` judge: pairwise verdicts against the baseline (the primary win rates without ``reward_cost``,
    else under ``llm_judge``) and Elo over these model-versus-baseline matches."""
    primary = "reward_cost" not in settings.judges
    for set_name, rubric in (("helpful", "helpfulness"), ("safety", "harmlessness")):
        if set_name not in run.gens:
            continue
        matches = _llm_judge_set(settings, run, set_name, rubric, primary)
        key = rubric if primary else f"llm_{rubric}"
        run.report["elo"][key] = elo_ratings(matches, k=settings.elo_k, n_shuffles=settings.elo_shuffles,
                                             seed=settings.seed, players=list(run.models))
    run.report["llm_judge"] = {"identity": run.llm_judge.backend.identity, **run.llm_judge.report_stats()}


def _run_implicit(settings: EvaluationSettings, run: _Run) -> None:
    """The ``implicit`` judge: implicit-reward preference accuracy on held-out pairs against the reference."""
    from sacpo_lightning.evaluation.implicit import implicit_accuracies
    from sacpo_lightning.precision import native_bf16

    reference = settings.implicit_reference or run.models[run.baseline]
    run.report["implicit_reference"] = reference
    precision = settings.implicit_precision
    if precision == "auto":
        precision = "bf16" if native_bf16() else "float32"
    run.report["implicit_precision"] = precision
    scored = {name: spec for name, spec in run.models.items() if spec != reference}
    # A set limited to some models (its ``models`` key) drops the reference itself: its log-ratios are all zero.
    # Against the reference itself is the plain measurement. Copies: the settings stay as given.
    pair_sets = {}
    for name, spec in settings.implicit.items():
        spec = dict(spec)
        if spec.get("models"):
            spec["models"] = [m for m in spec["models"] if m in scored]
        if spec.get("against"):
            spec["against"] = {m: o for m, o in spec["against"].items() if m in scored and o in scored}
        if spec.get("models") != []:
            pair_sets[name] = spec
    for name, result in implicit_accuracies(scored, reference, pair_sets, device=settings.generation.device,
                                            precision=precision).items():
        run.entries[name]["implicit"] = result
    _free()


def score_judge_reliability(settings: EvaluationSettings) -> dict[str, dict[str, Any]]:
    """``{reward|cost: judge_reliability(...) + {"model"}}`` for each score model set, from the held-out accuracy in
    its folder's ``score_model.json`` (unknown for a model without one, e.g. a Hub model)."""
    out = {}
    for kind, folder in (("reward", settings.reward_model), ("cost", settings.cost_model)):
        if folder is None:
            continue
        try:
            out[kind] = {"model": str(folder), **judge_reliability(heldout_of(folder),
                                                                   confidence=settings.confidence)}
        except ValueError as err:
            raise UserError(f"{Path(os.path.expanduser(str(folder))) / SCORE_MODEL_FILE}: 'heldout': {err}") from None
    return out


def _with_baseline(models: Mapping[str, str], baseline: str) -> tuple[dict[str, str], str]:
    """The models with the baseline among them (a spec not among them is added under its default name)."""
    models = dict(models)
    if baseline not in models:
        name = default_model_name(baseline)
        if name not in models:
            models = {name: baseline, **models}
        baseline = name
    return models, baseline


def llm_judge(settings: EvaluationSettings, output_dir: str | os.PathLike) -> Any:
    """The llm judge of the settings' ``judge_*`` fields, caching its judgements in ``output_dir/judgements.jsonl``.

    Raises:
        UserError: Neither ``judge_url`` nor ``judge_local`` is set.
    """
    from sacpo_lightning.evaluation.judge import HFLocalBackend, OpenAIChatBackend, PairwiseJudge

    if settings.judge_url is not None:
        backend = OpenAIChatBackend(settings.judge_url, settings.judge_model, api_key_env=settings.judge_api_key_env,
                                    temperature=settings.judge_temperature, max_tokens=settings.judge_max_tokens)
    elif settings.judge_local is not None:
        backend = HFLocalBackend(settings.judge_local, max_new_tokens=settings.judge_max_tokens,
                                 device=settings.generation.device)
    else:
        raise UserError("the llm judge needs a backend: judge_url (with judge_model) or judge_local")
    return PairwiseJudge(backend, cache_path=Path(output_dir) / "judgements.jsonl", repeats=settings.judge_repeats,
                         both_orders=not settings.judge_single_order)


def evaluate_models(
    models: Mapping[str, str], baseline: str, output_dir: str | os.PathLike, settings: EvaluationSettings, *,
    llm_judge_override: Any | None = None,
) -> dict[str, Any]:
    """Generates (cached), judges, computes win rates against the baseline and Elo, and writes the report.

    Args:
        models: ``{name: model spec}`` (folders or ``mix:A+B@q``), the baseline included.
        baseline: Name of the baseline in ``models`` (usually the SFT model), or a spec that is added under its
            default name.
        output_dir: Where generations, caches and the report go.
        settings: What runs (see :class:`~sacpo_lightning.evaluation.settings.EvaluationSettings`).
        llm_judge_override: A ready :class:`~sacpo_lightning.evaluation.judge.PairwiseJudge` for the llm judge
            instead of the one of the settings' ``judge_*`` fields (e.g. with a custom backend).

    Returns:
        The report dict (also written to ``report.json``; see :func:`sacpo_lightning.evaluation.report.write_report`).

    Raises:
        ValueError: Settings that do not fit the models (e.g. judges without prompt sets), or invalid safety judges.
    """
    pairwise = any(j in settings.judges for j in ("reward_cost", "llm"))
    if not settings.prompt_files and (pairwise or (settings.safety_judges and not settings.suites)):
        raise UserError("The reward_cost and llm judges and safety_judges need prompts_safety and/or "
                        "prompts_helpful (or, for safety_judges, suites)")
    models, baseline = _with_baseline(models, baseline)
    safety_judges = _prepare_safety_judges(settings, list(models))
    for set_name, spec in (settings.implicit or {}).items():
        unknown = sorted((set(spec.get("models") or ()) | set(spec.get("against") or {})
                          | set((spec.get("against") or {}).values())) - set(models))
        if unknown and "implicit" in settings.judges:
            raise UserError(f"implicit.{set_name}.models names {', '.join(unknown)}, which are not evaluated; "
                            f"evaluated: {', '.join(models)}")
    unknown = sorted((set(settings.safety_against) | set(settings.safety_against.values())) - set(models))
    if unknown:
        raise UserError(f"safety_against names {', '.join(unknown)}, which are not evaluated; evaluated: "
                        f"{', '.join(models)}")
    xstest_rows = _load_xstest(settings) if "xstest" in settings.suites else None
    generation = settings.generation
    report: dict[str, Any] = {
        "baseline": baseline,
        "judges": list(settings.judges),
        "confidence": settings.confidence,
        "models": {name: {"spec": spec} for name, spec in models.items()},
        "elo": {},
        "settings": {"max_new_tokens": generation.max_new_tokens, "do_sample": generation.do_sample,
                     "template": generation.template, "seed": settings.seed},
    }
    if settings.suites:
        report["suites"] = list(settings.suites)
        report["settings"]["xstest_per_type"] = settings.xstest_per_type
    reliability = score_judge_reliability(settings)
    listed = {str(r.get("model")) for r in reliability.values()}
    for judge in safety_judges:  # a per-answer classifier on another score model this library trained
        info = describe_judge(judge, confidence=settings.confidence)
        if "reliability" in info and str(info.get("model")) not in listed:
            reliability[judge.name] = {"model": str(info["model"]), **info["reliability"]}
    if reliability:
        report["judge_reliability"] = reliability
    run = _Run(models, baseline, Path(output_dir), report, xstest_rows=xstest_rows)
    if "llm" in settings.judges:
        run.llm_judge = llm_judge_override or llm_judge(settings, output_dir)
    if settings.needs_generation and settings.prompt_files:
        _generate(settings, run)
    if xstest_rows is not None:
        _generate_xstest(settings, run)
    if run.gens:
        _text_quality(settings, run)
    for judge, run_judge in (("reward_cost", _run_reward_cost), ("llm", _run_llm_judge), ("implicit", _run_implicit)):
        if judge in settings.judges:
            run_judge(settings, run)
    xstest_judges = _xstest_judges(safety_judges) if xstest_rows is not None else []
    safety, xstest = _run_per_answer_judges(settings, run, safety_judges, xstest_judges)
    measured_on = None
    if "safety" in run.gens:  # the generations already hold one row per safety prompt
        measured_on = f"{len(run.gens['safety'][run.baseline])} prompts of {settings.prompts_safety}"
    write_report(report, run.output_dir, training_logs=settings.training_logs, safety=safety,
                 predicted_safety=settings.predicted_safety, xstest=xstest,
                 generation=asdict(settings.generation), prompts=measured_on)
    rank_zero_info(f"Evaluation report written to {run.output_dir / 'report.md'}")
    return report
