"""Figures of `alignkit tax`, `alignkit safety` and `alignkit surgery`: grouped bars with
intervals, the reward-vs-tax Pareto plot, overlaid histograms. Each writes one PNG (Agg backend) with a title, axis labels with
units and a legend, and returns its path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alignkit.eval.plots import COLORS, _pyplot, _save


def plot_interval_bars(
    series: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    ylabel: str,
    title: str,
    interval: str,
    value_format: str = ".3f",
    points: bool = False,
) -> Path:
    """Grouped bars: `series[name]` is one bar per model (`label`, `value`, `ci_low`,
    `ci_high`), the series side by side within each model's group, black error bars for the
    interval (named by `interval` in the legend), each bar annotated with its value. `points`
    draws a marker instead of a bar, on an axis fitted to the intervals rather than from 0 (for
    values such as NLL whose differences are small beside their size)."""
    plt = _pyplot()
    labels = list(dict.fromkeys(bar["label"] for bars in series.values() for bar in bars))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(labels) * max(1, len(series)) + 2), 4.2))
    for k, (name, bars) in enumerate(series.items()):
        by_label = {bar["label"]: bar for bar in bars}
        x = np.array([i for i, label in enumerate(labels) if label in by_label], dtype=float)
        x += (k - (len(series) - 1) / 2) * width
        shown = [by_label[label] for label in labels if label in by_label]
        values = np.array([float(bar["value"]) for bar in shown])
        lows = np.array([float(bar.get("ci_low", bar["value"])) for bar in shown])
        highs = np.array([float(bar.get("ci_high", bar["value"])) for bar in shown])
        if points:
            ax.plot(x, values, "o", markersize=8, color=COLORS[k % len(COLORS)], label=name)
        else:
            ax.bar(x, values, width * 0.92, color=COLORS[k % len(COLORS)], alpha=0.85, label=name)
        ax.errorbar(x, values, yerr=[values - lows, highs - values], fmt="none", ecolor="black", capsize=5,
                    label=interval if k == 0 else None)
        for xi, value in zip(x, values, strict=True):
            # beside the error bar, which stands at the bar's centre
            ax.annotate(format(value, value_format), (xi + (0 if points else width * 0.08), value),
                        textcoords="offset points", xytext=(8, 3), ha="left", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center")
    if not points:
        ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("model")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_pareto(
    points: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    xlabel: str = "NLL increase over the base model [nats per token] (the tax; lower is better)",
    ylabel: str = "reward of greedy generations (higher is better)",
    title: str = "Reward against alignment tax",
) -> Path:
    """Reward (y) against tax (x), one point per model with both 95% intervals as error bars
    (`x`, `x_low`, `x_high`, `y`, `y_low`, `y_high`, `label`, `front`): Pareto-optimal points
    filled and joined in order of tax by the front's staircase, dominated points hollow."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for point in points:
        x, y = float(point["x"]), float(point["y"])
        xerr = [[x - float(point.get("x_low", x))], [float(point.get("x_high", x)) - x]]
        yerr = [[y - float(point.get("y_low", y))], [float(point.get("y_high", y)) - y]]
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="none", ecolor="#999999", elinewidth=0.8, capsize=3)
        on_front = bool(point.get("front"))
        ax.plot([x], [y], "o", markersize=9 if on_front else 7, color=COLORS[0] if on_front else "white",
                markeredgecolor=COLORS[0] if on_front else COLORS[1], markeredgewidth=1.5)
        ax.annotate(str(point["label"]), (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    front = sorted((p for p in points if p.get("front")), key=lambda p: (float(p["x"]), float(p["y"])))
    if front:
        ax.step([float(p["x"]) for p in front], [float(p["y"]) for p in front], where="post",
                color=COLORS[0], linewidth=1.4, label=f"Pareto front ({len(front)} of {len(points)} models)")
    ax.plot([], [], "o", color="white", markeredgecolor=COLORS[1], label="dominated (another model has less tax "
            "and at least as much reward)")
    ax.plot([], [], color="#999999", label="95% bootstrap intervals (passages; prompts)")
    ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=7)
    return _save(fig, path)


def plot_histograms(
    groups: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    xlabel: str,
    title: str,
    marks: Mapping[str, float] | None = None,
    bins: int = 20,
) -> Path:
    """Overlaid histograms, one per group, on shared bins (so their bars compare), each group's
    mean a dashed line in its colour and its count and mean in the legend; `marks` draws grey
    vertical lines (e.g. a decision boundary) named in the legend. Empty groups are left out of
    the plot but named in the legend as "(none)"."""
    plt = _pyplot()
    values = [float(v) for group in groups.values() for v in group]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    for value in (marks or {}).values():
        low, high = min(low, value), max(high, value)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k, (name, group) in enumerate(groups.items()):
        color = COLORS[k % len(COLORS)]
        data = np.asarray(list(group), dtype=float)
        if data.size == 0:
            ax.plot([], [], color=color, label=f"{name} (none)")
            continue
        ax.hist(data, bins=edges, color=color, alpha=0.5, label=f"{name} (n={data.size}, mean {data.mean():.3g})")
        ax.axvline(float(data.mean()), color=color, linestyle="--", linewidth=1.5)
    for name, value in (marks or {}).items():
        ax.axvline(value, color="grey", linewidth=1.0, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("prompts (count)")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)
