"""Plotting backend shared by the evaluation report and the safety-budget curve.

matplotlib is imported on first use (:func:`pyplot`), with the non-interactive Agg backend, so that importing a module
that can plot costs nothing until a figure is drawn.
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["pyplot"]


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
    # Lazy: matplotlib is only needed when a figure is written.
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt
