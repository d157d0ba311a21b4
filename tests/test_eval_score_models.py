"""Reward and cost score models: the cost loss, a few training steps on the tiny model, export and scoring."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from sacpo_lightning.callbacks import ExportHF
from transformers import AutoModelForSequenceClassification

from sacpo_lightning.data import PreferenceDataModule
from sacpo_lightning.evaluation.score_models import ScoreModel
from sacpo_lightning.models.classifier import SCORE_MODEL_FILE
from sacpo_lightning.models.policy import LoraSettings, PolicySettings
from sacpo_lightning.modules import CostModelModule, RewardModelModule
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
    assert meta["heldout"]["pairs"] == len(dm.val_dataset) and meta["heldout"]["accuracy"] == meta["heldout_accuracy"]
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


def test_lora_score_model_trains_adapter_and_head_and_checkpoints_only_them(tiny_model_dir):
    """Built through build_policy with peft's SEQ_CLS task: LoRA weights and the new score head train, the rest is
    frozen; checkpoints (the hooks shared with the alignment steps) keep only those and the RNG states."""
    policy = PolicySettings(name_or_path=tiny_model_dir, finetune="lora", lora=LoraSettings(r=4, alpha=8))
    module = RewardModelModule(policy=policy)
    module.configure_model()
    trainable = module.trainable_parameter_names()
    assert trainable and all(n.startswith("model.") for n in trainable)
    assert all("lora_" in n or ".score." in n for n in trainable)
    assert any(".score." in n for n in trainable)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == trainable and checkpoint["rng_states"]
    module.on_load_checkpoint(checkpoint)
    assert module.strict_loading is False


def test_score_model_batches_match_single(tiny_model_dir):
    from sacpo_lightning.models import load_tokenizer
    from sacpo_lightning.models.classifier import load_sequence_classifier

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


# ------------------------------------------------------------------------------------------------ strict loading
PROMPTS = ["Hi", "How do I bake bread?"]
RESPONSES = ["Hello! How can I help?", "Mix flour, water, salt and yeast, then bake."]


@pytest.fixture(scope="module")
def score_dir(tmp_path_factory, tiny_model_dir):
    """A one-output score model saved with save_pretrained, with a head that is not all zeros."""
    from sacpo_lightning.models import load_tokenizer
    from sacpo_lightning.models.classifier import load_sequence_classifier

    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(3)
    model = load_sequence_classifier(tiny_model_dir, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("score") / "original"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _variant(source, dest, edit_weights=None, edit_config=None):
    """A copy of the score model folder ``source`` with its weights and/or config.json edited."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, dest)
    if edit_weights is not None:
        weights = load_file(dest / "model.safetensors")
        edit_weights(weights)
        save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((dest / "config.json").read_text())
        edit_config(config)
        (dest / "config.json").write_text(json.dumps(config))
    return dest


def _scores(folder):
    return ScoreModel.from_pretrained(folder, device="cpu", template="raw").score(PROMPTS, RESPONSES)


def _as_safe_rlhf(config):
    """config.json as Safe-RLHF writes it for LlamaForScore: score_dim and bias, no num_labels or id2label."""
    config.update(architectures=["LlamaForScore"], score_dim=1, bias=True, score_type="cost")
    config.pop("id2label", None)
    config.pop("label2id", None)
    config.pop("num_labels", None)


@pytest.mark.parametrize("layout", ["renamed", "safe_rlhf_with_bias"])
def test_safe_rlhf_score_head_is_mapped_and_scores_as_the_original(score_dir, tmp_path, layout):
    original = _scores(score_dir)
    bias = 0.75 if layout == "safe_rlhf_with_bias" else None

    def rename(weights):
        weights["score_head.weight"] = weights.pop("score.weight")
        if bias is not None:
            weights["score_head.bias"] = torch.tensor([bias])
            weights.update({f"normalizer.{k}": torch.ones(1) for k in ("mean", "var", "count")})

    folder = _variant(score_dir, tmp_path / layout, rename, _as_safe_rlhf if bias is not None else None)
    mapped = _scores(folder)
    assert mapped == pytest.approx([s + (bias or 0.0) for s in original], abs=1e-5)
    if bias is not None:
        # The bias survives save_pretrained (as score.bias) and the next load.
        scorer = ScoreModel.from_pretrained(folder, device="cpu", template="raw")
        scorer.model.save_pretrained(tmp_path / "resaved")
        scorer.tokenizer.save_pretrained(tmp_path / "resaved")
        assert _scores(tmp_path / "resaved") == pytest.approx(mapped, abs=1e-5)


def test_checkpoint_without_its_head_is_refused_naming_the_weights(score_dir, tiny_model_dir, tmp_path):
    from sacpo_lightning.models.classifier import ScoreModelLoadError

    folder = _variant(score_dir, tmp_path / "headless", lambda w: w.pop("score.weight"))
    with pytest.raises(ScoreModelLoadError, match=r"missing from the checkpoint .*: score\.weight") as err:
        ScoreModel.from_pretrained(folder, device="cpu")
    assert str(folder) in str(err.value) and "save_pretrained" in str(err.value)
    # A causal LM folder is no score model either: its LM head is unexpected and the score head missing.
    with pytest.raises(ScoreModelLoadError, match=r"lm_head\.weight.*causal LM, not a score model"):
        ScoreModel.from_pretrained(tiny_model_dir, device="cpu")


def test_unexpected_weights_are_refused_naming_them(score_dir, tmp_path):
    from sacpo_lightning.models.classifier import ScoreModelLoadError

    def add_value_head(weights):
        weights["value_head.weight"] = torch.zeros(1, 64)

    folder = _variant(score_dir, tmp_path / "extra", add_value_head)
    with pytest.raises(ScoreModelLoadError, match=r"not in the model \(they would be ignored\): value_head\.weight"):
        ScoreModel.from_pretrained(folder, device="cpu")


def test_training_backbone_must_load_even_when_the_head_is_new(tiny_model_dir, tmp_path):
    from sacpo_lightning.models.classifier import ScoreModelLoadError, load_sequence_classifier

    drop = "model.layers.1.mlp.up_proj.weight"
    folder = _variant(Path(tiny_model_dir), tmp_path / "broken_lm", lambda w: w.pop(drop))
    with pytest.raises(ScoreModelLoadError, match=r"missing from the checkpoint .*model\.layers\.1\.mlp\.up_proj"):
        load_sequence_classifier(str(folder), num_labels=1)
    # From an intact causal LM the new head is allowed (it is what gets trained).
    assert load_sequence_classifier(tiny_model_dir, num_labels=1).config.num_labels == 1


def test_multi_output_models_do_not_score_with_their_first_logit(score_dir, tiny_model_dir, tmp_path):
    from sacpo_lightning.models import load_tokenizer
    from sacpo_lightning.models.classifier import ScoreModelLoadError, load_sequence_classifier

    torch.manual_seed(0)
    model = load_sequence_classifier(tiny_model_dir, num_labels=2)
    model.save_pretrained(tmp_path / "two")
    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path / "two")
    scorer = ScoreModel.from_pretrained(tmp_path / "two", device="cpu")  # loads: ClassifierJudge reads labels
    with pytest.raises(ValueError, match="has one output, but this model has 2"):
        scorer.score(PROMPTS, RESPONSES)
    # Training a one-output score model from a two-output checkpoint: the shapes differ, said clearly.
    with pytest.raises(ScoreModelLoadError, match="other shapes"):
        load_sequence_classifier(str(tmp_path / "two"), num_labels=1)
