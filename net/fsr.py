"""FSR's network (Progressive Feature Self-Reinforcement, AAAI 2024; methods/fsr.md §1): ToCo's
single-stage network with
- a class token that does **not** go through the ViT blocks: the blocks see only the patch tokens
  (+ a trainable position embedding), and `aggregator_depth` cross-attention blocks let the
  pretrained class token read the block-12 patch tokens (`ClassAggregationBlock`);
- a learnable mask token that replaces masked patch embeddings before the position embedding;
- drop path (timm's `drop_path_rate`, linear over the blocks);
- a DINO projection head (→ 4096) on the aggregated class token and on every patch token;
- a full EMA teacher (`FullEmaTeacher`): a copy of the whole network, no gradients, updated after
  every optimiser step with the cosine momentum 0.9995 → 1 (engine/fsr.cosine_momentum), a
  registered submodule so checkpoints and the weights file carry it;
- the two DINO centres as buffers (checkpointed with the student).

    net = FsrNet(backbone="vit_base_patch16_224.orig_in21k_ft_in1k", num_classes=20, img_size=448)
    out = net(v1, second=v2, mask=m2)      # FsrOutput: ToCo's outputs of v1 + the projector on v2
    cls_t, patch_t = net.teacher.targets(v1, v2)   # the teacher's unmasked projections (no grad)

Inference: `use_teacher` picks which network `segment` / `cam_pair` use in eval mode (make_cam,
make_sem_seg, test_seg_head); `inference_variants()` names both, and test_seg_head scores both.
Training (train mode) always uses the student.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from net.heads import CamHead, LargeFOVHead
from net.registry import register_model
from net.single_stage import SingleStageNet
from net.vit_backbone import ConvStem, ViTBackbone, ViTFeatures
from pipeline.errors import PipelineError

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")


class ClassAggregationBlock(nn.Module):
    """One block of FSR's aggregator ("multi-head cross attention", fsr.md §1.2): the class token
    queries the patch tokens (keys and values from the patches only), then an MLP:
        u = LN1([c; X]);  c = c + Proj(softmax(q(u_c) k(u_X)ᵀ / √d_head) v(u_X));  c = c + MLP(LN2(c))"""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise PipelineError(f"aggregator: dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, token: Tensor, patches: Tensor) -> Tensor:
        """token (B, 1, D), patches (B, N, D) -> the updated token (B, 1, D)."""
        b, n, d = patches.shape
        u = self.norm1(torch.cat([token, patches], dim=1))
        heads, hd = self.num_heads, d // self.num_heads
        q = self.q(u[:, :1]).reshape(b, 1, heads, hd).transpose(1, 2)
        k, v = self.kv(u[:, 1:]).reshape(b, n, 2, heads, hd).permute(2, 0, 3, 1, 4)
        read = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, d)
        token = token + self.proj(read)
        return token + self.mlp(self.norm2(token))


class FsrBackbone(ViTBackbone):
    """The timm ViT run FSR's way: patch tokens only through the blocks (masked ones replaced by
    the mask token before the position embedding), then the aggregator on the last block's
    tokens with the pretrained class token as the first query, then the final LayerNorm on
    [token; patches]. Returns `ViTFeatures` (patch: final-LN patches, aux: raw block `aux_layer`
    patches, cls_token: final-LN aggregated token)."""

    def __init__(self, name: str, pretrained: bool | str = False, aux_layer: int = -3,
                 pos_embed_trainable: bool = True, aggregator_depth: int = 2, **kwargs):
        super().__init__(name, pretrained, aux_layer=aux_layer, pos_embed_trainable=pos_embed_trainable, **kwargs)
        vit, dim = self.vit, self.embed_dim
        if vit.reg_token is not None:
            raise PipelineError(f"{name!r} has register tokens; FSR's backbone takes a plain ViT")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        heads = vit.blocks[0].attn.num_heads
        mlp_ratio = vit.blocks[0].mlp.fc1.out_features / dim
        self.aggregator = nn.ModuleList(ClassAggregationBlock(dim, heads, mlp_ratio) for _ in range(aggregator_depth))
        for module in self.aggregator.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> ViTFeatures:
        """images (B, 3, H, W); mask (B, h, w) bool on the token grid (True: masked) or None."""
        vit = self.vit
        if isinstance(vit.patch_embed.proj, ConvStem):
            h, w = self.grid_size(*images.shape[-2:])
            images = images[..., :h * self.patch_size, :w * self.patch_size]
        patches = vit.patch_embed.proj(images)
        grid = (patches.shape[2], patches.shape[3])
        tokens = vit.patch_embed.norm(patches.flatten(2).transpose(1, 2))
        if mask is not None:
            if tuple(mask.shape) != (len(images), *grid):
                raise PipelineError(f"FSR mask {tuple(mask.shape)} does not match the token grid {grid}")
            tokens = torch.where(mask.flatten(1)[..., None], self.mask_token.to(tokens.dtype), tokens)
        pos = self.position_embedding(grid)
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        tokens = vit.norm_pre(vit.pos_drop(tokens + pos[:, prefix:]))
        aux_tokens = None
        for index, block in enumerate(vit.blocks):
            tokens = block(tokens)
            if index == self.aux_index:
                aux_tokens = tokens
        token = vit.cls_token.expand(len(images), -1, -1)
        for block in self.aggregator:
            token = block(token, tokens)
        normed = vit.norm(torch.cat([token, tokens], dim=1))
        if self.aux_index == self.depth - 1:
            aux_tokens = normed[:, 1:]
        to_map = lambda t: t.transpose(1, 2).reshape(len(images), -1, *grid)    # noqa: E731
        return ViTFeatures(patch=to_map(normed[:, 1:]), aux=to_map(aux_tokens), cls_token=normed[:, 0], attn=None)


class FsrOutput(NamedTuple):
    """SingleStageOutput's fields (of view 1) and the projector outputs of the masked view 2."""
    logits: Tensor
    aux_logits: Tensor
    cams: Tensor
    aux_cams: Tensor
    seg: Tensor
    patch: Tensor
    cls_token: Tensor
    view_cls: Tensor | None = None
    projected: Tensor | None = None
    fsr_cls: Tensor | None = None       # (B, P) projector on view 2's aggregated token (masked input)
    fsr_patch: Tensor | None = None     # (B, N, P) projector on view 2's patch tokens (masked input)


