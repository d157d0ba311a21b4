"""The pipeline's ``logger`` and ``export_plain`` settings, the model cards it writes with what it knows, and the tiny
evaluation pipeline's report (the tests of that one shared run live in this file, so they share a test worker).

The fast tests run the runner with the training, budget and evaluation replaced by small fakes that write what those
stages write (export records, ``budget.json``, ``report.json``, a plot); the slow tests run the tiny pipeline.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pipeline_run import run_pipeline

from sacpo_lightning.io import is_complete_directory
from sacpo_lightning.pipeline.config import LoggerSpec, PipelineConfigError, load_pipeline_config
from sacpo_lightning.pipeline.runner import PipelineRunner
from sacpo_lightning.pipeline.tracking import stage_logger_config

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "configs" / "pipelines"


@pytest.fixture(autouse=True)
def _in_project_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B without network: offline mode, no credentials, its files and settings inside the test's folder."""
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wandb_dir"),
                        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"), "WANDB_CACHE_DIR": str(tmp_path / "wc"),
                        "WANDB_DISABLE_GIT": "true", "WANDB_API_KEY": "", "WANDB_BASE_URL": "http://127.0.0.1:9"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "wandb_dir").mkdir()


def _write(tmp_path: Path, base: str = "tiny.yaml", **changes) -> Path:
    raw = yaml.safe_load((PIPELINES / base).read_text())
    raw.update(changes)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ----------------------------------------------------------------------------------------------------- settings
def test_logger_forms():
    assert load_pipeline_config(PIPELINES / "tiny.yaml").logger == LoggerSpec(kind="csv")


@pytest.mark.parametrize(("value", "expected"), [
    ("tensorboard", LoggerSpec(kind="tensorboard")),
    ({"kind": "wandb", "project": "p", "offline": True}, LoggerSpec(kind="wandb", project="p", offline=True)),
    ({"kind": "csv"}, LoggerSpec()),
])
def test_logger_setting_forms(tmp_path, value, expected):
    if expected.kind != "csv":
        pytest.importorskip(expected.kind)
    assert load_pipeline_config(_write(tmp_path, logger=value)).logger == expected


@pytest.mark.parametrize(("value", "message"), [
    ({"kind": "tensorboard", "projekt": "x"}, r"logger.projekt: unknown key\(s\); known keys: kind, offline, project, "
                                              r"tracking_uri"),
    ("neptune", "logger.kind: unknown logger 'neptune'; known: csv, tensorboard, wandb, mlflow"),
    ({"kind": "tensorboard", "offline": True}, r"logger.offline: not read by the tensorboard logger \(it reads: only "
                                               r"kind\)"),
    ({"kind": "wandb", "offline": "yes"}, "logger.offline: must be true or false, got 'yes'"),
    ([1], "logger: must be a logger kind"),
])
def test_bad_logger_setting_names_file_and_key(tmp_path, value, message):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    path = _write(tmp_path, logger=value)
    with pytest.raises(PipelineConfigError, match=message) as info:
        load_pipeline_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["tensorboard", "wandb", "mlflow"])
def test_missing_logger_package_names_the_extra_before_any_training(tmp_path, monkeypatch, kind):
    monkeypatch.setitem(sys.modules, kind, None)  # importing it now fails, as when it is not installed
    path = _write(tmp_path, logger=kind)
    with pytest.raises(PipelineConfigError, match=rf'logger: logger: {kind} needs {kind} \(the {kind} extra: pip '
                                                  rf'install "sacpo-lightning\[{kind}\]"\)') as info:
        load_pipeline_config(path)
    assert str(path) in str(info.value) and "Or use logger: csv." in str(info.value)


def test_step_config_with_its_own_logger_conflicts(tmp_path):
    pytest.importorskip("tensorboard")
    path = _write(tmp_path, logger="tensorboard", safety_step={
        "algorithm": "dpo", "configs": ["configs/debug/tiny.yaml"],
        "overrides": {"trainer": {"logger": False}}})
    with pytest.raises(PipelineConfigError, match="safety_step: .*set trainer.logger, and the pipeline sets logger"):
        load_pipeline_config(path)
    # without the pipeline's logger the step's own logger stays as it was
    del_logger = yaml.safe_load(path.read_text())
    del del_logger["logger"]
    path.write_text(yaml.safe_dump(del_logger))
    load_pipeline_config(path)


