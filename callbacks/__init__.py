"""Lightning callbacks of sacpo-lightning (installed as ``sacpo_lightning.callbacks``)."""

from sacpo_lightning.callbacks.export import ExportHF

__all__ = ["ExportHF"]
