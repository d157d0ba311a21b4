"""Win rates, bootstrap intervals, Elo golden values, and the report files."""

from __future__ import annotations

import json

import pytest

from sacpo_lightning.evaluation.report import (
    bootstrap_ci,
    category_rates,
    category_win_rates,
    constraint_verdict,
    elo_ratings,
    judge_reliability,
    outcome,
    pareto_points,
    plot_training_curves,
    predicted_vs_measured,
    rate_summary,
    read_metrics_csv,
    render_markdown,
    response_length,
    safety_constraint,
    safety_section,
    wilson_interval,
    win_rate,
    win_rate_summary,
    write_report,
)


def test_outcomes_and_win_rate():
    assert (outcome(2.0, 1.0), outcome(1.0, 2.0), outcome(1.0, 1.0 + 1e-9)) == (1.0, 0.0, 0.5)
    assert outcome(1.0, 1.05, eps=0.1) == 0.5
    assert win_rate([1, 1, 1]) == 1.0 and win_rate([0, 0]) == 0.0
    # (wins + 0.5 ties) / N = (2 + 0.5) / 4
    assert win_rate([1, 1, 0.5, 0]) == 0.625
    with pytest.raises(ValueError, match="0, 0.5 or 1"):
        win_rate([0.7])


def test_bootstrap_interval():
    assert bootstrap_ci([1.0] * 20) == (1.0, 1.0)
    values = [1.0] * 30 + [0.0] * 10
    low, high = bootstrap_ci(values, n_resamples=500, seed=1)
    assert low < 0.75 < high and 0.55 < low and high < 0.95
    assert bootstrap_ci(values, n_resamples=500, seed=1) == (low, high)  # seeded
    summary = win_rate_summary([1, 0.5, 0, 1])
    assert (summary["wins"], summary["ties"], summary["losses"], summary["n"]) == (2, 1, 1, 4)
    by_cat = category_win_rates([1, 0, 0.5], ["a", "b", None])
    assert by_cat["a"]["win_rate"] == 1.0 and by_cat["b"]["win_rate"] == 0.0 and by_cat["(none)"]["win_rate"] == 0.5


def test_elo_golden_values():
    """One win from equal ratings moves each player by K/2 = 16; ties between equals change nothing."""
    one = elo_ratings([("a", "b", 1.0)], n_shuffles=1)
    assert one["a"]["mean"] == pytest.approx(1016.0) and one["b"]["mean"] == pytest.approx(984.0)
    ties = elo_ratings([("a", "b", 0.5)] * 10, n_shuffles=5)
    assert ties["a"] == {"mean": 1000.0, "std": 0.0} and ties["b"] == {"mean": 1000.0, "std": 0.0}
    # Symmetric: swapping the players' roles and outcomes gives the same ratings.
    matches = [("a", "b", 1.0), ("b", "c", 0.5), ("a", "c", 0.0), ("b", "a", 1.0), ("c", "b", 1.0)]
    mirrored = [(b, a, 1.0 - s) for a, b, s in matches]
    r1, r2 = elo_ratings(matches, seed=3), elo_ratings(mirrored, seed=3)
    for p in "abc":
        assert r1[p]["mean"] == pytest.approx(r2[p]["mean"])
    assert sum(r["mean"] for r in r1.values()) == pytest.approx(3000.0)  # zero-sum
    dominant = elo_ratings([("a", "b", 1.0)] * 20 + [("a", "c", 1.0)] * 20, seed=0)
    assert dominant["a"]["mean"] > 1100
    # The spread over orders: a beats b and loses to c. Played b-first, a ends at 1016 - 32 e, otherwise at
    # 984 + 32 e, with e = 1 / (1 + 10^(-16/400)); the two orders are equally likely, so the population std over
    # many shuffles is half the gap between the two endings.
    e = 1.0 / (1.0 + 10.0 ** (-16.0 / 400.0))
    gap = (1016.0 - 32.0 * e) - (984.0 + 32.0 * e)
    spread = elo_ratings([("a", "b", 1.0), ("a", "c", 0.0)], n_shuffles=4000, seed=1)
    assert spread["a"]["std"] == pytest.approx(abs(gap) / 2, rel=0.01)
    assert spread["a"]["mean"] == pytest.approx(1000.0, abs=0.05 * abs(gap))
    assert elo_ratings([], players=["x"])["x"]["mean"] == 1000.0


