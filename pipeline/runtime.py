"""Runtime: device, distributed ranks (torchrun), logging, progress bars, seeding.

One code path for CPU, one GPU and many GPUs: under torchrun the environment
carries RANK / WORLD_SIZE / LOCAL_RANK and a process group is created (nccl on
CUDA, gloo on CPU); otherwise world size is 1 and every collective is a no-op.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

import numpy as np

from pipeline.errors import PipelineError

T = TypeVar("T")
log = logging.getLogger("wsss")


@dataclass
class Runtime:
    device: Any  # a torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of `items`: disjoint across ranks, together exactly `items`."""
        return list(items[self.rank::self.world_size])

    def autocast(self, enabled: bool):
        """Mixed precision on CUDA when asked; a null context elsewhere (same code path)."""
        import torch

        if enabled and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def all_reduce_sum(self, value: float) -> float:
        if not self.distributed:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())


def resolve_device(name: str, local_rank: int = 0):
    import torch

    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError("device: cuda was asked for but CUDA is not available (use device: auto or cpu)")
        return torch.device("cuda", local_rank)
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


_RUNTIME: Runtime | None = None


def init_runtime(device: str = "auto") -> Runtime:
    """Create (once per process) the runtime from the environment."""
    global _RUNTIME
    if _RUNTIME is not None:
        return _RUNTIME
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    _RUNTIME = Runtime(device=dev, rank=rank, world_size=world_size, local_rank=local_rank)
    return _RUNTIME


def shutdown_runtime() -> None:
    global _RUNTIME
    if _RUNTIME is not None and _RUNTIME.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _RUNTIME = None


def setup_logging(log_dir: Path | None, rank: int = 0, verbose: bool = False) -> None:
    """Console on rank 0 only (warnings from other ranks), plus one log file per rank."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_wsss", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    console._wsss = True  # type: ignore[attr-defined]
    root.addHandler(console)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_dir / f"rank{rank}.log")
        file.setFormatter(logging.Formatter("%(asctime)s rank%(process)d %(name)s %(levelname)s %(message)s"))
        file._wsss = True  # type: ignore[attr-defined]
        root.addHandler(file)
    for noisy in ("PIL", "matplotlib", "timm", "urllib3", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def progress(iterable: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterable[T]:
    """A tqdm bar on an interactive terminal of rank 0; otherwise a log line every ~10%."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False)
        return
    step = max(1, (total or 0) // 10)
    for i, item in enumerate(iterable, 1):
        yield item
        if enabled and total and (i % step == 0 or i == total):
            log.info("%s: %d/%d", desc, i, total)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
