"""Reward (helpfulness) and cost (harmfulness) score models as Lightning modules: training and export.

:class:`RewardModelModule` and :class:`CostModelModule` train a one-output sequence classifier from a causal LM folder
(the tiny model, SmolLM2, ...) on preference pairs, so that evaluation needs no external service. The reward model is
fitted with the Bradley-Terry loss on helpfulness pairs; the cost model as Safe RLHF's cost model (Dai et al., 2024):
a Bradley-Terry term that ranks the unsafe response above the safe one, plus a classification term that pushes the
cost of unsafe responses above zero and of safe ones below zero, so ``cost > 0`` reads as "unsafe". Their exports load
with :class:`sacpo_lightning.evaluation.score_models.ScoreModel`.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from sacpo_lightning.errors import UserError
from sacpo_lightning.io import atomic_directory, atomic_write_json
from sacpo_lightning.losses import bradley_terry_loss, cost_sign_loss
from sacpo_lightning.models.classifier import ADAPTER_DIR, SCORE_MODEL_FILE
from sacpo_lightning.models.policy import PolicySettings, build_policy, load_score_backbone
from sacpo_lightning.modules.base import TrainableModuleMixin
from sacpo_lightning.optim import OptimSettings
from sacpo_lightning.precision import DTYPES

__all__ = ["CostModelModule", "RewardModelModule", "ScoreModelModule"]


class ScoreModelModule(TrainableModuleMixin, L.LightningModule):
    """Base of the score-model modules: a one-output sequence classifier on a causal LM backbone.

    Subclasses set ``kind`` and ``metric_names`` and implement :meth:`compute_loss`; the optimizer, the training and
    validation steps and the checkpoint hooks are those of every trainable module (:class:`TrainableModuleMixin`,
    shared with the alignment steps), with the classifier in ``self.model``. Batches are preference pairs
    (:class:`sacpo_lightning.data.PreferenceDataModule`, ``kind: pairs``): rows ``0..B-1`` prompt + chosen, rows
    ``B..2B-1`` prompt + rejected, scored in one forward pass.

    Args:
        policy: The backbone (a causal LM folder or named model) and how to fine-tune it: ``full`` or ``lora`` (LoRA
            with ``task_type=SEQ_CLS``: the new score head is trained in full), or ``qlora``. The field is named
            ``policy`` so that the CLI takes the data tokenizer from ``policy.name_or_path``.
        optim: Optimizer and schedule.
        score_regularization: Weight of ``mean(score ** 2)``, which keeps scores near zero (Safe RLHF uses 0.001).
    """

    kind: ClassVar[str] = "score"
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "accuracy")
    network_attr: ClassVar[str] = "model"

    def __init__(
        self,
        policy: PolicySettings | None = None,
        optim: OptimSettings | None = None,
        score_regularization: float = 0.0,
    ) -> None:
        super().__init__()
        if not (math.isfinite(score_regularization) and score_regularization >= 0):
            raise UserError(f"--model.score_regularization must be >= 0, got {score_regularization}")
        self.score_regularization = score_regularization
        self.save_hyperparameters(ignore=["policy", "optim"])
        self.init_training_settings(policy, optim)
        self.model: torch.nn.Module | None = None
        self._tokenizer = None

    # ----------------------------------------------------------------------------------------------- model setup
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from sacpo_lightning.models import load_tokenizer

            s = self.policy_settings
            self._tokenizer = load_tokenizer(s.name_or_path, trust_remote_code=s.trust_remote_code,
                                             revision=s.revision, gguf_file=s.gguf_file)
        return self._tokenizer

    def configure_model(self) -> None:
        """Builds the classifier (and quantizes it / injects LoRA) once the device is known; idempotent."""
        if self.model is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        self.model = build_policy(self.policy_settings, device=device, task="seq_cls", num_labels=1,
                                  pad_token_id=self.tokenizer.pad_token_id).train()

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        kind = getattr(getattr(datamodule, "hparams", {}), "get", lambda *_: None)("kind")
        if kind is not None and kind != "pairs":
            raise UserError(f"{type(self).__name__} trains on preference pairs but --data.kind is {kind!r}; "
                            "set data.kind: pairs.")

    # ------------------------------------------------------------------------------------------------- scoring
    def scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(N,) float32 scores of right-padded rows (the model pools at the last non-padding token)."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[:, 0].float()

    def pair_scores(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(B,) chosen and (B,) rejected scores of a pair batch, from one forward pass over its 2B rows."""
        scores = self.scores(batch["input_ids"], batch["attention_mask"])
        b = scores.shape[0] // 2
        return scores[:b], scores[b:]

    def regularization(self, *scores: Tensor) -> Tensor:
        return self.score_regularization * torch.cat(scores).pow(2).mean()

    # ---------------------------------------------------------------------------------------------------- steps
    def on_validation_epoch_end(self) -> None:
        values = self.collect_validation_metrics()
        if values:
            self.log_dict(values, prog_bar="val/accuracy" in values)

    @torch.no_grad()
    def evaluate_pairs(self, batches) -> dict[str, float]:
        """Pair-weighted means of the loss and metrics over ``batches`` (e.g. a validation dataloader)."""
        was_training = self.model.training
        self.model.eval()
        totals: dict[str, float] = {}
        count = 0
        try:
            for batch in batches:
                batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                loss, metrics = self.compute_loss(batch)
                size = self.batch_size_of(batch)
                for name, value in {"loss": loss, **metrics}.items():
                    totals[name] = totals.get(name, 0.0) + float(value) * size
                count += size
        finally:
            self.model.train(was_training)
        if not count:
            return {}
        return {**{name: total / count for name, total in totals.items()}, "pairs": count}

    # ------------------------------------------------------------------------------------------------- export
    def _data_settings(self) -> dict[str, Any]:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        hp = getattr(datamodule, "hparams", None) or {}
        return {k: hp[k] for k in ("template", "max_length", "max_prompt_length", "source", "objective") if k in hp}

    def heldout_metrics(self) -> dict[str, float]:
        """Metrics of the current weights on the data module's validation pairs (empty without them)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or getattr(datamodule, "val_dataset", None) is None:
            return {}
        loader = datamodule.val_dataloader()
        return self.evaluate_pairs(loader) if loader else {}

    def score_metadata(self) -> dict[str, Any]:
        """What ``score_model.json`` records besides the data settings and held-out metrics."""
        return {"kind": self.kind, "base": self.policy_settings.name_or_path,
                "finetune": self.policy_settings.finetune, "score_regularization": self.score_regularization,
                "optim": asdict(self.optim_settings)}

    @torch.no_grad()
    def export_pretrained(self, output_dir: str, *, dtype: str | None = None, extra: dict | None = None) -> Path:
        """Writes a self-contained sequence-classification folder, atomically.

        Merged weights (safetensors; LoRA adapters are merged into a freshly loaded, unquantized backbone, and the
        adapter is kept under ``adapter/``), the tokenizer, and ``score_model.json`` with the kind (``reward`` or
        ``cost``), the data template and lengths (so :meth:`ScoreModel.from_pretrained` tokenizes as in training),
        and the held-out pair accuracy of the final weights.
        """
        settings = self.policy_settings
        dtype = dtype or settings.dtype
        heldout = self.heldout_metrics()
        with atomic_directory(output_dir) as tmp:
            if settings.uses_adapter:
                from peft import PeftModel

                adapter_dir = tmp / ADAPTER_DIR
                self.model.save_pretrained(adapter_dir, safe_serialization=True)
                # the adapter's trained head replaces the new one at once: no "new score head" line here
                base = load_score_backbone(settings, dtype=dtype, num_labels=1,
                                           pad_token_id=self.tokenizer.pad_token_id, device_map="cpu",
                                           say_new_head=False)
                merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
            else:
                merged = self.model
            if hasattr(merged.config, "quantization_config"):
                del merged.config.quantization_config
            merged.config.use_cache = True
            merged.config.pad_token_id = self.tokenizer.pad_token_id
            merged.config.dtype = dtype
            state = {k: v.detach().to("cpu", DTYPES[dtype]) for k, v in merged.state_dict().items()}
            merged.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            meta = {**self.score_metadata(), **self._data_settings(),
                    "heldout": heldout, "heldout_accuracy": heldout.get("accuracy"), **(extra or {})}
            atomic_write_json(tmp / SCORE_MODEL_FILE, meta)
        rank_zero_info(f"Exported {self.kind} model to {output_dir} (held-out accuracy {heldout.get('accuracy')})")
        return Path(output_dir)


class RewardModelModule(ScoreModelModule):
    """Reward (helpfulness) model: Bradley-Terry on pairs, ``-log sigmoid(r(x, y_chosen) - r(x, y_rejected))``.

    Logs ``train/loss``, ``train/accuracy`` (chosen scored higher), ``train/margin``, ``val/loss``, ``val/accuracy``.
    """

    kind: ClassVar[str] = "reward"
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "accuracy", "margin")

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        chosen, rejected = self.pair_scores(batch)
        loss = bradley_terry_loss(chosen, rejected).mean() + self.regularization(chosen, rejected)
        margin = (chosen - rejected).detach()
        return loss, {"accuracy": (margin > 0).float().mean(), "margin": margin.mean(),
                      "chosen_score": chosen.detach().mean(), "rejected_score": rejected.detach().mean()}


class CostModelModule(ScoreModelModule):
    """Cost (harmfulness) model as in Safe RLHF: the unsafe response gets the higher cost, and ``sign(cost)`` says
    unsafe (+) or safe (-).

    Loss per pair (Dai et al., 2024, cost-model objective), with ``c_s`` the cost of the safer (chosen) and ``c_u``
    of the less safe (rejected) response::

        -log sigmoid(c_u - c_s) + w * (-log sigmoid(s_u * c_u) - log sigmoid(s_s * c_s))

    where the sign ``s`` is +1 for an unsafe and -1 for a safe response. Pair batches carry only chosen/rejected, so
    the per-response safety labels come from ``assume_chosen_safe``: for PKU-SafeRLHF safety pairs in which exactly one
    response is safe (the shared data; ``data.filter: safety_differs`` keeps only such rows elsewhere), the chosen
    (safer) response is the safe one and the rejected response the unsafe one. Batches that hold ``chosen_safe`` and
    ``rejected_safe`` (B,) bool tensors use those instead. Without either, only the Bradley-Terry term is used.

    Args:
        assume_chosen_safe: Label chosen responses safe and rejected ones unsafe for the classification term.
        classification_weight: ``w`` above (0 disables the classification term).
        policy, optim, score_regularization: See :class:`ScoreModelModule`.

    Logs ``train/loss``, ``train/accuracy`` (unsafe costs more), ``train/sign_accuracy`` (sign of the cost matches the
    label), and the same under ``val/``.
    """

    kind: ClassVar[str] = "cost"
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "accuracy", "sign_accuracy", "margin")

    def __init__(
        self,
        policy: PolicySettings | None = None,
        optim: OptimSettings | None = None,
        score_regularization: float = 0.0,
        assume_chosen_safe: bool = True,
        classification_weight: float = 1.0,
    ) -> None:
        super().__init__(policy=policy, optim=optim, score_regularization=score_regularization)
        if not (math.isfinite(classification_weight) and classification_weight >= 0):
            raise UserError(f"--model.classification_weight must be >= 0, got {classification_weight}")
        self.assume_chosen_safe = assume_chosen_safe
        self.classification_weight = classification_weight

    def _safety_labels(self, batch: dict[str, Tensor], b: int) -> tuple[Tensor, Tensor] | None:
        if "chosen_safe" in batch and "rejected_safe" in batch:
            return batch["chosen_safe"].bool(), batch["rejected_safe"].bool()
        if self.assume_chosen_safe:
            device = batch["input_ids"].device
            return torch.ones(b, dtype=torch.bool, device=device), torch.zeros(b, dtype=torch.bool, device=device)
        return None

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        safer, less_safe = self.pair_scores(batch)
        loss = bradley_terry_loss(less_safe, safer).mean() + self.regularization(safer, less_safe)
        margin = (less_safe - safer).detach()
        metrics = {"accuracy": (margin > 0).float().mean(), "margin": margin.mean(),
                   "safer_cost": safer.detach().mean(), "less_safe_cost": less_safe.detach().mean()}
        labels = self._safety_labels(batch, safer.shape[0])
        if labels is not None:
            safe_c, safe_r = labels
            costs = torch.cat([safer, less_safe])
            unsafe = torch.cat([~safe_c, ~safe_r])
            if self.classification_weight > 0:
                loss = loss + self.classification_weight * 2 * cost_sign_loss(costs, unsafe).mean()
            metrics["sign_accuracy"] = ((costs.detach() > 0) == unsafe).float().mean()
        return loss, metrics

    def score_metadata(self) -> dict[str, Any]:
        return {**super().score_metadata(), "assume_chosen_safe": self.assume_chosen_safe,
                "classification_weight": self.classification_weight}
