"""The safety-budget pipeline on the tiny model: lambda* from b, step 2 at beta / lambda*, predicted vs measured."""

from __future__ import annotations

import json

import pytest
import yaml
from pipeline_run import ROOT
from pipeline_run import run_pipeline as _run_cli


@pytest.fixture(autouse=True)
def _in_project_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.slow
def test_safety_budget_picks_lambda_trains_it_and_reports_predicted_vs_measured(tmp_path):
    """``safety_budget``: samples step 1, solves for lambda*, trains step 2 with beta / lambda*, merges at q, and the
    evaluation shows the prediction next to the measurement; a harder b reruns only the stages downstream of it."""
    config = ROOT / "configs" / "pipelines" / "tiny_budget.yaml"
    output = tmp_path / "out"
    result = _run_cli(config, output)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((output / "manifest.json").read_text())
    budget = json.loads((output / "stages" / "budget" / "budget.json").read_text())
    assert (output / "stages" / "budget" / "lambda_curve.png").is_file()
    # the default csv logger writes each training stage's metrics.csv where the evaluation's training curves read it
    assert (output / "stages" / "evaluate" / "training_curves.png").stat().st_size > 0
    assert budget["status"] == "interior" and budget["lambda_star"] > 0
    assert budget["predicted"]["safety"] == pytest.approx(budget["inputs"]["b"], abs=1e-6)
    assert manifest["stages"]["budget"]["metrics"]["lambda_star"] == budget["lambda_star"]
    step = json.loads((output / "stages" / "safety_budget" / "export" / "sacpo_step.json").read_text())
    assert step["lam"] == pytest.approx(budget["lambda_star"]) and step["kl_coef"] == pytest.approx(
        0.1 / budget["lambda_star"])
    merge = manifest["stages"]["merge_budget_q0.5"]["metrics"]
    assert merge["q"] == 0.5 and merge["lam"] == pytest.approx(budget["lambda_star"])
    report = json.loads((output / "stages" / "evaluate" / "report.json").read_text())
    rows = report["predicted_vs_measured"]
    assert set(rows) == {"reward", "safety_budget", "merge_budget_q0.5"}
    assert rows["safety_budget"]["lambda"] == pytest.approx(budget["lambda_star"])
    assert rows["reward"]["predicted_safety"] == pytest.approx(budget["reference"]["safety"])
    # tiny_budget.yaml's evaluation decodes greedily: the rows are there, the comparison is not, and the report says why
    assert rows["safety_budget"]["comparable"] is False and "greedily" in rows["safety_budget"]["reason"]
    assert rows["safety_budget"]["agrees"] is None
    # the budget sampled the even rows of the prompt file, the evaluation measured on the odd ones
    assert "_even_4.json" in rows["safety_budget"]["prompts_predicted"]
    assert "_odd_4.json" in rows["safety_budget"]["prompts_measured"]
    assert report["safety"]["models"]["safety_budget"]["constraint"]["source"] == "mean_safety"
    # the lambda* model's card: b, lambda* with its bootstrap interval, beta / lambda*, then the measured safety
    card = (output / "stages" / "safety_budget" / "export" / "README.md").read_text()
    # budget.json writes an unbounded end of the interval (resamples without a root below lam_max) as null
    low, high = (f"{v:.6g}" if v is not None else "unbounded" for v in budget["lambda_star_interval"])
    assert f"| lambda | lambda* = {budget['lambda_star']:.6g} (picked by the safety budget) |" in card
    assert f"- b (target E[g]): {budget['inputs']['b']:.6g}" in card
    assert f"bootstrap interval of lambda*: [{low}, {high}]" in card
    assert f"- beta / lambda* (step 2's KL coefficient): {budget['step2_beta']:.6g}" in card
    measured = report["safety"]["models"]["safety_budget"]["constraint"]
    assert (f"| measured safety: mean P(safe) on the safety prompts ({measured['judge']}) | "
            f"{measured['safety']:.6g} | {measured['ci_low']:.6g} - {measured['ci_high']:.6g} |") in card
    pick = json.loads((output / "stages" / "evaluate" / "merge_pick.json").read_text())
    assert pick["b"] == budget["inputs"]["b"] and {c["model"] for c in pick["candidates"]} == {
        "safety_budget", "merge_budget_q0.5"}

    # b above everything the samples can reach: no step 2, stated in the manifest; step 1 and the scorers are reused
    raw = yaml.safe_load(config.read_text())
    raw["safety_budget"]["b"] = 0.99
    harder = tmp_path / "harder.yaml"
    harder.write_text(yaml.safe_dump(raw))
    result = _run_cli(harder, output)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "reward: unchanged, skipped" in result.stdout and "cost_model: unchanged, skipped" in result.stdout
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["stages"]["budget"]["metrics"]["status"] == "infeasible"
    assert manifest["stages"]["safety_budget"]["status"] == "skipped"
    assert "Infeasible" in manifest["stages"]["safety_budget"]["reason"]
