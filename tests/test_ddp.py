"""Data-parallel training agrees with one process: DDP with 2 CPU processes (gloo) and batch size 2 per process
against 1 process with batch size 4, on DPO and KTO; plus the sampler's split of every epoch across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sacpo_lightning.data import LengthGroupedSampler, SeededRandomSampler
from sacpo_lightning.data.datamodule import ShardedSampler

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STEPS = 8  # one epoch of the tiny config's 32 training examples at a global batch of 4


# ---------------------------------------------------------------------------------------------- the split
def shards(order_sampler, world: int) -> list[list[int]]:
    return [list(ShardedSampler(order_sampler, num_replicas=world, rank=r)) for r in range(world)]


@pytest.mark.parametrize("n", [32, 29, 7, 1])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("grouped", [False, True])
def test_ranks_split_each_epoch_like_one_process_with_the_global_batch(n, world, grouped):
    """Step t of all ranks together trains on the examples one process with batch B * world trains on at step t;
    within an epoch no example is seen twice, except the world - n % world repeats that give every rank as many
    batches when n is not a multiple of world."""
    batch = 2

    def order(replicas: int, per_process: int):
        if grouped:
            lengths = [(i * 37) % 101 for i in range(n)]
            return LengthGroupedSampler(lengths, per_process, seed=3, num_replicas=replicas, group_batches=2)
        return SeededRandomSampler(range(n), seed=3)

    for epoch in (0, 1):
        single = order(1, batch * world)
        single.set_epoch(epoch)
        single_order = list(single)
        sampler = order(world, batch)
        parts = []
        for r in range(world):
            shard = ShardedSampler(sampler, num_replicas=world, rank=r)
            shard.set_epoch(epoch)
            parts.append(list(shard))
        assert len({len(p) for p in parts}) == 1 and len(parts[0]) == len(ShardedSampler(sampler, world, 0))
        everything = sum(parts, [])
        assert set(everything) == set(range(n))  # no gaps
        assert len(everything) - n == (-n) % world  # repeats only to even out the ranks
        for t in range(-(-len(parts[0]) // batch)):
            union = sorted(i for p in parts for i in p[t * batch : (t + 1) * batch])
            expected = sorted(single_order[t * batch * world : (t + 1) * batch * world])
            if (t + 1) * batch * world <= n:
                assert union == expected, (epoch, t)
            else:  # the last, padded step: the single process's remainder plus repeats
                assert set(expected) <= set(union)


# ------------------------------------------------------------------------------------------- real runs
def fit(root: Path, *extra: str, devices: int, batch_size: int) -> list[list[dict]]:
    """Runs ``sacpo fit`` on the tiny config and returns, per rank, the Recorder's rows (one per step)."""
    args = [
        sys.executable, "-m", "sacpo_lightning", "fit", "--config", "configs/debug/tiny.yaml", *extra,
        f"--trainer.default_root_dir={root}", f"--trainer.max_steps={STEPS}", "--trainer.accelerator=cpu",
        f"--trainer.devices={devices}", f"--data.batch_size={batch_size}", "--trainer.limit_val_batches=0",
        f'--trainer.callbacks=[{{"class_path": "probes.Recorder", "init_args": {{"path": "{root / "record"}"}}}}]',
    ]
    if devices > 1:
        args.append("--trainer.strategy=ddp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = []
    for rank in range(devices):
        with open(root / "record" / f"rank{rank}.jsonl") as f:
            rows.append([json.loads(line) for line in f])
        assert [r["step"] for r in rows[-1]] == list(range(STEPS))
    assert (root / "record" / "exports.txt").read_text() == "0\n"  # only rank 0 exports
    return rows


def compare(tmp_path: Path, *config: str, metric: str) -> tuple[list[dict], list[list[dict]], list[int]]:
    (single,) = fit(tmp_path / "single", *config, devices=1, batch_size=4)
    ddp = fit(tmp_path / "ddp", *config, devices=2, batch_size=2)
    seen = []
    for step, (one, r0, r1) in enumerate(zip(single, *ddp, strict=True)):
        # the two ranks together train on exactly the single process's batch, without overlap
        assert not set(r0["indices"]) & set(r1["indices"])
        assert sorted(r0["indices"] + r1["indices"]) == sorted(one["indices"]), step
        seen += r0["indices"] + r1["indices"]
        # each rank's loss is the mean over its half of the batch, so their mean is the single-process loss
        assert (r0["loss"] + r1["loss"]) / 2 == pytest.approx(one["loss"], abs=1e-5), step
        # gradients are averaged across ranks before the step: same norm on both ranks and in the single process
        assert r0["metrics"][metric] == pytest.approx(r1["metrics"][metric], abs=1e-6)
        assert r0["metrics"][metric] == pytest.approx(one["metrics"][metric], abs=1e-5), step
    assert len(set(seen)) == len(seen)  # no example twice within the epoch
    # the trained weights: the exported LoRA adapter
    want = load_file(tmp_path / "single" / "export" / "adapter" / "adapter_model.safetensors")
    have = load_file(tmp_path / "ddp" / "export" / "adapter" / "adapter_model.safetensors")
    assert max(float((want[k] - have[k]).abs().max()) for k in want) <= 1e-5
    return single, ddp, seen


@pytest.mark.slow
def test_ddp_dpo_matches_one_process_with_the_same_global_batch(tmp_path):
    *_, seen = compare(tmp_path, metric="train/grad_norm")
    assert sorted(seen) == list(range(32))  # a whole epoch: every training pair exactly once


@pytest.mark.slow
def test_ddp_kto_reduces_the_kl_estimate_across_ranks(tmp_path):
    """KTO's reference point z0 is estimated from the whole global batch: both ranks use the same value, equal to the
    single process's, which makes losses and weights agree too.

    z0 is a mean of differences of two sequence log-probs of about -400, whose float32 spacing is 3e-5; a row's
    padding differs between a batch of 2 and one of 4, which changes the rounding of each log-prob by about one step,
    so the single-process z0 is matched to 1e-4 (a few of those steps), not to the 1e-5 of losses and weights.
    """
    single, (r0, r1), _ = compare(tmp_path, "--config", "configs/debug/tiny_kto.yaml", metric="train/grad_norm")
    kls = [(one["metrics"]["train/kl"], a["metrics"]["train/kl"], b["metrics"]["train/kl"])
           for one, a, b in zip(single, r0, r1, strict=True)]
    assert any(kl > 0 for kl, _, _ in kls)  # the estimate moves off 0 once the policy has changed
    for one, a, b in kls:
        assert a == b  # all-gathered, not a per-rank estimate
        assert a == pytest.approx(one, abs=1e-4)
