"""Every YAML under configs/ is valid: LightningCLI configs parse and instantiate, pipeline configs validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sacpo_lightning.cli import SacpoCLI, SacpoTrainer, lightning_cli
from sacpo_lightning.data import SourceSpec
from sacpo_lightning.pipeline.config import build_stages, deep_merge, load_pipeline_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml"))
PIPELINES = [p for p in CONFIGS if p.parts[1] == "pipelines"]
FRAGMENTS = {"trainer/default.yaml", "steps/qlora.yaml", "debug/tiny_kto.yaml"}
STRATEGIES = [p for p in CONFIGS if p.parts[1] == "strategies"]
STEP_BASE = ["--config", "configs/trainer/default.yaml", "--config", "configs/steps/step1_reward_dpo.yaml"]


class ParseOnlyCLI(SacpoCLI):
    """Parses and instantiates every configured class (model, data, callbacks, strategy, logger) but no Trainer, so
    GPU-only settings can be validated on a CPU machine."""

    def instantiate_classes(self) -> None:
        self.config_init = self.parser.instantiate_classes(self.config)
        self.model, self.datamodule = self.config_init["model"], self.config_init["data"]


def parse(args: list[str]) -> ParseOnlyCLI:
    return ParseOnlyCLI(
        __import__("lightning").pytorch.LightningModule,
        __import__("sacpo_lightning.data", fromlist=["PreferenceDataModule"]).PreferenceDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "yaml"},
        trainer_class=SacpoTrainer,  # as the real CLI: takes precision: auto
        args=args,
        run=False,
        auto_configure_optimizers=False,
    )


@pytest.fixture(autouse=True)
def _in_project_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_configs_are_all_covered():
    assert PIPELINES and STRATEGIES
    for path in CONFIGS:
        first = path.read_text().splitlines()[0]
        assert first.startswith("#"), f"{path} must start with a comment giving the command that runs it"
        assert any("sacpo " in line for line in path.read_text().splitlines() if line.startswith("#")), path


def _is_cli_config(path: Path) -> bool:
    rel = str(path.relative_to("configs"))
    return path not in PIPELINES and path not in STRATEGIES and rel not in FRAGMENTS and not rel.startswith("data/")


@pytest.mark.parametrize("path", [p for p in CONFIGS if _is_cli_config(p)], ids=str)
def test_step_config_instantiates(path):
    cli = parse(["--config", "configs/trainer/default.yaml", "--config", str(path)])
    assert cli.model is not None and cli.datamodule is not None


def documented_commands(path: Path) -> list[list[str]]:
    """The ``--config`` files of each ``sacpo fit`` command in the header comment of a config, in order."""
    commands = []
    for line in path.read_text().splitlines():
        if line.startswith("#") and "sacpo fit" in line:
            words = line.split()
            commands.append([words[i + 1] for i, word in enumerate(words[:-1]) if word == "--config"])
    return commands


@pytest.mark.parametrize("fragment", ["steps/qlora.yaml", "debug/tiny_kto.yaml", "data/hh_helpful.yaml",
                                      "data/pku_safety.yaml", "data/pku_safety_kto.yaml"])
def test_fragments_compose(fragment):
    # Composed as the fragment's own comment says (a safety data fragment after a safety step, not a reward step).
    (files,) = documented_commands(ROOT / "configs" / fragment)
    assert files[-1] == f"configs/{fragment}"
    base = [arg for f in files[:-1] for arg in ("--config", f)]
    cli = parse([*base, "--config", f"configs/{fragment}"])
    if fragment == "steps/qlora.yaml":
        assert cli.model.policy_settings.finetune == "qlora"
    if fragment.endswith("kto.yaml"):
        assert cli.datamodule.hparams.kind == "kto"


@pytest.mark.parametrize("path", STRATEGIES, ids=str)
def test_strategy_configs_parse(path):
    cli = parse([*STEP_BASE, "--config", str(path)])
    strategy = cli.config_init["trainer"]["strategy"]
    assert strategy is not None
    if path.name == "fsdp.yaml":  # decoder layers come from the model's _no_split_modules, for any architecture
        from sacpo_lightning.sharding import NoSplitModulesPolicy

        assert isinstance(strategy.kwargs["auto_wrap_policy"], NoSplitModulesPolicy)
        assert isinstance(strategy._activation_checkpointing_kwargs["auto_wrap_policy"], NoSplitModulesPolicy)


@pytest.mark.parametrize("path", PIPELINES, ids=str)
def test_pipeline_configs_validate(path):
    stages = build_stages(load_pipeline_config(path))
    assert stages[0].name == "reward"


def test_cli_run_false_instantiates_trainer_and_forced_callbacks(tmp_path):
    cli = lightning_cli(["--config", "configs/debug/tiny.yaml", "--trainer.default_root_dir", str(tmp_path)], run=False)
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert {"ExportHF", "AtomicModelCheckpoint", "NaNGuard", "ProgressLog"} <= names
    assert cli.datamodule.hparams.tokenizer == "tiny-random-llama"


def test_every_shipped_yaml_is_valid_yaml():
    for path in CONFIGS:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


# Which data objective each trainable class must learn from: helpfulness steps and reward models never train on
# safety labels, safety steps and cost models never on helpfulness labels.
OBJECTIVE_OF_CLASS = {
    "RewardDPO": "helpful",
    "RewardKTO": "helpful",
    "RewardModelModule": "helpful",
    "SafetyDPO": "safe",
    "SafetyKTO": "safe",
    "CostModelModule": "safe",
}


def shipped_steps(path: Path) -> list[tuple[str, dict]]:
    """(what, composed config) of every training step a shipped YAML defines: for a pipeline its train stages as the
    pipeline composes them (step files, overrides, the class of its role and algorithm); for any other config each
    ``sacpo fit`` command of its header comment."""
    if path in PIPELINES:
        return [(f"{path} stage {stage.name}", stage.config)
                for stage in build_stages(load_pipeline_config(path)) if stage.kind == "train"]
    steps = []
    for files in documented_commands(path):
        config: dict = {}
        for file in files:
            config = deep_merge(config, yaml.safe_load((ROOT / file).read_text()) or {})
        steps.append((f"sacpo fit --config {' --config '.join(files)}", config))
    return steps


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_every_step_trains_on_the_objective_of_its_role(path):
    steps = shipped_steps(path)
    assert steps, f"{path} defines no training step"
    for what, config in steps:
        name = config["model"]["class_path"].rsplit(".", 1)[-1]
        assert name in OBJECTIVE_OF_CLASS, f"{what}: add {name} to OBJECTIVE_OF_CLASS"
        data = config["data"]
        objective = data.get("objective", "safe")  # PreferenceDataModule's default
        assert objective == OBJECTIVE_OF_CLASS[name], (
            f"{what}: {name} must train on {OBJECTIVE_OF_CLASS[name]} data, but data.objective is {objective} "
            f"({data.get('source', 'pku')} {data.get('train_files')})")
        # The data options are a valid combination (e.g. no helpfulness KTO from the PKU safety flags).
        SourceSpec(**{k: data[k] for k in ("source", "objective", "kind", "kto_from", "filter") if k in data})
    if path in PIPELINES:
        assert [what for what, _ in steps if what.endswith("stage reward")], f"{path} has no reward stage"
        implicit = (yaml.safe_load(path.read_text()).get("evaluate") or {}).get("implicit") or {}
        for role, objective in (("helpful", "helpful"), ("safety", "safe")):
            if role in implicit:
                assert implicit[role].get("objective", "safe") == objective, f"{path}: evaluate.implicit.{role}"