def _report():
    helpful = win_rate_summary([1, 1, 0.5, 0])
    harmless = win_rate_summary([1, 0, 0, 0])
    base = win_rate_summary([0.5] * 4)
    return {
        "baseline": "sft",
        "judges": ["reward_cost"],
        "models": {
            "sft": {"helpfulness": base, "harmlessness": base,
                    "scores": {"helpful": {"mean_reward": 0.1}, "safety": {"mean_cost": 0.4, "unsafe_fraction": 0.5}},
                    "harmlessness_by_category": {"Crime": base}},
            "step2": {"helpfulness": helpful, "harmlessness": harmless,
                      "scores": {"helpful": {"mean_reward": 0.3}, "safety": {"mean_cost": -0.2,
                                                                             "unsafe_fraction": 0.25}},
                      "harmlessness_by_category": {"Crime": harmless},
                      "implicit": {"safety": {"accuracy": 0.6, "accuracy_ties_half": 0.6, "ties": 0.0,
                                              "mean_margin": 0.3, "num_pairs": 10}}},
        },
        "elo": {"helpfulness": elo_ratings([("step2", "sft", 1.0)]),
                "harmlessness": elo_ratings([("step2", "sft", 0.0)])},
    }


def test_report_files(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,step,train/loss,val/rewards/accuracy,train/rewards/margins\n"
                        "0,0,0.69,,0.0\n0,1,0.60,,0.2\n0,1,,0.75,\n0,2,0.50,,0.4\n")
    series = read_metrics_csv(csv_path)
    assert series["train/loss"] == [(0.0, 0.69), (1.0, 0.60), (2.0, 0.50)]
    assert series["val/rewards/accuracy"] == [(1.0, 0.75)]
    written = write_report(_report(), tmp_path / "out", training_logs={"step1": csv_path, "missing": "nope.csv"})
    for key in ("json", "markdown", "pareto", "training_curves"):
        assert written[key].is_file() and written[key].stat().st_size > 0
    assert (tmp_path / "out" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["models"]["step2"]["helpfulness"]["win_rate"] == 0.625
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| step2 | 62.5% [" in md and "Crime" in md and "Implicit-reward accuracy" in md
    assert plot_training_curves({"a": csv_path, "b": csv_path}, tmp_path / "two.png").is_file()


def test_judge_reliability_flags_a_judge_at_chance():
    # 24 of 48 correct: Wilson 95% interval (0.364, 0.636) includes 0.5
    chance = judge_reliability({"accuracy": 0.5, "pairs": 48})
    assert chance["correct"] == 24 and chance["better_than_chance"] is False
    assert chance["ci_low"] == pytest.approx(0.3639, abs=1e-4) and chance["ci_high"] == pytest.approx(0.6361, abs=1e-4)
    # near miss: 29 of 48 (0.604) still straddles 0.5 (low 0.463); 130 of 200 does not (low 0.582)
    assert judge_reliability({"accuracy": 29 / 48, "pairs": 48})["better_than_chance"] is False
    good = judge_reliability({"accuracy": 0.65, "pairs": 200})
    assert good["correct"] == 130 and good["better_than_chance"] is True and good["ci_low"] > 0.5
    # an accuracy below chance is not trusted either, and no held-out accuracy means unknown
    assert judge_reliability({"accuracy": 0.2, "pairs": 200})["better_than_chance"] is False
    assert judge_reliability(None)["better_than_chance"] is None
    with pytest.raises(ValueError, match="held-out accuracy"):
        judge_reliability({"accuracy": 1.5, "pairs": 10})


def test_report_flags_numbers_of_an_untrusted_judge(tmp_path):
    report = _report()
    report["judge_reliability"] = {
        "reward": {"model": "rm", **judge_reliability({"accuracy": 0.5, "pairs": 48})},
        "cost": {"model": "cm", **judge_reliability({"accuracy": 0.8, "pairs": 100})},
    }
    write_report(report, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    headline = md.split("## Win rates against the baseline and scores")[1].split("##")[0]
    flagged = md.split("## Flagged: numbers from judges not better than chance")[1].split("##")[0]
    reliability = md.split("## Judge reliability")[1].split("##")[0]
    # reward numbers (helpfulness 62.5%, mean reward 0.300) left out of the headline, shown flagged below
    assert "62.5%" not in headline and "0.300" not in headline and "mean reward" not in headline
    assert "harmlessness win rate" in headline and "-0.200" in headline
    assert "| step2 | ⚠ 62.5% [" in flagged and "⚠ 0.300" in flagged and "mean cost" not in flagged
    assert "| reward | rm | 0.500 | [0.364, 0.636] | 48 | **not better than chance** |" in reliability
    assert "| cost | cm | 0.800 |" in reliability and "| better than chance |" in reliability
    _, xlabel, ylabel = pareto_points(report)
    assert xlabel == "helpfulness win rate (reward model NOT better than chance)"
    assert ylabel == "harmlessness win rate"
    # both judges trusted: everything in the headline, nothing flagged
    report["judge_reliability"]["reward"] = {"model": "rm", **judge_reliability({"accuracy": 0.65, "pairs": 200})}
    md = render_markdown(report)
    assert "## Flagged" not in md and "| step2 | 62.5% [" in md and "not better than chance**" not in md
    assert pareto_points(report)[1] == "helpfulness win rate"


def test_score_judge_reliability_reads_the_exported_heldout_accuracy(tmp_path):
    from sacpo_lightning.evaluation.evaluate import score_judge_reliability
    from sacpo_lightning.evaluation.settings import EvaluationSettings

    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "score_model.json").write_text(json.dumps({"kind": "reward", "heldout_accuracy": 0.5,
                                                                  "heldout": {"accuracy": 0.5, "pairs": 48}}))
    (tmp_path / "hub").mkdir()
    reliability = score_judge_reliability(EvaluationSettings(reward_model=str(tmp_path / "rm"),
                                                             cost_model=str(tmp_path / "hub")))
    assert reliability["reward"]["better_than_chance"] is False and reliability["reward"]["pairs"] == 48
    assert reliability["cost"]["better_than_chance"] is None
    assert "unknown (no held-out accuracy recorded)" in render_markdown({**_report(),
                                                                         "judge_reliability": reliability})
    (tmp_path / "rm" / "score_model.json").write_text(json.dumps({"heldout": {"accuracy": 2.0, "pairs": 4}}))
    with pytest.raises(ValueError, match=r"score_model\.json: 'heldout'"):
        score_judge_reliability(EvaluationSettings(reward_model=str(tmp_path / "rm")))


def test_markdown_without_win_rates_uses_scores():
    report = {"baseline": "sft", "judges": ["implicit"], "models": {"sft": {}, "x": {}}}
    assert "# Evaluation report" in render_markdown(report)


# ----------------------------------------------------------------------------------------------------------------------
# Per-answer safety statistics
# ----------------------------------------------------------------------------------------------------------------------


def test_wilson_interval_golden_values():
    """z = 1.959964 at 95%. 0/10: high = (z^2/10) / (1 + z^2/10) = 0.38415 / 1.38415 = 0.27754. 5/10: centre 0.5,
    half-width z sqrt(0.025 + z^2/400) / 1.38415 = 0.26341. 8/10: centre (0.8 + 0.19207) / 1.38415 = 0.71674,
    half-width z sqrt(0.016 + 0.0096) / 1.38415 = 0.22658."""
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.27754, abs=1e-5))
    assert wilson_interval(10, 10) == (pytest.approx(0.72246, abs=1e-5), 1.0)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(8, 10) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    low90, high90 = wilson_interval(5, 10, confidence=0.9)
    assert 0.23659 < low90 < 0.5 < high90 < 0.76341  # a lower level gives a narrower interval
    for bad in ((1, 0), (11, 10), (-1, 10)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_rates_and_categories():
    summary = rate_summary([True, False, False, True], probabilities=[0.9, 0.1, 0.2, 0.8])
    assert {k: summary[k] for k in ("rate", "count", "n")} == {"rate": 0.5, "count": 2, "n": 4}
    assert (summary["ci_low"], summary["ci_high"]) == wilson_interval(2, 4)
    assert summary["mean_probability"] == pytest.approx(0.5)
    by_cat = category_rates([True, False, True, True], ["a", "a", None, "b"])
    assert {c: (v["count"], v["n"]) for c, v in by_cat.items()} == {"(none)": (1, 1), "a": (1, 2), "b": (1, 1)}
    with pytest.raises(ValueError, match="categories"):
        category_rates([True], ["a", "b"])


def test_constraint_verdicts():
    assert constraint_verdict(0.8, 0.9, 0.8) == "meets"  # the whole interval at or above b
    assert constraint_verdict(0.7, 0.79, 0.8) == "fails"
    assert constraint_verdict(0.7, 0.8, 0.8) == "undetermined"
    assert constraint_verdict(0.79, 0.95, 0.8) == "undetermined"
    # No unsafe answer in 10: safety 1 with the interval (1 - 0.27754, 1) = (0.72246, 1).
    none_unsafe = rate_summary([False] * 10)
    c = safety_constraint(0.7, unsafe=none_unsafe)
    assert (c["safety"], c["verdict"], c["source"]) == (1.0, "meets", "unsafe_rate")
    assert (c["ci_low"], c["ci_high"]) == pytest.approx((0.72246, 1.0), abs=1e-5)
    assert safety_constraint(0.8, unsafe=none_unsafe)["verdict"] == "undetermined"
    assert safety_constraint(0.5, unsafe=rate_summary([True] * 10))["verdict"] == "fails"
    # A supplied mean safety score replaces 1 - unsafe rate; without an interval the point decides.
    assert safety_constraint(0.5, unsafe=none_unsafe, mean_safety=0.4)["verdict"] == "fails"
    assert safety_constraint(2.0, mean_safety=2.5)["verdict"] == "meets"
    assert safety_constraint(2.0, mean_safety=2.5, mean_safety_ci=(1.9, 3.0))["verdict"] == "undetermined"
    with pytest.raises(ValueError, match="must be in"):
        safety_constraint(1.5, unsafe=none_unsafe)


def test_response_length_units():
    class CharTokenizer:
        """One token per character, plus a BOS that must not be counted."""

        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [[0] * add_special_tokens + [ord(c) for c in t] for t in texts]}

    assert response_length(["a b  c", "one"]) == {"mean": 2.0, "n": 2, "unit": "words"}
    assert response_length(["ab c", "é"], CharTokenizer()) == {"mean": 2.5, "n": 2, "unit": "tokens"}


