"""CAMs -> pseudo labels for the single-stage methods (toco.md §2.2, §3.2, §3.3, §11;
afa.md §3; tscd.md §3).

Labels are class ids: 0 background, c for foreground class c (CAM channel c-1),
`ignore_index` (255) where unsure or outside the image box.

`img_box` (B, 4) holds, per image, the valid (unpadded) region of a padded crop as
(top, bottom, left, right) pixel coordinates, bottom/right exclusive -- the
reference's `[coord[0]:coord[1], coord[2]:coord[3]]`. Padding is not image: it is
always ignored.

Three label makers:
- `cam_to_label`: thresholds on the raw CAM. With `bkg` only, the validation label
  (argmax over present classes, background where max <= bkg). With `high`/`low` too,
  the two-threshold label: > high foreground, (low, high] ignore, <= low background
  (ToCo's PTC target and local-crop ROI use this on the aux CAM).
- `token_labels`: ToCo's PTC target on the token grid, with the reference's use of
  the pixel box on token indices (§11) behind a flag.
- `refined_to_label` + `combine_high_low`: the refiner route (§3.2): refined
  background+class maps are upsampled, argmaxed and mapped to class ids, once with
  a strict (high) and once with a lenient (low) background plane; then foreground
  where the strict one says foreground, background only where both say background,
  ignore in between. `engine.refine.refine_cams_with_refiner` runs the whole route.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = 255
Box = Union[Tensor, Sequence[Sequence[int]]]


def valid_cams(cams: Tensor, cls_labels: Tensor) -> Tensor:
    """CAMs (B, K, H, W) with absent classes zeroed (cls_labels (B, K) in {0, 1})."""
    return cams * cls_labels[:, :, None, None].to(cams.dtype)


def box_mask(img_box: Box, height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """(B, height, width) bool, True inside each image's box (top, bottom, left, right)."""
    boxes = torch.as_tensor(img_box, device=device).long().reshape(-1, 4)
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    inside_rows = (rows[None] >= boxes[:, 0:1]) & (rows[None] < boxes[:, 1:2])
    inside_cols = (cols[None] >= boxes[:, 2:3]) & (cols[None] < boxes[:, 3:4])
    return inside_rows[:, :, None] & inside_cols[:, None, :]


def ignore_outside_box(label: Tensor, img_box: Box, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """`label` (B, H, W) with every pixel outside its image's box set to `ignore_index`."""
    inside = box_mask(img_box, label.shape[1], label.shape[2], label.device)
    return torch.where(inside, label, torch.full_like(label, ignore_index))


def cam_to_label(
    cams: Tensor,
    cls_labels: Tensor,
    bkg: float,
    high: float | None = None,
    low: float | None = None,
    img_box: Box | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Threshold label (B, H, W) long from CAMs (B, K, H, W) in [0, 1].

    Order as the reference: argmax + 1 over the present classes; 0 where the max is
    <= bkg; then, with `high` and `low`, ignore where <= high and 0 where <= low (so
    `bkg` only matters if it exceeds `high`); then ignore outside `img_box`.
    """
    if (high is None) != (low is None):
        raise ValueError("give both high and low thresholds, or neither")
    value, index = valid_cams(cams, cls_labels).max(dim=1)
    label = index + 1
    label[value <= bkg] = 0
    if high is not None:
        label[value <= high] = ignore_index
        label[value <= low] = 0
    if img_box is not None:
        label = ignore_outside_box(label, img_box, ignore_index)
    return label


def token_box_mask(img_box: Box, grid: tuple[int, int], patch_size: int, box_in_pixels: bool = True) -> Tensor:
    """(B, h, w) bool: which tokens of a `grid` count as inside the image box.

    `box_in_pixels=True` is the reference's behaviour (toco.md §11): the pixel box is
    applied to token *indices*, so a top/left padding of `grid` pixels or more ignores
    every token. False: a token is inside when its centre pixel is inside the box.
    """
    h, w = grid
    if box_in_pixels:
        return box_mask(img_box, h, w)
    pixels = box_mask(img_box, h * patch_size, w * patch_size)
    centre = patch_size // 2
    return pixels[:, centre::patch_size, centre::patch_size]


def token_labels(
    cams: Tensor,
    cls_labels: Tensor,
    grid: tuple[int, int],
    high: float,
    low: float,
    bkg: float,
    img_box: Box,
    patch_size: int,
    box_in_pixels: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """ToCo's PTC target (B, h, w): the CAM resized bilinearly to the token grid, then
    the two-threshold label, ignored outside the box (see `token_box_mask`)."""
    small = F.interpolate(cams, size=grid, mode="bilinear", align_corners=False)
    label = cam_to_label(small, cls_labels, bkg=bkg, high=high, low=low, ignore_index=ignore_index)
    inside = token_box_mask(img_box, grid, patch_size, box_in_pixels).to(label.device)
    return torch.where(inside, label, torch.full_like(label, ignore_index))


def refined_to_label(refined: Tensor, keys: Tensor, valid: Tensor, size: tuple[int, int]) -> Tensor:
    """Class ids (B, H, W) from refined maps (B, M, h, w).

    Channel m of image b holds class id `keys[b, m]` (0 = background) when
    `valid[b, m]`; invalid channels (padding, so that images with different class
    counts share a batch) never win. The maps are upsampled bilinearly to `size`
    *before* the argmax (toco.md §11).
    """
    upsampled = F.interpolate(refined, size=size, mode="bilinear", align_corners=False)
    upsampled = upsampled.masked_fill(~valid[:, :, None, None], float("-inf"))
    # argmax over a channels-last copy: same first-maximum result, several times faster
    # on the CPU than reducing over the strided channel dim.
    winner = upsampled.permute(0, 2, 3, 1).contiguous().argmax(dim=-1)
    return torch.gather(keys, 1, winner.flatten(1)).reshape(winner.shape)


def combine_high_low(label_high: Tensor, label_low: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The two-plane label: `label_high` where it is foreground (or ignore), ignore where
    it says background, background where both say background."""
    label = label_high.clone()
    label[label_high == 0] = ignore_index
    label[(label_high == 0) & (label_low == 0)] = 0
    return label
