"""Exact tabular checks of the SACPO method built on ``sacpo_lightning.losses.dpo_loss``.

A tabular policy assigns ``pi(y_k | x_p) = softmax(theta[p])[k]`` to K candidate responses for each of P prompts.
Preferences follow a Bradley-Terry model with temperature 1: ``P(y_i > y_j | x) = sigmoid(s_i - s_j)`` for a score
``s`` (the helpfulness reward ``r`` or the safety score ``g``). With every unordered pair sampled uniformly and an
infinite number of labels, the expected DPO loss over one prompt is

    E(theta) = sum_{i<j} p_ij * L(i, j) + (1 - p_ij) * L(j, i),

where ``L(i, j)`` is ``dpo_loss`` with ``i`` chosen and ``j`` rejected. ``E`` is convex in ``theta`` (the log-ratio
margin is linear in ``theta``) and is minimised exactly when ``beta * (log pi/pi_ref)_i - beta * (log pi/pi_ref)_j =
s_i - s_j`` for every pair, i.e. at ``pi ∝ pi_ref * exp(s / beta)``, the KL-regularised optimum.

SACPO's claims checked here, with ``pi_s`` denoting ``pi_ref * exp(s / beta)`` normalised:
  * step 1 (helpfulness, KL coefficient ``beta``, reference ``pi_ref``) reaches ``pi_r``;
  * step 2 (safety, KL coefficient ``beta / lambda``, reference = the step-1 policy) reaches ``pi_{r + lambda g}``,
    the optimum of the Lagrangian ``r + lambda g`` with KL coefficient ``beta``;
  * the order of the two steps does not matter;
  * the geometric mixture of ``pi_r`` and ``pi_{r + lambda g}`` with weight ``q`` is ``pi_{r + q lambda g}``;
  * a step 2 that wrongly keeps ``pi_ref`` as its reference misses ``pi_{r + lambda g}`` (so the checks can fail).
"""

from __future__ import annotations

import pytest
import torch

from sacpo_lightning.losses import dpo_loss

NUM_PROMPTS = 3
NUM_RESPONSES = 4
BETA = 0.5
LAMBDA = 2.0
# Tight enough to catch a wrong KL coefficient or reference (those move the optimum by > 0.05) with a wide margin over
# the optimiser's error (~1e-9).
TV_TOL = 1e-6


@pytest.fixture(scope="module")
def problem() -> dict[str, torch.Tensor]:
    """Seeded reference policy, helpfulness reward ``r`` and safety score ``g`` of shape (P, K), float64.

    The scales keep the target log-ratios ``r / beta`` and ``lambda * g / beta`` at unit standard deviation, so every
    optimum is an interior, well-conditioned point.
    """
    gen = torch.Generator().manual_seed(1234)
    shape = (NUM_PROMPTS, NUM_RESPONSES)
    ref_logp = torch.log_softmax(torch.randn(shape, generator=gen, dtype=torch.float64), dim=-1)
    reward = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    safety = 0.25 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return {"ref_logp": ref_logp, "reward": reward, "safety": safety}


def closed_form_logp(ref_logp: torch.Tensor, score: torch.Tensor, beta: float) -> torch.Tensor:
    """(P, K) log of ``pi_ref * exp(score / beta)`` normalised per prompt."""
    return torch.log_softmax(ref_logp + score / beta, dim=-1)


def expected_dpo_loss(theta: torch.Tensor, ref_logp: torch.Tensor, score: torch.Tensor, beta: float) -> torch.Tensor:
    """Infinite-data DPO loss of the tabular policy ``softmax(theta)`` under Bradley-Terry preferences from ``score``.

    Args:
        theta: (P, K) policy logits.
        ref_logp: (P, K) reference log-probs.
        score: (P, K) Bradley-Terry score generating the preferences (temperature 1).
        beta: DPO KL coefficient.

    Returns:
        Scalar: sum over prompts and unordered pairs ``i < j`` of ``p_ij * L(i, j) + (1 - p_ij) * L(j, i)``.
    """
    logp = torch.log_softmax(theta, dim=-1)
    i, j = torch.triu_indices(NUM_RESPONSES, NUM_RESPONSES, offset=1)
    p_ij = torch.sigmoid(score[:, i] - score[:, j])
    loss_ij, _, _ = dpo_loss(logp[:, i], logp[:, j], ref_logp[:, i], ref_logp[:, j], beta=beta)
    loss_ji, _, _ = dpo_loss(logp[:, j], logp[:, i], ref_logp[:, j], ref_logp[:, i], beta=beta)
    return (p_ij * loss_ij + (1.0 - p_ij) * loss_ji).sum()


