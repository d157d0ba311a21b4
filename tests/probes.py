"""Test-only callbacks for ``sacpo fit`` subprocesses (importable as ``probes`` with ``PYTHONPATH=tests``).

``Crash`` kills the process with SIGKILL at a chosen point; ``Recorder`` writes what each process trained on.
"""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Crash(Callback):
    """SIGKILLs the process mid-step, in the middle of a checkpoint write, or in the middle of the export.

    Args:
        at: ``step`` (after the backward pass of the step that starts at global step ``step``, before its optimizer
            step), ``checkpoint`` (half-way through writing the checkpoint of global step ``step``: half the bytes
            are on disk under the name the checkpoint callback asked for) or ``export`` (after the weights and
            tokenizer are written to the export's temporary folder).
        step: Global step at which to crash.
    """

    def __init__(self, at: str, step: int = 0) -> None:
        if at not in ("step", "checkpoint", "export"):
            raise ValueError(f"at must be step, checkpoint or export, got {at!r}")
        self.at = at
        self.step = step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.at == "checkpoint":
            checkpoint_io = trainer.strategy.checkpoint_io
            original = checkpoint_io.save_checkpoint

            def save_checkpoint(checkpoint: dict, path: Any, storage_options: Any = None) -> None:
                if trainer.global_step == self.step:
                    buffer = io.BytesIO()
                    torch.save(checkpoint, buffer)
                    data = buffer.getvalue()
                    with open(path, "wb") as f:
                        f.write(data[: len(data) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                    _die()
                original(checkpoint, path, storage_options)

            checkpoint_io.save_checkpoint = save_checkpoint
        elif self.at == "export":
            import sacpo_lightning.models.export as export

            def write_metadata(path: Any, obj: Any) -> None:
                _die()

            export.atomic_write_json = write_metadata

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.at == "step" and trainer.global_step == self.step:
            _die()


class Recorder(Callback):
    """Appends one JSON line per training batch to ``<path>/rank<R>.jsonl``: global step, example indices, loss and
    the step's logged metrics; records in ``<path>/exports.txt`` the rank of every process that exports."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        original = pl_module.export_pretrained
        rank = trainer.global_rank

        def export_pretrained(*args: Any, **kwargs: Any) -> None:
            with open(self.path / "exports.txt", "a") as f:
                f.write(f"{rank}\n")
            original(*args, **kwargs)

        pl_module.export_pretrained = export_pretrained

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        logged = trainer.callback_metrics.items()
        metrics = {k: float(v) for k, v in logged if k.startswith("train/") and v.numel() == 1}
        row = {
            "step": trainer.global_step - 1,
            "indices": batch["index"].tolist(),
            "loss": float(outputs["loss"]),
            "metrics": metrics,
        }
        with open(self.path / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
