"""The SACPO pipeline on the tiny model: stages, manifest, skip on rerun, resume after SIGKILL, config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sacpo_lightning.io import is_complete_directory
from sacpo_lightning.pipeline.config import PipelineConfigError, build_stages, load_pipeline_config
from sacpo_lightning.pipeline.runner import PipelineRunner

ROOT = Path(__file__).resolve().parents[1]
TINY_PIPELINE = ROOT / "configs" / "pipelines" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _in_project_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def write_pipeline(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(TINY_PIPELINE.read_text())
    raw.update(changes)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_stage_graph_of_full_config(tmp_path):
    cfg = load_pipeline_config(write_pipeline(
        tmp_path, orders=["reward_first", "safety_first"], baselines=["safety_only"],
        merge={"weights": [0.25, 0.5], "naive": True},
    ))
    stages = {s.name: s for s in build_stages(cfg)}
    assert list(stages)[:3] == ["reward", "safety_lam1", "safety_lam4"]
    safety = stages["safety_lam4"].config["model"]
    assert safety["class_path"].endswith("SafetyDPO")
    assert safety["init_args"]["lam"] == 4.0 and safety["init_args"]["beta"] == 0.1
    assert safety["init_args"]["policy"]["name_or_path"] == "stage:reward"
    # The swapped order starts from the safety-only model and runs helpfulness with beta.
    swapped = stages["swapped_lam4"]
    assert swapped.depends_on == ["safety_only_lam4"]
    assert swapped.config["model"]["class_path"].endswith("RewardDPO")
    assert stages["safety_only_lam4"].config["model"]["init_args"]["policy"]["name_or_path"] == "tiny-random-llama"
    assert stages["merge_lam4_q0.25"].config["lam_effective"] == 1.0
    assert set(stages["naive_merge_lam1_q0.5"].depends_on) == {"reward", "safety_only_lam1"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"beta": -1}, "beta: must be a number > 0"),
        ({"lambdas": [1.0, 0.0]}, "lambdas: every lambda must be > 0"),
        ({"merge": {"weights": [1.5]}}, r"merge.weights: q must be in \[0, 1\]"),
        ({"orders": ["sideways"]}, "orders: unknown order"),
        ({"safety_step": {"configs": ["configs/missing.yaml"]}}, "safety_step.configs: file"),
        ({"lambda": [1.0]}, "lambda: unknown key"),
    ],
)
def test_bad_pipeline_config_names_file_and_key(tmp_path, changes, message):
    path = write_pipeline(tmp_path, **changes)
    with pytest.raises(PipelineConfigError, match=message) as info:
        load_pipeline_config(path)
    assert str(path) in str(info.value)


def _run_cli(config: Path, output: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sacpo_lightning", "pipeline", "--config", str(config), "--output", str(output)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


@pytest.mark.slow
def test_pipeline_runs_skips_and_resumes_after_sigkill(tmp_path):
    output = tmp_path / "out"
    result = _run_cli(TINY_PIPELINE, output)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((output / "manifest.json").read_text())
    names = ["reward", "safety_lam1", "safety_lam4", "merge_lam4_q0.5"]
    assert manifest["order"] == names
    for name in names:
        entry = manifest["stages"][name]
        assert entry["status"] == "done", entry
        assert is_complete_directory(entry["export_dir"])
    assert manifest["stages"]["safety_lam4"]["reference"] == manifest["stages"]["reward"]["export_dir"]
    step = json.loads((Path(manifest["stages"]["safety_lam4"]["export_dir"]) / "sacpo_step.json").read_text())
    assert step["kl_coef"] == pytest.approx(0.025) and step["lam"] == 4.0
    merge = manifest["stages"]["merge_lam4_q0.5"]["metrics"]
    assert merge["lam_effective"] == 2.0 and merge["kl_mixture_vs_merge"] > -1e-6
    from sacpo_lightning.models.policy import load_causal_lm

    load_causal_lm(manifest["stages"]["merge_lam4_q0.5"]["export_dir"])  # an adapter merge: scaled adapters

    # Rerunning the same command is a no-op.
    start = time.monotonic()
    again = _run_cli(TINY_PIPELINE, output)
    assert again.returncode == 0
    assert again.stdout.count("unchanged, skipped") == len(names)
    assert time.monotonic() - start < 60

    # Changing a safety setting reruns that stage and the merge downstream of it, not step 1.
    changed = write_pipeline(tmp_path, safety_step={"algorithm": "dpo", "configs": ["configs/debug/tiny.yaml"],
                                                    "overrides": {"trainer": {"max_steps": 5}}})
    rerun = _run_cli(changed, output)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    skipped = [line for line in rerun.stdout.splitlines() if "unchanged, skipped" in line]
    assert len(skipped) == 1 and "reward" in skipped[0]


@pytest.mark.slow
def test_sigkill_during_step2_then_rerun_finishes_without_redoing_step1(tmp_path):
    # A slow step 2 (many steps, checkpoint every 2) so the kill lands mid-training.
    config = write_pipeline(tmp_path, lambdas=[2.0], merge={"weights": [0.5]}, safety_step={
        "algorithm": "dpo", "configs": ["configs/debug/tiny.yaml"],
        "overrides": {"trainer": {"max_steps": 400, "limit_val_batches": 0}, "checkpoint": {"every_n_train_steps": 2},
                      "data": {"batch_size": 1}},
    })
    output = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sacpo_lightning", "pipeline", "--config", str(config), "--output", str(output)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    last = output / "stages" / "safety_lam2" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), "step 2 never wrote a checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["stages"]["reward"]["status"] == "done"
    assert manifest["stages"]["safety_lam2"]["status"] == "pending"
    reward_export = Path(manifest["stages"]["reward"]["export_dir"])
    reward_mtime = (reward_export / "adapter" / "adapter_model.safetensors").stat().st_mtime

    result = _run_cli(config, output)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "[1/3] reward: unchanged, skipped" in result.stdout
    assert "resuming safety_lam2" in result.stdout
    manifest = json.loads((output / "manifest.json").read_text())
    assert all(entry["status"] == "done" for entry in manifest["stages"].values())
    assert (reward_export / "adapter" / "adapter_model.safetensors").stat().st_mtime == reward_mtime


def test_failed_stage_stops_pipeline_and_keeps_earlier_stages(tmp_path, monkeypatch):
    cfg = load_pipeline_config(write_pipeline(tmp_path))
    runner = PipelineRunner(cfg, tmp_path / "out", log=lambda _: None)
    calls = []

    def fake_train(stage, inputs, digest):
        calls.append(stage.name)
        if stage.name == "safety_lam1":
            raise RuntimeError("boom")
        out = runner.export_dir(stage.name)
        out.mkdir(parents=True)
        (out / ".complete").write_text("ok")
        return {"train/loss": 0.5}

    monkeypatch.setattr(runner, "_run_train", fake_train)
    assert runner.run() == 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["stages"]["reward"]["status"] == "done"
    assert manifest["stages"]["safety_lam1"]["status"] == "failed"
    assert "boom" in manifest["stages"]["safety_lam1"]["error"]
    assert "safety_lam4" not in manifest["stages"]
    assert calls == ["reward", "safety_lam1"]


@pytest.mark.slow
def test_pipeline_with_evaluation_stage_writes_report(tiny_eval_pipeline):
    """tiny_eval.yaml (run once for the session, with export_plain: true and a logger, which
    tests/test_pipeline_logging.py checks): every stage done, and the evaluation's report, figures and XSTest."""
    tiny_eval_pipeline.check_first()
    output = tiny_eval_pipeline.output
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["order"][-1] == "export_plain"
    assert [manifest["stages"][n]["status"] for n in manifest["order"][:-1]] == ["done"] * 6
    report = json.loads((output / "stages" / "evaluate" / "report.json").read_text())
    assert set(report["models"]) == {"sft", "reward", "safety_lam4", "merge_lam4_q0.5"}
    for name in ("pareto.png", "report.md", "training_curves.png", "xstest.png", "xstest.csv"):
        assert (output / "stages" / "evaluate" / name).stat().st_size > 0
    assert all(m["repetition"]["n"] > 0 for m in report["models"].values())
    assert set(report["examples"]) == set(report["models"])
    md = (output / "stages" / "evaluate" / "report.md").read_text()
    assert "## Repetition" in md and "## Sample answers" in md
    xstest = report["xstest"]  # evaluate.suites: [xstest] with 1 prompt per type
    assert set(xstest["models"]) == set(report["models"]) and (xstest["n_safe"], xstest["n_unsafe"]) == (10, 8)


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
