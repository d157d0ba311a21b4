"""The safety budget of SACPO: the optimal Lagrange multiplier lambda* estimated from samples of the reference.

Problem and dual
----------------
SACPO (Wachi et al., 2024) solves the constrained alignment problem

    max_pi  E_x E_{y~pi}[r(x, y)] - beta KL(pi || pi_sft)    subject to    E_x E_{y~pi}[g(x, y)] >= b.

For a multiplier lambda >= 0 the Lagrangian ``E[r + lambda g] - beta KL(pi || pi_sft) - lambda b`` is maximised by
``pi*_lambda(y|x) ∝ pi_sft(y|x) exp((r + lambda g) / beta)``, and its value is the dual function

    D(lambda) = beta E_x log E_{y~pi_sft}[exp((r + lambda g) / beta)] - lambda b,

convex in lambda, with ``D'(lambda) = E_x E_{pi*_lambda}[g] - b`` and ``D''(lambda) = E_x Var_{pi*_lambda}[g] / beta``.
Its minimiser over lambda >= 0 is lambda*: 0 when the constraint already holds at lambda = 0, else the root of
``E_x E_{pi*_lambda}[g] = b``.

Which reference, and where r goes (SACPO's step 2)
---------------------------------------------------
Step 1 aligns the reward: ``pi_r ∝ pi_sft exp(r / beta)``. Substituting,

    pi*_lambda ∝ pi_r exp(lambda g / beta),

which is the maximiser of ``E[g] - (beta / lambda) KL(pi || pi_r)``: SACPO's step 2, aligning the safety g with KL
coefficient ``beta / lambda`` relative to the step-1 model. The dual becomes
``beta E_x log Z_r(x) + beta E_x log E_{y~pi_r}[exp(lambda g / beta)] - lambda b``; the first term does not depend on
lambda. So with samples of the **step-1 model** the right form is r = 0 in the exponent: the same lambda*, the same
D', and D up to a constant. Putting r in the exponent again would tilt pi_r by ``exp(r / beta)`` a second time
(``pi_sft exp(2 r / beta)``). Hence the ``reward_in_tilt`` switch of :func:`solve_lambda` and
:func:`predicted_curve`:

- ``reward_in_tilt=False`` (the pipeline's case): samples come from pi_r; only g enters the weights
  ``lambda g / beta``; reward scores, when given, are only *reported* (E[r] under pi*_lambda: what safety costs in
  helpfulness).
- ``reward_in_tilt=True``: samples come from pi_sft and the whole problem is solved at once, weights
  ``(r + lambda g) / beta``; r must then be on the scale of the reward that step 1 used.

The step-2 KL coefficient for the found multiplier is :attr:`BudgetSolution.step2_beta` = ``beta / lambda*``.

Tilt score and constraint score
-------------------------------
Step 2 does not maximise ``E[g]`` for an arbitrary g: it runs DPO at ``beta' = beta / lambda`` on safety preference
pairs. If those pairs follow a Bradley-Terry model with score h, ``P(y_1 > y_2 | x) = sigmoid(h(x, y_1) - h(x, y_2))``,
DPO's expected loss is minimised where ``beta' log(pi / pi_r)`` equals h up to a per-prompt constant, i.e. at

    pi_lambda(y|x) = pi_r(y|x) exp(lambda h(x, y) / beta) / Z_lambda(x),

the Gibbs tilt by **h**, whatever scale the user states the budget on. So two scores enter:

- the tilt score h, on the Bradley-Terry scale of the preference data. A cost model trained on those pairs
  estimates it as ``h = -cost`` (its pairwise term is ``-log sigmoid(c_u - c_s)``);
- the constraint score g, on the user's scale of b: ``g = P(safe) = sigmoid(-cost)`` (the default) or ``g = -cost``.

lambda* solves ``F(lambda) = E_x E_{pi_lambda}[g] = b``, estimated per prompt with the self-normalised weights
``w_k ∝ exp(lambda h_k / beta)`` (``tilt`` of :func:`solve_lambda`; with ``tilt=None``, h = g and F is D' above).
Differentiating ``E_w[g] = sum_k g_k exp(lambda h_k / beta) / sum_j exp(lambda h_j / beta)``,

    dF / dlambda = E_x Cov_{pi_lambda}(g, h) / beta,

and the covariance of two non-decreasing functions of the same variable is >= 0 (Chebyshev's sum inequality): when
g is a non-decreasing function of h within each prompt (``sigmoid(h)``, ``h`` itself), F is non-decreasing and
bisection finds its unique root. :func:`solve_lambda` checks that condition on the samples. A score that is not on
a Bradley-Terry scale of the preference data (a label classifier's logits or probabilities) cannot supply h; the
sampling step (:mod:`sacpo_lightning.budget_sampling`) refuses one. Tilting by g = sigmoid(-cost) instead (slope at
most 1/4) models a far weaker tilt than the one DPO applies, so its lambda* overshoots b.

Only losses whose optimum is this tilt keep the promise: DPO's sigmoid loss without label smoothing does; KTO's
stationary point, IPO's (which regresses on preference probabilities) and the hinge loss's are not of this form, and
the pipeline refuses them unless ``safety_budget.allow_approximate_loss`` is set.

Estimators
----------
From K samples ``y_1..y_K ~ pi_ref(.|x)`` per prompt (P prompts, scores as (P, K) arrays) with tilt
``s_k = (r_k + lambda g_k) / beta`` (r_k = 0 without reward tilt):

- ``log E_{pi_ref}[exp(s)] ≈ logsumexp_k s_k - log K`` (stable for any lambda);
- ``E_{pi*_lambda}[f] ≈ sum_k w_k f_k`` with ``w = softmax(s)`` (self-normalised importance sampling,
  :mod:`sacpo_lightning.importance`);
- ``KL(pi*_lambda || pi_ref) ≈ sum_k w_k log(K w_k)`` (the KL of the weights from uniform);
- the effective sample size ``1 / sum_k w_k^2`` per prompt, K at lambda = 0 (without reward tilt), falling as lambda
  concentrates the weight on the safest samples.

As lambda grows, ``E_{pi*_lambda}[g]`` rises to ``E_x max_k g(x, y_k)`` (g at the largest h): the most safety
reachable by reweighting these samples. A budget ``b`` at or above it has no finite lambda* and is reported as
``"infeasible"``. All of this is a sample estimate, and the messages say "from these samples":

- Self-normalised weights over K samples shrink the estimated E[g] toward the reference mean, so the estimated
  lambda* is biased upward: for a binary g with reference probability 0.3 and b = 0.6 the expected estimate is 1.55
  times the population lambda* at K = 4 and 1.08 times at K = 16. The default K is therefore 16
  (``DEFAULT_SAMPLES_PER_PROMPT``).
- The ESS warning (:func:`ess_is_low`) fires when the mean per-prompt effective sample size at lambda* is below K / 4
  (``ESS_WARN_FRACTION``): a relative rule, which can fire for every K (the ESS lies in [1, K]).
- :func:`bootstrap_budget` gives intervals for lambda* and for the predicted E[g] at lambda*, resampling prompts and,
  within each, samples.
- ``"at_max"`` (the root lies beyond ``lam_max``) predicts E[g] < b at ``lam_max`` by construction: no step-2
  coefficient is given unless ``allow_at_max``.

Safety scores from a cost model
-------------------------------
Safe RLHF's cost model gives ``cost > 0`` for unsafe responses (:mod:`sacpo_lightning.evaluation.score_models`).
:func:`safety_from_cost` turns it into g: ``"prob_safe"`` (the default of the sampling step), ``g = sigmoid(-cost)``
in [0, 1], so that b reads as a target average probability of being safe; or ``"neg_cost"``, ``g = -cost``, the
constraint ``E[cost] <= -b`` of Safe RLHF.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sacpo_lightning.checks import check_finite, check_nonnegative, check_positive
from sacpo_lightning.importance import normalized_weights, snis_mean
from sacpo_lightning.io import atomic_write_file, atomic_write_json
from sacpo_lightning.merge_weight import effective_lambda
from sacpo_lightning.plotting import pyplot

__all__ = [
    "SAFETY_TRANSFORMS",
    "BudgetSolution",
    "LambdaCurve",
    "bootstrap_budget",
    "budget_from_costs",
    "budget_report",
    "default_lambdas",
    "dual_derivative",
    "dual_objective",
    "ess_is_low",
    "plot_curve",
    "predicted_curve",
    "safety_from_cost",
    "solve_lambda",
    "write_budget_json",
]

SAFETY_TRANSFORMS = ("prob_safe", "neg_cost")
STATUSES = ("zero", "interior", "at_max", "infeasible")

# Default lam_max makes the largest tilt gap within a prompt LAM_MAX_TILT nats: the weights are then an argmax.
LAM_MAX_TILT = 1000.0
# Samples per prompt by default: with fewer the self-normalised weights bias lambda* visibly upward (module docstring).
DEFAULT_SAMPLES_PER_PROMPT = 16
# The ESS warning fires when the mean effective sample size at lambda* is below this fraction of K (ess_is_low).
ESS_WARN_FRACTION = 0.25
DEFAULT_RESAMPLES = 200
DEFAULT_LEVEL = 0.9


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------


def _scores(values: Any, name: str, like: Tensor | None = None) -> Tensor:
    """(P, K) float64 tensor of finite scores, or a clear error."""
    try:
        t = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a (P, K) array of numbers: {err}") from None
    if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{name} must be a (P, K) array (P prompts, K samples each), got shape {tuple(t.shape)}")
    if like is not None and t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but safety has shape {tuple(like.shape)}")
    bad = ~torch.isfinite(t)
    if bad.any():
        p, k = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} has {int(bad.sum())} NaN or infinite values (first at prompt {p}, sample {k})")
    return t


def _inputs(
    rewards: Any, safety: Any, reward_in_tilt: bool, tilt: Any | None = None
) -> tuple[Tensor | None, Tensor, Tensor | None, Tensor]:
    """(rewards, constraint scores g, rewards in the tilt or None, tilt scores h) as checked float64 (P, K) tensors;
    ``h = g`` when ``tilt`` is None."""
    g = _scores(safety, "safety")
    r = _scores(rewards, "rewards", like=g) if rewards is not None else None
    if reward_in_tilt and r is None:
        raise ValueError("reward_in_tilt=True needs reward scores (rewards is None)")
    h = g if tilt is None else _scores(tilt, "tilt", like=g)
    if tilt is not None:
        _check_monotone(h, g)
    return r, g, (r if reward_in_tilt else None), h


def _check_monotone(h: Tensor, g: Tensor) -> None:
    """E_w[g] rises with lambda when g is a non-decreasing function of h within each prompt (module docstring)."""
    order = h.argsort(dim=1, stable=True)
    g_sorted, h_sorted = g.gather(1, order), h.gather(1, order)
    # a drop of g between two samples is allowed only where their h ties (then the order between them is arbitrary)
    drop = (g_sorted[:, 1:] < g_sorted[:, :-1] - 1e-12) & (h_sorted[:, 1:] > h_sorted[:, :-1])
    if drop.any():
        p = int(drop.nonzero()[0, 0])
        raise ValueError(f"the constraint score g must be a non-decreasing function of the tilt score h within each "
                         f"prompt (prompt {p} has a sample with higher h and lower g), else E[g] under "
                         "pi_ref exp(lambda h / beta) need not rise with lambda and lambda* is not unique")


def _log_weights(tilt_rewards: Tensor | None, h: Tensor, lam: Tensor | float, beta: float) -> Tensor:
    """``(r + lam h) / beta``; with a (L,) tensor ``lam`` the result is (L, P, K), with a (R,) one and (R, P, K)
    scores (a bootstrap) it is (R, P, K)."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    lam = lam.reshape(-1, 1, 1) if lam.dim() == 1 else lam
    s = lam * h
    if tilt_rewards is not None:
        s = s + tilt_rewards
    return s / beta


