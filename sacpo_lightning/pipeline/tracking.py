"""The pipeline's ``logger``: Lightning loggers for every training stage, and the pipeline's results logged at the end.

A training stage runs ``sacpo fit`` in a subprocess: it gets its loggers as LightningCLI ``trainer.logger`` entries
(:func:`stage_logger_config`). The pipeline itself logs the budget's lambda*, the evaluation's headline numbers and
the plots to a run of the same logger named ``pipeline`` (:func:`log_results`).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from sacpo_lightning.pipeline.config import LoggerSpec

__all__ = ["DEFAULT_PROJECT", "RESULTS_RUN", "log_results", "logger_entry", "make_log_dir", "mlflow_default_uri",
           "stage_env", "stage_logger_config"]

DEFAULT_PROJECT = "sacpo"
RESULTS_RUN = "pipeline"
# where each kind writes under the pipeline's output folder
LOG_DIRS = {"csv": "logs", "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlruns"}


def logger_entry(spec: LoggerSpec, output_dir: Path, run: str) -> dict[str, Any]:
    """The ``class_path``/``init_args`` of the Lightning logger of ``spec`` for the run ``run`` (a stage's name, or
    :data:`RESULTS_RUN`)."""
    save_dir = str(Path(output_dir) / LOG_DIRS[spec.kind])
    project = spec.project or DEFAULT_PROJECT
    loggers = "lightning.pytorch.loggers"
    if spec.kind == "csv":
        return {"class_path": f"{loggers}.CSVLogger", "init_args": {"save_dir": save_dir, "name": run}}
    if spec.kind == "tensorboard":
        return {"class_path": f"{loggers}.TensorBoardLogger",
                "init_args": {"save_dir": save_dir, "name": run, "default_hp_metric": False}}
    if spec.kind == "wandb":
        return {"class_path": f"{loggers}.WandbLogger",
                "init_args": {"name": run, "save_dir": save_dir, "project": project, "offline": spec.offline}}
    if spec.kind == "mlflow":
        # MLflow 3 refuses new file stores (./mlruns): the default is a SQLite store, with the artifacts beside it
        init = {"experiment_name": project, "run_name": run,
                "tracking_uri": spec.tracking_uri or mlflow_default_uri(output_dir)}
        if spec.tracking_uri is None:
            init["artifact_location"] = str(Path(output_dir).absolute() / LOG_DIRS["mlflow"] / "artifacts")
        return {"class_path": f"{loggers}.MLFlowLogger", "init_args": init}
    raise ValueError(f"unknown logger kind {spec.kind!r}")


def mlflow_default_uri(output_dir: Path) -> str:
    """The MLflow tracking store when ``logger.tracking_uri`` is not given: ``<output>/mlruns/mlflow.db``."""
    return f"sqlite:///{Path(output_dir).absolute() / LOG_DIRS['mlflow'] / 'mlflow.db'}"


def stage_logger_config(spec: LoggerSpec, output_dir: Path, stage: str, stage_root: Path) -> list[dict] | None:
    """``trainer.logger`` of a training stage: its CSV log (which the evaluation's training curves read) and the
    chosen logger beside it; None for ``csv``, where ``sacpo fit``'s own CSV logger is the one."""
    if spec.kind == "csv":
        return None
    csv = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(stage_root),
                                                                              "name": "logs"}}
    return [csv, logger_entry(spec, output_dir, stage)]


def stage_env(spec: LoggerSpec, output_dir: Path) -> dict[str, str]:
    """Environment of a training subprocess: W&B groups the stages' runs by the output folder's name (a setting
    WandbLogger passes on only through ``**kwargs``, which a LightningCLI config cannot give)."""
    if spec.kind == "wandb":
        return {"WANDB_RUN_GROUP": Path(output_dir).name}
    return {}


def make_log_dir(entry: dict[str, Any]) -> None:
    """Creates the folder a :func:`logger_entry` writes to (W&B needs it to exist)."""
    init = entry["init_args"]
    folder = init.get("save_dir") or init.get("artifact_location")
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)


def make_logger(spec: LoggerSpec, output_dir: Path, run: str):
    """An instance of the Lightning logger of ``spec`` for ``run``."""
    entry = logger_entry(spec, output_dir, run)
    make_log_dir(entry)
    module, name = entry["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**entry["init_args"])


def _png_array(path: str | os.PathLike):
    """(H, W, 3) uint8 pixels of a PNG."""
    import numpy as np
    from matplotlib import image

    pixels = image.imread(str(path))
    if pixels.dtype != np.uint8:
        pixels = (np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8)
    return pixels[..., :3] if pixels.ndim == 3 else np.stack([pixels] * 3, axis=-1)


def log_results(spec: LoggerSpec, output_dir: Path, metrics: dict[str, float], images: dict[str, Path]) -> str:
    """Logs ``metrics`` (at step 0) and the PNG ``images`` (``{tag: file}``) to a run named :data:`RESULTS_RUN` of
    the pipeline's logger; returns where they went.

    TensorBoard gets the images with ``add_image``, W&B with ``log_image``, MLflow as artifacts under ``plots/``; the
    CSV logger takes numbers only (the PNGs stay in the stage folders).
    """
    output_dir = Path(output_dir)
    logger = make_logger(spec, output_dir, RESULTS_RUN)
    if metrics:
        logger.log_metrics(metrics, step=0)
    for tag, path in images.items():
        if spec.kind == "tensorboard":
            logger.experiment.add_image(f"plots/{tag}", _png_array(path), 0, dataformats="HWC")
        elif spec.kind == "wandb":
            logger.log_image(key=f"plots/{tag}", images=[str(path)], step=0)
        elif spec.kind == "mlflow":
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="plots")
    logger.save()
    logger.finalize("success")
    if spec.kind == "wandb":
        logger.experiment.finish()
    if spec.kind == "csv":
        return f"{logger.log_dir}/metrics.csv"
    if spec.kind == "tensorboard":
        return str(logger.log_dir)
    if spec.kind == "wandb":
        return str(output_dir / LOG_DIRS["wandb"])
    return spec.tracking_uri or mlflow_default_uri(output_dir)