JUDGES = {"cls": {"kind": "unsafe", "threshold": 0.5}, "ref": {"kind": "refusal", "threshold": 0.5},
          "strict": {"kind": "unsafe", "threshold": 0.1}}
CATEGORIES = {"safety": ["Crime", "Crime", "Insult", "Insult"], "helpful": [None, None]}
PROBS = {
    # "cls" unsafe on the safety prompts: a: 0.9, 0.5 (not above 0.5: safe), 0.7, 0.2 -> 2 of 4; b: none.
    "a": {"cls": {"safety": [0.9, 0.5, 0.7, 0.2], "helpful": [0.0, 0.6]},
          "ref": {"safety": [0, 1, 0, 0], "helpful": [1, 0]},
          "strict": {"safety": [0.9, 0.5, 0.7, 0.2], "helpful": [0.0, 0.6]}},
    "b": {"cls": {"safety": [0.1, 0.0, 0.3, 0.4], "helpful": [0.0, 0.0]},
          "ref": {"safety": [1, 1, 1, 1], "helpful": [1, 1]},
          "strict": {"safety": [0.1, 0.0, 0.3, 0.4], "helpful": [0.0, 0.0]}},
}


def _section(**kwargs):
    responses = {"a": {"safety": ["x y"] * 4, "helpful": ["one", "two words"]}, "b": {"safety": ["z"] * 4}}
    return safety_section(PROBS, JUDGES, CATEGORIES, responses=responses, **kwargs)


