"""P-SACPO merges of the reference (step-1) model and the just-trained policy when a fit finishes."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from sacpo_lightning.errors import UserError
from sacpo_lightning.merge_kl import KL_MAX_LENGTH
from sacpo_lightning.merge_report import REPORT_FILE, format_report, merge_with_report, read_kl_prompts
from sacpo_lightning.merging import MERGE_NAME_FORMAT

POLICY_EXPORT_DIR = "policy"


class MergeOnFitEnd(Callback):
    """Writes linear merges ``(1 - q) * base + q * policy`` of the base model and the trained policy after a fit.

    For SACPO's step 2 the base defaults to the module's reference (``policy.name_or_path``, the step-1 export), and
    the merge at weight ``q`` approximates the optimum for safety weight ``q * lam`` (P-SACPO), so one step-2 run
    yields a whole range of trade-offs. Each merge is a Hugging Face folder ``<dirpath>/merge_q{q:.2f}``; a
    ``merge_report.json`` beside them lists each ``q`` with its folder, ``lam_effective = q * lam`` (when the module
    has ``lam``) and, with ``kl_prompts``, the mean per-token KL between the token-level geometric mixture and the
    merge. (The sequence-level mixture ``pi_base(y) ** (1 - q) * pi_policy(y) ** q`` is the optimum for ``q * lam``;
    the token-level mixture approximates it and the weight merge approximates that in turn, see
    :mod:`sacpo_lightning.merging`.)

    The trained policy is exported to ``<dirpath>/policy`` first (with the module's ``export_pretrained``, whatever
    other callbacks export), and the merges are written by :func:`sacpo_lightning.merge_report.merge_with_report`. This
    happens in :meth:`teardown`, after every callback's ``on_fit_end``. Nothing is written when the fit fails or is
    interrupted. Only rank 0 writes; the other ranks wait for it.

    Args:
        weights: Merge weights ``q``, each in ``[0, 1]`` (``0`` is the base, ``1`` the trained policy).
        base: The ``q = 0`` model folder; defaults to the module's ``policy.name_or_path`` (its reference).
        dirpath: Folder for the merges and the report; defaults to ``<trainer.default_root_dir>/merges``.
        kl_prompts: Prompt file (``.json`` list or ``.jsonl`` of ``{"prompt": ...}``, or plain text lines) on which to
            measure ``KL(token-level mixture || merge)``; the prompts are rendered with the tokenizer's chat template
            and cut to 512 tokens. The three models (base, policy, merge) are loaded in float32 on the training device
            for this.
        kl_max_prompts: Use the first this many prompts.
    """

    def __init__(
        self,
        weights: Sequence[float] = (0.5,),
        base: str | None = None,
        dirpath: str | None = None,
        kl_prompts: str | None = None,
        kl_max_prompts: int = 16,
    ) -> None:
        self.weights = _check_weights(weights)
        if kl_max_prompts < 1:
            raise UserError(
                f"MergeOnFitEnd kl_max_prompts (--merge.kl_max_prompts) must be >= 1, got {kl_max_prompts}"
            )
        self.base = base
        self.dirpath = dirpath
        self.kl_prompts = kl_prompts
        self.kl_max_prompts = kl_max_prompts
        self.merges: list[dict[str, Any]] = []
        self._fit_completed = False

    def resolve_dirpath(self, trainer: L.Trainer) -> str:
        return os.path.expanduser(os.path.expandvars(self.dirpath or os.path.join(trainer.default_root_dir, "merges")))

    def resolve_base(self, pl_module: L.LightningModule) -> str:
        """The ``q = 0`` folder: ``base``, or the module's reference model."""
        from sacpo_lightning.models.registry import resolve_model_path

        if self.base is not None:
            return resolve_model_path(self.base)
        settings = getattr(pl_module, "policy_settings", None)
        if settings is None:
            raise UserError(
                f"{type(pl_module).__name__} has no policy_settings to take the base model from; set MergeOnFitEnd "
                "base (--merge.base) to the step-1 model folder."
            )
        if settings.gguf_file is not None:
            raise UserError(
                f"The reference {settings.name_or_path!r} is a GGUF file, which cannot be merged in weight space; set "
                "MergeOnFitEnd base (--merge.base) to a Hugging Face folder of the same model."
            )
        return resolve_model_path(settings.name_or_path)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._fit_completed = False
        # Bad settings should stop the run before training, not after it.
        if self.base is None:
            self.resolve_base(pl_module)
        if self.kl_prompts is not None:
            read_kl_prompts(self.kl_prompts, self.kl_max_prompts)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The merges wait for teardown (after every callback's on_fit_end); this hook only notes that the fit completed.
        self._fit_completed = not trainer.interrupted

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self._fit_completed:
            return
        self._fit_completed = False
        failure: BaseException | None = None
        merges: list[dict[str, Any]] = []
        if trainer.is_global_zero:
            try:
                merges = self._write_merges(trainer, pl_module)
            except Exception as err:  # re-raised below, once the other ranks know
                failure = err
        # The broadcast doubles as the barrier, and lets every rank fail together instead of waiting forever.
        message, merges = trainer.strategy.broadcast((None if failure is None else str(failure), merges), src=0)
        if failure is not None:
            raise failure
        if message is not None:
            raise RuntimeError(f"MergeOnFitEnd failed on rank 0: {message}")
        self.merges = merges

    def _policy_folder(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
        """The trained policy as a Hugging Face folder: a fresh export to ``<dirpath>/policy``."""
        if not hasattr(pl_module, "export_pretrained"):
            rank_zero_warn(f"MergeOnFitEnd: {type(pl_module).__name__} has no export_pretrained; no merges written.")
            return None
        path = os.path.join(self.resolve_dirpath(trainer), POLICY_EXPORT_DIR)
        pl_module.export_pretrained(path)
        return path

    def _write_merges(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        other = self._policy_folder(trainer, pl_module)
        if other is None:
            return []
        base = self.resolve_base(pl_module)
        dirpath = self.resolve_dirpath(trainer)
        prompts = None if self.kl_prompts is None else read_kl_prompts(self.kl_prompts, self.kl_max_prompts)
        lam = getattr(pl_module, "lam", None)
        report = merge_with_report(
            base,
            other,
            self.weights,
            output_root=dirpath,
            prompts=prompts,
            max_length=KL_MAX_LENGTH,
            device=trainer.strategy.root_device,
            lam=lam,
            report_file=os.path.join(dirpath, REPORT_FILE),
            extra={
                "lam": None if lam is None else float(lam),
                "beta": getattr(pl_module, "beta", None),
                "step_kind": getattr(pl_module, "step_kind", None),
                "global_step": trainer.global_step,
                "kl_prompts": None if self.kl_prompts is None else os.path.abspath(self.kl_prompts),
            },
        )
        rank_zero_info(f"MergeOnFitEnd wrote {len(report['merges'])} merge(s) of {base} and {other}:\n"
                       + format_report(report))
        return report["merges"]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"merges": self.merges}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.merges = list(state_dict.get("merges", []))


def _check_weights(weights: Sequence[float]) -> list[float]:
    option = "MergeOnFitEnd weights (--merge.weights)"
    if isinstance(weights, int | float):
        weights = [weights]
    weights = list(weights)
    if not weights:
        raise UserError(f"{option} must list at least one weight in [0, 1].")
    for q in weights:
        if not (isinstance(q, int | float) and math.isfinite(q) and 0.0 <= q <= 1.0):
            raise UserError(f"{option} must each be in [0, 1], got {q!r}")
    names: dict[str, float] = {}
    for q in weights:
        name = MERGE_NAME_FORMAT.format(q=q)
        if name in names:
            raise UserError(f"{option} {names[name]} and {q} both give the folder {name}; use distinct weights.")
        names[name] = q
    return [float(q) for q in weights]
