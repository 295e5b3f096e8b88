"""Transformer branch of CRT (TS-CAM style): a timm ViT run on overlapping windows,
with its block stack applied several times, and a 3x3 conv head on the patch
tokens that gives one feature map per class.

Windows. The image is zero-padded at the bottom/right (`window_padding`: "minimal" to the
next multiple of window/2, "reference" as CRT's code, one half window more when a side is
already a multiple; at least one window); windows of side `window` are cut at
stride window/2 and all go through the ViT in one batch. The per-window class
maps are put back on the padded patch grid, averaged where windows overlap
(1, 2 or 4 windows cover a cell), and cropped to ceil(H/p) x ceil(W/p). The
tiling and merging are the pure functions `window_layout`, `tile_windows`,
`merge_windows` and `overlap_counts`.

Recurrence. CRT's released code (huodongjian0603/crt, net/deit_cam.py,
`TSCAM.forward_features`) runs the 12 blocks three times as
`for i in range(3): x = x + blocks(x)`, so the outer residual applies to the
first pass as well: x1 = x0 + blocks(x0), where x0 is the embedded input. With
a single pass that is not a plain ViT. Here the first pass is plain,
x1 = blocks(x0), and every later pass is x_{r+1} = x_r + blocks(x_r), so that
`recurrence=1` is exactly timm's ViT. `residual_first_pass=True` gives the
released code's behaviour (and is what its checkpoints were trained with). The
final norm runs once, after the last pass, as in the released code.

Semantic-aware CAM (CRT's CAM, `semantic_cam`). Per window, the class token's
attention to the patch tokens, averaged over heads and summed over every block
application (depth x recurrence), multiplies each class's map; the products are
merged like the maps, cropped, and ReLU'd. timm's fused attention does not
return the attention matrix, so that path recomputes each block explicitly from
the block's own modules (`block_forward_with_attention`); the training forward
keeps timm's (fused, memory-lean) block forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from net.backbone import create_timm_model
from net.registry import register_model
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class WindowLayout:
    """Where the windows of an image of `height` x `width` pixels go."""
    height: int
    width: int
    window: int
    padded_height: int
    padded_width: int
    rows: int
    cols: int

    @property
    def stride(self) -> int:
        return self.window // 2

    @property
    def count(self) -> int:
        return self.rows * self.cols


def padded_side(side: int, window: int, padding: str = "reference") -> int:
    """The padded length of one side. "minimal": the next multiple of window/2; "reference" (CRT's
    code): (side // (window/2) + 1) × window/2, so a side that is already a multiple still gets a
    full extra half window. Both at least one window."""
    half = window // 2
    if padding == "reference":
        return max(window, (side // half + 1) * half)
    if padding == "minimal":
        return max(window, math.ceil(side / half) * half)
    raise PipelineError(f"window padding must be 'reference' or 'minimal', got {padding!r}")


def window_layout(height: int, width: int, window: int, padding: str = "minimal") -> WindowLayout:
    """Pad each side (see `padded_side`); count the windows of stride window/2."""
    if window < 2 or window % 2:
        raise PipelineError(f"window size must be an even number of pixels, got {window}")
    if height < 1 or width < 1:
        raise PipelineError(f"empty image: {height}x{width}")
    half = window // 2
    padded_height = padded_side(height, window, padding)
    padded_width = padded_side(width, window, padding)
    return WindowLayout(
        height, width, window, padded_height, padded_width,
        rows=(padded_height - window) // half + 1, cols=(padded_width - window) // half + 1,
    )


def tile_windows(images: Tensor, layout: WindowLayout) -> Tensor:
    """(B, C, H, W) -> (B * rows * cols, C, window, window); image-major, then row-major windows."""
    b, c, h, w = images.shape
    if (h, w) != (layout.height, layout.width):
        raise ValueError(f"layout is for {layout.height}x{layout.width} images, got {h}x{w}")
    padded = F.pad(images, (0, layout.padded_width - w, 0, layout.padded_height - h))
    windows = padded.unfold(2, layout.window, layout.stride).unfold(3, layout.window, layout.stride)
    # (B, C, rows, cols, window, window) -> (B, rows, cols, C, window, window)
    windows = windows.permute(0, 2, 3, 1, 4, 5)
    return windows.reshape(b * layout.count, c, layout.window, layout.window)


def _grid_geometry(layout: WindowLayout, cell: int) -> tuple[int, int, int, int]:
    if layout.stride % cell:
        raise ValueError(f"window stride {layout.stride} is not a multiple of the cell size {cell}")
    return layout.padded_height // cell, layout.padded_width // cell, layout.window // cell, layout.stride // cell


def merge_windows(maps: Tensor, layout: WindowLayout, cell: int) -> Tensor:
    """Put per-window maps (B * rows * cols, K, window/cell, window/cell) back on the
    padded grid (B, K, padded_height/cell, padded_width/cell), averaging overlaps."""
    grid_h, grid_w, size, stride = _grid_geometry(layout, cell)
    n, k, h, w = maps.shape
    if (h, w) != (size, size) or n % layout.count:
        raise ValueError(f"expected (B*{layout.count}, K, {size}, {size}) window maps, got {tuple(maps.shape)}")
    b = n // layout.count
    # fold sums overlapping blocks; its block order (row-major) and per-block layout
    # (channel, then row-major pixels) are those of unfold, i.e. of tile_windows.
    columns = maps.reshape(b, layout.count, k * size * size).transpose(1, 2)
    summed = F.fold(columns, (grid_h, grid_w), kernel_size=size, stride=stride)
    return summed / overlap_counts(layout, cell).to(summed)


def overlap_counts(layout: WindowLayout, cell: int) -> Tensor:
    """How many windows cover each cell of the padded grid: (padded_height/cell, padded_width/cell)."""
    grid_h, grid_w, size, stride = _grid_geometry(layout, cell)
    ones = torch.ones(1, size * size, layout.count)
    return F.fold(ones, (grid_h, grid_w), kernel_size=size, stride=stride)[0, 0]


def block_forward_with_attention(block: Block, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm `Block.forward` written out, also returning the attention (B, heads, N, N)
    (after softmax, before attention dropout)."""
    attn = block.attn
    h = block.norm1(x)
    b, n, _ = h.shape
    attn_dim = attn.num_heads * attn.head_dim
    q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (attn.attn_drop(weights) @ v).transpose(1, 2).reshape(b, n, attn_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(h).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    x = x + block.drop_path1(block.ls1(out))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, weights


@register_model("vit_cam")
class ViTCAM(nn.Module):
    def __init__(
        self,
        name: str = "deit_small_patch16_224",
        num_classes: int = 20,
        pretrained: bool | str = False,
        window: int = 224,
        recurrence: int = 3,
        residual_first_pass: bool = False,
        window_padding: str = "minimal",
        **model_kwargs,
    ):
        super().__init__()
        if recurrence < 1:
            raise PipelineError(f"ViTCAM recurrence must be >= 1, got {recurrence}")
        img_size = model_kwargs.pop("img_size", window)
        img_hw = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        if img_hw != (window, window):
            raise PipelineError(f"ViTCAM img_size {img_size} must equal the window size {window} (or be left out)")
        self.vit = create_timm_model(name, pretrained, img_size=window, num_classes=0, **model_kwargs)
        if not isinstance(self.vit, VisionTransformer):
            raise PipelineError(f"{name!r} is not a timm VisionTransformer; ViTCAM needs one")
        for i, block in enumerate(self.vit.blocks):
            if type(block) is not Block or type(block.attn) is not Attention:
                raise PipelineError(
                    f"{name!r} block {i} is {type(block).__name__}/{type(getattr(block, 'attn', None)).__name__}: "
                    "ViTCAM computes attention explicitly only for timm's plain Block/Attention")
        patch_h, patch_w = self.vit.patch_embed.patch_size
        if patch_h != patch_w:
            raise PipelineError(f"{name!r} has non-square patches {patch_h}x{patch_w}")
        if window % (2 * patch_h):
            raise PipelineError(f"window {window} must be a multiple of twice the patch size {patch_h}")
        self.patch_size: int = patch_h
        self.window = window
        self.recurrence = recurrence
        self.residual_first_pass = residual_first_pass
        padded_side(window, window, window_padding)      # an unknown name fails here, not at forward
        self.window_padding = window_padding
        self.head = nn.Conv2d(self.vit.embed_dim, num_classes, kernel_size=3, padding=1)

    def encode(self, windows: Tensor, on_attention: Callable[[Tensor], None] | None = None) -> Tensor:
        """Final-normed tokens (n, N, D) of windows (n, 3, window, window).

        With `on_attention`, blocks run through `block_forward_with_attention` and it
        is called with the attention (n, heads, N, N) of every block application,
        in order; without, timm's own (fused) block forward runs.
        """
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(windows))))
        for step in range(self.recurrence):
            y = x
            for block in vit.blocks:
                if on_attention is None:
                    y = block(y)
                else:
                    y, weights = block_forward_with_attention(block, y)
                    on_attention(weights)
            x = x + y if step > 0 or self.residual_first_pass else y
        # Average-pooling ViTs move the final norm after pooling (fc_norm); per token it is the same norm.
        norm = vit.fc_norm if isinstance(vit.norm, nn.Identity) and hasattr(vit, "fc_norm") else vit.norm
        return norm(x)

    def window_maps(self, tokens: Tensor) -> Tensor:
        """Class maps (n, C, g, g) of the windows from their tokens (n, N, D)."""
        grid = self.window // self.patch_size
        patches = tokens[:, self.vit.num_prefix_tokens:]
        return self.head(patches.transpose(1, 2).reshape(len(tokens), -1, grid, grid))

    def _merge_and_crop(self, maps: Tensor, layout: WindowLayout) -> Tensor:
        merged = merge_windows(maps, layout, self.patch_size)
        return merged[:, :, :math.ceil(layout.height / self.patch_size), :math.ceil(layout.width / self.patch_size)]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (logits (B, C), merged raw class maps (B, C, ceil(H/p), ceil(W/p)))."""
        layout = window_layout(x.shape[2], x.shape[3], self.window, self.window_padding)
        maps = self.window_maps(self.encode(tile_windows(x, layout)))
        merged = self._merge_and_crop(maps, layout)
        return merged.mean(dim=(2, 3)), merged

    def semantic_cam(self, x: Tensor) -> Tensor:
        """CRT's CAM (B, C, ceil(H/p), ceil(W/p)): class-token attention x class maps, merged, ReLU'd."""
        if self.vit.cls_token is None:
            raise PipelineError("semantic_cam needs a ViT with a class token; this timm model has none")
        layout = window_layout(x.shape[2], x.shape[3], self.window, self.window_padding)
        prefix = self.vit.num_prefix_tokens
        cls_attention: Tensor | None = None

        def accumulate(weights: Tensor) -> None:
            # Summing on the fly keeps one (n, N - prefix) map instead of depth x recurrence N x N matrices.
            nonlocal cls_attention
            row = weights[:, :, 0, prefix:].mean(dim=1)
            cls_attention = row if cls_attention is None else cls_attention + row

        maps = self.window_maps(self.encode(tile_windows(x, layout), accumulate))
        cams = cls_attention.reshape(maps.shape[0], 1, *maps.shape[2:]) * maps
        return F.relu(self._merge_and_crop(cams, layout))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, new head parameters): the two learning-rate groups."""
        backbone = [p for p in self.vit.parameters() if p.requires_grad]
        head = [p for p in self.head.parameters() if p.requires_grad]
        return backbone, head
