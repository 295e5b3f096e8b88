"""Instance grouping from IRNet's displacement field (make_ins_seg; off by default, as in CRT).

Following IRNet (step/make_ins_seg_labels.py and the paper's supplement):
1. `find_centroids`: every pixel walks along the displacement field (bilinearly
   interpolated, clipped to the grid) for a fixed number of steps; where it ends
   is its instance centroid. The field is in stride-4 pixels, channel 0 = dy,
   channel 1 = dx, pointing from a pixel to its centroid.
2. `cluster_centroids`: pixels whose displacement is short (|D| < 2.5) form
   "centroid regions"; each connected region (4-connectivity) is one instance,
   and a pixel belongs to the region its centroid lands in.
3. `instance_maps`: every class CAM is split into one map per instance; the
   random walk (`net.affinity.random_walk`) then propagates those maps.
4. `detect_instances`: after the walk (upsampled, divided by the global
   maximum), a background plane at a threshold and an argmax give one mask per
   (class, instance) map; each 4-connected piece of it is a detection scored by
   its maximum walked score (0 for pieces below `min_fragment_size` pixels).
"""
from __future__ import annotations

import numpy as np
import scipy.ndimage

# 4-connectivity, as skimage.measure.label(connectivity=1) in the reference.
_FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])


def find_centroids(displacement: np.ndarray, iterations: int = 300) -> np.ndarray:
    """(2, h, w) int64 centroid (y, x) of every pixel after `iterations` steps along `displacement` (2, h, w)."""
    displacement = np.asarray(displacement, dtype=np.float64)
    if displacement.ndim != 3 or displacement.shape[0] != 2:
        raise ValueError(f"find_centroids expects a (2, h, w) displacement field, got {displacement.shape}")
    _, h, w = displacement.shape
    y, x = np.mgrid[:h, :w].astype(np.float64)
    for _ in range(iterations):
        y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
        y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
        fy, fx = y - y0, x - x0
        step = (displacement[:, y0, x0] * (1 - fy) * (1 - fx) + displacement[:, y0, x1] * (1 - fy) * fx
                + displacement[:, y1, x0] * fy * (1 - fx) + displacement[:, y1, x1] * fy * fx)
        y = np.clip(y + step[0], 0, h - 1)
        x = np.clip(x + step[1], 0, w - 1)
    return np.stack([np.round(y), np.round(x)]).astype(np.int64)


def cluster_centroids(centroids: np.ndarray, displacement: np.ndarray, threshold: float = 2.5) -> np.ndarray:
    """(h, w) int64 instance ids 0..M−1: the centroid region each pixel's centroid lands in.

    Pixels whose centroid lands outside every region (on a long displacement)
    share one id. Ids are contiguous and carry no class or background meaning.
    """
    displacement = np.asarray(displacement)
    regions, _ = scipy.ndimage.label(np.hypot(displacement[0], displacement[1]) < threshold, structure=_FOUR_CONNECTED)
    landed = regions[centroids[0], centroids[1]]
    _, instance_ids = np.unique(landed, return_inverse=True)
    return instance_ids.reshape(landed.shape).astype(np.int64)


def instance_maps(cams: np.ndarray, instance_ids: np.ndarray) -> np.ndarray:
    """(C·M, h, w): each class map of `cams` (C, h, w) restricted to each instance, class-major
    (map c·M + m is class c on instance m)."""
    num_instances = int(instance_ids.max()) + 1
    masks = instance_ids[None] == np.arange(num_instances)[:, None, None]
    return (cams[:, None] * masks[None]).reshape(-1, *instance_ids.shape)


def detect_instances(scores: np.ndarray, class_ids: np.ndarray, background_threshold: float,
                     min_fragment_size: float = 0) -> dict[str, np.ndarray]:
    """Detections from walked instance maps `scores` (N, H, W) (divided by their global maximum).

    `class_ids` (N,) labels each map. Returns {"score": (S,) float32, "mask":
    (S, H, W) bool, "class": (S,) int64}; empty arrays when nothing is detected.
    """
    scores = np.asarray(scores)
    n, height, width = scores.shape
    winner = np.concatenate([np.full((1, height, width), background_threshold, scores.dtype), scores]).argmax(axis=0)
    detected_scores, masks, classes = [], [], []
    for index in range(n):
        pieces, count = scipy.ndimage.label(winner == index + 1, structure=_FOUR_CONNECTED)
        for piece in range(1, count + 1):
            mask = pieces == piece
            detected_scores.append(0.0 if mask.sum() < min_fragment_size else float(scores[index][mask].max()))
            masks.append(mask)
            classes.append(int(class_ids[index]))
    return {
        "score": np.asarray(detected_scores, np.float32),
        "mask": np.stack(masks) if masks else np.zeros((0, height, width), bool),
        "class": np.asarray(classes, np.int64),
    }
