"""Export the pseudo labels for any downstream segmenter.

DEST/pseudo_seg_labels/<id>.png   palette PNGs (symlinks to result/<run>/sem_seg/, or copies)
DEST/pseudo_seg_labels.txt        one `image label` pair per line, paths relative to DEST
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline import artifacts
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.runner import stage_status


def sem_seg_path(result_dir: Path, image_id: str) -> Path:
    return Path(result_dir) / "sem_seg" / f"{image_id}.png"


def export_pseudo_labels(cfg: Config, runtime, dest: str | Path, copy: bool = False) -> dict:
    status = stage_status(cfg, "make_sem_seg", runtime)
    if not status.done:
        why = f": {status.reason}" if status.reason else ""
        raise PipelineError(
            f"cannot export: stage 'make_sem_seg' is {status.state}{why}. "
            "Run it first: python run_pipeline.py run --config <file> --to make_sem_seg"
        )
    from pipeline.data import build_dataset

    dataset = build_dataset(cfg.data)
    ids = dataset.ids(cfg.data.infer_split)
    dest = Path(dest)
    labels_dir = dest / "pseudo_seg_labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for image_id in ids:
        source = sem_seg_path(cfg.result_dir, image_id).resolve()
        target = labels_dir / f"{image_id}.png"
        with artifacts.atomic_path(target) as tmp:
            tmp.unlink()
            if copy:
                shutil.copyfile(source, tmp)
            else:
                os.symlink(source, tmp)
        image = os.path.relpath(dataset.image_path(image_id).resolve(), dest.resolve())
        lines.append(f"{image} pseudo_seg_labels/{image_id}.png")
    list_file = dest / "pseudo_seg_labels.txt"
    with artifacts.atomic_path(list_file) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return {"n_images": len(ids), "labels_dir": str(labels_dir), "list_file": str(list_file)}
