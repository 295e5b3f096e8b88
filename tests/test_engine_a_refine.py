"""engine/pseudo.py and engine/refine.py: hand-computed labels, PAR/VARM against a slow
per-pixel per-neighbour loop, kernel sums, batched == per image."""
from __future__ import annotations

import math

import pytest
import torch

from engine.pseudo import (
    box_mask,
    cam_to_label,
    combine_high_low,
    ignore_outside_box,
    refined_to_label,
    token_box_mask,
    token_labels,
    valid_cams,
)
from engine.refine import (
    NEIGHBOUR_OFFSETS,
    PRESETS,
    LocalRefiner,
    image_for_refiner,
    neighbour_distances,
    refine_cams_per_image,
    refine_cams_with_refiner,
)

I = 255


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------ pseudo labels


def test_cam_to_label_bkg_only_and_two_thresholds():
    # one image, 2 classes, 1x5 pixels; class 2 is absent so its 0.99 never counts
    cams = torch.tensor([[[[0.80, 0.60, 0.30, 0.20, 0.72]],
                          [[0.99, 0.99, 0.99, 0.99, 0.99]]]])
    labels = torch.tensor([[1, 0]])
    assert cam_to_label(cams, labels, bkg=0.5).tolist() == [[[1, 1, 0, 0, 1]]]
    assert cam_to_label(cams, labels, bkg=0.5, high=0.7, low=0.25).tolist() == [[[1, I, I, 0, 1]]]
    both = torch.tensor([[1, 1]])
    assert cam_to_label(cams, both, bkg=0.5, high=0.7, low=0.25).tolist() == [[[2, 2, 2, 2, 2]]]
    # bkg above high turns (high, bkg] into background, as the reference's order does
    assert cam_to_label(cams, labels, bkg=0.65, high=0.5, low=0.25).tolist() == [[[1, 0, I, 0, 1]]]
    # thresholds are inclusive: exactly low is background, exactly high is ignored
    edges = torch.tensor([[[[0.25, 0.5, 0.75]]]])
    assert cam_to_label(edges, torch.tensor([[1]]), bkg=0.5, high=0.75, low=0.25).tolist() == [[[0, I, I]]]
    assert cam_to_label(edges, torch.tensor([[1]]), bkg=0.5).tolist() == [[[0, 0, 1]]]
    with pytest.raises(ValueError):
        cam_to_label(cams, labels, bkg=0.5, high=0.7)


def test_box_mask_and_ignore_outside_box():
    label = torch.arange(12).reshape(1, 3, 4)
    box = [[1, 3, 0, 2]]  # rows 1..2, cols 0..1
    assert box_mask(box, 3, 4).int().tolist() == [[[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]]
    assert ignore_outside_box(label, box).tolist() == [[[I, I, I, I], [4, 5, I, I], [8, 9, I, I]]]
    cams = torch.ones(1, 1, 3, 4)
    assert cam_to_label(cams, torch.tensor([[1]]), 0.5, 0.7, 0.25, img_box=box).tolist() == \
        [[[I, I, I, I], [1, 1, I, I], [1, 1, I, I]]]


def test_token_box_reference_quirk_and_corrected():
    # 64x64 crop, patch 16 -> 4x4 tokens (centres at 8, 24, 40, 56); image at rows 40..63, cols 0..39
    box = torch.tensor([[40, 64, 0, 40]])
    quirk = token_box_mask(box, (4, 4), 16, box_in_pixels=True)
    assert not quirk.any()  # pixel row 40 > every token index: the whole target ignored
    fixed = token_box_mask(box, (4, 4), 16, box_in_pixels=False)
    assert fixed.int().tolist() == [[[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]]
    cams = torch.full((1, 1, 64, 64), 0.9)
    label = token_labels(cams, torch.tensor([[1]]), (4, 4), 0.7, 0.25, 0.5, box, 16, box_in_pixels=False)
    assert label.tolist() == [[[I] * 4, [I] * 4, [1, 1, I, I], [1, 1, I, I]]]
    assert (token_labels(cams, torch.tensor([[1]]), (4, 4), 0.7, 0.25, 0.5, box, 16) == I).all()
    # the quirk on a box without top/left padding: pixel coordinates used as token indices
    quirk = token_box_mask(torch.tensor([[0, 2, 1, 64]]), (4, 4), 16, box_in_pixels=True)
    assert quirk.int().tolist() == [[[0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]]


def test_combine_high_low_hand_computed():
    high = torch.tensor([[[3, 0, 0, 5, I]]])
    low = torch.tensor([[[3, 0, 2, 0, I]]])
    assert combine_high_low(high, low).tolist() == [[[3, 0, I, 5, I]]]


def test_refined_to_label_maps_channels_to_class_ids_and_skips_padding():
    refined = torch.tensor([[[[0.2, 0.1]], [[0.5, 0.05]], [[0.9, 0.9]]]])  # (1, 3, 1, 2)
    keys = torch.tensor([[0, 7, 0]])
    valid = torch.tensor([[True, True, False]])  # the third channel is padding
    assert refined_to_label(refined, keys, valid, (1, 2)).tolist() == [[[7, 0]]]
    # Upsampled before the argmax: a channel that is never the argmax at low resolution
    # wins between two pixels (1, 0, .7) and (0, 1, .7) once they are blended.
    refined = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.7, 0.7]]]])
    keys, valid = torch.tensor([[0, 3, 9]]), torch.ones(1, 3, dtype=torch.bool)
    assert refined_to_label(refined, keys, valid, (1, 6)).tolist() == [[[0, 0, 9, 9, 3, 3]]]


