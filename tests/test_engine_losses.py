"""Losses of the single-stage engine against slow, explicit versions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.losses import balanced_seg_ce, ptc_loss
from engine.regulariser import LATTICE_FACTOR, dense_energy_loss, exact_dense_energy, filter_dense


def slow_balanced_ce(logits, labels):
    halves = {"bg": [], "fg": []}
    b, c, h, w = logits.shape
    for n in range(b):
        for y in range(h):
            for x in range(w):
                lab = int(labels[n, y, x])
                if lab == 255:
                    continue
                ce = -torch.log_softmax(logits[n, :, y, x], 0)[lab]
                halves["bg" if lab == 0 else "fg"].append(ce)
    means = [torch.stack(v).mean() for v in halves.values() if v]
    return sum(means) / len(means)


def test_balanced_ce_equals_the_slow_version():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    labels = torch.randint(0, 4, (2, 5, 6), generator=g)
    labels[0, 0, :3] = 255
    assert balanced_seg_ce(logits, labels).item() == pytest.approx(slow_balanced_ce(logits, labels).item(), rel=1e-5)
    # halves are balanced: many background pixels do not outweigh a few foreground ones
    labels[:] = 0
    labels[0, 0, 0] = 2
    fg = F.cross_entropy(logits[:, :, 0, 0][:1], torch.tensor([2]))
    bg = F.cross_entropy(logits.permute(0, 2, 3, 1).reshape(-1, 4)[1:], torch.zeros(59, dtype=torch.long))
    assert balanced_seg_ce(logits, labels).item() == pytest.approx(0.5 * (fg + bg).item(), rel=1e-5)


def test_balanced_ce_never_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    only_bg = torch.zeros(1, 4, 4, dtype=torch.long)
    loss = balanced_seg_ce(logits, only_bg)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(F.cross_entropy(logits, only_bg).item(), rel=1e-5)
    ignored = torch.full((1, 4, 4), 255, dtype=torch.long)
    zero = balanced_seg_ce(logits, ignored)
    assert zero.item() == 0.0
    zero.backward()                       # the graph stays connected
    assert logits.grad is not None


def slow_ptc(tokens, labels):
    b, d, h, w = tokens.shape
    feats = F.normalize(tokens.reshape(b, d, -1), dim=1)
    flat = labels.reshape(b, -1)
    pos_sum = neg_sum = 0.0
    pos_n = neg_n = 0
    for n in range(b):
        for i in range(h * w):
            for j in range(h * w):
                if i == j or flat[n, i] == 255 or flat[n, j] == 255:
                    continue
                c = abs(float(feats[n, :, i] @ feats[n, :, j]))
                if flat[n, i] == flat[n, j]:
                    pos_sum, pos_n = pos_sum + c, pos_n + 1
                else:
                    neg_sum, neg_n = neg_sum + c, neg_n + 1
    return 0.5 * (1 - pos_sum / (pos_n + 1)) + 0.5 * neg_sum / (neg_n + 1)


def test_ptc_equals_the_slow_version():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 8, 3, 4, generator=g)
    labels = torch.randint(0, 3, (2, 3, 4), generator=g)
    labels[1, 0, 0] = 255
    assert ptc_loss(tokens, labels).item() == pytest.approx(slow_ptc(tokens, labels), rel=1e-5)
    # identical tokens with one label: perfect similarity, no negatives
    same = torch.ones(1, 4, 2, 2)
    assert ptc_loss(same, torch.zeros(1, 2, 2, dtype=torch.long)).item() == pytest.approx(0.5 * (1 - 12 / 13))


def test_dense_filter_equals_the_explicit_kernel():
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 5, 6, generator=g, dtype=torch.float64) * 255
    values = torch.rand(1, 2, 5, 6, generator=g, dtype=torch.float64)
    fast = filter_dense(image, values, sigma_rgb=15.0, sigma_xy=3.0, chunk=7)
    pixels = [(y, x) for y in range(5) for x in range(6)]
    slow = torch.zeros_like(values)
    for (y, x) in pixels:
        for (v, u) in pixels:
            d_xy = ((y - v) ** 2 + (x - u) ** 2) / 3.0 ** 2
            d_rgb = float(((image[0, :, y, x] - image[0, :, v, u]) ** 2).sum()) / 15.0 ** 2
            slow[0, :, y, x] += math.exp(-0.5 * (d_xy + d_rgb)) * values[0, :, v, u]
    assert torch.allclose(fast, slow, rtol=1e-9)


def _batch(h=16, w=20, seed=3):
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(1, 3, h, w)
    images[:, :, :, w // 2:] = 1.5              # two flat regions (normalised units)
    logits = torch.randn(1, 3, h, w, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (1, h, w), generator=g)
    labels[:, :4] = 255
    boxes = torch.tensor([[0, h, 0, w - 3]])
    return images, logits, labels, boxes


def test_energy_is_the_definition_at_the_reference_grid():
    images, logits, labels, boxes = _batch()
    probs = torch.softmax(logits, 1)
    loss = dense_energy_loss(images, probs, labels, boxes, [0, 0, 0], [1, 1, 1], sigma_xy=8.0, scale=0.5,
                             weight=1.0, max_pixels=10_000)
    rgb = F.interpolate(images * 255, size=(8, 10), mode="nearest")
    roi = torch.zeros(1, 1, 16, 20)
    roi[..., :17] = 1
    small_roi = F.interpolate(roi, size=(8, 10), mode="nearest")[:, 0]
    small_probs = F.interpolate(probs, size=(8, 10), mode="bilinear", align_corners=False)
    small_labels = F.interpolate(labels[:, None].float(), size=(8, 10), mode="nearest")[:, 0].long()
    expected = exact_dense_energy(rgb, small_probs, small_labels, small_roi, 15.0, 4.0) * LATTICE_FACTOR
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_coarser_grid_keeps_the_energy_scale():
    images, logits, labels, boxes = _batch(32, 40)
    probs = torch.softmax(logits.detach() * 0.1, 1)          # smooth probabilities
    full = dense_energy_loss(images, probs, labels, boxes, [0, 0, 0], [1, 1, 1], sigma_xy=40.0, weight=1.0,
                             max_pixels=100_000)
    coarse = dense_energy_loss(images, probs, labels, boxes, [0, 0, 0], [1, 1, 1], sigma_xy=40.0, weight=1.0,
                               max_pixels=80)
    assert coarse.item() == pytest.approx(full.item(), rel=0.3)
