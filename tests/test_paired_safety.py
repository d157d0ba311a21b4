"""Paired safety differences: a model against another on the same prompts, answer by answer."""

from __future__ import annotations

import random

import pytest

from sacpo_lightning.errors import UserError
from sacpo_lightning.evaluation.report import (
    bootstrap_mean_ci,
    paired_safety_differences,
    render_markdown,
    safety_section,
    wilson_interval,
)
from sacpo_lightning.evaluation.settings import EvaluationSettings


def test_estimates_are_the_mean_per_prompt_differences():
    probs = {"step2": [0.9, 0.1, 0.8, 0.2], "step1": [0.9, 0.9, 0.7, 0.1]}
    out = paired_safety_differences(probs, [("step2", "step1")], n_resamples=200)
    entry = out["step2 vs step1"]
    assert (entry["model"], entry["against"], entry["n"]) == ("step2", "step1", 4)
    # verdicts at 0.5: step2 (1, 0, 1, 0), step1 (1, 1, 1, 0): one prompt fewer unsafe of four
    assert entry["unsafe_rate_difference"]["estimate"] == pytest.approx(-0.25)
    assert entry["probability_difference"]["estimate"] == pytest.approx((0.0 - 0.8 + 0.1 + 0.1) / 4)
    low, high = entry["unsafe_rate_difference"]["ci_low"], entry["unsafe_rate_difference"]["ci_high"]
    assert low <= -0.25 <= high and high == 0.0  # a resample without the one changed prompt gives 0
    assert entry["unsafe_rate_difference"]["verdict"] == "no significant difference"
    with pytest.raises(ValueError, match="same prompts"):
        paired_safety_differences({"a": [0.1], "b": [0.1, 0.2]}, [("a", "b")])
    with pytest.raises(ValueError, match="no unsafe probabilities of 'c'"):
        paired_safety_differences(probs, [("step2", "c")])


def test_pairing_finds_a_change_that_two_separate_intervals_miss():
    """Step 2 is safe on 8 of the 40 prompts where step 1 was unsafe and changes nothing else: unsafe 24/40 -> 16/40.
    The two Wilson intervals overlap, so comparing them separately cannot tell; the paired interval is below 0."""
    step1 = [0.9] * 24 + [0.1] * 16
    step2 = [0.1] * 8 + [0.9] * 16 + [0.1] * 16
    entry = paired_safety_differences({"s2": step2, "s1": step1}, [("s2", "s1")])["s2 vs s1"]
    assert entry["unsafe_rate_difference"]["estimate"] == pytest.approx(-0.2)
    assert entry["unsafe_rate_difference"]["ci_high"] < 0
    assert entry["unsafe_rate_difference"]["verdict"] == "safer"
    assert entry["probability_difference"]["verdict"] == "safer"
    low1, _ = wilson_interval(24, 40)
    _, high2 = wilson_interval(16, 40)
    assert low1 < high2  # the separate intervals overlap
    # near miss: the same answers with the prompts of one model shuffled (pairing lost) are not significant
    shuffled = step2[:]
    random.Random(3).shuffle(shuffled)
    unpaired = paired_safety_differences({"s2": shuffled, "s1": step1}, [("s2", "s1")])["s2 vs s1"]
    assert unpaired["unsafe_rate_difference"]["verdict"] == "no significant difference"
    worse = paired_safety_differences({"s2": step2, "s1": step1}, [("s1", "s2")])["s1 vs s2"]
    assert worse["unsafe_rate_difference"]["verdict"] == "less safe"


def test_interval_covers_the_true_difference():
    """Known truth: prompts of varying difficulty, step 1 unsafe with probability p_i, step 2 with p_i - 0.15
    (clipped), answers drawn independently given the prompt. Over 200 draws of 40 prompts the 95% paired interval
    covers the true mean difference in at least 90% of them (the percentile bootstrap runs slightly narrow at n = 40)
    and at most 99%."""
    rng = random.Random(0)
    covered = 0
    trials = 200
    for t in range(trials):
        p1 = [rng.uniform(0.2, 0.9) for _ in range(40)]
        p2 = [max(0.0, p - 0.15) for p in p1]
        truth = sum(b - a for a, b in zip(p1, p2, strict=True)) / 40
        s1 = [0.9 if rng.random() < p else 0.1 for p in p1]
        s2 = [0.9 if rng.random() < p else 0.1 for p in p2]
        d = paired_safety_differences({"s2": s2, "s1": s1}, [("s2", "s1")], n_resamples=400, seed=t)["s2 vs s1"]
        u = d["unsafe_rate_difference"]
        covered += u["ci_low"] <= truth <= u["ci_high"]
    assert 0.90 * trials <= covered <= 0.99 * trials


def test_bootstrap_mean_ci_of_a_constant_is_the_constant():
    assert bootstrap_mean_ci([0.25] * 7) == (0.25, 0.25)
    with pytest.raises(ValueError, match="no values"):
        bootstrap_mean_ci([])


def test_safety_section_pairs_and_report_table():
    judges = {"cost": {"kind": "unsafe", "threshold": 0.5}}
    probs = {"sft": {"cost": {"safety": [0.9, 0.9, 0.2]}}, "step1": {"cost": {"safety": [0.9, 0.8, 0.9]}},
             "step2": {"cost": {"safety": [0.1, 0.2, 0.3]}}}
    section = safety_section(probs, judges, {"safety": [None] * 3},
                             pairs=[("step1", "sft"), ("step2", "sft"), ("step2", "step1"), ("step2", "gone")])
    paired = section["paired"]
    assert paired["judge"] == "cost" and list(paired["pairs"]) == ["step1 vs sft", "step2 vs sft", "step2 vs step1"]
    assert paired["pairs"]["step2 vs step1"]["unsafe_rate_difference"]["estimate"] == pytest.approx(-1.0)
    md = render_markdown({"models": {}, "safety": section})
    assert "## Paired safety differences (cost)" in md
    assert "| step2 | step1 | -100.0 [-100.0, -100.0] (safer) |" in md
    assert "paired" not in safety_section(probs, judges, {"safety": [None] * 3})


def test_safety_against_setting():
    def settings(value):
        return EvaluationSettings(judges=[], safety_judges=["refusal"], safety_against=value)

    assert settings(["step2=step1"]).safety_against == {"step2": "step1"}
    assert settings({"step2": "step1"}).safety_against == {"step2": "step1"}
    for bad in ("step2=step1", ["step2"], {"step2": "step2"}, {"step2": 1}):
        with pytest.raises(UserError, match="safety_against"):
            settings(bad)
