"""IRNet (Ahn et al., CVPR 2019): inter-pixel relation network of the train_irn stage.

A frozen ResNet feeds two branches, both at stride 4:
- boundary: every tap → 1×1 conv to 32 channels, GroupNorm(4), upsample to
  stride 4, ReLU; the five are concatenated → 1×1 conv (with bias) → one logit.
- displacement: taps reduced to 64/128/256/256/256 channels (GroupNorm 8/16/16/
  16/16 groups, ReLU); the three deep ones (stride 8, 16, 16) are brought to
  stride 8, concatenated, fused to 256 channels and upsampled to stride 4; that
  is concatenated with the two shallow ones → 1×1 conv to 256, GroupNorm, ReLU →
  1×1 conv to 2 channels (dy, dx), in stride-4 pixels, pointing from each pixel
  to the centroid of its instance.
  The displacement widths scale with the backbone (layer4 width / 2048, so
  resnet50 gets the reference's widths and resnet18 a quarter of them).

Facts from the reference (jiwoon-ahn/irn, net/resnet50_irn.py, step/train_irn.py):
- Features are detached from the backbone, and the backbone stays in eval mode.
- The displacement goes through a "mean shift" layer: in training it only
  tracks the running mean of the displacement (BatchNorm statistics, momentum
  0.1) and returns it unchanged; in eval it subtracts that mean. The losses
  constrain displacement differences only, so the field is free up to a
  constant; subtracting the running mean, dominated by background pixels whose
  loss drives them to a common value, makes background displacements ≈ 0.
- Losses (`irn_losses`), with pair masks P (summed over batch, pairs, pixels):
    bg_pos = Σ_P −log(aff + 1e-5) / (|P| + 1e-5)      on background pairs
    fg_pos = the same on foreground pairs
    neg    = Σ_P −log(1 + 1e-5 − aff) / (|P| + 1e-5)  on negative pairs
    dp_fg  = Σ_P Σ_c |D_c(src) − D_c(tgt) − offset_c| / (2|P| + 1e-5)  on fg pairs
    dp_bg  = Σ_P Σ_c |D_c(src) − D_c(tgt)| / (2|P| + 1e-5)             on bg pairs
  with aff = 1 − max sigmoid(boundary) along the pair's path. The factor 2 makes
  the displacement losses a mean over the two coordinates. Total (reference):
    (bg_pos / 2 + fg_pos / 2 + neg) / 2 + (dp_fg + dp_bg) / 2  (`irn_total_loss`).

Ours differs in two harmless ways: inputs of any size are zero-padded (in the
normalised space: the mean colour) to a multiple of 16 and the outputs cropped
to ⌈H/4⌉ × ⌈W/4⌉; and layer4 follows `dilate_last_stage` as in `ResNetCAM`
(True: timm's dilated stride-16 layer4; False: the reference's plain stride 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from net.affinity import pair_offsets, path_max_boundary
from net.resnet_cam import _undilate
from net.backbone import create_timm_model
from net.registry import register_model
from pipeline.errors import PipelineError

_STEM = ("conv1", "bn1", "act1", "maxpool")
_STAGES = ("layer1", "layer2", "layer3", "layer4")
_BOUNDARY_CHANNELS, _BOUNDARY_GROUPS = 32, 4
# Reference widths and GroupNorm groups of the displacement branch (resnet50 taps).
_DISPLACEMENT_CHANNELS = (64, 128, 256, 256, 256)
_DISPLACEMENT_GROUPS = (8, 16, 16, 16, 16)
_FUSED_CHANNELS, _FUSED_GROUPS = 256, 16
_REFERENCE_LAST_WIDTH = 2048
_LOG_EPSILON = 1e-5


def _conv_norm(in_channels: int, out_channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.GroupNorm(groups, out_channels))


def _scaled(channels: int, groups: int, scale: float) -> int:
    """`channels · scale` rounded to a multiple of `groups` (at least one per group)."""
    return groups * max(1, round(channels * scale / groups))


def _resize_relu(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return F.relu(x)


class _RunningMeanCentering(nn.Module):
    """IRNet's "mean shift": in eval, subtract `running_mean` from the displacement field; in
    training, return it unchanged. The reference never updates the mean in training: its
    train_irn sets it afterwards from one pass over the inference images
    (stages/train_irn.set_displacement_mean). `track_in_training` instead keeps a running
    mean during training (momentum 0.1), an option of ours."""

    def __init__(self, channels: int, momentum: float = 0.1, track_in_training: bool = False):
        super().__init__()
        self.momentum = momentum
        self.track_in_training = track_in_training
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            if not self.track_in_training:
                return x
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(x.mean(dim=(0, 2, 3)), alpha=self.momentum)
            return x
        return x - self.running_mean.view(1, -1, 1, 1)


@register_model("irn")
class IRNet(nn.Module):
    def __init__(self, backbone: str = "resnet50", pretrained: bool | str = False, dilate_last_stage: bool = True):
        super().__init__()
        self.backbone = create_timm_model(backbone, pretrained, num_classes=0, output_stride=16)
        missing = [name for name in _STEM + _STAGES if not hasattr(self.backbone, name)]
        if missing:
            raise PipelineError(f"{backbone!r} is not a timm ResNet (no {', '.join(missing)}); IRNet needs one")
        if not dilate_last_stage:
            _undilate(self.backbone.layer4)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        # Tap widths: timm's first feature is after act1; the maxpool after it keeps the width.
        widths = [info["num_chs"] for info in self.backbone.feature_info][:5]

        self.boundary_taps = nn.ModuleList(_conv_norm(c, _BOUNDARY_CHANNELS, _BOUNDARY_GROUPS) for c in widths)
        self.boundary_head = nn.Conv2d(len(widths) * _BOUNDARY_CHANNELS, 1, 1, bias=True)

        scale = widths[-1] / _REFERENCE_LAST_WIDTH
        reduced = [_scaled(c, g, scale) for c, g in zip(_DISPLACEMENT_CHANNELS, _DISPLACEMENT_GROUPS)]
        fused = _scaled(_FUSED_CHANNELS, _FUSED_GROUPS, scale)
        self.displacement_taps = nn.ModuleList(
            _conv_norm(c, r, g) for c, r, g in zip(widths, reduced, _DISPLACEMENT_GROUPS))
        self.displacement_fuse = _conv_norm(sum(reduced[2:]), fused, _FUSED_GROUPS)
        self.displacement_head = nn.Sequential(
            _conv_norm(reduced[0] + reduced[1] + fused, fused, _FUSED_GROUPS),
            nn.ReLU(inplace=True),
            nn.Conv2d(fused, 2, 1, bias=False),
        )
        self.displacement_centering = _RunningMeanCentering(2)
        self.train()

    def _taps(self, x: Tensor) -> list[Tensor]:
        b = self.backbone
        stem = b.maxpool(b.act1(b.bn1(b.conv1(x))))
        taps = [stem]
        for name in _STAGES:
            taps.append(getattr(b, name)(taps[-1]))
        return taps

    def forward(self, x: Tensor, centre: bool = True) -> tuple[Tensor, Tensor]:
        """(boundary logit (B, 1, ⌈H/4⌉, ⌈W/4⌉), displacement (B, 2, ⌈H/4⌉, ⌈W/4⌉) as (dy, dx));
        `centre=False` gives the displacement before the mean shift."""
        height, width = x.shape[-2:]
        x = F.pad(x, (0, -width % 16, 0, -height % 16))
        with torch.no_grad():
            taps = self._taps(x)
        size4, size8 = taps[0].shape[-2:], taps[2].shape[-2:]

        boundary = [_resize_relu(reduce(t), size4) for reduce, t in zip(self.boundary_taps, taps)]
        boundary = self.boundary_head(torch.cat(boundary, dim=1))

        displacement = [reduce(t) for reduce, t in zip(self.displacement_taps, taps)]
        deep = torch.cat([_resize_relu(d, size8) for d in displacement[2:]], dim=1)
        deep = _resize_relu(self.displacement_fuse(deep), size4)
        shallow = [F.relu(d) for d in displacement[:2]]
        displacement = self.displacement_head(torch.cat(shallow + [deep], dim=1))

        out_height, out_width = math.ceil(height / 4), math.ceil(width / 4)
        boundary = boundary[..., :out_height, :out_width]
        displacement = displacement[..., :out_height, :out_width]
        if centre:
            displacement = self.displacement_centering(displacement)
        return boundary, displacement

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(boundary branch parameters, displacement branch parameters): the two learning-rate groups."""
        boundary = list(self.boundary_taps.parameters()) + list(self.boundary_head.parameters())
        displacement = [p for module in (self.displacement_taps, self.displacement_fuse, self.displacement_head)
                        for p in module.parameters()]
        return boundary, displacement

    def train(self, mode: bool = True) -> "IRNet":
        super().train(mode)
        self.backbone.eval()
        return self


