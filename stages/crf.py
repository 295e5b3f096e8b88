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
from pipeline.metrics import evaluate_and_write
from pipeline.parallel import parallel_map

log = logging.getLogger("wsss")


def split_of(ctx) -> str:
    """crf post-processes whatever test_deeplab predicted: its split is recorded in its manifest."""
    manifests = ctx.artifacts.manifest
    if not manifests.exists("test_deeplab"):
        return ctx.split_override or ctx.data.val_split
    return manifests.read("test_deeplab")["outputs"]["split"]


def expected_outputs(ctx):
    return [ctx.artifacts.crf_label.path(i) for i in ctx.dataset.ids(split_of(ctx))]


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


def _one_image(image_path: str, logit_file: str, out_path: str, params: dict) -> None:
    from net.crf import dense_crf

    image = artifacts.load_rgb(image_path)
    logit, size = read_logits(logit_file)
    if size != image.shape[:2]:
        raise PipelineError(f"{logit_file} was made for a {size} image, {image_path} is {image.shape[:2]}")
    posterior = dense_crf(image, upsampled_probs(logit, size), **params)
    artifacts.save_label_png(out_path, posterior.argmax(0).astype(np.uint8))


def run(ctx) -> dict:
    section, runtime, dataset = ctx.section, ctx.runtime, ctx.dataset
    logits, crf_labels = ctx.artifacts.logits, ctx.artifacts.crf_label
    split = split_of(ctx)
    ids = dataset.ids(split)
    missing = logits.missing(ids)
    if missing:
        raise PipelineError(f"crf: logits missing for {len(missing)} image(s), e.g. {logits.path(missing[0])}"
                            " (set test_deeplab.save_logits: true and re-run test_deeplab)")
    todo = ctx.todo(ids, crf_labels)
    jobs = [(str(dataset.image_path(i)), str(logits.path(i)), str(crf_labels.path(i)), crf_arguments(section))
            for i in todo]
    log.info("crf: %d images of '%s' (%d to compute on this rank)", len(ids), split, len(todo))
    parallel_map(_one_image, jobs, section.num_workers, "crf", enabled=runtime.is_main)
    runtime.barrier()
    summary = {"outputs": {"images": len(ids), "split": split, "computed_on_rank0": len(todo)}}
    if not runtime.is_main:
        return summary
    if not dataset.has_masks(split):
        log.info("crf: split '%s' has no ground-truth masks: labels written, no metric computed", split)
        return summary
    record = evaluate_and_write(ctx.artifacts, dataset, ids, crf_labels, "crf", split=split)
    summary["metrics"] = {"miou": record["miou"]}
    return summary