# ----------------------------------------------------------------------------------------------------------------------
# Dual function
# ----------------------------------------------------------------------------------------------------------------------


def dual_objective(rewards: Any | None, safety: Any, lam: float, beta: float, b: float) -> float:
    """Sample estimate of the dual ``D(lambda) = beta E_x log E_{pi_ref}[exp((r + lambda g) / beta)] - lambda b``.

    Args:
        rewards: (P, K) rewards **in the exponent**, or None for r = 0: SACPO's step 2, whose reference (the step-1
            model) already carries r (module docstring).
        safety: (P, K) safety scores g of K samples of pi_ref for each of P prompts.
        lam: The multiplier, >= 0.
        beta: KL coefficient to pi_ref, > 0.
        b: The safety budget (the constraint is ``E[g] >= b``).

    Returns:
        ``beta * mean_x (logsumexp_k (r + lam g) / beta - log K) - lam * b``.
    """
    beta = check_positive("beta", beta)
    r, g, r_tilt, h = _inputs(rewards, safety, reward_in_tilt=rewards is not None)
    lam, b = check_nonnegative("lambda", lam), check_finite("the safety budget b", b)
    s = _log_weights(r_tilt, h, lam, beta)
    log_mean_exp = torch.logsumexp(s, dim=-1) - math.log(g.shape[1])
    return float(beta * log_mean_exp.mean() - lam * b)


