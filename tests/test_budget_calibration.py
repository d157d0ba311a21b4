"""The safety budget keeps its promise on a problem whose answer is known: the lambda* it reports, trained by
``SafetyDPO``, gives the safety it predicts.

The problem is tabular (:mod:`tabular`): a pool of prompts, each with the same candidate responses, a known
Bradley-Terry safety score ``h*(x, y) = log COUNTS[x, y] - OFFSET[x]`` behind the safety preference pairs (the pair
batch of :func:`tabular.pair_batch` is the exact infinite-data expectation for the score ``log COUNTS``, and a
per-prompt shift does not change Bradley-Terry preferences), and the probability of being safe
``P(safe | x, y) = sigmoid(h*(x, y))``. The step-1 policy pi_r is a fixed random table.

The budget runs as in the pipeline, with its text generation replaced by exact draws from pi_r: K answers per
prompt, their cost ``-h*`` as a perfect cost model would give it, then :func:`sacpo_lightning.budget.budget_from_costs`
(tilt ``-cost``, constraint ``sigmoid(-cost)``). Step 2 is ``SafetyDPO(beta, lambda*)`` started from and referenced
to pi_r, trained to convergence on the safety pairs; its exact ``E_x E_pi[P(safe)]`` over the whole pool is the
truth the budget's prediction is held to. The prompts the budget samples are drawn from the pool with replacement
(the budget sees a sample of the prompt distribution, as in the pipeline), except at large K, where every prompt of
the pool is used once.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from tabular import EOS, make_step, pair_batch, train_step

from sacpo_lightning.budget import DEFAULT_SAMPLES_PER_PROMPT, budget_from_costs, solve_lambda
from sacpo_lightning.modules import SafetyDPO

POOL = tuple(itertools.islice(itertools.product(range(2, 7), repeat=2), 12))
CANDIDATES = ((4, EOS), (5, EOS), (5, 4, EOS), (6, 5, 4, EOS), (6, EOS))
BETA = 0.5  # != 1, so that a solver that drops beta is visibly wrong
LARGE_K = 4096
SEEDS = 20
LEVEL = 0.9


def _problem() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 7, (len(POOL), len(CANDIDATES)), generator=gen)
    offsets = torch.rand(len(POOL), generator=gen, dtype=torch.float64) * 2.0
    h = counts.double().log() - offsets[:, None]
    pi_r = torch.log_softmax(1.5 * torch.randn(h.shape, generator=gen, dtype=torch.float64), dim=-1)
    return {"counts": counts, "h": h, "safe": torch.sigmoid(h), "pi_r": pi_r}


PROBLEM = _problem()


def exact_safety(logp: torch.Tensor) -> float:
    """``E_x E_pi[P(safe)]`` over the pool, exactly."""
    return float((logp.exp() * PROBLEM["safe"]).sum(-1).mean())


def tilted(lam: float) -> torch.Tensor:
    """The Gibbs tilt ``pi_r exp(lam h* / beta)``, normalised per prompt."""
    return torch.log_softmax(PROBLEM["pi_r"] + lam * PROBLEM["h"] / BETA, dim=-1)


# The budget's target: between the reference's safety and the most that tilting can reach.
REF_SAFETY = exact_safety(PROBLEM["pi_r"])
TOP_SAFETY = exact_safety(tilted(1e4))
B = round(REF_SAFETY + 0.5 * (TOP_SAFETY - REF_SAFETY), 3)


def sample_costs(k: int, prompts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(P, K) costs ``-h*`` of K draws from pi_r for each of the given pool prompts."""
    probs = PROBLEM["pi_r"][prompts].exp()
    answers = torch.multinomial(probs, k, replacement=True, generator=gen)
    return -PROBLEM["h"][prompts].gather(1, answers)


def train_safety_step(lam: float) -> torch.Tensor:
    """SafetyDPO(beta, lam) from and relative to pi_r, trained to convergence on the safety pairs of h*."""
    module = make_step(SafetyDPO, PROBLEM["pi_r"], prompts=POOL, candidates=CANDIDATES, beta=BETA, lam=lam)
    # a large lambda* makes the optimum itself put < e^-15 on the least safe answers
    return train_step(module, pair_batch(PROBLEM["counts"], POOL, CANDIDATES), min_logp=-60.0)


BUDGET_PROMPTS = 96  # prompts the budget samples (drawn from the pool with replacement) in the coverage test


@pytest.fixture(scope="module")
def large_k(one_thread) -> dict:
    """The budget from LARGE_K answers for every prompt of the pool, and the step 2 trained at its lambda*."""
    gen = torch.Generator().manual_seed(1)
    costs = sample_costs(LARGE_K, torch.arange(len(POOL)), gen)
    solution, _, _, report = budget_from_costs(costs, BETA, B, num_resamples=20)
    return {"costs": costs, "solution": solution, "report": report, "trained": train_safety_step(solution.lam)}


def test_problem_is_not_degenerate():
    assert TOP_SAFETY - REF_SAFETY > 0.1 and REF_SAFETY < B < TOP_SAFETY


def test_lambda_star_trained_by_safety_dpo_meets_b_at_large_k(large_k):
    """At large K the trained step 2's exact E[P(safe)] is b within 0.02, and training reached the Gibbs tilt by h*
    (the optimum the budget solves for), at KL coefficient beta / lambda*."""
    solution, trained = large_k["solution"], large_k["trained"]
    assert solution.status == "interior" and large_k["report"]["step2_beta"] == pytest.approx(BETA / solution.lam)
    assert (trained.exp() - tilted(solution.lam).exp()).abs().sum(-1).max().item() / 2 < 1e-5
    assert abs(exact_safety(trained) - B) < 0.02
    assert large_k["report"]["scales"]["constraint"] == "P(safe) = sigmoid(-cost)"


def test_interval_covers_the_trained_safety_at_the_default_k(one_thread):
    """At the default K, over 20 seeds, the exact E[P(safe)] of the step 2 trained at the reported lambda* lies in
    the reported 90% interval of the predicted E[g] in at least 16. A seed whose budget trains no step 2
    (infeasible from its samples) counts as a miss. The interval must also be informative: it excludes the
    reference's safety."""
    k = DEFAULT_SAMPLES_PER_PROMPT
    assert k >= 16
    hits, informative = 0, 0
    for seed in range(SEEDS):
        gen = torch.Generator().manual_seed(100 + seed)
        prompts = torch.randint(len(POOL), (BUDGET_PROMPTS,), generator=gen)
        solution, _, interval, report = budget_from_costs(sample_costs(k, prompts, gen), BETA, B, seed=seed,
                                                          level=LEVEL)
        low, high = report["predicted"]["safety_interval"]
        informative += low > REF_SAFETY
        if report["step2_beta"] is None:
            continue
        hits += low <= exact_safety(train_safety_step(solution.lam)) <= high
    assert hits >= 0.8 * SEEDS, f"{hits} of {SEEDS} seeds inside the {LEVEL:.0%} interval"
    assert informative >= 0.8 * SEEDS


def test_tilting_by_the_safety_transform_misses_b(large_k):
    """Today's older solver tilted by g = sigmoid(-cost) itself: from the same large-K samples its lambda* trained by
    SafetyDPO overshoots b by far more than the 0.02 the budget promises."""
    costs = large_k["costs"]
    old = solve_lambda(None, torch.sigmoid(-costs), BETA, B, reward_in_tilt=False)
    assert old.status == "interior" and old.lam > 2 * large_k["solution"].lam
    assert exact_safety(train_safety_step(old.lam)) - B > 0.03
