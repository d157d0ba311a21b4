"""Exact resume: ``sacpo fit`` killed with SIGKILL at several points and rerun with ``--ckpt_path last`` ends with the
same loss curve and exported weights as an uninterrupted run; half-written checkpoints and exports are never used."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sacpo_lightning.io import is_complete_directory

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STEPS = 12  # the tiny config's 32 training pairs in batches of 4: 8 steps per epoch, so the run crosses an epoch


def fit(root: Path, *extra: str, crash: str | None = None, step: int = 0) -> subprocess.CompletedProcess:
    """Runs the tiny config (32-true, LoRA with dropout 0) for STEPS steps with a checkpoint every 2 steps."""
    args = [
        sys.executable, "-m", "sacpo_lightning", "fit", "--config", "configs/debug/tiny.yaml",
        f"--trainer.default_root_dir={root}", f"--trainer.max_steps={STEPS}", "--checkpoint.every_n_train_steps=2",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root}",
        "--trainer.logger.name=logs", "--trainer.logger.flush_logs_every_n_steps=1", *extra,
    ]
    if crash is not None:
        args.append(f'--trainer.callbacks=[{{"class_path": "probes.Crash", "init_args": {{"at": "{crash}", '
                    f'"step": {step}}}}}]')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def losses(root: Path) -> dict[int, float]:
    """``train/loss`` per step from every CSV log under ``root`` (a later run's value replaces an earlier one)."""
    out: dict[int, float] = {}
    for path in sorted((root / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    out[int(row["step"])] = float(row["train/loss"])
    return out


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def killed(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == -9


@pytest.mark.slow
def test_resume_after_sigkill_mid_step_mid_checkpoint_and_mid_export_is_exact(tmp_path):
    """One uninterrupted run, and one run killed three times and resumed with ``--ckpt_path last`` each time:

    1. mid-step at global step 5 (after the backward pass, before the optimizer step): the last checkpoint is the
       step-4 one, in the middle of epoch 0, so the resumed run must skip exactly the 4 batches already trained on;
    2. half-way through writing the step-10 checkpoint: the last complete checkpoint is the step-8 one, at the end of
       epoch 0, and the half-written file must not be taken for it;
    3. during the export at the end: no export folder appears, and the rerun loads the final checkpoint and exports.

    The loss of every step and the exported weights equal the uninterrupted run's.
    """
    reference = tmp_path / "reference"
    result = fit(reference)
    assert result.returncode == 0, result.stderr[-3000:]
    expected_losses = losses(reference)
    assert sorted(expected_losses) == list(range(STEPS))

    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"

    result = fit(run, crash="step", step=5)
    assert killed(result), result.stderr[-3000:]
    assert checkpoint_step(last) == 4
    assert not (run / "export").exists()

    result = fit(run, "--ckpt_path=last", crash="checkpoint", step=10)
    assert killed(result), result.stderr[-3000:]
    assert checkpoint_step(last) == 8  # the complete step-8 checkpoint, not the half-written step-10 one
    leftovers = [p for p in last.parent.iterdir() if p.name != "last.ckpt"]
    assert leftovers, "the crash should have left a half-written file under a temporary name"

    result = fit(run, "--ckpt_path=last", crash="export")
    assert killed(result), result.stderr[-3000:]
    assert checkpoint_step(last) == STEPS
    assert not (run / "export").exists()

    result = fit(run, "--ckpt_path=last")
    assert result.returncode == 0, result.stderr[-3000:]
    assert is_complete_directory(run / "export")
    assert not [p for p in last.parent.iterdir() if p.name != "last.ckpt"]  # leftovers removed at the restart

    got = losses(run)
    assert sorted(got) == list(range(STEPS))
    for step, value in expected_losses.items():
        assert got[step] == pytest.approx(value, abs=1e-6), f"step {step}"
    adapter = Path("export") / "adapter" / "adapter_model.safetensors"  # the trained weights of a LoRA run
    want, have = load_file(reference / adapter), load_file(run / adapter)
    assert want.keys() == have.keys()
    assert max(float((want[k] - have[k]).abs().max()) for k in want) <= 1e-6


# ------------------------------------------------------------------------------------- the loader on its own
def _loader(n: int = 10, batch_size: int = 3, world: int = 1, rank: int = 0):
    from sacpo_lightning.data.datamodule import ResumableDataLoader, SeededRandomSampler, ShardedSampler

    sampler = SeededRandomSampler(range(n), seed=5)
    if world > 1:
        sampler = ShardedSampler(sampler, num_replicas=world, rank=rank)
    return ResumableDataLoader(list(range(n)), batch_size=batch_size, sampler=sampler, generator=torch.Generator())


@pytest.mark.parametrize(("world", "rank"), [(1, 0), (2, 1)])
def test_loader_state_resumes_after_the_last_consumed_batch(world, rank):
    full = _loader(world=world, rank=rank)
    full.sampler.set_epoch(2)
    batches = [b.tolist() for b in full]
    interrupted = _loader(world=world, rank=rank)
    interrupted.sampler.set_epoch(2)
    iterator = iter(interrupted)
    assert [next(iterator).tolist() for _ in range(2)] == batches[:2]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batches": 2, "batch_size": 3, "num_replicas": world}
    resumed = _loader(world=world, rank=rank)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert len(resumed) == len(batches)  # Lightning counts the epoch's batches from the full length
    assert [b.tolist() for b in resumed] == batches[2:]
    assert [b.tolist() for b in resumed] == batches  # the state applies to one iteration only


def test_loader_state_of_another_epoch_or_batch_size():
    done = _loader()
    done.load_state_dict({"epoch": 0, "batches": 4, "batch_size": 3, "num_replicas": 1})
    done.sampler.set_epoch(1)  # the checkpoint closed epoch 0; epoch 1 starts from its beginning
    assert len([b for b in done]) == 4
    resized = _loader(n=12, batch_size=2)
    reference = [b.tolist() for b in _loader(n=12, batch_size=2)]
    resized.load_state_dict({"epoch": 0, "batches": 2, "batch_size": 3, "num_replicas": 1})
    with pytest.warns(UserWarning, match="near, not exactly"):
        assert [b.tolist() for b in resized] == reference[3:]  # 6 examples consumed = 3 batches of 2
