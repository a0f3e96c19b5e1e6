"""Issue 12's smaller findings: thread count, file permissions, where `bench` writes, epoch numbering, plots."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import pytest

from batchmates.training import threads


def test_threads_follow_free_cores_and_side_by_side_jobs(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.7, 0.0, 0.0))
    monkeypatch.delenv(threads.JOBS_ENV, raising=False)
    assert threads.choose_threads(None) == 6  # 8 cores, about 2 busy
    assert threads.choose_threads(None, processes=2) == 3  # DDP on the CPU: per process
    threads.share_cores(4)  # as a study's worker process
    assert threads.choose_threads(None) == 1  # 6 free cores / 4 runs side by side
    assert threads.choose_threads(5) == 5  # --threads wins
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 0.0, 0.0))
    monkeypatch.delenv(threads.JOBS_ENV)
    assert threads.choose_threads(None) == 1  # never 0


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_respect_the_umask(tmp_path: Path, umask: int) -> None:
    from batchmates.io import atomic_write_json, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("a.txt", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


def test_bench_writes_the_run_output_not_the_tracked_docs(monkeypatch, tmp_path: Path) -> None:
    from batchmates import cli
    from batchmates.bench import runner

    calls = []
    monkeypatch.setattr(runner, "run_benchmarks", lambda group, **kw: calls.append(kw) or 0)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "losses", "--quick"]) == 0
    assert calls[-1]["out"] == os.path.join("runs", "bench") and calls[-1]["doc"] == os.path.join("runs", "bench",
                                                                                                  "benchmarks.md")
    assert cli.main(["bench", "losses", "--quick", "--update-docs"]) == 0
    assert calls[-1]["out"] == "bench" and calls[-1]["doc"] == os.path.join("docs", "benchmarks.md")


def test_epochs_are_counted_from_one() -> None:
    from batchmates.training.progress import epoch_description

    assert epoch_description(0, 1) == "Epoch 1/1"
    assert epoch_description(3, 4) == "Epoch 4/4"
    assert epoch_description(2, -1) == "Epoch 3"


def test_curves_of_a_method_without_accuracy_warn_nothing(tmp_path: Path) -> None:
    from batchmates.training.plots import plot_curves

    rows = [{"epoch": e, "train_loss": 3.0 - e, "val_acc": float("nan")} for e in (1, 2, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found to put in legend" was one
        plot_curves(rows, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_accuracy_bars_start_at_zero(monkeypatch, tmp_path: Path) -> None:
    from batchmates.training import plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig))
    plots.plot_accuracy_bars({"ce": {"top-1": {"mean": 0.95, "std": 0.01, "n": 2}},
                              "swav": {"top-1": {"mean": 0.90, "std": 0.02, "n": 2}}}, str(tmp_path / "b.png"))
    ax = figs[0].axes[0]
    assert ax.get_ylim()[0] == 0.0  # a cut axis made 0.90 vs 0.95 look like a factor of two
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # beside the axes, over no bar
