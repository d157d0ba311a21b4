"""Reward and cost score models: golden losses, a few training steps on the tiny model, export and scoring."""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from sacpo_lightning.callbacks import ExportHF
from transformers import AutoModelForSequenceClassification

from sacpo_lightning.data import PreferenceDataModule
from sacpo_lightning.evaluation.score_models import (
    SCORE_MODEL_FILE,
    CostModelModule,
    RewardModelModule,
    ScoreModel,
    bradley_terry_loss,
    cost_sign_loss,
)
from sacpo_lightning.models.policy import LoraSettings, PolicySettings
from sacpo_lightning.modules.base import OptimSettings

pytestmark = pytest.mark.usefixtures("one_thread")


PAIRS = [
    (f"Q{i}: help with topic {i}?", "Sure! Here is a careful, helpful answer.", "No.")
    for i in range(10)
]


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    return str(path)


def _datamodule(pair_file, tokenizer_dir) -> PreferenceDataModule:
    dm = PreferenceDataModule(train_files=[pair_file], source="generic", tokenizer=tokenizer_dir, template="chat",
                              max_length=128, max_prompt_length=64, batch_size=4, val_fraction=0.3, seed=0)
    dm.setup("fit")
    return dm


def test_golden_losses():
    """BT: margins (0, 2) give log(1 + e^-m) = (0.6931, 0.1269). Sign term: c = 1 unsafe and c = 1 safe give
    log(1 + e^-1) = 0.3133 and log(1 + e^1) = 1.3133."""
    bt = bradley_terry_loss(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]))
    assert torch.allclose(bt, torch.tensor([math.log(2), math.log1p(math.exp(-2))]), atol=1e-6)
    sign = cost_sign_loss(torch.tensor([1.0, 1.0]), torch.tensor([True, False]))
    assert torch.allclose(sign, torch.tensor([math.log1p(math.exp(-1)), math.log1p(math.exp(1))]), atol=1e-6)


def test_cost_loss_uses_chosen_safe_labels():
    module = CostModelModule(classification_weight=1.0)
    module.pair_scores = lambda batch: (torch.tensor([-1.0]), torch.tensor([1.0]))  # safe -1, unsafe +1
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "index": torch.tensor([0])}
    loss, metrics = module.compute_loss(batch)
    expected = math.log1p(math.exp(-2)) + 2 * math.log1p(math.exp(-1))
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert metrics["accuracy"].item() == 1.0 and metrics["sign_accuracy"].item() == 1.0
    module.assume_chosen_safe = False
    loss, metrics = module.compute_loss(batch)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2)), abs=1e-5) and "sign_accuracy" not in metrics


@pytest.mark.parametrize(
    ("cls", "finetune"),
    [(RewardModelModule, "lora"), (CostModelModule, "full")],
)
def test_training_reduces_loss_and_exports(cls, finetune, pair_file, tiny_model_dir, tmp_path):
    L.seed_everything(0)
    dm = _datamodule(pair_file, tiny_model_dir)
    policy = PolicySettings(name_or_path=tiny_model_dir, finetune=finetune, lora=LoraSettings(r=4, alpha=8))
    module = cls(policy=policy, optim=OptimSettings(lr=5e-3, warmup_ratio=0.0, scheduler="constant"))
    module.configure_model()
    before = module.evaluate_pairs(dm.train_dataloader())["loss"]
    export_dir = tmp_path / "export"
    trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=CSVLogger(tmp_path, name="logs"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, log_every_n_steps=1, callbacks=[ExportHF(dirpath=str(export_dir))])
    trainer.fit(module, datamodule=dm)
    after = module.evaluate_pairs(dm.train_dataloader())["loss"]
    assert after < before

    with open(next(tmp_path.glob("logs/*/metrics.csv"))) as f:
        columns = set(next(csv.reader(f)))
    assert {"train/loss", "val/accuracy", "val/loss"} <= columns

    meta = json.loads((export_dir / SCORE_MODEL_FILE).read_text())
    assert meta["kind"] == cls.kind and meta["template"] == "chat" and 0.0 <= meta["heldout_accuracy"] <= 1.0
    assert list(export_dir.glob("*.safetensors"))
    loaded = AutoModelForSequenceClassification.from_pretrained(export_dir)
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id is not None

    # The exported folder scores a pair exactly as the trained module does.
    batch = next(iter(dm.val_dataloader()))
    module.model.eval()
    with torch.no_grad():
        expected = module.scores(batch["input_ids"], batch["attention_mask"])[:1]
    scorer = ScoreModel.from_pretrained(export_dir, device="cpu")
    val_pair = dm.val_dataset.examples[0]
    assert val_pair["index"] == int(batch["index"][0])
    record_prompt = [r for r in PAIRS if r[0] in dm.get_tokenizer().decode(val_pair["prompt_ids"])][0]
    got = scorer.score([record_prompt[0]], [record_prompt[1]])
    assert got[0] == pytest.approx(float(expected[0]), abs=1e-4)


def test_score_model_batches_match_single(tiny_model_dir):
    from sacpo_lightning.evaluation.score_models import load_sequence_classifier
    from sacpo_lightning.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    model = load_sequence_classifier(tiny_model_dir, num_labels=1, pad_token_id=tokenizer.pad_token_id).eval()
    prompts = ["Hi", "How are you doing today?", "Tell me something"]
    responses = ["Fine.", "A much longer response than the others.", "ok"]
    batched = ScoreModel(model, tokenizer, batch_size=3).score(prompts, responses)
    single = ScoreModel(model, tokenizer, batch_size=1).score(prompts, responses)
    assert batched == pytest.approx(single, abs=1e-5)
    assert ScoreModel(model, tokenizer, template="pku").score(prompts[:1], responses[:1])[0] != pytest.approx(
        single[0], abs=1e-7
    )
