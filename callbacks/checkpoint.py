"""Checkpoints that never appear half-written, in a folder checked for writability before training starts."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from weakref import proxy

import lightning as L
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from sacpo_lightning.errors import NotWritableError

TMP_MARK = ".tmp-"


class AtomicModelCheckpoint(ModelCheckpoint):
    """A :class:`~lightning.pytorch.callbacks.ModelCheckpoint` whose files appear under their final name only when
    complete; it takes the same options.

    Lightning writes a local checkpoint to a file in the system temporary folder and then moves it into place: a
    rename when that folder is on the checkpoints' filesystem, but a copy, which a crash can leave half-done under the
    final name, when it is not. Here each checkpoint is written to a hidden sibling (``.last.ckpt.tmp-<id>``), flushed
    to disk, and renamed over the final name, so ``--ckpt_path last`` only ever finds complete checkpoints (a hidden
    name with that suffix is never taken for a checkpoint). Leftovers of a killed run are removed at the next start,
    and a checkpoint folder that cannot be written is reported before training starts. Remote folders (``s3://``...)
    keep Lightning's own writes.
    """

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or not trainer.is_global_zero or not self.dirpath or not self._is_local():
            return
        dirpath = os.fspath(self.dirpath)
        try:
            os.makedirs(dirpath, exist_ok=True)
        except OSError as err:
            raise NotWritableError(
                f"Checkpoint folder {dirpath} cannot be created ({err}); set --checkpoint.dirpath or "
                "--trainer.default_root_dir to a writable location."
            ) from err
        if not os.access(dirpath, os.W_OK | os.X_OK):
            raise NotWritableError(
                f"Checkpoint folder {dirpath} is not writable; set --checkpoint.dirpath or --trainer.default_root_dir "
                "to a writable location."
            )
        for name in os.listdir(dirpath):
            if name.startswith(".") and TMP_MARK in name:
                _remove(os.path.join(dirpath, name))

    def _is_local(self) -> bool:
        return self.dirpath is not None and _is_local_file_protocol(os.fspath(self.dirpath))

    @override
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if not _is_local_file_protocol(filepath):
            super()._save_checkpoint(trainer, filepath)
            return
        directory, name = os.path.split(filepath)
        # sharded strategies write the same path on every process, so the name comes from rank 0
        tmp = trainer.strategy.broadcast(os.path.join(directory, f".{name}{TMP_MARK}{uuid.uuid4().hex[:12]}"))
        trainer.save_checkpoint(tmp, self.save_weights_only)  # every process; ends with a barrier
        if trainer.is_global_zero:
            _replace(tmp, filepath)
        trainer.strategy.barrier("AtomicModelCheckpoint")
        # what ModelCheckpoint._save_checkpoint records after a save
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


def _replace(tmp: str, target: str) -> None:
    """Moves the finished ``tmp`` (a file, or a folder for sharded checkpoints) to ``target`` in one rename."""
    if os.path.isfile(tmp):
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    old = None
    if os.path.isdir(target) and not os.path.islink(target):
        # a folder cannot be renamed over a non-empty one: move the old one aside first
        old = f"{os.path.join(os.path.dirname(target), '.' + os.path.basename(target))}{TMP_MARK}old-{os.getpid()}"
        _remove(old)
        os.replace(target, old)
    os.replace(tmp, target)
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(target) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if old is not None:
        _remove(old)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