def test_export_plain_adds_a_stage_after_the_evaluation(tmp_path):
    cfg = load_pipeline_config(_write(tmp_path, base="tiny_eval.yaml", export_plain=True))
    runner = PipelineRunner(cfg, tmp_path / "out", log=lambda _: None)
    last = runner.stages[-1]
    assert (last.name, last.kind) == ("export_plain", "export")
    assert last.depends_on == ["reward", "safety_lam4", "merge_lam4_q0.5", "evaluate"]
    with pytest.raises(PipelineConfigError, match="export_plain: must be true or false"):
        load_pipeline_config(_write(tmp_path, export_plain="yes"))


@pytest.mark.parametrize("spec", [LoggerSpec(kind="tensorboard"), LoggerSpec(kind="wandb", project="p", offline=True),
                                  LoggerSpec(kind="mlflow", project="p")], ids=lambda spec: spec.kind)
def test_training_stage_gets_csv_and_the_chosen_logger(tmp_path, spec):
    """The loggers a training stage gets instantiate through ``sacpo fit``'s LightningCLI: its CSV log stays."""
    pytest.importorskip(spec.kind)
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    from sacpo_lightning.cli import lightning_cli

    root = tmp_path / "stages" / "reward"
    loggers = stage_logger_config(spec, tmp_path, "reward", root)
    config = tmp_path / "loggers.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"logger": loggers, "default_root_dir": str(root)}}))
    cli = lightning_cli(["--config", "configs/debug/tiny.yaml", "--config", str(config)], run=False)
    csv_logger, chosen = cli.trainer.loggers
    assert isinstance(csv_logger, CSVLogger) and Path(csv_logger.log_dir).parent == root / "logs"
    if spec.kind == "tensorboard":
        assert isinstance(chosen, TensorBoardLogger)
        assert Path(chosen.log_dir).parent == tmp_path / "tensorboard" / "reward"
    elif spec.kind == "wandb":  # the run starts on first use, so nothing is written yet
        assert isinstance(chosen, WandbLogger) and (chosen.name, chosen._name) == ("p", "reward")  # project, run
        assert chosen.save_dir == str(tmp_path / "wandb") and chosen._offline is True
    else:
        assert isinstance(chosen, MLFlowLogger) and chosen._run_name == "reward"
        assert chosen._tracking_uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert stage_logger_config(LoggerSpec(), tmp_path, "reward", root) is None  # csv: sacpo fit's own logger


# ------------------------------------------------------------------------------------- a runner with fake stages
BUDGET = {
    "samples_per_prompt": 4, "lambda_star": 2.5, "lambda_star_interval": [1.5, None], "status": "interior",
    "message": "E[g] = b at lambda* = 2.5.", "step2_beta": 0.04,
    "predicted": {"safety": 0.6, "safety_interval": [0.55, 0.66]},
    "interval": {"level": 0.9, "lambda_star": [1.5, None], "safety": [0.55, 0.66]},
    "reference": {"safety": 0.5}, "solution": {"b": 0.6, "lam_max": 50.0}, "inputs": {"b": 0.6},
}


def _report(models: list[str], figure: Path) -> dict:
    """A report.json in the shape the evaluation writes, with numbers that differ per model."""
    out = {"baseline": "sft", "confidence": 0.95, "models": {}, "safety": {"models": {}}, "figures": {}}
    for i, name in enumerate(models):
        out["models"][name] = {
            "helpfulness": {"win_rate": 0.5 + i / 20, "ci_low": 0.25, "ci_high": 0.75, "n": 4},
            "harmlessness": {"win_rate": 0.5, "ci_low": 0.2, "ci_high": 0.8, "n": 4},
            "implicit": {"helpful": {"accuracy": 0.75, "num_pairs": 8}, "safety": {"accuracy": 0.5, "num_pairs": 4}},
        }
        out["safety"]["models"][name] = {"constraint": {"judge": "classifier-export", "b": 0.6, "safety": 0.6 + i / 50,
                                                        "ci_low": 0.5, "ci_high": 0.7, "source": "mean_safety"}}
    out["figures"]["pareto"] = str(figure)
    return out


