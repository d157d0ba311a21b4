"""Argument checks shared by the losses, the modules and the safety budget, with messages that name the option.

Each returns the value as a ``float``, so that a caller checks and converts in one place. A number is any real
number (Python, NumPy or a 0-d tensor's ``.item()``); strings and booleans are refused rather than read.
"""

from __future__ import annotations

import math
import numbers

from sacpo_lightning.errors import UserError

__all__ = ["check_finite", "check_nonnegative", "check_positive"]


def _real(option: str, value: object, requirement: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{option} must be {requirement}, got {value!r}")
    return float(value)


def check_positive(option: str, value: float) -> float:
    """``value`` as a float; a UserError naming ``option`` unless it is a finite number > 0."""
    v = _real(option, value, "a finite number > 0")
    if not (math.isfinite(v) and v > 0):
        raise UserError(f"{option} must be a finite number > 0, got {value!r}")
    return v


def check_nonnegative(option: str, value: float) -> float:
    """``value`` as a float; a UserError naming ``option`` unless it is a finite number >= 0."""
    v = _real(option, value, "a finite number >= 0")
    if not (math.isfinite(v) and v >= 0):
        raise UserError(f"{option} must be a finite number >= 0, got {value!r}")
    return v


def check_finite(option: str, value: float) -> float:
    """``value`` as a float; a UserError naming ``option`` unless it is a finite number."""
    v = _real(option, value, "a finite number")
    if not math.isfinite(v):
        raise UserError(f"{option} must be a finite number, got {value!r}")
    return v
