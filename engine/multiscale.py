"""Online multi-scale + flip CAMs of the single-stage methods (toco.md §3.1, §11;
afa.md §3; tscd.md §3): the CAMs every training step turns into pseudo labels.

Per scale s: resize the batch bilinearly (align_corners=False, no antialias) to
(int(s*H), int(s*W)) -- Python's int() floors, and 0.29*100 gives 28, as in the
reference; run [images, flipped images] as one batch of 2B; upsample every CAM
bilinearly to H x W; fuse each image with its **un-flipped** mirror by element-wise
max; ReLU. Sum over scales. Then per image and class: subtract the spatial minimum,
divide by (spatial maximum of the shifted map + 1e-5).

Scale 1.0 always runs first, whatever its place in `scales` (the reference runs it
before the loop and skips 1.0 inside it); we require it to be listed so that a
config says what runs.

`cam_fn(images) -> cams` is any callable (a model's CAM branch); it may return one
tensor or a tuple of tensors (ToCo: CAM and aux CAM from one forward), and the
result has the same structure. It runs under no_grad and in whatever mode the
caller left the model (the references use train mode; with no dropout it is the
same).
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Cams = Union[Tensor, tuple[Tensor, ...]]


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The reference's resized size: int(s*h), int(s*w) (floor, float arithmetic as is)."""
    return int(scale * height), int(scale * width)


def minmax_normalize(cams: Tensor, eps: float = 1e-5) -> Tensor:
    """Per image and channel: (cam - min) / (max(cam - min) + eps)."""
    shifted = cams - cams.amin(dim=(-2, -1), keepdim=True)
    return shifted / (shifted.amax(dim=(-2, -1), keepdim=True) + eps)


def _fused_at_scale(cam_fn: Callable[[Tensor], Cams], images: Tensor, scale: float, flip: bool) -> tuple[bool, tuple[Tensor, ...]]:
    """(whether cam_fn returned a tuple, ReLU(max(cam(x), unflip(cam(flip x)))) upsampled
    to the input size), for one scale."""
    b, _, h, w = images.shape
    inputs = images
    if scale != 1.0:
        inputs = F.interpolate(images, size=scaled_size(h, w, scale), mode="bilinear", align_corners=False)
    if flip:
        inputs = torch.cat([inputs, inputs.flip(-1)], dim=0)
    outputs = cam_fn(inputs)
    fused = []
    for cams in outputs if isinstance(outputs, tuple) else (outputs,):
        cams = F.interpolate(cams, size=(h, w), mode="bilinear", align_corners=False)
        if flip:
            # Un-flip after resizing, as the reference does (resize and flip differ by
            # rounding when the token grid floors).
            cams = torch.max(cams[:b], cams[b:].flip(-1))
        fused.append(F.relu(cams))
    return isinstance(outputs, tuple), tuple(fused)


def multiscale_cams(
    cam_fn: Callable[[Tensor], Cams],
    images: Tensor,
    scales: Sequence[float] = (1.0, 0.5, 1.5),
    flip: bool = True,
) -> Cams:
    """Fused, min-max normalised CAMs (B, K, H, W) in [0, 1) of `images` (B, 3, H, W).

    `cam_fn` maps a batch to raw CAMs at any resolution (the token grid). All K
    channels are kept; absent classes are masked later by the caller.
    """
    if 1.0 not in scales:
        raise ValueError(f"CAM scales {list(scales)} must include 1.0 (it always runs and sets the output size)")
    with torch.no_grad():
        returns_tuple, first = _fused_at_scale(cam_fn, images, 1.0, flip)
        totals = list(first)
        for scale in scales:
            if scale == 1.0:
                continue
            for index, cams in enumerate(_fused_at_scale(cam_fn, images, scale, flip)[1]):
                totals[index] = totals[index] + cams
        normalized = tuple(minmax_normalize(total) for total in totals)
    return normalized if returns_tuple else normalized[0]