def test_safety_section_hand_computed():
    section = _section(threshold=0.5)
    a, b = section["models"]["a"], section["models"]["b"]
    assert section["primary_unsafe"] == "cls" and section["primary_refusal"] == "ref"
    assert (a["unsafe_rate"]["count"], a["unsafe_rate"]["n"], a["unsafe_rate"]["judge"]) == (2, 4, "cls")
    assert a["judges"]["strict"]["safety"]["count"] == 4  # its own threshold (0.1)
    assert a["judges"]["cls"]["helpful"]["count"] == 1
    assert {c: v["count"] for c, v in a["unsafe_rate"]["by_category"].items()} == {"Crime": 1, "Insult": 1}
    assert "by_category" not in a["judges"]["cls"]["helpful"]  # no categories on the helpful prompts
    assert (a["refusal_rate"]["count"], a["over_refusal"]["count"], a["over_refusal"]["n"]) == (1, 1, 2)
    assert (b["refusal_rate"]["rate"], b["over_refusal"]["rate"], b["unsafe_rate"]["rate"]) == (1.0, 1.0, 0.0)
    assert a["response_length"] == {"safety": {"mean": 2.0, "n": 4, "unit": "words"},
                                    "helpful": {"mean": 1.5, "n": 2, "unit": "words"}}
    assert section["length_unit"] == "words"
    # a: safety 0.5 with the interval 1 - wilson(2, 4) around it: undetermined at b = 0.5; b: 0 of 4 unsafe gives
    # the interval (1 - 0.48990, 1) = (0.51010, 1): meets 0.5.
    assert a["constraint"]["verdict"] == "undetermined" and a["constraint"]["judge"] == "cls"
    assert b["constraint"]["verdict"] == "meets"
    assert b["constraint"]["ci_low"] == pytest.approx(1 - wilson_interval(0, 4)[1])
    assert _section(threshold=0.6)["models"]["b"]["constraint"]["verdict"] == "undetermined"
    assert "constraint" not in _section()["models"]["a"]
    assert _section(threshold=0.6, mean_safety={"b": 0.55})["models"]["b"]["constraint"]["verdict"] == "fails"
    with pytest.raises(ValueError, match="needs an unsafe judge"):
        safety_section({"a": {"ref": PROBS["a"]["ref"]}}, {"ref": JUDGES["ref"]}, CATEGORIES, threshold=0.5)


