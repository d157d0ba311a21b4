"""Bad settings and bad input fail fast with a message naming the option (or file, line and field) and what is allowed.

Covered elsewhere, not repeated here: PKU rows of every malformed kind, empty, binary and non-UTF-8 files and
duplicates (test_data_sources.py), prompts longer than max_length (test_data_tokenize.py), LoRA target modules the
model lacks (test_modules.py), merging mismatched models (test_merge_cli.py).
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.demos.boring_classes import BoringModel
from sacpo_lightning.callbacks.checkpoint import AtomicModelCheckpoint

from sacpo_lightning.data import DataError, SourceSpec, load_records
from sacpo_lightning.errors import MissingDependencyError
from sacpo_lightning.models.policy import LoraSettings, PolicySettings, build_policy, check_model_source

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ settings
def cli_error(*args: str) -> str:
    from sacpo_lightning.cli import lightning_cli

    with pytest.raises(BaseException) as info:  # noqa: B017 - jsonargparse wraps the ValueError it catches
        lightning_cli(["--config", "configs/debug/tiny.yaml", *args], run=False)
    return str(info.value)


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.init_args.beta=0"], "--model.beta must be a finite number > 0, got 0"),
        (["--model.init_args.beta=-1"], "--model.beta must be a finite number > 0, got -1"),
        (["--model=sacpo_lightning.modules.SafetyDPO", "--model.init_args.lam=0"], "--model.lam must be a finite"),
        (["--model=sacpo_lightning.modules.SafetyDPO", "--model.init_args.lam=-2"], "--model.lam must be a finite"),
        (["--data.max_prompt_length=128"], "--data.max_prompt_length (128) must be smaller than --data.max_length"),
        (["--data.max_prompt_length=200"], "--data.max_prompt_length (200) must be smaller than --data.max_length"),
        # Helpfulness KTO from PKU's per-response safety flags would train on safety labels.
        (["--data.objective=helpful", "--data.kind=kto"], "--data.kto_from flags makes KTO examples from the per"),
        (["--data.objective=helpful", "--data.kind=kto", "--data.kto_from=flags"], "Set --data.kto_from pairs"),
    ],
)
def test_cli_rejects_out_of_range_settings_naming_the_option(in_root, args, message):
    assert message in cli_error(*args)


@pytest.mark.parametrize("q", [-0.1, 1.5, math.nan])
def test_merge_weight_outside_unit_interval_is_refused_everywhere(q, tmp_path, monkeypatch, capsys):
    from sacpo_lightning.callbacks import MergeOnFitEnd

    from sacpo_lightning.merging_cli import main as merge_main
    from sacpo_lightning.pipeline.config import PipelineConfigError, load_pipeline_config

    with pytest.raises(ValueError, match=r"--merge\.weights\) must each be in \[0, 1\]"):
        MergeOnFitEnd(weights=[0.5, q])
    folder = tmp_path / "m"
    folder.mkdir()
    assert merge_main(["--base", str(folder), "--other", str(folder), "--weights", str(q), "--output", "o"]) == 2
    assert "weights must be in [0, 1]" in capsys.readouterr().err
    monkeypatch.chdir(ROOT)
    raw = yaml.safe_load((ROOT / "configs" / "pipelines" / "tiny.yaml").read_text())
    raw["merge"] = {**(raw.get("merge") or {}), "weights": [q]}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(PipelineConfigError, match=r"merge\.weights: q must be in \[0, 1\]"):
        load_pipeline_config(path)


def test_qlora_without_bitsandbytes_says_what_to_install(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    settings = PolicySettings(name_or_path=tiny_model_dir, finetune="qlora", lora=LoraSettings(r=4, alpha=8))
    message = r"--model\.policy\.finetune=qlora needs bitsandbytes .*sacpo-lightning\[qlora\].*finetune: lora"
    with pytest.raises(MissingDependencyError, match=message):
        build_policy(settings)


@pytest.mark.parametrize("path", ["{tmp}/step1/export", "./outputs/never/export", "outputs/x/step1/export", "~/nope/x"])
def test_missing_reference_folder_names_the_option(tmp_path, path):
    settings = PolicySettings(name_or_path=path.format(tmp=tmp_path))
    with pytest.raises(FileNotFoundError, match=r"--model\.policy\.name_or_path = .* does not exist.*run step 1"):
        build_policy(settings)


def test_folder_without_a_model_and_hub_ids(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no Hugging Face model"):
        check_model_source(str(tmp_path / "half"))
    for name in ("HuggingFaceTB/SmolLM2-135M", "gpt2", "tiny-random-llama"):
        check_model_source(name)  # Hub ids and named models are not checked locally


@pytest.mark.slow
def test_step2_cli_with_missing_step1_export_fails_before_loading(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sacpo_lightning", "fit", "--config", "configs/debug/tiny.yaml",
         "--model=sacpo_lightning.modules.SafetyDPO", "--model.init_args.lam=2",
         f"--model.init_args.policy.name_or_path={tmp_path}/step1/export", f"--trainer.default_root_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "--model.policy.name_or_path" in result.stderr and "run step 1 first" in result.stderr


# ---------------------------------------------------------------------------------------------- data rows
GOOD = {
    "hh": {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"},
    "generic": {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"},
    "kto": {"prompt": "Hi", "completion": "Hello", "label": True},
}
FIELD_FAULTS = {
    "misspelled": lambda row, f: {("promt" if f == "prompt" else f + "s") if k == f else k: v for k, v in row.items()},
    "null": lambda row, f: {**row, f: None},
    "wrong_type": lambda row, f: {**row, f: 7 if isinstance(row[f], str) else "yes"},
    "empty": lambda row, f: {**row, f: "  "},
}
EXPECTED = {"misspelled": "is missing", "null": "null", "wrong_type": "must be", "empty": "empty"}
CASES = [
    (source, field, fault)
    for source, row in GOOD.items()
    for field in row
    for fault in FIELD_FAULTS
    if not (fault == "empty" and not isinstance(row[field], str))
]


@pytest.mark.parametrize(("source", "field", "fault"), CASES)
def test_other_sources_name_file_line_and_field_or_skip_and_count(tmp_path, source, field, fault):
    good = GOOD[source]
    other = {**good, **({"prompt": "Another"} if "prompt" in good else {})}
    if source == "hh":
        other = {k: v.replace("Hi", "Hey") for k, v in good.items()}
    bad = FIELD_FAULTS[fault](good, field)
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (other, bad)) + "\n")
    spec = {"source": source, "kind": "kto" if source == "kto" else "pairs"}
    with pytest.raises(DataError) as info:
        load_records([str(path)], SourceSpec(**spec))
    message = str(info.value)
    assert f"{path}:2: " in message and f"'{field}'" in message and EXPECTED[fault] in message
    assert "--data.on_invalid skip" in message
    with pytest.warns(UserWarning, match="Skipped 1 invalid rows"):
        result = load_records([str(path)], SourceSpec(**spec, on_invalid="skip"))
    assert len(result.records) == 1 and sum(result.skipped.values()) == 1


def test_json_list_item_that_is_not_an_object(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([GOOD["generic"], 5]))
    with pytest.raises(DataError, match=r"rows\.json\[1\]: item is a JSON int"):
        load_records([str(path)], SourceSpec(source="generic"))


# --------------------------------------------------------------------------------------------- output folders
def _fit_boring(tmp_path, checkpoint):
    model = BoringModel()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, callbacks=[checkpoint], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model)
    return model


def test_checkpoint_folder_that_cannot_be_created_fails_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    started = []
    monkeypatch.setattr(BoringModel, "on_train_start", lambda self: started.append(True))
    message = r"Checkpoint folder .*file/ckpt cannot be created.*--checkpoint\.dirpath"
    with pytest.raises(PermissionError, match=message):
        _fit_boring(tmp_path, AtomicModelCheckpoint(dirpath=blocker / "ckpt"))
    assert not started


def test_unwritable_checkpoint_folder_fails_before_training(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ckpt else real_access(p, mode))
    with pytest.raises(PermissionError, match=r"ckpt is not writable; set --checkpoint\.dirpath"):
        _fit_boring(tmp_path, AtomicModelCheckpoint(dirpath=ckpt))


def test_atomic_checkpoint_leaves_only_complete_files(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / ".last.ckpt.tmp-dead").write_bytes(b"half")  # left by a killed run
    _fit_boring(tmp_path, AtomicModelCheckpoint(dirpath=ckpt, save_last=True, every_n_train_steps=1, save_top_k=0))
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.ckpt"]
    import torch

    assert torch.load(ckpt / "last.ckpt", weights_only=True)["global_step"] == 2


# -------------------------------------------------------------------------------------------------- security
def test_remote_code_is_off_by_default_and_passed_as_off(tiny_model_dir, monkeypatch):
    from sacpo_lightning.models import policy as policy_module
    from sacpo_lightning.models import tokenizer as tokenizer_module

    assert PolicySettings().trust_remote_code is False
    seen = []

    class Stop(Exception):
        pass

    def capture(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise Stop

    monkeypatch.setattr(policy_module.AutoModelForCausalLM, "from_pretrained", capture)
    monkeypatch.setattr(tokenizer_module.AutoTokenizer, "from_pretrained", capture)
    for load in (
        lambda: policy_module.load_causal_lm(tiny_model_dir),
        lambda: build_policy(PolicySettings(name_or_path=tiny_model_dir)),
        lambda: tokenizer_module.load_tokenizer(tiny_model_dir),
    ):
        with pytest.raises(Stop):
            load()
    assert seen == [False, False, False]


def test_exports_hold_safetensors_only(tiny_model_dir, tmp_path):
    from sacpo_lightning.modules import RewardDPO

    module = RewardDPO(policy=PolicySettings(name_or_path=tiny_model_dir, lora=LoraSettings(r=4, alpha=8)))
    module.configure_model()
    module.export_pretrained(str(tmp_path / "export"))
    files = [p for p in (tmp_path / "export").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]


def test_every_torch_load_in_the_project_uses_weights_only():
    """Unpickling arbitrary objects runs code: every ``torch.load`` of this project restricts it to tensors."""
    calls = []
    for folder in ("sacpo_lightning", "callbacks", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                    flags = [k.value for k in node.keywords if k.arg == "weights_only"]
                    calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", flags))
    bad = [where for where, flags in calls if not (flags and isinstance(flags[0], ast.Constant) and flags[0].value)]
    assert not bad, f"torch.load without weights_only=True at {bad}"
