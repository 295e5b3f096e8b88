"""crf: dense-CRF post-processing of the DeepLab predictions, guided by the original RGB image.

Per image: the stride-8 logits of test_deeplab upsampled to the image, softmax, dense CRF
(parameters in config), argmax -> result/<run>/deeplab/crf/<id>.png; mIoU to
metrics/crf.json when the split has ground truth. CPU-bound: spread over worker processes.
"""
from __future__ import annotations

import logging

import cv2
import numpy as np

from pipeline import artifacts
from pipeline.errors import PipelineError
from pipeline.metrics import evaluate_and_write
from pipeline.parallel import parallel_map
from stages.test_deeplab import logit_path, read_logits

log = logging.getLogger("wsss")


def split_of(ctx) -> str:
    # crf post-processes whatever test_deeplab predicted; its split is recorded in its manifest
    from pipeline.artifacts import load_json

    manifest = load_json(ctx.result_dir / "manifests" / "test_deeplab.json")
    return manifest["outputs"]["split"]


def crf_path(result_dir, image_id: str):
    return result_dir / "deeplab" / "crf" / f"{image_id}.png"


def expected_outputs(ctx):
    return [crf_path(ctx.result_dir, i) for i in ctx.dataset.ids(split_of(ctx))]


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
    from pipeline.crf import dense_crf

    image = artifacts.load_rgb(image_path)
    logit, size = read_logits(logit_file)
    if size != image.shape[:2]:
        raise PipelineError(f"{logit_file} was made for a {size} image, {image_path} is {image.shape[:2]}")
    posterior = dense_crf(image, upsampled_probs(logit, size), **params)
    artifacts.save_label_png(out_path, posterior.argmax(0).astype(np.uint8))


def run(ctx) -> dict:
    section, runtime, dataset = ctx.section, ctx.runtime, ctx.dataset
    split = split_of(ctx)
    ids = dataset.ids(split)
    missing = [i for i in ids if not logit_path(ctx.result_dir, i).exists()]
    if missing:
        raise PipelineError(f"crf: logits missing for {len(missing)} image(s), e.g. {logit_path(ctx.result_dir, missing[0])}"
                            " (set test_deeplab.save_logits: true and re-run test_deeplab)")
    params = {"n_iters": section.iters, "gauss_sxy": section.gauss_sxy, "gauss_compat": section.gauss_compat,
              "bilat_sxy": section.bilat_sxy, "bilat_srgb": section.bilat_srgb, "bilat_compat": section.bilat_compat}
    todo = ctx.todo(ids, lambda i: crf_path(ctx.result_dir, i))
    jobs = [(str(dataset.image_path(i)), str(logit_path(ctx.result_dir, i)), str(crf_path(ctx.result_dir, i)), params)
            for i in todo]
    log.info("crf: %d images of '%s' (%d to compute on this rank)", len(ids), split, len(todo))
    parallel_map(_one_image, jobs, section.num_workers, "crf", enabled=runtime.is_main)
    runtime.barrier()
    summary = {"outputs": {"images": len(ids), "split": split, "computed_on_rank0": len(todo)}}
    if not runtime.is_main or not dataset.has_masks(split):
        if runtime.is_main:
            log.info("crf: split '%s' has no ground-truth masks: labels written, no metric computed", split)
            (ctx.result_dir / "metrics" / "crf.json").unlink(missing_ok=True)  # an older split's figure
        return summary
    record = evaluate_and_write(ctx.result_dir, dataset, ids, lambda i: crf_path(ctx.result_dir, i), "crf", split=split)
    summary["metrics"] = {"miou": record["miou"]}
    return summary
