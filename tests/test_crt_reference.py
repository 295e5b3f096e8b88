"""CRT as published: the reference networks that configs/voc12.yaml builds, and tests that fail
on the one-line mistakes that once passed the suite (a missing un-flip in the multi-scale CAM
or in the IRN boundary map, class k written as k − 1 in the IR labels), plus the "perfect CAM"
identity: CAMs made from the ground truth survive IR labels and the random walk."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from net.affinity import pair_labels, random_walk
from net.irn import IRNet, boundary_and_displacement
from net.registry import build_model
from net.vit_cam import padded_side, window_layout
from pipeline.config import load_config
from pipeline.metrics import confusion_matrix, miou_percent
from stages.cam_to_ir_label import confident_labels
from stages.make_cam import multiscale_cam, normalize_cams, strided_size
from stages.make_sem_seg import walk_to_labels
from stages.train_cam import cnn_model_args, cotraining_loss, vit_model_args

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ----------------------------------------------------------------------------- the reference networks

@pytest.fixture(scope="module")
def voc12():
    return load_config(REPO / "configs" / "voc12.yaml",
                       ["train_cam.cnn.pretrained=false", "train_cam.vit.pretrained=false",
                        "train_irn.pretrained=false", "train_deeplab.pretrained=false"])


def test_voc12_uses_torchvision_weights(voc12):
    assert voc12.train_cam.cnn.backbone == "resnet152.tv_in1k"
    assert voc12.train_irn.backbone == "resnet50.tv_in1k"


def test_voc12_cam_cnn_is_the_reference(voc12):
    cnn = build_model("resnet_cam", cnn_model_args(voc12.train_cam, 20))
    b = cnn.backbone
    # stride 16 by removing layer4's stride, no dilation
    assert b.layer4[0].conv2.stride == (1, 1) and all(m.dilation == (1, 1) for m in b.layer4.modules()
                                                       if isinstance(m, torch.nn.Conv2d))
    assert b.layer3[0].conv2.stride == (2, 2)
    with torch.no_grad():
        assert cnn.cam(torch.zeros(1, 3, 64, 96)).shape[-2:] == (4, 6)
    # stem, layer1, layer2 frozen; BatchNorm statistics frozen; later BatchNorm affine trains
    assert not any(p.requires_grad for p in b.conv1.parameters())
    assert not any(p.requires_grad for p in b.layer2.parameters())
    assert b.layer3[0].bn1.weight.requires_grad and b.layer4[0].bn1.bias.requires_grad
    assert b.layer3[0].conv1.weight.requires_grad
    cnn.train()
    assert not b.layer3[0].bn1.training                  # running statistics never update


def test_voc12_transformer_branch_is_the_reference(voc12):
    vit = build_model("vit_cam", vit_model_args(voc12.train_cam, 20))
    assert vit.recurrence == 3 and vit.residual_first_pass and len(vit.vit.blocks) == 12
    assert vit.vit.embed_dim == 384 and vit.patch_size == 16
    assert vit.head.kernel_size == (3, 3)
    # window padding (side // 112 + 1) * 112: a side that is a multiple still gets 112 more
    assert padded_side(336, 224, "reference") == 448 and padded_side(300, 224, "reference") == 336
    assert padded_side(336, 224, "minimal") == 336
    layout = window_layout(336, 300, 224, vit.window_padding)
    assert (layout.padded_height, layout.padded_width) == (448, 336)


def test_voc12_irn_is_the_reference(voc12):
    from stages.train_irn import model_args

    irn = build_model("irn", model_args(voc12.train_irn))
    assert irn.backbone.layer4[0].conv2.stride == (1, 1)
    assert all(m.dilation == (1, 1) for m in irn.backbone.layer4.modules() if isinstance(m, torch.nn.Conv2d))
    assert not any(p.requires_grad for p in irn.backbone.parameters())
    assert not irn.displacement_centering.track_in_training       # mean set after training
    assert voc12.train_irn.pair_sources == "cropped" and voc12.make_sem_seg.irn_pad_to == 512


def test_voc12_other_reference_keys(voc12):
    assert voc12.train_cam.consistency_align_corners and voc12.train_cam.interpolation == "bicubic"
    assert voc12.train_cam.consistency_teacher == "none" and voc12.train_cam.cam_lambda == pytest.approx(0.1)
    assert voc12.make_cam.interpolation == "bicubic" and voc12.make_cam.full_res_rounding == 16
    assert voc12.train_cam.optimizer.momentum == pytest.approx(1e-4)


def test_consistency_uses_align_corners():
    cams = torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 3)
    logits, targets = torch.zeros(1, 2), torch.ones(1, 2)
    on = cotraining_loss(logits, logits, *cams, targets, (8, 8), 1.0, True, align_corners=True)["consistency"]
    expected = (F.interpolate(cams[0], (8, 8), mode="bilinear", align_corners=True)
                - F.interpolate(cams[1], (8, 8), mode="bilinear", align_corners=True)).abs().mean()
    assert on == pytest.approx(float(expected))


# ----------------------------------------------------------------------------- un-flip identities

def _asymmetric_image(h=40, w=52, seed=0):
    rng = np.random.default_rng(seed)
    image = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    image[5:20, 3:18] = (250, 30, 30)         # a red block near the left edge
    return image


def _equivariant_cam(batch):
    """A flip-equivariant 'network': stride-4 average of the red channel (minus green), 2 classes."""
    red = F.avg_pool2d(batch[:, :1] - batch[:, 1:2], 4, ceil_mode=True)
    return torch.cat([F.relu(red), F.relu(-red)], dim=1)


def _normalised(image):
    return torch.from_numpy(((image / 255.0 - MEAN) / STD).astype(np.float32)).permute(2, 0, 1)[None]


def test_multiscale_cam_flip_fusion_equals_twice_the_single_pass():
    """With a flip-equivariant network, map(image) + unflip(map(flipped image)) = 2 map(image)."""
    image = _asymmetric_image()
    strided, full = multiscale_cam(_equivariant_cam, image, [1.0], MEAN, STD, "cpu", "bilinear", 4)
    twice = 2 * _equivariant_cam(_normalised(image))
    assert torch.allclose(strided, F.interpolate(twice, size=(10, 13), mode="bilinear")[0], atol=1e-5)
    assert torch.allclose(full, F.interpolate(twice, size=(40, 52), mode="bilinear")[0], atol=1e-5)
    assert int(full[0].sum(0).argmax()) < image.shape[1] // 2     # the red block is on the left


def test_full_res_cams_are_cropped_from_the_rounded_grid():
    image = _asymmetric_image(36, 44)       # multiples of 4: the stand-in network is flip-equivariant
    _, full16 = multiscale_cam(_equivariant_cam, image, [1.0], MEAN, STD, "cpu", "bilinear", 16)
    maps = _equivariant_cam(_normalised(image))
    expected = F.interpolate(maps * 2, size=(48, 48), mode="bilinear", align_corners=False)[0, :, :36, :44]
    assert torch.allclose(full16, expected, atol=1e-5)


class _EquivariantIRN(torch.nn.Module):
    """Boundary logit = the red channel at stride 4 (flip-equivariant), zero displacement."""

    def forward(self, x, centre=True):
        red = F.avg_pool2d(x[:, :1], 4, ceil_mode=True)
        return red, torch.zeros(x.shape[0], 2, *red.shape[-2:])


def test_boundary_map_unflips_the_mirror():
    image = _asymmetric_image()
    boundary, _ = boundary_and_displacement(_EquivariantIRN(), image, MEAN, STD, "cpu")
    x = torch.from_numpy(((image / 255.0 - MEAN) / STD).astype(np.float32)).permute(2, 0, 1)[None]
    expected = torch.sigmoid(F.avg_pool2d(x[:, :1], 4, ceil_mode=True))[0, 0].numpy()
    assert np.allclose(boundary, expected, atol=1e-5)


def test_irn_padding_keeps_the_grid():
    model = IRNet("resnet10t", pretrained=False).eval()
    image = _asymmetric_image(50, 70)
    boundary, displacement = boundary_and_displacement(model, image, MEAN, STD, "cpu", pad_to=128)
    assert boundary.shape == strided_size((50, 70), 4) and displacement.shape == (2, 13, 18)


# ----------------------------------------------------------------------------- labels

def test_ir_labels_write_class_k_as_k_plus_one():
    image = np.full((24, 24, 3), 40, np.uint8)
    image[6:18, 6:18] = 220
    cams = np.zeros((1, 24, 24), np.float32)
    cams[0, 6:18, 6:18] = 1.0
    crf = {"n_iters": 5, "gauss_sxy": 3, "gauss_compat": 3, "bilat_sxy": 50, "bilat_srgb": 5, "bilat_compat": 10,
           "gt_prob": 0.7}
    label = confident_labels(image, cams, np.array([4]), 0.35, 0.15, crf)
    assert label[12, 12] == 5 and label[0, 0] == 0
    assert set(np.unique(label)) <= {0, 5, 255}


def test_pair_sources_cropped_as_the_reference():
    label = np.zeros((10, 12), np.uint8)
    every = pair_labels(label, 3)
    cropped = pair_labels(label, 3, cropped_sources=True)
    assert every["bg_pos"][:, 9, 0].any()                  # a border source with some target inside
    assert not cropped["bg_pos"][:, 9, :].any() and not cropped["bg_pos"][:, :, 0].any()
    assert not cropped["bg_pos"][:, :, 11].any() and cropped["bg_pos"][:, 0:8, 2:10].all()


def _shapes_scene(seed):
    rng = np.random.default_rng(seed)
    h, w = 128, 160
    image = np.full((h, w, 3), 30, np.uint8)
    gt = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for cls, (cx, colour) in ((3, (45, (220, 60, 60))), (7, (115, (60, 200, 90)))):
        cy, r = rng.integers(40, h - 40), rng.integers(24, 32)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        image[disc], gt[disc] = colour, cls
    return image, gt


def gt_boundary(gt: np.ndarray) -> np.ndarray:
    """A ground-truth boundary map on the stride-4 grid: 1 where a 4x4 cell holds two labels."""
    h, w = strided_size(gt.shape, 4)
    padded = np.pad(gt, ((0, h * 4 - gt.shape[0]), (0, w * 4 - gt.shape[1])), mode="edge")
    cells = padded.reshape(h, 4, w, 4).transpose(0, 2, 1, 3).reshape(h, w, 16)
    return (cells.min(axis=2) != cells.max(axis=2)).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_perfect_cam_survives_ir_labels_and_the_walk(seed):
    """CAMs made from the ground truth -> IR labels -> random walk over the ground-truth boundary
    -> pseudo labels: mIoU at least 90 (a class-index slip or a lost flip would break it)."""
    image, gt = _shapes_scene(seed)
    keys = np.array(sorted(set(np.unique(gt)) - {0})) - 1
    full = torch.from_numpy(np.stack([(gt == k + 1).astype(np.float32) for k in keys]))
    full = F.avg_pool2d(full[None], 5, stride=1, padding=2)[0]           # a soft CAM, like a network's
    strided = F.interpolate(full[None], size=strided_size(gt.shape, 4), mode="bilinear", align_corners=False)[0]
    full, strided = normalize_cams(full, np.arange(len(keys))), normalize_cams(strided, np.arange(len(keys)))
    crf = {"n_iters": 5, "gauss_sxy": 3, "gauss_compat": 3, "bilat_sxy": 50, "bilat_srgb": 5, "bilat_compat": 10,
           "gt_prob": 0.7}
    ir = confident_labels(image, full.numpy(), keys, 0.35, 0.15, crf)
    n = 21
    assert miou_percent(confusion_matrix(np.where(ir == 255, 0, ir), gt, n)) >= 85
    walked = random_walk(strided.numpy(), gt_boundary(gt), radius=5, beta=10, exp_times=2)
    label = walk_to_labels(np.asarray(walked), keys, gt.shape, 0.25)
    assert miou_percent(confusion_matrix(label, gt, n)) >= 90


def test_voc12_deeplab_is_the_reference(voc12):
    from stages.train_deeplab import model_args

    msc = build_model("deeplab", model_args(voc12.train_deeplab, 21))
    backbone = msc.base.backbone
    for name, rate in (("layer3", 2), ("layer4", 4)):
        for block in getattr(backbone, name):
            assert block.conv2.dilation == (rate, rate) and block.conv2.padding == (rate, rate), name
    assert voc12.train_deeplab.scales == [0.5, 0.75, 1.0, 1.25, 1.5]
    assert voc12.train_deeplab.loss_resolution == "logits"  # labels sampled at the logit map's pixel centres
    with torch.no_grad():
        assert msc.eval()(torch.zeros(1, 3, 65, 81)).shape[-2:] == (9, 11)


def test_deeplab_crops_pad_at_the_bottom_right(tmp_path):
    from deeplab.train_utils import DeepLabCropDataset
    from pipeline.catalogue import Catalogue
    from pipeline.artifacts import save_label_png

    class Data:
        def load_image(self, image_id):
            return np.full((20, 30, 3), 200, np.uint8)

        def image_path(self, image_id):
            return Path(image_id)

    labels = Catalogue(tmp_path, tmp_path).sem_seg
    save_label_png(labels.path("a"), np.full((20, 30), 3, np.uint8))
    data = DeepLabCropDataset(Data(), ["a"], labels, crop=48, scales=[1.0], mean=MEAN, std=STD)
    for epoch in range(4):
        _, label, _ = data[epoch]
        label = label.numpy()
        # the image keeps its top-left corner inside the crop: padding only at the bottom (and, flipped, a side)
        assert (label[:20] != 255).sum() == 20 * 30 and (label[20:] == 255).all()
