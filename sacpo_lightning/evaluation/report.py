"""Win rates with bootstrap intervals, Elo ratings, and the report files (JSON, Markdown, plots).

Outcomes are scores of one model against another on one prompt: 1 (win), 0.5 (tie) or 0 (loss). The win rate is
their mean, ``(wins + 0.5 ties) / N``; its confidence interval is the seeded percentile bootstrap over prompts.
Elo ratings replay all matches in random orders (seeded), with the usual update
``R_a += K (S_a - 1 / (1 + 10 ** ((R_b - R_a) / 400)))``, and report the mean and standard deviation over orders,
which removes the dependence of sequential Elo on match order.

Plots use matplotlib's Agg backend (no display needed): ``pareto.png`` places each model by helpfulness (x) and
harmlessness (y); ``training_curves.png`` shows, per training stage, the loss, accuracy and margin columns of the
Lightning ``metrics.csv`` (``CSVLogger``) against ``step``.
"""

from __future__ import annotations

import csv
import math
import os
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sacpo_lightning.io import atomic_write_json, atomic_write_text

__all__ = [
    "bootstrap_ci",
    "category_win_rates",
    "elo_ratings",
    "outcome",
    "plot_pareto",
    "plot_training_curves",
    "read_metrics_csv",
    "render_markdown",
    "win_rate",
    "win_rate_summary",
    "write_report",
]


# ----------------------------------------------------------------------------------------------------------------------
# Win rates
# ----------------------------------------------------------------------------------------------------------------------


def outcome(score: float, baseline_score: float, *, eps: float = 1e-6) -> float:
    """1.0 when ``score`` beats ``baseline_score`` by more than ``eps``, 0.0 when it trails by more, else 0.5."""
    if score > baseline_score + eps:
        return 1.0
    if score < baseline_score - eps:
        return 0.0
    return 0.5


def _check_outcomes(outcomes: Sequence[float]) -> list[float]:
    values = [float(o) for o in outcomes]
    if not values:
        raise ValueError("no outcomes")
    bad = [o for o in values if o not in (0.0, 0.5, 1.0)]
    if bad:
        raise ValueError(f"outcomes must be 0, 0.5 or 1; got {bad[:3]}")
    return values


def win_rate(outcomes: Sequence[float]) -> float:
    """``(wins + 0.5 ties) / N``."""
    values = _check_outcomes(outcomes)
    return sum(values) / len(values)


def bootstrap_ci(
    outcomes: Sequence[float], *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the win rate (prompts resampled with replacement, seeded)."""
    values = _check_outcomes(outcomes)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(n_resamples))
    alpha = (1 - confidence) / 2
    low = means[min(n_resamples - 1, max(0, math.floor(alpha * n_resamples)))]
    high = means[min(n_resamples - 1, max(0, math.ceil((1 - alpha) * n_resamples) - 1))]
    return low, high


def win_rate_summary(
    outcomes: Sequence[float], *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """``{win_rate, ci_low, ci_high, wins, ties, losses, n}`` of a list of outcomes."""
    values = _check_outcomes(outcomes)
    low, high = bootstrap_ci(values, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return {
        "win_rate": win_rate(values),
        "ci_low": low,
        "ci_high": high,
        "wins": sum(1 for o in values if o == 1.0),
        "ties": sum(1 for o in values if o == 0.5),
        "losses": sum(1 for o in values if o == 0.0),
        "n": len(values),
    }


def category_win_rates(
    outcomes: Sequence[float], categories: Sequence[str | None], **summary_kwargs: Any
) -> dict[str, dict[str, Any]]:
    """Win-rate summaries per category (prompts without a category are grouped under ``"(none)"``)."""
    if len(outcomes) != len(categories):
        raise ValueError(f"{len(outcomes)} outcomes but {len(categories)} categories")
    groups: dict[str, list[float]] = defaultdict(list)
    for o, c in zip(outcomes, categories, strict=True):
        groups[c if c is not None else "(none)"].append(o)
    return {c: win_rate_summary(groups[c], **summary_kwargs) for c in sorted(groups)}


# ----------------------------------------------------------------------------------------------------------------------
# Elo
# ----------------------------------------------------------------------------------------------------------------------


def elo_ratings(
    matches: Sequence[tuple[str, str, float]],
    *,
    k: float = 32.0,
    initial: float = 1000.0,
    n_shuffles: int = 100,
    seed: int = 0,
    players: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Elo ratings averaged over random match orders.

    Args:
        matches: ``(player_a, player_b, score_a)`` with ``score_a`` 1 (a wins), 0.5 (tie) or 0 (b wins).
        k: Update size.
        initial: Starting rating.
        n_shuffles: Number of random orders (seeded); each starts from ``initial``.
        seed: Seed of the orders.
        players: Players to report even without matches (they keep ``initial``).

    Returns:
        ``{player: {"mean": ..., "std": ...}}`` over the orders (population std).
    """
    if n_shuffles < 1:
        raise ValueError(f"n_shuffles must be >= 1, got {n_shuffles}")
    names = list(dict.fromkeys([*(players or []), *(p for m in matches for p in m[:2])]))
    rng = random.Random(seed)
    order = list(matches)
    runs: dict[str, list[float]] = {p: [] for p in names}
    for _ in range(n_shuffles):
        rng.shuffle(order)
        ratings = dict.fromkeys(names, initial)
        for a, b, score_a in order:
            expected_a = 1.0 / (1.0 + 10.0 ** ((ratings[b] - ratings[a]) / 400.0))
            delta = k * (float(score_a) - expected_a)
            ratings[a] += delta
            ratings[b] -= delta
        for p in names:
            runs[p].append(ratings[p])
    out = {}
    for p, values in runs.items():
        mean = sum(values) / len(values)
        out[p] = {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))}
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------------


