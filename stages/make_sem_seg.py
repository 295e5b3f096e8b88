"""make_sem_seg: the pseudo labels, by a random walk of the CAMs over the IRN's boundary map.

Boundary B at stride 4 from the image and its flip (logits averaged); the CAMs (stride 4,
× (1 − B)) are propagated by the sparse transition matrix 2^exp_times times; the result is
upsampled ×4, cropped, divided by its global maximum and compared with a background plane
`bg_threshold`. Writes the `sem_seg` artifact (palette PNG of label ids): the pseudo labels.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from net.irn import boundary_and_displacement, check_same_grid
from net.registry import load_model, read_model_file
from pipeline.runtime import progress

log = logging.getLogger("wsss")


def expected_outputs(ctx):
    return [ctx.artifacts.sem_seg.path(i) for i in ctx.dataset.ids(ctx.data.infer_split)]


def walk_to_labels(walked: np.ndarray, keys: np.ndarray, image_hw, bg_threshold: float) -> np.ndarray:
    """(K, h, w) propagated CAMs -> (H, W) label ids: ×4 upsampling, crop, global max, background plane."""
    h, w = image_hw
    label_ids = np.concatenate([[0], np.asarray(keys) + 1]).astype(np.uint8)
    if walked.shape[0] == 0:
        return np.zeros((h, w), np.uint8)
    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(walked))[None].float(), scale_factor=4,
                       mode="bilinear", align_corners=False)[0, :, :h, :w]
    up = up / up.max().clamp_min(1e-5)
    planes = torch.cat([torch.full((1, h, w), bg_threshold), up], dim=0)
    return label_ids[planes.argmax(0).numpy()]


def run(ctx) -> dict:
    from net.affinity import random_walk

    section, data, runtime = ctx.section, ctx.data, ctx.runtime
    dataset, cams, pseudo_labels = ctx.dataset, ctx.artifacts.cam, ctx.artifacts.sem_seg
    ids = dataset.ids(data.infer_split)
    todo = ctx.todo(ids, pseudo_labels)
    log.info("make_sem_seg: %d images (%d to compute on this rank)", len(ids), len(todo))
    model = load_model(ctx.artifacts.weights.path("irn"), ctx.device, expect="irn") if todo else None
    walk = section.walk
    for image_id in progress(todo, "make_sem_seg", enabled=runtime.is_main):
        image, cam = dataset.load_image(image_id), cams.read(image_id)
        boundary, _ = boundary_and_displacement(model, image, data.mean, data.std, ctx.device,
                                                    section.irn_pad_to)
        check_same_grid("make_sem_seg", image_id, cam, boundary)
        walked = random_walk(cam["cam"], boundary, radius=walk.radius, beta=walk.beta,
                             exp_times=walk.exp_times) if len(cam["keys"]) else cam["cam"]
        label = walk_to_labels(np.asarray(walked), cam["keys"], image.shape[:2], section.bg_threshold)
        pseudo_labels.write(image_id, label)
    return {"outputs": {"images": len(ids), "computed_on_rank0": len(todo)}}


def check(ctx) -> None:
    read_model_file(ctx.artifacts.weights.path("irn"), "cpu", expect="irn")
