"""The safety budget: closed-form lambda*, dual identities, the curve, and the sample-and-score step on tiny models.

Closed forms. With r = 0 and K samples of pi_ref per prompt (uniform weights 1/K), pi*_lambda puts weight
``e^{lambda g_k / beta} / sum_j e^{lambda g_j / beta}`` on sample k. For one prompt with g = (0, 1):
``E[g] = sigmoid(lambda / beta)``, so ``E[g] = b`` gives ``lambda* = beta log(b / (1 - b))``;
``D(lambda) = beta log((1 + e^{lambda / beta}) / 2) - lambda b``; ``KL = log 2 + sum_k w_k log w_k``;
``ESS = 1 / (w_0^2 + w_1^2)``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sacpo_lightning.budget import (
    LambdaCurve,
    bootstrap_budget,
    budget_from_costs,
    budget_report,
    default_lambdas,
    dual_derivative,
    dual_objective,
    plot_curve,
    predicted_curve,
    safety_from_cost,
    solve_lambda,
    write_budget_json,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def random_scores(p: int = 5, k: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(p, k, generator=gen, dtype=torch.float64), torch.rand(p, k, generator=gen, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------------------
# Closed-form lambda*
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_two_responses_closed_form(beta):
    """g = (0, 1), r = 0, b = 0.8: lambda* = beta log 4. beta = 0.1 and 2 tell lambda/beta from lambda*beta; the
    step-2 KL coefficient is beta / lambda* = 1 / log 4 for any beta."""
    sol = solve_lambda(None, [[0.0, 1.0]], beta, 0.8, reward_in_tilt=False)
    assert sol.status == "interior" and sol.feasible
    assert sol.lam == pytest.approx(beta * math.log(4.0), rel=1e-9)
    assert sol.safety == pytest.approx(0.8, abs=1e-9)
    assert sol.safety_ref == pytest.approx(0.5) and sol.safety_max == 1.0
    assert sol.step2_beta == pytest.approx(1.0 / math.log(4.0), rel=1e-9)
    assert sol.reward is None and sol.ess_mean == pytest.approx(1.0 / (0.8**2 + 0.2**2), rel=1e-9)
    # NumPy arrays and scalars are accepted as well.
    from_numpy = solve_lambda(None, np.array([[0.0, 1.0]], dtype=np.float32), np.float32(beta), np.float64(0.8),
                              reward_in_tilt=False)
    assert from_numpy.lam == pytest.approx(sol.lam, rel=1e-6)


def test_reference_probability_of_the_safe_sample():
    """g = (0, 0, 1): pi_ref puts 1/3 on the safe sample, E[g] = e^t / (2 + e^t) with t = lambda/beta; b = 0.5 gives
    e^t = 2, lambda* = beta log 2 (a solver that ignored the repeated unsafe sample would find 0)."""
    sol = solve_lambda(None, [[0.0, 0.0, 1.0]], 0.3, 0.5, reward_in_tilt=False)
    assert sol.status == "interior" and sol.lam == pytest.approx(0.3 * math.log(2.0), rel=1e-9)


def test_prompts_are_averaged_not_pooled():
    """Prompt A g = (0, 1), prompt B g = (1, 1): E[g] = (sigmoid(t) + 1) / 2 = 0.9 gives sigmoid(t) = 0.8,
    lambda* = beta log 4. Pooling the four samples into one softmax would give 3e^t / (1 + 3e^t) = 0.9, beta log 3."""
    sol = solve_lambda(None, [[0.0, 1.0], [1.0, 1.0]], 0.1, 0.9, reward_in_tilt=False)
    assert sol.lam == pytest.approx(0.1 * math.log(4.0), rel=1e-9) and sol.num_prompts == 2
    # Identical prompts are one prompt.
    _, g = random_scores(1, 6)
    b = float(g.mean() + 0.5 * (g.max() - g.mean()))
    one = solve_lambda(None, g, 0.2, b, reward_in_tilt=False)
    three = solve_lambda(None, g.repeat(3, 1), 0.2, b, reward_in_tilt=False)
    assert one.status == "interior" and three.lam == pytest.approx(one.lam, rel=1e-9)


def test_reward_in_the_tilt_or_only_reported():
    """r = (0, -0.5), g = (0, 1), beta = 0.1, b = 0.8.

    In the tilt (samples of pi_sft): E[g] = sigmoid((lambda - 0.5) / beta), lambda* = beta log 4 + 0.5; at lambda = 0
    the weight on the safe sample is sigmoid(-5). Only reported (samples of SACPO's step-1 model, r already in pi_ref):
    lambda* = beta log 4 and E[r] = 0.8 * (-0.5) = -0.4 at lambda*, -0.25 at lambda = 0.
    """
    r, g = [[0.0, -0.5]], [[0.0, 1.0]]
    tilted = solve_lambda(r, g, 0.1, 0.8, reward_in_tilt=True)
    assert tilted.lam == pytest.approx(0.1 * math.log(4.0) + 0.5, rel=1e-9)
    assert tilted.reward == pytest.approx(-0.4, abs=1e-9)
    assert tilted.safety_ref == pytest.approx(sigmoid(-5.0), rel=1e-9)
    assert tilted.reward_ref == pytest.approx(-0.5 * sigmoid(-5.0), rel=1e-9)
    reported = solve_lambda(r, g, 0.1, 0.8, reward_in_tilt=False)
    assert reported.lam == pytest.approx(0.1 * math.log(4.0), rel=1e-9)
    assert reported.reward == pytest.approx(-0.4, abs=1e-9) and reported.reward_ref == pytest.approx(-0.25)
    assert reported.ess_mean == pytest.approx(1.0 / (0.8**2 + 0.2**2), rel=1e-9)
    with pytest.raises(ValueError, match="reward_in_tilt=True needs reward"):
        solve_lambda(None, g, 0.1, 0.8, reward_in_tilt=True)


@pytest.mark.parametrize("b", [-1.0, 0.4, 0.5])
def test_budget_already_met(b):
    """E_ref[g] = 0.5 >= b: lambda* = 0, no step-2 coefficient; b = 0.5 exactly is met."""
    sol = solve_lambda(None, [[0.0, 1.0]], 0.1, b, reward_in_tilt=False)
    assert sol.status == "zero" and sol.lam == 0.0 and sol.step2_beta is None
    assert sol.safety == pytest.approx(0.5) and sol.ess_mean == pytest.approx(2.0)


def test_reward_tilt_can_meet_the_budget():
    """r = (0, 1), g = (0, 1), beta = 0.1: with r in the tilt pi*_0 puts sigmoid(10) on the safe sample, so b = 0.9
    is met at lambda = 0; with r only reported lambda* = beta log 9."""
    assert solve_lambda([[0.0, 1.0]], [[0.0, 1.0]], 0.1, 0.9, reward_in_tilt=True).status == "zero"
    sol = solve_lambda([[0.0, 1.0]], [[0.0, 1.0]], 0.1, 0.9, reward_in_tilt=False)
    assert sol.status == "interior" and sol.lam == pytest.approx(0.1 * math.log(9.0), rel=1e-9)


@pytest.mark.parametrize(("g", "b", "top"), [([[0.0, 0.0], [0.0, 1.0]], 0.6, 0.5), ([[0.0, 1.0]], 1.0, 1.0),
                                             ([[0.0, 1.0]], 1.5, 1.0)])
def test_infeasible_budget(g, b, top):
    """The most safety reachable by reweighting is E_x max_k g (0.5 when one prompt has no safe sample; the maximum
    over all samples, 1, would miss it); b at or above it is reported infeasible, with the capped prediction."""
    sol = solve_lambda(None, g, 0.1, b, reward_in_tilt=False, lam_max=50.0)
    assert sol.status == "infeasible" and not sol.feasible and sol.step2_beta is None
    assert sol.safety_max == top and sol.lam == 50.0
    assert sol.safety == pytest.approx(top, abs=1e-9) and sol.safety <= b
    assert "Infeasible" in sol.message and f"{top:.4g}" in sol.message


def test_root_beyond_lam_max():
    """b = 0.8 needs lambda* = 0.1 log 4 = 0.139 > lam_max = 0.05: at_max, lam = lam_max, E[g] = sigmoid(0.5)."""
    sol = solve_lambda(None, [[0.0, 1.0]], 0.1, 0.8, reward_in_tilt=False, lam_max=0.05)
    assert sol.status == "at_max" and sol.lam == 0.05 and sol.feasible
    assert sol.safety == pytest.approx(sigmoid(0.5), rel=1e-12) and "lam_max" in sol.message
    # E[g] < b there by construction: no step 2 unless the user opts in, and the message names the option
    assert sol.step2_beta is None and "allow_at_max" in sol.message
    opted = solve_lambda(None, [[0.0, 1.0]], 0.1, 0.8, reward_in_tilt=False, lam_max=0.05, allow_at_max=True)
    assert opted.step2_beta == pytest.approx(0.1 / 0.05)


def test_ess_warning_fires_relative_to_k():
    """One prompt, K = 8 samples with g = (0, ..., 0, 1): E[g] = b = 0.9 puts weight 0.9 on one sample, ESS =
    1 / (0.9^2 + 7 (0.1 / 7)^2) = 1.23 < K / 4 = 2: the warning fires (the rule ``ess < 0.1 K`` cannot at K <= 10,
    since ESS >= 1); at b = 0.4 the ESS is 4.73 >= 2 and it does not."""
    g = [[0.0] * 7 + [1.0]]
    low = solve_lambda(None, g, 0.1, 0.9, reward_in_tilt=False)
    assert low.ess_mean == pytest.approx(1 / (0.81 + 7 * (0.1 / 7) ** 2), rel=1e-9)
    assert low.ess_low and "effective sample size" in low.message
    fine = solve_lambda(None, g, 0.1, 0.4, reward_in_tilt=False)
    assert fine.ess_mean == pytest.approx(1 / (0.16 + 7 * (0.6 / 7) ** 2), rel=1e-9)
    assert fine.ess_mean > 2.0 and not fine.ess_low and "effective sample size" not in fine.message


def test_separate_tilt_and_constraint_scores():
    """Weights from h, the constraint on g = sigmoid(h): at lambda* the h-tilted mean of g is b, and it differs from
    tilting by g itself. A g that is not a non-decreasing function of h is refused."""
    h = torch.tensor([[-2.0, 0.0, 1.5, 3.0], [-1.0, -0.5, 0.5, 2.0]], dtype=torch.float64)
    g = torch.sigmoid(h)
    beta, b = 0.2, 0.75
    sol = solve_lambda(None, g, beta, b, reward_in_tilt=False, tilt=h)
    w = torch.softmax(sol.lam * h / beta, dim=1)
    assert sol.status == "interior" and float((w * g).sum(1).mean()) == pytest.approx(b, rel=1e-9)
    assert dual_derivative(None, g, sol.lam, beta, b, tilt=h) == pytest.approx(0.0, abs=1e-9)
    assert sol.separate_tilt and sol.lam != pytest.approx(solve_lambda(None, g, beta, b, reward_in_tilt=False).lam)
    with pytest.raises(ValueError, match="non-decreasing function of the tilt score"):
        solve_lambda(None, g.flip(1), beta, b, reward_in_tilt=False, tilt=h)


def test_bootstrap_interval():
    """The bootstrap brackets the full-sample lambda* and prediction, is seeded, and shrinks with more prompts."""
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(40, 16, generator=gen, dtype=torch.float64)
    g = torch.sigmoid(h)
    beta, b = 0.5, 0.65
    sol = solve_lambda(None, g, beta, b, reward_in_tilt=False, tilt=h)
    out = bootstrap_budget(g, beta, b, sol.lam, tilt=h, num_resamples=100)
    assert out == bootstrap_budget(g, beta, b, sol.lam, tilt=h, num_resamples=100)
    low, high = out["lambda_star"]
    assert low < sol.lam < high and out["safety"][0] < b < out["safety"][1] and out["infeasible_fraction"] == 0
    few = bootstrap_budget(g[:10], beta, b, sol.lam, tilt=h[:10], num_resamples=100)
    assert few["safety"][1] - few["safety"][0] > out["safety"][1] - out["safety"][0]
    with pytest.raises(ValueError, match="level"):
        bootstrap_budget(g, beta, b, sol.lam, level=1.5)


def test_default_lam_max_reaches_near_saturated_budgets():
    """b = 0.999999 needs lambda* = beta log(999999) = 13.8 beta, well inside the default lam_max."""
    sol = solve_lambda(None, [[0.0, 1.0], [0.0, 1.0]], 0.05, 0.999999, reward_in_tilt=False)
    assert sol.status == "interior" and sol.lam == pytest.approx(0.05 * math.log(999999.0), rel=1e-8)


# ----------------------------------------------------------------------------------------------------------------------
# The dual function
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.05, 0.3, 2.0])
def test_dual_closed_form(lam):
    """D(lambda) = beta log((1 + e^{lambda/beta}) / 2) - lambda b and D' = sigmoid(lambda / beta) - b for g = (0, 1)."""
    beta, b = 0.1, 0.8
    expected = beta * (math.log1p(math.exp(lam / beta)) - math.log(2.0)) - lam * b
    assert dual_objective(None, [[0.0, 1.0]], lam, beta, b) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert dual_derivative(None, [[0.0, 1.0]], lam, beta, b) == pytest.approx(sigmoid(lam / beta) - b, rel=1e-12)


def test_dual_identities_on_random_scores():
    """For any lambda, D(lambda) = E*[r] + lambda (E*[g] - b) - beta KL(pi* || pi_ref) under the estimated pi*; D' is
    the finite difference of D; D is convex; and the solver's lambda* minimises D on a grid."""
    r, g = random_scores()
    beta, b = 0.3, float(g.mean()) + 0.15
    lams = [0.0, 0.01, 0.1, 0.3, 0.7, 1.5, 3.0]
    curve = predicted_curve(r, g, beta, lams, reward_in_tilt=True)
    for i, lam in enumerate(lams):
        identity = curve.reward[i] + lam * (curve.safety[i] - b) - beta * curve.kl[i]
        assert dual_objective(r, g, lam, beta, b) == pytest.approx(identity, rel=1e-10, abs=1e-12)
        h = 1e-5
        fd = (dual_objective(r, g, lam + h, beta, b) - dual_objective(r, g, max(lam - h, 0.0), beta, b)) / (
            lam + h - max(lam - h, 0.0))
        assert dual_derivative(r, g, lam, beta, b) == pytest.approx(fd, abs=1e-6)
    grid = torch.linspace(0.0, 3.0, 61, dtype=torch.float64).tolist()
    values = torch.tensor([dual_objective(r, g, lam, beta, b) for lam in grid])
    assert (values[:-2] - 2 * values[1:-1] + values[2:] >= -1e-12).all()
    sol = solve_lambda(r, g, beta, b, reward_in_tilt=True)
    assert sol.status == "interior" and 0 < sol.lam < 3.0
    assert dual_objective(r, g, sol.lam, beta, b) <= values.min().item() + 1e-12
    assert dual_derivative(r, g, sol.lam, beta, b) == pytest.approx(0.0, abs=1e-9)


def test_large_multipliers_are_stable():
    """lambda / beta = 1e9: logsumexp keeps D finite, equal to its limit lambda (E_x max_k g - b) - beta log K
    (each prompt's unique maximum)."""
    r, g = random_scores(3, 4)
    lam, beta, b = 1e6, 1e-3, 0.5
    top = g.max(dim=1).values.mean().item()
    assert dual_objective(None, g, lam, beta, b) == pytest.approx(lam * (top - b) - beta * math.log(4), rel=1e-9)
    assert dual_derivative(None, g, lam, beta, b) == pytest.approx(top - b, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# The curve
# ----------------------------------------------------------------------------------------------------------------------


def test_curve_closed_form():
    """g = (0, 1), beta = 0.2: E[g] = sigmoid(t), KL = log 2 + sum w log w, ESS = 1 / sum w^2 with t = lambda/beta;
    E[r] for r = (1, 3) is 1 + 2 sigmoid(t) (only reported)."""
    lams = [0.0, 0.1, 0.5, 1.0]
    curve = predicted_curve([[1.0, 3.0]], [[0.0, 1.0]], 0.2, lams, reward_in_tilt=False)
    for i, lam in enumerate(lams):
        w1 = sigmoid(lam / 0.2)
        w = (1 - w1, w1)
        assert curve.safety[i] == pytest.approx(w1, rel=1e-12)
        assert curve.reward[i] == pytest.approx(1 + 2 * w1, rel=1e-12)
        assert curve.kl[i] == pytest.approx(math.log(2) + sum(x * math.log(x) for x in w), abs=1e-12)
        assert curve.ess_mean[i] == pytest.approx(1 / sum(x * x for x in w), rel=1e-12) == curve.ess_min[i]
    # A second prompt with g = (0, 0) keeps uniform weights (ESS 2): mean ESS (ESS_A + 2) / 2, min ESS_A.
    two = predicted_curve(None, [[0.0, 1.0], [0.0, 0.0]], 0.2, [0.5], reward_in_tilt=False)
    w1 = sigmoid(0.5 / 0.2)
    ess_a = 1 / (w1**2 + (1 - w1) ** 2)
    assert two.ess_min[0] == pytest.approx(ess_a, rel=1e-12) and two.ess_mean[0] == pytest.approx((ess_a + 2) / 2)
    assert two.safety[0] == pytest.approx(w1 / 2, rel=1e-12)


def test_curve_monotone_and_ess_at_zero():
    """E[g] and KL(pi* || pi_ref) are non-decreasing in lambda; at lambda = 0 the weights are uniform (ESS = K,
    KL = 0) unless r is in the tilt."""
    r, g = random_scores(6, 8, seed=1)
    lams = default_lambdas(0.1, 0.4)
    assert lams[0] == 0.0 and 0.4 in lams and lams == sorted(lams) and max(lams) >= 10.0
    curve = predicted_curve(r, g, 0.1, lams, reward_in_tilt=False)
    assert all(b >= a - 1e-12 for a, b in zip(curve.safety, curve.safety[1:], strict=False))
    assert all(b >= a - 1e-12 for a, b in zip(curve.kl, curve.kl[1:], strict=False))
    assert curve.ess_mean[0] == pytest.approx(8.0) and curve.ess_min[0] == pytest.approx(8.0)
    assert curve.kl[0] == pytest.approx(0.0, abs=1e-12) and curve.safety[0] == pytest.approx(g.mean().item())
    top = g.max(1).values.mean().item()
    assert curve.ess_min[-1] < 2.0 and curve.safety[0] < curve.safety[-1] <= top
    assert predicted_curve(r, g, 0.1, [1e4], reward_in_tilt=False).safety[0] == pytest.approx(top, rel=1e-12)
    tilted = predicted_curve(r, g, 0.1, [0.0], reward_in_tilt=True)
    assert tilted.ess_mean[0] < 8.0 and tilted.kl[0] > 0


# ----------------------------------------------------------------------------------------------------------------------
# Validation, transforms, outputs
# ----------------------------------------------------------------------------------------------------------------------


def test_bad_input():
    g = [[0.0, 1.0]]
    cases = [
        (lambda: solve_lambda(None, g, 0.0, 0.5, reward_in_tilt=False), "beta must be a finite number > 0"),
        (lambda: solve_lambda(None, g, float("nan"), 0.5, reward_in_tilt=False), "beta"),
        (lambda: solve_lambda(None, g, 0.1, float("inf"), reward_in_tilt=False), "budget b must be a finite"),
        (lambda: solve_lambda(None, [[0.0, float("nan")]], 0.1, 0.5, reward_in_tilt=False),
         r"safety has 1 NaN or infinite values \(first at prompt 0, sample 1\)"),
        (lambda: solve_lambda([[0.0, 1.0, 2.0]], g, 0.1, 0.5, reward_in_tilt=False),
         r"rewards has shape \(1, 3\) but safety has shape \(1, 2\)"),
        (lambda: solve_lambda(None, [0.0, 1.0], 0.1, 0.5, reward_in_tilt=False), r"\(P, K\) array"),
        (lambda: solve_lambda(None, g, 0.1, 0.5, reward_in_tilt=False, lam_max=-1.0), "lam_max"),
        (lambda: dual_objective(None, g, -0.1, 0.1, 0.5), "lambda must be a finite number >= 0"),
        (lambda: predicted_curve(None, g, 0.1, [0.0, -1.0], reward_in_tilt=False), "lambdas must be finite"),
        (lambda: safety_from_cost([0.0], "prob"), "safety transform must be one of"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_safety_from_cost():
    """prob_safe: g = sigmoid(-cost) (cost 0 -> 0.5, cost 2 -> sigmoid(-2), cost -2 -> sigmoid(2)); neg_cost: -cost."""
    costs = [[0.0, 2.0, -2.0]]
    assert safety_from_cost(costs).tolist()[0] == pytest.approx([0.5, sigmoid(-2.0), sigmoid(2.0)], rel=1e-12)
    assert safety_from_cost(costs, "neg_cost").tolist() == [[-0.0, -2.0, 2.0]]


def test_plot_and_json(tmp_path):
    sol = solve_lambda(None, [[0.0, 1.0]], 0.1, 0.8, reward_in_tilt=False)
    curve = predicted_curve([[0.0, 1.0]], [[0.0, 1.0]], 0.1, default_lambdas(0.1, sol.lam), reward_in_tilt=False)
    png = plot_curve(curve, tmp_path / "lambda_curve.png", b=0.8, lam_star=sol.lam)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*tmp*"))
    report = budget_report(sol, curve, {"beta": 0.1, "odd": float("inf")})
    path = write_budget_json(tmp_path / "budget.json", report)

    def strict(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    loaded = json.loads(path.read_text(), parse_constant=strict)
    assert loaded["lambda_star"] == pytest.approx(0.1 * math.log(4)) and loaded["status"] == "interior"
    assert loaded["step2_beta"] == pytest.approx(1 / math.log(4)) and loaded["inputs"] == {"beta": 0.1, "odd": None}
    assert loaded["predicted"]["safety"] == pytest.approx(0.8) and loaded["reference"]["safety_max"] == 1.0
    assert LambdaCurve(**loaded["curve"]) == curve


# ----------------------------------------------------------------------------------------------------------------------
# Sampling and scoring with tiny models
# ----------------------------------------------------------------------------------------------------------------------

PROMPTS = ["How do I bake bread?", "Tell me a joke", "What is the capital of France?"]


@pytest.fixture(scope="module")
def score_dirs(tiny_model_dir, tmp_path_factory):
    """Cost and reward folders: the tiny Llama with a random one-output head (scaled up so scores spread)."""
    from sacpo_lightning.models import load_tokenizer
    from sacpo_lightning.models.classifier import load_sequence_classifier

    tokenizer = load_tokenizer(tiny_model_dir)
    dirs = {}
    for seed, kind in enumerate(("cost", "reward")):
        torch.manual_seed(seed)
        model = load_sequence_classifier(tiny_model_dir, num_labels=1, pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            model.score.weight.mul_(50.0)
        path = tmp_path_factory.mktemp(kind) / kind
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[kind] = str(path)
    return dirs


@pytest.mark.usefixtures("one_thread")
def test_estimate_budget_end_to_end(tiny_model_dir, score_dirs, tmp_path, monkeypatch):
    from sacpo_lightning import budget_sampling
    from sacpo_lightning.evaluation import generation
    from sacpo_lightning.evaluation.generation import GenerationSettings, read_generations
    from sacpo_lightning.evaluation.score_models import ScoreModel

    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps([{"prompt": p} for p in PROMPTS]))
    settings = GenerationSettings(do_sample=True, max_new_tokens=6, batch_size=6, seed=1, device="cpu")
    k, beta, out = 4, 0.1, tmp_path / "budget"

    def run(b, **kwargs):
        return budget_sampling.estimate_budget(tiny_model_dir, prompts_file, k, beta, b, score_dirs["cost"],
                                               score_dirs["reward"], out, generation=settings, **kwargs)

    first = run(0.0)  # sigmoid(-cost) > 0: already met
    assert first["status"] == "zero" and first["lambda_star"] == 0.0 and first["step2_beta"] is None

    # K contiguous samples per prompt, and sampling (not greedy) gives different responses.
    rows = read_generations(out / "samples" / "samples.jsonl")
    assert [r["prompt"] for r in rows] == [p for p in PROMPTS for _ in range(k)]
    responses = [r["response"] for r in rows]
    assert any(len(set(responses[i * k : (i + 1) * k])) > 1 for i in range(len(PROMPTS)))

    # The same numbers from the samples scored independently.
    prompts = [r["prompt"] for r in rows]
    costs = torch.tensor(ScoreModel.from_pretrained(score_dirs["cost"], device="cpu").score(prompts, responses))
    rewards = torch.tensor(ScoreModel.from_pretrained(score_dirs["reward"], device="cpu").score(prompts, responses))
    g = torch.sigmoid(-costs.double()).reshape(len(PROMPTS), k)
    r = rewards.double().reshape(len(PROMPTS), k)
    assert first["reference"]["safety"] == pytest.approx(g.mean().item(), rel=1e-6)
    assert first["reference"]["safety_max"] == pytest.approx(g.max(1).values.mean().item(), rel=1e-6)
    assert first["predicted"]["reward"] == pytest.approx(r.mean().item(), rel=1e-6, abs=1e-7)

    # Another budget reuses the samples and scores: nothing is loaded again.
    def no_load(*args, **kwargs):
        raise AssertionError("cached samples and scores should have been reused")

    monkeypatch.setattr(generation, "load_generation_model", no_load)
    monkeypatch.setattr(ScoreModel, "from_pretrained", no_load)
    b = 0.5 * (first["reference"]["safety"] + first["reference"]["safety_max"])
    second = run(b)
    h = -costs.double().reshape(len(PROMPTS), k)
    expected = solve_lambda(r, g, beta, b, reward_in_tilt=False, tilt=h)
    assert second["status"] == "interior" and expected.status == "interior"
    assert second["lambda_star"] == pytest.approx(expected.lam, rel=1e-6)
    # tilted by the Bradley-Terry score -cost, not by g = sigmoid(-cost): another lambda*
    assert expected.lam != pytest.approx(solve_lambda(r, g, beta, b, reward_in_tilt=False).lam, rel=1e-3)
    assert second["samples_per_prompt"] == k and second["scales"]["tilt"].startswith("-cost")
    assert second["scales"]["constraint"] == "P(safe) = sigmoid(-cost)"
    low, high = second["lambda_star_interval"]
    assert low <= second["lambda_star"] and (high is None or high >= low)
    s_low, s_high = second["predicted"]["safety_interval"]
    assert s_low <= s_high and second["interval"]["level"] == 0.9
    assert second["predicted"]["safety"] == pytest.approx(b, rel=1e-6)
    assert second["predicted"]["reward"] == pytest.approx(expected.reward, rel=1e-6, abs=1e-7)
    assert second["step2_beta"] == pytest.approx(beta / expected.lam, rel=1e-6)
    curve = second["curve"]
    assert curve["lambdas"][0] == 0.0 and curve["ess_mean"][0] == pytest.approx(k)
    assert second["lambda_star"] in curve["lambdas"] and curve["reward"] is not None
    inputs = second["inputs"]
    assert inputs["samples_per_prompt"] == k and inputs["b"] == b and inputs["beta"] == beta
    assert inputs["reference_model"] == tiny_model_dir and inputs["prompts_file"] == str(prompts_file)
    assert inputs["safety_scorer"] == score_dirs["cost"] and inputs["reward_scorer"] == score_dirs["reward"]
    assert inputs["safety_transform"] == "prob_safe" and inputs["generation"]["temperature"] == 1.0
    assert json.loads((out / "budget.json").read_text()) == second
    assert (out / "lambda_curve.png").read_bytes()[:4] == b"\x89PNG"

    # neg_cost changes g, not the cached raw scores.
    neg = run(float((-costs.double()).reshape(len(PROMPTS), k).mean()) + 1e-3, safety_transform="neg_cost")
    assert neg["status"] == "interior" and neg["reference"]["safety"] == pytest.approx(-costs.double().mean().item(),
                                                                                      rel=1e-6)

    with pytest.raises(ValueError, match="temperature=1.0"):
        budget_sampling.estimate_budget(tiny_model_dir, prompts_file, k, beta, b, score_dirs["cost"], None, out,
                                        generation=GenerationSettings(do_sample=True, temperature=0.7))
    with pytest.raises(ValueError, match="samples_per_prompt must be an integer >= 2"):
        budget_sampling.estimate_budget(tiny_model_dir, prompts_file, 1, beta, b, score_dirs["cost"], None, out,
                                        generation=settings)


def test_merge_predictions_are_keyed_by_q_at_q_times_lambda_star():
    """budget.json's ``merges`` holds, for each merge weight q, the prediction at exactly q * lambda*, the value the
    curve takes there (computed independently by predicted_curve)."""
    costs = torch.randn(6, 16, generator=torch.Generator().manual_seed(4))
    solution, curve, _, report = budget_from_costs(costs, 0.1, 0.6, lambda_fractions=[0.25, 0.5], num_resamples=20)
    assert solution.status == "interior"
    lam = solution.lam
    assert set(report["merges"]) == {"0.25", "0.5"}
    for q in (0.25, 0.5):
        entry = report["merges"][f"{q:g}"]
        assert entry["q"] == q and entry["lambda"] == q * lam
        alone = predicted_curve(None, torch.sigmoid(-costs), 0.1, [q * lam], reward_in_tilt=False, tilt=-costs)
        assert entry["safety"] == pytest.approx(alone.safety[0], abs=1e-6)
    assert budget_from_costs(costs, 0.1, 0.6, num_resamples=20)[3]["merges"] == {}
