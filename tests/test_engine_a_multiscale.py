"""engine/multiscale.py against a slow per-scale, per-image loop, and the flip identities."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.multiscale import minmax_normalize, multiscale_cams, scaled_size


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


WEIGHTS = torch.randn(3, 3, 1, 1)


def equivariant_cam_fn(images):
    """Stride-4 pooling then a 1x1 conv: commutes with a mirror when widths divide by 4."""
    return F.conv2d(F.avg_pool2d(images, 4), WEIGHTS)


def positional_cam_fn(images):
    """Not mirror-equivariant: adds a left-to-right ramp; the grid floors (stride 4)."""
    cams = equivariant_cam_fn(images)
    ramp = torch.linspace(0.0, 3.0, cams.shape[-1])
    return cams + ramp


def two_map_cam_fn(images):
    cams = positional_cam_fn(images)
    return cams, -cams[:, :2]


def slow_multiscale(cam_fn, images, scales, flip=True):
    """One image, one scale, one orientation at a time; min-max by explicit loops."""
    b, _, h, w = images.shape
    out = []
    for i in range(b):
        image = images[i:i + 1]
        total = 0
        for s in [1.0] + [s for s in scales if s != 1.0]:
            size = (int(s * h), int(s * w))
            x = image if s == 1.0 else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
            cam = F.interpolate(cam_fn(x), size=(h, w), mode="bilinear", align_corners=False)
            if flip:
                mirrored = cam_fn(torch.flip(x, dims=[3]))
                mirrored = torch.flip(F.interpolate(mirrored, size=(h, w), mode="bilinear", align_corners=False), dims=[3])
                cam = torch.maximum(cam, mirrored)
            total = total + cam.clamp(min=0)
        norm = torch.empty_like(total)
        for k in range(total.shape[1]):
            shifted = total[0, k] - total[0, k].min()
            norm[0, k] = shifted / (shifted.max() + 1e-5)
        out.append(norm)
    return torch.cat(out)


@pytest.mark.parametrize("size", [(32, 32), (37, 50)])
def test_equals_slow_loop(size):
    images = torch.randn(3, 3, *size)
    fast = multiscale_cams(positional_cam_fn, images, scales=(1.0, 0.5, 1.5))
    torch.testing.assert_close(fast, slow_multiscale(positional_cam_fn, images, (1.0, 0.5, 1.5)), atol=1e-5, rtol=1e-5)
    assert fast.shape == (3, 3, *size)
    assert fast.min() >= 0 and fast.max() < 1


def test_tuple_outputs_fused_separately():
    images = torch.randn(2, 3, 40, 28)
    cams, aux = multiscale_cams(two_map_cam_fn, images, scales=(1.0, 0.5, 1.5))
    torch.testing.assert_close(cams, slow_multiscale(positional_cam_fn, images, (1.0, 0.5, 1.5)), atol=1e-5, rtol=1e-5)
    aux_fn = lambda x: two_map_cam_fn(x)[1]  # noqa: E731
    torch.testing.assert_close(aux, slow_multiscale(aux_fn, images, (1.0, 0.5, 1.5)), atol=1e-5, rtol=1e-5)
    (single,) = multiscale_cams(lambda x: (positional_cam_fn(x),), images)
    torch.testing.assert_close(single, cams)


def test_flip_fusion_with_equivariant_cam_fn_equals_single_pass():
    # For a mirror-equivariant cam_fn, cam(flip x) un-flipped is cam(x), so the fusion
    # must equal the no-flip result on any (asymmetric) input; without the un-flip it
    # would be max(cam, mirrored cam).
    images = torch.randn(2, 3, 32, 48)
    assert not torch.allclose(images, images.flip(-1))
    fused = multiscale_cams(equivariant_cam_fn, images)
    torch.testing.assert_close(fused, multiscale_cams(equivariant_cam_fn, images, flip=False), atol=1e-5, rtol=1e-5)


def test_mirror_symmetric_input_gives_mirror_symmetric_cam_for_any_cam_fn():
    # max(cam(x), unflip(cam(flip x))) with x == flip x is max(c, flip c): symmetric even
    # for a cam_fn that is not equivariant. Without the un-flip it would be c itself.
    half = torch.randn(2, 3, 32, 16)
    images = torch.cat([half, half.flip(-1)], dim=-1)
    fused = multiscale_cams(positional_cam_fn, images)
    torch.testing.assert_close(fused, fused.flip(-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fused, multiscale_cams(positional_cam_fn, images, flip=False), atol=1e-3)


def test_scale_one_runs_first_sizes_floor_and_flip_doubles_the_batch():
    seen = []

    def recording_cam_fn(x):
        seen.append(tuple(x.shape))
        return equivariant_cam_fn(x)

    images = torch.randn(2, 3, 100, 100)
    multiscale_cams(recording_cam_fn, images, scales=(0.29, 1.0, 1.5))
    assert seen == [(4, 3, 100, 100), (4, 3, 28, 28), (4, 3, 150, 150)]
    assert scaled_size(100, 100, 0.29) == (28, 28)


def test_scales_must_list_one():
    with pytest.raises(ValueError, match="must include 1.0"):
        multiscale_cams(equivariant_cam_fn, torch.randn(1, 3, 32, 32), scales=(0.5, 1.5))


def test_minmax_normalize_hand_computed():
    cams = torch.tensor([[[[1.0, 3.0], [2.0, 5.0]]]])
    expected = torch.tensor([[[[0.0, 2.0], [1.0, 4.0]]]]) / (4.0 + 1e-5)
    torch.testing.assert_close(minmax_normalize(cams), expected)