SAMPLED = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 48}


def test_predicted_vs_measured():
    section = _section()
    rows = predicted_vs_measured({"a": {"lambda_star": 1.5, "predicted_safety": 0.6, "sampling": SAMPLED},
                                  "b": {"lambda": 0.2, "safety": 0.3, "sampling": SAMPLED}}, section, SAMPLED)
    assert rows["a"]["lambda"] == 1.5 and rows["a"]["measured_safety"] == 0.5
    assert rows["a"]["difference"] == pytest.approx(-0.1) and rows["a"]["agrees"] is True
    assert rows["a"]["basis"].startswith("prediction inside")
    assert rows["b"]["measured_safety"] == 1.0 and rows["b"]["agrees"] is False
    assert rows["b"]["ci_low"] == pytest.approx(1 - wilson_interval(0, 4)[1]) and rows["b"]["judge"] == "cls"
    with pytest.raises(ValueError, match="not evaluated"):
        predicted_vs_measured({"c": {"safety": 0.5}}, section)
    with pytest.raises(ValueError, match="no 'safety'"):
        predicted_vs_measured({"a": {"lambda": 1.0}}, section)


def test_predicted_vs_measured_agree_when_the_intervals_overlap():
    """b's measured interval is [1 - wilson(0, 4)_high, 1] = [0.5101, 1]: a predicted interval ending just below its
    lower end does not agree, one reaching it does, whatever the point predictions are."""
    section = _section()
    low = 1 - wilson_interval(0, 4)[1]

    def agrees(interval):
        entry = {"lambda": 1.0, "safety": 0.3, "safety_interval": interval, "sampling": SAMPLED}
        row = predicted_vs_measured({"b": entry}, section, SAMPLED)["b"]
        assert row["basis"] == "intervals overlap" and row["predicted_interval"] == list(interval)
        return row["agrees"]

    assert agrees((0.2, low)) is True
    assert agrees((0.2, low - 1e-6)) is False


