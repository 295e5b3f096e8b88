"""eval_cam: mIoU of the CAMs on `eval_split` at the configured background threshold,
plus a threshold sweep. Writes the stage's `metrics` record."""
from __future__ import annotations

import logging

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics import confusion_matrix, metric_record, miou_percent, write_metrics
from pipeline.runtime import progress

log = logging.getLogger("wsss")


def cam_to_prediction(cams: np.ndarray, keys: np.ndarray, threshold: float) -> np.ndarray:
    """argmax over [background plane at `threshold`; CAMs] mapped to label ids (class index + 1)."""
    label_ids = np.concatenate([[0], np.asarray(keys) + 1]).astype(np.uint8)
    if cams.shape[0] == 0:
        return np.zeros(cams.shape[1:], np.uint8)
    planes = np.concatenate([np.full((1,) + cams.shape[1:], threshold, cams.dtype), cams], axis=0)
    return label_ids[np.argmax(planes, axis=0)]


def sweep_thresholds(spec) -> list[float]:
    start, stop, step = spec
    count = int(np.floor((stop - start) / step + 1e-6)) + 1
    return [round(start + i * step, 4) for i in range(count)]


def source_maps(cam: dict) -> dict[str, np.ndarray]:
    """Full-resolution maps per CAM source in a CAM artifact: the configured one ("cam"), and on
    the eval split every source make_cam kept (CRT: each branch and their fusion, each branch's
    maps normalised to max 1 per class and the fusion their sum renormalised, as make_cam fuses;
    single-stage: the CAM head and the aux CAM head)."""
    maps = {"cam": cam["high_res"]}
    maps.update({key[:-len("_high_res")]: value for key, value in cam.items()
                 if key.endswith("_high_res") and key != "high_res"})
    if "cnn_high_res" in cam and "vit_high_res" in cam:
        maps["cnn"], maps["vit"] = cam["cnn_high_res"], cam["vit_high_res"]
        fused = maps["cnn"] + maps["vit"]
        peak = fused.reshape(len(fused), -1).max(axis=1).reshape(-1, 1, 1) if len(fused) else 1.0
        maps["fuse"] = fused / (peak + 1e-5)
    return maps


def run(ctx) -> dict:
    section, data = ctx.section, ctx.data
    dataset, cams = ctx.dataset, ctx.artifacts.cam
    ids = dataset.eval_ids(data.eval_split)     # the images with masks (the preflight checked there are some)
    thresholds = sorted(set(sweep_thresholds(section.sweep)) | {round(section.threshold, 4)})
    n_labels = len(dataset.class_names)
    confusions: dict[str, dict[float, np.ndarray]] = {}
    if not ctx.runtime.is_main:
        return {}
    for image_id in progress(ids, "eval_cam"):
        if not cams.exists(image_id):
            raise PipelineError(f"eval_cam: no CAM for {image_id} ({cams.path(image_id)}); is eval_split "
                                f"'{data.eval_split}' inside infer_split '{data.infer_split}'?")
        cam = cams.read(image_id)
        gt = dataset.load_mask(image_id, size_hw=cam["high_res"].shape[1:])
        for source, maps in source_maps(cam).items():
            per_threshold = confusions.setdefault(
                source, {t: np.zeros((n_labels, n_labels), np.int64) for t in thresholds})
            for t in thresholds:
                per_threshold[t] += confusion_matrix(cam_to_prediction(maps, cam["keys"], t), gt, n_labels)

    def summary(per_threshold) -> tuple[dict, float]:
        best = max(thresholds, key=lambda t: miou_percent(per_threshold[t]))
        record = metric_record(per_threshold[round(section.threshold, 4)], dataset.class_names, len(ids),
                               threshold=section.threshold, best_threshold=best,
                               best_miou=round(miou_percent(per_threshold[best]), 3),
                               sweep={str(t): round(miou_percent(per_threshold[t]), 3) for t in thresholds})
        return record, best

    record, best = summary(confusions.pop("cam"))
    record["sources"] = {}
    for source in sorted(confusions):
        if source in confusions:
            sub, _ = summary(confusions[source])
            record["sources"][source] = {k: sub[k] for k in ("miou", "best_threshold", "best_miou", "per_class_iou")}
    write_metrics(ctx.artifacts.metrics, "eval_cam", record)
    log.info("eval_cam: mIoU %.2f%% at threshold %.2f; best %.2f%% at %.2f", record["miou"], section.threshold,
             record["best_miou"], best)
    for source, sub in record["sources"].items():
        log.info("eval_cam: %-4s branch: mIoU %.2f%% at %.2f; best %.2f%% at %.2f", source, sub["miou"],
                 section.threshold, sub["best_miou"], sub["best_threshold"])
    return {"metrics": {"miou": record["miou"], "best_threshold": best, "best_miou": record["best_miou"],
                        **{f"{k}_miou": v["miou"] for k, v in record["sources"].items()}}}
