"""Optimizer and learning-rate schedule shared by every trainable module (alignment steps and score models)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sacpo_lightning.errors import UserError, require_extra


@dataclass
class OptimSettings:
    """Optimizer and learning-rate schedule.

    Args:
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay (AdamW).
        betas: Adam betas.
        optimizer: ``adamw`` (torch), ``adamw_8bit`` or ``paged_adamw_8bit`` (bitsandbytes, less optimizer memory).
        scheduler: Decay after warm-up: ``cosine`` or ``linear`` to 0, or ``constant``.
        warmup_ratio: Fraction of the total steps used for linear warm-up.
        warmup_steps: Absolute number of warm-up steps; overrides ``warmup_ratio`` when set.
    """

    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise UserError(f"--model.optim.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"--model.optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UserError(f"--model.optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.optimizer not in ("adamw", "adamw_8bit", "paged_adamw_8bit"):
            raise UserError(f"--model.optim.optimizer must be adamw, adamw_8bit or paged_adamw_8bit, got "
                            f"{self.optimizer!r}")


def lr_factor(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak rate at each step: linear warm-up, then cosine/linear decay to 0 or constant."""

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def configure_optimization(params: Iterable[torch.nn.Parameter], settings: OptimSettings, total_steps: int
                           ) -> dict[str, Any]:
    """The ``configure_optimizers`` return value: the optimizer over ``params`` and a per-step schedule."""
    params = list(params)
    if not params:
        raise ValueError("The model has no trainable parameters; check --model.policy.finetune and the lora settings.")
    kwargs = {"lr": settings.lr, "betas": settings.betas, "weight_decay": settings.weight_decay}
    if settings.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, **kwargs)
    else:
        bnb = require_extra("bitsandbytes", extra="qlora", feature=f"--model.optim.optimizer={settings.optimizer}",
                            alternative="Or use --model.optim.optimizer adamw.")
        cls = bnb.optim.PagedAdamW8bit if settings.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        optimizer = cls(params, **kwargs)
    total = max(1, int(total_steps))
    warmup = settings.warmup_steps if settings.warmup_steps is not None else int(round(settings.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(settings.scheduler, min(warmup, total), total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
