"""The single-stage network of ToCo (and FSR / TSD-CAM, which share it): a ViT with a CAM head
on the final patch tokens, an auxiliary CAM head on an intermediate block's raw tokens, a
LargeFOV segmentation head on the final tokens and, for the token-contrast losses, a
projection head on the class token (toco.md §1).

    net = SingleStageNet(backbone="vit_base_patch16_224.orig_in21k_ft_in1k", num_classes=20)
    out = net(images)              # SingleStageOutput: logits, aux_logits, cams, aux_cams, seg, ...
    cams, aux_cams = net.cam_pair(images)    # raw CAMs for the multi-scale engine
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from net.heads import CamHead, LargeFOVHead
from net.registry import register_model
from net.vit_backbone import ViTBackbone


class SingleStageOutput(NamedTuple):
    logits: Tensor          # (B, C) main classifier, global max pooling
    aux_logits: Tensor      # (B, C) auxiliary classifier
    cams: Tensor            # (B, C, h, w) raw CAMs of the final tokens
    aux_cams: Tensor        # (B, C, h, w) raw CAMs of the aux tokens
    seg: Tensor             # (B, C + 1, h, w) segmentation logits at the token grid
    patch: Tensor           # (B, D, h, w) final patch tokens (after the last norm)
    cls_token: Tensor       # (B, D)
    view_cls: Tensor | None = None    # (B, V, D) class tokens of the input and the extra views (CTC)
    projected: Tensor | None = None   # (B, V, P) the projection head on them
    view_seg: list[Tensor] | None = None   # seg logits (B, C + 1, h', w') of each of `seg_views` (SCD)


@register_model("single_stage_vit")
class SingleStageNet(nn.Module):
    single_stage = True     # a network that train_net trains (net/registry.single_stage_kinds)

    def __init__(self, backbone: str = "vit_base_patch16_224.orig_in21k_ft_in1k", num_classes: int = 20,
                 pretrained: bool | str = False, aux_layer: int = -3, pos_embed_trainable: bool = False,
                 seg_hidden: int = 512, seg_dilation: int = 5, projection: dict | None = None,
                 projection_momentum: float = 0.9, **model_kwargs):
        super().__init__()
        self.backbone = ViTBackbone(backbone, pretrained, aux_layer=aux_layer,
                                    pos_embed_trainable=pos_embed_trainable, **model_kwargs)
        dim = self.backbone.embed_dim
        self.classifier = CamHead(dim, num_classes, pool="gmp")
        self.aux_classifier = CamHead(dim, num_classes, pool="gmp")
        self.seg_head = LargeFOVHead(dim, num_classes + 1, hidden_channels=seg_hidden, dilation=seg_dilation)
        self.projection = self.teacher_projection = None
        if projection:
            from engine.ema import EMA
            from net.proj_head import ProjectionHead

            self.projection = ProjectionHead(dim, **projection)
            # ToCo's teacher: the same encoder with stop-gradient and an EMA copy of this head
            self.teacher_projection = EMA(self.projection, projection_momentum)
        self.num_classes = num_classes

    def forward(self, images: Tensor, views: list[Tensor] | None = None,
                seg_views: list[Tensor] | None = None) -> SingleStageOutput:
        """`views`: more inputs (each (B, 3, h, w), any size) whose class tokens go, after the
        input's own, through the projection head: `projected` (B, 1 + Σ views per image, P),
        view-major within each image (CTC's student). `seg_views`: more inputs whose segmentation
        logits come back in `view_seg` (the SCD term's second view, engine/scd.py). Both inside
        forward, so that DDP sees them."""
        features = self.backbone(images)
        logits, cams = self.classifier(features.patch)
        aux_logits, aux_cams = self.aux_classifier(features.aux)
        view_cls = projected = None
        if views:
            if self.projection is None:
                raise ValueError("views given to a network built without a projection head")
            view_cls = torch.cat([features.cls_token[:, None]] + [self.view_tokens(v, len(images)) for v in views], 1)
            projected = self.projection(view_cls)
        view_seg = [self.segment(view) for view in seg_views] if seg_views else None
        return SingleStageOutput(logits, aux_logits, cams, aux_cams, self.seg_head(features.patch),
                                 features.patch, features.cls_token, view_cls, projected, view_seg)

    def view_tokens(self, view: Tensor, batch: int) -> Tensor:
        """Class tokens (B, n, D) of a view batch laid out image-major (B * n, 3, h, w)."""
        return self.backbone(view).cls_token.reshape(batch, -1, self.backbone.embed_dim)

    @property
    def patch_size(self) -> int:
        """Input pixels per token (the stride of the CAM grid)."""
        return self.backbone.patch_size

    def cam_pair(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(raw CAMs, raw aux CAMs) at the token grid: the multi-scale engine's `cam_fn`."""
        features = self.backbone(images)
        return self.classifier.cam(features.patch), self.aux_classifier.cam(features.aux)

    def segment(self, images: Tensor) -> Tensor:
        """Segmentation logits (B, C + 1, h, w) at the token grid (inference)."""
        return self.seg_head(self.backbone(images).patch)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(encoder parameters, new heads): the reference trains the heads at 10x the lr."""
        encoder = [p for p in self.backbone.parameters() if p.requires_grad]
        heads = [p for module in (self.classifier, self.aux_classifier, self.seg_head, self.projection)
                 if module is not None for p in module.parameters() if p.requires_grad]
        return encoder, heads


@torch.no_grad()
def multiscale_seg_logits(model: SingleStageNet, images: Tensor, scales, flip_fuse: str = "sum",
                          scale_fuse: str = "max") -> Tensor:
    """The papers' segmentation inference: per scale, the segmentation logits of the image and
    its mirror image, upsampled to the input size and fused (`flip_fuse`: the mirror's map
    flipped back and summed, ToCo VOC, maxed, ToCo COCO, or averaged, AFA / TSCD); then the scales fused (`scale_fuse`:
    element-wise max, VOC, or sum, COCO). images (B, 3, H, W) -> logits (B, C + 1, H, W)."""
    height, width = images.shape[-2:]
    fused = None
    for scale in scales:
        size = (max(1, int(height * scale)), max(1, int(width * scale)))
        x = images if size == (height, width) else F.interpolate(images, size=size, mode="bilinear",
                                                                align_corners=False)
        logits = model.segment(torch.cat([x, x.flip(-1)]))
        logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
        own, mirrored = logits[:len(images)], logits[len(images):].flip(-1)
        if flip_fuse == "max":
            at_scale = torch.maximum(own, mirrored)
        else:
            at_scale = own + mirrored if flip_fuse == "sum" else (own + mirrored) / 2
        if fused is None:
            fused = at_scale
        else:
            fused = torch.maximum(fused, at_scale) if scale_fuse == "max" else fused + at_scale
    return fused


@torch.no_grad()
def segment_image(model, image: np.ndarray, inference, mean, std, device) -> tuple[torch.Tensor, np.ndarray]:
    """(stride-4 logits (C+1, ⌈H/4⌉, ⌈W/4⌉), full-resolution label ids (H, W)) of one uint8 image,
    with `inference` (scales, flip_fuse, scale_fuse, resize_to) as the config's SegInferenceConfig."""
    from pipeline.transforms import normalize, to_tensor

    h, w = image.shape[:2]
    x = to_tensor(normalize(image, mean, std))[None].to(device)
    if inference.resize_to:
        x = F.interpolate(x, size=(inference.resize_to, inference.resize_to), mode="bilinear", align_corners=False)
    logits = multiscale_seg_logits(model, x, inference.scales, inference.flip_fuse, inference.scale_fuse)
    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0]
    small = F.interpolate(logits[None], size=(-(-h // 4), -(-w // 4)), mode="bilinear", align_corners=False)[0]
    return small, logits.argmax(0).cpu().numpy().astype(np.uint8)