def test_valid_cams_zero_absent_classes():
    cams = torch.ones(1, 3, 2, 2)
    assert valid_cams(cams, torch.tensor([[1, 0, 1]])).sum(dim=(2, 3)).tolist() == [[4.0, 0.0, 4.0]]


def test_image_for_refiner_truncates_like_uint8():
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    pixels = torch.tensor([10.3, 10.7, 254.6, 0.4]).reshape(1, 1, 2, 2).repeat(1, 3, 1, 1)
    normalized = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    out = image_for_refiner(normalized) * 255
    torch.testing.assert_close(out, torch.tensor([10.0, 10.0, 254.0, 0.0]).reshape(1, 1, 2, 2).repeat(1, 3, 1, 1))
    # equals the reference's channel-wise denormalise + uint8 cast on in-range inputs
    normalized = (torch.rand(2, 3, 8, 8) * 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    reference = torch.stack([normalized[:, c] * std[c] + mean[c] for c in range(3)], dim=1).type(torch.uint8) / 255.0
    assert torch.equal(image_for_refiner(normalized), reference)


# ------------------------------------------------------------------------------ refiner


def slow_refine(image: torch.Tensor, masks: torch.Tensor, preset: str, iterations: int, dilations) -> torch.Tensor:
    """Per pixel, per neighbour, in Python floats, straight from the definitions."""
    cfg = PRESETS[preset]
    img = image.tolist()  # [c][y][x]
    m = masks.tolist()    # [k][y][x]
    channels, h, w = len(img), len(img[0]), len(img[0][0])
    offsets = [(d * dy, d * dx, d * (math.sqrt(2) if dy and dx else 1.0)) for d in dilations for dy, dx in NEIGHBOUR_OFFSETS]
    n = len(offsets)

    def at(y, x):
        return min(max(y, 0), h - 1), min(max(x, 0), w - 1)

    def softmax(values):
        top = max(values)
        e = [math.exp(v - top) for v in values]
        return [v / sum(e) for v in e]

    def std(values):
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))

    dist = [o[2] for o in offsets]
    position = softmax([-(d / (std(dist) + 1e-8) / cfg.position_temperature) ** 2 for d in dist])
    kernel = [[None] * w for _ in range(h)]
    for y in range(h):
        for x in range(w):
            appearance = [0.0] * n
            variation = [0.0] * n
            for c in range(channels):
                values = [img[c][at(y + oy, x + ox)[0]][at(y + oy, x + ox)[1]] for oy, ox, _ in offsets]
                sigma = std(values)
                for j, (oy, ox, _) in enumerate(offsets):
                    appearance[j] += -(abs(values[j] - img[c][y][x]) / (sigma + 1e-8) / cfg.appearance_temperature) ** 2 / channels
                    ny, nx = at(y + oy, x + ox)
                    by, bx = at(min(y + 1, h - 1) + oy, x + ox)   # same neighbour of the pixel below
                    ry, rx = at(y + oy, min(x + 1, w - 1) + ox)   # ... and of the pixel to the right
                    v = img[c][ny][nx]
                    variation[j] += ((v - img[c][by][bx]) ** 2 + (v - img[c][ry][rx]) ** 2) / channels
            prior = position if cfg.prior == "position" else softmax(variation)
            kernel[y][x] = [a + cfg.prior_weight * p for a, p in zip(softmax(appearance), prior)]
    for _ in range(iterations):
        m = [[[sum(kernel[y][x][j] * mk[at(y + oy, x + ox)[0]][at(y + oy, x + ox)[1]] for j, (oy, ox, _) in enumerate(offsets))
               for x in range(w)] for y in range(h)] for mk in m]
    return torch.tensor(m, dtype=torch.float64)