def dual_derivative(
    rewards: Any | None, safety: Any, lam: float, beta: float, b: float, *, tilt: Any | None = None
) -> float:
    """``E_x E_{pi*_lambda}[g] - b`` (non-decreasing in lambda), with the arguments of :func:`dual_objective` and
    ``tilt`` of :func:`solve_lambda`; with ``tilt=None`` it is ``D'(lambda)``."""
    beta = check_positive("beta", beta)
    r, g, r_tilt, h = _inputs(rewards, safety, reward_in_tilt=rewards is not None, tilt=tilt)
    lam, b = check_nonnegative("lambda", lam), check_finite("the safety budget b", b)
    return _expected_safety(r_tilt, h, g, lam, beta) - b


def _expected_safety(r_tilt: Tensor | None, h: Tensor, g: Tensor, lam: float, beta: float) -> float:
    mean, _ = snis_mean(g, _log_weights(r_tilt, h, lam, beta))
    return float(mean.mean())


# ----------------------------------------------------------------------------------------------------------------------
# Predictions under pi*_lambda
# ----------------------------------------------------------------------------------------------------------------------


def _predict(
    r: Tensor | None, g: Tensor, r_tilt: Tensor | None, h: Tensor, lams: Tensor, beta: float
) -> dict[str, Tensor | None]:
    """(L,) prompt-averaged E[g], E[r], KL and mean/min ESS under pi*_lambda for each of the (L,) ``lams``."""
    s = _log_weights(r_tilt, h, lams, beta)  # (L, P, K)
    safety, ess = snis_mean(g, s)
    reward = snis_mean(r, s)[0].mean(-1) if r is not None else None
    # KL(w || uniform) = E_w[s] - logmeanexp(s): written with s rather than log w, which is -inf where w underflows.
    w = normalized_weights(s)
    kl = (w * s).sum(-1) - (torch.logsumexp(s, dim=-1) - math.log(g.shape[1]))
    return {"safety": safety.mean(-1), "reward": reward, "kl": kl.clamp_min(0.0).mean(-1),
            "ess_mean": ess.mean(-1), "ess_min": ess.min(-1).values}


@dataclass(frozen=True)
class LambdaCurve:
    """Predicted quantities under pi*_lambda along a grid of multipliers (prompt averages; lists of length L).

    Attributes:
        lambdas: The multipliers.
        safety: E_x E_{pi*_lambda}[g].
        reward: E_x E_{pi*_lambda}[r] (None without reward scores).
        kl: E_x KL(pi*_lambda || pi_ref).
        ess_mean, ess_min: Mean and smallest per-prompt effective sample size (out of ``samples_per_prompt``).
    """

    lambdas: list[float]
    safety: list[float]
    reward: list[float] | None
    kl: list[float]
    ess_mean: list[float]
    ess_min: list[float]
    beta: float
    samples_per_prompt: int
    reward_in_tilt: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def predicted_curve(
    rewards: Any | None,
    safety: Any,
    beta: float,
    lambdas: Sequence[float] | Tensor,
    *,
    reward_in_tilt: bool,
    tilt: Any | None = None,
) -> LambdaCurve:
    """E[g], E[r], KL to the reference and ESS under pi*_lambda for each lambda, from the same K samples per prompt.

    Args:
        rewards: (P, K) reward scores of the samples, or None.
        safety: (P, K) safety scores g.
        beta: KL coefficient, > 0.
        lambdas: (L,) multipliers, each >= 0.
        reward_in_tilt: False when the samples come from SACPO's step-1 model (r is already in pi_ref: weights
            ``lambda g / beta``, rewards only reported); True when they come from pi_sft (weights
            ``(r + lambda g) / beta``). See the module docstring.
        tilt: (P, K) tilt scores h (see :func:`solve_lambda`); None: h = g.
    """
    beta = check_positive("beta", beta)
    r, g, r_tilt, h = _inputs(rewards, safety, reward_in_tilt, tilt)
    lams = torch.as_tensor(lambdas, dtype=torch.float64).reshape(-1)
    if lams.numel() == 0:
        raise ValueError("lambdas must not be empty")
    if not (torch.isfinite(lams).all() and (lams >= 0).all()):
        raise ValueError(f"lambdas must be finite and >= 0, got {lams.tolist()}")
    out = _predict(r, g, r_tilt, h, lams, beta)
    return LambdaCurve(
        lambdas=lams.tolist(),
        safety=out["safety"].tolist(),
        reward=out["reward"].tolist() if out["reward"] is not None else None,
        kl=out["kl"].tolist(),
        ess_mean=out["ess_mean"].tolist(),
        ess_min=out["ess_min"].tolist(),
        beta=float(beta),
        samples_per_prompt=int(g.shape[1]),
        reward_in_tilt=reward_in_tilt,
    )


