"""How many CPU threads a run uses when ``--threads`` is not given.

Paper: none (library infrastructure).

Library choices:

* :func:`choose_threads`: the cores this process may run on (``os.sched_getaffinity``) that are not busy (minus
  the 1-minute load average, rounded to the nearest integer; at least 1), shared among the processes that train
  side by side: the DDP processes of one run on the CPU (``devices``), times the runs a study or compare executes
  at once (worker processes started with :func:`share_cores`, which sets ``$BATCHMATES_PARALLEL_JOBS``). Erring
  towards fewer threads is deliberate: more threads than free cores is catastrophic (intra-op threads wait for
  each other), fewer is at most proportionally slower. Measured on the shared 2-core machine at load average
  2-3, ``ce`` on digits (8 epochs): 1.6 s of training with 1 thread, 24-42 s with 2.
* Float reductions (the sums inside matrix products, convolutions and BatchNorm statistics) are split differently
  for different thread counts, so two runs with different thread counts differ in the last bits after the first
  step and then drift apart (issue 12 measured supcon on digits, seed 0: 97.3 % with 1 thread, 98.2 % with 2).
  ``metrics.json`` records the count used (``threads``); pass ``--threads N`` to reproduce a run exactly.
* Importing this module imports neither torch nor Lightning.
"""

from __future__ import annotations

import os

__all__ = ["available_cores", "choose_threads", "share_cores", "JOBS_ENV"]

#: Set in worker processes that run side by side (see :func:`share_cores`).
JOBS_ENV = "BATCHMATES_PARALLEL_JOBS"


def available_cores() -> int:
    """CPU cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where that is missing)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parallel_jobs() -> int:
    """How many runs this process trains side by side with (``$BATCHMATES_PARALLEL_JOBS``, default 1)."""
    try:
        return max(1, int(os.environ.get(JOBS_ENV, "1")))
    except ValueError:
        return 1


def choose_threads(requested: int | None, *, processes: int = 1) -> int:
    """``requested`` if given, else the free cores per process (see the module docstring)."""
    if requested is not None:
        return int(requested)
    cores = available_cores()
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):
        busy = 0
    free = max(1, min(cores, cores - busy))
    return max(1, free // (max(1, int(processes)) * parallel_jobs()))


def share_cores(jobs: int) -> None:
    """Initializer of a worker process that trains side by side with ``jobs - 1`` others (e.g.
    ``ProcessPoolExecutor(initializer=share_cores, initargs=(jobs,))``): its runs split the free cores ``jobs`` ways."""
    os.environ[JOBS_ENV] = str(max(1, int(jobs)))