@pytest.mark.parametrize("generation, reason", [
    ({**SAMPLED, "do_sample": False}, "decodes greedily"),
    ({**SAMPLED, "temperature": 0.7}, "temperature 0.7"),
    ({**SAMPLED, "top_p": 0.9}, "top_p 0.9"),
    ({**SAMPLED, "max_new_tokens": 64}, "up to 64 new tokens, the budget 48"),
    (None, "does not say how"),
])
def test_predicted_vs_measured_only_compares_evaluations_that_sample_like_the_budget(generation, reason):
    entry = {"lambda": 1.0, "safety": 0.5, "sampling": SAMPLED}
    row = predicted_vs_measured({"a": entry}, _section(), generation)["a"]
    assert row["comparable"] is False and row["agrees"] is None and reason in row["reason"]
    # a budget.json read from the command line carries its decoding under inputs.generation
    from_file = {"lambda_star": 1.0, "predicted": {"safety": 0.5, "safety_interval": [0.4, 0.6]},
                 "inputs": {"generation": SAMPLED}}
    row = predicted_vs_measured({"a": from_file}, _section(), SAMPLED)["a"]
    assert row["comparable"] is True and row["predicted_safety"] == 0.5 and row["predicted_interval"] == [0.4, 0.6]


def test_report_files_with_safety_sections(tmp_path):
    plain = write_report(_report(), tmp_path / "plain")
    data = json.loads(plain["json"].read_text())
    assert "safety" not in data and "predicted_vs_measured" not in data
    assert "Per-answer safety" not in plain["markdown"].read_text()

    report = _report()
    probs = {"sft": PROBS["a"], "step2": PROBS["b"]}
    section = safety_section(probs, JUDGES, CATEGORIES, threshold=0.5)
    written = write_report(report, tmp_path / "out", safety=section,
                           predicted_safety={"step2": {"lambda_star": 0.25, "predicted_safety": 0.95,
                                                       "safety_interval": [0.9, 0.99], "sampling": SAMPLED,
                                                       "prompts": "10 prompts of p.json"}},
                           generation=SAMPLED, prompts="4 prompts of q.json")
    data = json.loads(written["json"].read_text())
    assert data["safety"]["models"]["sft"]["unsafe_rate"]["count"] == 2
    assert data["predicted_vs_measured"]["step2"]["measured_safety"] == 1.0
    md = written["markdown"].read_text()
    assert "## Per-answer safety" in md and "E[safety] >= 0.5" in md
    assert "| sft | 50.0% [15.0, 85.0] | 25.0% [4.6, 69.9] | 50.0% [9.5, 90.5] |" in md
    assert "undetermined (50.0% [15.0, 85.0])" in md and "meets (100.0% [51.0, 100.0])" in md
    assert "## Unsafe rate by category (cls)" in md and "## Refusal rate by category (ref)" in md
    assert "| (all) | 100.0% [51.0, 100.0] | 50.0% [15.0, 85.0] |" in md  # "strict": step2 0.3, 0.4 > 0.1
    assert "| step2 | 0.25 | 95.0% [90.0, 99.0] | 100.0% [51.0, 100.0] | +5.0 | yes | cls |" in md
    assert "the prediction used 10 prompts of p.json; the measurement used 4 prompts of q.json" in md
    greedy = write_report(_report(), tmp_path / "greedy", safety=section,
                          predicted_safety={"step2": {"lambda": 0.25, "safety": 0.95, "sampling": SAMPLED}},
                          generation={**SAMPLED, "do_sample": False})["markdown"].read_text()
    assert "| +5.0 | not compared | cls |" in greedy and "Not compared: the evaluation decodes greedily" in greedy
    assert "| step2 | 62.5% [" in md  # the existing sections are still there
    with pytest.raises(ValueError, match="needs per-answer safety judges"):
        write_report(_report(), tmp_path / "bad", predicted_safety={"step2": {"safety": 0.9}})


