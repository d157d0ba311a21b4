"""``sacpo generate`` and ``sacpo evaluate``.

    sacpo generate --model outputs/step2/export --prompts ../shared/data/eval/safety_problem.json \\
        --output outputs/eval/step2_safety.jsonl --max_new_tokens 256

    sacpo generate --model 'mix:outputs/step1/export+outputs/step2/export@0.3' \\
        --prompts ../shared/data/eval/safety_problem.json --output outputs/eval/mix_q0.3.jsonl \\
        --do_sample --sequence_level true --samples_per_prompt 16

    sacpo evaluate --models sft=smollm2 step1=outputs/step1/export step2=outputs/step2/export \\
        'mix:outputs/step1/export+outputs/step2/export@0.5' --baseline sft --judges reward_cost \\
        --reward_model outputs/smollm2/reward_model/export --cost_model outputs/smollm2/cost_model/export \\
        --output outputs/eval

    sacpo evaluate --models sft=smollm2 step2=outputs/step2/export --baseline sft --judges none --suites xstest \
        --xstest_per_type 5 --output outputs/eval_xstest

Both parsers are built by jsonargparse from the typed dataclasses below (and
:class:`~sacpo_lightning.evaluation.generation.GenerationSettings`), so ``--config FILE`` (a YAML of the options) and
``--print_config`` work and the defaults are those of the dataclasses. The command-line spellings of the argparse
version still work (:func:`sacpo_lightning.cli_args.command_argv`): a bare boolean flag (``--do_sample``), several
values after a list option (``--models a=b c=d``) and repeated list options (``--safety_judges refusal
--safety_judges guard:DIR``). The flags of ``sacpo evaluate`` are the field names of
:class:`~sacpo_lightning.evaluation.settings.EvaluationSettings`, the keys of a pipeline's ``evaluate:`` section; the
old spellings ``--judge``, ``--suite`` and ``--safety_judge`` still work, with a deprecation warning.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from sacpo_lightning.cli_args import command_argv
from sacpo_lightning.evaluation.generation import GenerationSettings
from sacpo_lightning.evaluation.settings import SETTINGS_KEYS, EvaluationSettings

__all__ = ["build_evaluate_parser", "evaluate_main", "generate_main"]

DEFAULT_SAFETY_PROMPTS = "../shared/data/eval/safety_problem.json"
DEFAULT_HELPFUL_PROMPTS = "../shared/data/eval/helpful_problem.json"
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
class EvaluateCommand:
    """Which models ``sacpo evaluate`` judges and where the report goes (the rest are
    :class:`~sacpo_lightning.evaluation.settings.EvaluationSettings`).

    Attributes:
        models: Models as NAME=SPEC or SPEC (folder, named model, or mix:DIR_A+DIR_B@Q).
        baseline: Name (or spec) of the baseline, usually the SFT model.
        output: Output folder (report.json, report.md, pareto.png, caches).
    """

    models: list[str]
    baseline: str
    output: str


@dataclass
class ImplicitOptions:
    """The implicit judge's held-out pairs, as flags: a shorthand that builds the ``implicit`` setting (its pair sets
    ``helpful`` and ``safety``).

    Attributes:
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


EVALUATE_OPTIONS = (EvaluateCommand, EvaluationSettings, ImplicitOptions, GenerationSettings)


def build_evaluate_parser() -> ArgumentParser:
    """The ``sacpo evaluate`` parser (takes :func:`sacpo_lightning.cli_args.command_argv` of the command line): the
    fields of :class:`EvaluateCommand` and :class:`~sacpo_lightning.evaluation.settings.EvaluationSettings` as flags,
    with those of its ``generation`` spelled as top-level flags (as in ``sacpo generate``) and the
    :class:`ImplicitOptions` shorthand. The prompt sets default to the shared evaluation prompts."""
    parser = ArgumentParser(prog="sacpo evaluate", description="Judge models against a baseline: win rates with "
                            "bootstrap intervals, Elo, report and plots.")
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of these options.")
    parser.add_class_arguments(EvaluateCommand, nested_key=None, as_group=True)
    parser.add_class_arguments(EvaluationSettings, nested_key=None, as_group=True, skip={"generation"})
    parser.add_class_arguments(ImplicitOptions, nested_key=None, as_group=True)
    parser.add_class_arguments(GenerationSettings, nested_key=None, as_group=True)
    parser.set_defaults(prompts_safety=DEFAULT_SAFETY_PROMPTS, prompts_helpful=DEFAULT_HELPFUL_PROMPTS)
    return parser


# Old spellings of the flags that are now the settings' field names.
RENAMED_FLAGS = {"judge": "judges", "suite": "suites", "safety_judge": "safety_judges"}


def renamed_flags(argv: Sequence[str]) -> list[str]:
    """``argv`` with the old flag spellings (``--judge``, ``--suite``, ``--safety_judge``) replaced by the field names,
    with a deprecation warning for each."""
    out = []
    for token in argv:
        name, eq, value = token.partition("=")
        new = RENAMED_FLAGS.get(name[2:].replace("-", "_")) if name.startswith("--") else None
        if new is not None:
            warnings.warn(f"sacpo evaluate: {name} is deprecated; use --{new} (the evaluation setting's name, as in "
                          "a pipeline's evaluate: section)", FutureWarning, stacklevel=2)
            token = f"--{new}{eq}{value}"
        out.append(token)
    return out


def evaluation_settings(ns: Namespace, parser: ArgumentParser) -> EvaluationSettings:
    """The :class:`~sacpo_lightning.evaluation.settings.EvaluationSettings` of a parsed ``sacpo evaluate`` command
    line (errors exit with usage)."""
    values = {name: ns[name] for name in SETTINGS_KEYS if name not in ("generation", "implicit")}
    implicit = _options(ImplicitOptions, ns).pair_sets()
    if ns["implicit"] and implicit:
        parser.error("--implicit and the --implicit_*_pairs flags both set the implicit pair sets; give one")
    try:
        generation = _options(GenerationSettings, ns)
        return EvaluationSettings(generation=generation, implicit=ns["implicit"] or implicit or None, **values)
    except ValueError as err:
        parser.error(str(err))


def evaluate_main(argv: list[str]) -> int:
    """``sacpo evaluate``: see :func:`sacpo_lightning.evaluation.evaluate.evaluate_models`."""
    from sacpo_lightning.evaluation.evaluate import evaluate_models, parse_named_models

    parser = build_evaluate_parser()
    ns = parser.parse_args(command_argv(renamed_flags(argv), EVALUATE_OPTIONS))
    options = _options(EvaluateCommand, ns)
    try:
        models = parse_named_models(options.models)
    except ValueError as err:
        parser.error(str(err))
    report = evaluate_models(models, options.baseline, options.output, evaluation_settings(ns, parser))
    summary = {name: {k: m[k]["win_rate"] for k in ("helpfulness", "harmlessness") if m.get(k)}
               for name, m in report["models"].items()}
    for name, m in (report.get("xstest") or {}).get("models", {}).items():
        summary[name].update({f"xstest_{k}": m[k]["rate"] for k in ("over_refusal", "unsafe_compliance") if m[k]})
    print(json.dumps(summary, indent=2))
    print(f"{options.output}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(evaluate_main(sys.argv[1:]))
