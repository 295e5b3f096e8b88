"""Confusion matrix, IoU, metric files and their printed table."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline import artifacts
from pipeline.classes import IGNORE_LABEL

log = logging.getLogger("wsss")


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_labels: int) -> np.ndarray:
    """(num_labels, num_labels) int64 counts, rows = ground truth, cols = prediction.
    Pixels whose ground truth is 255 (ignore) are left out."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    keep = gt != IGNORE_LABEL
    g = gt[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    if g.size and (g.max() >= num_labels or p.max() >= num_labels or p.min() < 0):
        raise ValueError(f"labels outside 0..{num_labels - 1}")
    return np.bincount(g * num_labels + p, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def iou_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU; NaN for classes absent from both prediction and ground truth."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def miou_percent(conf: np.ndarray) -> float:
    iou = iou_from_confusion(conf)
    return float(np.nanmean(iou) * 100) if np.any(~np.isnan(iou)) else 0.0


def metric_record(conf: np.ndarray, class_names, n_images: int, **extra) -> dict:
    iou = iou_from_confusion(conf)
    per_class = {name: round(float(v) * 100, 3) for name, v in zip(class_names, iou) if not np.isnan(v)}
    record = {"miou": round(miou_percent(conf), 3), "per_class_iou": per_class, "n_images": int(n_images)}
    total = conf.sum()
    record["pixel_accuracy"] = round(float(np.trace(conf) / total * 100), 3) if total else 0.0
    record.update(extra)
    return record


def write_metrics(result_dir: Path, stage: str, record: dict) -> Path:
    path = Path(result_dir) / "metrics" / f"{stage}.json"
    artifacts.save_json(path, record)
    log.info("%s\n%s", f"{stage}: mIoU {record['miou']:.2f}% on {record['n_images']} images", format_table(record))
    return path


def format_table(record: dict) -> str:
    rows = [f"  {'class':<16}{'IoU %':>8}"]
    for name, value in record["per_class_iou"].items():
        rows.append(f"  {name:<16}{value:>8.2f}")
    rows.append(f"  {'mIoU':<16}{record['miou']:>8.2f}")
    return "\n".join(rows)


def evaluate_label_files(dataset, ids, path_of, stage: str) -> np.ndarray:
    """Confusion matrix of the label PNGs `path_of(id)` against the ground truth of `ids`."""
    from pipeline.artifacts import load_label_png
    from pipeline.errors import PipelineError
    from pipeline.runtime import progress

    n_labels = len(dataset.class_names)
    conf = np.zeros((n_labels, n_labels), np.int64)
    for image_id in progress(ids, stage):
        path = path_of(image_id)
        if not path.exists():
            raise PipelineError(f"{stage}: prediction missing for {image_id}: {path}")
        pred, gt = load_label_png(path), dataset.load_mask(image_id)
        if pred.shape != gt.shape:
            raise PipelineError(f"{stage}: {path} is {pred.shape}, ground truth is {gt.shape}")
        conf += confusion_matrix(pred, gt, n_labels)
    return conf


def evaluate_and_write(result_dir: Path, dataset, ids, path_of, stage: str, **extra) -> dict:
    """Score the label PNGs of `ids` against the ground truth, write metrics/<stage>.json, print the table."""
    conf = evaluate_label_files(dataset, ids, path_of, stage)
    record = metric_record(conf, dataset.class_names, len(ids), **extra)
    write_metrics(result_dir, stage, record)
    return record
