"""make_ins_seg: instance pseudo labels from the IRN's displacement field (IRNet; off by default, as in CRT).

Per image of `infer_split`, following IRNet's step/make_ins_seg_labels.py:
1. IRN forward on the image and its mirror image: the boundary map is the average of
   both (`stages.make_sem_seg.boundary_map`); the displacement field is the image's own
   (the reference ignores the mirrored displacement, whose dx would need a sign flip).
2. Centroids (300 steps along the field) → instance clusters (`net.instances`).
3. Each stride-4 CAM is split into one map per instance (class-major); the maps are
   propagated by the same sparse random walk as make_sem_seg (`radius`, `beta`, `exp_times`).
4. The walked maps are upsampled ×4, cropped to the image, divided by their global maximum;
   a background plane `ins_seg_bg_thres` and an argmax give one mask per (class, instance)
   map, and each 4-connected piece of it is a detection scored by its maximum walked score
   (0 for pieces under `min_fragment_fraction` of the image: kept, ranked last).
   Maps that are zero everywhere before the walk stay zero and can never win the argmax:
   they are dropped before the walk (same detections, less work).

Artifact `result/<run>/ins_seg/<id>.npz` (pickle-free, `np.load(path)` reads it):
    score  float32 (N,)                 detection scores in [0, 1]
    class  int16   (N,)                 0-based foreground class index (label id − 1)
    mask   uint8   (N, ⌈H·W/8⌉)         each detection's (H, W) bool mask, flattened row-major and
                                        packed 8 pixels a byte (`np.packbits`, big bit order)
    size   int32   (2,)                 (H, W), to unpack the masks
N may be 0. Use `read_instances(path)` to get {"score", "class" (int64), "mask" (N, H, W) bool}.
Packed bits are 1/8 of a bool array before compression, and masks are mostly runs of zeros.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import artifacts
from pipeline.errors import PipelineError
from pipeline.runtime import progress
from stages.make_sem_seg import load_irn, walk_inputs

log = logging.getLogger("wsss")


def ins_seg_path(ctx, image_id: str):
    return ctx.out("ins_seg", f"{image_id}.npz")


def expected_outputs(ctx):
    return [ins_seg_path(ctx, i) for i in ctx.dataset.ids(ctx.data.infer_split)]


# ----------------------------------------------------------------------------- artifact

def save_instances(path, detected: dict) -> None:
    masks = np.asarray(detected["mask"], dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"instance masks must be (N, H, W), got {masks.shape}")
    n, height, width = masks.shape
    artifacts.save_npz(path, {
        "score": np.asarray(detected["score"], np.float32).reshape(n),
        "class": np.asarray(detected["class"], np.int16).reshape(n),
        "mask": np.packbits(masks.reshape(n, height * width), axis=1),
        "size": np.asarray([height, width], np.int32),
    })


def read_instances(path) -> dict[str, np.ndarray]:
    """{"score": float32 (N,), "class": int64 (N,), "mask": bool (N, H, W)} of an ins_seg artifact."""
    data = artifacts.load_npz(path)
    missing = {"score", "class", "mask", "size"} - set(data)
    if missing:
        raise PipelineError(f"instance file {path} lacks {sorted(missing)}: not written by make_ins_seg?")
    height, width = (int(v) for v in data["size"])
    n = len(data["score"])
    if data["mask"].shape != (n, -(-height * width // 8)) or len(data["class"]) != n:
        raise PipelineError(f"instance file {path} is inconsistent: {n} scores, {len(data['class'])} classes, "
                            f"mask {data['mask'].shape} for size {height}x{width}")
    masks = np.unpackbits(data["mask"], axis=1, count=height * width).astype(bool).reshape(n, height, width)
    return {"score": data["score"].astype(np.float32), "class": data["class"].astype(np.int64), "mask": masks}


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


class _KeepDisplacement:
    """Wraps the IRN so that `boundary_map`'s forward also yields the image's displacement field."""

    def __init__(self, model):
        self.model = model
        self.displacement = None

    def __call__(self, batch):
        boundary_logit, displacement = self.model(batch)
        self.displacement = displacement[0].cpu().numpy()   # the image, not its mirror
        return boundary_logit, displacement


def run(ctx) -> dict:
    section, data, runtime = ctx.section, ctx.data, ctx.runtime
    dataset = ctx.dataset
    ids = dataset.ids(data.infer_split)
    todo = ctx.todo(ids, lambda i: ins_seg_path(ctx, i))
    log.info("make_ins_seg: %d images (%d to compute on this rank)", len(ids), len(todo))
    model = _KeepDisplacement(load_irn(ctx)) if todo else None
    detections = 0
    for image_id in progress(todo, "make_ins_seg", enabled=runtime.is_main):
        image, cam, boundary = walk_inputs(ctx, model, image_id)
        detected = instance_detections(cam["cam"], cam["keys"], boundary, model.displacement, image.shape[:2],
                                       radius=section.radius, beta=section.beta, exp_times=section.exp_times,
                                       bg_threshold=section.ins_seg_bg_thres,
                                       min_fragment_fraction=section.min_fragment_fraction)
        save_instances(ins_seg_path(ctx, image_id), detected)
        detections += len(detected["score"])
    return {"outputs": {"images": len(ids), "computed_on_rank0": len(todo), "detections_on_rank0": detections}}
