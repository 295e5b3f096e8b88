"""The dense-energy regulariser ("rloss", Tang et al. ECCV 2018) of ToCo, FSR, TSD-CAM and TSCD, in
pure PyTorch (methods/toco.md §2.5, tscd.md §6).

    E = −weight/B · Σ_i Σ_k S_ik · g_i · (W S_k)_i,   W_ij = exp(−|p_i−p_j|²/2σ_xy² − |I_i−I_j|²/2σ_rgb²)

S = the segmentation softmax inside the image box, g the gate (1 − max_k S_ik on labelled pixels,
1 on ignored ones, as a constant), I the image on 0..255. The reference downscales to `scale`
(0.5) and filters with a permutohedral lattice, which gives ≈0.6× the exact Gaussian (tscd.md
§6.2). Ours evaluates the exact dense kernel, at a grid coarse enough that the N×N kernel fits
(`max_pixels`, default 4096 per image: 64×64), with σ_xy in that grid's pixels, and rescales the
energy to the reference's: × (pixels at `scale` / pixels here)² × 0.6, since both sums of E grow
with the pixel count. `exact_dense_energy` is the slow O(N²) definition the tests compare with.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LATTICE_FACTOR = 0.6       # the reference's permutohedral filter ≈ 0.58–0.63 × the exact Gaussian


def _features(image: Tensor, sigma_rgb: float, sigma_xy: float) -> Tensor:
    """(B, N, 5) features (y/σ_xy, x/σ_xy, R/σ_rgb, G/σ_rgb, B/σ_rgb) of (B, 3, h, w) 0..255 images."""
    b, _, h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=image.dtype, device=image.device),
                            torch.arange(w, dtype=image.dtype, device=image.device), indexing="ij")
    position = torch.stack([ys, xs]).reshape(2, -1).T[None].expand(b, -1, -1) / sigma_xy
    colour = image.reshape(b, 3, -1).transpose(1, 2) / sigma_rgb
    return torch.cat([position, colour], dim=2)


def filter_dense(image: Tensor, values: Tensor, sigma_rgb: float, sigma_xy: float, chunk: int = 2048) -> Tensor:
    """W·values with the exact bilateral kernel (self term included), chunked over rows.
    image (B, 3, h, w) on 0..255, values (B, K, h, w) -> (B, K, h, w)."""
    b, k, h, w = values.shape
    feats = _features(image, sigma_rgb, sigma_xy)
    flat = values.reshape(b, k, -1)
    out = []
    for start in range(0, h * w, chunk):
        rows = feats[:, start:start + chunk]
        kernel = torch.exp(-0.5 * torch.cdist(rows, feats).pow(2))           # (B, rows, N)
        out.append(torch.einsum("brn,bkn->bkr", kernel, flat))
    return torch.cat(out, dim=2).reshape(b, k, h, w)


def _gate(probs: Tensor, labels: Tensor, roi: Tensor, ignore_index: int) -> Tensor:
    gate = (roi - probs.max(dim=1).values).clamp(min=0)
    return torch.where(labels == ignore_index, torch.ones_like(gate), gate).detach()


def exact_dense_energy(image: Tensor, probs: Tensor, labels: Tensor, roi: Tensor, sigma_rgb: float,
                       sigma_xy: float, ignore_index: int = 255) -> Tensor:
    """The definition, O(N²) with no chunking: for tests on tiny images."""
    b, k, h, w = probs.shape
    s = probs * roi[:, None]
    feats = _features(image, sigma_rgb, sigma_xy)
    kernel = torch.exp(-0.5 * torch.cdist(feats, feats).pow(2))
    filtered = torch.einsum("bij,bkj->bki", kernel, s.reshape(b, k, -1)).reshape(b, k, h, w)
    gate = _gate(probs * roi[:, None], labels, roi, ignore_index)
    return -(s * gate[:, None] * filtered).sum() / b


def dense_energy_loss(images: Tensor, probs: Tensor, labels: Tensor, boxes: Tensor, mean, std,
                      sigma_rgb: float = 15.0, sigma_xy: float = 100.0, scale: float = 0.5,
                      weight: float = 1e-7, max_pixels: int = 4096, ignore_index: int = 255) -> Tensor:
    """The regulariser of a batch. images: the normalised network input (B, 3, H, W); probs: the
    segmentation softmax at the input size (B, K, H, W); labels: the pseudo labels (B, H, W);
    boxes: (B, 4) image boxes (top, bottom, left, right) inside the padded crops."""
    from engine.pseudo import box_mask

    b, _, h, w = images.shape
    rgb = (images * torch.tensor(std, device=images.device).view(1, 3, 1, 1)
           + torch.tensor(mean, device=images.device).view(1, 3, 1, 1)) * 255.0
    ref_h, ref_w = max(1, int(h * scale)), max(1, int(w * scale))       # the reference's grid
    shrink = min(1.0, math.sqrt(max_pixels / (ref_h * ref_w)))
    gh, gw = max(1, int(ref_h * shrink)), max(1, int(ref_w * shrink))
    small_rgb = F.interpolate(rgb, size=(gh, gw), mode="nearest")
    small_probs = F.interpolate(probs, size=(gh, gw), mode="bilinear", align_corners=False)
    roi = box_mask(boxes, h, w, images.device)[:, None].float()
    small_roi = F.interpolate(roi, size=(gh, gw), mode="nearest")[:, 0]
    small_labels = F.interpolate(labels[:, None].float(), size=(gh, gw), mode="nearest")[:, 0].long()
    s = small_probs * small_roi[:, None]
    filtered = filter_dense(small_rgb, s, sigma_rgb, sigma_xy * scale * (gh / ref_h))
    gate = _gate(s, small_labels, small_roi, ignore_index)
    energy = -(s * gate[:, None] * filtered).sum() / b
    rescale = ((ref_h * ref_w) / (gh * gw)) ** 2 * LATTICE_FACTOR
    return weight * rescale * energy