def _fake_runner(tmp_path: Path, monkeypatch, logger) -> tuple[PipelineRunner, Path]:
    """The tiny budget pipeline (no merges) with fake training, budget and evaluation stages."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from sacpo_lightning.evaluation import pipeline_stage

    raw = yaml.safe_load((PIPELINES / "tiny_budget.yaml").read_text())
    raw["safety_budget"]["merge_weights"] = []
    raw["logger"] = logger
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    runner = PipelineRunner(load_pipeline_config(path), out, log=lambda _: None)

    def train(stage, inputs, digest):
        export = runner.export_dir(stage.name)
        export.mkdir(parents=True)
        init = inputs["config"].get("model", {}).get("init_args", {})
        step = {"kind": stage.name, "beta": 0.1, "reference": stage.reference}
        if "lam" in init:
            step.update(lam=init["lam"], kl_coef=0.1 / init["lam"])
        (export / "sacpo_step.json").write_text(json.dumps(step))
        (export / "README.md").write_text("the export's own card\n")
        (export / ".complete").write_text("ok")
        return {}

    def budget(stage, inputs, digest):
        runner.stage_dir("budget").mkdir(parents=True, exist_ok=True)
        (runner.stage_dir("budget") / "budget.json").write_text(json.dumps(BUDGET))
        fig, ax = plt.subplots(figsize=(2, 1.5))
        ax.plot([0, 1], [1, 0], color="red")
        fig.savefig(runner.stage_dir("budget") / "lambda_curve.png")
        plt.close(fig)
        return {"lambda_star": BUDGET["lambda_star"]}

    def evaluation(config, models, stage_dir, *, log=print, predicted_safety=None):
        stage_dir.mkdir(parents=True, exist_ok=True)
        figure = stage_dir / "pareto.png"
        fig, ax = plt.subplots(figsize=(2, 1.5))
        ax.scatter([0, 1], [0, 1])
        fig.savefig(figure)
        plt.close(fig)
        (stage_dir / "report.json").write_text(json.dumps(_report(list(models), figure)))
        return {"report": str(stage_dir / "report.json"), "models": sorted(models)}

    monkeypatch.setattr(runner, "_run_train", train)
    monkeypatch.setattr(runner, "_run_budget", budget)
    monkeypatch.setattr(pipeline_stage, "run_evaluation_stage", evaluation)
    return runner, out


def test_cards_state_lambda_star_and_the_measured_numbers(tmp_path, monkeypatch):
    runner, out = _fake_runner(tmp_path, monkeypatch, "csv")
    assert runner.run() == 0
    card = (runner.export_dir("safety_budget") / "README.md").read_text()
    assert "| lambda | lambda* = 2.5 (picked by the safety budget) |" in card
    assert "| KL coefficient (beta / lambda) | 0.04 |" in card
    assert "- b (target E[g]): 0.6" in card and "- 90% bootstrap interval of lambda*: [1.5, unbounded]" in card
    assert "- beta / lambda* (step 2's KL coefficient): 0.04" in card
    # the evaluation's numbers for this model (the second evaluated after sft and reward), with intervals
    assert "| measured safety: mean P(safe) on the safety prompts (classifier-export) | 0.64 | 0.5 - 0.7 |" in card
    assert "| helpfulness win rate against sft | 0.6 | 0.25 - 0.75 |" in card
    assert "| implicit-reward accuracy on helpfulness pairs (n=8) | 0.75 | 0.4" in card  # Wilson 6 of 8: 0.409-0.929
    reward_card = (runner.export_dir("reward") / "README.md").read_text()
    assert "## Safety budget" not in reward_card and "| helpfulness win rate against sft | 0.55 |" in reward_card
    # the score models are not evaluated models: their cards stay as their exports wrote them
    assert (runner.export_dir("cost_model") / "README.md").read_text() == "the export's own card\n"

    # the default csv logger: the results as one row of metrics.csv
    (metrics_csv,) = (out / "logs" / "pipeline").glob("version_*/metrics.csv")
    (row,) = list(csv.DictReader(metrics_csv.open()))
    assert float(row["budget/lambda_star"]) == 2.5 and float(row["budget/lambda_star_low"]) == 1.5
    assert "budget/lambda_star_high" not in row  # unbounded
    assert float(row["eval/safety_budget/safety"]) == pytest.approx(0.64)
    assert float(row["eval/safety_budget/safety_low"]) == 0.5
    assert float(row["eval/reward/implicit_helpful_accuracy"]) == 0.75
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["logged"]["logger"] == "csv" and "eval/sft/safety" in manifest["logged"]["metrics"]

    # rerun: nothing changed, nothing logged again
    again = PipelineRunner(runner.cfg, out, log=lambda _: None)
    assert again.run() == 0
    assert len(list((out / "logs" / "pipeline").glob("version_*"))) == 1


def test_tensorboard_gets_the_results_and_plots(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runner, out = _fake_runner(tmp_path, monkeypatch, "tensorboard")
    assert runner.run() == 0
    (events,) = (out / "tensorboard" / "pipeline").glob("version_*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"budget/lambda_star", "budget/step2_beta", "eval/safety_budget/safety", "eval/sft/safety",
            "eval/reward/helpfulness_win_rate_high"} <= set(tags["scalars"])
    assert acc.Scalars("budget/lambda_star")[0].value == 2.5
    assert set(tags["images"]) == {"plots/budget/lambda_curve", "plots/evaluate/pareto"}
    image = acc.Images("plots/budget/lambda_curve")[0]
    assert (image.width, image.height) == (200, 150)  # figsize (2, 1.5) at 100 dpi


def _wandb_items(run_dir: Path, *expected: bytes, timeout: float = 60.0) -> bytes:
    """The bytes of an offline W&B run's record log (``run-<id>.wandb``; its Python SDK has no reader), once they hold
    ``expected``: W&B's service process writes the log and may still be flushing it when the run's process has
    exited."""
    deadline = time.monotonic() + timeout
    while True:
        logs = list(run_dir.glob("run-*.wandb"))
        records = logs[0].read_bytes() if len(logs) == 1 else b""
        if (records and all(e in records for e in expected)) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def _wandb_logged(records: bytes, key: str, value_json: str) -> bool:
    """Whether a history or summary item ``key = value_json`` is in the records: an item is the protobuf fields
    ``key`` (2, a string) and ``value_json`` (16, a string) in that order."""
    value = value_json.encode()
    return key.encode() + b"\x82\x01" + bytes([len(value)]) + value in records


def test_wandb_offline_gets_the_results_and_plots(tmp_path, monkeypatch, wandb_offline):
    runner, out = _fake_runner(tmp_path, monkeypatch, {"kind": "wandb", "project": "sacpo-test", "offline": True})
    assert runner.run() == 0
    (run_dir,) = (out / "wandb" / "wandb").glob("offline-run-*")
    records = _wandb_items(run_dir, b"sacpo-test", b"budget/lambda_star", b"eval/reward/implicit_helpful_accuracy")
    assert b"sacpo-test" in records and b"pipeline" in records  # project and run name
    assert _wandb_logged(records, "budget/lambda_star", "2.5")
    assert _wandb_logged(records, "budget/lambda_star_low", "1.5")
    assert _wandb_logged(records, "eval/reward/implicit_helpful_accuracy", "0.75")
    images = run_dir / "files" / "media" / "images" / "plots"
    assert len(list((images / "budget").glob("lambda_curve_*.png"))) == 1
    assert len(list((images / "evaluate").glob("pareto_*.png"))) == 1


def test_mlflow_gets_the_results_and_plots(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runner, out = _fake_runner(tmp_path, monkeypatch, {"kind": "mlflow", "project": "sacpo-test"})
    assert runner.run() == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sacpo-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "pipeline"
    assert run.data.metrics["budget/lambda_star"] == 2.5
    assert run.data.metrics["eval/safety_budget/safety"] == pytest.approx(0.64)
    plots = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"lambda_curve.png", "pareto.png"}


# ------------------------------------------------------------------------------------------ the tiny pipeline
@pytest.mark.slow
def test_pipeline_with_evaluation_stage_writes_report(tiny_eval_pipeline):
    """tiny_eval.yaml (run once for the session, with export_plain: true and a logger, which
    the next test checks): every stage done, and the evaluation's report, figures and XSTest."""
    tiny_eval_pipeline.check_first()
    output = tiny_eval_pipeline.output
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["order"][-1] == "export_plain"
    assert [manifest["stages"][n]["status"] for n in manifest["order"][:-1]] == ["done"] * 6
    report = json.loads((output / "stages" / "evaluate" / "report.json").read_text())
    assert set(report["models"]) == {"sft", "reward", "safety_lam4", "merge_lam4_q0.5"}
    for name in ("pareto.png", "report.md", "training_curves.png", "xstest.png", "xstest.csv"):
        assert (output / "stages" / "evaluate" / name).stat().st_size > 0
    assert all(m["repetition"]["n"] > 0 for m in report["models"].values())
    assert set(report["examples"]) == set(report["models"])
    md = (output / "stages" / "evaluate" / "report.md").read_text()
    assert "## Repetition" in md and "## Sample answers" in md
    xstest = report["xstest"]  # evaluate.suites: [xstest] with 1 prompt per type
    assert set(xstest["models"]) == set(report["models"]) and (xstest["n_safe"], xstest["n_unsafe"]) == (10, 8)


