"""A timm ViT/DeiT as the encoder of the single-stage methods (ToCo, FSR, TSD-CAM).

Why a wrapper rather than timm's `forward_features`: these methods need, from one
forward pass,
- the final (LayerNormed) patch tokens as a 2-D map, for the CAM and the seg head;
- the *raw* output of an intermediate block (ToCo's `aux_layer=-3`, i.e. block 10 of
  12), without the final norm, for the auxiliary CAM (toco.md §1.2);
- the class token after the final norm, for ToCo's class-token contrast;
- optionally each block's attention matrix;
and they feed crops of any size (448 training crops, 96 local crops, 0.5x/1.5x
multi-scale copies), so the position embedding is resized on every forward.

Position embedding: the pretrained grid is resized bicubically
(align_corners=False) to the current token grid by timm's `resample_abs_pos_embed`,
with **no antialias** by default, as ToCo's own `F.interpolate` call does (timm's
default antialias=True changes the 6x6 grid of a 96-px crop). ToCo keeps the
position embedding frozen; `pos_embed_trainable` says whether ours is.

Input sizes need not be multiples of the patch: the patch conv floors, as in ToCo
(a 500x375 image gives 31x23 tokens).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from timm.layers import Attention, resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from net.vit_cam import block_forward_with_attention
from net.backbone import create_timm_model
from pipeline.errors import PipelineError


class ViTFeatures(NamedTuple):
    """What one forward of `ViTBackbone` gives."""
    patch: Tensor
    """(B, D, h, w) patch tokens after the final norm."""
    aux: Tensor
    """(B, D, h, w) patch tokens output by block `aux_layer`, before any final norm."""
    cls_token: Tensor
    """(B, D) class token after the final norm."""
    attn: list[Tensor] | None
    """Per block, the attention (B, heads, N, N) after softmax (N counts the prefix
    tokens); None unless `return_attn=True`."""


class ConvStem(nn.Module):
    """A convolutional patch embedding ("early convolutions", Xiao et al. 2021) for a
    random-init ViT that must learn from little data (the CPU demos): log2(patch) 3x3 stride-2
    convolutions with BatchNorm and ReLU, widening to dim/2, then a 1x1 convolution to `dim`.
    Input sides must be multiples of `patch` (ViTBackbone crops them so)."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        if patch < 2 or patch & (patch - 1):
            raise PipelineError(f"conv_stem needs a power-of-two patch size, got {patch}")
        layers: list[nn.Module] = []
        channels, steps = in_channels, patch.bit_length() - 1
        for i in range(steps):
            out = max(8, dim // 2 ** (steps - i))
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            channels = out
        layers.append(nn.Conv2d(channels, dim, 1))
        self.layers = nn.Sequential(*layers)
        self.in_channels = in_channels

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


class ViTBackbone(nn.Module):
    """A timm VisionTransformer that returns `ViTFeatures` for inputs of any size.

    `name`, `pretrained` and `**timm_kwargs` go to `net.backbone.create_timm_model`
    (so `pretrained` may be True, False or a local weights path, and e.g.
    `patch_size=8, depth=2, embed_dim=64` build a tiny test model). `img_size` sets the
    native position-embedding grid (img_size / patch). `aux_layer` indexes the blocks,
    negative from the end (-3 = ToCo's block 10 of 12). `conv_stem` replaces the patch
    convolution by a small convolutional stem of the same stride (ConvStem; demos only).
    """

    def __init__(
        self,
        name: str = "vit_base_patch16_224.orig_in21k_ft_in1k",
        pretrained: bool | str = False,
        aux_layer: int = -3,
        pos_embed_trainable: bool = False,
        img_size: int | tuple[int, int] | None = None,
        pos_embed_antialias: bool = False,
        conv_stem: bool = False,
        **timm_kwargs,
    ):
        super().__init__()
        if img_size is not None:
            timm_kwargs["img_size"] = img_size
        self.vit = create_timm_model(name, pretrained, num_classes=0, **timm_kwargs)
        vit = self.vit
        if not isinstance(vit, VisionTransformer):
            raise PipelineError(f"{name!r} is not a timm VisionTransformer; ViTBackbone needs one")
        if vit.cls_token is None:
            raise PipelineError(f"{name!r} has no class token; ViTBackbone returns one")
        if vit.pos_embed is None:
            raise PipelineError(f"{name!r} has no absolute position embedding to resize")
        patch_h, patch_w = vit.patch_embed.patch_size
        if patch_h != patch_w:
            raise PipelineError(f"{name!r} has non-square patches {patch_h}x{patch_w}")
        depth = len(vit.blocks)
        if not -depth <= aux_layer < depth:
            raise PipelineError(
                f"aux_layer {aux_layer} is out of range for {name!r}, which has {depth} blocks "
                f"(valid: {-depth}..{depth - 1})")
        for i, block in enumerate(vit.blocks):
            if type(block) is not Block or type(block.attn) is not Attention:
                raise PipelineError(
                    f"{name!r} block {i} is {type(block).__name__}: ViTBackbone computes attention "
                    "explicitly only for timm's plain Block/Attention")
        vit.pos_embed.requires_grad_(pos_embed_trainable)
        if conv_stem:
            vit.patch_embed.proj = ConvStem(vit.patch_embed.proj.in_channels, vit.embed_dim, patch_h)
        self.aux_index = aux_layer % depth
        self.patch_size: int = patch_h
        self.embed_dim: int = vit.embed_dim
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.pos_embed_antialias = pos_embed_antialias

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid of an input of `height` x `width` pixels (the patch conv floors)."""
        return height // self.patch_size, width // self.patch_size

    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """The position embedding (1, prefix + h*w or h*w, D) for a token grid `grid`."""
        vit = self.vit
        return resample_abs_pos_embed(
            vit.pos_embed,
            new_size=list(grid),
            old_size=list(vit.patch_embed.grid_size),
            num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens,
            interpolation="bicubic",
            antialias=self.pos_embed_antialias,
        )

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images (B, 3, H, W) -> (tokens (B, prefix + h*w, D) entering block 0, (h, w))."""
        vit = self.vit
        # The patch conv is called directly: timm's PatchEmbed asserts the size, ToCo floors.
        if isinstance(vit.patch_embed.proj, ConvStem):
            h, w = self.grid_size(*images.shape[-2:])
            images = images[..., :h * self.patch_size, :w * self.patch_size]     # the same floor
        patches = vit.patch_embed.proj(images)
        grid = (patches.shape[2], patches.shape[3])
        patches = vit.patch_embed.norm(patches.flatten(2).transpose(1, 2))
        prefix = [vit.cls_token.expand(len(images), -1, -1)]
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(len(images), -1, -1))
        pos_embed = self.position_embedding(grid)
        if vit.no_embed_class:
            tokens = torch.cat(prefix + [patches + pos_embed], dim=1)
        else:
            tokens = torch.cat(prefix + [patches], dim=1) + pos_embed
        tokens = vit.norm_pre(vit.patch_drop(vit.pos_drop(tokens)))
        return tokens, grid

    def _to_map(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        patches = tokens[:, self.num_prefix_tokens:]
        return patches.transpose(1, 2).reshape(len(tokens), -1, *grid)

    def forward(self, images: Tensor, return_attn: bool = False) -> ViTFeatures:
        tokens, grid = self.embed(images)
        attn: list[Tensor] | None = [] if return_attn else None
        aux_tokens = None
        for index, block in enumerate(self.vit.blocks):
            if attn is None:
                tokens = block(tokens)
            else:
                tokens, weights = block_forward_with_attention(block, tokens)
                attn.append(weights)
            if index == self.aux_index:
                aux_tokens = tokens
        normed = self.vit.norm(tokens)
        if self.aux_index == self.depth - 1:
            # ToCo replaces its list's last entry by the normed tokens, so aux_layer=-1
            # there means the final normed tokens; follow it.
            aux_tokens = normed
        return ViTFeatures(
            patch=self._to_map(normed, grid),
            aux=self._to_map(aux_tokens, grid),
            cls_token=normed[:, 0],
            attn=attn,
        )
