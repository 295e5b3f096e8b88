"""Affinity from attention (AFA, CVPR 2022; kept by TSCD, AAAI 2023): the `aff` loss term and
AFA's propagation of the segmentation target by the learned affinity (afa.md §3-§5,
tscd.md §3; the network is net/single_stage_mit.py).

**Affinity targets** (`affinity_targets`): the refined pseudo label is downsampled by nearest
neighbour to the stride-16 grid of the affinity; a pair of cells (i, j) is 1 when their labels
are equal (background-background included), 0 when they differ, and ignored (255) when either
is ignored or they are more than `radius` cells apart in rows or in columns (a square window;
the pair of a cell with itself is kept, as in the reference).

**Loss** (`affinity_loss`, on the sigmoid output P, an L1-type loss, not a BCE):
    0.5 · Σ_pos (1 − P) / (#pos + 1) + 0.5 · Σ_neg P / (#neg + 1),
sums and counts pooled over the batch.

**Propagation** (`propagated_labels`, AFA only; `train_net.aff.propagate_start` > 0): the valid
CAMs (absent classes zeroed) are resized bilinearly to the grid of the affinity of the largest
CAM scale (48 x 48 for a 512 crop at 1.5); a background plane (once `high`, once `low`) is
prepended, and per image the background and present classes are softmaxed; P (no gradient) is
zeroed beyond `radius`, raised to `power`, divided by its sum over the source axis + `eps`, and
applied once: out[c, j] = Σ_i cam[c, i] P̂[i, j]. Each propagated stack is upsampled to the crop,
refined inside the image box (image at half resolution, present channels only), argmaxed, and
the two are combined as the pseudo labels are (foreground where the high plane says so, ignore
where only it says background, background where both do; ignore outside the box).

Departure: the reference takes P from the 1.5-scale pass of its multi-scale CAM; the engine's
CAM pass returns CAMs only, so the hook runs one more no-grad forward of the (unflipped) batch at
that scale (about a third more no-grad compute after `propagate_start`).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.pseudo import IGNORE_INDEX, Box, combine_high_low, ignore_outside_box, valid_cams
from engine.terms import Step, register_label_hook, register_term
from pipeline.errors import PipelineError


@functools.lru_cache(maxsize=16)
def _window_cpu(height: int, width: int, radius: int) -> Tensor:
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return ((rows[:, None] - rows[None]).abs() <= radius) & ((cols[:, None] - cols[None]).abs() <= radius)


def radius_window(height: int, width: int, radius: int, device=None) -> Tensor:
    """(N, N) bool over the cells of a height x width grid (row-major): True where the two cells
    are at most `radius` apart in rows and in columns (the reference's `get_mask_by_radius`,
    vectorised and cached per grid)."""
    return _window_cpu(int(height), int(width), int(radius)).to(device)


def affinity_targets(labels: Tensor, grid: tuple[int, int], radius: int,
                     ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pair labels (B, N, N) long in {0, 1, ignore_index} from class-id labels (B, H, W) (255 =
    ignore), on the `grid` (h, w) of the affinity, N = h * w."""
    small = F.interpolate(labels[:, None].float(), size=tuple(grid), mode="nearest")[:, 0].long()
    flat = small.flatten(1)
    pairs = (flat[:, :, None] == flat[:, None, :]).long()
    ignored = flat == ignore_index
    outside = ~radius_window(grid[0], grid[1], radius, labels.device)
    drop = ignored[:, :, None] | ignored[:, None, :] | outside[None]
    return pairs.masked_fill(drop, ignore_index)


def affinity_loss(affinity: Tensor, targets: Tensor) -> Tensor:
    """AFA's affinity loss of P (B, N, N) in (0, 1) against pair labels (B, N, N) (1 same, 0
    different, anything else ignored)."""
    positive = (targets == 1).to(affinity.dtype)
    negative = (targets == 0).to(affinity.dtype)
    pos = (positive * (1 - affinity)).sum() / (positive.sum() + 1)
    neg = (negative * affinity).sum() / (negative.sum() + 1)
    return 0.5 * pos + 0.5 * neg


def propagate_with_background(cams: Tensor, affinity: Tensor, cls_labels: Tensor, bkg: float, radius: int,
                              power: float = 2.0, eps: float = 0.1) -> Tensor:
    """One step of AFA's random walk. cams (B, K, h, w) on the affinity's grid (N = h * w),
    affinity (B, N, N), cls_labels (B, K) -> (B, K + 1, h, w): background first; channels of
    absent classes are 0."""
    b, k, h, w = cams.shape
    if affinity.shape[-2:] != (h * w, h * w):
        raise ValueError(f"affinity {tuple(affinity.shape)} does not fit a {h}x{w} CAM grid")
    window = radius_window(h, w, radius, affinity.device)
    walk = affinity.masked_fill(~window, 0.0) ** power
    walk = walk / (walk.sum(dim=1, keepdim=True) + eps)
    stack = torch.cat([torch.full_like(cams[:, :1], bkg), cams], dim=1).flatten(2)       # (B, K+1, N)
    present = torch.cat([torch.ones_like(cls_labels[:, :1]), cls_labels], dim=1) > 0.5
    probs = stack.masked_fill(~present[:, :, None], float("-inf")).softmax(dim=1)
    return torch.bmm(probs, walk).reshape(b, k + 1, h, w)


