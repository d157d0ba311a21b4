"""Precompute the reference policy's log-probs once per data set and reference, and feed them to every step."""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from sacpo_lightning.data.collate import collate_kto, collate_pairs
from sacpo_lightning.errors import UserError
from sacpo_lightning.modules.score import ScoreModelModule
from sacpo_lightning.refcache import (
    batch_reference_logps,
    cache_key,
    compute_reference_logps,
    examples_fingerprint,
    load_reference_cache,
    model_fingerprint,
    save_reference_cache,
)


class ReferenceCache(Callback):
    """Feeds cached reference log-probs to every batch, so the step modules skip the reference forward pass.

    Before training, the reference log-prob of every train and validation example is computed once (no gradients,
    eval mode, the run's precision) or read back from disk, then put into each batch: ``batch["ref_logps"]`` ((2B,)
    chosen rows then rejected rows for pairs, (B,) for KTO) and ``batch["ref_kl_logps"]`` ((B,), KTO's KL rows).

    The file is ``<dirpath>/<key>.safetensors``, where the key hashes the reference weights (file names, sizes and
    times of ``model.policy.name_or_path``), the data fingerprint, the tokenization settings and token ids,
    ``average_log_prob``, the precision and the device type (see :mod:`sacpo_lightning.refcache`). A later fit on the
    same data and reference reuses it; a file that is unreadable or records anything else is rebuilt. Under several
    processes each computes a shard, the shards are summed, and rank 0 writes the file.

    Needs a :class:`~sacpo_lightning.data.PreferenceDataModule` and a step module of
    :mod:`sacpo_lightning.modules`; with a reward or cost model (which has no reference) it says in one line that it is
    off, with anything else it warns and does nothing.

    Args:
        dirpath: Folder of the cache files; defaults to ``<trainer.default_root_dir>/ref_cache``.
        batch_size: Examples per reference forward pass while building; defaults to the data's ``eval_batch_size``
            (or ``batch_size``).
    """

    def __init__(self, dirpath: str | None = None, batch_size: int | None = None) -> None:
        if batch_size is not None and batch_size < 1:
            raise UserError(f"ReferenceCache batch_size must be >= 1, got {batch_size}")
        self.dirpath = dirpath
        self.batch_size = batch_size
        self.path: str | None = None
        self._columns: dict[str, dict[str, Tensor]] = {}
        self._kind: str | None = None
        self._disabled = False

    # ------------------------------------------------------------------------------------------------ helpers
    def resolve_dirpath(self, trainer: L.Trainer) -> str:
        dirpath = self.dirpath or os.path.join(trainer.default_root_dir, "ref_cache")
        return os.path.expanduser(os.path.expandvars(dirpath))

    def _usable(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        dm = getattr(trainer, "datamodule", None)
        ok = all(hasattr(pl_module, a) for a in ("reference_logps", "policy_settings", "average_log_prob", "data_kind"))
        ok = ok and dm is not None and all(hasattr(dm, a) for a in ("fingerprint", "train_dataset", "val_dataset"))
        if not ok and not self._disabled:
            if isinstance(pl_module, ScoreModelModule):
                # a reward or cost model trains without a reference policy: nothing to cache, nothing to warn about
                rank_zero_info(f"Reference cache: off ({type(pl_module).__name__} has no reference policy).")
            else:
                rank_zero_warn(f"ReferenceCache needs a sacpo_lightning step module and PreferenceDataModule, got "
                               f"{type(pl_module).__name__} and {type(dm).__name__}; it is off.")
            self._disabled = True
        return ok

    @staticmethod
    def _splits(trainer: L.Trainer) -> dict[str, list[dict[str, Any]]]:
        dm = trainer.datamodule
        splits = {"train": dm.train_dataset.examples}
        if dm.val_dataset is not None and len(dm.val_dataset):
            splits["val"] = dm.val_dataset.examples
        return splits

    def metadata(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """What the cached values depend on; its hash is the file name."""
        dm = trainer.datamodule
        splits = self._splits(trainer)
        components = {
            "kind": pl_module.data_kind,
            "reference": model_fingerprint(pl_module.policy_settings),
            "data": dm.fingerprint(),
            "tokenize": asdict(dm.tokenize_config) if hasattr(dm, "tokenize_config") else None,
            "examples": {split: examples_fingerprint(ex) for split, ex in splits.items()},
            "average_log_prob": bool(pl_module.average_log_prob),
            "precision": str(trainer.precision),
            "device": pl_module.device.type,
        }
        return {"key": cache_key(components), **components}

    def _collate(self, trainer: L.Trainer, kind: str):
        dm = trainer.datamodule
        multiple = dm.hparams.get("pad_to_multiple_of")
        if kind == "kto":
            return functools.partial(collate_kto, pad_token_id=dm.pad_token_id, max_length=dm.hparams.get("max_length"),
                                     pad_to_multiple_of=multiple)
        return functools.partial(collate_pairs, pad_token_id=dm.pad_token_id, pad_to_multiple_of=multiple)

    def _build(self, trainer: L.Trainer, pl_module: L.LightningModule, splits, kind: str) -> dict:
        dm = trainer.datamodule
        batch_size = self.batch_size or dm.hparams.get("eval_batch_size") or dm.hparams.get("batch_size") or 8
        collate = self._collate(trainer, kind)
        rank, world = trainer.global_rank, trainer.world_size
        was_training = pl_module.training
        pl_module.eval()
        out: dict[str, dict[str, Tensor]] = {}
        try:
            with trainer.precision_plugin.forward_context():
                for split, examples in splits.items():
                    n = len(examples)
                    shard = list(range(rank, n, world))
                    # Equal shard lengths keep sharded strategies' collective forward passes in step.
                    per_rank = -(-n // world)
                    shard += shard[-1:] * (per_rank - len(shard)) if shard else [0] * per_rank
                    values, computed = compute_reference_logps(
                        pl_module.reference_logps, examples, collate, kind,
                        batch_size=batch_size, device=pl_module.device, indices=shard,
                        desc=f"reference cache ({split})",
                    )
                    if world > 1:
                        computed = trainer.strategy.reduce(computed.to(pl_module.device), reduce_op="sum").cpu()
                        values = {c: trainer.strategy.reduce(v.to(pl_module.device), reduce_op="sum").cpu() / computed
                                  for c, v in values.items()}
                    out[split] = values
        finally:
            pl_module.train(was_training)
        return out

    # ------------------------------------------------------------------------------------------------ hooks
    def _ensure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._columns or not self._usable(trainer, pl_module):
            return
        kind = pl_module.data_kind
        splits = self._splits(trainer)
        metadata = self.metadata(trainer, pl_module)
        path = os.path.join(self.resolve_dirpath(trainer), f"{metadata['key']}.safetensors")
        counts = {split: len(ex) for split, ex in splits.items()}
        loaded, reason = None, ""
        if trainer.is_global_zero:
            loaded, reason = load_reference_cache(path, metadata, counts, kind)
        loaded = trainer.strategy.broadcast(loaded, src=0)
        if loaded is None:
            if trainer.is_global_zero and reason != "no cache file":
                rank_zero_info(f"Reference cache {path} is {reason}; rebuilding it.")
            start = time.perf_counter()
            loaded = self._build(trainer, pl_module, splits, kind)
            if trainer.is_global_zero:
                save_reference_cache(path, loaded, metadata)
            trainer.strategy.barrier("sacpo_ref_cache")
            rank_zero_info(
                f"Reference cache: computed {', '.join(f'{n} {s}' for s, n in counts.items())} examples in "
                f"{time.perf_counter() - start:.1f}s -> {path}"
            )
        else:
            rank_zero_info(f"Reference cache: loaded {path}")
        self.path = path
        self._kind = kind
        self._columns = {s: {c: t.to(pl_module.device) for c, t in cols.items()} for s, cols in loaded.items()}

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ensure(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ensure(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._columns = {}

    def _inject(self, batch: Any, split: str) -> None:
        columns = self._columns.get(split)
        if columns is None or not isinstance(batch, dict) or "index" not in batch:
            return
        batch.update(batch_reference_logps(batch, columns, self._kind))

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._inject(batch, "train")

    @override
    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._inject(batch, "val")
