"""Export the trained policy as a Hugging Face folder when a fit finishes."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from sacpo_lightning.errors import NotWritableError


class ExportHF(Callback):
    """Writes the policy (merged weights, tokenizer, step metadata, LoRA adapter) after a successful fit.

    Only rank 0 writes; the folder appears atomically and only when the fit ran to completion (an interrupted or
    failed fit exports nothing). The metadata records the data files and their fingerprints and the final metrics.

    Args:
        dirpath: Target folder; defaults to ``<trainer.default_root_dir>/export``.
        dtype: Dtype of the exported weights (``float32``, ``bfloat16``, ``float16``); defaults to the load dtype.
        merged: For LoRA/QLoRA runs, also write the merged full weights. By default an adapter run exports its
            adapter chain only (base model name, adapters, tokenizer, config), which ``sacpo`` commands and the next
            SACPO step load directly; a merged copy costs a full model per step (14-28 GB at 7B).
    """

    def __init__(self, dirpath: str | None = None, dtype: str | None = None, merged: bool = False) -> None:
        self.dirpath = dirpath
        self.dtype = dtype
        self.merged = merged
        self.last_export: str | None = None

    def resolve_dirpath(self, trainer: L.Trainer) -> str:
        return os.path.expanduser(os.path.expandvars(self.dirpath or os.path.join(trainer.default_root_dir, "export")))

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        parent = os.path.dirname(os.path.abspath(self.resolve_dirpath(trainer)))
        os.makedirs(parent, exist_ok=True)
        if not os.access(parent, os.W_OK):
            raise NotWritableError(f"Export folder parent {parent} is not writable; set --export.dirpath to a writable "
                                   "location.")

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or not hasattr(pl_module, "export_pretrained"):
            return
        dirpath = self.resolve_dirpath(trainer)
        if trainer.is_global_zero:
            kwargs = {"merged": self.merged} if self.merged else {}
            pl_module.export_pretrained(dirpath, dtype=self.dtype, extra=self._extra_metadata(trainer), **kwargs)
            self.last_export = dirpath
        trainer.strategy.barrier("sacpo_export")

    @staticmethod
    def _extra_metadata(trainer: L.Trainer) -> dict[str, Any]:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        extra: dict[str, Any] = {"final_metrics": metrics, "global_step": trainer.global_step,
                                 "epochs": trainer.current_epoch, "precision": str(trainer.precision)}
        choice = getattr(trainer, "precision_choice", None)
        if choice is not None:
            extra["precision_choice"] = choice
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "fingerprint"):
            extra["data"] = datamodule.fingerprint()
        return extra

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_export": self.last_export}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_export = state_dict.get("last_export")
