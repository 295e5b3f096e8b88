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
from net.registry import load_model, read_model_file, single_stage_kinds
from pipeline.runtime import progress
from pipeline.transforms import normalize

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


@torch.no_grad()
def seg_head_labels(model, image: np.ndarray, keys: np.ndarray, inference, mean, std, device) -> np.ndarray:
    """Pseudo labels from a single-stage network's segmentation head (multi-scale + flip),
    restricted to background and the image's own classes."""
    from net.single_stage import segment_image

    small, _ = segment_image(model, image, inference, mean, std, device)
    logits = F.interpolate(small[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
    allowed = torch.full((logits.shape[0],), float("-inf"), device=logits.device)
    allowed[0] = 0
    allowed[torch.as_tensor(np.asarray(keys) + 1, dtype=torch.long, device=logits.device)] = 0
    return (logits + allowed[:, None, None]).argmax(0).cpu().numpy().astype(np.uint8)


@torch.no_grad()
def cam_refine_labels(refiner, image: np.ndarray, cam: dict, num_classes: int, thresholds, down_scale: int,
                      mean, std) -> np.ndarray:
    """Pseudo labels from the saved full-resolution CAMs refined by the local refiner with two
    background planes (the single-stage methods' online labels, on the whole image)."""
    from engine.refine import image_for_refiner_unit, refine_cams_with_refiner

    h, w = image.shape[:2]
    x = torch.from_numpy(normalize(image, mean, std)).permute(2, 0, 1)[None]
    cams = torch.zeros(1, num_classes, h, w)
    present = torch.zeros(1, num_classes)
    keys = torch.as_tensor(cam["keys"], dtype=torch.long)
    cams[0, keys] = torch.from_numpy(cam["high_res"])
    present[0, keys] = 1
    rgb = image_for_refiner_unit(x, mean, std)
    label = refine_cams_with_refiner(refiner, rgb, cams, present, thresholds.high, thresholds.low, [[0, h, 0, w]],
                                     down_scale=down_scale)
    return label[0].numpy().astype(np.uint8)


def run(ctx) -> dict:
    section = ctx.section
    if section.source == "irn_random_walk":
        return run_random_walk(ctx)
    data, runtime = ctx.data, ctx.runtime
    dataset, pseudo_labels = ctx.dataset, ctx.artifacts.sem_seg
    ids = dataset.ids(data.infer_split)
    dataset.load_label_cache([data.infer_split])
    todo = ctx.todo(ids, pseudo_labels)
    log.info("make_sem_seg: %d images (%d to compute on this rank), source %s", len(ids), len(todo), section.source)
    if section.source == "seg_head":
        model = load_model(ctx.artifacts.weights.path("net"), ctx.device, expect=single_stage_kinds()) if todo else None
        for image_id in progress(todo, "make_sem_seg", enabled=runtime.is_main):
            image = dataset.load_image(image_id)
            pseudo_labels.write(image_id, seg_head_labels(model, image, dataset.class_labels(image_id),
                                                          section.seg_head, data.mean, data.std, ctx.device))
    else:
        from engine.refine import LocalRefiner

        r = section.refiner
        refiner = LocalRefiner(r.preset, dilations=r.dilations, iterations=r.iterations)
        for image_id in progress(todo, "make_sem_seg", enabled=runtime.is_main):
            image = dataset.load_image(image_id)
            pseudo_labels.write(image_id, cam_refine_labels(refiner, image, ctx.artifacts.cam.read(image_id),
                                                            dataset.num_classes, section.thresholds, r.down_scale,
                                                            data.mean, data.std))
    return {"outputs": {"images": len(ids), "computed_on_rank0": len(todo), "source": section.source}}


def run_random_walk(ctx) -> dict:
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
    if ctx.section.source == "irn_random_walk":
        read_model_file(ctx.artifacts.weights.path("irn"), "cpu", expect="irn")
    elif ctx.section.source == "seg_head":
        read_model_file(ctx.artifacts.weights.path("net"), "cpu", expect=single_stage_kinds())
