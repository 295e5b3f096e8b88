"""Stage registry and the context a stage runs in.

A stage is a module `stages/<name>.py` with
    run(ctx: StageContext) -> dict          # summary: counts, metrics (written into the manifest)
and, for per-image stages,
    expected_outputs(ctx) -> list[Path]     # one file per image; missing ones are (re)computed
The ordered list below is the pipeline; the names are the contract used by the
CLI, the output folders and the metric files.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class StageSpec:
    name: str
    reads: tuple[str, ...]
    writes: str                # human description of the artifacts, for error messages
    per_image: bool = False

    @property
    def module_name(self) -> str:
        return f"stages.{self.name}"

    @property
    def implemented(self) -> bool:
        return importlib.util.find_spec(self.module_name) is not None

    def load(self):
        if not self.implemented:
            raise PipelineError(f"stage '{self.name}' is not implemented yet in this version of the toolkit")
        return importlib.import_module(self.module_name)


STAGES: tuple[StageSpec, ...] = (
    StageSpec("train_cam", (), "sess/<run>/cam_cnn.pth, cam_vit.pth"),
    StageSpec("make_cam", ("train_cam",), "result/<run>/cam/<id>.npz", per_image=True),
    StageSpec("eval_cam", ("make_cam",), "result/<run>/metrics/eval_cam.json"),
    StageSpec("cam_to_ir_label", ("make_cam",), "result/<run>/ir_label/<id>.png", per_image=True),
    StageSpec("train_irn", ("cam_to_ir_label",), "sess/<run>/irn.pth"),
    StageSpec("make_sem_seg", ("train_irn", "make_cam"), "result/<run>/sem_seg/<id>.png", per_image=True),
    StageSpec("eval_sem_seg", ("make_sem_seg",), "result/<run>/metrics/eval_sem_seg.json"),
    StageSpec("make_ins_seg", ("train_irn", "make_cam"), "result/<run>/ins_seg/<id>.npz", per_image=True),
    StageSpec("eval_ins_seg", ("make_ins_seg",), "result/<run>/metrics/eval_ins_seg.json"),
    StageSpec("train_deeplab", ("make_sem_seg",), "sess/<run>/deeplab.pth"),
    StageSpec("test_deeplab", ("train_deeplab",), "result/<run>/deeplab/logit/<id>.npz", per_image=True),
    StageSpec("crf", ("test_deeplab",), "result/<run>/deeplab/crf/<id>.png", per_image=True),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
_BY_NAME = {s.name: s for s in STAGES}


def get_stage(name: str) -> StageSpec:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise PipelineError(f"unknown stage '{name}' (stages: {', '.join(STAGE_NAMES)})") from None


@dataclass
class StageContext:
    """What a stage sees: its own config section, the data section, paths and runtime."""
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

    @cached_property
    def dataset(self):
        from pipeline.data import build_dataset

        return build_dataset(self.data, cache_dir=self.work_dir / "result" / ".cache")

    @property
    def device(self):
        return self.runtime.device

    def out(self, *parts: str) -> Path:
        return self.result_dir.joinpath(*parts)

    def sess(self, *parts: str) -> Path:
        return self.sess_dir.joinpath(*parts)

    def todo(self, ids: list[str], path_of) -> list[str]:
        """Ids of this rank's share whose output is missing (or all of them when not resuming)."""
        mine = self.runtime.shard(ids)
        if not self.resume:
            return mine
        return [i for i in mine if not Path(path_of(i)).exists()]
