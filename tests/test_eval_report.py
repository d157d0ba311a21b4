"""Win rates, bootstrap intervals, Elo golden values, and the report files."""

from __future__ import annotations

import json

import pytest

from sacpo_lightning.evaluation.report import (
    bootstrap_ci,
    category_win_rates,
    elo_ratings,
    outcome,
    plot_training_curves,
    read_metrics_csv,
    render_markdown,
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
    assert dominant["a"]["mean"] > 1100 and dominant["a"]["std"] >= 0
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


def test_markdown_without_win_rates_uses_scores():
    report = {"baseline": "sft", "judges": ["implicit"], "models": {"sft": {}, "x": {}}}
    assert "# Evaluation report" in render_markdown(report)
