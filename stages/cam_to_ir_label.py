"""cam_to_ir_label: confident labels for training the inter-pixel relation network.

Two CRF-refined maps per image: foreground-confident (background plane `conf_fg_thres`)
and background-confident (plane `conf_bg_thres`). Result: the `ir_label` artifact,
the foreground map's class where it says foreground, 0 where both say background, 255
(unsure) elsewhere. CPU-bound: images are spread over worker processes.
"""
from __future__ import annotations

import logging

import numpy as np

from dataset.classes import IGNORE_LABEL
from net.crf import crf_arguments
from pipeline import artifacts
from pipeline.catalogue import read_cam
from pipeline.parallel import parallel_map

log = logging.getLogger("wsss")


def expected_outputs(ctx):
    return [ctx.artifacts.ir_label.path(i) for i in ctx.dataset.ids(ctx.data.infer_split)]


def combine_confident(fg_conf: np.ndarray, bg_conf: np.ndarray) -> np.ndarray:
    """fg class where the foreground map says foreground; 0 where both say background; else 255."""
    out = np.full(fg_conf.shape, IGNORE_LABEL, np.uint8)
    out[fg_conf > 0] = fg_conf[fg_conf > 0]
    out[(fg_conf == 0) & (bg_conf == 0)] = 0
    return out


def refined_map(image: np.ndarray, cams: np.ndarray, keys: np.ndarray, threshold: float, crf: dict) -> np.ndarray:
    """Label ids of argmax([threshold plane; cams]) after a dense CRF over the image."""
    from net.crf import crf_from_labels

    label_ids = np.concatenate([[0], np.asarray(keys) + 1]).astype(np.uint8)
    planes = np.concatenate([np.full((1,) + cams.shape[1:], threshold, np.float32), cams], axis=0)
    coarse = np.argmax(planes, axis=0)
    refined = crf_from_labels(image, coarse, n_labels=len(label_ids), **crf)
    return label_ids[refined]


def confident_labels(image, cams, keys, fg_thres: float, bg_thres: float, crf: dict) -> np.ndarray:
    fg_conf = refined_map(image, cams, keys, fg_thres, crf)
    bg_conf = refined_map(image, cams, keys, bg_thres, crf)
    return combine_confident(fg_conf, bg_conf)


def _one_image(read_image, image_path: str, cam_file: str, out_path: str, fg_thres: float, bg_thres: float,
               crf: dict) -> int:
    image = read_image(image_path)      # as the data set reads it (e.g. upright by EXIF), like the CAMs
    cam = read_cam(cam_file)
    label = confident_labels(image, cam["high_res"], cam["keys"], fg_thres, bg_thres, crf)
    artifacts.save_label_png(out_path, label)
    return int((label == IGNORE_LABEL).sum())


def run(ctx) -> dict:
    section, dataset, cams, ir_labels = ctx.section, ctx.dataset, ctx.artifacts.cam, ctx.artifacts.ir_label
    ids = dataset.ids(ctx.data.infer_split)
    todo = ctx.todo(ids, ir_labels)
    params = {"gt_prob": section.gt_prob, **crf_arguments(section.crf)}
    jobs = [(dataset.read_image, str(dataset.image_path(i)), str(cams.path(i)), str(ir_labels.path(i)),
             section.conf_fg_thres, section.conf_bg_thres, params) for i in todo]
    log.info("cam_to_ir_label: %d images (%d to compute on this rank)", len(ids), len(todo))
    unsure = parallel_map(_one_image, jobs, section.num_workers, "cam_to_ir_label", enabled=ctx.runtime.is_main)
    return {"outputs": {"images": len(ids), "computed_on_rank0": len(todo),
                        "unsure_pixels_computed": int(sum(unsure))}}
