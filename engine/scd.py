"""CAM-similarity self-distillation, the `scd` loss term of TSD-CAM and TSCD
(methods/tsd-cam.md §2.3, tscd.md §5.1-§5.2; STEGO's correspondence distillation).

Two views of the batch: the crop (view a) and a copy downscaled by `scd.view_scale`
(0.3: 512 -> 153 px, view b). Per image, `samples` x `samples` random points are drawn in
each view independently (uniform in [-1, 1]^2, read by bilinear `grid_sample` with border
padding and align_corners=True); the points of the two views do not correspond, every
point of a is related to every point of b. Points fall anywhere in the crop, its padding included
(as in the references).

    teacher  T[p, q] = cos(cams_a(p), cams_b(q))     multi-scale CAMs of each view, no gradient
             T'[p, q] = T[p, q] - mean_q T[p, q] + mean_{p,q} T   (each row centred, the mean back)
    student  S[p, q] = cos(seg_a(p), seg_b(q))       segmentation logits of each view, with gradient
    loss     -mean_{b,p,q} max(S[p, q], 0) * T'[p, q]

The mean added back is per image by default; the reference takes it over its per-GPU batch
(`batch_mean: true`): the same thing for TSD-CAM's published run (1 image per GPU), not for a
larger per-device batch, where it would make one image's target depend on the others.
Cosines over channels with L2 normalisation (eps 1e-10); all CAM channels are used, absent
classes included, as in the references. The gradient reaches the segmentation branch of both
views (and through it the encoder); the CAMs are targets. The references' "ER" term (an L1
between the two views' CAMs) is computed under no_grad there and changes nothing but the logged
loss: it is not computed here.

The reference reads its points through a transposed coordinate grid; that only relabels the
random points (the loss is a mean over all pairs, the centring over all q of each p), so the
value is the same.

Network contract (any single-stage model, ViT or MiT), all the term needs:
- `out.seg`: the segmentation logits of the crop at any stride (upsampled here);
- the engine's `online_cams(net, images)`: the multi-scale + flip CAMs in [0, 1] at the input
  size (a tensor, or a tuple whose first entry is the CAM), used for both views (`step.cams()`
  for the crop), computed in `prepare`, before the forward;
- optionally a forward keyword `seg_views` (a list of extra inputs) returning their logits in
  `out.view_seg`: `prepare` then passes `seg_views=[view]`, so that the small view runs inside
  the network's forward (DDP sees it). A model without that keyword gets a second call of the
  (possibly DDP-wrapped) model inside the term, as the references do (`out.seg` of that call).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.terms import Step, register_term
from pipeline.errors import PipelineError

EPS = 1e-10


def small_view(images: Tensor, scale: float, align_corners: bool = True) -> Tensor:
    """The second view: `images` (B, 3, H, W) resized bilinearly by `scale` to
    (floor(H * scale), floor(W * scale)), as the references' `scale_factor` resize."""
    return F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=align_corners,
                         recompute_scale_factor=True)


def random_points(batch: int, samples: int, device=None, generator: torch.Generator | None = None) -> Tensor:
    """(B, samples, samples, 2) points uniform in [-1, 1]^2 (grid_sample's x, y)."""
    return torch.rand(batch, samples, samples, 2, device=device, generator=generator) * 2 - 1