@pytest.mark.slow
def test_tiny_pipeline_with_tensorboard_cards_and_plain_folders(tiny_eval_pipeline):
    """tiny_eval.yaml with ``logger: tensorboard`` and ``export_plain: true`` (tests/conftest.py runs it once for the
    session): every training stage logs to TensorBoard beside its CSV, the evaluated models' cards carry the measured
    numbers, and each plain folder loads with plain transformers and gives the library's log-probs."""
    pytest.importorskip("tensorboard")
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert tiny_eval_pipeline.logger == "tensorboard"
    tiny_eval_pipeline.check_first()
    output = tiny_eval_pipeline.output
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["order"][-1] == "export_plain"
    assert all(manifest["stages"][n]["status"] == "done" for n in manifest["order"])
    for stage in ("reward", "safety_lam4", "reward_model", "cost_model"):
        (events,) = (output / "tensorboard" / stage).glob("version_*")
        acc = EventAccumulator(str(events))
        acc.Reload()
        assert any(tag.startswith("train/") for tag in acc.Tags()["scalars"]), (stage, acc.Tags())
        assert list((output / "stages" / stage / "logs").glob("version_*/metrics.csv"))
    assert (output / "stages" / "evaluate" / "training_curves.png").stat().st_size > 0
    (events,) = (output / "tensorboard" / "pipeline").glob("version_*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    assert "eval/safety_lam4/implicit_helpful_accuracy" in acc.Tags()["scalars"]
    assert {"plots/evaluate/pareto", "plots/evaluate/training_curves"} <= set(acc.Tags()["images"])

    report = json.loads((output / "stages" / "evaluate" / "report.json").read_text())
    for name in ("reward", "safety_lam4", "merge_lam4_q0.5"):
        accuracy = report["models"][name]["implicit"]["helpful"]["accuracy"]
        for folder in (output / "stages" / name / "export", output / "plain" / name):
            card = (folder / "README.md").read_text()
            assert f"| implicit-reward accuracy on helpfulness pairs (n=8) | {accuracy:.6g} |" in card, (folder, card)
            assert "harmlessness win rate against sft" in card
        assert is_complete_directory(output / "plain" / name)
    # the plain folders hold full weights: plain transformers loads them, in a fresh interpreter without this library
    probe = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "ids = torch.tensor([[1, 5, 9, 33, 7]])\n"
        "out = {}\n"
        "for folder in sys.argv[1:]:\n"
        "    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()\n"
        "    logps = model(ids).logits.double().log_softmax(-1)[0, :-1]\n"
        "    out[folder] = logps.gather(-1, ids[0, 1:, None]).sum().item()\n"
        "assert not any(m.startswith('sacpo_lightning') for m in sys.modules)\n"
        "print(json.dumps(out))\n"
    )
    names = ("reward", "safety_lam4", "merge_lam4_q0.5")
    folders = [str(output / "plain" / n) for n in names]
    probe_run = subprocess.run([sys.executable, "-c", probe, *folders], capture_output=True, text=True, timeout=300,
                               cwd=output.parent, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert probe_run.returncode == 0, probe_run.stderr[-3000:]
    plain = json.loads(probe_run.stdout.strip().splitlines()[-1])
    from sacpo_lightning.models.policy import load_causal_lm

    ids = torch.tensor([[1, 5, 9, 33, 7]])
    for name, folder in zip(names, folders, strict=True):
        model = load_causal_lm(str(output / "stages" / name / "export"), dtype="float32").eval()
        with torch.no_grad():
            logps = model(ids).logits.double().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None]).sum().item()
        assert plain[folder] == pytest.approx(logps, abs=1e-4), name

    # a rerun with another logger (the default csv) reruns no stage
    again = tiny_eval_pipeline.rerun
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.count("unchanged, skipped") == len(manifest["order"])


@pytest.mark.slow
def test_tiny_pipeline_logs_training_to_wandb_offline(tmp_path, wandb_offline):
    """Two training stages with ``logger: {kind: wandb, offline: true}``: one offline W&B run per stage with the
    training metrics; no network (WANDB_MODE=offline and an unreachable base URL)."""
    config = _write(tmp_path, lambdas=[4.0], merge={},
                    logger={"kind": "wandb", "project": "sacpo-test", "offline": True})
    output = tmp_path / "out"
    result = run_pipeline(config, output, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = sorted((output / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    logged = [_wandb_items(run, b"train/loss", b"sacpo-test") for run in runs]
    assert all(b"train/loss" in records and b"sacpo-test" in records for records in logged)
    assert any(b"safety_lam4" in records for records in logged) and any(b"reward" in records for records in logged)
    assert list((output / "stages" / "safety_lam4" / "logs").glob("version_*/metrics.csv"))