class FullEmaTeacher(nn.Module):
    """A full copy of the student network that never receives gradients (requires_grad False,
    forward under no_grad) and follows θ_t ← m·θ_t + (1 − m)·θ_s after every optimiser step.
    Its mode follows the network's, as in the reference (whose teacher stays in training mode,
    drop path on, except during validation). Buffers (e.g. BatchNorm statistics of a conv stem)
    are copied from the student."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(student)
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float, skip: str = "teacher.") -> None:
        """θ_t ← m·θ_t + (1 − m)·θ_s over the student's parameters outside `skip` (the teacher)."""
        mine = dict(self.module.named_parameters())
        theirs = {k: p for k, p in student.named_parameters() if not k.startswith(skip)}
        if mine.keys() != theirs.keys():
            raise ValueError("FullEmaTeacher.update: the student's parameters do not match the teacher's")
        for name, p in mine.items():
            p.mul_(momentum).add_(theirs[name].detach(), alpha=1.0 - momentum)
        student_buffers = dict(student.named_buffers())
        for name, b in self.module.named_buffers():
            b.copy_(student_buffers[name])

    @torch.no_grad()
    def targets(self, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's unmasked projections: (view 1's class token (B, P), view 2's patch
        tokens (B, N, P)); both views in one batch, as the reference."""
        net = self.module
        f = net.backbone(torch.cat([first, second]))
        b = len(first)
        return net.projection(f.cls_token[:b]), net.projection(f.patch[b:].flatten(2).transpose(1, 2))

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)


class _StudentOnly:
    """The student's own inference (a view of FsrNet that never delegates to the teacher)."""

    def __init__(self, net: "FsrNet"):
        self.net = net

    def segment(self, images: Tensor) -> Tensor:
        return self.net.seg_head(self.net.backbone(images).patch)

    def cam_pair(self, images: Tensor) -> tuple[Tensor, Tensor]:
        f = self.net.backbone(images)
        return self.net.classifier.cam(f.patch), self.net.aux_classifier.cam(f.aux)


