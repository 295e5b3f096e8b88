"""The image the local refiner (PAR / VARM) sees when the pipeline makes pseudo labels.

The data config's mean/std are on the 0..1 scale; `image_for_refiner` wants them on the 0..255
scale. Passed through unscaled, every pixel truncated to 0: the refiner saw a black image, its
kernel lost the appearance term and became a plain blur, and the online pseudo labels of every
single-stage run (and make_sem_seg's cam_refine route) were the CAMs smeared over 24-px dilations.
These tests record what the refiner is given on both routes and compare it with the image.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.refine import LocalRefiner, image_for_refiner
from pipeline.config import DataConfig, ThresholdConfig, TrainNetConfig
from pipeline.transforms import normalize, to_tensor


class RecordingRefiner(LocalRefiner):
    """PAR that keeps the images it was called with."""

    def __init__(self):
        super().__init__("par", iterations=2, dilations=(1, 2))
        self.seen: list[torch.Tensor] = []

    def forward(self, images, masks):
        self.seen.append(images.clone())
        return super().forward(images, masks)


def random_image(seed: int, h: int = 24, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def expected_small(image: np.ndarray, down_scale: int = 2) -> torch.Tensor:
    """What the refiner should see: the uint8 image / 255, resized as the route resizes it."""
    rgb = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    h, w = image.shape[:2]
    return F.interpolate(rgb, size=(h // down_scale, w // down_scale), mode="bilinear", align_corners=False)


def test_train_net_refiner_sees_the_image():
    from stages.train_net import SingleStageLoss

    data = DataConfig()
    loss = SingleStageLoss(TrainNetConfig(), data, SimpleNamespace(device=torch.device("cpu")))
    loss.refiner = RecordingRefiner()
    images = [random_image(seed) for seed in (0, 1)]
    batch = torch.stack([to_tensor(normalize(image, data.mean, data.std)) for image in images])
    cams = torch.rand(2, 20, 24, 32)
    targets = torch.zeros(2, 20)
    targets[0, 3] = targets[1, [0, 7]] = 1
    boxes = torch.tensor([[0, 24, 0, 32], [2, 24, 0, 30]])
    labels = loss.pseudo_labels(batch, cams, targets, boxes)
    assert labels.shape == (2, 24, 32)
    (seen,) = loss.refiner.seen
    # one grey level of slack: the uint8 cast truncates the de-normalised float
    want = torch.cat([expected_small(image) for image in images])
    assert (seen - want).abs().max() <= 1.5 / 255
    assert seen.std() > 0.1          # a black (or constant) image would pass nothing above


def test_make_sem_seg_refiner_sees_the_image():
    from stages.make_sem_seg import cam_refine_labels

    data = DataConfig()
    image = random_image(2)
    refiner = RecordingRefiner()
    cam = {"keys": np.array([4, 11]), "high_res": np.random.default_rng(3).random((2, 24, 32), dtype=np.float32)}
    label = cam_refine_labels(refiner, image, cam, 20, ThresholdConfig(), 2, data.mean, data.std)
    assert label.shape == (24, 32)
    (seen,) = refiner.seen
    assert (seen - expected_small(image)).abs().max() <= 1.5 / 255


def test_image_for_refiner_refuses_the_unit_scale():
    data = DataConfig()
    with pytest.raises(ValueError, match="0..255"):
        image_for_refiner(torch.zeros(1, 3, 4, 4), data.mean, data.std)