def default_lambdas(beta: float, lam_star: float | None = None, num: int = 41) -> list[float]:
    """0, then ``num - 1`` geometrically spaced multipliers from ``beta / 100`` to ``max(100 beta, 4 lam_star)``,
    plus ``lam_star`` itself (sorted)."""
    beta = check_positive("beta", beta)
    if num < 2:
        raise ValueError(f"num must be >= 2, got {num}")
    top = max(100.0 * beta, 4.0 * lam_star if lam_star else 0.0)
    grid = torch.logspace(math.log10(beta / 100.0), math.log10(top), num - 1, dtype=torch.float64).tolist()
    values = {0.0, *grid}
    if lam_star is not None and math.isfinite(lam_star):
        values.add(float(lam_star))
    return sorted(values)


# ----------------------------------------------------------------------------------------------------------------------
# Solving for lambda*
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetSolution:
    """The estimated optimal multiplier and what it predicts, all estimated from the K samples per prompt given.

    Attributes:
        lam: lambda*. ``status`` says how to read it:

            - ``"zero"``: the constraint holds at lambda = 0 (``safety_ref >= b``); lam = 0, no safety step needed.
            - ``"interior"``: lam solves ``E[g] = b``.
            - ``"at_max"``: b is reachable in the limit (``b < safety_max``) but lambda* > ``lam_max``; lam =
              ``lam_max`` is a lower bound, where the predicted E[g] is below b. No step 2 is trained there unless
              ``allow_at_max``.
            - ``"infeasible"``: ``b >= safety_max``, the most safety reachable by reweighting these samples; no
              finite lambda meets it. lam = ``lam_max`` and ``safety`` is the capped prediction there.
        message: A sentence saying the above with the numbers (and the ESS warning, see ``ess_low``).
        safety, reward, kl, ess_mean, ess_min: Predictions under pi*_lam (see :class:`LambdaCurve`).
        safety_ref, reward_ref: The same at lambda = 0.
        safety_max: ``E_x max_k g``: the limit of the predicted safety as lambda grows.
        ess_low: The mean effective sample size at lam is below ``ESS_WARN_FRACTION * K``.
        allow_at_max: Whether an ``at_max`` solution still gives a step-2 coefficient.
        separate_tilt: Whether the weights used a tilt score h other than g.
    """

    lam: float
    status: str
    message: str
    safety: float
    reward: float | None
    kl: float
    ess_mean: float
    ess_min: float
    safety_ref: float
    reward_ref: float | None
    safety_max: float
    beta: float
    b: float
    lam_max: float
    reward_in_tilt: bool
    num_prompts: int
    samples_per_prompt: int
    iterations: int
    ess_low: bool = False
    allow_at_max: bool = False
    separate_tilt: bool = False

    @property
    def feasible(self) -> bool:
        return self.status != "infeasible"

    @property
    def step2_beta(self) -> float | None:
        """SACPO's step-2 KL coefficient ``beta / lambda*`` relative to the step-1 model; None when no step 2 should
        be trained: ``zero`` (not needed), ``infeasible``, and ``at_max`` unless ``allow_at_max``."""
        if (self.status == "interior" or (self.status == "at_max" and self.allow_at_max)) and self.lam > 0:
            return self.beta / self.lam
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "step2_beta": self.step2_beta, "feasible": self.feasible}


def _find_root(
    deriv: Callable[[float], float], start: float, lam_max: float, rtol: float, max_iter: int
) -> tuple[float, str, int]:
    """``(lam, status, iterations)``: the root of the non-decreasing ``deriv`` (negative at 0) below ``lam_max``.

    Brackets the root by doubling from ``start`` (a tilt of one nat across the widest prompt), then bisects until the
    bracket is narrower than ``rtol * upper end`` or ``max_iter`` steps; ``"at_max"`` with ``lam_max`` when the
    derivative is still negative there.
    """
    lo, hi = 0.0, start
    while deriv(hi) < 0:
        if hi >= lam_max:
            return float(lam_max), "at_max", 0
        lo, hi = hi, min(2.0 * hi, lam_max)
    iterations = 0
    while hi - lo > rtol * hi and iterations < max_iter:
        mid = 0.5 * (lo + hi)
        if deriv(mid) < 0:
            lo = mid
        else:
            hi = mid
        iterations += 1
    return 0.5 * (lo + hi), "interior", iterations


def _default_lam_max(h: Tensor, beta: float) -> float:
    spread = float((h.max(dim=1).values - h.min(dim=1).values).max())
    return LAM_MAX_TILT * beta / spread if spread > 0 else beta


