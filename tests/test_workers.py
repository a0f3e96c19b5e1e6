"""``batchmates.training.workers.run_in_workers``: results, errors, and a stop that stops every worker."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from batchmates.training.workers import run_in_workers


def _square(x: int) -> int:
    return x * x


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


def _mark_and_sleep(path: str, seconds: float) -> str:
    with open(path, "w"):
        pass
    time.sleep(seconds)
    return path


def _exit_like_lightning(path: str, seconds: float) -> None:
    # what Lightning does with a Ctrl-C during fit: a graceful shutdown, then sys.exit(1)
    with open(path, "w"):
        pass
    raise SystemExit(1)


def test_every_call_reports_its_result_or_its_error() -> None:
    got: dict[int, tuple] = {}
    run_in_workers(_fail_on_three, [(i,) for i in range(5)], 2, lambda i, r, e: got.update({i: (r, e)}))
    assert {i: r for i, (r, e) in got.items() if e is None} == {0: 0, 1: 1, 2: 2, 4: 4}
    assert isinstance(got[3][1], ValueError) and str(got[3][1]) == "three"
    squares: dict[int, int] = {}
    run_in_workers(_square, [(i,) for i in range(4)], 2, lambda i, r, e: squares.update({i: r}))
    assert squares == {0: 0, 1: 1, 2: 4, 3: 9}


def _markers(tmp_path) -> list[str]:
    return sorted(p for p in os.listdir(tmp_path) if p.startswith("call"))


@pytest.mark.parametrize("how", ["sigterm-to-the-parent", "sigterm-with-sigint-ignored", "a-worker-exits"])
def test_a_stop_starts_no_new_call_and_leaves_no_worker(tmp_path, how: str) -> None:
    calls = [(str(tmp_path / f"call{i}"), 60.0) for i in range(6)]
    fn = _mark_and_sleep
    ignored = how == "sigterm-with-sigint-ignored"  # as under nohup or `cmd &`: the workers inherit the ignore
    previous_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignored else None
    if how.startswith("sigterm"):
        # SIGTERM to this process once the first calls have started: it becomes KeyboardInterrupt
        def later() -> None:
            deadline = time.monotonic() + 60
            while not _markers(tmp_path) and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=later, daemon=True).start()
    else:
        fn = _exit_like_lightning
    done: list[int] = []
    handler_before = signal.getsignal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_in_workers(fn, calls, 2, lambda i, r, e: done.append(i))
    finally:
        if ignored:
            signal.signal(signal.SIGINT, previous_sigint)
    assert time.monotonic() - t0 < 45  # not the 3 x 60 s the queue would take
    assert len(_markers(tmp_path)) <= 2 and done == []  # the calls in progress were stopped; none started after
    assert signal.getsignal(signal.SIGTERM) == handler_before  # SIGTERM is only taken over while the calls run
    import multiprocessing as mp

    assert mp.active_children() == []  # every worker has exited
