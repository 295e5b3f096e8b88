"""What a stage is, and the context it runs in.

A stage is a module (by default `stages/<name>.py`) with
    run(ctx: StageContext) -> dict          # summary: outputs, metrics (written into the manifest)
and optionally
    expected_outputs(ctx) -> list[Path]     # the files it leaves; a missing one makes it incomplete
    check(ctx) -> None                      # validate inputs a user can break (weights files) before
                                            # the runner discards anything
Per-image stages compute only the images whose output is missing (when resuming).

A StageSpec declares the stage once: its upstream stages, the artifact kinds it writes, the
data splits it reads and what it needs of them (images, image-level labels, masks, instance
masks). The runner derives the fingerprint, the preflight and the error messages from it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.catalogue import Catalogue


@dataclass(frozen=True)
class StageSpec:
    name: str
    reads: tuple[str, ...] = ()          # upstream stages whose artifacts it reads
    writes: tuple[str, ...] = ()         # artifact kinds (pipeline/catalogue.py) it writes
    splits: tuple[str, ...] = ()         # data keys naming the splits it reads (train_split, ...)
    needs: tuple[str, ...] = ("images",)  # of those splits: images, labels, masks, instances
    per_image: bool = False
    module: str = ""                     # default: stages.<name>
    section: str = ""                    # config section; default: the stage name
    options: tuple[tuple[str, str], ...] = ()   # for a module that serves several stages (ctx.options)

    @property
    def module_name(self) -> str:
        return self.module or f"stages.{self.name}"

    @property
    def section_name(self) -> str:
        return self.section or self.name

    def load(self):
        return importlib.import_module(self.module_name)

    def describe_outputs(self) -> str:
        from pipeline.catalogue import KINDS

        return ", ".join(f"{KINDS[k].about} ({KINDS[k].under}/<run>/{KINDS[k].pattern})" for k in self.writes) \
            or "its outputs"


@dataclass
class StageContext:
    """What a stage sees: its own config section, the data section, the artifact catalogue,
    the runtime. `seed` is the run's seed (data order and augmentation derive from it)."""
    name: str
    section: Any
    data: Any
    seed: int
    result_dir: Path
    sess_dir: Path
    runtime: Any
    fingerprint: str
    resume: bool = True        # outputs present from an earlier run with the same fingerprint may be kept
    work_dir: Path = field(default=Path("."))
    split_override: str = ""   # the split this stage runs on when its section chooses one
    options: dict = field(default_factory=dict)   # the stage spec's options

    @cached_property
    def dataset(self):
        from dataset.registry import build_dataset

        return build_dataset(self.data, cache_dir=self.work_dir / "result" / ".cache")

    @cached_property
    def artifacts(self) -> Catalogue:
        return Catalogue(self.result_dir, self.sess_dir)

    @property
    def device(self):
        return self.runtime.device

    def todo(self, ids: list[str], artifact) -> list[str]:
        """Ids of this rank's share whose `artifact` file is missing (all of them when not resuming)."""
        mine = self.runtime.shard(ids)
        if not self.resume:
            return mine
        return [i for i in mine if not artifact.exists(i)]


class EmptySection:
    """The section of a stage that has no config keys of its own."""
    enabled = True
