"""crf: dense-CRF post-processing of the DeepLab predictions, guided by the original RGB image.

Per image: the stride-8 logits of test_deeplab upsampled to the image, softmax, dense CRF
(parameters in config), argmax -> the `crf_label` artifact; mIoU to the stage's
metrics when the split has ground truth. CPU-bound: spread over worker processes.
"""
from __future__ import annotations

import logging

import cv2
import numpy as np

from net.crf import crf_arguments
from pipeline import artifacts
from pipeline.catalogue import read_logits
from pipeline.errors import PipelineError
from pipeline.metrics import score_split
from pipeline.parallel import parallel_map

log = logging.getLogger("wsss")


def kinds(ctx) -> tuple[str, str, str]:
    """(test stage, logits kind, output kind): DeepLab's by default; the single-stage methods run
    this module as `crf_seg_head` on their segmentation head's logits."""
    o = ctx.options
    return o.get("test_stage", "test_deeplab"), o.get("logits", "logits"), o.get("out", "crf_label")


def split_of(ctx) -> str:
    """crf post-processes whatever its test stage predicted: the split is recorded in its manifest."""
    manifests, test_stage = ctx.artifacts.manifest, kinds(ctx)[0]
    if not manifests.exists(test_stage):
        return ctx.split_override or ctx.data.val_split
    return manifests.read(test_stage)["outputs"]["split"]


def expected_outputs(ctx):
    return [ctx.artifacts[kinds(ctx)[2]].path(i) for i in ctx.dataset.ids(split_of(ctx))]


def upsampled_probs(logit: np.ndarray, size_hw) -> np.ndarray:
    """(C, h, w) logits -> (C, H, W) softmax probabilities at image size (bilinear)."""
    h, w = size_hw
    planes = cv2.resize(np.ascontiguousarray(logit.transpose(1, 2, 0)), (w, h), interpolation=cv2.INTER_LINEAR)
    if planes.ndim == 2:
        planes = planes[:, :, None]
    planes = planes.transpose(2, 0, 1)
    planes = planes - planes.max(axis=0, keepdims=True)
    probs = np.exp(planes)
    return (probs / probs.sum(axis=0, keepdims=True)).astype(np.float32)


def _one_image(read_image, image_path: str, logit_file: str, out_path: str, params: dict) -> None:
    from net.crf import dense_crf

    image = read_image(image_path)      # as the data set reads it (e.g. upright by EXIF), like the logits
    logit, size = read_logits(logit_file)
    if size != image.shape[:2]:
        raise PipelineError(f"{logit_file} was made for a {size} image, {image_path} is {image.shape[:2]}")
    posterior = dense_crf(image, upsampled_probs(logit, size), **params)
    artifacts.save_label_png(out_path, posterior.argmax(0).astype(np.uint8))


def run(ctx) -> dict:
    section, runtime, dataset = ctx.section, ctx.runtime, ctx.dataset
    test_stage, logits_kind, out_kind = kinds(ctx)
    logits, crf_labels = ctx.artifacts[logits_kind], ctx.artifacts[out_kind]
    split = split_of(ctx)
    ids = dataset.ids(split)
    missing = logits.missing(ids)
    if missing:
        raise PipelineError(f"{ctx.name}: logits missing for {len(missing)} image(s), e.g. {logits.path(missing[0])}"
                            f" (re-run {test_stage}; for test_deeplab set test_deeplab.save_logits: true)")
    todo = ctx.todo(ids, crf_labels)
    jobs = [(dataset.read_image, str(dataset.image_path(i)), str(logits.path(i)), str(crf_labels.path(i)),
             crf_arguments(section)) for i in todo]
    log.info("%s: %d images of '%s' (%d to compute on this rank)", ctx.name, len(ids), split, len(todo))
    parallel_map(_one_image, jobs, section.num_workers, ctx.name, enabled=runtime.is_main)
    runtime.barrier()
    return score_split(ctx, split, ids, crf_labels, len(todo))