def solve_lambda(
    rewards: Any | None,
    safety: Any,
    beta: float,
    b: float,
    *,
    reward_in_tilt: bool,
    tilt: Any | None = None,
    lam_max: float | None = None,
    allow_at_max: bool = False,
    rtol: float = 1e-12,
    max_iter: int = 200,
) -> BudgetSolution:
    """Solves ``E_x E_w[g] = b`` for lambda >= 0 by bisection (its left side is non-decreasing in lambda).

    Args:
        rewards: (P, K) reward scores of the samples, or None.
        safety: (P, K) constraint scores g of K samples of pi_ref for each of P prompts (the user's scale of b).
        beta: KL coefficient, > 0.
        b: Safety budget: the constraint is ``E_x E_pi[g] >= b``.
        reward_in_tilt: See :func:`predicted_curve` (False for samples of SACPO's step-1 model).
        tilt: (P, K) tilt scores h on the Bradley-Terry scale of the step-2 preference data, the score whose
            ``exp(lambda h / beta)`` step 2 (DPO at ``beta / lambda``) multiplies pi_ref by; g must be a
            non-decreasing function of h within each prompt. None: h = g (g itself is on that scale).
        lam_max: Largest multiplier searched; None: ``1000 beta / max_x (max_k h - min_k h)``, where the weights
            are already an argmax.
        allow_at_max: Give an ``at_max`` solution a step-2 coefficient (it undershoots b by construction).
        rtol: Stop when the bracket is narrower than ``rtol * upper end``.
        max_iter: Most bisection steps.

    Returns:
        A :class:`BudgetSolution`; check ``status`` (and ``step2_beta``) before using ``lam``.
    """
    beta = check_positive("beta", beta)
    r, g, r_tilt, h = _inputs(rewards, safety, reward_in_tilt, tilt)
    b = check_finite("the safety budget b", b)
    if lam_max is None:
        lam_max = _default_lam_max(h, beta)
    elif not (math.isfinite(lam_max) and lam_max > 0):
        raise ValueError(f"lam_max must be a finite number > 0, got {lam_max!r}")
    safety_max = float(_safety_limit(h, g).mean())

    def deriv(lam: float) -> float:
        return _expected_safety(r_tilt, h, g, lam, beta) - b

    iterations = 0
    if deriv(0.0) >= 0:
        lam, status = 0.0, "zero"
    elif b >= safety_max:
        lam, status = float(lam_max), "infeasible"
    else:
        spread = float((h.max(dim=1).values - h.min(dim=1).values).max())
        lam, status, iterations = _find_root(deriv, min(beta / spread, lam_max), lam_max, rtol, max_iter)

    at = _predict(r, g, r_tilt, h, torch.tensor([lam, 0.0], dtype=torch.float64), beta)
    pred = {k: (float(v[0]) if v is not None else None) for k, v in at.items()}
    ref = {k: (float(v[1]) if v is not None else None) for k, v in at.items()}
    num_prompts, k = g.shape
    message = _message(status, lam, b, ref["safety"], pred["safety"], safety_max, lam_max, allow_at_max)
    ess_low = lam > 0 and ess_is_low(pred["ess_mean"], k)
    if ess_low:
        message += (f" Mean effective sample size at lambda* is {pred['ess_mean']:.2f} of K = {k} (below "
                    f"K * {ESS_WARN_FRACTION:g}): the prediction rests on few samples; draw more per prompt.")
    return BudgetSolution(
        lam=lam, status=status, message=message, safety=pred["safety"], reward=pred["reward"], kl=pred["kl"],
        ess_mean=pred["ess_mean"], ess_min=pred["ess_min"], safety_ref=ref["safety"], reward_ref=ref["reward"],
        safety_max=safety_max, beta=float(beta), b=b, lam_max=float(lam_max), reward_in_tilt=reward_in_tilt,
        num_prompts=int(num_prompts), samples_per_prompt=int(k), iterations=iterations, ess_low=ess_low,
        allow_at_max=allow_at_max, separate_tilt=tilt is not None,
    )


def ess_is_low(ess_mean: float, samples_per_prompt: int) -> bool:
    """The budget's ESS warning rule: the mean per-prompt effective sample size is below ``ESS_WARN_FRACTION`` (1/4)
    of K. It can fire for every K >= 2 (the ESS lies in [1, K]); at K = 16 it fires below 4 effective samples."""
    return ess_mean < ESS_WARN_FRACTION * samples_per_prompt


def _safety_limit(h: Tensor, g: Tensor) -> Tensor:
    """(..., P) limit of E_w[g] as lambda grows: the mean of g over the samples of largest h of each prompt."""
    top = h == h.max(dim=-1, keepdim=True).values
    return (g * top).sum(-1) / top.sum(-1)


def _message(
    status: str, lam: float, b: float, ref: float, pred: float, top: float, lam_max: float, allow_at_max: bool
) -> str:
    if status == "zero":
        return (f"The reference already meets the budget from these samples: E[g] = {ref:.4g} >= b = {b:.4g}; "
                "lambda* = 0.")
    if status == "interior":
        return f"From these samples, lambda* = {lam:.6g} raises E[g] from {ref:.4g} to b = {b:.4g}."
    if status == "at_max":
        trained = ("step 2 is trained there anyway (allow_at_max)" if allow_at_max else
                   "no step 2 is trained (set allow_at_max, safety_budget.allow_at_max in a pipeline, to train at "
                   "lam_max anyway)")
        return (f"From these samples, b = {b:.4g} is below the reachable maximum {top:.4g} but needs lambda > "
                f"lam_max = {lam_max:.4g} (E[g] = {pred:.4g} there); raise lam_max; {trained}.")
    return (f"Infeasible: b = {b:.4g} is at or above the most safety reachable from these samples, "
            f"E_x max_k g = {top:.4g}; no finite lambda meets it (E[g] = {pred:.4g} at lam_max = {lam_max:.4g}).")


# ----------------------------------------------------------------------------------------------------------------------
# Bootstrap interval
# ----------------------------------------------------------------------------------------------------------------------