def test_constraint_on_probabilities_uses_the_mean_probability_and_its_interval():
    """With ``constraint_on="probabilities"`` safety is mean(1 - P(unsafe)) (the budget's g = sigmoid(-cost)), with a
    normal-approximation interval, and predicted-vs-measured compares on that scale; verdicts stay the fraction."""
    from statistics import NormalDist, stdev

    from sacpo_lightning.evaluation.report import predicted_vs_measured, safety_section

    probs = [0.2, 0.4, 0.9, 0.3]
    judges = {"cost": {"kind": "unsafe", "threshold": 0.5}}
    section = safety_section({"m": {"cost": {"safety": probs}}}, judges, {"safety": [None] * 4}, threshold=0.6,
                             constraint_on="probabilities")
    c = section["models"]["m"]["constraint"]
    safe = [1 - p for p in probs]
    half = NormalDist().inv_cdf(0.975) * stdev(safe) / 2
    assert c["source"] == "mean_safety" and c["safety"] == pytest.approx(0.55)
    assert (c["ci_low"], c["ci_high"]) == pytest.approx((0.55 - half, 0.55 + half))
    assert c["verdict"] == "undetermined"
    assert section["models"]["m"]["unsafe_rate"]["rate"] == pytest.approx(0.25)  # verdicts: 1 of 4 above 0.5
    row = predicted_vs_measured({"m": {"lambda": 1.0, "safety": 0.6, "sampling": SAMPLED}}, section, SAMPLED)["m"]
    assert row["measured_safety"] == pytest.approx(0.55) and row["agrees"]
    verdicts = safety_section({"m": {"cost": {"safety": probs}}}, judges, {"safety": [None] * 4}, threshold=0.6)
    assert verdicts["models"]["m"]["constraint"]["safety"] == pytest.approx(0.75)


def test_repeated_ngram_fraction_and_repetition_rate():
    from sacpo_lightning.evaluation.report import repeated_ngram_fraction, repetition_summary

    assert repeated_ngram_fraction("a b c d a b c d") == pytest.approx(1 / 5)  # the fifth 4-gram repeats the first
    assert repeated_ngram_fraction("A b c d a B C D") == pytest.approx(1 / 5)  # case-insensitive
    assert repeated_ngram_fraction("one two three") == 0.0  # no 4-gram at all
    assert repeated_ngram_fraction("a b c d e f g h") == 0.0
    loop = " ".join(["I can not help ."] * 10)  # 50 words, 47 4-grams, 5 distinct
    assert repeated_ngram_fraction(loop) == pytest.approx(1 - 5 / 47)
    summary = repetition_summary([loop, "a b c d e f g", "x y z w x y z w", loop])
    assert (summary["count"], summary["n"], summary["rate"]) == (2, 4, 0.5)
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx(wilson_interval(2, 4))
    # the threshold is strict: 0.2 repeated is not "mostly repeats" at 0.2, and is at 0.19
    assert repetition_summary(["a b c d a b c d"], threshold=0.2)["count"] == 0
    assert repetition_summary(["a b c d a b c d"], threshold=0.19)["count"] == 1
    with pytest.raises(ValueError, match="no responses"):
        repetition_summary([])


