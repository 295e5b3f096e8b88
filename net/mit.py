"""The Mix Transformer (MiT, the SegFormer encoder, Xie et al. 2021), variants B0-B5: the
backbone of AFA and TSCD (afa.md §2, tscd.md §2). MiT is not in timm, so it lives here.

The layout follows the SegFormer release so that its ImageNet checkpoints (`mit_b0.pth` ...
`mit_b5.pth`) load by name, with no key mapping:

- four stages; stage i starts with an *overlapping* patch embedding (`patch_embed{i}`: a
  convolution of kernel 7 for stage 1 and 3 for stages 2-4, padding kernel//2, stride
  `strides[i]`, then a LayerNorm), runs `depths[i]` transformer blocks (`block{i}.{j}`) and ends
  with a LayerNorm (`norm{i}`) before the tokens are reshaped to a (B, C, H, W) map;
- a block is pre-norm: x + drop_path(attention(norm1(x))), then x + drop_path(mix_ffn(norm2(x)));
- attention is "efficient self-attention": queries from every token, keys and values from a
  grid reduced by a `sr_ratio` x `sr_ratio` stride-`sr_ratio` convolution (`attn.sr`) and a
  LayerNorm (`attn.norm`) when sr_ratio > 1; keys and values come from one linear layer
  (`attn.kv`, keys first);
- Mix-FFN: fc1 -> 3x3 depthwise convolution on the token map (`mlp.dwconv.dwconv`) -> GELU ->
  fc2. The depthwise convolution leaks position, so there is no position embedding.

LayerNorm eps is 1e-6 in the blocks and at the stage ends but the PyTorch default 1e-5 in the
patch embeddings and the spatial-reduction norm, as in the release. Every LayerNorm's name
contains "norm" (AFA/TSCD freeze exactly those by name).

Strides: ImageNet MiT uses (4, 2, 2, 2), output stride 32. AFA and TSCD use (4, 2, 2, 1): the
stage-4 embedding keeps its 3x3 kernel with stride 1, so stage 4 runs at output stride 16 and the
pretrained weights still fit.

Attention logits: with `attn_blocks=True` every block also returns q·kᵀ per head, **before** the
1/sqrt(head_dim) scale and the softmax, shape (B, heads, N, N_reduced), as AFA's affinity head
reads it (afa.md §2). (AFA average-pools the query axis of the sr>1 stages to the key grid; we
return them unpooled, as nothing downstream reads those stages.)
"""
from __future__ import annotations

import inspect
import logging
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn

from net.backbone import log_load_report, read_state_dict, strip_prefixes
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

BLOCK_NORM_EPS = 1e-6
"""LayerNorm eps of the block norms and the per-stage final norms (the release's norm_layer)."""

