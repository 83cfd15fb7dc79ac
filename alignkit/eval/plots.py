"""Figures for reports (matplotlib, Agg backend: no display needed). Each function writes one
PNG and returns its path; every figure has a title, axis labels with units and a legend, so
it reads without the code."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_reward_bars(
    methods: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    *,
    reward_label: str = "gold reward",
    title: str = "Gold reward per method (mean, 95% bootstrap CI)",
) -> Path:
    """Bar per method: `gold_reward` with error bars from `ci_low` / `ci_high`."""
    plt = _pyplot()
    names = list(methods)
    means = np.array([float(methods[m]["gold_reward"]) for m in names])
    lows = np.array([float(methods[m].get("ci_low", methods[m]["gold_reward"])) for m in names])
    highs = np.array([float(methods[m].get("ci_high", methods[m]["gold_reward"])) for m in names])
    fig, ax = plt.subplots(figsize=(max(4.5, 1.4 * len(names) + 2), 4))
    colors = [COLORS[i % len(COLORS)] for i in range(len(names))]
    ax.bar(names, means, color=colors, alpha=0.85, label="mean over samples")
    ax.errorbar(
        names,
        means,
        yerr=[means - lows, highs - means],
        fmt="none",
        ecolor="black",
        capsize=6,
        label="95% CI (bootstrap over prompts)",
    )
    for x, value in enumerate(means):
        ax.annotate(
            f"{value:+.3f}", (x, value), textcoords="offset points", xytext=(12, 4), fontsize=9
        )
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("method")
    ax.set_ylabel(reward_label)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_reward_vs_kl(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    reward_label: str = "reward",
    title: str = "Reward against KL to the reference over training",
) -> Path:
    """One line per method through its (kl, reward) points in step order; the first and last
    points are labelled with their step. Points without a KL are left out; a method with no
    KL at all is drawn against the step in a second panel."""
    plt = _pyplot()
    with_kl = {m: [p for p in pts if p.get("kl") is not None] for m, pts in curves.items()}
    without = {m: pts for m, pts in curves.items() if not with_kl[m] and pts}
    panels = 1 + bool(without)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0, 0]
    for i, (method, points) in enumerate(with_kl.items()):
        if not points:
            continue
        points = sorted(points, key=lambda p: p.get("step", 0))
        kl = [float(p["kl"]) for p in points]
        reward = [float(p["reward"]) for p in points]
        ax.plot(kl, reward, "-o", color=COLORS[i % len(COLORS)], markersize=3, label=_curve_label(method, points))
        for p in (points[0], points[-1]):
            ax.annotate(
                f"step {p.get('step')}",
                (float(p["kl"]), float(p["reward"])),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    ax.set_xlabel("KL(policy || reference) [nats per response]")
    ax.set_ylabel(reward_label)
    ax.set_title(title)
    if any(with_kl.values()):
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no method logged a KL", ha="center", va="center", transform=ax.transAxes)
    if without:
        ax2 = axes[0, 1]
        for i, (method, points) in enumerate(without.items()):
            points = sorted(points, key=lambda p: p.get("step", 0))
            ax2.plot(
                [p.get("step", j) for j, p in enumerate(points)],
                [float(p["reward"]) for p in points],
                "-o",
                color=COLORS[(i + len(with_kl)) % len(COLORS)],
                markersize=3,
                label=_curve_label(method, points),
            )
        ax2.set_xlabel("training step")
        ax2.set_ylabel(reward_label)
        ax2.set_title("Methods without a logged KL: reward against step")
        ax2.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_validation(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    title: str = "Validation while training",
) -> Path:
    """Held-out metrics against the training step, one colour per method, in up to four panels:
    rewards (the training batches' `reward/mean` as a thin line beside `eval/reward` and, dashed,
    `eval/gold`: a trained reward that rises while the gold one falls is over-optimisation),
    `eval/pass@k` (one line style per k), `eval/kl` and `eval/length`. `curves[method]` holds
    metrics.jsonl rows (`step` and any of those keys); a panel no method has data for is left out."""
    plt = _pyplot()
    keys = {key for points in curves.values() for p in points for key in p}
    passes = sorted((k for k in keys if k.startswith("eval/pass@")), key=lambda k: int(k.split("@")[1]))
    panels = [("reward (mean over samples)", [("reward/mean", "train reward/mean", "-", 1.0),
                                              ("eval/reward", "eval/reward", "-o", 1.8),
                                              ("eval/gold", "eval/gold", "--s", 1.8)]),
              ("pass@k over held-out prompts", [(k, k, ("-o", "--s", ":^", "-.v")[i % 4], 1.6)
                                                for i, k in enumerate(passes)]),
              ("KL(policy || reference) [nats per response]", [("eval/kl", "eval/kl", "-o", 1.6)]),
              ("response length [tokens]", [("eval/length", "eval/length", "-o", 1.6)])]
    panels = [(label, [line for line in lines if line[0] in keys]) for label, lines in panels]
    panels = [(label, lines) for label, lines in panels if lines]
    columns = min(2, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 3.9 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (label, lines) in zip(axes.flat, panels, strict=False):
        for i, (method, points) in enumerate(curves.items()):
            color = COLORS[i % len(COLORS)]
            for key, name, style, width in lines:
                shown = sorted((p for p in points if p.get(key) is not None), key=lambda p: p.get("step", 0))
                if shown:
                    ax.plot([p.get("step", 0) for p in shown], [float(p[key]) for p in shown], style, color=color,
                            linewidth=width, markersize=3, alpha=0.6 if key == "reward/mean" else 1.0,
                            label=f"{method}: {name}" if len(curves) > 1 else name)
        ax.set_xlabel("training step (0: before the first update)")
        ax.set_ylabel(label)
        ax.legend(loc="best", fontsize=7)
    if not panels:
        axes[0, 0].set_visible(True)
        axes[0, 0].text(0.5, 0.5, "no validation metrics logged", ha="center", va="center")
    fig.suptitle(title)
    return _save(fig, path)


def _curve_label(method: str, points: Sequence[dict]) -> str:
    """Legend entry: the method and, when recorded, which logged metric its curve shows."""
    metric = points[0].get("metric") if points else None
    return f"{method} ({metric})" if metric else method


def plot_overoptimization(
    d: Sequence[float],
    proxy: Sequence[float],
    gold: Sequence[float],
    path: str | Path,
    *,
    proxy_fit: Any = None,
    gold_fit: Any = None,
    title: str,
    proxy_label: str = "proxy reward",
    gold_label: str = "gold reward",
    annotations: Sequence[str] | None = None,
) -> Path:
    """Proxy and gold reward (relative to the initial policy) against d = sqrt(KL), measured
    points and fitted curves (`CurveFit` objects with `predict`, `alpha`, `beta`, `form`)."""
    plt = _pyplot()
    d = np.asarray(d, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    grid = np.linspace(0.0, max(float(d.max()), 1e-6) * 1.05, 200)
    series = [(proxy, proxy_fit, proxy_label, COLORS[0]), (gold, gold_fit, gold_label, COLORS[1])]
    for values, fit, label, color in series:
        ax.plot(d, values, "o", color=color, markersize=3.5, alpha=0.8, label=f"{label} (measured)")
        if fit is not None:
            shape = "d" if fit.form == "bon" else "log d"
            ax.plot(
                grid,
                fit.predict(grid),
                "-",
                color=color,
                linewidth=1.6,
                label=f"{label} fit: d({fit.alpha:.3f} - {fit.beta:.3f} {shape})",
            )
    if annotations is not None:
        for x, y, text in zip(d, gold, annotations, strict=True):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(3, -10), fontsize=7)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("d = sqrt(KL(policy || initial policy))  [sqrt(nats)]")
    ax.set_ylabel("reward minus initial policy's reward")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)
