"""Fully connected CRF (Krähenbühl & Koltun) over an RGB image, through
pydensecrf (the `pydensecrf2` package on PyPI).

Two uses: `dense_crf` refines class probabilities (DeepLab post-processing),
`crf_from_labels` refines a hard label map (IRNet's cam_to_ir_label). Both take
the original RGB uint8 image: the DeepLab reference fed a mean-subtracted
image wrapped to uint8, which we do not copy.
"""
from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf

# Smallest probability before the log: keeps the unary finite.
PROBABILITY_FLOOR = 1e-5


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an (H, W, 3) array, got {getattr(image, 'shape', type(image))}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got {image.dtype}")
    return np.ascontiguousarray(image)


def _run(image: np.ndarray, unary: np.ndarray, n_iters: int, gauss_sxy: float, gauss_compat: float,
         bilat_sxy: float, bilat_srgb: float, bilat_compat: float) -> np.ndarray:
    """Mean-field inference; `unary` is (C, H*W) float32 energy. Returns (C, H, W) float32."""
    height, width = image.shape[:2]
    n_labels = unary.shape[0]
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    crf.addPairwiseBilateral(sxy=bilat_sxy, srgb=bilat_srgb, rgbim=image, compat=bilat_compat)
    posterior = crf.inference(n_iters)
    return np.asarray(posterior, dtype=np.float32).reshape(n_labels, height, width)


def dense_crf(image: np.ndarray, probs: np.ndarray, n_iters: int = 10, gauss_sxy: float = 1,
              gauss_compat: float = 3, bilat_sxy: float = 67, bilat_srgb: float = 3,
              bilat_compat: float = 4) -> np.ndarray:
    """Refine (C, H, W) class probabilities over the (H, W, 3) uint8 RGB image.

    Unary = -log(clip(probs, 1e-5, 1)). Defaults are DeepLabv2's post-processing
    (Gaussian sxy 1 compat 3; bilateral sxy 67 srgb 3 compat 4; 10 iterations).
    Returns the (C, H, W) float32 posterior (sums to 1 over C).
    """
    image = _check_image(image)
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (C, H, W) with (H, W) = {image.shape[:2]}, got {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"probs must be floating point, got {probs.dtype}")
    unary = -np.log(np.clip(probs, PROBABILITY_FLOOR, 1.0)).reshape(probs.shape[0], -1)
    return _run(image, unary, n_iters, gauss_sxy, gauss_compat, bilat_sxy, bilat_srgb, bilat_compat)


def crf_from_labels(image: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float = 0.7,
                    n_iters: int = 10, gauss_sxy: float = 3, gauss_compat: float = 3, bilat_sxy: float = 50,
                    bilat_srgb: float = 5, bilat_compat: float = 10) -> np.ndarray:
    """Refine an (H, W) label map with values in [0, n_labels); returns (H, W) int64 labels.

    Unary as IRNet's cam_to_ir_label: each pixel's label has probability
    `gt_prob`, every other label (1 - gt_prob) / (n_labels - 1); every label is
    a real class (no "unsure" value). Defaults are IRNet's (Gaussian sxy 3
    compat 3; bilateral sxy 50 srgb 5 compat 10; 10 iterations).
    """
    image = _check_image(image)
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels must be (H, W) = {image.shape[:2]}, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if n_labels < 1:
        raise ValueError(f"n_labels must be at least 1, got {n_labels}")
    if not 0.0 < gt_prob < 1.0:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"labels must lie in [0, {n_labels}), found [{labels.min()}, {labels.max()}]")
    if n_labels == 1:
        return np.zeros(labels.shape, dtype=np.int64)

    flat = labels.reshape(-1).astype(np.intp)
    unary = np.full((n_labels, flat.size), -np.log((1.0 - gt_prob) / (n_labels - 1)), dtype=np.float32)
    unary[flat, np.arange(flat.size)] = -np.log(gt_prob)
    posterior = _run(image, unary, n_iters, gauss_sxy, gauss_compat, bilat_sxy, bilat_srgb, bilat_compat)
    return posterior.argmax(axis=0).astype(np.int64)


def crf_arguments(params) -> dict:
    """Keyword arguments of `dense_crf` / `crf_from_labels` from a config `CrfParams` block."""
    return {"n_iters": params.iters, "gauss_sxy": params.gauss_sxy, "gauss_compat": params.gauss_compat,
            "bilat_sxy": params.bilat_sxy, "bilat_srgb": params.bilat_srgb, "bilat_compat": params.bilat_compat}