# Variant settings of the SegFormer release: embed dims, heads and depths; all variants share
# mlp ratio 4, sr ratios (8, 4, 2, 1), qkv bias and drop-path 0.1.
MIT_VARIANTS: dict[str, dict] = {
    "b0": {"embed_dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2)},
    "b1": {"embed_dims": (64, 128, 320, 512), "depths": (2, 2, 2, 2)},
    "b2": {"embed_dims": (64, 128, 320, 512), "depths": (3, 4, 6, 3)},
    "b3": {"embed_dims": (64, 128, 320, 512), "depths": (3, 4, 18, 3)},
    "b4": {"embed_dims": (64, 128, 320, 512), "depths": (3, 8, 27, 3)},
    "b5": {"embed_dims": (64, 128, 320, 512), "depths": (3, 6, 40, 3)},
}
MIT_COMMON = {"num_heads": (1, 2, 5, 8), "mlp_ratios": (4, 4, 4, 4), "sr_ratios": (8, 4, 2, 1),
              "drop_path_rate": 0.1, "qkv_bias": True}


def init_segformer_weights(module: nn.Module) -> None:
    """SegFormer's initialisation, applied to every submodule: linear weights truncated-normal
    (std 0.02) with zero bias; LayerNorm weight 1, bias 0; convolutions normal with std
    sqrt(2 / fan_out), fan_out = k_h * k_w * out_channels / groups, zero bias."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def tokens_to_map(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, H*W, C) tokens in row-major order -> (B, C, H, W)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


class OverlapPatchEmbed(nn.Module):
    """A strided convolution whose kernel is larger than its stride (neighbouring patches
    overlap), then a LayerNorm over channels. Returns tokens (B, H*W, C) and the grid (H, W)."""

    def __init__(self, in_chans: int, embed_dim: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(embed_dim)  # eps 1e-5, as in the release

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from a grid shrunk `sr_ratio` times
    per side (cost N * N / sr_ratio² instead of N²)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, sr_ratio: int = 1):
        super().__init__()
        if dim % num_heads:
            raise PipelineError(f"MiT: embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)  # eps 1e-5, as in the release

    def _heads(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, heads, N, head_dim)."""
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, height: int, width: int, return_logits: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        """Returns the attended tokens (B, N, C) and, with `return_logits`, q·kᵀ per head
        (B, heads, N, N_reduced), unscaled and before the softmax (else None)."""
        q = self._heads(self.q(x))
        source = x
        if self.sr_ratio > 1:
            if height < self.sr_ratio or width < self.sr_ratio:
                raise PipelineError(
                    f"MiT: input too small, a {height}x{width} token grid is smaller than the spatial "
                    f"reduction ratio {self.sr_ratio} (the default layout needs at least 32 px per side)")
            reduced = self.sr(tokens_to_map(x, height, width))
            source = self.norm(reduced.flatten(2).transpose(1, 2))
        k, v = self.kv(source).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        if return_logits:
            logits = q @ k.transpose(-2, -1)
            out = (logits * self.scale).softmax(dim=-1) @ v
        else:
            logits = None
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(x.shape)
        return self.proj(out), logits


class DWConv(nn.Module):
    """A 3x3 depthwise convolution on the token map (named as in the release: `dwconv.dwconv`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, stride=1, padding=1, groups=dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        return self.dwconv(tokens_to_map(x, height, width)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """fc1 -> 3x3 depthwise conv -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), height, width)))


