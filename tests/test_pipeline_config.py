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
