"""Local crops for ToCo's class token contrast (toco.md §2.4, §4 step 5, §11).

ToCo cuts 8 small (96 px) crops per image from regions the aux CAM does *not*
call confident foreground, and labels each crop negative (background) or positive
(holds object/uncertain pixels) from the same ROI map. The crops and their flags
feed `engine.losses.ctc_loss`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class LocalCrops(NamedTuple):
    """crops (B, n, C, s, s); flags (B, num_global + n), 1 = positive; corners (B, n, 2) top-left (row, col)."""

    crops: Tensor
    flags: Tensor
    corners: Tensor


def local_roi(cams_aux: Tensor, cls_labels: Tensor, low: float = 0.25, high: float = 0.70) -> Tensor:
    """(B, H, W) int map: 0 = background (max GT-class CAM <= low), 2 = confident foreground (>= high), 1 = between.

    cams_aux (B, C, H, W) in [0, 1]; cls_labels (B, C). Note `>= high` here, against
    `> high` in the PTC labels: the reference uses both, and so do we.
    """
    value = (cams_aux * cls_labels[:, :, None, None].to(cams_aux.dtype)).max(dim=1).values
    roi = torch.ones_like(value, dtype=torch.int16)
    roi[value <= low] = 0
    roi[value >= high] = 2
    return roi


def select_local_crops(images: Tensor, roi: Tensor, num_crops: int = 8, crop_size: int = 96,
                       negative_ratio: float = 0.2, num_global: int = 2,
                       relative_flip: Optional[Tensor] = None, local_view_independent_flip: bool = True,
                       generator: Optional[torch.Generator] = None) -> LocalCrops:
    """Cut `num_crops` crops per image around pixels that are not confident foreground.

    images (B, C, H, W): the local-source image (ToCo: the same geometry as the main
    input, augmented separately). roi (B, H, W) from `local_roi`, computed on the main
    input.

    Candidates are the pixels with ROI <= 1 at least crop_size/2 from every border;
    a candidate at (r, c) gives the crop whose top-left corner is (r − s/2, c − s/2),
    so the candidate is the crop's centre (the reference indexes the margin-cropped
    map and uses the index as the corner, which is the same thing). With fewer than
    `num_crops` candidates, every pixel inside the margin is a candidate. `num_crops`
    of them are drawn without replacement (`torch.randperm`, `generator` if given).
    A crop is negative (flag 0) when Σ ROI over the crop / s² <= negative_ratio, where
    confident foreground counts 2; the `num_global` global views come first and are
    always positive.

    Flip. ToCo's data pipeline flips the local-source image independently of the main
    input, so half the time the ROI is mirrored relative to the image it is applied to
    (toco.md §4 step 5). `local_view_independent_flip=True` reproduces that: the ROI
    is used as is. False aligns them: where `relative_flip[b]` says the local source
    is mirrored relative to the main input, the ROI is mirrored before it is used.
    """
    batch, channels, height, width = images.shape
    if roi.shape != (batch, height, width):
        raise ValueError(f"roi {tuple(roi.shape)} does not match images {tuple(images.shape)}")
    margin = crop_size // 2
    if height - 2 * margin <= 0 or width - 2 * margin <= 0:
        raise ValueError(f"images {height}x{width} are too small for {crop_size}-px crops")

    roi = roi.to(images.device)
    if not local_view_independent_flip and relative_flip is not None:
        mirrored = relative_flip.to(images.device).bool()[:, None, None]
        roi = torch.where(mirrored, roi.flip(-1), roi)

    crops = images.new_zeros(batch, num_crops, channels, crop_size, crop_size)
    flags = images.new_ones(batch, num_global + num_crops)
    corners = torch.zeros(batch, num_crops, 2, dtype=torch.long)
    for b in range(batch):
        inner = roi[b, margin:height - margin, margin:width - margin]
        candidates = (inner <= 1).nonzero()
        if candidates.shape[0] < num_crops:
            candidates = (inner >= 0).nonzero()
        if candidates.shape[0] < num_crops:
            raise ValueError(f"only {candidates.shape[0]} crop positions in a {height}x{width} image; "
                             f"{num_crops} crops of {crop_size} px need more")
        order = torch.randperm(candidates.shape[0], generator=generator)[:num_crops]
        chosen = candidates.cpu()[order]
        for n, (top, left) in enumerate(chosen.tolist()):
            corners[b, n] = torch.tensor([top, left])
            crops[b, n] = images[b, :, top:top + crop_size, left:left + crop_size]
            window = roi[b, top:top + crop_size, left:left + crop_size]
            if window.sum().item() / (crop_size * crop_size) <= negative_ratio:
                flags[b, num_global + n] = 0
    return LocalCrops(crops, flags, corners)
