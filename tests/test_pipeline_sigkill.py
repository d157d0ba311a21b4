"""The SACPO pipeline killed (SIGKILL) in the middle of step 2, then rerun: step 1 is kept, step 2 resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_run import ROOT, write_pipeline
from pipeline_run import run_pipeline as _run_cli


@pytest.fixture(autouse=True)
def _in_project_root(monkeypatch):
    monkeypatch.chdir(ROOT)


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
