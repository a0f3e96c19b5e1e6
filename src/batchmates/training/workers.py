"""Run calls side by side in worker processes, and stop all of them on Ctrl-C or SIGTERM.

Library choice, from what a plain :class:`concurrent.futures.ProcessPoolExecutor` did to ``batchmates study
--jobs 2`` (2026-11-30):

* Ctrl-C did not stop the study. Lightning turns the worker's KeyboardInterrupt into ``sys.exit(1)`` after a
  graceful shutdown and ignores SIGINT from then on; the pool reported the run as failed, the worker took the next
  run from the queue, and the pool's exit waited for the whole queue.
* A SIGTERM to the parent alone killed the parent and left its workers training the runs already handed to them,
  orphaned.

:func:`run_in_workers` stops instead: on KeyboardInterrupt in the parent (Ctrl-C, or a SIGTERM, which it turns into
one while the calls run), or when a worker's call ends in KeyboardInterrupt or SystemExit, it sets a shared stop
flag (a worker starts no call once it is set), cancels the calls not yet handed out, sends SIGINT to every worker
(Lightning stops its run at the next step; the run resumes from its last checkpoint), waits for the workers to
exit, and raises KeyboardInterrupt. Nothing a finished call wrote is touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["run_in_workers"]

_STOP: Any = None  # in a worker: the shared stop flag (a multiprocessing Event)


def _init_worker(stop: Any, pids: Any, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    global _STOP
    _STOP = stop
    pids.put(os.getpid())  # so the parent can interrupt this worker without the pool's private process table
    # react to the parent's SIGINT even when this process was started with SIGINT ignored (nohup, `cmd &` in a
    # script: the children of such a parent inherit the ignore, and the stop would wait for the runs to finish)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if initializer is not None:
        initializer(*initargs)


def _call(fn: Callable[..., Any], args: tuple) -> Any:
    if _STOP is not None and _STOP.is_set():
        raise KeyboardInterrupt("the study was stopped before this call started")
    try:
        return fn(*args)
    except (KeyboardInterrupt, SystemExit):  # stop this worker's next call before the parent has seen this one
        if _STOP is not None:
            _STOP.set()
        raise


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While the calls run, SIGTERM raises KeyboardInterrupt in the parent (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_in_workers(fn: Callable[..., Any], calls: Sequence[tuple], workers: int,
                   on_done: Callable[[int, Any, Exception | None], None], *,
                   initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> None:
    """Call ``fn(*args)`` for each ``args`` in ``calls`` on ``workers`` spawned processes.

    ``on_done(i, result, error)`` runs in the parent as each call ``i`` finishes (``error``: the exception it
    raised, else None). ``fn`` must be importable (spawn). Raises KeyboardInterrupt after stopping every worker
    (module docstring) when the parent is interrupted or a call was.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")
    stop, pids = ctx.Event(), ctx.SimpleQueue()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(stop, pids, initializer, tuple(initargs)))
    try:
        with _sigterm_as_interrupt():
            try:
                futures = {pool.submit(_call, fn, tuple(args)): i for i, args in enumerate(calls)}
                for fut in as_completed(futures):
                    try:
                        result, error = fut.result(), None
                    except (KeyboardInterrupt, SystemExit) as e:  # Lightning's answer to a Ctrl-C in the worker
                        raise KeyboardInterrupt(f"a worker was interrupted ({type(e).__name__})") from e
                    except Exception as e:  # noqa: BLE001 - one failed call must not lose the others
                        result, error = None, e
                    on_done(futures[fut], result, error)
            except KeyboardInterrupt:
                stop.set()  # a worker not started yet starts no call
                while not pids.empty():  # every worker that has started
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pids.get(), signal.SIGINT)
                raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
