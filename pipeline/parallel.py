"""CPU-parallel map over images for the CPU-bound per-image stages (CRF)."""
from __future__ import annotations

import os
import signal
from typing import Callable, Sequence

from pipeline.runtime import progress


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent: a terminal sends SIGINT to the whole process group, and a
    worker that took it would print its own traceback beside the parent's one-line message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def parallel_map(fn: Callable, jobs: Sequence[tuple], num_workers: int, desc: str, enabled: bool = True) -> list:
    """fn(*job) for every job, across `num_workers` processes (0 = every available core),
    with a progress bar; in-process when one worker suffices (no process start-up cost).
    Results come in completion order. On any error or Ctrl-C in the parent the workers are killed."""
    workers = num_workers or available_cores()
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        return [fn(*job) for job in progress(jobs, desc, enabled=enabled)]
    import multiprocessing

    # forkserver: workers fork from a small clean server process, not from this one (which holds
    # torch's thread pools); the server itself ignores SIGINT.
    pool = multiprocessing.get_context("forkserver").Pool(workers, initializer=_ignore_sigint)
    try:
        results = list(progress(pool.imap_unordered(_call, [(fn, job) for job in jobs]), desc, total=len(jobs),
                                enabled=enabled))
    except BaseException:
        pool.terminate()
        raise
    pool.close()
    pool.join()
    return results


def _call(task: tuple):
    fn, job = task
    return fn(*job)
