"""Unpaired steps with KTO: helpfulness (step 1) or safety (step 2) from desirable/undesirable examples."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from sacpo_lightning.checks import check_positive
from sacpo_lightning.losses import kto_class_weights, kto_kl_estimate, kto_loss
from sacpo_lightning.models.policy import PolicySettings
from sacpo_lightning.modules.base import (
    AlignmentModule,
    OptimSettings,
    RewardCoefficients,
    RewardReference,
    SafetyCoefficients,
    SafetyReference,
)


class KTOModule(AlignmentModule):
    """A KTO step with KL coefficient :attr:`kl_coef`.

    Args:
        desirable_weight: ``w_d`` of the KTO loss; ignored when ``auto_class_weights`` is on.
        undesirable_weight: ``w_u`` of the KTO loss; ignored when ``auto_class_weights`` is on.
        auto_class_weights: Set the weights from the training split's class counts so both classes weigh equally.
    """

    data_kind: ClassVar[str] = "kto"
    metric_names: ClassVar[tuple[str, ...]] = (
        "loss",
        "kl",
        "rewards/desirable",
        "rewards/undesirable",
        "rewards/accuracy",
        "logps/desirable",
        "logps/undesirable",
    )

    def __init__(
        self,
        policy: PolicySettings | None = None,
        optim: OptimSettings | None = None,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        auto_class_weights: bool = True,
        average_log_prob: bool = False,
    ) -> None:
        check_positive("--model.desirable_weight", desirable_weight)
        check_positive("--model.undesirable_weight", undesirable_weight)
        super().__init__(policy=policy, optim=optim, average_log_prob=average_log_prob)
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight
        self.auto_class_weights = auto_class_weights

    @property
    def kl_coef(self) -> float:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and self.auto_class_weights and hasattr(datamodule, "class_counts"):
            n_desirable, n_undesirable = datamodule.class_counts()
            self.desirable_weight, self.undesirable_weight = kto_class_weights(n_desirable, n_undesirable)
            rank_zero_info(
                f"KTO class weights from {n_desirable} desirable / {n_undesirable} undesirable examples: "
                f"w_d={self.desirable_weight:.3f}, w_u={self.undesirable_weight:.3f}"
            )

    def _global_mean(self, value: Tensor) -> Tensor:
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.all_gather(value).mean()
        return value

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        kl_ids, kl_mask, kl_labels = batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"]
        desirable = batch["desirable"].bool()
        policy = self.policy_logps(ids, mask, labels)
        reference = self.cached_reference_logps(batch, "ref_logps", ids, mask, labels)
        with torch.no_grad():
            policy_kl = self.policy_logps(kl_ids, kl_mask, kl_labels)
        reference_kl = self.cached_reference_logps(batch, "ref_kl_logps", kl_ids, kl_mask, kl_labels)
        kl = kto_kl_estimate(policy_kl, reference_kl, all_reduce=self._global_mean)
        losses, rewards = kto_loss(
            policy, reference, desirable, kl, beta=self.kl_coef,
            desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight,
        )
        kl_reward = self.kl_coef * kl
        correct = torch.where(desirable, rewards > kl_reward, rewards < kl_reward).float()
        metrics = {"kl": kl, "rewards/accuracy": correct.mean()}
        for name, select in (("desirable", desirable), ("undesirable", ~desirable)):
            if select.any():
                metrics[f"rewards/{name}"] = rewards[select].mean()
                metrics[f"logps/{name}"] = policy[select].detach().mean()
        return losses.mean(), metrics

    def step_metadata(self) -> dict[str, Any]:
        return {**super().step_metadata(), "desirable_weight": self.desirable_weight,
                "undesirable_weight": self.undesirable_weight}


class RewardKTO(RewardCoefficients, KTOModule):
    """SACPO step 1 with KTO: helpfulness from desirable/undesirable examples, KL coefficient ``beta``."""

    step_kind: ClassVar[str] = "reward_kto"

    def __init__(
        self,
        policy: PolicySettings | None = None,
        optim: OptimSettings | None = None,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        auto_class_weights: bool = True,
        average_log_prob: bool = False,
        expected_reference: RewardReference = "sft",
    ) -> None:
        self._set_coefficients(beta, expected_reference)
        super().__init__(policy, optim, desirable_weight, undesirable_weight, auto_class_weights, average_log_prob)


class SafetyKTO(SafetyCoefficients, KTOModule):
    """SACPO step 2 with KTO: safety from safe (desirable) / unsafe examples, KL coefficient ``beta / lam``."""

    step_kind: ClassVar[str] = "safety_kto"

    def __init__(
        self,
        policy: PolicySettings | None = None,
        optim: OptimSettings | None = None,
        beta: float = 0.1,
        lam: float = 1.0,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        auto_class_weights: bool = True,
        average_log_prob: bool = False,
        expected_reference: SafetyReference = "reward_step",
    ) -> None:
        self._set_coefficients(beta, lam, expected_reference)
        super().__init__(policy, optim, desirable_weight, undesirable_weight, auto_class_weights, average_log_prob)
