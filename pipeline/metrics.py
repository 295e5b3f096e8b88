"""Confusion matrix, IoU, metric files and their printed table."""
from __future__ import annotations

import logging

import numpy as np

from dataset.classes import IGNORE_LABEL

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


def write_metrics(metrics, stage: str, record: dict) -> None:
    """Write `record` as the stage's metrics (the catalogue's `metrics` artifact) and log its table."""
    metrics.write(stage, record)
    log.info("%s\n%s", f"{stage}: mIoU {record['miou']:.2f}% on {record['n_images']} images", format_table(record))


def format_table(record: dict) -> str:
    rows = [f"  {'class':<16}{'IoU %':>8}"]
    for name, value in record["per_class_iou"].items():
        rows.append(f"  {name:<16}{value:>8.2f}")
    rows.append(f"  {'mIoU':<16}{record['miou']:>8.2f}")
    return "\n".join(rows)


def evaluate_label_files(dataset, ids, labels, stage: str) -> np.ndarray:
    """Confusion matrix of the label maps of the artifact `labels` against the ground truth of `ids`."""
    from pipeline.errors import PipelineError
    from pipeline.runtime import progress

    n_labels = len(dataset.class_names)
    conf = np.zeros((n_labels, n_labels), np.int64)
    for image_id in progress(ids, f"{stage} (scoring)"):
        if not labels.exists(image_id):
            raise PipelineError(f"{stage}: prediction missing for {image_id}: {labels.path(image_id)}")
        pred, gt = labels.read(image_id), dataset.load_mask(image_id)
        # Pseudo labels may leave pixels unsure (255: the refiner's two-threshold labels); they
        # score as background, the class a segmenter trained on them would fall back to.
        pred = np.where(pred == IGNORE_LABEL, 0, pred)
        if pred.shape != gt.shape:
            raise PipelineError(f"{stage}: {labels.path(image_id)} is {pred.shape}, ground truth "
                                f"{dataset.mask_path(image_id)} is {gt.shape}")
        conf += confusion_matrix(pred, gt, n_labels)
    return conf


def score_split(ctx, split: str, ids, labels, computed: int) -> dict:
    """The summary of a stage that predicted label maps `labels` for the images `ids` of `split`,
    with their mIoU (on the images that have ground truth) when the split has any; after the
    stage's ranks have all written (call it on every rank)."""
    summary = {"outputs": {"images": len(ids), "split": split, "computed_on_rank0": computed}}
    if not ctx.runtime.is_main:
        return summary
    if not ctx.dataset.has_masks(split):
        log.info("%s: split '%s' has no ground-truth masks: predictions written, no metric computed", ctx.name, split)
        return summary
    record = evaluate_and_write(ctx.artifacts, ctx.dataset, ctx.dataset.eval_ids(split), labels, ctx.name, split=split)
    summary["metrics"] = {"miou": record["miou"]}
    return summary


def evaluate_and_write(catalogue, dataset, ids, labels, stage: str, **extra) -> dict:
    """Score the label maps `labels` of `ids` against the ground truth, write the stage's metrics, log the table."""
    conf = evaluate_label_files(dataset, ids, labels, stage)
    record = metric_record(conf, dataset.class_names, len(ids), **extra)
    write_metrics(catalogue.metrics, stage, record)
    return record


# ----------------------------------------------------------------------------- instance mask AP
# As chainercv's eval_instance_segmentation_voc, which the reference (IRNet) calls; see stages/eval_ins_seg.py.

def ground_truth_instances(objects: np.ndarray, semantic: np.ndarray) -> dict[str, np.ndarray]:
    """{"mask": (M, H, W) bool, "class": (M,) int64 0-based, "void": (H, W) bool} from a
    SegmentationObject map and the matching SegmentationClass map (label ids)."""
    if objects.shape != semantic.shape:
        raise ValueError(f"instance map {objects.shape} and class map {semantic.shape} differ in shape")
    indices = np.unique(objects)
    indices = indices[(indices != 0) & (indices != IGNORE_LABEL)]
    masks, classes = [], []
    for index in indices:
        mask = objects == index
        labels = semantic[mask]
        labels = labels[(labels != 0) & (labels != IGNORE_LABEL)]
        if labels.size == 0:
            raise ValueError(f"instance {index} has no class in the class map")
        masks.append(mask)
        classes.append(int(np.bincount(labels).argmax()) - 1)
    return {
        "mask": np.stack(masks) if masks else np.zeros((0, *objects.shape), bool),
        "class": np.asarray(classes, np.int64),
        "void": objects == IGNORE_LABEL,
    }


