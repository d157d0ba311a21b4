"""Bad numbers: NaNGuard stops or skips on a non-finite loss or gradient; the DPO loss at initialisation is ln 2 in
every precision mode available on CPU."""

from __future__ import annotations

import csv
import math
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from sacpo_lightning.callbacks import ExportHF, NaNGuard
from sacpo_lightning.callbacks.checkpoint import AtomicModelCheckpoint
from sacpo_lightning.callbacks.nan_guard import NonFiniteError

from sacpo_lightning.data import PreferenceDataModule
from sacpo_lightning.models.policy import LoraSettings, PolicySettings
from sacpo_lightning.modules import OptimSettings, RewardDPO


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are all NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poisoned(module: RewardDPO, calls: set[int], kind: str = "loss") -> RewardDPO:
    """Makes the module's ``compute_loss`` return a NaN loss (or a finite loss with NaN gradients) on the given calls
    (0-based; training calls only, as validation is off)."""
    original = module.compute_loss
    count = iter(range(10**6))

    def compute_loss(batch):
        loss, metrics = original(batch)
        if next(count) in calls:
            loss = loss * float("nan") if kind == "loss" else _NaNGradient.apply(loss)
        return loss, metrics

    module.compute_loss = compute_loss
    return module


def fit(tmp_path, tiny_model_dir, shared_data, module, *callbacks, precision="32-true", max_steps=4):
    data = PreferenceDataModule(
        [os.path.join(shared_data, "pku_saferlhf", "safety_pairs.fixtures.jsonl")], tokenizer=tiny_model_dir,
        val_fraction=0.0, max_length=64, max_prompt_length=48, batch_size=4,
    )
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, precision=precision, limit_val_batches=0,
        logger=CSVLogger(tmp_path, name="logs"), log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            *callbacks,
            AtomicModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1),
            ExportHF(dirpath=str(tmp_path / "export")),
        ],
    )
    trainer.fit(module, datamodule=data)
    return trainer


def tiny_module(tiny_model_dir) -> RewardDPO:
    policy = PolicySettings(name_or_path=tiny_model_dir, lora=LoraSettings(r=4, alpha=8))
    return RewardDPO(policy=policy, optim=OptimSettings(lr=1e-3, warmup_ratio=0.0))


def lora_weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def last_checkpoint(tmp_path) -> dict:
    return torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize(
    ("kind", "call", "words"), [("loss", 2, r"loss \(nan\) and gradients"), ("grad", 1, "gradients")]
)
def test_stop_names_step_and_batch_keeps_last_good_checkpoint_and_does_not_export(
    tmp_path, tiny_model_dir, shared_data, kind, call, words
):
    module = poisoned(tiny_module(tiny_model_dir), {call}, kind)
    with pytest.raises(NonFiniteError, match=rf"non-finite {words} at global step {call} \(epoch 0, batch {call}\)"):
        fit(tmp_path, tiny_model_dir, shared_data, module, NaNGuard())
    checkpoint = last_checkpoint(tmp_path)
    assert checkpoint["global_step"] == call  # written after the last good step, none after the bad one
    weights = lora_weights(module)
    for name, value in checkpoint["state_dict"].items():
        assert torch.equal(weights[name], value), name  # the optimizer step of the bad batch did not run
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (tmp_path / "export").exists()


def test_skip_drops_the_updates_counts_and_logs_them(tmp_path, tiny_model_dir, shared_data):
    module = poisoned(tiny_module(tiny_model_dir), {1, 3}, "grad")
    guard = NaNGuard(action="skip")
    with pytest.warns(UserWarning, match="update skipped"):
        trainer = fit(tmp_path, tiny_model_dir, shared_data, module, guard, max_steps=5)
    assert guard.skipped == 2
    optimizer = trainer.optimizers[0]
    # AdamW took 3 real steps: the skipped ones left its moment estimates (and the weights) untouched
    assert {int(state["step"]) for state in optimizer.state.values()} == {3}
    assert all(torch.isfinite(w).all() for w in lora_weights(module).values())
    checkpoint = last_checkpoint(tmp_path)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("NaNGuard")]
    assert state == {"skipped": 2}
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        skipped = [float(r["train/skipped_batches"]) for r in csv.DictReader(f) if r.get("train/skipped_batches")]
    assert skipped == [0, 1, 1, 2, 2]
    assert (tmp_path / "export" / "sacpo_step.json").is_file()


def test_skip_stops_after_max_skips(tmp_path, tiny_model_dir, shared_data):
    module = poisoned(tiny_module(tiny_model_dir), {0, 2})
    with pytest.warns(UserWarning, match="update skipped"):
        with pytest.raises(NonFiniteError, match=r"more than max_skips=1 .* at global step 2"):
            fit(tmp_path, tiny_model_dir, shared_data, module, NaNGuard(action="skip", max_skips=1))
    assert not (tmp_path / "export").exists()


def test_skipped_count_survives_a_resume():
    guard = NaNGuard(action="skip")
    guard.skipped = 3
    restored = NaNGuard(action="skip")
    restored.load_state_dict(guard.state_dict())
    assert restored.skipped == 3


@pytest.mark.parametrize(("kwargs", "words"), [({"action": "ignore"}, "action"), ({"max_skips": -1}, "max_skips")])
def test_guard_options_are_checked(kwargs, words):
    with pytest.raises(ValueError, match=words):
        NaNGuard(**kwargs)


class _FirstLoss(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.loss = outputs["loss"].detach().float().item()
            self.dtype = next(p for p in pl_module.parameters() if not p.requires_grad).dtype


@pytest.mark.parametrize(
    ("precision", "dtype", "tolerance"),
    [
        ("32-true", torch.float32, 1e-6),
        ("bf16-mixed", torch.float32, 1e-6),
        # the loss itself is a bfloat16 number: ln 2 rounds to 0.69140625 (8 significant bits)
        ("bf16-true", torch.bfloat16, 4e-3),
    ],
)
def test_dpo_loss_at_initialisation_is_ln2_in_every_cpu_precision(
    tmp_path, tiny_model_dir, shared_data, precision, dtype, tolerance
):
    """At step 0 the LoRA update is exactly zero (B = 0), so policy and reference log-probs are identical, every
    margin is 0 and the DPO loss is -log sigmoid(0) = ln 2, whatever the precision of the forward pass."""
    probe = _FirstLoss()
    fit(tmp_path, tiny_model_dir, shared_data, tiny_module(tiny_model_dir), probe, precision=precision, max_steps=1)
    assert probe.dtype == dtype
    assert probe.loss == pytest.approx(math.log(2), abs=tolerance)
