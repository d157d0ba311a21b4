"""Golden-value tests for ``sacpo_lightning.losses``; each docstring derives the expected numbers by hand."""

from __future__ import annotations

import math

import pytest
import torch

from sacpo_lightning.losses import (
    bradley_terry_loss,
    cost_sign_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_class_weights,
    kto_kl_estimate,
    kto_loss,
)

PAIRWISE_LOSSES = [dpo_loss, ipo_loss, hinge_loss]


def pair_inputs(margins: list[float], requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    """Log-probs whose log-ratio margin h equals ``margins``.

    Policy chosen = -10 + h, policy rejected = -20, reference chosen = -10, reference rejected = -20, so the chosen
    log-ratio is h, the rejected log-ratio is 0 and h is the margin.
    """
    m = torch.tensor(margins, dtype=torch.float64)
    policy_chosen = (-10.0 + m).requires_grad_(requires_grad)
    policy_rejected = torch.full_like(m, -20.0).requires_grad_(requires_grad)
    ref_chosen = torch.full_like(m, -10.0)
    ref_rejected = torch.full_like(m, -20.0)
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


def test_dpo_golden_values() -> None:
    """beta=0.1, margins (0, 10, 20) give beta*h = (0, 1, 2) and DPO losses -log sigmoid(beta*h) = log(1+e^-beta*h)
    = (log 2, log(1+e^-1), log(1+e^-2)) = (0.6931, 0.3133, 0.1269)."""
    losses, _, _ = dpo_loss(*pair_inputs([0.0, 10.0, 20.0]), beta=0.1)
    expected = torch.tensor(
        [math.log(2.0), math.log1p(math.exp(-1.0)), math.log1p(math.exp(-2.0))], dtype=torch.float64
    )
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(
        losses, torch.tensor([0.693147, 0.313262, 0.126928], dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_dpo_rewards() -> None:
    """Rewards are beta*(policy - ref): with policy chosen/rejected = (-8, -25), reference (-10, -20) and beta=0.5,
    chosen reward = 0.5*2 = 1 and rejected reward = 0.5*(-5) = -2.5; both detached."""
    pc = torch.tensor([-8.0], requires_grad=True)
    pr = torch.tensor([-25.0], requires_grad=True)
    _, chosen, rejected = dpo_loss(pc, pr, torch.tensor([-10.0]), torch.tensor([-20.0]), beta=0.5)
    assert chosen.tolist() == [1.0]
    assert rejected.tolist() == [-2.5]
    assert not chosen.requires_grad and not rejected.requires_grad


@pytest.mark.parametrize("loss_fn", PAIRWISE_LOSSES)
def test_pairwise_rewards_detached_and_loss_differentiable(loss_fn) -> None:
    """Every pairwise loss returns detached rewards and a loss that carries gradient to the policy log-probs."""
    losses, chosen, rejected = loss_fn(*pair_inputs([0.0, 3.0], requires_grad=True), beta=0.1)
    assert losses.requires_grad
    assert not chosen.requires_grad and not rejected.requires_grad
    torch.testing.assert_close(chosen, torch.tensor([0.0, 0.3], dtype=torch.float64))
    torch.testing.assert_close(rejected, torch.zeros(2, dtype=torch.float64))


def test_conservative_dpo_golden_values() -> None:
    """With label smoothing eps, L = -(1-eps) log sigmoid(x) - eps log sigmoid(-x) with x = beta*h. Since
    -log sigmoid(-x) = x - log sigmoid(x), this is log(1+e^-x) + eps*x. beta=0.1, eps=0.1, margins (0, 10, 20):
    x = (0, 1, 2), L = (0.6931, 0.3133 + 0.1, 0.1269 + 0.2) = (0.6931, 0.4133, 0.3269)."""
    losses, _, _ = dpo_loss(*pair_inputs([0.0, 10.0, 20.0]), beta=0.1, label_smoothing=0.1)
    expected = torch.tensor(
        [math.log(2.0), math.log1p(math.exp(-1.0)) + 0.1, math.log1p(math.exp(-2.0)) + 0.2], dtype=torch.float64
    )
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(
        losses, torch.tensor([0.693147, 0.413262, 0.326928], dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_dpo_symmetric_pair_is_log2_for_any_smoothing() -> None:
    """At h = 0 both terms are -log sigmoid(0) = log 2, so the loss is log 2 for every eps."""
    for eps in (0.0, 0.2, 0.49):
        losses, _, _ = dpo_loss(*pair_inputs([0.0]), beta=0.3, label_smoothing=eps)
        assert losses.item() == pytest.approx(math.log(2.0))


def test_dpo_extreme_margins_are_finite() -> None:
    """beta*h = +-1e4: log(1+e^-1e4) underflows to 0 and log(1+e^1e4) = 1e4 (logsigmoid, no overflow to inf)."""
    losses, _, _ = dpo_loss(*pair_inputs([1e4, -1e4]), beta=1.0)
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, torch.tensor([0.0, 1e4], dtype=torch.float64))


@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_dpo_gradient_matches_analytic(eps: float) -> None:
    """dL/dx for L = log(1+e^-x) + eps*x is -sigmoid(-x) + eps, x = beta*h, h = pc - rc - pr + rr, so
    dL/d(policy chosen) = beta*(eps - sigmoid(-beta*h)) and dL/d(policy rejected) = -dL/d(policy chosen);
    for eps = 0 this is -beta*sigmoid(-beta*h)."""
    beta = 0.1
    margins = torch.tensor([-15.0, 0.0, 4.0, 30.0], dtype=torch.float64)
    pc, pr, rc, rr = pair_inputs(margins.tolist(), requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    losses.sum().backward()
    expected = beta * (eps - torch.sigmoid(-beta * margins))
    torch.testing.assert_close(pc.grad, expected)
    torch.testing.assert_close(pr.grad, -expected)


def test_ipo_golden_values() -> None:
    """beta=0.1: target margin 1/(2*beta) = 5; margins (0, 5, 10, -5) give (h-5)^2 = (25, 0, 25, 100)."""
    losses, _, _ = ipo_loss(*pair_inputs([0.0, 5.0, 10.0, -5.0]), beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([25.0, 0.0, 25.0, 100.0], dtype=torch.float64))


def test_ipo_gradient() -> None:
    """dL/d(policy chosen) = 2*(h - 1/(2 beta)): beta=0.25 (target 2), h=(0, 3) gives (-4, 2)."""
    pc, pr, rc, rr = pair_inputs([0.0, 3.0], requires_grad=True)
    losses, _, _ = ipo_loss(pc, pr, rc, rr, beta=0.25)
    losses.sum().backward()
    torch.testing.assert_close(pc.grad, torch.tensor([-4.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(pr.grad, torch.tensor([4.0, -2.0], dtype=torch.float64))


def test_hinge_golden_values() -> None:
    """beta=0.1, margins (-10, 0, 5, 10, 20): beta*h = (-1, 0, 0.5, 1, 2), relu(1 - beta*h) = (2, 1, 0.5, 0, 0)."""
    losses, _, _ = hinge_loss(*pair_inputs([-10.0, 0.0, 5.0, 10.0, 20.0]), beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([2.0, 1.0, 0.5, 0.0, 0.0], dtype=torch.float64))


def test_pairwise_losses_accept_batched_shapes() -> None:
    """Losses are element-wise: a (2, 3) grid of pairs gives (2, 3) losses equal to the flattened computation."""
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(2, 3, generator=gen) for _ in range(4)]
    for loss_fn in PAIRWISE_LOSSES:
        grid, _, _ = loss_fn(*tensors, beta=0.2)
        flat, _, _ = loss_fn(*(t.flatten() for t in tensors), beta=0.2)
        assert grid.shape == (2, 3)
        torch.testing.assert_close(grid.flatten(), flat)


def test_kto_golden_values() -> None:
    """beta=0.1, kl=z0=2, log-ratios r = (12, 2, -8) (policy - reference).

    Desirable: 1 - sigmoid(0.1*(r - 2)) = 1 - sigmoid(1, 0, -1) = (0.268941, 0.5, 0.731059).
    Undesirable: 1 - sigmoid(0.1*(2 - r)) = 1 - sigmoid(-1, 0, 1) = (0.731059, 0.5, 0.268941).
    With w_d = 2 and w_u = 0.5 the desirable losses double and the undesirable ones halve.
    """
    policy = torch.tensor([2.0, -8.0, -18.0, 2.0, -8.0, -18.0])
    ref = torch.full((6,), -10.0)
    desirable = torch.tensor([True, True, True, False, False, False])
    kl = torch.tensor(2.0)
    s1 = 1.0 / (1.0 + math.exp(-1.0))  # sigmoid(1) = 0.731059
    losses, rewards = kto_loss(policy, ref, desirable, kl, beta=0.1)
    expected = torch.tensor([1 - s1, 0.5, s1, s1, 0.5, 1 - s1])
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(
        losses, torch.tensor([0.268941, 0.5, 0.731059, 0.731059, 0.5, 0.268941]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(rewards, torch.tensor([1.2, 0.2, -0.8, 1.2, 0.2, -0.8]))

    weighted, _ = kto_loss(policy, ref, desirable, kl, beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)
    torch.testing.assert_close(weighted, expected * torch.tensor([2.0, 2.0, 2.0, 0.5, 0.5, 0.5]))


def test_kto_gradients_and_detached_reference_point() -> None:
    """dL/dr for a desirable example is -w_d*beta*s*(1-s) with s = sigmoid(beta*(r - z0)); for an undesirable one
    it is +w_u*beta*s*(1-s) with s = sigmoid(beta*(z0 - r)). At r = z0, s = 1/2: beta=0.1 gives -0.025 and +0.025.
    No gradient reaches kl (it is a constant reference point) and rewards are detached."""
    policy = torch.tensor([1.0, 1.0], requires_grad=True)
    kl = torch.tensor(1.0, requires_grad=True)
    losses, rewards = kto_loss(policy, torch.zeros(2), torch.tensor([True, False]), kl, beta=0.1)
    losses.sum().backward()
    torch.testing.assert_close(policy.grad, torch.tensor([-0.025, 0.025]))
    assert kl.grad is None
    assert not rewards.requires_grad


def test_kto_kl_estimate() -> None:
    """Mean of policy - reference on mismatched pairs: policy (1, 2, 3) vs reference 0 gives 2; a negative mean
    (-2) is clamped to 0; the result is a detached 0-d tensor even when the inputs require grad."""
    policy = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    kl = kto_kl_estimate(policy, torch.zeros(3))
    assert kl.shape == ()
    assert kl.item() == pytest.approx(2.0)
    assert not kl.requires_grad
    negative = kto_kl_estimate(-policy, torch.zeros(3))
    assert negative.item() == 0.0
    assert not negative.requires_grad


def test_kto_kl_estimate_all_reduce_before_clamp() -> None:
    """The all_reduce hook sees the local mean (2) before the clamp: a hook returning t - 5 gives max(0, -3) = 0 and
    one averaging with another rank's mean 4, (t + 4)/2, gives 3."""
    policy = torch.tensor([1.0, 2.0, 3.0])
    seen: list[float] = []

    def shift(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.item())
        return t - 5.0

    assert kto_kl_estimate(policy, torch.zeros(3), all_reduce=shift).item() == 0.0
    assert seen == [2.0]
    assert kto_kl_estimate(policy, torch.zeros(3), all_reduce=lambda t: (t + 4.0) / 2).item() == pytest.approx(3.0)


def test_kto_class_weights() -> None:
    """w_u = 1 and w_d = ratio * n_u / n_d, so w_d*n_d/(w_u*n_u) equals the requested ratio: 100 desirable and 300
    undesirable give (3, 1) (ratio 1); ratio 1.2 gives (3.6, 1); 400 vs 100 gives (0.25, 1)."""
    assert kto_class_weights(100, 300) == (3.0, 1.0)
    w_d, w_u = kto_class_weights(100, 300, desirable_weight=1.2)
    assert (w_d, w_u) == (pytest.approx(3.6), 1.0)
    assert w_d * 100 / (w_u * 300) == pytest.approx(1.2)
    assert kto_class_weights(400, 100) == (0.25, 1.0)


@pytest.mark.parametrize(("n_d", "n_u"), [(0, 5), (5, 0), (-1, 5)])
def test_kto_class_weights_rejects_empty_class(n_d: int, n_u: int) -> None:
    """A missing class cannot be balanced; the error names both counts."""
    with pytest.raises(ValueError, match=f"num_desirable={n_d}, num_undesirable={n_u}"):
        kto_class_weights(n_d, n_u)


def test_kto_class_weights_rejects_bad_ratio() -> None:
    with pytest.raises(ValueError, match="desirable_weight must be"):
        kto_class_weights(1, 1, desirable_weight=0.0)


@pytest.mark.parametrize("loss_fn", PAIRWISE_LOSSES)
@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan")])
def test_pairwise_bad_beta(loss_fn, beta: float) -> None:
    with pytest.raises(ValueError, match="beta must be a finite number > 0, got"):
        loss_fn(*pair_inputs([1.0]), beta=beta)


@pytest.mark.parametrize("loss_fn", PAIRWISE_LOSSES)
def test_pairwise_infinite_beta(loss_fn) -> None:
    with pytest.raises(ValueError, match="beta must be a finite number > 0, got inf"):
        loss_fn(*pair_inputs([1.0]), beta=float("inf"))


@pytest.mark.parametrize("loss_fn", PAIRWISE_LOSSES)
def test_pairwise_shape_mismatch(loss_fn) -> None:
    """Mismatched shapes are rejected instead of silently broadcasting; the message lists every shape."""
    pc, pr, rc, rr = pair_inputs([1.0, 2.0])
    with pytest.raises(ValueError, match=r"same shape.*ref_rejected_logps=\(1,\)"):
        loss_fn(pc, pr, rc, rr[:1], beta=0.1)


@pytest.mark.parametrize("eps", [-0.1, 0.5, 0.7])
def test_dpo_bad_label_smoothing(eps: float) -> None:
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        dpo_loss(*pair_inputs([1.0]), beta=0.1, label_smoothing=eps)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 0.0}, "beta must be a finite number > 0"),
        ({"beta": 0.1, "desirable_weight": 0.0}, "desirable_weight must be"),
        ({"beta": 0.1, "undesirable_weight": -1.0}, "undesirable_weight must be"),
    ],
)
def test_kto_bad_hyperparameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([True, False]), torch.tensor(0.0), **kwargs)


def test_kto_bad_tensors() -> None:
    """Shape mismatch, non-bool labels and a non-scalar kl each give their own error."""
    desirable = torch.tensor([True, False])
    with pytest.raises(ValueError, match="same shape"):
        kto_loss(torch.zeros(2), torch.zeros(3), desirable, torch.tensor(0.0), beta=0.1)
    with pytest.raises(ValueError, match="same shape"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([True]), torch.tensor(0.0), beta=0.1)
    with pytest.raises(ValueError, match="desirable must be a bool tensor"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1, 0]), torch.tensor(0.0), beta=0.1)
    with pytest.raises(ValueError, match="kl must be a scalar"):
        kto_loss(torch.zeros(2), torch.zeros(2), desirable, torch.zeros(2), beta=0.1)


def test_kto_kl_estimate_bad_inputs() -> None:
    with pytest.raises(ValueError, match="same shape"):
        kto_kl_estimate(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="non-empty"):
        kto_kl_estimate(torch.zeros(0), torch.zeros(0))


def test_score_model_golden_losses() -> None:
    """BT: margins (0, 2) give log(1 + e^-m) = (0.6931, 0.1269). Sign term: c = 1 unsafe and c = 1 safe give
    log(1 + e^-1) = 0.3133 and log(1 + e^1) = 1.3133."""
    bt = bradley_terry_loss(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]))
    assert torch.allclose(bt, torch.tensor([math.log(2), math.log1p(math.exp(-2))]), atol=1e-6)
    sign = cost_sign_loss(torch.tensor([1.0, 1.0]), torch.tensor([True, False]))
    assert torch.allclose(sign, torch.tensor([math.log1p(math.exp(-1)), math.log1p(math.exp(1))]), atol=1e-6)
