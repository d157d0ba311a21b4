"""Preference-optimisation losses as pure tensor functions.

Every loss takes summed (or averaged, the caller decides) sequence log-probabilities of the policy and of the frozen
reference policy, and returns per-example losses together with detached implicit rewards. The caller reduces (mean,
weighted mean, ...) and logs. Nothing here depends on Lightning.

Notation used in the docstrings: for a preference pair (chosen ``y_w``, rejected ``y_l``) the log-ratio margin is

    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)).

In SACPO, step 1 calls these losses with ``beta`` and the SFT model as reference, step 2 with ``beta / lambda`` and the
step-1 policy as reference; the functions themselves are agnostic to the step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sacpo_lightning.checks import check_positive

__all__ = [
    "bradley_terry_loss",
    "cost_sign_loss",
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "kto_class_weights",
    "kto_kl_estimate",
    "kto_loss",
]


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"log-prob tensors must all have the same shape, got {listed}")


def _pair_logratios(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Validates the inputs of a pairwise loss; returns the margin ``h`` and the detached chosen/rejected rewards."""
    check_positive("beta", beta)
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    margin = chosen_logratios - rejected_logratios
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return margin, chosen_rewards, rejected_rewards


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO loss, optionally with conservative label smoothing.

    Rafailov et al. 2023, "Direct Preference Optimization", eq. 7:

        L = -log sigmoid(beta * h).

    With ``label_smoothing = eps`` the preference labels are assumed flipped with probability ``eps`` (conservative
    DPO, Mitchell 2023):

        L = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h).

    ``F.logsigmoid`` keeps the loss finite for arbitrarily large ``|beta * h|``.

    Args:
        policy_chosen_logps: (B,) log-probs of the chosen responses under the policy.
        policy_rejected_logps: (B,) log-probs of the rejected responses under the policy.
        ref_chosen_logps: (B,) log-probs of the chosen responses under the reference policy.
        ref_rejected_logps: (B,) log-probs of the rejected responses under the reference policy.
        beta: KL coefficient (> 0).
        label_smoothing: Assumed label-noise rate ``eps`` in ``[0, 0.5)``; 0 gives plain DPO.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,). Rewards are
        ``beta * (policy_logps - ref_logps)``, detached.

    Raises:
        ValueError: If ``beta <= 0``, ``label_smoothing`` is outside ``[0, 0.5)`` or the shapes differ.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    margin, chosen_rewards, rejected_rewards = _pair_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    logits = beta * margin
    losses = -F.logsigmoid(logits)
    if label_smoothing > 0:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO loss.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", eq. 17 (the
    empirical IPO objective):

        L = (h - 1 / (2 * beta))^2.

    The paper's ``tau`` is ``beta`` here. The loss is not invariant to sequence length: TRL feeds it per-token-averaged
    log-probs. This function uses whatever it is given; the caller decides whether the log-probs are summed or averaged
    (``sequence_logprobs(..., average=True)``).

    Args:
        policy_chosen_logps: (B,) log-probs of the chosen responses under the policy.
        policy_rejected_logps: (B,) log-probs of the rejected responses under the policy.
        ref_chosen_logps: (B,) log-probs of the chosen responses under the reference policy.
        ref_rejected_logps: (B,) log-probs of the rejected responses under the reference policy.
        beta: Regularisation strength (> 0); the target margin is ``1 / (2 * beta)``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,); rewards as in :func:`dpo_loss`, detached.

    Raises:
        ValueError: If ``beta <= 0`` or the shapes differ.
    """
    margin, chosen_rewards, rejected_rewards = _pair_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = (margin - 1.0 / (2.0 * beta)) ** 2
    return losses, chosen_rewards, rejected_rewards


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hinge (SLiC-style) preference loss on the reference-normalised margin.

    Zhao et al. 2023, "SLiC-HF", eq. 1 (calibration loss ``max(0, delta - log P(y_w|x) + log P(y_l|x))``), applied to
    the log-ratio margin as in the DPO paper's comparison and TRL's ``loss_type="hinge"``:

        L = max(0, 1 - beta * h),

    i.e. ``delta = 1`` with the margin measured in units of ``1 / beta``.

    Args:
        policy_chosen_logps: (B,) log-probs of the chosen responses under the policy.
        policy_rejected_logps: (B,) log-probs of the rejected responses under the policy.
        ref_chosen_logps: (B,) log-probs of the chosen responses under the reference policy.
        ref_rejected_logps: (B,) log-probs of the rejected responses under the reference policy.
        beta: Inverse margin scale (> 0).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,); rewards as in :func:`dpo_loss`, detached.

    Raises:
        ValueError: If ``beta <= 0`` or the shapes differ.
    """
    margin, chosen_rewards, rejected_rewards = _pair_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = torch.relu(1.0 - beta * margin)
    return losses, chosen_rewards, rejected_rewards


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO loss on unpaired desirable/undesirable examples.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8, in the form used by TRL.
    With ``r = log pi(y|x) - log pi_ref(y|x)`` and the reference point ``z0 = kl``:

        desirable:   L = w_d * (1 - sigmoid(beta * (r - z0)))
        undesirable: L = w_u * (1 - sigmoid(beta * (z0 - r)))

    ``z0`` is treated as a constant (no gradient flows through it); estimate it with :func:`kto_kl_estimate`.

    Args:
        policy_logps: (B,) log-probs of the completions under the policy.
        ref_logps: (B,) log-probs of the completions under the reference policy.
        desirable: (B,) bool, True where the completion is desirable.
        kl: Scalar (0-d) tensor, the reference point ``z0``; detached here.
        beta: KL coefficient (> 0).
        desirable_weight: ``w_d`` (> 0), see :func:`kto_class_weights`.
        undesirable_weight: ``w_u`` (> 0).

    Returns:
        ``(losses, rewards)``, each (B,). Rewards are ``beta * r``, detached.

    Raises:
        ValueError: If ``beta`` or a weight is not > 0, ``desirable`` is not bool, ``kl`` is not a scalar, or the
            shapes differ.
    """
    check_positive("beta", beta)
    check_positive("desirable_weight", desirable_weight)
    check_positive("undesirable_weight", undesirable_weight)
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got dtype {desirable.dtype}")
    kl = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device)
    if kl.numel() != 1:
        raise ValueError(f"kl must be a scalar tensor, got shape {tuple(kl.shape)}")
    kl = kl.detach().reshape(())

    logratios = policy_logps - ref_logps
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - kl)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    rewards = beta * logratios.detach()
    return losses, rewards


def kto_kl_estimate(
    policy_kl_logps: Tensor,
    ref_kl_logps: Tensor,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Batch estimate of the KTO reference point ``z0 = KL(pi || pi_ref)``.

    Ethayarajh et al. 2024, eq. 8 and Sec. 4.1: ``z0`` is estimated from mismatched pairs (each prompt paired with
    another example's completion) as ``max(0, mean(log pi(y'|x) - log pi_ref(y'|x)))``, with no gradient.

    In distributed training every rank must use the same ``z0``: pass ``all_reduce``, a function that takes the local
    mean (0-d tensor) and returns the global mean (e.g. ``lambda t: module.all_gather(t).mean()``). It is applied to the
    mean before the clamp, matching TRL.

    Args:
        policy_kl_logps: (B,) policy log-probs of the mismatched completions.
        ref_kl_logps: (B,) reference log-probs of the mismatched completions.
        all_reduce: Optional cross-process mean of a 0-d tensor.

    Returns:
        0-d tensor, ``>= 0``, detached.

    Raises:
        ValueError: If the shapes differ or the batch is empty.
    """
    _check_same_shape(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    if policy_kl_logps.numel() == 0:
        raise ValueError("kto_kl_estimate needs a non-empty batch of mismatched log-probs")
    with torch.no_grad():
        kl = (policy_kl_logps.detach() - ref_kl_logps.detach()).mean()
        if all_reduce is not None:
            kl = all_reduce(kl).detach().reshape(())
        return kl.clamp(min=0)


def kto_class_weights(
    num_desirable: int,
    num_undesirable: int,
    *,
    desirable_weight: float = 1.0,
) -> tuple[float, float]:
    """Class weights ``(w_d, w_u)`` for :func:`kto_loss` that balance an imbalanced data set.

    The KTO paper (Ethayarajh et al. 2024, Sec. 4.2 and eq. 9) recommends weights such that
    ``w_d * n_d / (w_u * n_u)`` lies in ``[1, 4/3]``. This function keeps ``w_u = 1`` and sets

        w_d = desirable_weight * n_u / n_d,

    so the ratio equals ``desirable_weight``: 1 by default (the two classes contribute equally), or any other target
    the caller chooses inside the recommended range.

    Args:
        num_desirable: Number of desirable examples ``n_d`` (> 0).
        num_undesirable: Number of undesirable examples ``n_u`` (> 0).
        desirable_weight: Target ratio ``w_d * n_d / (w_u * n_u)`` (> 0).

    Returns:
        ``(desirable_weight, undesirable_weight)`` to pass to :func:`kto_loss`.

    Raises:
        ValueError: If either count is not positive or ``desirable_weight <= 0``.
    """
    if num_desirable <= 0 or num_undesirable <= 0:
        raise ValueError(
            "KTO needs both desirable and undesirable examples, got "
            f"num_desirable={num_desirable}, num_undesirable={num_undesirable}"
        )
    check_positive("desirable_weight", desirable_weight)
    return desirable_weight * num_undesirable / num_desirable, 1.0


# ----------------------------------------------------------------------------------------------------------------------
# Score models (reward and cost models scored by a sequence classifier)
# ----------------------------------------------------------------------------------------------------------------------


def bradley_terry_loss(higher: Tensor, lower: Tensor) -> Tensor:
    """Per-pair Bradley-Terry loss ``-log sigmoid(s_higher - s_lower)`` (Ouyang et al., 2022, eq. 1).

    Args:
        higher: (B,) scores of the responses that should score higher.
        lower: (B,) scores of the other responses.

    Returns:
        (B,) losses; ``log 2`` for equal scores.
    """
    return -F.logsigmoid(higher - lower)


def cost_sign_loss(costs: Tensor, unsafe: Tensor) -> Tensor:
    """Per-response classification term of Safe RLHF's cost model, ``-log sigmoid(sign * c)`` (Dai et al., 2024).

    Args:
        costs: (N,) costs.
        unsafe: (N,) bool, True for unsafe responses (sign +1: the cost should be positive), False for safe ones
            (sign -1: negative).

    Returns:
        (N,) losses.
    """
    sign = unsafe.to(costs.dtype) * 2.0 - 1.0
    return -F.logsigmoid(sign * costs)
