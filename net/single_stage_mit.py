"""The single-stage network of AFA (CVPR 2022) and TSCD (AAAI 2023): a SegFormer MiT encoder
with three heads (afa.md §2, tscd.md §2).

    net = SingleStageMiT(variant="b1", num_classes=20, symmetrize=True)     # AFA; TSCD: False
    out = net(images)          # MiTOutput: logits, cams, seg, patch, affinity, ...
    cams, _ = net.cam_pair(images)          # raw stage-4 CAMs for the multi-scale engine
    affinity, grid = net.affinity(images)   # the affinity head alone (AFA's label propagation)

- **Encoder**: MiT (net/mit.py) with strides (4, 2, 2, 1), so stage 4 runs at output stride 16;
  every block returns its attention logits (q·kᵀ, unscaled, before the softmax).
- **CAM head**: a bias-free 1x1 conv on the stage-4 map after global max pooling (`CamHead`);
  the same conv applied densely gives the CAM.
- **Segmentation head**: SegFormer's all-MLP decoder. Each stage map goes through a linear layer
  to `decoder_dim` channels; stages 2-4 are upsampled bilinearly (align_corners=False) to the
  stage-1 grid (stride 4); the four are concatenated in the order c4, c3, c2, c1, fused by a
  bias-free 1x1 conv + BatchNorm + ReLU (mmcv's ConvModule in the reference; SyncBN when the
  process group is up), dropped out (Dropout2d 0.1) and classified by a 1x1 conv with bias.
- **Affinity head** ("AFA"): the attention logits of the blocks of the last stage (2 blocks x 8
  heads = 16 maps of N x N for MiT-B1, N = tokens of the stride-16 grid) are concatenated,
  symmetrised (A + Aᵀ) when `symmetrize` (AFA; TSCD drops it), mixed by a 1x1 conv with bias
  (weight Kaiming-normal, a = sqrt(5), fan_out) and squashed by a sigmoid: P in (0, 1)^{N x N}.
  Its gradient reaches the stage-4 query and key projections.

The output keeps the field names the engine's loss terms read (engine/terms.py: `logits`, `seg`,
`patch`); there is no auxiliary classifier (`aux_logits`, `aux_cams` are None, and `cam_pair`
returns the main CAM twice so that make_cam's "aux" maps exist).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from net.heads import CamHead
from net.registry import register_model
from pipeline.errors import PipelineError


class MiTOutput(NamedTuple):
    logits: Tensor                  # (B, C) classifier on the max-pooled stage-4 map
    aux_logits: Tensor | None       # None: no auxiliary classifier
    cams: Tensor                    # (B, C, h, w) raw CAMs at stride 16
    aux_cams: Tensor | None
    seg: Tensor                     # (B, C + 1, H/4, W/4) segmentation logits at stride 4
    patch: Tensor                   # (B, D4, h, w) stage-4 features (after the stage's norm)
    cls_token: Tensor | None = None
    view_cls: Tensor | None = None
    projected: Tensor | None = None
    affinity: Tensor | None = None  # (B, h*w, h*w) the affinity head's sigmoid output
    attns: list | None = None       # per-block attention logits, stage 1 first
    view_seg: list | None = None    # segmentation logits of extra views (TSCD's second view, SCD)


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder: 4 stage maps -> logits (B, num_classes, H1, W1) at the stage-1
    grid. Parameter names follow the SegFormer release (`linear_c{i}.proj`, `linear_fuse`,
    `linear_pred`)."""

    def __init__(self, in_channels, embedding_dim: int = 256, num_classes: int = 21, dropout: float = 0.1):
        super().__init__()
        if len(in_channels) != 4:
            raise PipelineError(f"SegFormer head: expected 4 stage widths, got {list(in_channels)}")
        for i, channels in enumerate(in_channels, start=1):
            layer = nn.Module()
            layer.proj = nn.Linear(int(channels), embedding_dim)
            setattr(self, f"linear_c{i}", layer)
        self.linear_fuse = nn.Sequential(nn.Conv2d(4 * embedding_dim, embedding_dim, 1, bias=False),
                                         nn.BatchNorm2d(embedding_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embedding_dim, num_classes, 1)

    def embed(self, index: int, x: Tensor) -> Tensor:
        """Stage map (B, C, h, w) -> (B, E, h, w) through the stage's linear layer."""
        b, _, h, w = x.shape
        tokens = getattr(self, f"linear_c{index}").proj(x.flatten(2).transpose(1, 2))
        return tokens.transpose(1, 2).reshape(b, -1, h, w)

    def forward(self, features: list[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        maps = []
        for index in (4, 3, 2, 1):                       # the reference's concatenation order
            x = self.embed(index, features[index - 1])
            if index != 1:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            maps.append(x)
        return self.linear_pred(self.dropout(self.linear_fuse(torch.cat(maps, dim=1))))


class AttentionAffinityHead(nn.Module):
    """Attention logits of the last stage's blocks -> affinity P (B, N, N) in (0, 1).

    forward(attns: list of (B, heads, N, N)) -> sigmoid(conv1x1(cat(attns) [+ transpose])).
    """

    def __init__(self, in_maps: int, symmetrize: bool = True):
        super().__init__()
        self.symmetrize = bool(symmetrize)
        self.proj = nn.Conv2d(in_maps, 1, kernel_size=1, bias=True)
        nn.init.kaiming_normal_(self.proj.weight, a=math.sqrt(5), mode="fan_out")

    def forward(self, attns: list[Tensor]) -> Tensor:
        stacked = torch.cat(attns, dim=1)
        if stacked.shape[-1] != stacked.shape[-2]:
            raise PipelineError("affinity head: the attention maps are not square (the last MiT stage needs "
                                "sr_ratio 1)")
        if self.symmetrize:
            stacked = stacked + stacked.transpose(-1, -2)
        return torch.sigmoid(self.proj(stacked))[:, 0]


@register_model("single_stage_mit")
class SingleStageMiT(nn.Module):
    """AFA / TSCD's network; see the module docstring. `mit_overrides` go to `net.mit.mit`
    (drop_path_rate, or embed_dims / depths / num_heads / sr_ratios of a tiny demo model)."""
    single_stage = True     # a network that train_net trains (net/registry.single_stage_kinds)

    def __init__(self, variant: str = "b1", num_classes: int = 20, pretrained: bool | str = False,
                 strides=(4, 2, 2, 1), decoder_dim: int = 256, decoder_dropout: float = 0.1, pool: str = "gmp",
                 symmetrize: bool = True, affinity_blocks: int = 0, seg_align_corners: bool = False,
                 sync_bn: bool = True, **mit_overrides):
        super().__init__()
        from net.mit import mit

        self.encoder = mit(variant, strides=tuple(strides), pretrained=pretrained, **mit_overrides)
        dims = self.encoder.embed_dims
        last_depth = self.encoder.depths[-1]
        if not 0 <= affinity_blocks <= last_depth:
            raise PipelineError(f"train_net.aff.blocks: {affinity_blocks} blocks of a last stage with {last_depth}")
        self.affinity_blocks = affinity_blocks or last_depth
        self.classifier = CamHead(dims[-1], num_classes, pool=pool)
        self.decoder = SegFormerHead(dims, decoder_dim, num_classes + 1, decoder_dropout)
        self.attn_proj = AttentionAffinityHead(self.encoder.num_heads[-1] * self.affinity_blocks, symmetrize)
        # the engine upsamples the segmentation logits to the crop with this flag (TSCD: True)
        self.seg_align_corners = bool(seg_align_corners)
        self.num_classes = num_classes
        if (sync_bn and torch.cuda.is_available() and torch.distributed.is_available()
                and torch.distributed.is_initialized()):    # SyncBN needs CUDA tensors
            self.decoder = nn.SyncBatchNorm.convert_sync_batchnorm(self.decoder)

    @classmethod
    def args_from_config(cls, section, num_classes: int) -> dict:
        """The model arguments of a train_net section: `backbone` (mit_b0..mit_b5), `pretrained`,
        `mit` (strides, decoder, pooling), `aff` (symmetrize, blocks), `model_kwargs` (MiT overrides)."""
        losses = section.losses
        for name, why in (("cls_aux", "auxiliary classifier"), ("ctc", "class token"),
                          ("ptc", "ViT patch tokens (use aff, the attention affinity loss)")):
            if getattr(losses, name).weight > 0:
                raise PipelineError(f"train_net.losses.{name}: the single_stage_mit network has no {why}; "
                                    f"set its weight to 0")
        m = section.mit
        return {"variant": section.backbone, "num_classes": num_classes, "pretrained": section.pretrained,
                "strides": list(m.strides), "decoder_dim": m.decoder_dim, "decoder_dropout": m.decoder_dropout,
                "pool": m.pool, "symmetrize": section.aff.symmetrize, "affinity_blocks": section.aff.blocks,
                "seg_align_corners": m.seg_align_corners, "sync_bn": m.sync_bn, **section.model_kwargs}

    # -- forward paths ---------------------------------------------------------------------
    def affinity_from(self, attns: list[Tensor]) -> Tensor:
        """The affinity head on the last `affinity_blocks` blocks' attention logits."""
        return self.attn_proj(attns[-self.affinity_blocks:])

    def forward(self, images: Tensor, seg_views: list[Tensor] | None = None) -> MiTOutput:
        """One forward of every head. `seg_views`: more inputs (any size) whose segmentation
        logits (stride 4) come back in `view_seg`, with gradient (TSCD's 0.3x view); inside the
        forward so that DDP sees them."""
        features, attns = self.encoder(images, attn_blocks=True)
        logits, cams = self.classifier(features[-1])
        view_seg = [self.segment(view) for view in seg_views] if seg_views else None
        return MiTOutput(logits, None, cams, None, self.decoder(features), features[-1],
                         affinity=self.affinity_from(attns), attns=attns, view_seg=view_seg)

    def cam_pair(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(raw CAMs, the same CAMs) at stride 16: the multi-scale engine's `cam_fn` (no aux head)."""
        features, _ = self.encoder(images)
        cams = self.classifier.cam(features[-1])
        return cams, cams

    def affinity(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(P (B, N, N), the stride-16 grid (h, w) it is laid out on) without the other heads."""
        features, attns = self.encoder(images, attn_blocks=True)
        return self.affinity_from(attns), tuple(features[-1].shape[-2:])

    def segment(self, images: Tensor) -> Tensor:
        """Segmentation logits (B, C + 1, h, w) at stride 4 (inference)."""
        return self.decoder(self.encoder(images)[0])

    @property
    def patch_size(self) -> int:
        """Input pixels per cell of the CAM grid (the product of the encoder's strides)."""
        return int(math.prod(self.encoder.strides))

    @property
    def min_input_size(self) -> int:
        """The smallest input side the encoder takes: every stage's token grid must cover its
        spatial-reduction ratio (32 px for the usual layouts)."""
        enc, size = self.encoder, 1
        for i, sr in enumerate(enc.sr_ratios):
            size = max(size, int(math.prod(enc.strides[:i + 1])) * (sr if sr > 1 else 1))
        return size

    # -- optimiser -------------------------------------------------------------------------
    def named_groups(self) -> dict[str, list[nn.Parameter]]:
        """AFA's four parameter groups (afa.md §6): encoder weights; every encoder parameter whose
        name contains "norm" (all LayerNorms); classifier + affinity projection; decoder."""
        encoder = [p for n, p in self.encoder.named_parameters() if "norm" not in n]
        norms = [p for n, p in self.encoder.named_parameters() if "norm" in n]
        heads = list(self.classifier.parameters()) + list(self.attn_proj.parameters())
        return {"encoder": encoder, "encoder_norm": norms, "heads": heads, "decoder": list(self.decoder.parameters())}

    def optimizer_groups(self, section) -> list[dict]:
        """AdamW groups with their lr multipliers: encoder 1, norms `mit.norm_lr_mult` (AFA/TSCD: 0,
        frozen) with weight decay `mit.norm_weight_decay` (0), heads and decoder `head_lr_mult` (10)."""
        g, m = self.named_groups(), section.mit
        groups = [{"params": g["encoder"], "lr_mult": 1.0, "name": "encoder"},
                  {"params": g["encoder_norm"], "lr_mult": m.norm_lr_mult, "weight_decay": m.norm_weight_decay,
                   "name": "encoder_norm"},
                  {"params": g["heads"], "lr_mult": section.head_lr_mult, "name": "heads"},
                  {"params": g["decoder"], "lr_mult": section.head_lr_mult, "name": "decoder"}]
        return [group for group in groups if group["params"]]

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(encoder parameters, new heads), the two-group interface of the ViT network."""
        g = self.named_groups()
        return g["encoder"] + g["encoder_norm"], g["heads"] + g["decoder"]
