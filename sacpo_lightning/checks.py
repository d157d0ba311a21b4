"""Argument checks shared by the losses and the modules, with messages that name the option."""

from __future__ import annotations

import math

from sacpo_lightning.errors import UserError

__all__ = ["check_positive"]


def check_positive(option: str, value: float) -> None:
    """Raises a :class:`~sacpo_lightning.errors.UserError` naming ``option`` unless ``value`` is a finite number > 0."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise UserError(f"{option} must be a finite number > 0, got {value!r}")
