"""DeepLabv2: a dilated ResNet (output stride 8) with an ASPP head of four summed
3x3 dilated convolutions, its multi-scale (MSC) wrapper, and checkpoint loading.

Any timm ResNet works as the backbone: `resnet101` is the paper's, `resnet18` or
`resnet10t` serve the CPU demo and the tests.

Output size: logits are (B, C, ceil(H/8), ceil(W/8)). Every stride-2 step of a
timm ResNet (7x7 or 3x3 stem convolution with padding, 3x3 max pool with
padding 1, the stride-2 3x3 convolution / average-pool shortcut of layer2) maps
n -> ceil(n/2), and the dilated layer3/layer4 keep the size. The Caffe-style
ResNet of the reference (kazuto1011/deeplab-pytorch) max-pools with
`ceil_mode=True`, which agrees on odd sizes (321 -> 41, 513 -> 65) and gives one
more row/column on some even ones (320 -> 41 there, 40 here).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from net.backbone import create_timm_model, load_non_strict, read_state_dict, strip_prefixes
from net.registry import register_model

log = logging.getLogger(__name__)


def dilate_first_blocks(backbone: nn.Module) -> None:
    """timm's output_stride=8 leaves the first block of layer3 (layer4) at the previous stage's
    dilation, 1 (2); the reference's Caffe ResNet dilates every block of layer3 by 2 and of layer4
    by 4, the first included. Set the first block's 3x3 convolutions to the stage's dilation."""
    for name, rate in (("layer3", 2), ("layer4", 4)):
        first = getattr(backbone, name)[0]
        for conv in first.modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1):
                conv.dilation, conv.padding = (rate, rate), (rate, rate)


class ASPP(nn.Module):
    """Four parallel 3x3 convolutions, dilated at `rates`, from the features
    straight to class scores; their outputs are summed (DeepLabv2's ASPP-L)."""

    def __init__(self, in_channels: int, num_classes: int, rates=(6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=rate, dilation=rate, bias=True)
            for rate in rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return sum(branch(features) for branch in self.branches)


class DeepLabV2(nn.Module):
    """Dilated ResNet + ASPP. `forward(x)` gives logits (B, num_classes,
    ceil(H/8), ceil(W/8)), not upsampled.

    `freeze_bn=True` (the reference): BatchNorm is frozen, running statistics
    are never updated (`train()` keeps every BatchNorm layer in eval mode) and
    the affine parameters have `requires_grad=False`; the reference's optimiser
    only sees the convolution weights. `freeze_bn=False` normalises with batch
    statistics in training and trains the affine parameters: only for backbones
    without pre-training on a large data set (the CPU demo's), whose statistics
    are those of a few hundred small batches and must move with the weights.
    """

    output_stride = 8

    def __init__(self, backbone: str = "resnet101", num_classes: int = 21,
                 pretrained: bool | str = False, rates=(6, 12, 18, 24), dilate_first_block: bool = True,
                 freeze_bn: bool = True):
        super().__init__()
        self.backbone = create_timm_model(backbone, pretrained, output_stride=self.output_stride,
                                          num_classes=0, global_pool="")
        if dilate_first_block:
            dilate_first_blocks(self.backbone)
        self.aspp = ASPP(self.backbone.num_features, num_classes, rates)
        self.num_classes, self.freeze_bn = num_classes, freeze_bn
        for module in self.modules():
            if freeze_bn and isinstance(module, nn.modules.batchnorm._BatchNorm):
                for parameter in module.parameters():
                    parameter.requires_grad_(False)
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aspp(self.backbone.forward_features(x))

    def train(self, mode: bool = True) -> "DeepLabV2":
        super().train(mode)
        if not self.freeze_bn:
            return self
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


class MSC(nn.Module):
    """Multi-scale inputs: the image at 1.0 and at each of `scales` goes through
    the same DeepLabV2; the scaled logits are bilinearly resized to the 1.0
    logits' size and fused by a pixel-wise max.

    Training returns [logits at 1.0, logits at each scale, the max]; evaluation
    returns the max only; without scales it is the base network ([logits] /
    logits). A scaled input is floor(H * scale) x floor(W * scale), as in the
    reference. By default the per-scale training outputs keep their
    own (smaller) size, as in the reference, whose loss downsamples the labels
    to each output instead; `resize_scaled_outputs=True` returns them resized to
    the 1.0 size (the max uses the resized ones either way). `msc_loss` handles
    both.
    """

    def __init__(self, base: DeepLabV2, scales=(0.75, 0.5), resize_scaled_outputs: bool = False):
        super().__init__()
        self.base = base
        self.scales = tuple(float(s) for s in scales)
        self.resize_scaled_outputs = resize_scaled_outputs

    def forward(self, x: torch.Tensor):
        logits = self.base(x)
        if not self.scales:
            return [logits] if self.training else logits
        size = logits.shape[2:]
        height, width = x.shape[2:]
        scaled, resized = [], []
        for scale in self.scales:
            scaled_size = (max(1, math.floor(height * scale)), max(1, math.floor(width * scale)))
            scaled_logits = self.base(F.interpolate(x, size=scaled_size, mode="bilinear", align_corners=False))
            scaled.append(scaled_logits)
            resized.append(F.interpolate(scaled_logits, size=size, mode="bilinear", align_corners=False))
        fused = torch.stack([logits, *resized]).amax(dim=0)
        if not self.training:
            return fused
        return [logits, *(resized if self.resize_scaled_outputs else scaled), fused]


_REFERENCE_PARTS = {"reduce": ("conv1", "bn1"), "conv3x3": ("conv2", "bn2"), "increase": ("conv3", "bn3"),
                    "proj": ("downsample.0", "downsample.1"), "shortcut": ("downsample.0", "downsample.1")}


def is_reference_format(state: dict) -> bool:
    """A deeplab-pytorch (kazuto1011) checkpoint, converted from Caffe: `layer1.conv1.conv.weight`,
    `layerN.blockM.{reduce,conv3x3,increase,proj|shortcut}.{conv,bn}.*`, `aspp.[stages.]cK.*`."""
    return any(".conv1.conv." in k or ".reduce.conv." in k for k in state)


def map_reference_keys(state: dict) -> dict:
    """deeplab-pytorch key names -> ours (timm ResNet + our ASPP). Its layer1 is the stem and
    layer2..layer5 are ResNet's layer1..layer4; block numbers start at 1. The Caffe ResNet puts a
    stage's stride on the first 1x1 convolution where timm puts it on the 3x3: the weights have the
    same shapes and load, the sampling grid differs by a pixel (documented in the README)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "base":                      # its MSC wrapper
            parts = parts[1:]
        if parts[0] == "layer1" and parts[1] == "conv1":
            target = ["backbone", "conv1" if parts[2] == "conv" else "bn1", *parts[3:]]
        elif parts[0] in ("layer2", "layer3", "layer4", "layer5") and parts[1].startswith("block") \
                and parts[2] in _REFERENCE_PARTS:
            conv, bn = _REFERENCE_PARTS[parts[2]]
            stage = f"layer{int(parts[0][5:]) - 1}"
            block = str(int(parts[1][5:]) - 1)
            target = ["backbone", stage, block, *(conv if parts[3] == "conv" else bn).split("."), *parts[4:]]
        elif parts[0] == "aspp":
            rest = parts[2:] if parts[1] == "stages" else parts[1:]
            target = ["aspp", "branches", rest[0].lstrip("c"), *rest[1:]]
        else:
            target = parts                             # unknown: reported as unexpected
        out[".".join(target)] = value
    return out


def load_deeplab_checkpoint(model: nn.Module, path: str | Path, state: dict | None = None) -> tuple[list[str], list[str]]:
    """Load weights into a DeepLabV2 or MSC non-strictly; returns (missing,
    unexpected) key lists, named as in `model`, and logs them. `state`: the
    file's state dict, when the caller has read it already.

    Accepted files: a state dict saved by this project (of a DeepLabV2 or an
    MSC, possibly under a "model"/"state_dict" key, possibly with DDP's
    "module." prefix), or plain backbone weights (e.g. a timm ResNet state
    dict, whose keys get the "backbone." prefix; its "fc.*" are reported as
    unexpected and the ASPP as missing), or the reference's COCO-pretrained
    DeepLab-v2 in deeplab-pytorch's format (`map_reference_keys`; below half of
    our tensors matched it is an error naming the file). Tensors whose shape
    differs from the model's (another number of classes) are skipped and
    reported as unexpected.
    """
    if state is None:
        state = read_state_dict(path, "DeepLab checkpoint")
    reference = is_reference_format(state)
    if reference:
        state = map_reference_keys(state)
    state = strip_prefixes(state, ("module.", "base."))
    if not any(key.startswith(("backbone.", "aspp.")) for key in state):
        state = {f"backbone.{key}": value for key, value in state.items()}
    if isinstance(model, MSC):
        state = {f"base.{key}": value for key, value in state.items()}
    # a reference checkpoint must fill the backbone: below half of our tensors it is another model
    return load_non_strict(model, state, path, min_share=0.5 if reference else 0.0)


@register_model("deeplab")
def build_deeplab(backbone: str = "resnet101", num_classes: int = 21, pretrained: bool | str = False,
                  msc_scales=(0.75, 0.5), dilate_first_block: bool = True, freeze_bn: bool = True,
                  rates=(6, 12, 18, 24), input_norm: str = "imagenet") -> MSC:
    """MSC(DeepLabV2). `pretrained` may be a local file: a DeepLab checkpoint or backbone weights.
    `msc_scales` empty: one scale (training returns [logits]). The model carries `input_norm`, the
    input convention of `deeplab.train_utils.deeplab_input`; "auto" is "caffe_bgr" when `pretrained`
    is a file in deeplab-pytorch's (Caffe-converted) format, whose weights expect BGR,
    mean-subtracted 0..255 input, and "imagenet" otherwise."""
    local = isinstance(pretrained, str) and pretrained.lower() not in ("true", "false")
    base = DeepLabV2(backbone, num_classes=num_classes, pretrained=False if local else pretrained,
                     rates=tuple(rates), dilate_first_block=dilate_first_block, freeze_bn=freeze_bn)
    caffe_file = False
    if local:
        state = read_state_dict(pretrained, "DeepLab checkpoint")
        caffe_file = is_reference_format(state)
        load_deeplab_checkpoint(base, pretrained, state)
    if input_norm == "auto":
        input_norm = "caffe_bgr" if caffe_file else "imagenet"
        if caffe_file:
            log.info("DeepLab input: BGR minus the Caffe mean, as %s expects (train_deeplab.input_norm)", pretrained)
    model = MSC(base, scales=tuple(msc_scales))
    model.input_norm = input_norm
    return model
