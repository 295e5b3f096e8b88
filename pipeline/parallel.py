"""CPU-parallel map over images for the CPU-bound per-image stages (CRF)."""
from __future__ import annotations

import os
from typing import Callable, Sequence

from pipeline.runtime import progress


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parallel_map(fn: Callable, jobs: Sequence[tuple], num_workers: int, desc: str, enabled: bool = True) -> list:
    """fn(*job) for every job, across `num_workers` processes (0 = every available core),
    with a progress bar; in-process when one worker suffices (no process start-up cost)."""
    workers = num_workers or available_cores()
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        return [fn(*job) for job in progress(jobs, desc, enabled=enabled)]
    from joblib import Parallel, delayed

    results = Parallel(n_jobs=workers, return_as="generator_unordered", batch_size=1)(
        delayed(fn)(*job) for job in jobs)
    return list(progress(results, desc, total=len(jobs), enabled=enabled))