def _pct(summary: Mapping[str, Any] | None) -> str:
    if not summary:
        return "-"
    return f"{100 * summary['win_rate']:.1f}% [{100 * summary['ci_low']:.1f}, {100 * summary['ci_high']:.1f}]"


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: Mapping[str, Any]) -> str:
    """A readable summary of a report dict (as written by :func:`write_report`)."""
    models: Mapping[str, Any] = report.get("models", {})
    baseline = report.get("baseline")
    parts = [f"# Evaluation report\n\nBaseline: **{baseline}**; judges: {', '.join(report.get('judges', []))}."]
    settings = report.get("settings")
    if settings:
        parts.append("Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))

    elo = report.get("elo", {})
    rows = []
    for name, m in models.items():
        scores = m.get("scores", {})
        rows.append([
            name,
            _pct(m.get("helpfulness")),
            _pct(m.get("harmlessness")),
            _num(scores.get("helpful", {}).get("mean_reward")),
            _num(scores.get("safety", {}).get("mean_cost")),
            _num(scores.get("safety", {}).get("unsafe_fraction"), "{:.1%}"),
            *(f"{elo[a][name]['mean']:.0f} ± {elo[a][name]['std']:.0f}" if name in elo.get(a, {}) else "-"
              for a in ("helpfulness", "harmlessness")),
        ])
    if rows:
        parts.append("## Win rates against the baseline and scores\n\nWin rate = (wins + 0.5 ties) / N with a "
                     f"{report.get('confidence', 0.95):.0%} bootstrap interval. Reward is scored on the helpfulness "
                     "prompts, cost (> 0 = unsafe) on the safety prompts.\n\n" + _table(
                         ["model", "helpfulness win rate", "harmlessness win rate", "mean reward", "mean cost",
                          "unsafe", "Elo (help)", "Elo (harm)"], rows))

    llm_rows = []
    for name, m in models.items():
        llm = m.get("llm_judge")
        if llm:
            llm_rows.append([
                name, _pct(llm.get("helpfulness")), _pct(llm.get("harmlessness")),
                *(f"{elo[a][name]['mean']:.0f} ± {elo[a][name]['std']:.0f}" if name in elo.get(a, {}) else "-"
                  for a in ("llm_helpfulness", "llm_harmlessness")),
            ])
    if llm_rows:
        parts.append("## LLM-judge win rates against the baseline\n\n" + _table(
            ["model", "helpfulness win rate", "harmlessness win rate", "Elo (help)", "Elo (harm)"], llm_rows))

    categories = sorted({c for m in models.values() for c in m.get("harmlessness_by_category", {})})
    if categories:
        rows = [[c, *(_pct(m.get("harmlessness_by_category", {}).get(c)) for m in models.values())]
                for c in categories]
        parts.append("## Harmlessness win rate by category\n\n" + _table(["category", *models], rows))

    implicit_rows = []
    for name, m in models.items():
        for set_name, acc in m.get("implicit", {}).items():
            implicit_rows.append([name, set_name, f"{acc['accuracy']:.3f}", f"{acc['accuracy_ties_half']:.3f}",
                                  f"{acc['ties']:.3f}", f"{acc['mean_margin']:.3f}", str(acc["num_pairs"])])
    if implicit_rows:
        parts.append(f"## Implicit-reward accuracy (reference: {report.get('implicit_reference')})\n\n" + _table(
            ["model", "pairs", "accuracy", "ties as half", "ties", "mean margin", "N"], implicit_rows))

    judge_stats = report.get("llm_judge")
    if judge_stats:
        parts.append("## LLM judge\n\n" + "\n".join(f"- {k}: {v}" for k, v in judge_stats.items()))
    figures = report.get("figures", {})
    if figures:
        parts.append("## Figures\n\n" + "\n".join(f"![{k}]({Path(v).name})" for k, v in figures.items()))
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(
    points: Mapping[str, tuple[float, float]],
    path: str | os.PathLike,
    *,
    xlabel: str = "helpfulness win rate",
    ylabel: str = "harmlessness win rate",
    title: str = "Helpfulness vs harmlessness",
    win_rates: bool = False,
) -> Path:
    """Scatter plot with one labelled point per model; with ``win_rates`` the axes span [0, 1] and the baseline's
    0.5 lines are drawn."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    try:
        for name, (x, y) in points.items():
            ax.scatter([x], [y], s=40)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
        if win_rates:
            ax.set_xlim(-0.05, 1.05)
            ax.set_ylim(-0.05, 1.05)
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.axvline(0.5, color="grey", lw=0.8, ls="--")
        else:
            ax.margins(0.15)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def read_metrics_csv(path: str | os.PathLike) -> dict[str, list[tuple[float, float]]]:
    """``{column: [(step, value), ...]}`` per numeric column of a Lightning ``metrics.csv`` (empty cells skipped)."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for i, row in enumerate(reader):
            step_text = row.get("step") or ""
            try:
                step = float(step_text) if step_text else float(i)
            except ValueError:
                step = float(i)
            for key, text in row.items():
                if key in ("step", "epoch") or not text:
                    continue
                try:
                    series[key].append((step, float(text)))
                except ValueError:
                    continue
    return dict(series)


def _panel(column: str) -> str | None:
    """Which training-curve panel a metrics column belongs to (by its last path component), if any."""
    leaf = column.rsplit("/", 1)[-1]
    if "loss" in leaf:
        return "loss"
    if "accuracy" in leaf or leaf == "acc":
        return "accuracy"
    if "margin" in leaf:
        return "margin"
    return None


CURVE_PANELS = ("loss", "accuracy", "margin")


def plot_training_curves(stages: Mapping[str, str | os.PathLike], path: str | os.PathLike) -> Path:
    """One row per stage (its ``metrics.csv``) with loss, accuracy and margin panels over ``step``."""
    plt = _pyplot()
    data = {stage: read_metrics_csv(p) for stage, p in stages.items()}
    if not data:
        raise ValueError("no training logs given")
    fig, axes = plt.subplots(len(data), len(CURVE_PANELS), figsize=(4 * len(CURVE_PANELS), 3 * len(data)),
                             squeeze=False)
    try:
        for row, (stage, series) in enumerate(data.items()):
            for col, title in enumerate(CURVE_PANELS):
                ax = axes[row][col]
                for name, points in sorted(series.items()):
                    if _panel(name) != title:
                        continue
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, marker="." if len(points) < 30 else None, label=name)
                ax.set_title(f"{stage}: {title}", fontsize=10)
                ax.set_xlabel("step")
                if ax.lines:
                    ax.legend(fontsize=7)
                ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Report files
