"""``sacpo generate`` and ``sacpo evaluate``.

    sacpo generate --model outputs/step2/export --prompts ../shared/data/eval/safety_problem.json \\
        --output outputs/eval/step2_safety.jsonl --max_new_tokens 256

    sacpo generate --model 'mix:outputs/step1/export+outputs/step2/export@0.3' \\
        --prompts ../shared/data/eval/safety_problem.json --output outputs/eval/mix_q0.3.jsonl \\
        --do_sample --sequence_level true --samples_per_prompt 16

    sacpo evaluate --models sft=smollm2 step1=outputs/step1/export step2=outputs/step2/export \\
        'mix:outputs/step1/export+outputs/step2/export@0.5' --baseline sft --judge reward_cost \\
        --reward_model outputs/smollm2/reward_model/export --cost_model outputs/smollm2/cost_model/export \\
        --output outputs/eval

    sacpo evaluate --models sft=smollm2 step2=outputs/step2/export --baseline sft --judge none --suite xstest \
        --xstest_per_type 5 --output outputs/eval_xstest

Both parsers are built by jsonargparse from the typed dataclasses below (and
:class:`~sacpo_lightning.evaluation.generation.GenerationSettings`), so ``--config FILE`` (a YAML of the options) and
``--print_config`` work and the defaults are those of the dataclasses. The command-line spellings of the argparse
version still work (:func:`sacpo_lightning.cli_args.command_argv`): a bare boolean flag (``--do_sample``), several
values after a list option (``--models a=b c=d``) and repeated list options (``--safety_judge refusal
--safety_judge guard:DIR``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from sacpo_lightning.cli_args import command_argv
from sacpo_lightning.data.prompts import DEFAULT_XSTEST_PROMPTS
from sacpo_lightning.evaluation.evaluate import EvaluationSettings
from sacpo_lightning.evaluation.generation import GenerationSettings

__all__ = ["build_evaluate_parser", "evaluate_main", "generate_main"]

DEFAULT_SAFETY_PROMPTS = "../shared/data/eval/safety_problem.json"
DEFAULT_HELPFUL_PROMPTS = "../shared/data/eval/helpful_problem.json"
_DEFAULTS = EvaluationSettings  # its fields' defaults are class attributes
PairSource = Literal["pku", "hh", "generic"]


@dataclass
class GenerateOptions:
    """Generate responses on a prompt set.

    Attributes:
        model: Model folder, named model, or mix:DIR_A+DIR_B@Q.
        prompts: JSON list or JSON lines of {prompt, category?}.
        output: Output .jsonl file ({prompt, category, response, model}; with --sequence_level true also samples
            [{response, log_weight, weight}], ess and resampled_index).
        name: Value of the 'model' field (default: the model spec).
        force: Regenerate even when the cached output matches.
    """

    model: str
    prompts: str
    output: str
    name: str | None = None
    force: bool = False


@dataclass
class EvaluateOptions:
    """Judge models against a baseline: win rates with bootstrap intervals, Elo, report and plots.

    Attributes:
        models: Models as NAME=SPEC or SPEC (folder, named model, or mix:DIR_A+DIR_B@Q).
        baseline: Name (or spec) of the baseline, usually the SFT model.
        output: Output folder (report.json, report.md, pareto.png, caches).
        judge: Judges to run ('none': only the per-answer --safety_judge judges and the --suite suites).
        prompts_safety: Safety prompt set ('none' to skip).
        prompts_helpful: Helpfulness prompt set ('none' to skip).
        training_logs: STAGE=metrics.csv for training_curves.png.
        bootstrap_samples: Bootstrap resamples of the win-rate intervals.
        confidence: Confidence level of the intervals.
        elo_shuffles: Random match orders averaged by Elo.
        tie_eps: Score differences within this are ties.
        reward_model: Reward model folder (sequence classification) for the reward_cost judge.
        cost_model: Cost model folder (sequence classification) for the reward_cost judge.
        score_batch_size: Batch size of the score models.
        suite: Built-in suites to run: xstest (over-refusal on safe prompts that only look unsafe, unsafe compliance
            on their unsafe contrasts; xstest.csv, xstest.json, xstest.png).
        xstest_prompts: XSTest prompt file: CSV with the columns id,prompt,type,label (safe or unsafe), focus and
            note optional.
        xstest_per_type: Use at most this many XSTest prompts per type (a deterministic stratified subset).
    """

    models: list[str]
    baseline: str
    output: str
    judge: list[Literal["reward_cost", "llm", "implicit", "none"]] = field(
        default_factory=lambda: list(_DEFAULTS.judges))
    prompts_safety: str = DEFAULT_SAFETY_PROMPTS
    prompts_helpful: str = DEFAULT_HELPFUL_PROMPTS
    training_logs: list[str] = field(default_factory=list)
    bootstrap_samples: int = _DEFAULTS.bootstrap_samples
    confidence: float = _DEFAULTS.confidence
    elo_shuffles: int = _DEFAULTS.elo_shuffles
    tie_eps: float = _DEFAULTS.tie_eps
    reward_model: str | None = None
    cost_model: str | None = None
    score_batch_size: int = _DEFAULTS.score_batch_size
    suite: list[Literal["xstest"]] = field(default_factory=list)
    xstest_prompts: str = DEFAULT_XSTEST_PROMPTS
    xstest_per_type: int | None = None


@dataclass
class LLMJudgeOptions:
    """The llm judge's backend.

    Attributes:
        judge_url: OpenAI-compatible endpoint (base URL or .../chat/completions).
        judge_model: Model name sent to the endpoint.
        judge_api_key_env: Environment variable with the API key.
        judge_local: A local causal LM folder used as the judge (greedy).
        judge_repeats: Judgements per answer order.
        judge_single_order: Judge only with the model's answer first.
        judge_max_tokens: Most generated tokens per judgement.
        judge_temperature: Sampling temperature of the endpoint.
    """

    judge_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    judge_local: str | None = None
    judge_repeats: int = 1
    judge_single_order: bool = False
    judge_max_tokens: int = 512
    judge_temperature: float = 0.0


@dataclass
class ImplicitOptions:
    """The implicit judge's held-out pairs.

    Attributes:
        implicit_reference: Reference model spec (default: the baseline).
        implicit_helpful_pairs: Helpfulness pair files (HH-RLHF format).
        implicit_helpful_source: Format of the helpfulness pair files.
        implicit_safety_pairs: Safety pair files (PKU-SafeRLHF format).
        implicit_safety_source: Format of the safety pair files.
        implicit_split: val: the held-out split of training with the same val_fraction and data seed.
        implicit_val_fraction: Held-out fraction of the pairs.
        implicit_data_seed: Seed of the held-out split.
        implicit_max_pairs: Most pairs per set.
        implicit_template: Prompt template.
        implicit_max_length: Most tokens of prompt and response.
        implicit_max_prompt_length: Most prompt tokens.
    """

    implicit_reference: str | None = None
    implicit_helpful_pairs: list[str] = field(default_factory=list)
    implicit_helpful_source: PairSource = "hh"
    implicit_safety_pairs: list[str] = field(default_factory=list)
    implicit_safety_source: PairSource = "pku"
    implicit_split: Literal["val", "all"] = "val"
    implicit_val_fraction: float = 0.05
    implicit_data_seed: int = 42
    implicit_max_pairs: int | None = None
    implicit_template: Literal["chat", "pku", "raw"] = "chat"
    implicit_max_length: int = 512
    implicit_max_prompt_length: int = 256

    def pair_sets(self) -> dict[str, dict[str, Any]]:
        """``{set name: pair_dataloader keyword arguments}`` of the given pair files."""
        common = {"split": self.implicit_split, "val_fraction": self.implicit_val_fraction,
                  "seed": self.implicit_data_seed, "max_pairs": self.implicit_max_pairs,
                  "template": self.implicit_template, "max_length": self.implicit_max_length,
                  "max_prompt_length": self.implicit_max_prompt_length}
        sets = {}
        if self.implicit_helpful_pairs:
            sets["helpful"] = {"train_files": self.implicit_helpful_pairs, "source": self.implicit_helpful_source,
                               "objective": "helpful", **common}
        if self.implicit_safety_pairs:
            sets["safety"] = {"train_files": self.implicit_safety_pairs, "source": self.implicit_safety_source,
                              "objective": "safe", **common}
        return sets


@dataclass
class SafetyJudgeOptions:
    """Per-answer safety judges.

    Attributes:
        safety_judge: Repeatable: guard:MODEL_DIR (Llama Guard style causal LM), classifier:MODEL_DIR (cost model or
            safety classifier), refusal (rule-based), or a JSON object with more settings.
        safety_threshold: Check E[safety] >= B per model (safety = fraction of answers judged safe).
        predicted_safety: Repeatable: NAME=budget.json, the budget solver's prediction (lambda_star,
            predicted_safety) for model NAME.
    """

    safety_judge: list[str] = field(default_factory=list)
    safety_threshold: float | None = None
    predicted_safety: list[str] = field(default_factory=list)


def _parser(prog: str, description: str, option_types: Sequence[type]) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of these options.")
    for option_type in option_types:
        parser.add_class_arguments(option_type, nested_key=None, as_group=True)
    return parser


def _options(option_type: type, ns: Namespace) -> Any:
    return option_type(**{f.name: ns[f.name] for f in fields(option_type)})


def _generation_settings(ns: Namespace, parser: ArgumentParser) -> GenerationSettings:
    try:
        return _options(GenerationSettings, ns)
    except ValueError as err:
        parser.error(str(err))


GENERATE_OPTIONS = (GenerateOptions, GenerationSettings)


def generate_main(argv: list[str]) -> int:
    """``sacpo generate``: responses of one model on one prompt set, as JSON lines (cached by settings hash)."""
    from sacpo_lightning.evaluation.generation import generate_to_file

    parser = _parser("sacpo generate", "Generate responses on a prompt set.", GENERATE_OPTIONS)
    ns = parser.parse_args(command_argv(argv, GENERATE_OPTIONS))
    options = _options(GenerateOptions, ns)
    settings = _generation_settings(ns, parser)
    path = generate_to_file(options.model, options.prompts, options.output, settings, name=options.name,
                            force=options.force)
    print(path)
    return 0


def _parse_logs(items: list[str], parser: ArgumentParser) -> dict[str, str]:
    logs = {}
    for item in items:
        stage, sep, path = item.partition("=")
        if not sep or not stage or not path:
            parser.error(f"--training_logs takes STAGE=PATH/metrics.csv items, got {item!r}")
        logs[stage] = path
    return logs


def _parse_safety_options(options: SafetyJudgeOptions, parser: ArgumentParser) -> dict[str, Any]:
    """``--safety_judge``, ``--safety_threshold`` and ``--predicted_safety`` as ``evaluate_models`` arguments."""
    from sacpo_lightning.evaluation.safety_judges import parse_safety_judge_arg

    try:
        judges = [parse_safety_judge_arg(item) for item in options.safety_judge]
    except ValueError as err:
        parser.error(str(err))
    predicted = {}
    for item in options.predicted_safety:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--predicted_safety takes MODEL_NAME=budget.json items, got {item!r}")
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            parser.error(f"--predicted_safety {item!r}: cannot read {path} as JSON ({err})")
        if not isinstance(values, dict):
            parser.error(f"--predicted_safety {item!r}: {path} must hold a JSON object with lambda_star and "
                         "predicted_safety")
        predicted[name] = values
    return {"safety_judges": judges or None, "safety_threshold": options.safety_threshold,
            "predicted_safety": predicted or None}


EVALUATE_OPTIONS = (EvaluateOptions, LLMJudgeOptions, ImplicitOptions, SafetyJudgeOptions, GenerationSettings)


def build_evaluate_parser() -> ArgumentParser:
    """The ``sacpo evaluate`` parser (takes :func:`sacpo_lightning.cli_args.command_argv` of the command line)."""
    return _parser("sacpo evaluate", "Judge models against a baseline: win rates with bootstrap intervals, Elo, "
                   "report and plots.", EVALUATE_OPTIONS)


def _llm_judge(options: LLMJudgeOptions, output: str, device: str | None, parser: ArgumentParser) -> Any:
    from sacpo_lightning.evaluation.judge import HFLocalBackend, OpenAIChatBackend, PairwiseJudge

    if (options.judge_url is None) == (options.judge_local is None):
        parser.error("--judge llm needs exactly one of --judge_url (with --judge_model) or --judge_local")
    if options.judge_url is not None:
        if not options.judge_model:
            parser.error("--judge_url needs --judge_model")
        backend = OpenAIChatBackend(options.judge_url, options.judge_model, api_key_env=options.judge_api_key_env,
                                    temperature=options.judge_temperature, max_tokens=options.judge_max_tokens)
    else:
        backend = HFLocalBackend(options.judge_local, max_new_tokens=options.judge_max_tokens, device=device)
    return PairwiseJudge(backend, cache_path=f"{output}/judgements.jsonl", repeats=options.judge_repeats,
                         both_orders=not options.judge_single_order)


def _evaluation_settings(ns: Namespace, parser: ArgumentParser) -> EvaluationSettings:
    """The :class:`EvaluationSettings` of a parsed ``sacpo evaluate`` command line (errors exit with usage)."""
    options = _options(EvaluateOptions, ns)
    generation = _generation_settings(ns, parser)
    judges = [j for j in options.judge if j != "none"]
    llm_judge = _llm_judge(_options(LLMJudgeOptions, ns), options.output, generation.device, parser) if (
        "llm" in judges) else None
    implicit = _options(ImplicitOptions, ns)
    none = ("", "none", "None")
    try:
        return EvaluationSettings(
            prompts_safety=None if options.prompts_safety in none else options.prompts_safety,
            prompts_helpful=None if options.prompts_helpful in none else options.prompts_helpful,
            reward_model_dir=options.reward_model, cost_model_dir=options.cost_model, generation=generation,
            judges=judges, llm_judge=llm_judge, implicit_sets=implicit.pair_sets() or None,
            implicit_reference=implicit.implicit_reference, training_logs=_parse_logs(options.training_logs, parser),
            score_batch_size=options.score_batch_size, bootstrap_samples=options.bootstrap_samples,
            confidence=options.confidence, elo_shuffles=options.elo_shuffles, seed=generation.seed,
            tie_eps=options.tie_eps, suites=options.suite, xstest_prompts=options.xstest_prompts,
            xstest_per_type=options.xstest_per_type, **_parse_safety_options(_options(SafetyJudgeOptions, ns), parser),
        )
    except ValueError as err:
        parser.error(str(err))


def evaluate_main(argv: list[str]) -> int:
    """``sacpo evaluate``: see :func:`sacpo_lightning.evaluation.evaluate.evaluate_models`."""
    from sacpo_lightning.evaluation.evaluate import parse_named_models, run_evaluation

    parser = build_evaluate_parser()
    ns = parser.parse_args(command_argv(argv, EVALUATE_OPTIONS))
    options = _options(EvaluateOptions, ns)
    try:
        models = parse_named_models(options.models)
    except ValueError as err:
        parser.error(str(err))
    report = run_evaluation(models, options.baseline, options.output, _evaluation_settings(ns, parser))
    summary = {name: {k: m[k]["win_rate"] for k in ("helpfulness", "harmlessness") if m.get(k)}
               for name, m in report["models"].items()}
    for name, m in (report.get("xstest") or {}).get("models", {}).items():
        summary[name].update({f"xstest_{k}": m[k]["rate"] for k in ("over_refusal", "unsafe_compliance") if m[k]})
    print(json.dumps(summary, indent=2))
    print(f"{options.output}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(evaluate_main(sys.argv[1:]))
