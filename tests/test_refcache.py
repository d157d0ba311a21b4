"""Reference log-prob cache: same losses as the live reference, reused across fits, rebuilt when stale or damaged."""

from __future__ import annotations

import json
import os
import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from sacpo_lightning.callbacks import ReferenceCache

from sacpo_lightning.data import PreferenceDataModule
from sacpo_lightning.models.policy import LoraSettings, PolicySettings
from sacpo_lightning.modules import OptimSettings, RewardDPO, RewardKTO
from sacpo_lightning.refcache import (
    batch_reference_logps,
    load_reference_cache,
    model_fingerprint,
    save_reference_cache,
)


class Recorder(Callback):
    """Records each training loss, and counts reference forward passes before and after training starts."""

    def __init__(self, module) -> None:
        self.losses: list[float] = []
        self.calls = {"build": 0, "steps": 0}
        self.phase = "build"
        original = module.reference_logps

        def counted(*args):
            self.calls[self.phase] += 1
            return original(*args)

        module.reference_logps = counted

    def on_train_start(self, trainer, pl_module) -> None:
        self.phase = "steps"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(model_dir: str, data_file: str, root, *, kind: str = "pairs", cache: bool = True, dirpath=None) -> dict:
    L.seed_everything(0)
    dm = PreferenceDataModule([data_file], source="pku", kind=kind, tokenizer=model_dir, template="pku",
                              max_length=64, max_prompt_length=32, val_fraction=0.25, max_samples=6, batch_size=2)
    policy = PolicySettings(name_or_path=model_dir, lora=LoraSettings(r=4, alpha=8))
    module_cls = RewardKTO if kind == "kto" else RewardDPO
    module = module_cls(policy=policy, optim=OptimSettings(lr=1e-2, warmup_ratio=0.0))
    recorder = Recorder(module)
    callbacks = [recorder]
    if cache:
        callbacks.append(ReferenceCache(dirpath=dirpath, batch_size=3))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, val_check_interval=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(root), callbacks=callbacks)
    trainer.fit(module, datamodule=dm)
    return {"losses": recorder.losses, "val_loss": float(trainer.callback_metrics["val/loss"]),
            "calls": recorder.calls, "path": callbacks[-1].path if cache else None}


@pytest.mark.parametrize("kind", ["pairs", "kto"])
def test_cached_training_matches_live_reference(tiny_model_dir, pku_fixtures, tmp_path, kind):
    live = fit(tiny_model_dir, pku_fixtures, tmp_path / "live", kind=kind, cache=False)
    cached = fit(tiny_model_dir, pku_fixtures, tmp_path / "cached", kind=kind)
    assert live["calls"]["steps"] > 0
    assert cached["calls"] == {"build": cached["calls"]["build"], "steps": 0} and cached["calls"]["build"] > 0
    assert len(cached["losses"]) == 3
    torch.testing.assert_close(torch.tensor(cached["losses"]), torch.tensor(live["losses"]), atol=1e-6, rtol=0)
    assert cached["val_loss"] == pytest.approx(live["val_loss"], abs=1e-6)
    assert cached["path"].startswith(str(tmp_path / "cached" / "ref_cache"))


