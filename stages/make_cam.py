"""make_cam: multi-scale + flip CAM inference for every image of `infer_split`.

Writes the `cam` artifact (pipeline/catalogue.py): per image the class indices, the stride-4
CAMs (float16, random walk input) and the full-resolution CAMs (uint8 × 255: far finer than
any threshold the pipeline uses, half the bytes of float16, and they compress better).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from net.registry import load_model, read_model_file
from pipeline.runtime import progress
from pipeline.transforms import normalize, resize, scaled_size, to_tensor

log = logging.getLogger("wsss")


def expected_outputs(ctx):
    return [ctx.artifacts.cam.path(i) for i in ctx.dataset.ids(ctx.data.infer_split)]


def strided_size(shape_hw, stride: int) -> tuple[int, int]:
    return -(-shape_hw[0] // stride), -(-shape_hw[1] // stride)


def normalize_cams(cams: torch.Tensor, keys: np.ndarray) -> torch.Tensor:
    """Keep the image's classes only, ReLU, divide each map by its own maximum (+1e-5)."""
    selected = F.relu(cams[torch.as_tensor(keys, dtype=torch.long)])
    peak = selected.flatten(1).max(dim=1).values.view(-1, 1, 1)
    return selected / (peak + 1e-5)


def load_cam_models(ctx, source: str) -> list:
    wanted = {"vit": ["vit"], "cnn": ["cnn"], "fuse": ["cnn", "vit"]}[source]
    kinds = {"cnn": "resnet_cam", "vit": "vit_cam"}
    return [(branch, load_model(ctx.artifacts.weights.path(f"cam_{branch}"), ctx.device, expect=kinds[branch]))
            for branch in wanted]


@torch.no_grad()
def multiscale_cam(model_fn, image: np.ndarray, scales, mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over scales of (map(image) + flip(map(flipped image))), resized to the stride-4
    grid and to full resolution. `model_fn(batch) -> (B, C, h, w)` non-negative maps."""
    h, w = image.shape[:2]
    s4 = strided_size((h, w), 4)
    strided_sum, full_sum = None, None
    for scale in scales:
        scaled = normalize(resize(image, scaled_size((h, w), scale)), mean, std)
        batch = torch.stack([to_tensor(scaled), to_tensor(np.ascontiguousarray(scaled[:, ::-1]))]).to(device)
        maps = model_fn(batch).float()
        fused = (maps[0] + maps[1].flip(-1)).unsqueeze(0)
        strided = F.interpolate(fused, size=s4, mode="bilinear", align_corners=False)[0]
        # full resolution via the 4× grid, cropped (the reference's way; keeps both grids aligned)
        full = F.interpolate(fused, size=(s4[0] * 4, s4[1] * 4), mode="bilinear", align_corners=False)[0, :, :h, :w]
        strided_sum = strided if strided_sum is None else strided_sum + strided
        full_sum = full if full_sum is None else full_sum + full
    return strided_sum, full_sum


def run(ctx) -> dict:
    section, data, runtime = ctx.section, ctx.data, ctx.runtime
    dataset, cams = ctx.dataset, ctx.artifacts.cam
    ids = dataset.ids(data.infer_split)
    dataset.load_label_cache([data.infer_split])
    todo = ctx.todo(ids, cams)
    log.info("make_cam: %d images (%d to compute on this rank), source %s, scales %s",
             len(ids), len(todo), section.cam_source, section.scales)
    models = load_cam_models(ctx, section.cam_source) if todo else []
    for image_id in progress(todo, "make_cam", enabled=runtime.is_main):
        image = dataset.load_image(image_id)
        keys = dataset.class_labels(image_id)
        strided_total, full_total = None, None
        for branch, model in models:
            fn = (lambda b, m=model: F.relu(m.cam(b))) if branch == "cnn" else model.semantic_cam
            strided, full = multiscale_cam(fn, image, section.scales, data.mean, data.std, ctx.device)
            # each branch normalised on its own before fusing, so neither dominates by scale
            strided, full = normalize_cams(strided, keys), normalize_cams(full, keys)
            strided_total = strided if strided_total is None else strided_total + strided
            full_total = full if full_total is None else full_total + full
        if len(models) > 1:
            strided_total, full_total = normalize_cams(strided_total, np.arange(len(keys))), \
                normalize_cams(full_total, np.arange(len(keys)))
        cams.write(image_id, keys, strided_total, full_total)
    sizes = [cams.path(i).stat().st_size for i in ids[:50] if cams.exists(i)]
    return {"outputs": {"images": len(ids), "computed_on_rank0": len(todo),
                        "mean_bytes_per_image": int(np.mean(sizes)) if sizes else 0}}


def check(ctx) -> None:
    kinds = {"cnn": "resnet_cam", "vit": "vit_cam"}
    for branch in {"vit": ["vit"], "cnn": ["cnn"], "fuse": ["cnn", "vit"]}[ctx.section.cam_source]:
        read_model_file(ctx.artifacts.weights.path(f"cam_{branch}"), "cpu", expect=kinds[branch])
