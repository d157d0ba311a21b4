"""PreferenceDataModule end to end with the tiny tokenizer: pairs, KTO, splits, options, samplers, Lightning loop."""

from __future__ import annotations

import json
import os
import pickle

import lightning as L
import pytest
import torch

from sacpo_lightning.data import (
    DataError,
    LengthGroupedSampler,
    PreferenceDataModule,
    SeededRandomSampler,
)


@pytest.fixture
def pku_train(shared_data) -> str:
    return os.path.join(shared_data, "pku_saferlhf", "safety_pairs.train.jsonl")


@pytest.fixture
def hh_helpful(shared_data) -> str:
    return os.path.join(shared_data, "hh_rlhf", "helpful.train.jsonl")


def _padding(loader) -> int:
    return sum(int(b["attention_mask"].numel() - b["attention_mask"].sum()) for b in loader)


def test_pairs_end_to_end(pku_fixtures, tiny_model_dir):
    dm = PreferenceDataModule([pku_fixtures], tokenizer=tiny_model_dir, template="pku", val_fraction=0.2,
                              max_length=128, max_prompt_length=64, batch_size=4)
    assert dm.hparams.template == "pku" and dm.hparams.batch_size == 4
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_train_examples + len(dm.val_dataset) == 36 and len(dm.val_dataset) > 0
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
    assert batch["input_ids"].shape[0] == 8 and batch["index"].shape == (4,)
    assert batch["input_ids"].shape[1] <= 128
    tok = dm.get_tokenizer()
    for row in range(8):  # every row: BOS first, exactly one scored EOS unless truncated to max_length
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, 0] == tok.bos_token_id
        assert n == 128 or batch["labels"][row, n - 1] == tok.eos_token_id
    val = next(iter(dm.val_dataloader()))
    assert val["index"].tolist() == list(range(len(val["index"])))  # not shuffled
    assert dm.skipped == {}


def test_kto_end_to_end_with_class_counts(pku_fixtures, tiny_model_dir):
    dm = PreferenceDataModule([pku_fixtures], kind="kto", tokenizer=tiny_model_dir, max_length=96,
                              max_prompt_length=48, batch_size=3, val_fraction=0.0)
    dm.setup("fit")
    n_desirable, n_undesirable = dm.class_counts()
    assert n_desirable + n_undesirable == dm.num_train_examples == 72 - dm.skipped.get("duplicate", 0)
    assert n_desirable > 0 and n_undesirable > 0
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "desirable", "index", "kl_input_ids",
                          "kl_attention_mask", "kl_labels"}
    assert batch["desirable"].dtype == torch.bool and batch["kl_input_ids"].shape[0] == 3
    assert batch["kl_input_ids"].shape[1] <= 96
    assert dm.val_dataloader() == []


def test_kto_from_hh_pairs_with_max_samples(hh_helpful, tiny_model_dir):
    dm = PreferenceDataModule([hh_helpful], source="hh", kind="kto", kto_from="pairs", tokenizer=tiny_model_dir,
                              template="raw", max_samples=40, max_val_samples=10, max_length=96, max_prompt_length=64)
    dm.setup("fit")
    assert dm.num_train_examples == 40 and len(dm.val_dataset) == 10
    assert sum(dm.class_counts()) == 40


def test_split_by_prompt_without_overlap(pku_fixtures, tiny_model_dir):
    kwargs = dict(tokenizer=tiny_model_dir, template="pku", val_fraction=0.3, max_length=400, max_prompt_length=300)
    dm = PreferenceDataModule([pku_fixtures], **kwargs)
    dm.setup("fit")
    train_prompts = {tuple(e["prompt_ids"]) for e in dm.train_dataset.examples}
    val_prompts = {tuple(e["prompt_ids"]) for e in dm.val_dataset.examples}
    assert val_prompts and not train_prompts & val_prompts
    assert dm.num_train_examples + len(dm.val_dataset) == 36
    again = PreferenceDataModule([pku_fixtures], **kwargs)
    again.setup("fit")
    assert again.val_dataset.examples == dm.val_dataset.examples


