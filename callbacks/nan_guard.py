"""Stop training, or skip the update, when the loss or a gradient is NaN or infinite."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from sacpo_lightning.errors import UserError


class NonFiniteError(UserError, RuntimeError):
    """Raised by :class:`NaNGuard` when training meets a NaN or infinite loss or gradient.

    A :class:`~sacpo_lightning.errors.UserError`: a loss that diverges is fixed in the run's settings (a lower
    learning rate, another precision, clean data), so ``sacpo fit`` ends with the message, which says so, alone.
    """


class NaNGuard(Callback):
    """Checks every micro-batch's loss before its backward pass and the gradients before every optimizer step.

    ``stop`` raises :class:`NonFiniteError`, naming the global step and the batch, before the optimizer step: the
    weights keep their last finite values, no checkpoint is written for the bad step (the last one on disk predates
    it) and the end-of-fit export does not run. Fix the cause (learning rate, data) and resume with
    ``--ckpt_path last``.

    ``skip`` drops that update instead: the gradients are discarded (set to ``None``, so AdamW leaves the weights and
    its moment estimates untouched; the learning-rate schedule still advances) and the skip is counted, logged as
    ``train/skipped_batches`` and kept in checkpoints. More than ``max_skips`` skips in a run raise the error as in
    ``stop``.

    Under data-parallel training the processes share the decision (one all-reduce of a flag per optimizer step), so
    they all stop or skip together. With ``16-mixed`` precision the gradient scaler already skips steps whose
    gradients overflow, so only the loss is checked.

    Args:
        action: ``stop`` or ``skip``.
        max_skips: Most updates ``skip`` may drop in a run before stopping.
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_skips: int = 10) -> None:
        if action not in ("stop", "skip"):
            raise UserError(f"NaNGuard action must be 'stop' or 'skip', got {action!r}")
        if not isinstance(max_skips, int) or max_skips < 0:
            raise UserError(f"NaNGuard max_skips must be an integer >= 0, got {max_skips!r}")
        self.action = action
        self.max_skips = max_skips
        self.skipped = 0
        self._batch_idx = 0
        self._problems: list[tuple[str, int]] = []

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._problems.append((f"loss ({float(loss.detach().float().mean())})", self._batch_idx))

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        problems, self._problems = self._problems, []
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads and getattr(trainer.precision_plugin, "scaler", None) is None:
            finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
            if not bool(finite):
                problems.append(("gradients", self._batch_idx))
        if not trainer.strategy.reduce_boolean_decision(bool(problems), all=False):
            return
        # under gradient accumulation a bad loss may come from an earlier micro-batch of the step
        named = [what if batch == self._batch_idx else f"{what} in batch {batch}" for what, batch in problems]
        what = "non-finite " + (" and ".join(named) if named else "values on another process")
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx})"
        if self.action == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            optimizer.zero_grad(set_to_none=True)
            rank_zero_warn(f"NaNGuard: {what} at {where}; update skipped ({self.skipped}/{self.max_skips}).")
            return
        reason = f"more than max_skips={self.max_skips} skipped updates; " if self.action == "skip" else ""
        raise NonFiniteError(
            f"NaNGuard stopped training: {reason}{what} at {where}, before the optimizer step. The weights are those "
            "of the previous step and the last checkpoint predates this one; fix the cause (e.g. a lower "
            "--model.optim.lr, bad data) and resume with --ckpt_path last, or use NaNGuard(action='skip')."
        )

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.action == "skip":
            pl_module.log("train/skipped_batches", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