def test_sample_answers_quote_the_same_prompts_for_every_model_and_render(tmp_path):
    from sacpo_lightning.evaluation.report import sample_answers

    gens = {"safety": {"a": [{"prompt": "p1", "response": "x" * 500}, {"prompt": "p2", "response": "no"}],
                       "b": [{"prompt": "p1", "response": "line one\nline two"}, {"prompt": "p2", "response": ""}]},
            "helpful": {"a": [{"prompt": "h1", "response": "sure"}], "b": [{"prompt": "h1", "response": "ok"}]}}
    quotes = sample_answers(gens)
    assert [(q["set"], q["prompt"]) for q in quotes["a"]] == [("safety", "p1"), ("helpful", "h1")]
    assert [(q["set"], q["prompt"]) for q in quotes["b"]] == [("safety", "p1"), ("helpful", "h1")]
    assert quotes["a"][0]["response"] == "x" * 400 + " ..."
    report = _report()
    report["examples"] = quotes
    md = write_report(report, tmp_path)["markdown"].read_text()
    assert "## Sample answers" in md and "**b** (safety): *p1*\n\n> line one\n> line two" in md


@pytest.mark.parametrize(("accuracy", "flagged"), [(0.6, True), (0.9, False)])
def test_unsafe_judge_not_better_than_chance_is_flagged_everywhere(tmp_path, accuracy, flagged):
    """A per-answer classifier whose held-out accuracy interval includes 0.5 (0.6 on 20 pairs: [0.39, 0.78]) has
    its header, cells, constraint verdicts and predicted-vs-measured rows marked; at 0.9 ([0.70, 0.97]) none is."""
    from sacpo_lightning.evaluation.report import judge_reliability, xstest_section

    judges = {**JUDGES, "cls": {**JUDGES["cls"], "reliability": judge_reliability({"accuracy": accuracy,
                                                                                    "pairs": 20})}}
    section = safety_section({"sft": PROBS["a"], "step2": PROBS["b"]}, judges, CATEGORIES, threshold=0.5)
    rows = [{"type": "homonyms", "label": "safe"}, {"type": "contrast_homonyms", "label": "unsafe"}]
    xstest = xstest_section(rows, {"sft": {"ref": [0, 0], "cls": [0.9, 0.9]}}, {"ref": JUDGES["ref"],
                                                                              "cls": judges["cls"]})
    md = write_report(_report(), tmp_path, safety=section, xstest=xstest,
                      predicted_safety={"step2": {"lambda_star": 0.25, "predicted_safety": 0.95,
                                                  "safety_interval": [0.9, 0.99], "sampling": SAMPLED}},
                      generation=SAMPLED)["markdown"].read_text()
    marks = ["| unsafe (cls, ⚠ not better than chance) |", "| sft | ⚠ 50.0% [15.0, 85.0] |",
             "⚠ undetermined (50.0% [15.0, 85.0])", "## Unsafe rate by category (cls, ⚠ not better than chance)",
             "| yes | cls, ⚠ not better than chance |", "unsafe (cls, ⚠ not better than chance), unsafe prompts",
             "is not better than chance (see Judge reliability)"]
    for mark in marks:
        assert (mark in md) is flagged, mark
    assert ("| sft | 50.0% [15.0, 85.0] |" in md) is not flagged
    assert "## Refusal rate by category (ref)" in md  # the refusal judge has no held-out accuracy: not flagged
