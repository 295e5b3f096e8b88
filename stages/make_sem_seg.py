"""make_sem_seg: the pseudo labels, by a random walk of the CAMs over the IRN's boundary map.

Boundary B at stride 4 from the image and its flip (logits averaged); the CAMs (stride 4,
× (1 − B)) are propagated by the sparse transition matrix 2^exp_times times; the result is
upsampled ×4, cropped, divided by its global maximum and compared with a background plane
`sem_seg_bg_thres`. Writes result/<run>/sem_seg/<id>.png (palette PNG of label ids).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import artifacts
from pipeline.errors import PipelineError
from pipeline.runtime import progress
from pipeline.training import load_model_file
from pipeline.transforms import normalize, to_tensor
from stages.make_cam import cam_path, read_cam

log = logging.getLogger("wsss")


def sem_seg_path(ctx, image_id: str):
    return ctx.out("sem_seg", f"{image_id}.png")


def expected_outputs(ctx):
    return [sem_seg_path(ctx, i) for i in ctx.dataset.ids(ctx.data.infer_split)]


def load_irn(ctx):
    from stages.train_irn import build_irn

    state = load_model_file(ctx.sess("irn.pth"), ctx.device)
    model = build_irn({**state["model_args"], "pretrained": False})
    model.load_state_dict(state["state_dict"])
    return model.to(ctx.device).eval()


@torch.no_grad()
def boundary_map(model, image: np.ndarray, mean, std, device) -> np.ndarray:
    """(⌈H/4⌉, ⌈W/4⌉) boundary probability from the image and its mirror image."""
    x = normalize(image, mean, std)
    batch = torch.stack([to_tensor(x), to_tensor(np.ascontiguousarray(x[:, ::-1]))]).to(device)
    logits, _ = model(batch)
    return torch.sigmoid(logits[0, 0] / 2 + logits[1, 0].flip(-1) / 2).cpu().numpy()


def walk_inputs(ctx, model, image_id: str) -> tuple[np.ndarray, dict, np.ndarray]:
    """The image, its CAM artifact and its boundary map, checked to share the stride-4 grid."""
    image = ctx.dataset.load_image(image_id)
    cam = read_cam(cam_path(ctx, image_id))
    boundary = boundary_map(model, image, ctx.data.mean, ctx.data.std, ctx.device)
    if cam["cam"].shape[1:] != boundary.shape:
        raise PipelineError(f"{ctx.name}: CAM of {image_id} is {cam['cam'].shape[1:]} at stride 4, the boundary "
                            f"map is {boundary.shape}: CAMs from another image size?")
    return image, cam, boundary


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
    dataset = ctx.dataset
    ids = dataset.ids(data.infer_split)
    todo = ctx.todo(ids, lambda i: sem_seg_path(ctx, i))
    log.info("make_sem_seg: %d images (%d to compute on this rank)", len(ids), len(todo))
    model = load_irn(ctx) if todo else None
    for image_id in progress(todo, "make_sem_seg", enabled=runtime.is_main):
        image, cam, boundary = walk_inputs(ctx, model, image_id)
        walked = random_walk(cam["cam"], boundary, radius=section.radius, beta=section.beta,
                             exp_times=section.exp_times) if len(cam["keys"]) else cam["cam"]
        label = walk_to_labels(np.asarray(walked), cam["keys"], image.shape[:2], section.sem_seg_bg_thres)
        artifacts.save_label_png(sem_seg_path(ctx, image_id), label)
    return {"outputs": {"images": len(ids), "computed_on_rank0": len(todo)}}
