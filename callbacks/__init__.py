"""Lightning callbacks of sacpo-lightning (installed as ``sacpo_lightning.callbacks``)."""

from sacpo_lightning.callbacks.export import ExportHF
from sacpo_lightning.callbacks.merge import MergeOnFitEnd
from sacpo_lightning.callbacks.nan_guard import NaNGuard
from sacpo_lightning.callbacks.reference_cache import ReferenceCache

__all__ = ["ExportHF", "MergeOnFitEnd", "NaNGuard", "ReferenceCache"]