@pytest.mark.parametrize("preset", ["par", "varm"])
def test_refiner_equals_slow_per_pixel_loop(preset):
    image = torch.rand(3, 5, 6, dtype=torch.float64)
    image[:, :, 3:] += 0.5  # an edge
    masks = torch.rand(2, 5, 6, dtype=torch.float64)
    refiner = LocalRefiner(preset, iterations=3)
    fast = refiner(image[None], masks[None])[0]
    torch.testing.assert_close(fast, slow_refine(image, masks, preset, 3, PRESETS[preset].dilations), atol=1e-10, rtol=1e-9)
    # and with small dilations, where the neighbourhood sits mostly inside the image
    refiner = LocalRefiner(preset, dilations=(1, 2), iterations=2)
    fast = refiner(image[None], masks[None])[0]
    torch.testing.assert_close(fast, slow_refine(image, masks, preset, 2, (1, 2)), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("preset,total", [("par", 1.01), ("varm", 0.99)])
def test_kernel_sums_and_mass_after_ten_iterations(preset, total):
    refiner = LocalRefiner(preset)
    assert refiner.config.iterations == 10 and refiner.config.dilations == (1, 2, 4, 8, 12, 24)
    images = torch.rand(2, 3, 20, 24)
    kernel = refiner.kernel(images)
    assert kernel.shape == (2, 48, 20, 24)
    torch.testing.assert_close(kernel.sum(dim=1), torch.full((2, 20, 24), total))
    if preset == "varm":
        assert (kernel < 0).any()  # documented: some VARM weights are negative
    else:
        assert (kernel > 0).all()
    ones = torch.ones(2, 1, 20, 24)
    torch.testing.assert_close(refiner(images, ones), torch.full_like(ones, total ** 10))


def test_par_position_prior_mass_by_ring():
    # afa.md §4: 57.9% of the prior's mass on d=1, 35.6% on d=2, 6.5% on d=4
    distance = neighbour_distances((1, 2, 4, 8, 12, 24))
    position = (-(distance / distance.std() / 0.3) ** 2).softmax(dim=0)
    ring = position.reshape(6, 8).sum(dim=1)
    torch.testing.assert_close(ring[:3], torch.tensor([0.579, 0.356, 0.065]), atol=1e-3, rtol=0)
    # and the refiner uses exactly that prior: on a constant image the appearance softmax is uniform
    kernel = LocalRefiner("par").kernel(torch.full((1, 3, 6, 6), 0.5))
    torch.testing.assert_close(kernel[0, :, 2, 2], torch.full((48,), 1 / 48) + 0.01 * position)


@pytest.mark.parametrize("preset", ["par", "varm"])
def test_refiner_batched_equals_per_image(preset):
    refiner = LocalRefiner(preset)
    images = torch.rand(3, 3, 16, 20)
    masks = torch.rand(3, 4, 16, 20).softmax(dim=1)
    batched = refiner(images, masks)
    single = torch.cat([refiner(images[i:i + 1], masks[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single)


def test_unknown_preset_is_an_error():
    with pytest.raises(ValueError, match="unknown refiner preset"):
        LocalRefiner("crf")


# ------------------------------------------------------------------------------ refiner -> label


def _scene(batch=3, height=48, width=56, classes=5):
    images = torch.rand(batch, 3, height, width)
    cams = torch.rand(batch, classes, height // 8, width // 8)
    cams = torch.nn.functional.interpolate(cams, size=(height, width), mode="bilinear", align_corners=False)
    cls_labels = torch.zeros(batch, classes)
    cls_labels[0, [1, 3]] = 1
    cls_labels[1, :] = 1  # every class present
    # image 2: no foreground class at all
    boxes = torch.tensor([[0, height, 0, width], [5, 40, 8, 56], [0, 30, 0, 20]])
    return images, cams, cls_labels, boxes


@pytest.mark.parametrize("preset", ["par", "varm"])
def test_batched_pseudo_label_equals_reference_loop(preset):
    images, cams, cls_labels, boxes = _scene()
    refiner = LocalRefiner(preset)
    batched = refine_cams_with_refiner(refiner, images, valid_cams(cams, cls_labels), cls_labels, 0.7, 0.25, boxes)
    looped = refine_cams_per_image(refiner, images, valid_cams(cams, cls_labels), cls_labels, 0.7, 0.25, boxes)
    assert batched.dtype == torch.long and batched.shape == (3, 48, 56)
    assert torch.equal(batched, looped)
    present = {0, I} | {int(c) + 1 for c in torch.nonzero(cls_labels[0])[:, 0]}
    assert set(batched[0].unique().tolist()) <= present
    assert set(batched[2].unique().tolist()) <= {0, I}
    assert (batched[1, :5] == I).all() and (batched[1, :, :8] == I).all()
    # a second call with a different class layout (width of the padded stack differs)
    assert torch.equal(refine_cams_with_refiner(refiner, images[:1], cams[:1], cls_labels[:1], 0.7, 0.25, boxes[:1]), looped[:1])


def test_pseudo_label_hand_computed_bands():
    # Three vertical bands of CAM value 0.9 / 0.5 / 0.1 for the one present class.
    # Background planes 0.7 and 0.25, softmax over [bkg, class]:
    #   0.9: class wins under both planes            -> class
    #   0.5: bkg wins under 0.7, class under 0.25    -> ignore
    #   0.1: bkg wins under both                     -> background
    # With 0 iterations the refiner is the identity; the bottom 8 rows are padding.
    cams = torch.zeros(1, 2, 32, 48)
    cams[0, 1, :, :16], cams[0, 1, :, 16:32], cams[0, 1, :, 32:] = 0.9, 0.5, 0.1
    labels = torch.tensor([[0.0, 1.0]])
    box = [[0, 24, 0, 48]]
    out = refine_cams_with_refiner(LocalRefiner("par", iterations=0), torch.rand(1, 3, 32, 48), cams, labels, 0.7, 0.25, box)
    expected = torch.full((1, 32, 48), I)
    expected[0, :24, :15] = 2
    expected[0, :24, 33:] = 0
    inner = torch.ones(32, 48, dtype=torch.bool)
    inner[:, 14:18] = inner[:, 30:34] = False  # the bilinear seams between bands
    assert torch.equal(out[0][inner], expected[0][inner])
    # PAR on an image whose colours follow the bands keeps the band interiors
    image = torch.zeros(1, 3, 32, 48)
    image[..., 16:32] = 0.5
    image[..., 32:] = 1.0
    refined = refine_cams_with_refiner(LocalRefiner("par"), image, cams, labels, 0.7, 0.25, box)
    assert torch.equal(refined[0][inner], expected[0][inner])


def test_refiner_sees_half_resolution_image_and_softmaxed_stacks():
    images, cams, cls_labels, boxes = _scene(height=40, width=56)
    seen = {}

    class Recording(LocalRefiner):
        def forward(self, small_images, masks):
            seen["images"], seen["masks"] = small_images, masks
            return super().forward(small_images, masks)

    refine_cams_with_refiner(Recording("par", iterations=1), images, cams, cls_labels, 0.7, 0.25, boxes)
    expected = torch.nn.functional.interpolate(images, size=(20, 28), mode="bilinear", align_corners=False)
    torch.testing.assert_close(seen["images"], expected)
    masks = seen["masks"]
    assert masks.shape == (3, 2 * 6, 20, 28)  # image 1 has all 5 classes: 1 + 5 channels per stack
    # each stack is a distribution over background + the image's classes; padding channels are 0
    torch.testing.assert_close(masks[:, :6].sum(dim=1), torch.ones(3, 20, 28))
    torch.testing.assert_close(masks[:, 6:].sum(dim=1), torch.ones(3, 20, 28))
    assert (masks[0, 3:6] == 0).all() and (masks[2, 1:6] == 0).all() and (masks[2, 0] == 1).all()
    # the strict plane (0.7) gives background more mass than the lenient one (0.25)
    assert (masks[:2, 0] > masks[:2, 6]).all()
