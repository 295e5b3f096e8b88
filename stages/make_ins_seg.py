"""make_ins_seg: instance pseudo labels from the IRN's displacement field (IRNet; off by default, as in CRT).

Per image of `infer_split`, following IRNet's step/make_ins_seg_labels.py:
1. IRN forward on the image and its mirror image: the boundary map is the average of
   both (`net.irn.boundary_and_displacement`); the displacement field is the image's own
   (the reference ignores the mirrored displacement, whose dx would need a sign flip).
2. Centroids (300 steps along the field) → instance clusters (`net.instances`).
3. Each stride-4 CAM is split into one map per instance (class-major); the maps are
   propagated by the same sparse random walk as make_sem_seg (`radius`, `beta`, `exp_times`).
4. The walked maps are upsampled ×4, cropped to the image, divided by their global maximum;
   a background plane `bg_threshold` and an argmax give one mask per (class, instance)
   map, and each 4-connected piece of it is a detection scored by its maximum walked score
   (0 for pieces under `min_fragment_fraction` of the image: kept, ranked last).
   Maps that are zero everywhere before the walk stay zero and can never win the argmax:
   they are dropped before the walk (same detections, less work).

Writes the `ins_seg` artifact (format in pipeline/catalogue.py).
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
    return [ctx.artifacts.ins_seg.path(i) for i in ctx.dataset.ids(ctx.data.infer_split)]


# ----------------------------------------------------------------------------- core

def instance_detections(cams: np.ndarray, keys: np.ndarray, boundary: np.ndarray, displacement: np.ndarray,
                        image_hw, radius: int = 5, beta: float = 10.0, exp_times: int = 8,
                        bg_threshold: float = 0.25, min_fragment_fraction: float = 0.01) -> dict[str, np.ndarray]:
    """Detections of one image from its stride-4 CAMs (K, h, w) of classes `keys` (K,), boundary
    probability (h, w) and displacement (2, h, w) (dy, dx). Returns {"score" (N,), "mask" (N, H, W)
    bool, "class" (N,) int64} with (H, W) = `image_hw`."""
    from net.affinity import random_walk
    from net.instances import cluster_centroids, detect_instances, find_centroids, instance_maps

    height, width = image_hw
    cams = np.asarray(cams, np.float32)
    keys = np.asarray(keys, np.int64)
    if len(keys) == 0:
        return detect_instances(np.zeros((0, height, width), np.float32), keys, bg_threshold)
    instance_ids = cluster_centroids(find_centroids(displacement), displacement)
    maps = instance_maps(cams, instance_ids)
    class_ids = np.repeat(keys, int(instance_ids.max()) + 1)      # class-major, as instance_maps
    if bg_threshold >= 0:
        alive = maps.reshape(len(maps), -1).max(axis=1) > 0
        maps, class_ids = maps[alive], class_ids[alive]
    if len(maps) == 0:
        return detect_instances(np.zeros((0, height, width), np.float32), class_ids, bg_threshold)
    walked = random_walk(maps, boundary, radius=radius, beta=beta, exp_times=exp_times)
    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(walked))[None].float(), scale_factor=4,
                       mode="bilinear", align_corners=False)[0, :, :height, :width]
    up = (up / up.max().clamp_min(1e-5)).numpy()
    return detect_instances(up, class_ids, bg_threshold, min_fragment_size=height * width * min_fragment_fraction)


def run(ctx) -> dict:
    section, data, runtime = ctx.section, ctx.data, ctx.runtime
    dataset, cams, instances = ctx.dataset, ctx.artifacts.cam, ctx.artifacts.ins_seg
    ids = dataset.ids(data.infer_split)
    todo = ctx.todo(ids, instances)
    log.info("make_ins_seg: %d images (%d to compute on this rank)", len(ids), len(todo))
    model = load_model(ctx.artifacts.weights.path("irn"), ctx.device, expect="irn") if todo else None
    detections, walk = 0, section.walk
    for image_id in progress(todo, "make_ins_seg", enabled=runtime.is_main):
        image, cam = dataset.load_image(image_id), cams.read(image_id)
        boundary, displacement = boundary_and_displacement(model, image, data.mean, data.std, ctx.device,
                                                    section.irn_pad_to)
        check_same_grid("make_ins_seg", image_id, cam, boundary)
        detected = instance_detections(cam["cam"], cam["keys"], boundary, displacement, image.shape[:2],
                                       radius=walk.radius, beta=walk.beta, exp_times=walk.exp_times,
                                       bg_threshold=section.bg_threshold,
                                       min_fragment_fraction=section.min_fragment_fraction)
        instances.write(image_id, detected)
        detections += len(detected["score"])
    return {"outputs": {"images": len(ids), "computed_on_rank0": len(todo), "detections_on_rank0": detections}}


def check(ctx) -> None:
    read_model_file(ctx.artifacts.weights.path("irn"), "cpu", expect="irn")