def sample_at(maps: Tensor, points: Tensor) -> Tensor:
    """maps (B, C, H, W) read at points (B, S, S, 2): (B, C, S, S), bilinear, border padding,
    align_corners=True."""
    return F.grid_sample(maps, points.to(maps.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def correlation(a: Tensor, b: Tensor) -> Tensor:
    """Cosine of every point of a (B, C, S, S) with every point of b (B, C, S', S'):
    (B, S, S, S', S')."""
    a, b = F.normalize(a, dim=1, eps=EPS), F.normalize(b, dim=1, eps=EPS)
    return torch.einsum("nchw,ncij->nhwij", a, b)


def scd_loss(cams_a: Tensor, cams_b: Tensor, seg_a: Tensor, seg_b: Tensor, points_a: Tensor,
             points_b: Tensor, batch_mean: bool = False) -> Tensor:
    """The SCD loss (module docstring). cams_a / seg_a: (B, K, H, W) / (B, C, H, W) of view a,
    cams_b / seg_b of view b (any size); points_a / points_b (B, S, S, 2) in [-1, 1].
    The CAMs never receive a gradient; the seg logits of both views do. `batch_mean`: the
    teacher's mean added back over the whole batch (the reference) instead of per image."""
    with torch.no_grad():
        teacher = correlation(sample_at(cams_a.detach().float(), points_a),
                              sample_at(cams_b.detach().float(), points_b))
        dims = tuple(range(teacher.dim())) if batch_mean else tuple(range(1, teacher.dim()))
        overall = teacher.mean(dim=dims, keepdim=True)
        teacher = teacher - teacher.mean(dim=(3, 4), keepdim=True)
        teacher = teacher - teacher.mean(dim=dims, keepdim=True) + overall
    student = correlation(sample_at(seg_a.float(), points_a), sample_at(seg_b.float(), points_b))
    return -(student.clamp(min=0) * teacher).mean()


def _takes_seg_views(net) -> bool:
    try:
        return "seg_views" in inspect.signature(net.forward).parameters
    except (TypeError, ValueError):
        return False


def _first(cams):
    return cams[0] if isinstance(cams, tuple) else cams


def scd_prepare(step: Step) -> dict:
    """View b, its CAMs and the crop's CAMs (no gradient, before the forward); the view goes
    to the forward as `seg_views` where the model takes it."""
    cfg = step.section.scd
    height, width = step.images.shape[-2:]
    smallest = min(height, width) * cfg.view_scale * min(step.section.cam_scales)
    # the network's smallest input: one patch for a ViT, the spatial reductions' 32 px for MiT
    least = getattr(step.net, "min_input_size", getattr(step.net, "patch_size", 1))
    if smallest < least:
        raise PipelineError(f"train_net.scd.view_scale: a {cfg.view_scale} x view of a {height}x{width} crop, at CAM "
                            f"scale {min(step.section.cam_scales)}, is {smallest:.0f} px, smaller than the "
                            f"{least} px the network takes; raise train_net.crop_size or the scale")
    view = step.keep("scd_view", small_view(step.images, cfg.view_scale, cfg.view_align_corners))
    step.cams()
    step.keep("scd_view_cams", _first(step.engine.online_cams(step.net, view)))
    if _takes_seg_views(step.net):
        step.keep("scd_in_forward", True)
        return {"seg_views": [view]}
    step.keep("scd_in_forward", False)
    return {}


@register_term("scd", prepare=scd_prepare)
def scd_term(step: Step) -> Tensor:
    cfg = step.section.scd
    view = step.kept("scd_view")
    if step.kept("scd_in_forward"):
        seg_b = step.out.view_seg[0]
    else:
        seg_b = step.model(view).seg      # a second forward (the references' way)
    size_a, size_b = step.images.shape[-2:], view.shape[-2:]
    if cfg.seg_align_corners == bool(getattr(step.net, "seg_align_corners", False)):
        seg_a = step.seg_logits()          # the same upsampling as the seg / reg terms: shared
    else:
        seg_a = F.interpolate(step.out.seg.float(), size=size_a, mode="bilinear",
                              align_corners=cfg.seg_align_corners)
    seg_b = F.interpolate(seg_b.float(), size=size_b, mode="bilinear", align_corners=cfg.seg_align_corners)
    batch, device = len(step.images), step.images.device
    points_a = random_points(batch, cfg.samples, device)
    points_b = random_points(batch, cfg.samples, device)
    return scd_loss(step.cams(), step.kept("scd_view_cams"), seg_a, seg_b, points_a, points_b,
                    batch_mean=cfg.batch_mean)