@register_model("fsr_vit")
class FsrNet(SingleStageNet):
    """FSR's student with its EMA teacher (fsr.md §1). Arguments as SingleStageNet plus
    `projection` (ProjectionHead sizes, FSR: 2048/256 → 4096), `aggregator_depth` (2),
    `drop_path` (0.1), `momentum` (EMA start, 0.9995, cosine to 1), `use_teacher` (inference
    network); `**model_kwargs` go to timm (img_size 448 for the published run)."""

    def __init__(self, backbone: str = "vit_base_patch16_224.orig_in21k_ft_in1k", num_classes: int = 20,
                 pretrained: bool | str = False, aux_layer: int = -3, pos_embed_trainable: bool = True,
                 seg_hidden: int = 512, seg_dilation: int = 5, projection: dict | None = None,
                 aggregator_depth: int = 2, drop_path: float = 0.1, momentum: float = 0.9995,
                 use_teacher: bool = False, **model_kwargs):
        nn.Module.__init__(self)      # SingleStageNet's parts, built here with FSR's backbone
        from net.proj_head import ProjectionHead

        if not 0.0 <= momentum <= 1.0:
            raise PipelineError(f"train_net.fsr.momentum must be in [0, 1], got {momentum}")
        self.backbone = FsrBackbone(backbone, pretrained, aux_layer=aux_layer, pos_embed_trainable=pos_embed_trainable,
                                    aggregator_depth=aggregator_depth, drop_path_rate=drop_path, **model_kwargs)
        dim = self.backbone.embed_dim
        self.classifier = CamHead(dim, num_classes, pool="gmp")
        self.aux_classifier = CamHead(dim, num_classes, pool="gmp")
        self.seg_head = LargeFOVHead(dim, num_classes + 1, hidden_channels=seg_hidden, dilation=seg_dilation)
        for conv in (self.seg_head.conv6, self.seg_head.conv7, self.seg_head.conv8):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        sizes = {"hidden_dim": 2048, "bottleneck_dim": 256, "out_dim": 4096, "num_layers": 3, **(projection or {})}
        self.projection = ProjectionHead(dim, **sizes)
        self.teacher_projection = None
        self.num_classes, self.momentum_start, self.use_teacher = num_classes, momentum, use_teacher
        self.teacher = None
        teacher = FullEmaTeacher(self)        # a copy of everything above (the copy has no teacher)
        self.teacher = teacher
        out_dim = sizes["out_dim"]
        self.register_buffer("center_cls", torch.zeros(1, out_dim))
        self.register_buffer("center_patch", torch.zeros(1, 1, out_dim))

    @classmethod
    def args_from_config(cls, section, num_classes: int) -> dict:
        f = section.fsr
        return {"backbone": section.backbone, "num_classes": num_classes, "pretrained": section.pretrained,
                "aux_layer": section.aux_layer, "pos_embed_trainable": section.pos_embed_trainable,
                "seg_hidden": section.seg_hidden, "seg_dilation": section.seg_dilation,
                "projection": dict(f.projection), "aggregator_depth": f.aggregator_depth, "drop_path": f.drop_path,
                "momentum": f.momentum, "use_teacher": f.use_teacher, **section.model_kwargs}

    @classmethod
    def check_config(cls, section) -> None:
        """Refuse, before anything runs, a crop the mask blocks do not tile."""
        f = section.fsr
        if section.crop_size % f.mask_block:
            raise PipelineError(f"train_net.fsr.mask_block {f.mask_block} does not tile train_net.crop_size "
                                f"{section.crop_size} (FSR masks view 2 by whole blocks)")

    @classmethod
    def train_dataset(cls, section, dataset, ids, data, seed: int):
        """FSR's training views: two independent RandomResizedCrops per image (fsr.md §4)."""
        from engine.fsr import FsrViewsDataset

        f = section.fsr
        return FsrViewsDataset(dataset, ids, section.crop_size, data.mean, data.std, scale=f.view_scale,
                               jitter_p=f.jitter_p, seed=seed)

    def forward(self, images: Tensor, second: Tensor | None = None, mask: Tensor | None = None) -> FsrOutput:
        """ToCo's outputs of `images` (view 1); with `second` (view 2, same size) and its token
        mask, both views run as one batch [v1 (unmasked); v2 (masked)] and the projector's
        outputs on view 2 come back as `fsr_cls`, `fsr_patch` (inside forward: DDP sees them)."""
        b = len(images)
        if second is None:
            f = self.backbone(images)
        else:
            if second.shape != images.shape:
                raise PipelineError(f"FSR's two views must have one size: {tuple(images.shape)} vs "
                                    f"{tuple(second.shape)}")
            masks = None
            if mask is not None:
                masks = torch.cat([torch.zeros_like(mask), mask])
            f = self.backbone(torch.cat([images, second]), mask=masks)
        patch, aux, cls_token = f.patch[:b], f.aux[:b], f.cls_token[:b]
        logits, cams = self.classifier(patch)
        aux_logits, aux_cams = self.aux_classifier(aux)
        fsr_cls = fsr_patch = None
        if second is not None:
            fsr_cls = self.projection(f.cls_token[b:])
            fsr_patch = self.projection(f.patch[b:].flatten(2).transpose(1, 2))
        return FsrOutput(logits, aux_logits, cams, aux_cams, self.seg_head(patch), patch, cls_token,
                         fsr_cls=fsr_cls, fsr_patch=fsr_patch)

    # -- inference: the student, or the teacher when use_teacher (eval mode only) ------------
    def _inference_net(self):
        if self.use_teacher and not self.training and self.teacher is not None:
            return self.teacher.module
        return _StudentOnly(self)

    def cam_pair(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self._inference_net().cam_pair(images)

    def segment(self, images: Tensor) -> Tensor:
        return self._inference_net().segment(images)

    @property
    def inference_variant(self) -> str:
        """The variant the inference stages use (the other is scored alongside by test_seg_head)."""
        return "teacher" if self.use_teacher else "student"

    def inference_variants(self) -> dict:
        """{"student": ..., "teacher": ...}: objects with `segment` / `cam_pair` (eval mode)."""
        return {"student": _StudentOnly(self), "teacher": self.teacher.module}

    # -- training ---------------------------------------------------------------------------
    def after_step(self, done: int, iterations: int) -> None:
        """The EMA update after optimiser step `done` (1-based): momentum of iteration done - 1."""
        from engine.fsr import cosine_momentum

        self.teacher.update(self, cosine_momentum(done - 1, iterations, self.momentum_start))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(encoder incl. aggregator and tokens, heads incl. projector); never the teacher."""
        encoder = [p for p in self.backbone.parameters() if p.requires_grad]
        heads = [p for m in (self.classifier, self.aux_classifier, self.seg_head, self.projection)
                 for p in m.parameters() if p.requires_grad]
        return encoder, heads

    def optimizer_groups(self, section) -> list[dict]:
        """FSR's AdamW groups (fsr.md §5): encoder at 1×, heads at `head_lr_mult`×; weight decay
        on ≥2-D weights, none on biases, 1-D parameters, pos_embed, cls_token, mask_token."""
        weight_decay, head_lr_mult = section.optimizer.weight_decay, section.head_lr_mult
        groups = []
        heads = (self.classifier, self.aux_classifier, self.seg_head, self.projection)
        for modules, mult in (((self.backbone,), 1.0), (heads, head_lr_mult)):
            decay, plain = [], []
            for module in modules:
                for pname, p in module.named_parameters():
                    if not p.requires_grad:
                        continue
                    leaf = pname.rsplit(".", 1)[-1]
                    no_wd = p.ndim < 2 or leaf == "bias" or leaf in NO_DECAY_NAMES
                    (plain if no_wd else decay).append(p)
            groups += [{"params": decay, "lr_mult": mult, "weight_decay": weight_decay},
                       {"params": plain, "lr_mult": mult, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]
