"""Losses of the single-stage methods (methods/toco.md §2): the balanced segmentation
cross-entropy and patch token contrast (PTC).

Labels are class ids (0 background, 1..C) with 255 = ignore, as engine/pseudo.py makes them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = 255


def balanced_seg_ce(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """ToCo's segmentation loss: ½ CE over the background pixels + ½ CE over the foreground
    pixels, each a mean over its own valid pixels of the batch. The reference returns NaN when
    one half is empty (a crop that is almost all padding; toco.md §8.2): here an empty half is
    dropped and the other half's mean is the loss (both empty: 0, graph kept).
    logits (B, C+1, H, W), labels (B, H, W) long."""
    labels = labels.long()
    per_pixel = F.cross_entropy(logits, labels.clamp(max=logits.shape[1] - 1), reduction="none")
    valid = labels != ignore_index
    halves = [per_pixel[valid & (labels == 0)], per_pixel[valid & (labels != 0)]]
    present = [h.mean() for h in halves if h.numel()]
    if not present:
        return logits.sum() * 0.0
    return torch.stack(present).mean()


def ptc_loss(tokens: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Patch token contrast (toco.md §2.2): tokens (B, D, h, w) with gradient, labels (B, h, w) on
    the token grid (255 ignore). With C = |cos| between every two tokens of an image, a pair is
    positive when both carry the same label, negative when the labels differ, left out when
    either is ignored and on the diagonal:
        L = ½ (1 − Σ C[pos] / (#pos + 1)) + ½ Σ C[neg] / (#neg + 1),
    sums and counts pooled over the batch."""
    b, d = tokens.shape[:2]
    feats = F.normalize(tokens.reshape(b, d, -1), dim=1)
    similarity = torch.einsum("bdi,bdj->bij", feats, feats).abs()
    flat = labels.reshape(b, -1)
    valid = (flat != ignore_index)
    pair_valid = valid[:, :, None] & valid[:, None, :]
    pair_valid &= ~torch.eye(flat.shape[1], dtype=torch.bool, device=flat.device)[None]
    same = flat[:, :, None] == flat[:, None, :]
    positive, negative = pair_valid & same, pair_valid & ~same
    pos = (similarity * positive).sum() / (positive.sum() + 1)
    neg = (similarity * negative).sum() / (negative.sum() + 1)
    return 0.5 * (1 - pos) + 0.5 * neg
