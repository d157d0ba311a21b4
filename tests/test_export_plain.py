"""``sacpo export``: plain Hugging Face folders other tools load without this library, plain-peft loading of adapter
exports, model cards, and the offline side of ``--push_to_hub``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sacpo_lightning.cli import main as sacpo_main
from sacpo_lightning.export_cli import PushError, push_folder
from sacpo_lightning.logprobs import model_sequence_logps
from sacpo_lightning.merging import merge_model_folders
from sacpo_lightning.models.card import CARD_FILE, build_model_card
from sacpo_lightning.models.chain import CHAIN_FILE, read_chain
from sacpo_lightning.models.policy import LoraSettings, PolicySettings, load_model_folder
from sacpo_lightning.modules import OptimSettings, RewardDPO, SafetyDPO
from tests.test_modules import make_pair_batch

pytestmark = pytest.mark.usefixtures("one_thread")

# Runs in a fresh interpreter without this project on the path: plain transformers only.
PLAIN_LOGPS = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM

folder, batch_file = sys.argv[1], sys.argv[2]
batch = json.loads(open(batch_file).read())
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
ids, mask, labels = (torch.tensor(batch[k]) for k in ("input_ids", "attention_mask", "labels"))
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
targets = labels[:, 1:]
scored = targets != -100
token_logps = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
assert not any(name.startswith("sacpo_lightning") for name in sys.modules)
print(json.dumps((token_logps * scored).sum(-1).tolist()))
"""


def _settings(path: str, finetune: str) -> PolicySettings:
    return PolicySettings(name_or_path=path, finetune=finetune, lora=LoraSettings(r=4, alpha=8),
                          qlora_compute_dtype="float32")


