"""The one training loop every training stage uses.

A training stage supplies its model, its data loader, its optimiser and a loss function
    losses(model, batch, step) -> {"loss": total, "<name>": term, ...}
and the Trainer does the rest, written once: learning-rate schedules (poly, warm-up + poly,
warm-up + cosine) with per-group `lr_mult`, gradient accumulation, AMP on CUDA, DDP under
torchrun, named loss terms in the log, a stop at the first non-finite loss, progress, and
checkpoint-and-resume that reproduces an uninterrupted run: the checkpoint holds the model,
optimiser and scaler, the position in the data stream and every random generator's state
(torch, CUDA, numpy, python); the sampler's order is a pure function of (seed, epoch), and
the augmentation of a sample a pure function of (seed, epoch, index).

Checkpoint file (the catalogue's `checkpoint` kind, sess/<run>/<stage>_ckpt.pth):
    {"fingerprint", "step", "model", "optimizer", "scaler", "history", "rng", "extra"}
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.runtime import progress

log = logging.getLogger("wsss")


# ----------------------------------------------------------------------------- schedules

@dataclass(frozen=True)
class Schedule:
    """lr(step) = base_lr × factor(step). `poly`: (1 − step/max)^power. `warmup_poly` and
    `warmup_cosine`: linear from `warmup_start` × base to base over `warmup_steps`, then
    poly or cosine decay over the remaining steps (to 0; cosine to `min_factor`); with
    `poly_from_zero`, warmup_poly's decay is (1 − step/max)^power, counted from step 0."""
    kind: str = "poly"
    power: float = 0.9
    warmup_steps: int = 0
    warmup_start: float = 1e-6
    min_factor: float = 0.0
    poly_from_zero: bool = False    # warmup_poly: (1 − step/max)^power after the warm-up (AFA / TSCD)

    def factor(self, step: int, max_steps: int) -> float:
        if max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {max_steps}")
        step = min(max(step, 0), max_steps)
        warm = self.warmup_steps if self.kind != "poly" else 0
        if step < warm:
            return self.warmup_start + (1.0 - self.warmup_start) * step / warm
        progress_ = (step - warm) / max(max_steps - warm, 1)
        if self.kind == "warmup_poly" and self.poly_from_zero:
            progress_ = step / max_steps
        if self.kind in ("poly", "warmup_poly"):
            return (1.0 - progress_) ** self.power
        if self.kind == "warmup_cosine":
            return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress_))
        raise ValueError(f"unknown schedule {self.kind!r}")


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    """Every group's lr = base_lr × factor × the group's `lr_mult` (default 1); returns the base lr."""
    lr = base_lr * factor
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    return lr


def make_optimizer(kind: str, groups: list[dict], lr: float, momentum: float, weight_decay: float):
    """SGD (the CNN references' choice) or AdamW; groups may carry `lr_mult` and their own weight decay."""
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def optimizer_from_config(opt, groups: list[dict]):
    """The optimiser of an `OptimizerConfig` section."""
    return make_optimizer(opt.kind, groups, opt.lr, opt.momentum, opt.weight_decay)


def schedule_from_config(opt) -> Schedule:
    return Schedule(kind=opt.schedule, power=opt.poly_power, warmup_steps=opt.warmup_steps,
                    warmup_start=opt.warmup_start, poly_from_zero=opt.poly_from_zero)


# ----------------------------------------------------------------------------- random state