def _pair_differences(displacement: Tensor, radius: int) -> Tensor:
    """D(source) − D(source + offset_k): (B, 2, K, h, w); zero-padded outside the image."""
    r = int(radius)
    h, w = displacement.shape[-2:]
    padded = F.pad(displacement, (r, r, 0, r))
    targets = [padded[..., dy:dy + h, r + dx:r + dx + w] for dy, dx in pair_offsets(r)]
    return displacement.unsqueeze(2) - torch.stack(targets, dim=2)


def irn_losses(boundary_logit: Tensor, displacement: Tensor, labels: dict[str, Tensor], radius: int) -> dict[str, Tensor]:
    """IRNet's five losses (see the module doc for the exact formulas).

    `boundary_logit` (B, 1, h, w), `displacement` (B, 2, h, w), `labels` holds
    the batched pair masks "bg_pos", "fg_pos", "neg" (B, K, h, w) of
    `net.affinity.pair_labels` at the same `radius`. Returns scalar tensors
    keyed "bg_pos", "fg_pos", "neg", "dp_fg", "dp_bg".
    """
    k = len(pair_offsets(radius))
    expected = (boundary_logit.shape[0], k, *boundary_logit.shape[-2:])
    for key in ("bg_pos", "fg_pos", "neg"):
        if key not in labels:
            raise ValueError(f"irn_losses: missing pair label {key!r}")
        if tuple(labels[key].shape) != expected:
            raise ValueError(f"irn_losses: pair label {key!r} has shape {tuple(labels[key].shape)}, "
                             f"expected {expected} (batch, pairs at radius {radius}, stride-4 grid)")
    if displacement.shape[1] != 2 or displacement.shape[-2:] != boundary_logit.shape[-2:]:
        raise ValueError(f"irn_losses: displacement {tuple(displacement.shape)} does not match boundary {tuple(boundary_logit.shape)}")

    dtype = boundary_logit.dtype
    bg, fg, neg = (labels[key].to(dtype) for key in ("bg_pos", "fg_pos", "neg"))
    affinity = 1 - path_max_boundary(torch.sigmoid(boundary_logit[:, 0]), radius)

    def masked_mean(values: Tensor, mask: Tensor, count_factor: float = 1.0) -> Tensor:
        return (values * mask).sum() / (count_factor * mask.sum() + _LOG_EPSILON)

    differences = _pair_differences(displacement, radius)
    offsets = torch.as_tensor(pair_offsets(radius).T, dtype=displacement.dtype, device=displacement.device)
    return {
        "bg_pos": masked_mean(-torch.log(affinity + _LOG_EPSILON), bg),
        "fg_pos": masked_mean(-torch.log(affinity + _LOG_EPSILON), fg),
        "neg": masked_mean(-torch.log(1 + _LOG_EPSILON - affinity), neg),
        "dp_fg": masked_mean((differences - offsets[None, :, :, None, None]).abs(), fg.unsqueeze(1), 2.0),
        "dp_bg": masked_mean(differences.abs(), bg.unsqueeze(1), 2.0),
    }


