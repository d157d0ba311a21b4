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
"""

from __future__ import annotations

import argparse
import json
import sys

from sacpo_lightning.evaluation.generation import GenerationSettings

__all__ = ["evaluate_main", "generate_main"]

DEFAULT_SAFETY_PROMPTS = "../shared/data/eval/safety_problem.json"
DEFAULT_HELPFUL_PROMPTS = "../shared/data/eval/helpful_problem.json"


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_generation_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("generation")
    g.add_argument("--max_new_tokens", type=int, default=256, help="Most generated tokens per response.")
    g.add_argument("--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    g.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    g.add_argument("--top_p", type=float, default=1.0, help="Nucleus-sampling mass.")
    g.add_argument("--seed", type=int, default=0, help="Seed of sampling (and of bootstrap/Elo for evaluate).")
    g.add_argument("--batch_size", type=int, default=8, help="Prompts per generation batch.")
    g.add_argument("--template", default="chat", help="chat, pku, raw, or a format string containing {input}.")
    g.add_argument("--stop", nargs="*", default=[], help="Stop strings (the response is cut before them).")
    g.add_argument("--max_prompt_tokens", type=int, default=None, help="Keep only the last N prompt tokens.")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="Load dtype (default: the checkpoint's).")
    g.add_argument("--device", default=None, help="Device (default: cuda when available, else cpu).")
    g.add_argument("--sequence_level", type=_parse_bool, default=False, metavar="{true,false}",
                   help="Estimate the sequence-level geometric mixture pi_A(y)^(1-q) pi_B(y)^q of mix:A+B@q specs "
                        "(not the token-level one they decode): --samples_per_prompt samples per prompt with "
                        "importance weights, their effective sample size and one resampled answer per prompt. "
                        "Needs --do_sample, --temperature 1, --top_p 1. Other models are sampled the same way "
                        "(exact, equal weights).")
    g.add_argument("--samples_per_prompt", type=int, default=1,
                   help="Samples per prompt with --sequence_level true (>= 2; more samples, better estimates).")


def _generation_settings(ns: argparse.Namespace) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=ns.max_new_tokens, do_sample=ns.do_sample, temperature=ns.temperature, top_p=ns.top_p,
        seed=ns.seed, batch_size=ns.batch_size, template=ns.template, stop=ns.stop,
        max_prompt_tokens=ns.max_prompt_tokens, dtype=ns.dtype, device=ns.device,
        samples_per_prompt=ns.samples_per_prompt, sequence_level=ns.sequence_level,
    )


def generate_main(argv: list[str]) -> int:
    """``sacpo generate``: responses of one model on one prompt set, as JSON lines (cached by settings hash)."""
    from sacpo_lightning.evaluation.generation import generate_to_file

    parser = argparse.ArgumentParser(prog="sacpo generate", description="Generate responses on a prompt set.")
    parser.add_argument("--model", required=True, help="Model folder, named model, or mix:DIR_A+DIR_B@Q.")
    parser.add_argument("--prompts", required=True, help="JSON list or JSON lines of {prompt, category?}.")
    parser.add_argument("--output", required=True,
                        help="Output .jsonl file ({prompt, category, response, model}; with --sequence_level true "
                             "also samples [{response, log_weight, weight}], ess and resampled_index).")
    parser.add_argument("--name", default=None, help="Value of the 'model' field (default: the model spec).")
    parser.add_argument("--force", action="store_true", help="Regenerate even when the cached output matches.")
    _add_generation_args(parser)
    ns = parser.parse_args(argv)
    try:
        settings = _generation_settings(ns)
    except ValueError as err:
        parser.error(str(err))
    path = generate_to_file(ns.model, ns.prompts, ns.output, settings, name=ns.name, force=ns.force)
    print(path)
    return 0


def _parse_logs(items: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    logs = {}
    for item in items:
        stage, sep, path = item.partition("=")
        if not sep or not stage or not path:
            parser.error(f"--training_logs takes STAGE=PATH/metrics.csv items, got {item!r}")
        logs[stage] = path
    return logs


def _parse_safety_options(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """``--safety_judge``, ``--safety_threshold`` and ``--predicted_safety`` as ``evaluate_models`` arguments."""
    from sacpo_lightning.evaluation.safety_judges import parse_safety_judge_arg

    try:
        judges = [parse_safety_judge_arg(item) for item in ns.safety_judge]
    except ValueError as err:
        parser.error(str(err))
    predicted = {}
    for item in ns.predicted_safety:
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
    return {"safety_judges": judges or None, "safety_threshold": ns.safety_threshold,
            "predicted_safety": predicted or None}


def build_evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sacpo evaluate",
        description="Judge models against a baseline: win rates with bootstrap intervals, Elo, report and plots.",
    )
    parser.add_argument("--models", nargs="+", required=True,
                        help="Models as NAME=SPEC or SPEC (folder, named model, or mix:DIR_A+DIR_B@Q).")
    parser.add_argument("--baseline", required=True, help="Name (or spec) of the baseline, usually the SFT model.")
    parser.add_argument("--judge", nargs="+", default=["reward_cost"],
                        choices=["reward_cost", "llm", "implicit", "none"],
                        help="Judges to run ('none': only the per-answer --safety_judge judges).")
    parser.add_argument("--output", required=True, help="Output folder (report.json, report.md, pareto.png, caches).")
    parser.add_argument("--prompts_safety", default=DEFAULT_SAFETY_PROMPTS,
                        help="Safety prompt set ('none' to skip).")
    parser.add_argument("--prompts_helpful", default=DEFAULT_HELPFUL_PROMPTS,
                        help="Helpfulness prompt set ('none' to skip).")
    parser.add_argument("--training_logs", nargs="*", default=[], help="STAGE=metrics.csv for training_curves.png.")
    parser.add_argument("--bootstrap_samples", type=int, default=1000)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--elo_shuffles", type=int, default=100)
    parser.add_argument("--tie_eps", type=float, default=1e-6, help="Score differences within this are ties.")

    s = parser.add_argument_group("reward_cost judge")
    s.add_argument("--reward_model", default=None, help="Reward model folder (sequence classification).")
    s.add_argument("--cost_model", default=None, help="Cost model folder (sequence classification).")
    s.add_argument("--score_batch_size", type=int, default=8)

    j = parser.add_argument_group("llm judge")
    j.add_argument("--judge_url", default=None, help="OpenAI-compatible endpoint (base URL or .../chat/completions).")
    j.add_argument("--judge_model", default=None, help="Model name sent to the endpoint.")
    j.add_argument("--judge_api_key_env", default="OPENAI_API_KEY", help="Environment variable with the API key.")
    j.add_argument("--judge_local", default=None, help="A local causal LM folder used as the judge (greedy).")
    j.add_argument("--judge_repeats", type=int, default=1, help="Judgements per answer order.")
    j.add_argument("--judge_single_order", action="store_true", help="Judge only with the model's answer first.")
    j.add_argument("--judge_max_tokens", type=int, default=512)
    j.add_argument("--judge_temperature", type=float, default=0.0)

    i = parser.add_argument_group("implicit judge")
    i.add_argument("--implicit_reference", default=None, help="Reference model spec (default: the baseline).")
    i.add_argument("--implicit_helpful_pairs", nargs="*", default=[], help="Helpfulness pair files (HH-RLHF format).")
    i.add_argument("--implicit_helpful_source", default="hh", choices=["pku", "hh", "generic"])
    i.add_argument("--implicit_safety_pairs", nargs="*", default=[], help="Safety pair files (PKU-SafeRLHF format).")
    i.add_argument("--implicit_safety_source", default="pku", choices=["pku", "hh", "generic"])
    i.add_argument("--implicit_split", default="val", choices=["val", "all"],
                   help="val: the held-out split of training with the same val_fraction and data seed.")
    i.add_argument("--implicit_val_fraction", type=float, default=0.05)
    i.add_argument("--implicit_data_seed", type=int, default=42)
    i.add_argument("--implicit_max_pairs", type=int, default=None)
    i.add_argument("--implicit_template", default="chat", choices=["chat", "pku", "raw"])
    i.add_argument("--implicit_max_length", type=int, default=512)
    i.add_argument("--implicit_max_prompt_length", type=int, default=256)

    sj = parser.add_argument_group("per-answer safety judges")
    sj.add_argument("--safety_judge", action="append", default=[], metavar="KIND[:MODEL]",
                    help="Repeatable: guard:MODEL_DIR (Llama Guard style causal LM), classifier:MODEL_DIR (cost model "
                         "or safety classifier), refusal (rule-based), or a JSON object with more settings.")
    sj.add_argument("--safety_threshold", type=float, default=None, metavar="B",
                    help="Check E[safety] >= B per model (safety = fraction of answers judged safe).")
    sj.add_argument("--predicted_safety", action="append", default=[], metavar="NAME=budget.json",
                    help="Repeatable: the budget solver's prediction (lambda_star, predicted_safety) for model NAME.")
    _add_generation_args(parser)
    return parser


def evaluate_main(argv: list[str]) -> int:
    """``sacpo evaluate``: see :func:`sacpo_lightning.evaluation.evaluate.evaluate_models`."""
    from sacpo_lightning.evaluation.evaluate import evaluate_models, parse_named_models

    parser = build_evaluate_parser()
    ns = parser.parse_args(argv)
    try:
        settings = _generation_settings(ns)
        models = parse_named_models(ns.models)
    except ValueError as err:
        parser.error(str(err))
    judge = None
    if "llm" in ns.judge:
        from sacpo_lightning.evaluation.judge import HFLocalBackend, OpenAIChatBackend, PairwiseJudge

        if (ns.judge_url is None) == (ns.judge_local is None):
            parser.error("--judge llm needs exactly one of --judge_url (with --judge_model) or --judge_local")
        if ns.judge_url is not None:
            if not ns.judge_model:
                parser.error("--judge_url needs --judge_model")
            backend = OpenAIChatBackend(ns.judge_url, ns.judge_model, api_key_env=ns.judge_api_key_env,
                                        temperature=ns.judge_temperature, max_tokens=ns.judge_max_tokens)
        else:
            backend = HFLocalBackend(ns.judge_local, max_new_tokens=ns.judge_max_tokens, device=ns.device)
        judge = PairwiseJudge(backend, cache_path=f"{ns.output}/judgements.jsonl", repeats=ns.judge_repeats,
                              both_orders=not ns.judge_single_order)
    implicit_sets = {}
    common = {"split": ns.implicit_split, "val_fraction": ns.implicit_val_fraction, "seed": ns.implicit_data_seed,
              "max_pairs": ns.implicit_max_pairs, "template": ns.implicit_template,
              "max_length": ns.implicit_max_length, "max_prompt_length": ns.implicit_max_prompt_length}
    if ns.implicit_helpful_pairs:
        implicit_sets["helpful"] = {"train_files": ns.implicit_helpful_pairs, "source": ns.implicit_helpful_source,
                                    "objective": "helpful", **common}
    if ns.implicit_safety_pairs:
        implicit_sets["safety"] = {"train_files": ns.implicit_safety_pairs, "source": ns.implicit_safety_source,
                                   "objective": "safe", **common}
    none = ("", "none", "None")
    report = evaluate_models(
        models,
        ns.baseline,
        None if ns.prompts_safety in none else ns.prompts_safety,
        None if ns.prompts_helpful in none else ns.prompts_helpful,
        ns.reward_model,
        ns.cost_model,
        ns.output,
        settings,
        judges=[j for j in ns.judge if j != "none"],
        llm_judge=judge,
        implicit_sets=implicit_sets or None,
        implicit_reference=ns.implicit_reference,
        training_logs=_parse_logs(ns.training_logs, parser),
        score_batch_size=ns.score_batch_size,
        bootstrap_samples=ns.bootstrap_samples,
        confidence=ns.confidence,
        elo_shuffles=ns.elo_shuffles,
        seed=ns.seed,
        tie_eps=ns.tie_eps,
        **_parse_safety_options(ns, parser),
    )
    summary = {name: {k: m[k]["win_rate"] for k in ("helpfulness", "harmlessness") if m.get(k)}
               for name, m in report["models"].items()}
    print(json.dumps(summary, indent=2))
    print(f"{ns.output}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(evaluate_main(sys.argv[1:]))
