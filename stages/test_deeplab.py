"""test_deeplab: full-image MSC inference of the trained DeepLab on `split` (default data.val_split).

Per image: the `prediction` artifact (label ids) and, with `save_logits`, the `logits` artifact
(stride-8 logits: 64× fewer bytes than full resolution; the crf stage upsamples them).
mIoU to the stage's metrics when the split has ground truth; otherwise (a test
set for the benchmark server) predictions only, and the log says so.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from net.registry import load_model, read_model_file
from pipeline.metrics import score_split
from pipeline.runtime import progress

log = logging.getLogger("wsss")


def split_of(ctx) -> str:
    return ctx.section.split or ctx.data.val_split


def expected_outputs(ctx):
    ids = ctx.dataset.ids(split_of(ctx))
    paths = [ctx.artifacts.prediction.path(i) for i in ids]
    if ctx.section.save_logits:
        paths += [ctx.artifacts.logits.path(i) for i in ids]
    return paths


@torch.no_grad()
def predict(model, image: np.ndarray, mean, std, device) -> tuple[torch.Tensor, np.ndarray]:
    """Stride-8 logits (C, h, w) of the MSC max and the full-resolution argmax labels; the image
    as the model was trained to read it (its `input_norm`)."""
    from deeplab.train_utils import deeplab_input

    x = deeplab_input(image, getattr(model, "input_norm", "imagenet"), mean, std)[None].to(device)
    logit = model(x)[0].float()
    full = F.interpolate(logit[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
    return logit, full.argmax(0).cpu().numpy().astype(np.uint8)


def run(ctx) -> dict:
    section, data, runtime = ctx.section, ctx.data, ctx.runtime
    dataset, predictions, logits = ctx.dataset, ctx.artifacts.prediction, ctx.artifacts.logits
    split = split_of(ctx)
    ids = dataset.ids(split)
    todo = ctx.todo(ids, predictions)
    if section.save_logits and ctx.resume:
        todo = sorted(set(todo) | set(ctx.todo(ids, logits)))
    log.info("test_deeplab: %d images of '%s' (%d to compute on this rank)", len(ids), split, len(todo))
    model = load_model(ctx.artifacts.weights.path("deeplab"), ctx.device, expect="deeplab") if todo else None
    for image_id in progress(todo, "test_deeplab", enabled=runtime.is_main):
        image = dataset.load_image(image_id)
        logit, label = predict(model, image, data.mean, data.std, ctx.device)
        if section.save_logits:
            logits.write(image_id, logit, image.shape[:2])
        predictions.write(image_id, label)
    runtime.barrier()
    return score_split(ctx, split, ids, predictions, len(todo))


def check(ctx) -> None:
    read_model_file(ctx.artifacts.weights.path("deeplab"), "cpu", expect="deeplab")
