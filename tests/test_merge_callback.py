"""MergeOnFitEnd on a tiny step-2 (SafetyDPO, LoRA) fit: merges of the reference and the exported policy."""

from __future__ import annotations

import json
import os

import lightning as L
import pytest
import torch
from sacpo_lightning.callbacks import ExportHF, MergeOnFitEnd
from torch.utils.data import DataLoader

from sacpo_lightning.merge_report import REPORT_FILE
from sacpo_lightning.merging import linear_merge_state_dicts
from sacpo_lightning.models import load_tokenizer
from sacpo_lightning.models.policy import LoraSettings, PolicySettings, load_causal_lm
from sacpo_lightning.models.tiny import save_tiny_model
from sacpo_lightning.modules import OptimSettings, SafetyDPO


@pytest.fixture(scope="module")
def step1_dir(tmp_path_factory) -> str:
    """A stand-in for a step-1 export: the tiny model with the tokenizer as exports save it (pad token set)."""
    path = save_tiny_model(tmp_path_factory.mktemp("step1") / "export", seed=0)
    load_tokenizer(str(path)).save_pretrained(path)
    return str(path)


def pair_batch(batch_size: int = 2, prompt_len: int = 4, response_len: int = 3, seed: int = 0) -> dict:
    """(2B, L) batch: rows 0..B-1 chosen, B..2B-1 rejected with the same prompt; prompt (and padding) masked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 500, (2 * batch_size, prompt_len + response_len), generator=g)
    ids[batch_size:, :prompt_len] = ids[:batch_size, :prompt_len]
    mask = torch.ones_like(ids)
    mask[-1, -1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt_len] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.arange(batch_size)}


def fit(step1_dir: str, root, callbacks) -> tuple[SafetyDPO, L.Trainer]:
    policy = PolicySettings(name_or_path=step1_dir, lora=LoraSettings(r=4, alpha=8))
    module = SafetyDPO(policy=policy, optim=OptimSettings(lr=1e-2, warmup_ratio=0.0), beta=0.1, lam=2.0,
                       expected_reference="any")  # the stand-in step 1 is a plain model folder
    loader = DataLoader([pair_batch(seed=0), pair_batch(seed=1)], batch_size=None)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                        callbacks=callbacks)
    trainer.fit(module, train_dataloaders=loader)
    return module, trainer


def _state(path) -> dict[str, torch.Tensor]:
    return load_causal_lm(str(path)).state_dict()  # full weights, or an adapter export merged on load


def _assert_linear_merge(merged_dir, base_dir, other_dir, q: float) -> None:
    expected = linear_merge_state_dicts(_state(base_dir), _state(other_dir), q)
    merged = _state(merged_dir)
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(merged[key], value), key


@pytest.mark.parametrize("merge_first", [False, True], ids=["export-then-merge", "merge-then-export"])
def test_merges_reference_and_own_export_beside_export_callback(merge_first, step1_dir, tmp_path):
    """MergeOnFitEnd exports the policy itself (to ``<dirpath>/policy``), whatever ExportHF does, in either order."""
    export = ExportHF(dirpath=str(tmp_path / "export"), merged=True)
    merge = MergeOnFitEnd(weights=[0.5], dirpath=str(tmp_path / "merges"))
    fit(step1_dir, tmp_path, [merge, export] if merge_first else [export, merge])

    merged_dir = tmp_path / "merges" / "merge_q0.50"
    policy_dir = tmp_path / "merges" / "policy"
    assert (tmp_path / "export" / "model.safetensors").is_file()
    base, trained = _state(step1_dir), _state(tmp_path / "export")
    assert not all(torch.equal(base[k], trained[k]) for k in base)  # the step did train the policy
    own = _state(policy_dir)
    assert all(torch.equal(own[k], trained[k]) for k in trained)  # the same policy as ExportHF's
    _assert_linear_merge(merged_dir, step1_dir, policy_dir, 0.5)

    report = json.loads((tmp_path / "merges" / REPORT_FILE).read_text())
    assert report["base"] == os.path.realpath(step1_dir) and report["other"] == os.path.realpath(policy_dir)
    assert report["lam"] == 2.0 and report["global_step"] == 2
    (entry,) = report["merges"]
    assert entry["q"] == 0.5 and entry["lam_effective"] == 1.0 and entry["path"] == str(merged_dir)
    assert entry["kl_mixture_vs_merge"] is None
    assert merge.state_dict() == {"merges": report["merges"]}


def test_without_export_callback_exports_itself_and_measures_kl(step1_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "How do I pick a lock?"}\n{"prompt": "Hello"}\n{"prompt": "unused"}\n')
    merge = MergeOnFitEnd(weights=[0.0, 0.5], kl_prompts=str(prompts), kl_max_prompts=2)
    fit(step1_dir, tmp_path, [merge])  # dirpath defaults to <default_root_dir>/merges

    root = tmp_path / "merges"
    _assert_linear_merge(root / "merge_q0.50", step1_dir, root / "policy", 0.5)
    entries = json.loads((root / REPORT_FILE).read_text())["merges"]
    assert [e["lam_effective"] for e in entries] == [0.0, 1.0]
    assert entries[0]["kl_mixture_vs_merge"] == pytest.approx(0.0, abs=1e-6)
    assert entries[1]["kl_mixture_vs_merge"] >= 0.0 and entries[1]["num_tokens"] > 10

    restored = MergeOnFitEnd()
    restored.load_state_dict(merge.state_dict())
    assert restored.merges == entries


def test_failed_fit_writes_no_merges(step1_dir, tmp_path):
    class Boom(L.Callback):
        def on_train_batch_end(self, *args, **kwargs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fit(step1_dir, tmp_path, [MergeOnFitEnd(), Boom()])
    assert not (tmp_path / "merges").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [0.5, 1.5]}, r"MergeOnFitEnd weights \(--merge.weights\) must each be in \[0, 1\], got 1.5"),
        ({"weights": []}, "must list at least one weight"),
        ({"weights": [0.25, 0.251]}, "both give the folder merge_q0.25"),
        ({"kl_max_prompts": 0}, r"--merge.kl_max_prompts\) must be >= 1"),
    ],
)
def test_invalid_settings_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MergeOnFitEnd(**kwargs)


def test_missing_prompt_file_fails_before_training(step1_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="Prompt file .* does not exist"):
        fit(step1_dir, tmp_path, [MergeOnFitEnd(kl_prompts=str(tmp_path / "missing.json"))])
    assert not (tmp_path / "merges").exists()
