"""Run independent pieces of work at once in forked processes (the evaluation's jobs, its figures).

Processes rather than threads: the engine's Python between its batched products holds the GIL, so two threads
gained 1.2x on 2 cores where two processes gain 1.7x. Forked, because the work (closures over environments,
schedules and traces) is inherited instead of pickled, and a forked worker starts in milliseconds where a spawned
one imports torch and lrenv again (~3 s). Ray fans out ``lrenv benchmark``'s trials; for one evaluation its start
and its workers' imports (~5-8 s) would cost what the fan-out saves.
"""

from __future__ import annotations

import multiprocessing
import numbers
import os
from typing import Any, Callable, Sequence

import torch

MAX_WORKERS = 8
"""The most worker processes by default."""

_WORK: Callable[[int], Any] | None = None
"""The work of the :func:`fork_map` in progress, for its forked workers (inherited, never pickled)."""


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """One worker per available core, at most :data:`MAX_WORKERS`: each runs single-threaded, so no thread waits
    for another (the collapse of issue 14 on a busy machine) and a busy core only slows its own worker."""
    return max(1, min(available_cores(), MAX_WORKERS))


def check_workers(workers: Any) -> int:
    """``workers`` as an int, or a ValueError naming it."""
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise ValueError(f"workers must be a positive integer (processes run at once), got {workers!r}")
    return int(workers)


def can_fork(device: str = "cpu", threads: int | None = 1) -> bool:
    """Whether work may run in forked processes: on a CPU (a forked CUDA context is unusable), with single-threaded
    torch (a process forked after torch's OpenMP team ran can deadlock in it; at one thread torch never enters
    it), where fork exists (not on Windows; macOS has it but its system libraries are not fork-safe), and not in
    a daemonic process (those may not have children: a multiprocessing pool's worker, say)."""
    import sys
    return (torch.device(device).type == "cpu" and threads == 1 and sys.platform.startswith("linux")
            and "fork" in multiprocessing.get_all_start_methods() and not multiprocessing.current_process().daemon)


def one_thread() -> None:
    """One thread for torch and for numpy's / scikit-learn's BLAS in this process (a forked worker's setup)."""
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)  # numpy / scikit-learn BLAS


def _call(k: int) -> Any:
    assert _WORK is not None
    return _WORK(k)


def fork_map(work: Callable[[int], Any], n: int, workers: int, *, order: Sequence[int] | None = None,
             on_done: Callable[[int], None] | None = None, while_waiting: Callable[[], None] | None = None) -> list:
    """``[work(k) for k in range(n)]``, computed by up to ``workers`` forked processes on one thread each (the
    caller checks :func:`can_fork`); ``order``: the order to hand the items out (longest first balances best);
    ``on_done(k)`` runs here as each item finishes; ``while_waiting()`` runs here once the items are handed out
    (work for this otherwise idle process). Results come back pickled; an item's exception is raised here."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    global _WORK
    if n == 0:
        return []
    if _WORK is not None:
        raise RuntimeError("fork_map: already running (nested fork_map calls are not supported)")
    _WORK = work
    try:
        with ProcessPoolExecutor(max_workers=min(workers, n), mp_context=multiprocessing.get_context("fork"),
                                 initializer=one_thread) as pool:
            futures = {pool.submit(_call, k): k for k in (range(n) if order is None else order)}
            done: dict[int, Any] = {}
            try:
                if while_waiting is not None:
                    while_waiting()
                for f in as_completed(futures):
                    done[futures[f]] = f.result()
                    if on_done is not None:
                        on_done(futures[f])
            except BaseException:  # the first failure (or Ctrl-C) ends the rest
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    finally:
        _WORK = None
    return [done[k] for k in range(n)]