class MiTBlock(nn.Module):
    """Pre-norm transformer block: efficient self-attention, then Mix-FFN, each residual with
    stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, qkv_bias: bool,
                 drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, qkv_bias=qkv_bias, sr_ratio=sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, height: int, width: int, return_logits: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        attended, logits = self.attn(self.norm1(x), height, width, return_logits)
        x = x + self.drop_path(attended)
        x = x + self.drop_path(self.mlp(self.norm2(x), height, width))
        return x, logits


def _four(name: str, values, kind=int) -> tuple:
    try:
        out = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        raise PipelineError(f"MiT: {name} must be 4 numbers, got {values!r}") from None
    if len(out) != 4 or any(v <= 0 for v in out):
        raise PipelineError(f"MiT: {name} must be 4 positive numbers, got {values!r}")
    return out


class MixTransformer(nn.Module):
    """The MiT encoder. Inputs of any size: each patch embedding maps a side s to
    floor((s + 2*(k//2) - k) / stride) + 1 (ceil(s / stride) for odd k), and the spatial
    reduction floors.

    `forward(x, attn_blocks=False)` returns (features, attns): features the 4 stage maps
    (B, embed_dims[i], H_i, W_i) after each stage's final LayerNorm; attns, when `attn_blocks`,
    the attention logits of every block in order (stage 1 first), each (B, heads, N, N_reduced)
    = q·kᵀ unscaled and before the softmax; else [].
    """

    def __init__(self, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(4, 4, 4, 4),
                 depths=(3, 4, 6, 3), sr_ratios=(8, 4, 2, 1), strides=(4, 2, 2, 2), in_chans=3,
                 drop_path_rate=0.1, qkv_bias=True):
        super().__init__()
        self.embed_dims = _four("embed_dims", embed_dims)
        self.num_heads = _four("num_heads", num_heads)
        self.mlp_ratios = _four("mlp_ratios", mlp_ratios, float)
        self.depths = _four("depths", depths)
        self.sr_ratios = _four("sr_ratios", sr_ratios)
        self.strides = _four("strides", strides)
        if not 0.0 <= float(drop_path_rate) < 1.0:
            raise PipelineError(f"MiT: drop_path_rate must be in [0, 1), got {drop_path_rate}")
        # Stochastic depth grows linearly from 0 to drop_path_rate over all blocks.
        total = sum(self.depths)
        rates = [float(drop_path_rate) * i / max(total - 1, 1) for i in range(total)]
        first = 0
        channels = int(in_chans)
        for i in range(4):
            stage = i + 1
            kernel = 7 if i == 0 else 3
            setattr(self, f"patch_embed{stage}",
                    OverlapPatchEmbed(channels, self.embed_dims[i], kernel, self.strides[i]))
            setattr(self, f"block{stage}", nn.ModuleList(
                MiTBlock(self.embed_dims[i], self.num_heads[i], self.mlp_ratios[i], self.sr_ratios[i],
                         bool(qkv_bias), rates[first + j]) for j in range(self.depths[i])))
            setattr(self, f"norm{stage}", nn.LayerNorm(self.embed_dims[i], eps=BLOCK_NORM_EPS))
            first += self.depths[i]
            channels = self.embed_dims[i]
        self.apply(init_segformer_weights)

    def stages(self):
        """(patch_embed, blocks, norm) of each stage, in order."""
        return [(getattr(self, f"patch_embed{s}"), getattr(self, f"block{s}"), getattr(self, f"norm{s}"))
                for s in range(1, 5)]

    def forward(self, x: Tensor, attn_blocks: bool = False) -> tuple[list[Tensor], list[Tensor]]:
        features: list[Tensor] = []
        attns: list[Tensor] = []
        for patch_embed, blocks, norm in self.stages():
            tokens, height, width = patch_embed(x)
            for block in blocks:
                tokens, logits = block(tokens, height, width, attn_blocks)
                if attn_blocks:
                    attns.append(logits)
            x = tokens_to_map(norm(tokens), height, width).contiguous()
            features.append(x)
        return features, attns


def mit(variant: str = "b1", strides=(4, 2, 2, 1), pretrained: bool | str | Path = False,
        **overrides) -> MixTransformer:
    """MiT-B0..B5 with the SegFormer release's settings (`MIT_VARIANTS`, `MIT_COMMON`).

    `strides` defaults to AFA/TSCD's (4, 2, 2, 1) (output stride 16); ImageNet MiT is
    (4, 2, 2, 2). `overrides` replace any `MixTransformer` argument (e.g. `drop_path_rate`, or
    `depths` and `embed_dims` for a tiny test model). `pretrained` False gives SegFormer's random
    init; a path loads an official `mit_bX.pth` (see `load_mit_weights`); True is an error, since
    nothing is downloaded at run time.
    """
    name = str(variant).lower().removeprefix("mit_").removeprefix("mit-")
    if name not in MIT_VARIANTS:
        raise PipelineError(f"unknown MiT variant {variant!r}; known: {', '.join(MIT_VARIANTS)}")
    if isinstance(pretrained, str) and pretrained.strip().lower() in ("true", "false", ""):
        pretrained = pretrained.strip().lower() == "true"
    if pretrained is True:
        raise PipelineError(
            f"MiT-{name.upper()} weights are not downloaded automatically: fetch mit_{name}.pth from the "
            "SegFormer release (ImageNet-1k MiT checkpoints, see docs/mit.md) and give its local path as "
            "`pretrained` (or set pretrained: false for a random init)")
    unknown = set(overrides) - set(inspect.signature(MixTransformer).parameters)
    if unknown:
        raise PipelineError(f"unknown MiT argument(s): {', '.join(sorted(unknown))}")
    model = MixTransformer(**{**MIT_COMMON, **MIT_VARIANTS[name], "strides": strides, **overrides})
    if pretrained:
        load_mit_weights(model, pretrained)
    return model


def read_weights_file(path: str | Path) -> dict:
    """A state dict from a `.pth`/`.bin` (pickle-free torch.load) or a `.safetensors` file."""
    file = Path(path)
    if file.suffix != ".safetensors":
        return read_state_dict(file, "MiT pretrained weights")
    if not file.is_file():
        raise PipelineError(f"MiT pretrained weights file not found: {file}")
    from safetensors.torch import load_file
    try:
        return load_file(str(file), device="cpu")
    except Exception as e:  # safetensors raises several types for a bad file
        raise PipelineError(f"cannot read MiT pretrained weights {file}: {e}") from None


# Hugging Face Segformer name pieces -> SegFormer-release names, applied to a key with the
# model prefix removed. Keys and values (separate there) are joined into `kv` afterwards.
_HF_RENAMES = (
    (re.compile(r"^patch_embeddings\.(\d)\.layer_norm\."), lambda m: f"patch_embed{int(m[1]) + 1}.norm."),
    (re.compile(r"^patch_embeddings\.(\d)\."), lambda m: f"patch_embed{int(m[1]) + 1}."),
    (re.compile(r"^layer_norm\.(\d)\."), lambda m: f"norm{int(m[1]) + 1}."),
    (re.compile(r"^block\.(\d)\.(\d+)\."), lambda m: f"block{int(m[1]) + 1}.{m[2]}."),
    (re.compile(r"\.layer_norm_([12])\."), lambda m: f".norm{m[1]}."),
    (re.compile(r"\.attention\.self\.query\."), lambda m: ".attn.q."),
    (re.compile(r"\.attention\.self\.layer_norm\."), lambda m: ".attn.norm."),
    (re.compile(r"\.attention\.self\.sr\."), lambda m: ".attn.sr."),
    (re.compile(r"\.attention\.output\.dense\."), lambda m: ".attn.proj."),
    (re.compile(r"\.attention\.self\.(key|value)\."), lambda m: f".attn.{m[1]}."),
    (re.compile(r"\.mlp\.dense([12])\."), lambda m: f".mlp.fc{m[1]}."),
)


def from_hugging_face_names(state: dict) -> dict:
    """Rename a Hugging Face `Segformer*` state dict (e.g. `nvidia/mit-b1`:
    `segformer.encoder.block.0.0.attention.self.query.weight`) to the release's names
    (`block1.0.attn.q.weight`), joining the separate key and value projections into `kv` (keys
    first, as the release stores them). The classifier and decode head become `head.*` /
    stay unknown, so they are dropped or reported by the loader."""
    renamed: dict = {}
    for key, value in state.items():
        for prefix in ("segformer.encoder.", "encoder."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            if key.startswith("classifier."):
                key = "head." + key[len("classifier."):]
        for pattern, replace in _HF_RENAMES:
            key = pattern.sub(replace, key)
        renamed[key] = value
    for key in [k for k in renamed if ".attn.key." in k]:
        value_key = key.replace(".attn.key.", ".attn.value.")
        if value_key in renamed:
            renamed[key.replace(".attn.key.", ".attn.kv.")] = torch.cat(
                [renamed.pop(key), renamed.pop(value_key)], dim=0)
    return renamed


def load_mit_weights(model: MixTransformer, path: str | Path, min_share: float = 0.9) -> dict:
    """Load a SegFormer-release MiT checkpoint (`mit_bX.pth`, key names such as
    `block1.0.attn.kv.weight`, identical to ours) into `model`. A Hugging Face Segformer file
    (`nvidia/mit-bX`'s `pytorch_model.bin` or `model.safetensors`) is recognised by its
    `patch_embeddings.` keys and renamed first (`from_hugging_face_names`).

    The classifier `head.*` and wrapper prefixes (`module.`) are dropped. Every tensor whose
    name we know must have our shape (else an error naming the file, the key and both shapes);
    fewer than `min_share` of our tensors matched, or more than 1 - `min_share` of the file's
    tensors unknown to us, is an error too (a file of another variant or model). Returns and logs
    the report {"matched": [...], "missing": [...], "unexpected": [...]}.
    """
    state = strip_prefixes(read_weights_file(path), ("module.",))
    if any(".patch_embeddings." in f".{key}" for key in state):
        state = from_hugging_face_names(state)
        log.info("MiT weights %s use Hugging Face Segformer key names: converted", path)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = model.state_dict()
    for key, value in state.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise PipelineError(f"MiT weights {path}: {key} has shape {tuple(value.shape)}, the model "
                                f"expects {tuple(own[key].shape)} (a checkpoint of another MiT variant?)")
    matched = sorted(k for k in state if k in own)
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    share = len(matched) / max(len(own), 1)
    unknown_share = len(unexpected) / max(len(state), 1)
    if share < min_share or unknown_share > 1 - min_share:
        raise PipelineError(
            f"MiT weights {path} do not fit this model: {len(matched)} of its {len(own)} tensors matched, "
            f"{len(missing)} missing, {len(unexpected)} in the file unknown (e.g. "
            f"{(missing + unexpected)[:3]}); is it an official mit_bX.pth of the same variant?")
    model.load_state_dict({k: state[k] for k in matched}, strict=False)
    log_load_report(f"MiT weights {path}", len(matched), missing, unexpected, note=" (head.* ignored)", logger=log)
    return {"matched": matched, "missing": missing, "unexpected": unexpected}
