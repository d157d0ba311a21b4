"""Pairwise preference steps: helpfulness (step 1) and safety (step 2) with DPO, IPO or hinge losses."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from torch import Tensor

from sacpo_lightning.errors import UserError
from sacpo_lightning.losses import dpo_loss, hinge_loss, ipo_loss
from sacpo_lightning.models.policy import PolicySettings
from sacpo_lightning.modules.base import (
    AlignmentModule,
    OptimSettings,
    RewardCoefficients,
    RewardReference,
    SafetyCoefficients,
    SafetyReference,
)

PAIR_LOSSES = {"sigmoid": dpo_loss, "ipo": ipo_loss, "hinge": hinge_loss}
PairLoss = Literal["sigmoid", "ipo", "hinge"]


class PairwiseModule(AlignmentModule):
    """A preference step on (chosen, rejected) pairs with KL coefficient :attr:`kl_coef`.

    Chosen and rejected sequences arrive as one (2B, L) batch and go through a single forward pass.
    """

    data_kind: ClassVar[str] = "pairs"
    metric_names: ClassVar[tuple[str, ...]] = (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracy",
        "logps/chosen",
        "logps/rejected",
    )

    def __init__(
        self,
        policy: PolicySettings | None = None,
        optim: OptimSettings | None = None,
        loss: PairLoss = "sigmoid",
        label_smoothing: float = 0.0,
        average_log_prob: bool = False,
    ) -> None:
        super().__init__(policy=policy, optim=optim, average_log_prob=average_log_prob)
        if loss not in PAIR_LOSSES:
            raise UserError(f"--model.loss must be one of {', '.join(PAIR_LOSSES)}, got {loss!r}")
        if not 0.0 <= label_smoothing < 0.5:
            raise UserError(f"--model.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.loss_name = loss
        self.label_smoothing = label_smoothing

    @property
    def kl_coef(self) -> float:
        raise NotImplementedError

    def pair_losses(self, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loss_fn = PAIR_LOSSES[self.loss_name]
        kwargs = {"label_smoothing": self.label_smoothing} if self.loss_name == "sigmoid" else {}
        return loss_fn(pc, pr, rc, rr, beta=self.kl_coef, **kwargs)

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        n = self.batch_size_of(batch)
        policy = self.policy_logps(ids, mask, labels)
        reference = self.cached_reference_logps(batch, "ref_logps", ids, mask, labels)
        losses, chosen_rewards, rejected_rewards = self.pair_losses(
            policy[:n], policy[n:], reference[:n], reference[n:]
        )
        margins = chosen_rewards - rejected_rewards
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": margins.mean(),
            "rewards/accuracy": (margins > 0).float().mean(),
            "logps/chosen": policy[:n].detach().mean(),
            "logps/rejected": policy[n:].detach().mean(),
        }
        return losses.mean(), metrics

    def step_metadata(self) -> dict[str, Any]:
        return {**super().step_metadata(), "loss": self.loss_name, "label_smoothing": self.label_smoothing}


class RewardDPO(RewardCoefficients, PairwiseModule):
    """SACPO step 1: align the SFT policy to helpfulness preferences with KL coefficient ``beta``.

    Args:
        beta: KL coefficient to the reference (SFT) policy.
        expected_reference: What ``policy.name_or_path`` must be: ``sft`` (default), ``safety_step`` (the swapped
            order, a safety step's export with the same beta) or ``any`` (unchecked).
    """

    step_kind: ClassVar[str] = "reward_dpo"

    def __init__(
        self,
        policy: PolicySettings | None = None,
        optim: OptimSettings | None = None,
        beta: float = 0.1,
        loss: PairLoss = "sigmoid",
        label_smoothing: float = 0.0,
        average_log_prob: bool = False,
        expected_reference: RewardReference = "sft",
    ) -> None:
        self._set_coefficients(beta, expected_reference)
        super().__init__(policy, optim, loss, label_smoothing, average_log_prob)


class SafetyDPO(SafetyCoefficients, PairwiseModule):
    """SACPO step 2: align the step-1 policy to safety preferences with KL coefficient ``beta / lam``.

    By SACPO's theorem the result is the optimum of reward + ``lam`` * safety with KL coefficient ``beta`` to the SFT
    policy, provided ``policy.name_or_path`` is the step-1 export (which then also serves as the reference).

    Args:
        beta: The step-1 KL coefficient.
        lam: The Lagrange multiplier lambda (> 0); larger values weigh safety more.
        expected_reference: What ``policy.name_or_path`` must be: ``reward_step`` (default: a step-1 export trained
            with the same beta; anything else stops before training), ``sft`` (a safety-only model or the first step
            of the swapped order) or ``any`` (unchecked).
    """

    step_kind: ClassVar[str] = "safety_dpo"

    def __init__(
        self,
        policy: PolicySettings | None = None,
        optim: OptimSettings | None = None,
        beta: float = 0.1,
        lam: float = 1.0,
        loss: PairLoss = "sigmoid",
        label_smoothing: float = 0.0,
        average_log_prob: bool = False,
        expected_reference: SafetyReference = "reward_step",
    ) -> None:
        self._set_coefficients(beta, lam, expected_reference)
        super().__init__(policy, optim, loss, label_smoothing, average_log_prob)
