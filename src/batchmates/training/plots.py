"""Matplotlib figures: training curves and the compare bar chart.

Paper: none (library infrastructure).

Library choices: the Agg backend (no display needed), PNG bytes written atomically (:mod:`batchmates.io`);
whole-epoch ticks; the accuracy panel of a method without a classifier says so instead of staying empty; bars
start at 0 (a cut axis exaggerates differences) and their legend sits outside the plot, never over a bar.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from batchmates.io import atomic_write_bytes

__all__ = ["plot_curves", "plot_accuracy_bars"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _plt().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_curves(rows: Sequence[dict[str, Any]], path: str, *, title: str = "") -> None:
    """Loss (left) and accuracy (right) per epoch from the rows of ``metrics.json["curve"]``."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ep = [r["epoch"] for r in rows]

    def series(key: str) -> list[float]:
        return [float(r.get(key, math.nan)) for r in rows]

    from matplotlib.ticker import MaxNLocator

    ax1.plot(ep, series("train_loss"), marker="o", label="train")
    if any(not math.isnan(v) for v in series("val_loss")):
        ax1.plot(ep, series("val_loss"), marker="o", label="test")
    ax1.set_ylabel("loss")
    ax1.legend()
    drawn = False
    for key, label in (("train_acc", "train (augmented)"), ("val_acc", "test"), ("knn_acc", "test (kNN monitor)")):
        if any(not math.isnan(v) for v in series(key)):
            ax2.plot(ep, series(key), marker="o", label=label)
            drawn = True
    ax2.set_ylabel("top-1 accuracy")
    if drawn:
        ax2.legend()
    else:
        ax2.text(0.5, 0.5, "no per-epoch accuracy:\nthe method has no classifier\n(accuracy after training: "
                 "linear probe,\nsee metrics.json)", ha="center", va="center", transform=ax2.transAxes,
                 color="0.4", fontsize="small")
        ax2.set_xlim(ax1.get_xlim())
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_accuracy_bars(summary: dict[str, dict[str, dict[str, float]]], path: str, *, title: str = "") -> None:
    """Grouped bars: one group per method, one bar per protocol, error bars = std over seeds.

    ``summary[method][protocol] = {"mean": m, "std": s, "n": n}``.
    """
    plt = _plt()
    methods = list(summary)
    protocols: list[str] = []
    for m in methods:
        for p in summary[m]:
            if p not in protocols:
                protocols.append(p)
    width = 0.8 / max(1, len(protocols))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(methods) * max(1, len(protocols)) * 0.6 + 2), 3.6))
    for j, p in enumerate(protocols):
        xs = [i + (j - (len(protocols) - 1) / 2) * width for i in range(len(methods))]
        means = [summary[m].get(p, {}).get("mean", math.nan) for m in methods]
        stds = [summary[m].get(p, {}).get("std", 0.0) for m in methods]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=p)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=30, ha="right")
    ax.set_ylabel("top-1 accuracy")
    finite = [summary[m][p]["mean"] for m in methods for p in summary[m] if not math.isnan(summary[m][p]["mean"])]
    ax.set_ylim(0.0, min(1.0, max(finite) + 0.05) if finite else 1.0)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    _save(fig, path)
