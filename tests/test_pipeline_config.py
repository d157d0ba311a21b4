"""Pipeline configs: a step's composed class and data kind must agree with its role and algorithm."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sacpo_lightning.pipeline.config import PipelineConfigError, build_stages, load_pipeline_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_project_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _write(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "pipelines" / "tiny.yaml").read_text())
    raw.update(changes)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_class_path_that_disagrees_with_the_algorithm_is_an_error(tmp_path):
    path = _write(tmp_path, safety_step={"algorithm": "kto", "configs": ["configs/debug/tiny.yaml"]})
    with pytest.raises(PipelineConfigError, match=r"safety_step: .*model.class_path sacpo_lightning.modules."
                                                  r"SafetyDPO, but a safety step with algorithm kto is .*SafetyKTO"):
        load_pipeline_config(path)


def test_class_path_that_disagrees_with_the_role_is_an_error(tmp_path):
    path = _write(tmp_path, reward_step={"algorithm": "dpo", "configs": ["configs/debug/tiny.yaml"]})
    with pytest.raises(PipelineConfigError, match="reward_step: .*SafetyDPO, but a reward step with algorithm dpo"):
        load_pipeline_config(path)


def test_data_kind_that_disagrees_is_an_error(tmp_path):
    path = _write(tmp_path, safety_step={"algorithm": "dpo", "configs": ["configs/debug/tiny.yaml"],
                                         "overrides": {"data": {"kind": "kto"}}})
    with pytest.raises(PipelineConfigError, match="safety_step: .*data.kind 'kto', but algorithm dpo"):
        load_pipeline_config(path)


def _train_classes(cfg) -> dict[str, tuple[str, str]]:
    return {s.name: (s.config["model"]["class_path"], s.config["data"]["kind"])
            for s in build_stages(cfg) if s.kind == "train"}


def test_matching_and_unset_class_paths_pass(tmp_path):
    cfg = load_pipeline_config(_write(tmp_path, safety_step={
        "algorithm": "kto", "configs": ["configs/debug/tiny.yaml", "configs/debug/tiny_kto.yaml"]}))
    classes = _train_classes(cfg)
    safety = [v for k, v in classes.items() if k.startswith("safety")]
    assert safety and all(v == ("sacpo_lightning.modules.SafetyKTO", "kto") for v in safety), classes
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"trainer": {"max_steps": 2}}))
    cfg = load_pipeline_config(_write(tmp_path, reward_step={"algorithm": "kto", "configs": [str(bare)]}))
    assert _train_classes(cfg)["reward"] == ("sacpo_lightning.modules.RewardKTO", "kto")


def test_budget_needs_a_cost_model_and_a_probability_threshold(tmp_path):
    budget = {"b": 0.6, "prompts": "../shared/data/eval/safety_problem.json"}
    with pytest.raises(PipelineConfigError, match="safety_budget.cost_model: required"):
        load_pipeline_config(_write(tmp_path, safety_budget=budget))
    with pytest.raises(PipelineConfigError, match=r"safety_budget.b: .*probability in \(0, 1\)"):
        load_pipeline_config(_write(tmp_path, safety_budget={**budget, "b": 1.5, "cost_model": str(tmp_path)}))
    cfg = load_pipeline_config(_write(tmp_path, lambdas=[], merge={},
                                      safety_budget={**budget, "cost_model": str(tmp_path)}))
    assert cfg.safety_budget.b == 0.6 and cfg.lambdas == []
    with pytest.raises(PipelineConfigError, match="lambdas: must be a non-empty list"):
        load_pipeline_config(_write(tmp_path, lambdas=[]))


@pytest.mark.parametrize(("overrides", "algorithm", "named"), [
    ({"model": {"init_args": {"loss": "ipo"}}}, "dpo", "loss 'ipo'"),
    ({"model": {"init_args": {"loss": "hinge"}}}, "dpo", "loss 'hinge'"),
    ({"model": {"init_args": {"label_smoothing": 0.1}}}, "dpo", "label_smoothing 0.1"),
    ({}, "kto", "loss 'kto'"),
])
def test_budget_refuses_a_step2_loss_that_is_not_the_gibbs_tilt(tmp_path, overrides, algorithm, named):
    """lambda* is solved for DPO's optimum pi_r exp(lambda h / beta): another loss is refused at load time, naming the
    loss and the option that accepts the approximation; with the option it loads."""
    configs = ["configs/debug/tiny.yaml"] + (["configs/debug/tiny_kto.yaml"] if algorithm == "kto" else [])
    step = {"algorithm": algorithm, "configs": configs, "overrides": overrides}
    budget = {"b": 0.6, "prompts": "../shared/data/eval/safety_problem.json", "cost_model": str(tmp_path)}
    with pytest.raises(PipelineConfigError, match=f"safety_budget: the safety step trains with .*{named}.*"
                                                  "safety_budget.allow_approximate_loss: true"):
        load_pipeline_config(_write(tmp_path, lambdas=[], merge={}, safety_step=step, safety_budget=budget))
    cfg = load_pipeline_config(_write(tmp_path, lambdas=[], merge={}, safety_step=step,
                                      safety_budget={**budget, "allow_approximate_loss": True}))
    assert cfg.safety_budget.allow_approximate_loss


def test_budget_pipeline_without_safety_judges_fails_at_load(tmp_path):
    """The evaluation of a budget pipeline checks measured safety against b: without safety judges the config is
    refused when it is loaded, not after training."""
    raw = yaml.safe_load((ROOT / "configs" / "pipelines" / "tiny_budget.yaml").read_text())
    assert load_pipeline_config(ROOT / "configs" / "pipelines" / "tiny_budget.yaml").safety_budget is not None
    del raw["evaluate"]["safety_judges"]
    path = tmp_path / "no_judges.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(PipelineConfigError, match="evaluate.safety_judges: a safety_budget pipeline"):
        load_pipeline_config(path)



def test_budget_and_evaluation_on_one_prompt_file_use_disjoint_halves(tmp_path):
    """The budget samples the even rows of the file and the evaluation measures on the odd ones, so predicted vs
    measured is out of sample; ``heldout_evaluation: false`` or different files leave both on the whole file."""
    from sacpo_lightning.data.prompts import load_prompts
    from sacpo_lightning.evaluation.pipeline_stage import subset_prompts
    from sacpo_lightning.pipeline.config import build_stages

    def halves(**budget_changes):
        raw = yaml.safe_load((ROOT / "configs" / "pipelines" / "tiny_budget.yaml").read_text())
        raw["safety_budget"].update(budget_changes)
        path = tmp_path / "budget.yaml"
        path.write_text(yaml.safe_dump(raw))
        stages = {s.name: s for s in build_stages(load_pipeline_config(path))}
        return stages["budget"].config["prompts_half"], stages["evaluate"].config.get("safety_prompts_half")

    assert halves() == (0, 1)
    assert halves(heldout_evaluation=False) == (None, None)
    assert halves(prompts=str(ROOT.parent / "shared" / "data" / "eval" / "helpful_problem.json")) == (None, None)

    source = str(ROOT.parent / "shared" / "data" / "eval" / "safety_problem.json")
    rows = load_prompts(source)
    even = load_prompts(subset_prompts(source, 12, tmp_path, half=0))
    odd = load_prompts(subset_prompts(source, None, tmp_path, half=1))
    assert len(even) == 12 and len(odd) == len(rows) // 2
    assert {r["prompt"] for r in even} <= {r["prompt"] for r in rows[0::2]}
    assert not {r["prompt"] for r in even} & {r["prompt"] for r in odd}
    assert subset_prompts(source, None, tmp_path) == source

# ----------------------------------------------------------------------------------------------------------------------
# evaluate: one settings shape with sacpo evaluate
# ----------------------------------------------------------------------------------------------------------------------


def _eval_pipeline(tmp_path: Path, **evaluate_changes) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "pipelines" / "tiny_eval.yaml").read_text())
    raw["evaluate"].update(evaluate_changes)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_evaluate_keys_are_the_settings_fields_and_the_cli_flags():
    """The pipeline accepts exactly EvaluationSettings' fields plus its stage keys, and `sacpo evaluate` has a flag
    for every field (those of `generation` spelled as its own fields' flags)."""
    from dataclasses import fields

    from sacpo_lightning.evaluation.cli import EvaluateCommand, ImplicitOptions, build_evaluate_parser
    from sacpo_lightning.evaluation.generation import GenerationSettings
    from sacpo_lightning.evaluation.pipeline_stage import EVALUATE_KEYS
    from sacpo_lightning.evaluation.settings import EvaluationSettings

    names = {f.name for f in fields(EvaluationSettings)}
    assert EVALUATE_KEYS == names | {"max_prompts", "max_helpful_prompts", "safety_prompts_half"}
    flags = {a.dest for a in build_evaluate_parser()._actions} - {"help", "config", "print_config"}
    expected = (names - {"generation"}) | {f.name for f in fields(GenerationSettings)} | {
        f.name for f in fields(EvaluateCommand)} | {f.name for f in fields(ImplicitOptions)}
    assert flags == expected
    # the names users wrote before the settings had one shape
    assert {"reward_model", "cost_model", "judges", "suites", "safety_judges", "implicit"} <= names


@pytest.mark.parametrize("key", ["reward_model_dir", "judge", "seeds"])
def test_unknown_evaluate_key_is_named_with_the_known_ones(tmp_path, key):
    with pytest.raises(PipelineConfigError, match=rf"pipeline.yaml: evaluate: unknown key\(s\) {key}; known: .*"
                                                  r"bootstrap_samples, .*max_prompts, .*xstest_prompts"):
        load_pipeline_config(_eval_pipeline(tmp_path, **{key: 1}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bootstrap_samples": 0}, "evaluate: bootstrap_samples must be >= 1, got 0"),
        ({"bootstrap_samples": "100"}, "evaluate: bootstrap_samples must be an integer, got '100'"),
        ({"confidence": 1.5}, r"evaluate: confidence must be in \(0, 1\), got 1.5"),
        ({"judges": ["reward_cost", "llm"]}, None),
        ({"judges": ["oracle"]}, "evaluate: judges must be one or more of reward_cost, llm, implicit"),
        ({"generation": {"max_new_tokens": 8, "beams": 2}}, "evaluate: generation: unknown key.s. beams; known: "),
        ({"max_prompts": 0}, "evaluate.max_prompts must be an integer >= 1"),
        ({"judge_url": "http://localhost:1"}, "evaluate: judge_url needs judge_model"),
        ({"judges": ["implicit"], "implicit": {"s": {"train_files": ["x.jsonl"], "models": "reward"}}},
         r"evaluate: implicit.s.models must be a non-empty list of model names, got 'reward'"),
    ],
)
def test_evaluate_values_are_checked_at_load(tmp_path, changes, message):
    path = _eval_pipeline(tmp_path, **changes)
    if message is None:  # the llm judge's backend is only needed when it runs
        assert load_pipeline_config(path).evaluate["judges"] == ["reward_cost", "llm"]
        return
    with pytest.raises(PipelineConfigError, match=message):
        load_pipeline_config(path)


def test_evaluate_mapping_builds_the_settings_the_cli_builds(tmp_path):
    """One YAML mapping and the equivalent command line give equal settings."""
    from sacpo_lightning.cli_args import command_argv
    from sacpo_lightning.evaluation.cli import EVALUATE_OPTIONS, build_evaluate_parser, evaluation_settings
    from sacpo_lightning.evaluation.pipeline_stage import evaluation_settings as stage_settings

    safety = "../shared/data/eval/safety_problem.json"
    config = {"prompts_safety": safety, "prompts_helpful": "none", "cost_model": "models/cost",
              "judges": ["reward_cost"], "safety_judges": [{"kind": "classifier", "model": "cost_model"}, "refusal"],
              "safety_threshold": 0.7, "bootstrap_samples": 50, "elo_k": 16.0, "tie_eps": 0.01,
              "training_logs": {"reward": "logs/metrics.csv"},
              "generation": {"max_new_tokens": 8, "do_sample": True, "seed": 3}}
    from_yaml = stage_settings(config, {"sft": "sft-model"}, None)
    parser = build_evaluate_parser()
    argv = ["--models", "sft=sft-model", "--baseline", "sft", "--output", str(tmp_path), "--prompts_safety", safety,
            "--prompts_helpful", "none", "--cost_model", "models/cost", "--judges", "reward_cost",
            "--safety_judges", "classifier:models/cost", "--safety_judges", "refusal", "--safety_threshold", "0.7",
            "--bootstrap_samples", "50", "--elo_k", "16", "--tie_eps", "0.01", "--training_logs",
            "reward=logs/metrics.csv", "--max_new_tokens", "8", "--do_sample", "--seed", "3",
            "--implicit_reference", "sft-model"]
    from_cli = evaluation_settings(parser.parse_args(command_argv(argv, EVALUATE_OPTIONS)), parser)
    assert from_cli == from_yaml
    assert from_yaml.seed == 3 and from_yaml.prompts_helpful is None
    assert from_yaml.safety_judges == [{"kind": "classifier", "model": "models/cost"}, {"kind": "refusal"}]


def test_old_evaluate_flag_spellings_still_work_with_a_warning():
    from sacpo_lightning.evaluation.cli import renamed_flags

    with pytest.warns(FutureWarning, match="--judge is deprecated; use --judges"):
        argv = renamed_flags(["--judge", "none", "--suite=xstest", "--safety-judge", "refusal", "--judges_x", "1"])
    assert argv == ["--judges", "none", "--suites=xstest", "--safety_judges", "refusal", "--judges_x", "1"]
