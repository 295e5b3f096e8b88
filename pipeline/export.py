"""Export the pseudo labels for any downstream segmenter.

DEST/pseudo_seg_labels/<id>.png   palette PNGs of label ids at the images' sizes (symlinks to the run's
                                  `sem_seg` artifacts, or copies); 255 = ignore
DEST/pseudo_seg_labels.txt        one `image label` pair per line, paths relative to DEST
DEST/classes.json                 {"0": {"name": "background", "colour": [r, g, b]}, ...} for every label id
                                  and 255, so any segmenter reads the labels without this toolkit
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline import artifacts
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.runner import catalogue_of, method_of, stage_status

LABEL_STAGE = "make_sem_seg"    # the stage whose `sem_seg` artifacts are the pseudo labels


def _check_destination(dest: Path) -> Path:
    """DEST/pseudo_seg_labels must be a folder inside DEST (not a file, not a link leaving it)."""
    labels_dir = dest / "pseudo_seg_labels"
    if labels_dir.is_symlink():
        target = labels_dir.resolve()
        if dest.resolve() not in target.parents:
            raise PipelineError(f"export: {labels_dir} is a symbolic link to {target}, outside {dest}; "
                                "remove it or choose another --dest")
    if labels_dir.exists() and not labels_dir.is_dir():
        raise PipelineError(f"export: {labels_dir} exists and is not a folder; remove it or choose another --dest")
    list_file = dest / "pseudo_seg_labels.txt"
    if list_file.exists() and not list_file.is_file():
        raise PipelineError(f"export: {list_file} exists and is not a file")
    for parent in (dest, *dest.parents):
        if parent.exists():
            if not parent.is_dir() or not os.access(parent, os.W_OK):
                raise PipelineError(f"export: cannot write into {dest}: {parent} is not a writable folder")
            break
    return labels_dir


def _make_destination(labels_dir: Path) -> Path:
    try:
        labels_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(f"export: cannot create {labels_dir}: {e.strerror}") from None
    if not os.access(labels_dir, os.W_OK):
        raise PipelineError(f"export: {labels_dir} is not writable")
    return labels_dir


def class_table(class_names) -> dict:
    """Label id -> name and the palette colour the PNGs show it in (255: ignore)."""
    palette = artifacts.voc_palette()
    table = {str(i): {"name": name, "colour": palette[i].tolist()} for i, name in enumerate(class_names)}
    table["255"] = {"name": "ignore", "colour": palette[255].tolist()}
    return table


def export_pseudo_labels(cfg: Config, runtime, dest: str | Path, copy: bool = False) -> dict:
    if LABEL_STAGE not in method_of(cfg).stage_names:
        raise PipelineError(f"cannot export: method '{cfg.method}' has no stage '{LABEL_STAGE}'")
    dest = Path(dest)
    labels_dir = _check_destination(dest)
    status = stage_status(cfg, LABEL_STAGE, runtime)
    if not status.done:
        why = f": {status.reason}" if status.reason else ""
        raise PipelineError(
            f"cannot export: stage '{LABEL_STAGE}' is {status.state}{why}. "
            f"Run it first: python run_pipeline.py run --config <file> --to {LABEL_STAGE}")
    from dataset.registry import build_dataset

    dataset = build_dataset(cfg.data)
    ids = dataset.ids(cfg.data.infer_split)
    pseudo_labels = catalogue_of(cfg).sem_seg
    _make_destination(labels_dir)
    lines = []
    try:
        for image_id in ids:
            source = pseudo_labels.path(image_id).resolve()
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
        artifacts.save_json(dest / "classes.json", class_table(dataset.class_names))
    except OSError as e:
        raise PipelineError(f"export: cannot write into {dest}: {e.strerror} ({e.filename})") from None
    return {"n_images": len(ids), "labels_dir": str(labels_dir), "list_file": str(list_file),
            "classes": str(dest / "classes.json")}