# ----------------------------------------------------------------------------------------------------------------------


def pareto_points(report: Mapping[str, Any]) -> tuple[dict[str, tuple[float, float]], str, str]:
    """Per-model (x, y) for the Pareto plot: win rates when both exist, else mean reward and minus mean cost."""
    models = report.get("models", {})
    points: dict[str, tuple[float, float]] = {}
    if all(m.get("helpfulness") and m.get("harmlessness") for m in models.values()) and models:
        for name, m in models.items():
            points[name] = (m["helpfulness"]["win_rate"], m["harmlessness"]["win_rate"])
        return points, "helpfulness win rate", "harmlessness win rate"
    for name, m in models.items():
        scores = m.get("scores", {})
        reward = scores.get("helpful", {}).get("mean_reward")
        cost = scores.get("safety", {}).get("mean_cost")
        x = m["helpfulness"]["win_rate"] if m.get("helpfulness") else reward
        y = m["harmlessness"]["win_rate"] if m.get("harmlessness") else (None if cost is None else -cost)
        if x is not None and y is not None:
            points[name] = (x, y)
    return points, "helpfulness (win rate or mean reward)", "harmlessness (win rate or -mean cost)"


def write_report(
    report: dict[str, Any],
    output_dir: str | os.PathLike,
    *,
    training_logs: Mapping[str, str | os.PathLike] | None = None,
) -> dict[str, Path]:
    """Writes ``report.json``, ``report.md``, ``pareto.png`` (when points exist) and ``training_curves.png``.

    Args:
        report: The report dict (``baseline``, ``judges``, ``models: {name: {helpfulness, harmlessness, scores,
            harmlessness_by_category, implicit}}``, ``elo``, ...); ``figures`` is filled in here.
        output_dir: Target folder.
        training_logs: ``{stage: metrics.csv}`` for the training-curve figure.

    Returns:
        ``{"json": ..., "markdown": ..., "pareto": ..., "training_curves": ...}`` for the files written.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    figures: dict[str, str] = {}
    points, xlabel, ylabel = pareto_points(report)
    if points:
        written["pareto"] = plot_pareto(points, output_dir / "pareto.png", xlabel=xlabel, ylabel=ylabel,
                                        win_rates=xlabel.endswith("win rate") and ylabel.endswith("win rate"))
        figures["pareto"] = str(written["pareto"])
    logs = {k: v for k, v in (training_logs or {}).items() if Path(v).is_file()}
    if logs:
        written["training_curves"] = plot_training_curves(logs, output_dir / "training_curves.png")
        figures["training_curves"] = str(written["training_curves"])
    report["figures"] = figures
    atomic_write_json(output_dir / "report.json", report)
    written["json"] = output_dir / "report.json"
    atomic_write_text(output_dir / "report.md", render_markdown(report))
    written["markdown"] = output_dir / "report.md"
    return written