def mask_iou(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> np.ndarray:
    """(N, M) IoU of the bool masks `pred` (N, H, W) and `gt` (M, H, W); pixels of `void` are left out."""
    n, m = len(pred), len(gt)
    if n == 0 or m == 0:
        return np.zeros((n, m))
    p = pred.reshape(n, -1).astype(np.float64)
    g = gt.reshape(m, -1).astype(np.float64)
    if void is not None:
        keep = ~void.reshape(-1)
        p, g = p[:, keep], g[:, keep]
    intersection = p @ g.T          # exact: counts far below 2^53
    union = p.sum(1)[:, None] + g.sum(1)[None, :] - intersection
    return np.where(union > 0, intersection / np.maximum(union, 1), 0.0)


def match_image(pred: dict, gt: dict, iou_threshold: float, exclude_void: bool = False) -> dict[int, tuple]:
    """Per class present in `pred` or `gt`: (scores (S,), true-positive flags (S,) bool, number of
    ground truths). `pred` has "score", "class", "mask"; `gt` as `ground_truth_instances`."""
    void = gt["void"] if exclude_void else None
    out = {}
    for cls in np.union1d(pred["class"], gt["class"]).astype(np.int64):
        p_index = np.flatnonzero(pred["class"] == cls)
        p_index = p_index[np.argsort(-pred["score"][p_index], kind="stable")]
        g_index = np.flatnonzero(gt["class"] == cls)
        iou = mask_iou(pred["mask"][p_index], gt["mask"][g_index], void)
        taken = np.zeros(len(g_index), bool)
        tp = np.zeros(len(p_index), bool)
        for row in range(len(p_index)):
            if len(g_index) == 0:
                break
            best = int(iou[row].argmax())
            if iou[row, best] >= iou_threshold and not taken[best]:
                taken[best] = tp[row] = True
        out[int(cls)] = (pred["score"][p_index].astype(np.float64), tp, len(g_index))
    return out


def average_precision(scores: np.ndarray, tp: np.ndarray, n_positives: int, use_07_metric: bool = False) -> float:
    """VOC AP of ranked detections (NaN when there is no ground truth)."""
    if n_positives == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    hits = np.asarray(tp, bool)[order]
    true_pos = np.cumsum(hits)
    false_pos = np.cumsum(~hits)
    recall = true_pos / n_positives
    precision = true_pos / np.maximum(true_pos + false_pos, 1)
    if use_07_metric:
        return float(np.mean([precision[recall >= t].max() if np.any(recall >= t) else 0.0
                              for t in np.linspace(0, 1, 11)]))
    rec = np.concatenate([[0.0], recall, [1.0]])
    prec = np.concatenate([[0.0], precision, [0.0]])
    prec = np.maximum.accumulate(prec[::-1])[::-1]
    steps = np.flatnonzero(rec[1:] != rec[:-1])
    return float(np.sum((rec[steps + 1] - rec[steps]) * prec[steps + 1]))


class APAccumulator:
    """Collects the matches of every image, then gives the AP per class."""

    def __init__(self, num_classes: int, iou_threshold: float = 0.5, exclude_void: bool = False):
        self.num_classes = num_classes
        self.iou_threshold = iou_threshold
        self.exclude_void = exclude_void
        self._scores = [[] for _ in range(num_classes)]
        self._tp = [[] for _ in range(num_classes)]
        self._positives = np.zeros(num_classes, np.int64)

    def add(self, pred: dict, gt: dict) -> None:
        for cls, (scores, tp, n_gt) in match_image(pred, gt, self.iou_threshold, self.exclude_void).items():
            if not 0 <= cls < self.num_classes:
                raise ValueError(f"class index {cls} outside 0..{self.num_classes - 1}")
            self._scores[cls].append(scores)
            self._tp[cls].append(tp)
            self._positives[cls] += n_gt

    def per_class_ap(self, use_07_metric: bool = False) -> np.ndarray:
        """(num_classes,) AP in [0, 1]; NaN for classes without ground truth."""
        return np.array([
            average_precision(np.concatenate(self._scores[c]) if self._scores[c] else np.zeros(0),
                              np.concatenate(self._tp[c]) if self._tp[c] else np.zeros(0, bool),
                              int(self._positives[c]), use_07_metric)
            for c in range(self.num_classes)])