def test_helpful_objective_on_real_safety_file_fails_clearly(pku_train, tiny_model_dir):
    dm = PreferenceDataModule([pku_train], objective="helpful", tokenizer=tiny_model_dir)
    with pytest.raises(DataError, match=r"better_response_id' is null in all 2950 rows .*--data.objective safe"):
        dm.setup("fit")


def test_skipped_counts_exposed(tmp_path, pku_fixtures, tiny_model_dir):
    rows = [json.loads(line) for line in open(pku_fixtures, encoding="utf-8")][:6]
    rows[2]["safer_response_id"] = None
    path = tmp_path / "some_bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    dm = PreferenceDataModule([str(path)], tokenizer=tiny_model_dir, on_invalid="skip", val_fraction=0.0)
    with pytest.warns(UserWarning, match="Skipped 2 invalid rows"):
        dm.setup("fit")
    assert dm.skipped == {"null_label": 1, "invalid_json": 1} and dm.num_train_examples == 5


def test_explicit_val_files(pku_fixtures, hh_helpful, tmp_path, tiny_model_dir):
    val = tmp_path / "val.jsonl"
    with open(pku_fixtures, encoding="utf-8") as f:
        val.write_text("".join(f.readlines()[:4]))
    dm = PreferenceDataModule([pku_fixtures], val_files=[str(val)], tokenizer=tiny_model_dir, val_fraction=0.5)
    dm.setup("fit")
    assert dm.num_train_examples == 36 and len(dm.val_dataset) == 4


def test_missing_files_and_bad_options_name_the_option(tmp_path, pku_fixtures, tiny_model_dir):
    dm = PreferenceDataModule([str(tmp_path / "nope.jsonl")], tokenizer=tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="--data.train_files: data file .*nope.jsonl does not exist"):
        dm.prepare_data()
    dm = PreferenceDataModule([pku_fixtures], val_files=[str(tmp_path / "v.jsonl")], tokenizer=tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="--data.val_files"):
        dm.setup("fit")
    with pytest.raises(ValueError, match=r"--data.max_prompt_length \(512\) must be smaller than --data.max_length"):
        PreferenceDataModule([pku_fixtures], max_length=512, max_prompt_length=512)
    with pytest.raises(ValueError, match="--data.val_fraction"):
        PreferenceDataModule([pku_fixtures], val_fraction=1.0)
    with pytest.raises(ValueError, match="--data.kto_from pairs"):
        PreferenceDataModule([pku_fixtures], source="hh", kind="kto")
    with pytest.raises(ValueError, match="--data.tokenizer is not set"):
        PreferenceDataModule([pku_fixtures]).setup("fit")


def test_injected_tokenizer_and_class_counts_for_pairs(pku_fixtures, tiny_tokenizer):
    dm = PreferenceDataModule([pku_fixtures], val_fraction=0.0)
    dm.set_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    assert dm.num_train_examples == 36 and dm.pad_token_id == tiny_tokenizer.pad_token_id
    with pytest.raises(ValueError, match="--data.kind kto"):
        dm.class_counts()


def test_fingerprint_tracks_files_and_settings(pku_fixtures, tiny_tokenizer):
    dm = PreferenceDataModule([pku_fixtures])
    dm.set_tokenizer(tiny_tokenizer)
    fp = dm.fingerprint()
    assert list(fp["files"]) == [pku_fixtures] and len(fp["files"][pku_fixtures]) == 16
    other = PreferenceDataModule([pku_fixtures], max_length=256, max_prompt_length=128)
    other.set_tokenizer(tiny_tokenizer)
    assert other.fingerprint()["settings"] != fp["settings"] and other.fingerprint()["files"] == fp["files"]
    same = PreferenceDataModule([pku_fixtures], batch_size=16)
    same.set_tokenizer(tiny_tokenizer)
    assert same.fingerprint() == fp  # batching does not change the examples