def test_cache_is_reused_and_rebuilt_when_stale_or_damaged(tiny_model_dir, pku_fixtures, tmp_path):
    cache_dir = str(tmp_path / "cache")
    first = fit(tiny_model_dir, pku_fixtures, tmp_path / "a", dirpath=cache_dir)
    assert first["calls"]["build"] > 0
    again = fit(tiny_model_dir, pku_fixtures, tmp_path / "b", dirpath=cache_dir)
    assert again["calls"] == {"build": 0, "steps": 0} and again["path"] == first["path"]
    assert again["losses"] == first["losses"]

    other_data = tmp_path / "data.jsonl"  # one row fewer: other data, another key
    other_data.write_text("".join(open(pku_fixtures).readlines()[:-1]))
    stale_data = fit(tiny_model_dir, str(other_data), tmp_path / "c", dirpath=cache_dir)
    assert stale_data["calls"]["build"] > 0 and stale_data["path"] != first["path"]

    other_model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, other_model)
    stale_model = fit(str(other_model), pku_fixtures, tmp_path / "d", dirpath=cache_dir)
    assert stale_model["calls"]["build"] > 0 and stale_model["path"] not in (first["path"], stale_data["path"])

    with open(first["path"], "r+b") as f:  # a damaged file at the expected place
        f.write(b"garbage!" * 4)
    damaged = fit(tiny_model_dir, pku_fixtures, tmp_path / "e", dirpath=cache_dir)
    assert damaged["calls"]["build"] > 0 and damaged["path"] == first["path"]
    assert damaged["losses"] == first["losses"]
    assert fit(tiny_model_dir, pku_fixtures, tmp_path / "f", dirpath=cache_dir)["calls"]["build"] == 0


def _columns(n: int, offset: float = 0.0) -> dict:
    return {"chosen": -torch.arange(n, dtype=torch.float32) - offset, "rejected": -torch.ones(n) - offset}


def test_load_refuses_stale_metadata_counts_and_values(tmp_path):
    path = tmp_path / "c.safetensors"
    meta = {"key": "k1", "data": {"files": {"a": "1"}}}
    save_reference_cache(path, {"train": _columns(4), "val": _columns(2)}, meta)
    assert not list(tmp_path.glob(".c.safetensors.tmp-*"))
    splits, reason = load_reference_cache(path, meta, {"train": 4, "val": 2}, "pairs")
    assert reason == "" and torch.equal(splits["train"]["chosen"], _columns(4)["chosen"])
    assert load_reference_cache(path, {**meta, "key": "k2"}, {"train": 4, "val": 2}, "pairs")[1].startswith("stale")
    assert "shape" in load_reference_cache(path, meta, {"train": 5, "val": 2}, "pairs")[1]
    assert "other tensors" in load_reference_cache(path, meta, {"train": 4}, "pairs")[1]
    assert "other tensors" in load_reference_cache(path, meta, {"train": 4, "val": 2}, "kto")[1]
    missing = tmp_path / "missing.safetensors"
    assert load_reference_cache(missing, meta, {"train": 4}, "pairs") == (None, "no cache file")
    bad = _columns(4)
    bad["rejected"][1] = float("nan")
    save_reference_cache(path, {"train": bad}, meta)
    assert "non-finite" in load_reference_cache(path, meta, {"train": 4}, "pairs")[1]
    path.write_bytes(b"\x00" * 10)
    assert load_reference_cache(path, meta, {"train": 4}, "pairs")[1].startswith("unreadable")
    json.dumps(meta)  # metadata stays JSON


def test_batch_layout_follows_the_batch_index():
    columns = _columns(5)
    pairs = batch_reference_logps({"index": torch.tensor([3, 0])}, columns, "pairs")
    assert pairs["ref_logps"].tolist() == [-3.0, -0.0, -1.0, -1.0]
    kto = batch_reference_logps({"index": torch.tensor([4, 1])}, {"completion": columns["chosen"],
                                                                   "kl": columns["rejected"] * 2}, "kto")
    assert kto["ref_logps"].tolist() == [-4.0, -1.0] and kto["ref_kl_logps"].tolist() == [-2.0, -2.0]


def test_model_fingerprint_tracks_files_and_quantization(tiny_model_dir, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    lora = model_fingerprint(PolicySettings(name_or_path=str(copy)))
    assert lora == model_fingerprint(PolicySettings(name_or_path=str(copy), finetune="full"))
    assert lora != model_fingerprint(PolicySettings(name_or_path=str(copy), finetune="qlora"))
    weights = next(p for p in copy.iterdir() if p.suffix == ".safetensors")
    os.utime(weights, ns=(1, 1))
    assert lora != model_fingerprint(PolicySettings(name_or_path=str(copy)))