def rng_state() -> dict:
    """Every generator a training step may draw from, in a form `torch.load(weights_only=True)` reads."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
             "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- the loop

def check_finite(loss: torch.Tensor, stage: str, step: int, lr_key: str) -> None:
    """Stop at the first non-finite loss instead of training on garbage for hours."""
    if not torch.isfinite(loss).all():
        raise PipelineError(f"{stage}: the loss became {float(loss.detach())} at step {step}; training diverged. "
                            f"Lower {lr_key} (or switch amp off) and re-run the stage.")


def wrap_ddp(model: torch.nn.Module, runtime, find_unused: bool = False) -> torch.nn.Module:
    """DistributedDataParallel under torchrun; the model itself otherwise. `find_unused`: some
    parameters get no gradient in some steps (a loss term that starts later)."""
    if not runtime.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


LossFn = Callable[[torch.nn.Module, Any, int], dict]


class Trainer:
    """Step-based training of `model` over an endless stream of `loader`'s epochs.

    One step = `accumulation` batches then one optimiser step. `checkpoint_every` steps (and at
    the end) the full state goes to the stage's checkpoint; `on_epoch_end(epoch, model)` may
    return extra figures for the epoch's log record (train_cam's validation loss);
    `after_step(steps_done, model)` runs after every optimiser step (EMA teachers, which are
    submodules of the model and so checkpointed with it).
    """

    def __init__(self, ctx, model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer,
                 losses: LossFn, max_steps: int, base_lr: float, schedule: Schedule, lr_key: str,
                 accumulation: int = 1, amp: bool = False, checkpoint_every: int | None = None,
                 log_every: int | None = None, on_epoch_end: Callable[[int, torch.nn.Module], dict] | None = None,
                 after_step: Callable[[int, torch.nn.Module], None] | None = None, find_unused: bool = False):
        if max_steps <= 0:
            raise PipelineError(f"{ctx.name}: nothing to train ({max_steps} steps); check the schedule keys")
        self.ctx, self.runtime = ctx, ctx.runtime
        self.model, self.loader, self.optimizer, self.losses = model, loader, optimizer, losses
        self.max_steps, self.base_lr, self.schedule, self.lr_key = max_steps, base_lr, schedule, lr_key
        self.accumulation, self.amp = accumulation, amp
        self.steps_per_epoch = max(1, len(loader) // accumulation)
        self.checkpoint_every = checkpoint_every or self.steps_per_epoch
        self.log_every = log_every or self.steps_per_epoch
        self.on_epoch_end, self.after_step, self.find_unused = on_epoch_end, after_step, find_unused
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp and self.runtime.device.type == "cuda")
        self.history: list[dict] = []
        self.step = 0
        # loss sums since the last log record (checkpointed, so a resumed run logs the same figures)
        self.running: dict[str, float] = {}
        self.checkpoint_path = ctx.artifacts.checkpoint.path(ctx.name)

    # -- checkpoints ---------------------------------------------------------------
    def _save(self) -> None:
        if self.runtime.is_main:
            self.ctx.artifacts.checkpoint.write(self.ctx.name, {
                "fingerprint": self.ctx.fingerprint, "step": self.step, "model": unwrap(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "history": self.history, "rng": rng_state(), "running": dict(self.running)})
        self.runtime.barrier()

    def _resume(self) -> None:
        if not self.ctx.resume or not self.checkpoint_path.exists():
            return
        try:
            state = self.ctx.artifacts.checkpoint.read(self.ctx.name, map_location=self.runtime.device)
        except PipelineError as e:
            log.warning("%s: %s; training from the start", self.ctx.name, e)
            return
        if state.get("fingerprint") != self.ctx.fingerprint:
            log.info("%s: ignoring %s, written under another config", self.ctx.name, self.checkpoint_path)
            return
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.history, self.step = state["history"], state["step"]
        self.running = {k: float(v) for k, v in state.get("running", {}).items()}
        set_rng_state(state["rng"])
        log.info("%s: resuming at step %d/%d from %s", self.ctx.name, self.step, self.max_steps, self.checkpoint_path)

    # -- data ------------------------------------------------------------------------
    def _batches(self) -> Iterator:
        """Batches from step `self.step` on: the epoch and the position inside it follow from
        the step alone, so a resumed run sees exactly the batches an uninterrupted one would."""
        consumed = self.step * self.accumulation
        epoch, offset = divmod(consumed, self.steps_per_epoch * self.accumulation)
        while True:
            set_epoch(self.loader, epoch, skip_batches=offset)
            yield from self.loader
            epoch, offset = epoch + 1, 0

    # -- the loop --------------------------------------------------------------------
    def fit(self) -> list[dict]:
        self._resume()
        model = wrap_ddp(self.model, self.runtime, self.find_unused)
        model.train()
        stream = self._batches()
        seen, t0 = 0, time.time()
        name = self.ctx.name
        for step in progress(range(self.step, self.max_steps), name, total=self.max_steps - self.step,
                             enabled=self.runtime.is_main):
            lr = set_lr(self.optimizer, self.base_lr, self.schedule.factor(step, self.max_steps))
            self.optimizer.zero_grad(set_to_none=True)
            for _ in range(self.accumulation):
                batch = next(stream)
                with self.runtime.autocast(self.amp):
                    terms = self.losses(model, batch, step)
                check_finite(terms["loss"], name, step, self.lr_key)
                self.scaler.scale(terms["loss"] / self.accumulation).backward()
                for key, value in terms.items():
                    self.running[key] = self.running.get(key, 0.0) + float(value.detach()) / self.accumulation
                seen += int(batch[0].shape[0])
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.after_step is not None:
                self.after_step(step + 1, unwrap(self.model))
            self.running["_steps"] = self.running.get("_steps", 0.0) + 1
            self.step = done = step + 1
            epoch_end = done % self.steps_per_epoch == 0
            if done % self.log_every == 0 or epoch_end or done == self.max_steps:
                count = self.running.pop("_steps")
                record = {"step": done, "epoch": round(done / self.steps_per_epoch, 3),
                          **{k: round(v / count, 5) for k, v in self.running.items()}, "lr": lr,
                          "images_per_s": round(seen * self.runtime.world_size / max(time.time() - t0, 1e-9), 2)}
                if epoch_end and self.on_epoch_end is not None:
                    record.update(self.on_epoch_end(done // self.steps_per_epoch, model) or {})
                    model.train()
                self.history.append(record)
                terms_text = ", ".join(f"{k} {v:.4f}" for k, v in record.items()
                                       if k not in ("step", "epoch", "lr", "images_per_s"))
                log.info("%s step %d/%d (epoch %.2f): %s, lr %.2e, %.1f img/s", name, done, self.max_steps,
                         record["epoch"], terms_text, lr, record["images_per_s"])
                self.running, seen, t0 = {}, 0, time.time()
            if done % self.checkpoint_every == 0 and done < self.max_steps:
                self._save()
        return self.history


# ----------------------------------------------------------------------------- sampling

class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of a permutation that depends only on (seed, epoch). Yields
    `epoch × n + index`, so the data set knows the epoch even in persistent worker processes
    (see `decode_key`); `skip` drops the first samples of the epoch (a resumed run)."""

    def __init__(self, n: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1, drop_last: bool = True):
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, seed, shuffle, rank, world_size
        self.drop_last = drop_last
        self.epoch, self.skip = 0, 0
        self.per_rank = n // world_size if drop_last else -(-n // world_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return max(self.per_rank - self.skip, 0)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        else:
            order = torch.arange(self.n)
        order = order.tolist()
        if not self.drop_last and len(order) < self.per_rank * self.world_size:
            order += order[:self.per_rank * self.world_size - len(order)]
        mine = order[self.rank:self.per_rank * self.world_size:self.world_size]
        for index in mine[self.skip:]:
            yield self.epoch * self.n + index


