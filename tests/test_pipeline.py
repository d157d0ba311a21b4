"""The SACPO pipeline on the tiny model: stages, manifest, skip on rerun, resume after SIGKILL, config errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pipeline_run import ROOT, TINY_PIPELINE, write_pipeline
from pipeline_run import run_pipeline as _run_cli

from sacpo_lightning.io import is_complete_directory
from sacpo_lightning.pipeline.config import PipelineConfigError, build_stages, load_pipeline_config
from sacpo_lightning.pipeline.runner import PipelineRunner


@pytest.fixture(autouse=True)
def _in_project_root(monkeypatch):
    monkeypatch.chdir(ROOT)


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
