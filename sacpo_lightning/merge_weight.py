"""The P-SACPO merge weight ``q`` and the safety weight it stands for.

A merge (or token-level mixture) of the step-1 model (``q = 0``) and a step-2 model trained with safety weight
``lambda`` (``q = 1``) approximates the SACPO optimum for the safety weight ``q * lambda`` (see
:mod:`sacpo_lightning.models.mixture`). :func:`check_q` is the one range check of ``q``, called where a weight enters
(the CLIs, the pipeline config, the merge callback, a mixture spec and the public merge functions);
:func:`effective_lambda` is the one place ``q * lambda`` is computed.
"""

from __future__ import annotations

from sacpo_lightning.errors import UserError

__all__ = ["check_q", "effective_lambda"]


def check_q(q: float, option: str = "q") -> float:
    """``q`` as a float, after checking it is a merge weight in ``[0, 1]``.

    Args:
        q: The weight (any real number type).
        option: The option or field the value came from, named in the error.

    Raises:
        ValueError: ``q`` is not a number, is NaN, or lies outside ``[0, 1]``.
    """
    try:
        value = float(q)
    except (TypeError, ValueError):
        raise UserError(f"{option} must be a number in [0, 1], got {q!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise UserError(f"{option} must be in [0, 1], got {value}")
    return value


def effective_lambda(q: float, lam: float) -> float:
    """The safety weight ``q * lambda`` that the merge at weight ``q`` of step 1 and a step-2 model trained with
    ``lambda`` stands for."""
    return float(q) * float(lam)
