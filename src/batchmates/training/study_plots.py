"""The plots of a study report: accuracy with intervals, accuracy against corruption severity and label noise.

Paper: none (library infrastructure).

Library choices: error bars are the 95% t-intervals of :mod:`batchmates.training.study_stats` (none for one
seed); severity 0 on the corruption plot is the clean test accuracy; the figures go through
:mod:`batchmates.training.plots` (Agg backend, atomic PNG writes).
"""

from __future__ import annotations

import math
import os
from typing import Any

from batchmates.training.plots import _plt, _save

__all__ = ["plot_study"]


def _ci(s: dict[str, float] | None) -> tuple[float, float]:
    if not s or not s.get("n"):
        return math.nan, 0.0
    half = s.get("half", math.nan)
    return s["mean"], half if math.isfinite(half) else 0.0


def _accuracy(res: dict[str, Any], path: str) -> bool:
    names = [n for n, v in res["variants"].items() if "accuracy" in v["stats"]]
    if not names:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(names) + 1.2))
    for i, n in enumerate(names):
        m, h = _ci(res["variants"][n]["stats"]["accuracy"])
        ax.errorbar([100 * m], [i], xerr=[100 * h], fmt="o", capsize=3, color="C0")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("test top-1 (%), mean and 95% CI over seeds")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(res["title"])
    _save(fig, path)
    return True


def _series(ax: Any, xs: list[float], stats: list[dict[str, float] | None], label: str) -> bool:
    pts = [(x, *_ci(s)) for x, s in zip(xs, stats) if s and s.get("n")]
    if not pts:
        return False
    ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts], marker="o",
                capsize=3, label=label)
    return True


def _corruption(res: dict[str, Any], names: list[str], path: str) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    for n in names:
        st = res["variants"].get(n, {}).get("stats", {})
        drawn |= _series(ax, list(range(6)), [st.get("accuracy")] + [st.get(f"corruption@{s}") for s in range(1, 6)],
                         n)
    return _finish(plt, fig, ax, drawn, "corruption severity (0: clean test set)", "test top-1 (%), mean over kinds",
                   path)


def _label_noise(res: dict[str, Any], series: dict[str, list[str]], path: str) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    for label, names in series.items():
        vs = [res["variants"][n] for n in names if n in res["variants"]]
        vs.sort(key=lambda v: v["budget"]["label_noise"])
        drawn |= _series(ax, [100 * v["budget"]["label_noise"] for v in vs], [v["stats"].get("accuracy") for v in vs],
                         label)
    return _finish(plt, fig, ax, drawn, "symmetric label noise on the training split (%)", "clean test top-1 (%)", path)


def _finish(plt: Any, fig: Any, ax: Any, drawn: bool, xlabel: str, ylabel: str, path: str) -> bool:
    """Label and save a line plot; a plot with no series is closed unsaved (returns whether it was written)."""
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def plot_study(res: dict[str, Any], plots: dict[str, Any], out: str) -> dict[str, bool]:
    """Write ``accuracy.png`` and, where the study file asks for them, ``corruption.png`` and ``label_noise.png``."""
    flags = {"has_accuracy_plot": _accuracy(res, os.path.join(out, "accuracy.png"))}
    flags["has_corruption_plot"] = bool(plots.get("corruption")) and _corruption(
        res, list(plots["corruption"]), os.path.join(out, "corruption.png"))
    flags["has_noise_plot"] = bool(plots.get("label_noise")) and _label_noise(
        res, dict(plots["label_noise"]), os.path.join(out, "label_noise.png"))
    return flags
