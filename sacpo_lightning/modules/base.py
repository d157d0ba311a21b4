"""The shared base of every alignment step: policy, reference, log-probs, logging, optimisation and export."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import grad_norm, rank_zero_info
from torch import Tensor
from torchmetrics import MeanMetric

from sacpo_lightning.checks import check_positive
from sacpo_lightning.errors import UserError
from sacpo_lightning.logprobs import model_sequence_logps, pair_sequence_logps
from sacpo_lightning.models.chain import reference_adapters
from sacpo_lightning.models.policy import PolicySettings, build_policy, frozen_copy
from sacpo_lightning.optim import OptimSettings, configure_optimization

DataKind = Literal["pairs", "kto"]


REWARD_KINDS = ("reward_dpo", "reward_kto")
SAFETY_KINDS = ("safety_dpo", "safety_kto")
RewardReference = Literal["sft", "safety_step", "any"]
SafetyReference = Literal["reward_step", "sft", "any"]


def check_reference(
    name_or_path: str, expected: str, beta: float, *, allowed: tuple[str, ...], upstream_kinds: tuple[str, ...]
) -> str:
    """Checks the model a step starts from (its reference) against what the step expects; returns a description.

    ``expected`` is ``sft`` (not an export of an alignment step), a ``*_step`` value (an export of a step whose kind is
    in ``upstream_kinds``, trained with the same ``beta``: SACPO's theorem composes steps only with one beta), or
    ``any`` (unchecked).

    Raises:
        ValueError: Naming ``--model.policy.name_or_path`` and ``--model.expected_reference`` and how to fix it.
    """
    from sacpo_lightning.models.export import read_step_metadata

    if expected not in allowed:
        raise UserError(f"--model.expected_reference must be one of {', '.join(allowed)}, got {expected!r}")
    if expected == "any":
        return "reference unchecked (--model.expected_reference any)"
    local = os.path.expanduser(os.path.expandvars(name_or_path))
    meta = read_step_metadata(local) if os.path.isdir(local) else None
    kind = (meta or {}).get("kind")
    fix = ("Point --model.policy.name_or_path at the right model, or set --model.expected_reference "
           f"({', '.join(a for a in allowed if a != expected)}) if this is intended.")
    if expected == "sft":
        if kind in REWARD_KINDS + SAFETY_KINDS:
            raise UserError(f"--model.policy.name_or_path = {name_or_path!r} is the export of a {kind} step, but "
                            f"--model.expected_reference is 'sft' (a model not aligned by this library). {fix}")
        return f"reference {name_or_path} (SFT)"
    if kind not in upstream_kinds:
        what = f"the export of a {kind} step" if kind else "not the export of an alignment step (no sacpo_step.json)"
        raise UserError(f"--model.policy.name_or_path = {name_or_path!r} is {what}, but --model.expected_reference "
                        f"is {expected!r}: this step's reference must be the export of a {' or '.join(upstream_kinds)}"
                        f" step. {fix}")
    upstream_beta = meta.get("beta")
    if upstream_beta is None or not math.isclose(float(upstream_beta), beta, rel_tol=1e-9):
        raise UserError(f"--model.beta = {beta:g} differs from the beta {upstream_beta} of the {kind} step exported "
                        f"at {name_or_path!r}; SACPO's steps compose only with one beta. Use --model.beta "
                        f"{upstream_beta}, or set --model.expected_reference any to skip this check.")
    return f"reference {name_or_path} ({kind}, beta {upstream_beta})"


class RewardCoefficients:
    """Step-1 coefficients: KL coefficient ``beta`` to the reference (the SFT model; in the swapped order, the safety
    step's export, which ``expected_reference: safety_step`` checks)."""

    beta: float
    expected_reference: str

    def _set_coefficients(self, beta: float, expected_reference: str = "sft") -> None:
        check_positive("--model.beta", beta)
        self.beta = beta
        self.expected_reference = expected_reference

    def check_reference(self, name_or_path: str) -> str:
        return check_reference(name_or_path, self.expected_reference, self.beta,
                               allowed=("sft", "safety_step", "any"), upstream_kinds=SAFETY_KINDS)

    @property
    def kl_coef(self) -> float:
        return self.beta

    def coefficients(self) -> dict[str, float]:
        return {"beta": self.beta, "kl_coef": self.kl_coef}


class SafetyCoefficients:
    """Step-2 coefficients: ``beta`` and the multiplier ``lam``, with KL coefficient ``beta / lam`` to the reference
    (the step-1 model). By SACPO's theorem the result is the optimum of reward + ``lam`` * safety with KL coefficient
    ``beta`` to the SFT model."""

    beta: float
    lam: float
    expected_reference: str

    def _set_coefficients(self, beta: float, lam: float, expected_reference: str = "reward_step") -> None:
        check_positive("--model.beta", beta)
        check_positive("--model.lam", lam)
        self.beta, self.lam = beta, lam
        self.expected_reference = expected_reference

    def check_reference(self, name_or_path: str) -> str:
        return check_reference(name_or_path, self.expected_reference, self.beta,
                               allowed=("reward_step", "sft", "any"), upstream_kinds=REWARD_KINDS)

    @property
    def kl_coef(self) -> float:
        return self.beta / self.lam

    def coefficients(self) -> dict[str, float]:
        return {"beta": self.beta, "lam": self.lam, "kl_coef": self.kl_coef}


class TrainableModuleMixin:
    """What every trainable module of this library shares (the alignment steps and the score models), one level deep.

    Mixed in before ``L.LightningModule``. The host sets ``network_attr`` (the attribute holding the trained network),
    ``metric_names``, ``frozen_prefixes`` (state-dict prefixes of frozen copies never checkpointed, e.g. the full
    fine-tuning reference) and ``progress_metric`` (a training metric also shown as ``train/acc``), and implements
    ``compute_loss``. It provides: the settings and hyper-parameters, the optimizer, training and validation steps
    with the aggregation of validation metrics, and checkpoints that hold only the trainable weights of adapter runs
    plus the random number generator states of every process.
    """

    network_attr: ClassVar[str] = "policy"
    metric_names: ClassVar[tuple[str, ...]] = ("loss",)
    frozen_prefixes: ClassVar[tuple[str, ...]] = ()
    progress_metric: ClassVar[str | None] = None

    def init_training_settings(self, policy: PolicySettings | None, optim: OptimSettings | None) -> None:
        """Stores the settings (as plain dicts in ``hparams``) and the validation metrics; call after
        ``save_hyperparameters(ignore=["policy", "optim"])``."""
        self.policy_settings = policy if policy is not None else PolicySettings()
        self.optim_settings = optim if optim is not None else OptimSettings()
        self.hparams["policy"] = asdict(self.policy_settings)
        self.hparams["optim"] = asdict(self.optim_settings)
        self.val_metrics = torch.nn.ModuleDict({name.replace("/", "_"): MeanMetric() for name in self.metric_names})

    def trained_network(self) -> torch.nn.Module:
        return getattr(self, self.network_attr)

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns the scalar loss and a dict of detached scalar metrics (names from ``metric_names``)."""
        raise NotImplementedError

    @staticmethod
    def batch_size_of(batch: dict[str, Tensor]) -> int:
        return int(batch["index"].shape[0])

    # ----------------------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, metrics = self.compute_loss(batch)
        size = self.batch_size_of(batch)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        if self.progress_metric is not None and self.progress_metric in metrics:
            self.log("train/acc", metrics[self.progress_metric], prog_bar=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, metrics = self.compute_loss(batch)
        size = self.batch_size_of(batch)
        metrics = {"loss": loss.detach(), **metrics}
        for name in self.metric_names:
            if name in metrics:
                self.val_metrics[name.replace("/", "_")].update(metrics[name], weight=size)

    def collect_validation_metrics(self) -> dict[str, Tensor]:
        """``val/<name>`` means of the epoch's validation batches (batch-size weighted); resets the metrics."""
        values = {}
        for name in self.metric_names:
            metric = self.val_metrics[name.replace("/", "_")]
            if metric.update_count > 0:
                values[f"val/{name}"] = metric.compute()
            metric.reset()
        return values

    # ------------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        trainable = (p for p in self.trained_network().parameters() if p.requires_grad)
        return configure_optimization(trainable, self.optim_settings, self.trainer.estimated_stepping_batches)

    # ------------------------------------------------------------------------------------------- checkpoints
    def trainable_parameter_names(self) -> set[str]:
        network = self.trained_network()
        return {f"{self.network_attr}.{n}" for n, p in network.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adapter runs checkpoint only the trainable weights; the frozen base is reloaded from its source. Frozen
        copies (``frozen_prefixes``) are never checkpointed.

        Every checkpoint also holds the random number generator states (torch, CUDA, numpy, Python) of each process
        under ``rng_states``, so that a resumed run draws the same dropout masks as an uninterrupted one. Lightning
        calls this hook on every process of a distributed run, which lets the states be gathered here.
        """
        if self.policy_settings.uses_adapter:
            keep = self.trainable_parameter_names()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        else:
            state_dict = checkpoint["state_dict"]
            checkpoint["state_dict"] = {k: v for k, v in state_dict.items() if not k.startswith(self.frozen_prefixes)}
        import random

        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        # plain Python values and tensors only, so the checkpoint loads with torch.load(weights_only=True)
        state = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)),
            "python": random.getstate(),
        }
        states = [state]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Loads the trainable weights (see :meth:`on_save_checkpoint`) and restores this process's RNG states.

        Loading is strict only when the checkpoint holds every weight (full fine-tuning without frozen copies).
        """
        self.strict_loading = not (self.policy_settings.uses_adapter or self.frozen_prefixes)
        states = checkpoint.get("rng_states")
        if states:
            import random

            import numpy as np

            rank = self.global_rank if self._trainer is not None else 0
            state = states[rank] if rank < len(states) else states[0]
            torch.set_rng_state(state["torch"].cpu())
            if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
            kind, keys, pos, has_gauss, gauss = state["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
            version, internal, gauss_next = state["python"]
            random.setstate((version, tuple(internal), gauss_next))
        missing = self.trainable_parameter_names() - set(checkpoint["state_dict"])
        if missing:
            raise UserError(
                f"The checkpoint lacks {len(missing)} trainable weights of this policy (e.g. {sorted(missing)[0]}); "
                "it was written with other --model.policy settings."
            )


class AlignmentModule(TrainableModuleMixin, L.LightningModule):
    """Base of the step modules: subclasses set ``data_kind``, ``metric_names`` and implement :meth:`compute_loss`.

    The reference policy is the same network with its adapter disabled under LoRA/QLoRA, and a frozen copy under full
    fine-tuning. For SACPO's second step, ``policy.name_or_path`` is the step-1 export, so the reference is exactly the
    step-1 policy.

    Args:
        policy: What to load and how to train it (full, LoRA, QLoRA).
        optim: Optimizer and schedule.
        average_log_prob: Score sequences by their mean token log-prob instead of the sum (IPO uses the mean).
    """

    data_kind: ClassVar[DataKind] = "pairs"
    step_kind: ClassVar[str] = "base"
    metric_names: ClassVar[tuple[str, ...]] = ("loss",)
    network_attr: ClassVar[str] = "policy"
    frozen_prefixes: ClassVar[tuple[str, ...]] = ("ref_model.",)
    progress_metric: ClassVar[str | None] = "rewards/accuracy"

    def __init__(
        self,
        policy: PolicySettings | None = None,
        optim: OptimSettings | None = None,
        average_log_prob: bool = False,
    ) -> None:
        super().__init__()
        self.average_log_prob = average_log_prob
        self.save_hyperparameters(ignore=["policy", "optim"])
        self.init_training_settings(policy, optim)
        self.policy: torch.nn.Module | None = None
        self.ref_model: torch.nn.Module | None = None
        self._batch_start: float | None = None

    # ----------------------------------------------------------------------------------------------- model setup
    def configure_model(self) -> None:
        """Loads the policy (and quantizes it / injects LoRA) once the device is known; idempotent."""
        if self.policy is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        self.policy = build_policy(self.policy_settings, device=device)
        self.policy.train()
        if not self.policy_settings.uses_adapter:
            self.ref_model = frozen_copy(self.policy)

    def check_reference(self, name_or_path: str) -> str:
        """Checks the model this step starts from; the step mixins know what their reference must be."""
        return f"reference {name_or_path}"

    def setup(self, stage: str) -> None:
        rank_zero_info(self.check_reference(self.policy_settings.name_or_path))
        datamodule = getattr(self.trainer, "datamodule", None)
        kind = getattr(getattr(datamodule, "hparams", {}), "get", lambda *_: None)("kind")
        if kind is not None and kind != self.data_kind:
            raise UserError(
                f"{type(self).__name__} trains on {self.data_kind!r} data but --data.kind is {kind!r}; "
                f"set data.kind: {self.data_kind} in the data config."
            )

    # --------------------------------------------------------------------------------------------- log-probs
    def sequence_logps(
        self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
    ) -> Tensor:
        """(N,) summed (or, with ``average_log_prob``, averaged) log-probs of the labelled tokens of each row; see
        :func:`~sacpo_lightning.logprobs.model_sequence_logps`; pair batches hold each prompt once per pass
        (:func:`~sacpo_lightning.logprobs.pair_sequence_logps`) unless ``policy.share_prompt`` is off."""
        if self.data_kind == "pairs" and self.policy_settings.share_prompt:
            return pair_sequence_logps(model, input_ids, attention_mask, labels, average=self.average_log_prob)
        return model_sequence_logps(model, input_ids, attention_mask, labels, average=self.average_log_prob)

    def policy_logps(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        return self.sequence_logps(self.policy, input_ids, attention_mask, labels)

    def cached_reference_logps(
        self, batch: dict[str, Tensor], key: str, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
    ) -> Tensor:
        """The reference log-probs the reference cache put in ``batch[key]``, or, without a cache, computed now."""
        cached = batch.get(key)
        return cached if cached is not None else self.reference_logps(input_ids, attention_mask, labels)

    @torch.no_grad()
    def reference_logps(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Log-probs under the reference: the trained adapter switched off (frozen upstream adapters stay on), or the
        frozen copy. Always computed in eval mode, as the reference cache computes them, so live and cached reference
        values agree whatever the model's dropout."""
        if self.ref_model is not None:
            return self.sequence_logps(self.ref_model, input_ids, attention_mask, labels)
        was_training = self.policy.training
        self.policy.eval()
        try:
            with reference_adapters(self.policy):
                return self.sequence_logps(self.policy, input_ids, attention_mask, labels)
        finally:
            self.policy.train(was_training)

    # ----------------------------------------------------------------------------------------------- steps
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._batch_start is not None:
            elapsed = time.perf_counter() - self._batch_start
            tokens = float(batch["attention_mask"].sum()) + float(batch.get("kl_attention_mask", torch.zeros(())).sum())
            self.log("train/tokens_per_s", tokens / max(elapsed, 1e-9), batch_size=self.batch_size_of(batch))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = grad_norm(self.policy, norm_type=2)
        if "grad_2.0_norm_total" in norms:
            self.log("train/grad_norm", norms["grad_2.0_norm_total"], batch_size=1)

    def on_validation_epoch_end(self) -> None:
        values = self.collect_validation_metrics()
        if values:
            self.log_dict(values, prog_bar=False)
            if "val/rewards/accuracy" in values:
                self.log("val/acc", values["val/rewards/accuracy"], prog_bar=True)

    # ----------------------------------------------------------------------------------------------- export
    def coefficients(self) -> dict[str, float]:
        """The step's KL coefficients (``beta``, ``lam``, ``kl_coef``), logged at the start of training."""
        return {}

    def on_train_start(self) -> None:
        for logger in self.loggers:
            logger.log_hyperparams(self.coefficients())

    def step_metadata(self) -> dict[str, Any]:
        """What the export's ``sacpo_step.json`` records about this step; subclasses add their settings."""
        return {
            "kind": self.step_kind,
            **self.coefficients(),
            "reference": self.policy_settings.name_or_path,
            "expected_reference": getattr(self, "expected_reference", None),
            "finetune": self.policy_settings.finetune,
            "average_log_prob": self.average_log_prob,
            "optim": asdict(self.optim_settings),
        }

    def export_pretrained(
        self, output_dir: str, *, dtype: str | None = None, extra: dict | None = None, merged: bool | None = None
    ) -> None:
        """Writes the trained policy as a Hugging Face folder (see :func:`sacpo_lightning.models.export_policy`)."""
        from sacpo_lightning.models.export import export_policy
        from sacpo_lightning.models.tokenizer import load_tokenizer

        settings = self.policy_settings
        tokenizer = load_tokenizer(
            settings.name_or_path, trust_remote_code=settings.trust_remote_code, gguf_file=settings.gguf_file
        )
        metadata = {**self.step_metadata(), **(extra or {})}
        export_policy(self.policy, settings, tokenizer, output_dir, metadata=metadata, dtype=dtype, merged=merged)
        rank_zero_info(f"Exported {self.step_kind} policy to {output_dir}")

