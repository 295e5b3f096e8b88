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
import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics import APAccumulator, ground_truth_instances
from pipeline.runtime import progress

log = logging.getLogger("wsss")


def format_table(record: dict) -> str:
    rows = [f"  {'class':<16}{'AP %':>8}"]
    rows += [f"  {name:<16}{value:>8.2f}" for name, value in record["per_class_ap"].items()]
    rows.append(f"  {'mAP':<16}{record['map']:>8.2f}")
    return "\n".join(rows)


def run(ctx) -> dict:
    section, dataset, split = ctx.section, ctx.dataset, ctx.data.eval_split
    instances = ctx.artifacts.ins_seg
    ids = dataset.ids(split)     # the preflight checked that every one has instance ground truth
    if not ctx.runtime.is_main:
        return {}
    accumulator = APAccumulator(dataset.num_classes, section.iou_threshold, section.exclude_void)
    for image_id in progress(ids, "eval_ins_seg"):
        if not instances.exists(image_id):
            raise PipelineError(f"eval_ins_seg: prediction missing for {image_id}: {instances.path(image_id)} "
                                f"(is eval_split inside infer_split?)")
        pred = instances.read(image_id)
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
    ctx.artifacts.metrics.write("eval_ins_seg", record)
    log.info("eval_ins_seg: mAP@%.2f %.2f%% on %d images\n%s", section.iou_threshold, record["map"], len(ids),
             format_table(record))
    return {"metrics": {"map": record["map"]}}
