"""CNN branch of CRT: a timm ResNet at output stride 16 with a bias-free 1x1
classifier whose output is the class activation map (IRNet's `resnet50_cam`).

Training recipe carried over from IRNet / CRT:
- BatchNorm always normalises with its running statistics (`train()` keeps every
  BatchNorm module in eval mode).
- The stem, layer1 and layer2 never learn: the features are detached after
  layer2, so no gradient reaches them. We also mark them `requires_grad=False`,
  because DDP refuses parameters that require a gradient and never get one.
- Logits are the spatial mean of the raw CAM, which equals IRNet's
  classifier(global average of the features) since the classifier is linear.

`freeze_bn=False` and `freeze_early_stages=False` train every layer and the
BatchNorm statistics: only for random-init backbones (the CPU demo), where frozen
random statistics and frozen random early stages leave little to learn with.

Two points where the reference code differs from timm's defaults are options:
- `bn_affine_trainable`: the reference (IRNet/CRT `FixedBatchNorm`) freezes the
  running statistics of every BatchNorm but trains the affine weight and bias of
  layer3 / layer4 (only the stem's `bn1` is excluded). False (default) freezes
  them as well; True reproduces the reference.
- `dilate_last_stage`: timm reaches output stride 16 by dilating layer4 (rate
  2), which keeps layer4's receptive field as in ImageNet pre-training. The
  reference (`strides=(2, 2, 2, 1)`) only removes layer4's stride, without
  dilation. True (default) is timm's; False reproduces the reference.
"""
from __future__ import annotations

from timm.layers import AvgPool2dSame
from torch import Tensor, nn

from net.backbone import create_timm_model
from net.registry import register_model
from pipeline.errors import PipelineError

_STEM = ("conv1", "bn1", "act1", "maxpool")
_STAGES = ("layer1", "layer2", "layer3", "layer4")


@register_model("resnet_cam")
class ResNetCAM(nn.Module):
    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 20,
        pretrained: bool | str = False,
        output_stride: int = 16,
        bn_affine_trainable: bool = False,
        dilate_last_stage: bool = True,
        freeze_bn: bool = True,
        freeze_early_stages: bool = True,
    ):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise PipelineError(f"ResNetCAM output_stride must be 8, 16 or 32, got {output_stride}")
        if not dilate_last_stage and output_stride != 16:
            raise PipelineError("ResNetCAM dilate_last_stage=False is only defined for output_stride 16")
        self.backbone = create_timm_model(backbone, pretrained, num_classes=0, output_stride=output_stride)
        missing = [name for name in _STEM + _STAGES if not hasattr(self.backbone, name)]
        if missing:
            raise PipelineError(f"{backbone!r} is not a timm ResNet (no {', '.join(missing)}); ResNetCAM needs one")
        if not dilate_last_stage:
            _undilate(self.backbone.layer4)
        self.output_stride = output_stride
        self.classifier = nn.Conv2d(self.backbone.num_features, num_classes, kernel_size=1, bias=False)

        self.freeze_bn, self.freeze_early_stages = freeze_bn, freeze_early_stages
        frozen = [getattr(self.backbone, name) for name in _STEM + ("layer1", "layer2")] if freeze_early_stages else []
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        if freeze_bn and not bn_affine_trainable:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    for p in module.parameters():
                        p.requires_grad_(False)
        self.train()

    def features(self, x: Tensor, stop_gradient: bool = True) -> Tensor:
        """Last-stage features (B, F, ceil(H/s), ceil(W/s)) at the output stride s."""
        b = self.backbone
        x = b.maxpool(b.act1(b.bn1(b.conv1(x))))
        x = b.layer2(b.layer1(x))
        if stop_gradient and self.freeze_early_stages:
            x = x.detach()
        return b.layer4(b.layer3(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (logits (B, C), raw CAM (B, C, h, w)); logits = spatial mean of the CAM."""
        cam = self.classifier(self.features(x))
        return cam.mean(dim=(2, 3)), cam

    def cam(self, x: Tensor) -> Tensor:
        """Raw CAM (B, C, h, w) for inference; the caller applies the ReLU."""
        return self.classifier(self.features(x, stop_gradient=False))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trainable backbone parameters, new head parameters): the two learning-rate groups."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for p in self.classifier.parameters() if p.requires_grad]
        return backbone, head

    def train(self, mode: bool = True) -> "ResNetCAM":
        super().train(mode)
        if not self.freeze_bn:
            return self
        for module in self.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


def _undilate(stage: nn.Module) -> None:
    """Turn a stage that timm dilated (stride 1, rate 2) into a plain stride-1 stage."""
    for name, module in list(stage.named_modules()):
        if isinstance(module, nn.Conv2d) and module.dilation != (1, 1):
            module.dilation = (1, 1)
            module.padding = tuple((k - 1) // 2 for k in module.kernel_size)
        elif isinstance(module, AvgPool2dSame):
            # timm's average-pool shortcut (resnet*d, resnet*t): with neither stride
            # nor dilation timm builds no pool at all.
            parent_name, _, child = name.rpartition(".")
            setattr(stage.get_submodule(parent_name) if parent_name else stage, child, nn.Identity())