def _solve_batch(h: Tensor, g: Tensor, beta: float, b: float, lam_max: float, steps: int = 60) -> Tensor:
    """(R,) lambda* of R (P, K) problems at once (no reward tilt): 0 where E[g] >= b at 0, inf where b is not
    below the reachable limit or needs lambda > lam_max, else the bisection root."""
    def mean_g(lam: Tensor) -> Tensor:
        return snis_mean(g, _log_weights(None, h, lam, beta))[0].mean(-1)

    r = h.shape[0]
    lo = torch.zeros(r, dtype=torch.float64)
    hi = torch.full((r,), float(lam_max), dtype=torch.float64)
    zero = mean_g(lo) >= b
    unreachable = (mean_g(hi) < b) | (_safety_limit(h, g).mean(-1) <= b)
    # bisection in log lambda from lam_max * 1e-12 up: the root's relative precision is what matters
    log_lo = torch.full((r,), math.log(lam_max) - 12 * math.log(10.0), dtype=torch.float64)
    log_hi = torch.full((r,), math.log(lam_max), dtype=torch.float64)
    for _ in range(steps):
        mid = 0.5 * (log_lo + log_hi)
        below = mean_g(mid.exp()) < b
        log_lo = torch.where(below, mid, log_lo)
        log_hi = torch.where(below, log_hi, mid)
    lam = (0.5 * (log_lo + log_hi)).exp()
    lam = torch.where(zero, torch.zeros_like(lam), lam)
    return torch.where(unreachable & ~zero, torch.full_like(lam, math.inf), lam)


def _quantile(values: Tensor, q: float) -> float:
    """Order-statistic quantile (no interpolation, so that infinite values are handled)."""
    s = values.sort().values
    return float(s[min(len(s) - 1, max(0, int(math.floor(q * len(s)))))])