def _train(module, batch, steps: int) -> None:
    optimizer = torch.optim.AdamW([p for p in module.policy.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(steps):
        loss, _ = module.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def qlora_exports(tiny_model_dir, tmp_path_factory):
    """A QLoRA step-1 export (one adapter) and the step-2 export trained on it (a chain of two adapters)."""
    root = tmp_path_factory.mktemp("qlora_exports")
    step1 = RewardDPO(policy=_settings(tiny_model_dir, "qlora"), optim=OptimSettings(lr=2e-2), beta=0.1)
    step1.configure_model()
    _train(step1, make_pair_batch(seed=1), steps=3)
    step1.policy.eval()
    step1.export_pretrained(str(root / "step1"), extra={"final_metrics": {"train/loss": 0.5},
                                                        "data": {"files": {"pairs.jsonl": "0123abcd"},
                                                                 "settings": "feedbeef"}})
    step2 = SafetyDPO(policy=_settings(str(root / "step1"), "qlora"), optim=OptimSettings(lr=2e-2), beta=0.1, lam=2.0)
    step2.configure_model()
    _train(step2, make_pair_batch(seed=2), steps=3)
    step2.policy.eval()
    step2.export_pretrained(str(root / "step2"))
    return root / "step1", root / "step2"


def _library_logps(folder, batch) -> torch.Tensor:
    with torch.no_grad():
        return model_sequence_logps(load_model_folder(str(folder), "float32").eval(), batch["input_ids"],
                                    batch["attention_mask"], batch["labels"])


def _plain_logps(folder, batch, tmp_path) -> torch.Tensor:
    batch_file = tmp_path / "batch.json"
    batch_file.write_text(json.dumps({k: batch[k].tolist() for k in ("input_ids", "attention_mask", "labels")}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", PLAIN_LOGPS, str(folder), str(batch_file)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]), dtype=torch.float32)


def test_qlora_step2_export_loads_with_plain_transformers(qlora_exports, tmp_path):
    """The plain folder of a two-adapter QLoRA chain matches the library's loader within 1e-5; the step-1 model (one
    adapter fewer) does not, so the comparison sees a missing link."""
    step1, step2 = qlora_exports
    assert len(read_chain(step2).links) == 2 and not (step2 / "model.safetensors").exists()
    plain = tmp_path / "plain"
    assert sacpo_main(["export", str(step2), str(plain), "--dtype", "float32"]) == 0
    assert (plain / "model.safetensors").is_file() and (plain / "generation_config.json").is_file()
    assert not (plain / CHAIN_FILE).exists() and not (plain / "adapter").exists()
    assert (plain / "tokenizer_config.json").is_file()
    batch = make_pair_batch(seed=7)
    got = _plain_logps(plain, batch, tmp_path)
    expected = _library_logps(step2, batch)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - _library_logps(step1, batch)).abs().max().item() > 1e-3


def test_export_dtype_and_bad_source(qlora_exports, tmp_path, capsys):
    _, step2 = qlora_exports
    out = tmp_path / "bf16"
    assert sacpo_main(["export", str(step2), str(out), "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert sacpo_main(["export", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "is not a model folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_single_adapter_export_loads_with_plain_peft(qlora_exports, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    step1, _ = qlora_exports
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(step1 / "adapter")).eval()
    batch = make_pair_batch(seed=8)
    with torch.no_grad():
        got = model_sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        plain_base = model_sequence_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                          batch["input_ids"], batch["attention_mask"], batch["labels"])
    expected = _library_logps(step1, batch)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (plain_base - expected).abs().max().item() > 1e-3  # the adapter is really applied


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---", 2)[1])


def test_export_and_merge_cards(qlora_exports, tiny_model_dir, tmp_path):
    step1, step2 = qlora_exports
    card1 = (step1 / CARD_FILE).read_text()
    meta = _front_matter(card1)
    assert meta["base_model"] == tiny_model_dir and meta["library_name"] == "transformers"
    assert meta["license"] == "other" and "sacpo" in meta["tags"]
    assert "| step | reward_dpo |" in card1 and "| beta | 0.1 |" in card1
    assert "| `pairs.jsonl` | 0123abcd |" in card1 and "| data settings fingerprint | feedbeef |" in card1
    assert "| train/loss | 0.5 |" in card1
    card2 = (step2 / CARD_FILE).read_text()
    assert "| step | safety_dpo |" in card2 and "| lambda | 2 |" in card2
    assert "| KL coefficient (beta / lambda) | 0.05 |" in card2 and "sacpo export FOLDER OUT" in card2
    assert f"| reference | {step1} |" in card2

    (merged,) = merge_model_folders(step1, step2, [0.25], output_root=tmp_path / "merges")
    card = (merged / CARD_FILE).read_text()
    assert "merge" in _front_matter(card)["tags"] and "q = 0.25" in card

    budget = {"lambda_star": 1.75, "status": "interior", "message": "E[g] = b at lambda 1.75.",
              "predicted": {"safety": 0.6}, "solution": {"b": 0.6, "lam_max": 100.0}}
    text = build_model_card(step2, budget=budget, evaluation={"safety": {"value": 0.91, "interval": [0.85, 0.95]},
                                                              "helpfulness": 0.42})
    assert "lambda* = 1.75 (picked by the safety budget)" in text and "b (target E[g]): 0.6" in text
    assert "| safety | 0.91 | 0.85 - 0.95 |" in text and "| helpfulness | 0.42 | |" in text

    plain = tmp_path / "plain"
    budget_file = tmp_path / "budget.json"
    budget_file.write_text(json.dumps(budget))
    assert sacpo_main(["export", str(step2), str(plain), "--budget", str(budget_file)]) == 0
    card = (plain / CARD_FILE).read_text()
    assert f"from `{step2}`" in card and "lambda* = 1.75" in card and "lora" not in _front_matter(card)["tags"]


class _RecordingApi:
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        self.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir()), kwargs))
        return "https://huggingface.co/user/model/commit/abc"


def test_push_to_hub_offline_checks(qlora_exports, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    _, step2 = qlora_exports
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE"):
        push_folder(step2, "user/model")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = tmp_path / "plain"
    assert sacpo_main(["export", str(step2), str(out), "--push_to_hub", "user/model"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert (out / "model.safetensors").is_file()  # the folder is written before the upload is tried

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    _RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _RecordingApi)
    assert push_folder(out, "user/model") == "https://huggingface.co/user/model/commit/abc"
    (create, upload) = _RecordingApi.calls
    assert create[:2] == ("create_repo", "user/model")
    assert upload[1] == "user/model" and upload[3]["ignore_patterns"] == [".complete"]
    assert {"config.json", "model.safetensors", CARD_FILE, "tokenizer_config.json"} <= set(upload[2])

    class _Offline(_RecordingApi):
        def create_repo(self, repo_id, **kwargs):
            raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "HfApi", _Offline)
    with pytest.raises(PushError, match="check the network"):
        push_folder(out, "user/model")


def test_chain_loads_with_plain_peft_as_the_readme_says(qlora_exports, tmp_path):
    """The README's recipe (merge each link of sacpo_chain.json in order, at its scale) on a merge whose links have
    scales other than 1; without the scales it would give a different model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    step1, step2 = qlora_exports
    (folder,) = merge_model_folders(step1, step2, [0.25], output_root=tmp_path / "merges")
    chain = json.loads((folder / CHAIN_FILE).read_text())
    assert sorted(link["scale"] for link in chain["links"]) == [0.25, 1.0]

    def recipe(use_scales: bool):
        model = AutoModelForCausalLM.from_pretrained(chain["base_model"], dtype=torch.float32)
        for link in chain["links"]:
            model = PeftModel.from_pretrained(model, f"{folder}/{link['path']}")
            for module in model.modules():
                if use_scales and hasattr(module, "set_scale"):
                    module.set_scale("default", link["scale"])
            model = model.merge_and_unload()
        return model.eval()

    batch = make_pair_batch(seed=9)
    expected = _library_logps(folder, batch)
    with torch.no_grad():
        got, unscaled = (model_sequence_logps(recipe(flag), batch["input_ids"], batch["attention_mask"],
                                              batch["labels"]) for flag in (True, False))
    assert (got - expected).abs().max().item() <= 1e-5
    assert (unscaled - expected).abs().max().item() > 1e-4
