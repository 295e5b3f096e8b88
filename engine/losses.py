"""Losses of the single-stage methods (methods/toco.md §2): the balanced segmentation
cross-entropy, patch token contrast (PTC) and class token contrast (CTC).

Labels are class ids (0 background, 1..C) with 255 = ignore, as engine/pseudo.py makes them.
"""
from __future__ import annotations

import math

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


def ctc_loss(student: Tensor, teacher: Tensor, flags: Tensor, temperature: float = 0.5,
             extra_negative_term: bool = True) -> Tensor:
    """Class token contrast between teacher global views and student views.

    student (B, V, D): projection-head outputs of all V views of each image (ToCo: 2
    global views first, then 8 local crops). teacher (B, G, D): the EMA head's outputs
    of the G global views (stop-gradient). flags (B, V) in {0, 1}: 1 = positive view
    (the globals always; a local crop that is mostly foreground/uncertain), 0 =
    negative (a background crop).

    The reference lays views out view-major along the batch (`x.reshape(V, B, D)`);
    `x.reshape(V, B, D).transpose(0, 1)` gives this function's layout.

    With z_aj = t_a·s_j / τ (plain dot products; the head outputs are not
    re-normalised), S_a = Σ_{n negative} exp(z_an), and for image i:
        L_i = Σ_a Σ_{j positive} −log(e^{z_aj} / (e^{z_aj} + S_a + 1e-4))  [+ Σ_a log(1 + S_a + 1e-4)]
              / (G · (#positives + 1e-4))
    and L = mean_i L_i. The bracketed term is what the reference's `for … else` adds
    once per image (toco.md §2.4, §11: 1.579 vs 1.301 on a test batch); it is on by
    default because the published numbers include it.

    Computed in log space (logsumexp) so large dot products never overflow; the value
    is the reference's formula exactly, the 1e-4s included.
    """
    if student.dim() != 3 or teacher.dim() != 3 or flags.shape != student.shape[:2]:
        raise ValueError(f"expected student (B, V, D), teacher (B, G, D), flags (B, V); got "
                         f"{tuple(student.shape)}, {tuple(teacher.shape)}, {tuple(flags.shape)}")
    num_teacher = teacher.shape[1]
    logits = torch.matmul(teacher, student.transpose(1, 2)) / temperature  # (B, G, V)
    positive = flags.bool()[:, None, :].expand_as(logits)

    def log_sum_with(constant: float) -> Tensor:
        """log(constant + Σ_negatives exp(z)) per (image, teacher view)."""
        negatives = logits.masked_fill(positive, float("-inf"))
        constant_column = torch.full_like(logits[..., :1], math.log(constant))
        return torch.logsumexp(torch.cat([negatives, constant_column], dim=-1), dim=-1)  # (B, G)

    log_denominator_rest = log_sum_with(1e-4)  # log(S_a + 1e-4)
    # −log(e^z / (e^z + S + 1e-4)) = log(e^z + (S + 1e-4)) − z
    positive_terms = torch.logaddexp(logits, log_denominator_rest[..., None]) - logits
    per_image = (positive_terms * positive).sum(dim=(1, 2))
    if extra_negative_term:
        per_image = per_image + log_sum_with(1.0 + 1e-4).sum(dim=1)
    num_positive = flags.to(logits.dtype).sum(dim=1)
    return (per_image / num_teacher / (num_positive + 1e-4)).mean()