def bootstrap_budget(
    safety: Any,
    beta: float,
    b: float,
    lam_star: float,
    *,
    tilt: Any | None = None,
    lam_max: float | None = None,
    num_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> dict[str, Any]:
    """Bootstrap intervals for lambda* and for the predicted E[g] at ``lam_star``, from the same (P, K) samples
    (samples of SACPO's step-1 model; no reward tilt).

    Each resample draws P prompts with replacement and, within each drawn prompt, K of its samples with replacement,
    then solves for lambda* again and predicts E[g] at the given ``lam_star``. lambda*'s interval is the percentile
    interval of the resampled roots (its upper end is infinite when more than ``(1 - level) / 2`` of the resamples
    reach no root below ``lam_max``). The predicted E[g]'s interval is the basic (reflected) bootstrap interval
    ``[2 m - q_hi, 2 m - q_lo]`` around the prediction m from all samples: it corrects, to first order, the downward
    bias of self-normalised weights over few samples, which resampling within prompts reproduces.

    Args:
        safety: (P, K) constraint scores g.
        beta: KL coefficient, > 0.
        b: The budget.
        lam_star: The multiplier whose prediction gets an interval (the solution's lambda*).
        tilt: (P, K) tilt scores h, or None for h = g (see :func:`solve_lambda`).
        lam_max: Largest multiplier searched (None: as :func:`solve_lambda`).
        num_resamples: Bootstrap resamples, >= 10.
        level: Two-sided coverage, in (0, 1).
        seed: Seed of the resampling.

    Returns:
        ``{level, num_resamples, seed, lambda_star: [low, high], safety: [low, high], infeasible_fraction}``.
    """
    beta, b = check_positive("beta", beta), check_finite("the safety budget b", b)
    lam_star = check_nonnegative("lambda", lam_star)
    _, g, _, h = _inputs(None, safety, False, tilt)
    if not (isinstance(num_resamples, int) and num_resamples >= 10):
        raise ValueError(f"num_resamples must be an integer >= 10, got {num_resamples!r}")
    if not (0 < level < 1):
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if lam_max is None:
        lam_max = _default_lam_max(h, beta)
    p, k = g.shape
    gen = torch.Generator().manual_seed(int(seed))
    prompts = torch.randint(p, (num_resamples, p, 1), generator=gen)
    samples = torch.randint(k, (num_resamples, p, k), generator=gen)
    g_b = g[prompts, samples]
    h_b = h[prompts, samples]
    lams = _solve_batch(h_b, g_b, beta, b, float(lam_max))
    pred = snis_mean(g_b, _log_weights(None, h_b, lam_star, beta))[0].mean(-1)
    m = float(snis_mean(g, _log_weights(None, h, lam_star, beta))[0].mean())
    a = (1.0 - level) / 2.0
    return {
        "level": level, "num_resamples": num_resamples, "seed": int(seed),
        "lambda_star": [_quantile(lams, a), _quantile(lams, 1.0 - a)],
        "safety": [2 * m - _quantile(pred, 1.0 - a), 2 * m - _quantile(pred, a)],
        "infeasible_fraction": float(torch.isinf(lams).double().mean()),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Safety transform, report, plot
# ----------------------------------------------------------------------------------------------------------------------


def safety_from_cost(costs: Any, transform: str = "prob_safe") -> Tensor:
    """Safety scores g from cost-model scores (``cost > 0``: unsafe).

    Args:
        costs: (...) costs.
        transform: ``"prob_safe"``: ``g = sigmoid(-cost)`` in [0, 1], the cost model's probability that the response
            is safe (its classification term is ``-log sigmoid(-cost)`` for safe responses), so b is a target
            average probability of being safe. ``"neg_cost"``: ``g = -cost``.

    Returns:
        float64 tensor shaped like ``costs``.
    """
    c = torch.as_tensor(costs, dtype=torch.float64)
    if transform == "prob_safe":
        return torch.sigmoid(-c)
    if transform == "neg_cost":
        return -c
    raise ValueError(f"safety transform must be one of {SAFETY_TRANSFORMS}, got {transform!r}")


TILT_SCALE = "-cost (Bradley-Terry score of the safety preference data, as the cost model estimates it)"
CONSTRAINT_SCALES = {"prob_safe": "P(safe) = sigmoid(-cost)", "neg_cost": "-cost"}


def budget_from_costs(
    costs: Any,
    beta: float,
    b: float,
    *,
    rewards: Any | None = None,
    safety_transform: str = "prob_safe",
    reward_in_tilt: bool = False,
    lam_max: float | None = None,
    allow_at_max: bool = False,
    lambdas: Sequence[float] | None = None,
    lambda_fractions: Sequence[float] = (),
    num_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    inputs: dict[str, Any] | None = None,
) -> tuple[BudgetSolution, LambdaCurve, dict[str, Any] | None, dict[str, Any]]:
    """The budget from cost-model scores of K samples per prompt of the step-1 model: tilt ``h = -cost``,
    constraint ``g = safety_from_cost(cost, safety_transform)`` (module docstring).

    Args:
        costs: (P, K) costs (``cost > 0``: unsafe) from a cost model trained on the safety preference pairs.
        beta: KL coefficient, > 0.
        b: Budget on the scale of ``safety_transform``.
        rewards: (P, K) reward scores, or None (reported along the curve; in the tilt with ``reward_in_tilt``).
        safety_transform: ``prob_safe`` or ``neg_cost``.
        reward_in_tilt, lam_max, allow_at_max: As for :func:`solve_lambda`.
        lambdas: The curve's grid; None: :func:`default_lambdas` around lambda*.
        lambda_fractions: q whose ``q * lambda*`` join the grid (P-SACPO merges).
        num_resamples, level, seed: The bootstrap (:func:`bootstrap_budget`; none with ``reward_in_tilt``).
        inputs: The report's ``inputs`` section.

    Returns:
        ``(solution, curve, interval or None, report)``, the report as :func:`budget_report` plus ``scales``.
    """
    c = _scores(costs, "costs")
    safety, tilt = safety_from_cost(c, safety_transform), -c
    solution = solve_lambda(rewards, safety, beta, b, reward_in_tilt=reward_in_tilt, tilt=tilt, lam_max=lam_max,
                            allow_at_max=allow_at_max)
    interval = None
    if not reward_in_tilt:
        interval = bootstrap_budget(safety, beta, b, solution.lam, tilt=tilt, lam_max=solution.lam_max,
                                    num_resamples=num_resamples, level=level, seed=seed)
    lam_star = solution.lam if solution.status in ("interior", "at_max") else None
    grid = list(lambdas) if lambdas is not None else default_lambdas(beta, lam_star)
    merge_lambdas = {} if lam_star is None else {q: effective_lambda(q, lam_star) for q in lambda_fractions}
    if merge_lambdas:
        grid = sorted(set(grid) | set(merge_lambdas.values()))
    curve = predicted_curve(rewards, safety, beta, grid, reward_in_tilt=reward_in_tilt, tilt=tilt)
    report = budget_report(solution, curve, inputs, interval)
    # The predictions for the P-SACPO merges, keyed by their weight q; the grid holds each q * lambda* exactly.
    position = {lam: i for i, lam in enumerate(curve.lambdas)}
    report["merges"] = {f"{q:g}": {"q": q, "lambda": lam, "safety": curve.safety[position[lam]]}
                        for q, lam in merge_lambdas.items()}
    report["scales"] = {"tilt": TILT_SCALE, "constraint": CONSTRAINT_SCALES[safety_transform]}
    return solution, curve, interval, report


def _finite_or_none(obj: Any) -> Any:
    """Strict JSON has no NaN or Infinity: they become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(v) for v in obj]
    return obj


def budget_report(
    solution: BudgetSolution,
    curve: LambdaCurve,
    inputs: dict[str, Any] | None = None,
    interval: dict[str, Any] | None = None,
) -> dict:
    """The content of ``budget.json``: ``samples_per_prompt`` (K), ``lambda_star``, ``lambda_star_interval``,
    ``status``, ``message``, ``step2_beta``, ``predicted`` (at lambda*, with ``safety_interval``), ``reference`` (at
    lambda = 0), ``interval`` (:func:`bootstrap_budget`'s result, or None), ``solution`` (every field), ``curve`` and
    ``inputs``."""
    interval = dict(interval) if interval is not None else None
    return {
        "samples_per_prompt": solution.samples_per_prompt,
        "lambda_star": solution.lam,
        "lambda_star_interval": interval["lambda_star"] if interval else None,
        "status": solution.status,
        "message": solution.message,
        "step2_beta": solution.step2_beta,
        "predicted": {"safety": solution.safety, "reward": solution.reward, "kl": solution.kl,
                      "ess_mean": solution.ess_mean, "ess_min": solution.ess_min, "ess_low": solution.ess_low,
                      "safety_interval": interval["safety"] if interval else None},
        "interval": interval,
        "reference": {"safety": solution.safety_ref, "reward": solution.reward_ref,
                      "safety_max": solution.safety_max},
        "solution": solution.to_dict(),
        "curve": curve.to_dict(),
        "inputs": dict(inputs or {}),
    }


def write_budget_json(path: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Writes ``report`` as strict JSON (non-finite floats as null), atomically."""
    atomic_write_json(path, _finite_or_none(report))
    return Path(path)


def plot_curve(
    curve: LambdaCurve,
    path: str | os.PathLike,
    *,
    b: float | None = None,
    lam_star: float | None = None,
    interval: dict[str, Any] | None = None,
) -> Path:
    """Writes a PNG (e.g. ``lambda_curve.png``) of E[g], E[r] and KL, and ESS against lambda, atomically.

    The x axis is symmetric-log when the grid spans several decades (so that lambda = 0 stays on it). With
    ``interval`` (:func:`bootstrap_budget`) lambda*'s interval is shaded on every panel and the predicted E[g]'s
    interval at lambda* is drawn as an error bar.
    """
    plt = pyplot()
    lams = curve.lambdas
    fig, axes = plt.subplots(3, 1, figsize=(6.5, 8), sharex=True)
    try:
        ax_g, ax_kl, ax_ess = axes
        ax_g.plot(lams, curve.safety, marker=".", color="tab:green", label="E[g] under pi*_lambda")
        if b is not None:
            ax_g.axhline(b, color="tab:red", ls="--", lw=1, label=f"budget b = {b:.3g}")
        ax_g.set_ylabel("predicted safety E[g]")
        ax_kl.plot(lams, curve.kl, marker=".", color="tab:purple", label="KL(pi*_lambda || pi_ref)")
        ax_kl.set_ylabel("KL to reference (nats)")
        if curve.reward is not None:
            ax_r = ax_kl.twinx()
            ax_r.plot(lams, curve.reward, marker=".", color="tab:blue", label="E[r]")
            ax_r.set_ylabel("predicted reward E[r]", color="tab:blue")
            ax_r.legend(loc="lower right", fontsize=8)
        ax_ess.plot(lams, curve.ess_mean, marker=".", label="mean ESS")
        ax_ess.plot(lams, curve.ess_min, marker=".", label="min ESS")
        ax_ess.axhline(curve.samples_per_prompt, color="grey", ls=":", lw=1, label=f"K = {curve.samples_per_prompt}")
        ax_ess.set_ylabel("effective sample size")
        ax_ess.set_xlabel("lambda")
        positive = [x for x in lams if x > 0]
        if positive and max(positive) / min(positive) > 100:
            ax_ess.set_xscale("symlog", linthresh=min(positive))
        if len(lams) > 1:
            ax_ess.set_xlim(min(lams), max(lams))
        if interval is not None and lam_star is not None and math.isfinite(lam_star):
            low, high = interval["safety"]
            mid = 0.5 * (low + high)
            ax_g.errorbar([lam_star], [mid], yerr=[[mid - low], [high - mid]], color="black", capsize=4,
                          label=f"{interval['level']:.0%} interval of E[g] at lambda*")
        for ax in axes:
            if lam_star is not None and math.isfinite(lam_star):
                ax.axvline(lam_star, color="black", ls="--", lw=0.8)
            if interval is not None and interval["lambda_star"][0] is not None:
                low, high = interval["lambda_star"]
                high = high if high is not None and math.isfinite(high) else max(lams)
                ax.axvspan(low, high, color="grey", alpha=0.15, lw=0)
            ax.grid(True, alpha=0.3)
            ax.legend(loc="upper left", fontsize=8)
        title = f"pi*_lambda ∝ pi_ref exp({'(r + lambda g)' if curve.reward_in_tilt else 'lambda g'} / beta), "
        title += f"beta = {curve.beta:g}"
        if lam_star is not None:
            title += f", lambda* = {lam_star:.4g}"
        ax_g.set_title(title, fontsize=10)
        fig.tight_layout()
        atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return Path(path)


def pick_merge_weight(report: dict[str, Any], candidates: dict[str, float], b: float) -> dict[str, Any]:
    """P-SACPO after the fact: among merges of step 1 with the lambda* model (``{model name: q}``, the lambda* model
    itself at q = 1), the one whose measured safety meets ``b`` with the least loss of helpfulness.

    Safety is the evaluation report's constraint check (``report["safety"]["models"][m]["constraint"]``: measured
    safety with its interval and verdict ``meets`` / ``fails`` / ``undetermined``); helpfulness is the mean reward on
    the helpfulness prompts, with the bootstrap interval of the win rate against the baseline. A model counts as meeting
    ``b`` when its whole interval is at or above ``b``; when none does, models whose point estimate meets ``b`` are
    considered and the pick is marked ``undetermined``.

    Returns:
        ``{b, pick, q, status, message, candidates: [{model, q, safety, ci_low, ci_high, verdict, mean_reward,
        helpfulness_win_rate, helpfulness_ci}]}``.
    """
    rows = []
    models = report.get("models", {})
    safety_models = (report.get("safety") or {}).get("models", {})
    for name, q in sorted(candidates.items(), key=lambda item: item[1]):
        constraint = (safety_models.get(name) or {}).get("constraint")
        if constraint is None:
            continue
        entry = models.get(name, {})
        helpful = entry.get("helpfulness") or {}
        rows.append({
            "model": name, "q": q, "safety": constraint.get("safety"), "ci_low": constraint.get("ci_low"),
            "ci_high": constraint.get("ci_high"), "verdict": constraint.get("verdict"),
            "mean_reward": ((entry.get("scores") or {}).get("helpful") or {}).get("mean_reward"),
            "helpfulness_win_rate": helpful.get("win_rate"),
            "helpfulness_ci": [helpful.get("ci_low"), helpful.get("ci_high")],
        })
    if not rows:
        return {"b": b, "pick": None, "q": None, "status": "no_data", "candidates": rows,
                "message": "no candidate has a measured safety (configure evaluate.safety_judges and a threshold)"}
    meets = [r for r in rows if r["verdict"] == "meets"]
    status = "meets"
    if not meets:
        meets = [r for r in rows if r["safety"] is not None and r["safety"] >= b]
        status = "undetermined"
    if not meets:
        return {"b": b, "pick": None, "q": None, "status": "none_meets", "candidates": rows,
                "message": f"no merge weight meets b={b:g}: the safest, {max(rows, key=lambda r: r['safety'])['model']}"
                           f", measures {max(r['safety'] for r in rows):.3f}"}

    def helpfulness(row: dict[str, Any]) -> float:
        value = row["mean_reward"] if row["mean_reward"] is not None else row["helpfulness_win_rate"]
        return float("-inf") if value is None else float(value)

    best = max(meets, key=lambda r: (helpfulness(r), -r["q"]))
    ci = best["helpfulness_ci"]
    interval = f" (win-rate interval {ci[0]:.2f}-{ci[1]:.2f})" if None not in ci else ""
    message = (f"q={best['q']:g} ({best['model']}): safety {best['safety']:.3f} [{best['ci_low']:.3f}, "
               f"{best['ci_high']:.3f}] {'meets' if status == 'meets' else 'meets by point estimate only'} "
               f"b={b:g}; mean reward {helpfulness(best):.3f}{interval}")
    return {"b": b, "pick": best["model"], "q": best["q"], "status": status, "message": message, "candidates": rows}
