"""Local refinement of CAM probability maps by image appearance, and the pseudo-label
route built on it (toco.md §3.2, §11; afa.md §4; tscd.md §4; family-all.md §4.1).

One `LocalRefiner`, two presets:
- `par`: AFA's PAR (also ToCo and FSR). Kernel = softmax(appearance) + 0.01 *
  softmax(position prior); appearance temperature 0.3. Sums to 1.01 per pixel.
- `varm`: TSCD's VARM (TSD-CAM's "APRM", the same file). Kernel =
  softmax(appearance) - 0.01 * softmax(local variation); appearance temperature 0.25
  (the reference multiplies by 4; dividing by 0.25 is the same float operation).
  Sums to 0.99; some weights are negative.
Neither renormalises: after 10 iterations PAR maps carry 1.01^10 of their mass and
VARM maps 0.99^10; the argmax is unaffected. We keep it that way for parity.

Neighbourhood: for each dilation d in (1, 2, 4, 8, 12, 24), the 8 pixels at
d * (dy, dx), dy, dx in {-1, 0, 1} minus the centre, with replicate padding
(coordinates clamped to the image): 48 neighbours; the centre is not one.

Appearance term, per pixel i and neighbour j: mean over RGB channels c of
-(|I_c(j) - I_c(i)| / (sigma_c(i) + 1e-8) / temperature)^2, with sigma_c(i) the
unbiased standard deviation of channel c over the 48 neighbour values.
Position prior: distance d (axial) or sqrt(2) d (diagonal), -(dist / (std(dist) +
1e-8) / 0.3)^2, the same for every pixel.
Variation prior (VARM): on the neighbour stack, the squared difference of each
neighbour value with the same neighbour of the pixel below plus that of the pixel
to the right (the last row/column compares with itself), mean over channels. Near
the border this differs from "the image gradient at the neighbour" because both
positions are clamped; we follow the reference's stack arithmetic.

Iteration: m_i <- sum_j K_ij m_j, `iterations` times, every channel independently.
The kernel is computed once per call and shared by every channel, so the strict
and lenient background stacks of an image are refined in one call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.pseudo import IGNORE_INDEX, Box, combine_high_low, ignore_outside_box, refined_to_label

# (dy, dx) of the 8 neighbours at one dilation, in the reference's kernel order.
NEIGHBOUR_OFFSETS: tuple[tuple[int, int], ...] = (
    (-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
# ImageNet mean/std on the 0..255 scale, the constants the references denormalise with.
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class RefinerConfig:
    """Everything that distinguishes PAR from VARM; see the module docstring."""
    appearance_temperature: float
    prior: str  # "position" | "variation"
    prior_weight: float
    position_temperature: float = 0.3
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    iterations: int = 10


PRESETS: dict[str, RefinerConfig] = {
    "par": RefinerConfig(appearance_temperature=0.3, prior="position", prior_weight=0.01),
    "varm": RefinerConfig(appearance_temperature=0.25, prior="variation", prior_weight=-0.01),
}
PRESETS["aprm"] = PRESETS["varm"]  # TSD-CAM's name for the same module


def shifted_neighbours(x: Tensor, dilations: Sequence[int]) -> Iterator[Tensor]:
    """For x (B, C, h, w), yield the 8 * len(dilations) maps x(clamp(i + d*(dy, dx))),
    dilation-major, in NEIGHBOUR_OFFSETS order; each a view of one padded copy."""
    h, w = x.shape[-2:]
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        for dy, dx in NEIGHBOUR_OFFSETS:
            top, left = d + dy * d, d + dx * d
            yield padded[..., top:top + h, left:left + w]


def neighbour_stack(x: Tensor, dilations: Sequence[int]) -> Tensor:
    """(B, C, 8 * len(dilations), h, w): all shifted neighbours of x stacked on dim 2."""
    return torch.stack(list(shifted_neighbours(x, dilations)), dim=2)


def neighbour_distances(dilations: Sequence[int]) -> Tensor:
    """(8 * len(dilations),) float32 distance of each neighbour: d axial, sqrt(2) d diagonal."""
    unit = torch.tensor([math.sqrt(2) if dy and dx else 1.0 for dy, dx in NEIGHBOUR_OFFSETS])
    return torch.cat([unit * d for d in dilations])


class LocalRefiner(nn.Module):
    """PAR / VARM. forward(images (B, 3, h, w) in [0, 1], masks (B, M, h', w')) -> (B, M, h, w).

    No learnable parameters. `LocalRefiner("par")`, `LocalRefiner("varm", iterations=15)`.
    """

    def __init__(self, preset: str | RefinerConfig = "par", *, dilations: Sequence[int] | None = None,
                 iterations: int | None = None):
        super().__init__()
        if isinstance(preset, str):
            if preset not in PRESETS:
                raise ValueError(f"unknown refiner preset {preset!r}; known: {sorted(PRESETS)}")
            preset = PRESETS[preset]
        if dilations is not None:
            preset = replace(preset, dilations=tuple(dilations))
        if iterations is not None:
            preset = replace(preset, iterations=iterations)
        if preset.prior not in ("position", "variation"):
            raise ValueError(f"refiner prior must be 'position' or 'variation', got {preset.prior!r}")
        if preset.iterations < 0 or not preset.dilations:
            raise ValueError(f"refiner needs iterations >= 0 and at least one dilation, got {preset}")
        self.config = preset

    def kernel(self, images: Tensor) -> Tensor:
        """(B, N, h, w) weights K_ij of the N = 8 * len(dilations) neighbours of every pixel.

        Written one neighbour at a time (views of a padded copy), not as the
        reference's (B, 3, N, h, w) stack: the same values up to float rounding, for a
        fraction of the memory (the stack made this step allocation-bound on the CPU)."""
        cfg = self.config
        neighbours = list(shifted_neighbours(images, cfg.dilations))               # N x (B, 3, h, w)
        mean = sum(neighbours) / len(neighbours)
        variance = sum((neighbour - mean) ** 2 for neighbour in neighbours) / (len(neighbours) - 1)
        denominator = variance.sqrt() + 1e-8                                       # unbiased std
        appearance = torch.stack(
            [(-((neighbour - images).abs() / denominator / cfg.appearance_temperature) ** 2).mean(dim=1)
             for neighbour in neighbours], dim=1)
        weights = appearance.softmax(dim=1)
        if cfg.prior == "position":
            distance = neighbour_distances(cfg.dilations).to(images)
            position = -(distance / (distance.std() + 1e-8) / cfg.position_temperature) ** 2
            return weights + cfg.prior_weight * position.softmax(dim=0)[None, :, None, None]
        variation = torch.stack([self._variation(neighbour) for neighbour in neighbours], dim=1)
        return weights + cfg.prior_weight * variation.softmax(dim=1)

    @staticmethod
    def _variation(neighbour: Tensor) -> Tensor:
        """(B, h, w): squared difference of a neighbour map with itself one row down
        plus one column right (the last row / column repeats), mean over channels."""
        below = torch.cat([neighbour[..., 1:, :], neighbour[..., -1:, :]], dim=-2)
        right = torch.cat([neighbour[..., 1:], neighbour[..., -1:]], dim=-1)
        return ((neighbour - below) ** 2 + (neighbour - right) ** 2).mean(dim=1)

    def propagate(self, kernel: Tensor, masks: Tensor) -> Tensor:
        """`iterations` steps of m_i <- sum_j K_ij m_j for masks (B, M, h, w)."""
        for _ in range(self.config.iterations):
            out = torch.zeros_like(masks)
            for index, shifted in enumerate(shifted_neighbours(masks, self.config.dilations)):
                out.addcmul_(kernel[:, index:index + 1], shifted)
            masks = out
        return masks

    def forward(self, images: Tensor, masks: Tensor) -> Tensor:
        if masks.shape[-2:] != images.shape[-2:]:
            masks = F.interpolate(masks, size=images.shape[-2:], mode="bilinear", align_corners=True)
        return self.propagate(self.kernel(images), masks)


def image_for_refiner(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN_255,
                      std: Sequence[float] = IMAGENET_STD_255) -> Tensor:
    """Normalised network input (B, 3, H, W) -> RGB in [0, 1] as the references feed
    the refiner: x * std + mean with mean/std on the 0..255 scale, cast to uint8
    (truncation, toco.md §11), / 255.

    Values outside 0..255 are clamped first (a uint8 cast of those is undefined).
    `mean`/`std` are on the 0..255 scale: the data config's 0..1 values times 255. Given
    the 0..1 values, every pixel would truncate to 0 and the refiner would see a black
    image (its kernel then a plain blur), so those are refused.
    """
    if max(abs(float(v)) for v in (*mean, *std)) <= 1.0:
        raise ValueError(f"image_for_refiner: mean {list(mean)} / std {list(std)} look like the 0..1 scale; "
                         "give them on the 0..255 scale (x 255)")
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device)[None, :, None, None]
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device)[None, :, None, None]
    pixels = (images * std_t + mean_t).clamp(0, 255).trunc()
    return pixels / 255.0


def image_for_refiner_unit(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """`image_for_refiner` given the data config's mean/std (the 0..1 scale, as the data set
    normalises): what train_net's online labels, make_sem_seg's cam_refine route and AFA's
    propagation feed the refiner."""
    return image_for_refiner(images, [255 * m for m in mean], [255 * s for s in std])


def _present_channels(cls_labels: Tensor) -> tuple[Tensor, Tensor]:
    """(keys, valid), both (B, M) with M = 1 + the most classes any image has: the
    channel indices of [background, classes] kept per image (background first, then
    present classes ascending, padded with 0) and which of them are real."""
    present = torch.cat([torch.ones_like(cls_labels[:, :1]), cls_labels], dim=1) > 0
    count = present.sum(dim=1)
    order = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices
    width = int(count.max())
    valid = torch.arange(width, device=cls_labels.device)[None] < count[:, None]
    keys = torch.where(valid, order[:, :width], torch.zeros_like(order[:, :width]))
    return keys, valid


def refine_cams_with_refiner(
    refiner: LocalRefiner,
    images: Tensor,
    cams: Tensor,
    cls_labels: Tensor,
    high: float,
    low: float,
    img_box: Box,
    down_scale: int = 2,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Pseudo label (B, H, W) long from CAMs, batched (the reference's
    `refine_cams_with_bkg_v2`, which loops over images).

    images: (B, 3, H, W) RGB in [0, 1] (see `image_for_refiner`); cams: (B, K, H, W)
    in [0, 1] (absent classes are dropped, so masking them first is optional);
    cls_labels: (B, K) in {0, 1}. Steps: image and [bkg plane, CAMs] stacks are
    resized bilinearly to (H // down_scale, W // down_scale); per image the background
    plus present classes are softmaxed, with a background plane of `high` and one of
    `low`; both stacks are refined with the image's kernel; then `refined_to_label`,
    the box and `combine_high_low` (engine/pseudo.py).
    """
    b, _, h, w = images.shape
    small = (h // down_scale, w // down_scale)
    small_images = F.interpolate(images, size=small, mode="bilinear", align_corners=False)
    keys, valid = _present_channels(cls_labels)
    width = keys.shape[1]
    gather_index = keys[:, :, None, None].expand(-1, -1, h, w)
    stacks = []
    for threshold in (high, low):
        with_bkg = torch.cat([torch.full_like(cams[:, :1], threshold), cams], dim=1)
        kept = torch.gather(with_bkg, 1, gather_index)
        kept = F.interpolate(kept, size=small, mode="bilinear", align_corners=False)
        stacks.append(kept.masked_fill(~valid[:, :, None, None], float("-inf")).softmax(dim=1))
    refined = refiner(small_images, torch.cat(stacks, dim=1))
    label_high, label_low = (
        ignore_outside_box(refined_to_label(part, keys, valid, (h, w)), img_box, ignore_index)
        for part in (refined[:, :width], refined[:, width:]))
    return combine_high_low(label_high, label_low, ignore_index)


def refine_cams_per_image(
    refiner: LocalRefiner,
    images: Tensor,
    cams: Tensor,
    cls_labels: Tensor,
    high: float,
    low: float,
    img_box: Box,
    down_scale: int = 2,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """The reference's loop, kept as the oracle for tests and the benchmark: one image
    and one background plane at a time, only that image's classes, full-resolution
    stacks resized as a whole."""
    b, _, h, w = images.shape
    small = (h // down_scale, w // down_scale)
    small_images = F.interpolate(images, size=small, mode="bilinear", align_corners=False)
    with_bkg = torch.cat([torch.ones_like(cls_labels[:, :1]), cls_labels], dim=1)
    labels = []
    for threshold in (high, low):
        stack = torch.cat([torch.full_like(cams[:, :1], threshold), cams], dim=1)
        stack = F.interpolate(stack, size=small, mode="bilinear", align_corners=False)
        per_image = []
        for index in range(b):
            keys = torch.nonzero(with_bkg[index])[:, 0]
            probabilities = stack[index:index + 1, keys].softmax(dim=1)
            refined = refiner(small_images[index:index + 1], probabilities)
            refined = F.interpolate(refined, size=(h, w), mode="bilinear", align_corners=False)
            per_image.append(keys[refined.argmax(dim=1)])
        labels.append(ignore_outside_box(torch.cat(per_image), img_box, ignore_index))
    return combine_high_low(labels[0], labels[1], ignore_index)