def test_train_order_is_seeded_per_epoch_and_collate_is_picklable(pku_fixtures, tiny_tokenizer):
    def first_indices(seed, epoch):
        dm = PreferenceDataModule([pku_fixtures], val_fraction=0.0, seed=seed, num_workers=0)
        dm.set_tokenizer(tiny_tokenizer)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, SeededRandomSampler)
        loader.sampler.set_epoch(epoch)
        pickle.dumps(loader.collate_fn)  # needed by num_workers > 0
        return torch.cat([b["index"] for b in loader]).tolist()

    order = first_indices(1, 0)
    assert sorted(order) == list(range(36))
    assert order == first_indices(1, 0)
    assert order != first_indices(1, 1) and order != first_indices(2, 0)


def test_group_by_length_reduces_padding(hh_helpful, tiny_tokenizer):
    def padding(group):
        dm = PreferenceDataModule([hh_helpful], source="hh", template="raw", max_samples=200, val_fraction=0.0,
                                  max_length=256, max_prompt_length=128, batch_size=8, group_by_length=group)
        dm.set_tokenizer(tiny_tokenizer)
        dm.setup("fit")
        return _padding(dm.train_dataloader())

    grouped, plain = padding(True), padding(False)
    # what remains is mostly the chosen/rejected length difference inside each pair, which no ordering removes
    assert grouped < 0.75 * plain


def test_length_grouped_sampler_is_a_seeded_permutation_of_similar_length_chunks():
    lengths = [(i * 37) % 101 for i in range(300)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=0, num_replicas=2, group_batches=5)
    order = list(sampler)
    assert sorted(order) == list(range(300)) and order == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != order
    # each chunk of batch_size * num_replicas comes from one sorted mega-batch: lengths are non-increasing within it
    for start in range(0, 300, 8):
        chunk = [lengths[i] for i in order[start : start + 8]]
        assert chunk == sorted(chunk, reverse=True)


class _Counting(L.LightningModule):
    """Consumes batches with one trainable scalar, recording what it saw."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []
        self.val_batches = 0

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return self.w * batch["labels"].ne(-100).sum()

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("val_fraction", [0.2, 0.0])
def test_runs_in_a_lightning_loop(pku_fixtures, tiny_model_dir, val_fraction):
    dm = PreferenceDataModule([pku_fixtures], tokenizer=tiny_model_dir, val_fraction=val_fraction, batch_size=8,
                              max_length=64, max_prompt_length=48, group_by_length=val_fraction > 0)
    model = _Counting()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    per_epoch = -(-dm.num_train_examples // 8)
    assert len(model.seen) == 2 * per_epoch
    first, second = model.seen[:per_epoch], model.seen[per_epoch:]
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(dm.num_train_examples))
    assert first != second  # Lightning's set_epoch reshuffles
    assert (model.val_batches > 0) == (val_fraction > 0)


def test_ddp_sampler_replacement_keeps_shuffling_and_length_groups(pku_fixtures, tiny_tokenizer):
    """What Lightning does under DDP: a shuffling DistributedSampler for the plain loader, and a rank-sharding wrapper
    around the length-grouped sampler that hands every rank its batch from the same chunk."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.utilities.data import _is_dataloader_shuffled

    dm = PreferenceDataModule([pku_fixtures], val_fraction=0.0)
    dm.set_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    assert _is_dataloader_shuffled(dm.train_dataloader())

    lengths = [(i * 37) % 101 for i in range(64)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=0, num_replicas=2, group_batches=2)
    order = list(sampler)
    shards = [list(DistributedSamplerWrapper(sampler, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    for k in range(0, 32, 4):
        chunk = set(order[2 * k : 2 * k + 8])
        assert set(shards[0][k : k + 4]) | set(shards[1][k : k + 4]) == chunk
