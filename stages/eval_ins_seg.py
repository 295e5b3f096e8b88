"""eval_ins_seg: mask AP of the instance pseudo labels (make_ins_seg) on `eval_split`.

The reference (IRNet step/eval_ins_seg.py) calls chainercv's
`eval_instance_segmentation_voc`; ours computes the same quantities, image by image:
- Ground truth: VOC `SegmentationObject/<id>.png` (instances 1..n, 0 background, 255 void);
  each instance's class is the most frequent non-void label of `SegmentationClass` under it.
- Matching, per image and class, detections in decreasing score: a detection is a true
  positive when its best-IoU ground truth (IoU ≥ `iou_threshold`) is not yet taken, else a
  false positive (a second hit on a taken instance is a duplicate; the next-best one is not
  tried, as in VOC). Every ground truth is matched at most once.
- Void: by default (as chainercv) void pixels belong to no instance but count in a
  detection's area, so in the union; `exclude_void: true` removes them from every IoU.
- AP per class over all images: detections ranked by score (ties in a stable order),
  precision made monotone from the right, then **all-points interpolation** (the area
  under that curve, VOC 2010+ and chainercv's default); `use_07_metric: true` gives the
  VOC 2007 11-point average instead. Classes without ground truth are left out of the
  mean; classes with ground truth but no detection have AP 0.
Writes result/<run>/metrics/eval_ins_seg.json:
    {"map": %, "per_class_ap": {class name: %}, "n_images": N, "iou_threshold": t, ...}
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline import artifacts
from pipeline.classes import IGNORE_LABEL
from pipeline.errors import PipelineError
from pipeline.runtime import progress
from stages.make_ins_seg import ins_seg_path, read_instances

log = logging.getLogger("wsss")


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


def format_table(record: dict) -> str:
    rows = [f"  {'class':<16}{'AP %':>8}"]
    rows += [f"  {name:<16}{value:>8.2f}" for name, value in record["per_class_ap"].items()]
    rows.append(f"  {'mAP':<16}{record['map']:>8.2f}")
    return "\n".join(rows)


def run(ctx) -> dict:
    section, dataset, split = ctx.section, ctx.dataset, ctx.data.eval_split
    if not hasattr(dataset, "load_instance_mask"):
        raise PipelineError(f"eval_ins_seg: data set '{dataset.name}' has no instance ground truth "
                            "(VOC SegmentationObject); disable eval_ins_seg")
    ids = dataset.ids(split)
    missing = [dataset.instance_mask_path(i) for i in ids if not dataset.instance_mask_path(i).exists()]
    if missing:
        raise PipelineError(f"eval_ins_seg: {len(missing)} image(s) of split '{split}' have no instance ground truth, "
                            f"e.g. {missing[0]} (SegmentationObject covers VOC's segmentation splits, not train_aug)")
    if not ctx.runtime.is_main:
        return {}
    accumulator = APAccumulator(dataset.num_classes, section.iou_threshold, section.exclude_void)
    for image_id in progress(ids, "eval_ins_seg"):
        path = Path(ins_seg_path(ctx, image_id))
        if not path.exists():
            raise PipelineError(f"eval_ins_seg: prediction missing for {image_id}: {path} (is it in infer_split?)")
        pred = read_instances(path)
        objects, semantic = dataset.load_instance_mask(image_id), dataset.load_mask(image_id)
        if pred["mask"].shape[1:] != objects.shape or semantic.shape != objects.shape:
            raise PipelineError(f"eval_ins_seg: {image_id}: predictions {pred['mask'].shape[1:]}, instance ground "
                                f"truth {objects.shape}, class ground truth {semantic.shape} differ in size")
        try:
            gt = ground_truth_instances(objects, semantic)
        except ValueError as e:
            raise PipelineError(f"eval_ins_seg: {dataset.instance_mask_path(image_id)}: {e}") from None
        accumulator.add(pred, gt)
    ap = accumulator.per_class_ap(section.use_07_metric)
    names = dataset.class_names[1:]
    record = {
        "map": round(float(np.nanmean(ap)) * 100, 3) if np.any(~np.isnan(ap)) else 0.0,
        "per_class_ap": {name: round(float(v) * 100, 3) for name, v in zip(names, ap) if not np.isnan(v)},
        "n_images": len(ids),
        "iou_threshold": section.iou_threshold,
        "ap_method": "11-point (VOC 2007)" if section.use_07_metric else "all-points interpolation",
        "exclude_void": section.exclude_void,
    }
    artifacts.save_json(ctx.out("metrics", "eval_ins_seg.json"), record)
    log.info("eval_ins_seg: mAP@%.2f %.2f%% on %d images\n%s", section.iou_threshold, record["map"], len(ids),
             format_table(record))
    return {"metrics": {"map": record["map"]}}
