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

from net.registry import load_model, read_model_file, single_stage_kinds
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


BRANCH_KINDS = {"cnn": "resnet_cam", "vit": "vit_cam"}
SOURCES = {"vit": ("vit",), "cnn": ("cnn",), "fuse": ("cnn", "vit")}
SINGLE_STAGE_SOURCES = ("net", "net_aux")


def load_cam_models(ctx, branches) -> dict:
    return {branch: load_model(ctx.artifacts.weights.path(f"cam_{branch}"), ctx.device, expect=BRANCH_KINDS[branch])
            for branch in branches}


def branch_cam_fn(branch: str, model):
    """The branch's non-negative class maps of a batch: the CNN's ReLU'd CAM, the ViT's
    semantic-aware CAM (CRT's)."""
    return (lambda batch: F.relu(model.cam(batch))) if branch == "cnn" else model.semantic_cam


@torch.no_grad()
def multiscale_cam(model_fn, image: np.ndarray, scales, mean, std, device, interpolation: str = "bicubic",
                   full_res_rounding: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over scales of (map(image) + flip(map(flipped image))), each scale's map resized to
    the stride-4 grid (⌈H/4⌉, ⌈W/4⌉) and, for full resolution, to the image size rounded up to
    `full_res_rounding` then cropped to (H, W), as the reference. `model_fn(batch) -> (B, C, h, w)`."""
    h, w = image.shape[:2]
    s4 = strided_size((h, w), 4)
    up = strided_size((h, w), full_res_rounding)
    up = (up[0] * full_res_rounding, up[1] * full_res_rounding)
    strided_sum, full_sum = None, None
    for scale in scales:
        scaled = normalize(resize(image, scaled_size((h, w), scale), interpolation=interpolation), mean, std)
        batch = torch.stack([to_tensor(scaled), to_tensor(np.ascontiguousarray(scaled[:, ::-1]))]).to(device)
        maps = model_fn(batch).float()
        fused = (maps[0] + maps[1].flip(-1)).unsqueeze(0)
        strided = F.interpolate(fused, size=s4, mode="bilinear", align_corners=False)[0]
        full = F.interpolate(fused, size=up, mode="bilinear", align_corners=False)[0, :, :h, :w]
        strided_sum = strided if strided_sum is None else strided_sum + strided
        full_sum = full if full_sum is None else full_sum + full
    return strided_sum, full_sum


@torch.no_grad()
def single_stage_cams(model, image: np.ndarray, keys: np.ndarray, scales, mean, std, device) -> dict:
    """A single-stage network's multi-scale + flip CAMs (the engine's fusion: max over flip, sum
    over scales, per-class min-max) of the image's classes: {"net": (strided, full), "aux": ...}."""
    from engine.multiscale import multiscale_cams

    h, w = image.shape[:2]
    x = to_tensor(normalize(image, mean, std))[None].to(device)
    cams, aux = multiscale_cams(model.cam_pair, x, scales, flip=True)
    index = torch.as_tensor(keys, dtype=torch.long, device=cams.device)
    out = {}
    for name, maps in (("net", cams), ("aux", aux)):
        full = maps[0, index].float()
        if len(keys) == 0:        # a background-only image (folder layout): no planes, as CRT writes it
            strided = full.new_zeros((0, *strided_size((h, w), 4)))
        else:
            strided = F.interpolate(full[None], size=strided_size((h, w), 4), mode="bilinear",
                                    align_corners=False)[0]
        out[name] = (strided.clamp(0, 1), full.clamp(0, 1))
    return out


def run_single_stage(ctx, ids, todo, eval_ids) -> None:
    section, data = ctx.section, ctx.data
    dataset, cams = ctx.dataset, ctx.artifacts.cam
    model = load_model(ctx.artifacts.weights.path("net"), ctx.device, expect=single_stage_kinds()) if todo else None
    chosen = "net" if section.cam_source == "net" else "aux"
    for image_id in progress(todo, "make_cam", enabled=ctx.runtime.is_main):
        image, keys = dataset.load_image(image_id), dataset.class_labels(image_id)
        maps = single_stage_cams(model, image, keys, section.scales, data.mean, data.std, ctx.device)
        extra = {name: pair[1] for name, pair in maps.items()} if image_id in eval_ids else None
        cams.write(image_id, keys, maps[chosen][0], maps[chosen][1], extra=extra)


def run(ctx) -> dict:
    section, data, runtime = ctx.section, ctx.data, ctx.runtime
    dataset, cams = ctx.dataset, ctx.artifacts.cam
    ids = dataset.ids(data.infer_split)
    dataset.load_label_cache([data.infer_split])
    todo = ctx.todo(ids, cams)
    # On the eval split, every branch's maps are kept as well, so that eval_cam can score the CNN
    # branch, the transformer branch and their fusion side by side.
    eval_ids = set(dataset.ids(data.eval_split)) if data.eval_split else set()
    log.info("make_cam: %d images (%d to compute on this rank), source %s, scales %s",
             len(ids), len(todo), section.cam_source, section.scales)
    if section.cam_source in SINGLE_STAGE_SOURCES:
        run_single_stage(ctx, ids, todo, eval_ids)
        return _summary(cams, ids, todo)
    models = load_cam_models(ctx, ("cnn", "vit")) if todo else {}
    for image_id in progress(todo, "make_cam", enabled=runtime.is_main):
        image = dataset.load_image(image_id)
        keys = dataset.class_labels(image_id)
        branches = ("cnn", "vit") if image_id in eval_ids else SOURCES[section.cam_source]
        per_branch = {}
        for branch in branches:
            strided, full = multiscale_cam(branch_cam_fn(branch, models[branch]), image, section.scales, data.mean,
                                           data.std, ctx.device, section.interpolation, section.full_res_rounding)
            # each branch normalised on its own before fusing, so neither dominates by scale
            per_branch[branch] = (normalize_cams(strided, keys), normalize_cams(full, keys))
        if section.cam_source == "fuse":
            every = np.arange(len(keys))
            strided = normalize_cams(per_branch["cnn"][0] + per_branch["vit"][0], every)
            full = normalize_cams(per_branch["cnn"][1] + per_branch["vit"][1], every)
        else:
            strided, full = per_branch[section.cam_source]
        extra = {branch: maps[1] for branch, maps in per_branch.items()} if image_id in eval_ids else None
        cams.write(image_id, keys, strided, full, extra=extra)
    return _summary(cams, ids, todo)


def _summary(cams, ids, todo) -> dict:
    sizes = [cams.path(i).stat().st_size for i in ids[:50] if cams.exists(i)]
    return {"outputs": {"images": len(ids), "computed_on_rank0": len(todo),
                        "mean_bytes_per_image": int(np.mean(sizes)) if sizes else 0}}


def check(ctx) -> None:
    if ctx.section.cam_source in SINGLE_STAGE_SOURCES:
        read_model_file(ctx.artifacts.weights.path("net"), "cpu", expect=single_stage_kinds())
        return
    for branch, kind in BRANCH_KINDS.items():
        read_model_file(ctx.artifacts.weights.path(f"cam_{branch}"), "cpu", expect=kind)
