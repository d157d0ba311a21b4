"""Plain-text progress lines (step, loss, speed, ETA) for logs and pipelines, where a progress bar is unreadable."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from sacpo_lightning.errors import UserError


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressLog(Callback):
    """Prints ``step k/N | loss | acc | s/step | ETA`` every ``every_n_steps`` optimizer steps and after validation.

    Args:
        every_n_steps: Interval in optimizer steps; 0 disables the lines.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        if every_n_steps < 0:
            raise UserError(f"--progress.every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._start_time: float | None = None
        self._start_step = 0

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_time = time.monotonic()
        self._start_step = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step == 0 or step % self.every_n_steps or self._start_time is None:
            return
        total = trainer.estimated_stepping_batches
        elapsed = time.monotonic() - self._start_time
        per_step = elapsed / max(1, step - self._start_step)
        metrics = trainer.callback_metrics
        shown = " | ".join(f"{k.split('/', 1)[-1]} {float(metrics[k]):.4f}" for k in ("train/loss", "train/acc")
                           if k in metrics)
        eta = _format_duration(per_step * max(0, total - step)) if total != float("inf") else "?"
        rank_zero_info(f"step {step}/{int(total) if total != float('inf') else '?'} | {shown} | "
                       f"{per_step:.2f} s/step | ETA {eta}")

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_steps or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        shown = " | ".join(f"{k} {float(v):.4f}" for k, v in sorted(metrics.items()) if k.startswith("val/"))
        if shown:
            rank_zero_info(f"validation at step {trainer.global_step}: {shown}")