def fit_dpo(
    ref_logp: torch.Tensor, score: torch.Tensor, beta: float, init_logp: torch.Tensor | None = None
) -> torch.Tensor:
    """Minimises :func:`expected_dpo_loss` to machine precision and returns the learned (P, K) log-policy.

    Args:
        ref_logp: (P, K) reference log-probs (the frozen policy that the KL term is measured against).
        score: (P, K) preference-generating score.
        beta: KL coefficient of this step.
        init_logp: (P, K) starting policy; defaults to the reference, as when fine-tuning starts from it.
    """
    theta = (ref_logp if init_logp is None else init_logp).detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [theta], lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = expected_dpo_loss(theta, ref_logp, score, beta)
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    grad_norm = theta.grad.abs().max().item()
    assert grad_norm < 1e-9, f"optimiser did not converge: max |grad| = {grad_norm:.3e}"
    return torch.log_softmax(theta.detach(), dim=-1)


def total_variation(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """(P,) total-variation distance between two (P, K) policies, per prompt."""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(dim=-1)


@pytest.fixture(scope="module")
def learned(problem: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Policies learned by the two SACPO orders, computed once for the module."""
    ref, r, g = problem["ref_logp"], problem["reward"], problem["safety"]
    helpful = fit_dpo(ref, r, BETA)
    helpful_then_safe = fit_dpo(helpful, g, BETA / LAMBDA)
    safe = fit_dpo(ref, g, BETA / LAMBDA)
    safe_then_helpful = fit_dpo(safe, r, BETA)
    return {
        "helpful": helpful,
        "helpful_then_safe": helpful_then_safe,
        "safe": safe,
        "safe_then_helpful": safe_then_helpful,
    }


def test_closed_form_is_stationary(problem: dict[str, torch.Tensor]) -> None:
    """The gradient of the expected DPO loss vanishes at pi_ref * exp(s / beta): each pair term
    -p log sigmoid(x) - (1-p) log sigmoid(-x) has derivative sigmoid(x) - p in x = beta * (log-ratio margin), and at
    the closed form x = s_i - s_j, so sigmoid(x) = p_ij exactly. Independent of any optimiser."""
    ref, r = problem["ref_logp"], problem["reward"]
    theta = closed_form_logp(ref, r, BETA).clone().requires_grad_(True)
    expected_dpo_loss(theta, ref, r, BETA).backward()
    assert theta.grad.abs().max().item() < 1e-12


def test_step1_reaches_kl_regularised_optimum(problem: dict[str, torch.Tensor], learned: dict) -> None:
    """Step 1: DPO on helpfulness with beta from pi_ref converges to pi_r ∝ pi_ref exp(r / beta)."""
    target = closed_form_logp(problem["ref_logp"], problem["reward"], BETA)
    assert total_variation(learned["helpful"], target).max().item() < TV_TOL
    # The optimum is not the reference itself, so the comparison above is not vacuous.
    assert total_variation(problem["ref_logp"], target).max().item() > 0.05


def test_step2_from_step1_reaches_lagrangian_optimum(problem: dict[str, torch.Tensor], learned: dict) -> None:
    """Step 2: DPO on safety with beta / lambda from the frozen step-1 policy gives
    pi_r exp(lambda g / beta) ∝ pi_ref exp((r + lambda g) / beta)."""
    target = closed_form_logp(problem["ref_logp"], problem["reward"] + LAMBDA * problem["safety"], BETA)
    assert total_variation(learned["helpful_then_safe"], target).max().item() < TV_TOL
    assert total_variation(learned["helpful"], target).max().item() > 0.05


def test_swapped_order_reaches_same_optimum(problem: dict[str, torch.Tensor], learned: dict) -> None:
    """Safety first (beta / lambda from pi_ref) then helpfulness (beta from the safety policy) gives
    pi_ref exp(lambda g / beta) exp(r / beta), the same policy as the default order."""
    target = closed_form_logp(problem["ref_logp"], problem["reward"] + LAMBDA * problem["safety"], BETA)
    safe_target = closed_form_logp(problem["ref_logp"], LAMBDA * problem["safety"], BETA)
    assert total_variation(learned["safe"], safe_target).max().item() < TV_TOL
    assert total_variation(learned["safe_then_helpful"], target).max().item() < TV_TOL
    assert total_variation(learned["safe_then_helpful"], learned["helpful_then_safe"]).max().item() < 2 * TV_TOL


@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_geometric_mixture_interpolates_safety_weight(problem: dict[str, torch.Tensor], q: float) -> None:
    """normalize(pi_r^(1-q) pi_{r+lambda g}^q) ∝ pi_ref exp(((1-q) r + q (r + lambda g)) / beta)
    = pi_ref exp((r + q lambda g) / beta) = pi_{r + q lambda g}: exact algebra, checked to 1e-9."""
    ref, r, g = problem["ref_logp"], problem["reward"], problem["safety"]
    pi_r = closed_form_logp(ref, r, BETA)
    pi_full = closed_form_logp(ref, r + LAMBDA * g, BETA)
    mixture = torch.log_softmax((1.0 - q) * pi_r + q * pi_full, dim=-1)
    target = closed_form_logp(ref, r + q * LAMBDA * g, BETA)
    assert total_variation(mixture, target).max().item() < 1e-9
    torch.testing.assert_close(mixture, target, rtol=0, atol=1e-9)


@pytest.mark.parametrize("q", [0.25, 0.5, 0.8])
def test_geometric_mixture_of_learned_policies(problem: dict[str, torch.Tensor], learned: dict, q: float) -> None:
    """The same mixture built from the two learned policies (step 1 and step 2) reaches pi_{r + q lambda g}."""
    mixture = torch.log_softmax((1.0 - q) * learned["helpful"] + q * learned["helpful_then_safe"], dim=-1)
    target = closed_form_logp(problem["ref_logp"], problem["reward"] + q * LAMBDA * problem["safety"], BETA)
    assert total_variation(mixture, target).max().item() < TV_TOL


def test_negative_control_step2_with_sft_reference_fails(problem: dict[str, torch.Tensor], learned: dict) -> None:
    """If step 2 starts from the step-1 policy but measures its KL against pi_ref (the SFT model) instead of the
    step-1 policy, it converges to pi_ref exp(lambda g / beta) and forgets the helpfulness reward: far from pi*.
    This is the same check as the step-2 test with only the reference changed, so that check can fail."""
    ref, r, g = problem["ref_logp"], problem["reward"], problem["safety"]
    wrong = fit_dpo(ref, g, BETA / LAMBDA, init_logp=learned["helpful"])
    target = closed_form_logp(ref, r + LAMBDA * g, BETA)
    assert total_variation(wrong, target).max().item() > 0.05
    # It did converge, to the optimum that ignores r.
    assert total_variation(wrong, closed_form_logp(ref, LAMBDA * g, BETA)).max().item() < TV_TOL


def test_negative_control_wrong_kl_coefficient_fails(problem: dict[str, torch.Tensor], learned: dict) -> None:
    """Step 2 with beta instead of beta / lambda reaches pi_ref exp((r + g) / beta), i.e. lambda = 1, not pi*."""
    ref, r, g = problem["ref_logp"], problem["reward"], problem["safety"]
    wrong = fit_dpo(learned["helpful"], g, BETA)
    assert total_variation(wrong, closed_form_logp(ref, r + LAMBDA * g, BETA)).max().item() > 0.05
    assert total_variation(wrong, closed_form_logp(ref, r + g, BETA)).max().item() < TV_TOL