def refine_in_box(refiner, images: Tensor, maps: Tensor, present: Tensor, img_box: Box,
                  down_scale: int = 2) -> Tensor:
    """The reference's `refine_cams_with_cls_label`: per image, the present channels of `maps`
    (B, M, H, W) inside the image box refined with the box's image (B, 3, H, W RGB in [0, 1])
    resized to 1/down_scale, then upsampled back to the box; zeros elsewhere."""
    out = torch.zeros_like(maps)
    boxes = torch.as_tensor(img_box).long().reshape(-1, 4).tolist()
    for index, (top, bottom, left, right) in enumerate(boxes):
        if bottom <= top or right <= left:
            continue
        image = images[index:index + 1, :, top:bottom, left:right]
        h, w = image.shape[-2:]
        small = F.interpolate(image, size=(max(1, h // down_scale), max(1, w // down_scale)), mode="bilinear",
                              align_corners=False)
        keys = torch.nonzero(present[index])[:, 0]
        refined = refiner(small, maps[index:index + 1, keys, top:bottom, left:right])
        refined = F.interpolate(refined, size=(h, w), mode="bilinear", align_corners=False)
        out[index, keys, top:bottom, left:right] = refined[0]
    return out


def propagated_labels(refiner, images: Tensor, rgb: Tensor, cams: Tensor, cls_labels: Tensor, affinity: Tensor,
                      grid: tuple[int, int], high: float, low: float, img_box: Box, radius: int,
                      power: float = 2.0, eps: float = 0.1, down_scale: int = 2,
                      ignore_index: int = IGNORE_INDEX) -> Tensor:
    """AFA's segmentation target after the switch (module docstring): class ids (B, H, W).
    cams: multi-scale CAMs (B, K, H, W) in [0, 1]; affinity (B, N, N) on `grid`; rgb: the
    refiner's image (B, 3, H, W) in [0, 1]."""
    height, width = images.shape[-2:]
    small = F.interpolate(valid_cams(cams, cls_labels), size=tuple(grid), mode="bilinear", align_corners=False)
    present = torch.cat([torch.ones_like(cls_labels[:, :1]), cls_labels], dim=1) > 0.5
    labels = []
    for bkg in (high, low):
        walked = propagate_with_background(small, affinity, cls_labels, bkg, radius, power, eps)
        walked = F.interpolate(walked, size=(height, width), mode="bilinear", align_corners=False)
        labels.append(refine_in_box(refiner, rgb, walked, present, img_box, down_scale).argmax(dim=1))
    return ignore_outside_box(combine_high_low(labels[0], labels[1], ignore_index), img_box, ignore_index)


def _affinity_of(step: Step) -> Tensor:
    affinity = getattr(step.out, "affinity", None)
    if affinity is None:
        raise PipelineError(f"train_net.losses.aff: the {step.section.model!r} network has no affinity head "
                            "(use model: single_stage_mit)")
    return affinity


@register_term("aff")
def aff_term(step: Step) -> Tensor:
    """AFA's affinity loss: the affinity head against pair labels from the refined pseudo labels
    (never the propagated ones)."""
    affinity = _affinity_of(step)
    grid = tuple(step.out.patch.shape[-2:])
    targets = affinity_targets(step.pseudo_labels(), grid, step.section.aff.radius)
    return affinity_loss(affinity.float(), targets)


@register_label_hook
def afa_propagation(step: Step, labels: Tensor) -> Tensor | None:
    """From `train_net.aff.propagate_start` on (0 = never), the segmentation target is the
    affinity-propagated label (AFA: 6001 on VOC, i.e. after iteration 6000)."""
    a = step.section.aff
    if not a.propagate_start or step.iteration < a.propagate_start:
        return None
    from engine.multiscale import scaled_size
    from engine.refine import image_for_refiner_unit

    net, images = step.net, step.images
    if not hasattr(net, "affinity"):
        raise PipelineError(f"train_net.aff.propagate_start: the {step.section.model!r} network has no affinity "
                            "head (use model: single_stage_mit)")
    scale = max(step.section.cam_scales)
    x = images
    if scale != 1.0:
        x = F.interpolate(images, size=scaled_size(*images.shape[-2:], scale), mode="bilinear", align_corners=False)
    with torch.no_grad():
        affinity, grid = net.affinity(x)
        t, r = step.section.thresholds, step.section.refiner
        rgb = image_for_refiner_unit(images, step.data.mean, step.data.std)
        return propagated_labels(step.engine.refiner, images, rgb, step.cams(), step.targets, affinity.float(), grid,
                                 t.high, t.low, step.boxes, a.radius, a.propagate_power, a.propagate_eps,
                                 r.down_scale)