def irn_total_loss(losses: dict[str, Tensor]) -> Tensor:
    """The reference's weighting: (bg_pos/2 + fg_pos/2 + neg)/2 + (dp_fg + dp_bg)/2."""
    affinity = (losses["bg_pos"] / 2 + losses["fg_pos"] / 2 + losses["neg"]) / 2
    return affinity + (losses["dp_fg"] + losses["dp_bg"]) / 2


@torch.no_grad()
def boundary_and_displacement(model: IRNet, image, mean, std, device, pad_to: int = 0) -> tuple:
    """IRN inference on one uint8 image: the boundary probability (⌈H/4⌉, ⌈W/4⌉) from the image
    and its mirror image (logits averaged, the mirror's flipped back), and the image's own
    displacement field (2, ⌈H/4⌉, ⌈W/4⌉) (the reference ignores the mirrored one, whose dx
    would need a sign flip). Both as numpy arrays. `pad_to`: the normalised image and its
    mirror are zero-padded at the bottom/right to at least pad_to × pad_to first (the
    reference pads to 512, so GroupNorm sees training's padded statistics); outputs are
    cropped back to the image's grid."""
    import numpy as np

    from pipeline.transforms import normalize, to_tensor

    height, width = image.shape[:2]
    x = normalize(image, mean, std)
    mirrored = np.ascontiguousarray(x[:, ::-1])
    pad = (0, max(pad_to - width, 0), 0, max(pad_to - height, 0))
    batch = torch.stack([F.pad(to_tensor(x), pad), F.pad(to_tensor(mirrored), pad)]).to(device)
    logits, displacement = model(batch)
    grid_h, grid_w = math.ceil(height / 4), math.ceil(width / 4)
    logits, displacement = logits[..., :grid_h, :grid_w], displacement[..., :grid_h, :grid_w]
    boundary = torch.sigmoid(logits[0, 0] / 2 + logits[1, 0].flip(-1) / 2)
    return boundary.cpu().numpy(), displacement[0].cpu().numpy()


def check_same_grid(stage: str, image_id: str, cam: dict, boundary) -> None:
    """The CAM artifact and the IRN's boundary map must share the stride-4 grid."""
    if cam["cam"].shape[1:] != boundary.shape:
        raise PipelineError(f"{stage}: CAM of {image_id} is {cam['cam'].shape[1:]} at stride 4, the boundary "
                            f"map is {boundary.shape}: CAMs from another image size?")