def decode_key(key: int, n: int) -> tuple[int, int]:
    """(epoch, index) of a key yielded by EpochSampler over `n` samples."""
    return divmod(int(key), n)


def set_epoch(loader, epoch: int, skip_batches: int = 0) -> None:
    """Start `loader`'s sampler at `epoch`, `skip_batches` batches in."""
    loader.sampler.set_epoch(epoch, skip_batches * loader.batch_size)


def per_rank_batch(batch_size: int, runtime, key: str) -> int:
    """`batch_size` is the global batch of one optimiser step: each rank takes batch / world size."""
    if batch_size % runtime.world_size:
        raise PipelineError(f"{key}={batch_size} is the global batch and must divide by the {runtime.world_size} "
                            f"processes of this run")
    return batch_size // runtime.world_size


def make_loader(dataset, batch_size: int, runtime, num_workers: int, shuffle: bool, seed: int,
                drop_last: bool = True, key: str = "batch_size"):
    """A DataLoader over this rank's share, in a deterministic order per (seed, epoch).
    `batch_size` is global (per rank: batch / world size; the log states both)."""
    from torch.utils.data import DataLoader

    per_rank = per_rank_batch(batch_size, runtime, key)
    sampler = EpochSampler(len(dataset), seed, shuffle, runtime.rank, runtime.world_size, drop_last)
    if drop_last and sampler.per_rank < per_rank:
        log.warning("%s=%d is larger than the %d images: using %d", key, batch_size, len(dataset), sampler.per_rank)
        per_rank = max(sampler.per_rank, 1)
    if runtime.distributed:
        log.info("%s: global batch %d = %d per rank × %d ranks", key, batch_size, per_rank, runtime.world_size)
    # Its own generator: a DataLoader otherwise draws its worker seed from the global torch RNG at
    # every new epoch, which would make a resumed run's dropout differ from an uninterrupted one.
    return DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, pin_memory=runtime.device.type == "cuda",
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))
