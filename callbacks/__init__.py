"""Lightning callbacks of sacpo-lightning (installed as ``sacpo_lightning.callbacks``)."""

from sacpo_lightning.callbacks.export import ExportHF
from sacpo_lightning.callbacks.merge import MergeOnFitEnd

__all__ = ["ExportHF", "MergeOnFitEnd"]
