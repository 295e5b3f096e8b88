"""DeepLabv2 model, MSC wrapper, checkpoint loading and training helpers: CPU,
random init, tiny inputs."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from deeplab.model import MSC, DeepLabV2, load_deeplab_checkpoint
from deeplab.train_utils import msc_loss, param_groups, random_scale_crop, resize_labels
from pipeline.errors import PipelineError
from pipeline.trainer import Schedule, set_lr


def poly_lr(base, step, max_steps, power=0.9):
    return base * Schedule("poly", power=power).factor(step, max_steps)


def set_poly_lr(optimizer, base, step, max_steps, power=0.9):
    return set_lr(optimizer, base, Schedule("poly", power=power).factor(step, max_steps))


NUM_CLASSES = 5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepLabV2("resnet18", num_classes=NUM_CLASSES, pretrained=False)


def batchnorms(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# --- model -------------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["resnet18", "resnet10t"])
def test_output_is_ceil_of_stride_8_on_odd_and_even_sizes(backbone):
    net = DeepLabV2(backbone, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        for height, width in [(65, 97), (64, 96), (33, 41)]:
            logits = net(torch.randn(1, 3, height, width))
            assert logits.shape == (1, NUM_CLASSES, math.ceil(height / 8), math.ceil(width / 8))


def test_aspp_is_four_dilated_convs_initialised_as_reference(model):
    convs = list(model.aspp.branches)
    assert [c.dilation for c in convs] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert all(c.kernel_size == (3, 3) and c.padding == c.dilation for c in convs)
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.std().item() - 0.01) < 0.001
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs)


def test_msc_training_outputs_and_fusion(model):
    msc = MSC(model, scales=(0.75, 0.5)).train()
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        outputs = msc(x)
    # 65x97 -> 9x13; 0.75: 48x72 -> 6x9; 0.5: 32x48 -> 4x6.
    assert [tuple(o.shape[2:]) for o in outputs] == [(9, 13), (6, 9), (4, 6), (9, 13)]
    resized = [F.interpolate(o, size=(9, 13), mode="bilinear", align_corners=False) for o in outputs[1:3]]
    expected_max = torch.stack([outputs[0], *resized]).amax(0)
    assert torch.allclose(outputs[-1], expected_max)
    assert torch.allclose(outputs[0], model(x), atol=1e-5)

    msc.resize_scaled_outputs = True
    with torch.no_grad():
        same_size = msc(x)
    assert all(o.shape == (2, NUM_CLASSES, 9, 13) for o in same_size)
    assert torch.equal(same_size[-1], torch.stack(same_size[:-1]).amax(0))

    msc.eval()
    with torch.no_grad():
        fused = msc(x)
    assert isinstance(fused, torch.Tensor) and torch.allclose(fused, outputs[-1], atol=1e-5)
    msc.train()


def test_msc_without_scales_is_the_base_network(model):
    msc = MSC(model, scales=()).train()
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        outputs = msc(x)
        assert len(outputs) == 1 and torch.allclose(outputs[0], model(x), atol=1e-5)
        msc.eval()
        assert torch.allclose(msc(x), model(x), atol=1e-5)
    msc.train()


def test_config_rates_and_scales_reach_the_built_model():
    from net.registry import build_model
    from pipeline.config import load_config
    from stages.train_deeplab import model_args

    section = load_config(None, ["train_deeplab.aspp_rates=[1,2,3,4]", "train_deeplab.msc_scales=[]",
                                 "train_deeplab.backbone=resnet10t", "train_deeplab.pretrained=false"]).train_deeplab
    built = build_model("deeplab", model_args(section, NUM_CLASSES))
    assert [c.dilation for c in built.base.aspp.branches] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert all(c.padding == c.dilation for c in built.base.aspp.branches)
    assert built.scales == ()
    assert list(load_config(None, []).train_deeplab.aspp_rates) == [6, 12, 18, 24]  # the reference's


def test_batchnorm_frozen_in_train_mode(model):
    msc = MSC(model).train()
    assert model.training and model.aspp.training
    norms = batchnorms(model)
    assert norms and not any(m.training for m in norms)
    assert not any(p.requires_grad for m in norms for p in m.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    msc(torch.randn(2, 3, 33, 33) * 5 + 3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- checkpoints ---------------------------------------------------------------

def test_checkpoint_round_trip_project_formats(model, tmp_path):
    path = tmp_path / "deeplab.pth"
    torch.save({"model": MSC(model).state_dict(), "step": 3}, path)  # wrapped, "base." keys
    for target in (DeepLabV2("resnet18", num_classes=NUM_CLASSES), MSC(DeepLabV2("resnet18", num_classes=NUM_CLASSES))):
        missing, unexpected = load_deeplab_checkpoint(target, path)
        assert missing == [] and unexpected == []
        base = target.base if isinstance(target, MSC) else target
        for key, value in model.state_dict().items():
            assert torch.equal(base.state_dict()[key], value), key


def test_checkpoint_plain_backbone_reports_missing_head(model, tmp_path):
    path = tmp_path / "resnet18.pth"
    backbone_state = dict(model.backbone.state_dict(), **{"fc.weight": torch.zeros(1000, 512)})
    torch.save(backbone_state, path)
    fresh = DeepLabV2("resnet18", num_classes=NUM_CLASSES)
    missing, unexpected = load_deeplab_checkpoint(fresh, path)
    assert missing == sorted(k for k in fresh.state_dict() if k.startswith("aspp."))
    assert unexpected == ["backbone.fc.weight"]
    assert torch.equal(fresh.backbone.conv1.weight, model.backbone.conv1.weight)


def test_checkpoint_other_class_count_skips_head_and_bad_files_fail(model, tmp_path):
    path = tmp_path / "other.pth"
    torch.save(DeepLabV2("resnet18", num_classes=3).state_dict(), path)
    missing, unexpected = load_deeplab_checkpoint(DeepLabV2("resnet18", num_classes=NUM_CLASSES), path)
    head = sorted(k for k in model.state_dict() if k.startswith("aspp."))
    assert missing == head and unexpected == head
    with pytest.raises(PipelineError, match="not found"):
        load_deeplab_checkpoint(model, tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="cannot read"):
        load_deeplab_checkpoint(model, tmp_path / "junk.pth")


# --- optimisation ------------------------------------------------------------------

def test_param_groups_cover_each_trainable_parameter_once(model):
    groups = param_groups(MSC(model), base_lr=0.01, weight_decay=5e-4)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "aspp_weight", "aspp_bias"}
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable)
    assert set(ids) == {id(p) for p in trainable}
    expected = {"backbone": (1.0, 5e-4), "aspp_weight": (10.0, 5e-4), "aspp_bias": (20.0, 0.0)}
    for name, (mult, decay) in expected.items():
        assert by_name[name]["lr_mult"] == mult and by_name[name]["weight_decay"] == decay
        assert by_name[name]["lr"] == pytest.approx(0.01 * mult)
    assert {id(p) for p in by_name["aspp_bias"]["params"]} == {id(c.bias) for c in model.aspp.branches}
    assert {id(p) for p in by_name["aspp_weight"]["params"]} == {id(c.weight) for c in model.aspp.branches}


def test_poly_lr_values_and_optimizer_update(model):
    assert poly_lr(0.01, 0, 100) == pytest.approx(0.01)
    assert poly_lr(0.01, 100, 100) == 0.0
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.535887, rel=1e-5)  # 0.5 ** 0.9
    assert poly_lr(0.01, 75, 100, power=1.0) == pytest.approx(0.0025)
    assert poly_lr(0.01, 150, 100) == 0.0
    optimizer = torch.optim.SGD(param_groups(model, 0.01, 5e-4), lr=0.01, momentum=0.9)
    set_poly_lr(optimizer, 0.01, 50, 100, 0.9)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    base = 0.01 * 0.535887
    assert lrs["backbone"] == pytest.approx(base, rel=1e-5)
    assert lrs["aspp_weight"] == pytest.approx(10 * base, rel=1e-5)
    assert lrs["aspp_bias"] == pytest.approx(20 * base, rel=1e-5)


# --- loss --------------------------------------------------------------------------

def nll(scores, target):
    """-log softmax(scores)[target], by hand."""
    return -(scores[target] - math.log(sum(math.exp(s) for s in scores)))


def test_msc_loss_hand_computed_2x2():
    logits = torch.tensor([[[[2.0, 0.0], [1.0, 0.5]],
                            [[0.0, 1.0], [3.0, 0.5]]]])  # (1, 2, 2, 2)
    labels = torch.tensor([[[0, 1], [255, 1]]])

    expected = (nll([2.0, 0.0], 0) + nll([0.0, 1.0], 1) + nll([0.5, 0.5], 1)) / 3
    assert msc_loss([logits], labels).item() == pytest.approx(expected, rel=1e-6)
    assert msc_loss([logits, logits * 0], labels).item() == pytest.approx(expected + math.log(2), rel=1e-6)


def test_msc_loss_ignores_255_pixels():
    torch.manual_seed(0)
    labels = torch.randint(0, NUM_CLASSES, (2, 8, 8))
    labels[:, :3] = 255
    outputs = [torch.randn(2, NUM_CLASSES, 8, 8, requires_grad=True), torch.randn(2, NUM_CLASSES, 8, 8)]
    loss = msc_loss(outputs, labels)
    changed = [o.detach().clone() for o in outputs]
    for o in changed:
        o[:, :, :3] = torch.randn_like(o[:, :, :3]) * 10
    assert msc_loss(changed, labels).item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(outputs[0].grad[:, :, :3]) == 0
    all_ignored = torch.full((2, 8, 8), 255)
    empty = msc_loss(outputs, all_ignored)
    assert empty.item() == 0.0 and empty.requires_grad


@pytest.mark.parametrize("size_in,size_out", [((321, 321), (41, 41)), ((321, 240), (31, 41)), ((65, 97), (9, 13)),
                                              ((5, 7), (12, 9))])
def test_label_resize_matches_reference_pil_nearest(size_in, size_out):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 21, size_in).astype(np.float32)
    reference = np.asarray(Image.fromarray(labels).resize(size_out[::-1], resample=Image.NEAREST))
    ours = resize_labels(torch.from_numpy(labels).long()[None], size_out)[0].numpy()
    assert np.array_equal(ours, reference)


def test_msc_loss_resizes_labels_to_each_output():
    labels = torch.randint(0, NUM_CLASSES, (1, 16, 16))
    small = torch.randn(1, NUM_CLASSES, 4, 4)
    expected = F.cross_entropy(small, labels[:, 2::4, 2::4])  # pixel centres of 4x4 cells
    assert msc_loss([small], labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_msc_loss_at_label_resolution_upsamples_the_logits_bilinearly():
    # a 1x2 logit map read at 1x4 (align_corners=False): columns sit at -0.25, 0.25, 0.75, 1.25
    # of the source, clamped to [0, 1], so the weights of the right cell are 0, 1/4, 3/4, 1
    logits = torch.tensor([[[[0.0, 4.0]], [[2.0, 0.0]]]])  # (1, 2, 1, 2)
    labels = torch.tensor([[[1, 0, 255, 0]]])

    def column(w):  # class scores where the right cell has weight w
        return [0.0 * (1 - w) + 4.0 * w, 2.0 * (1 - w) + 0.0 * w]

    expected = (nll(column(0.0), 1) + nll(column(0.25), 0) + nll(column(1.0), 0)) / 3
    assert msc_loss([logits], labels, resolution="labels").item() == pytest.approx(expected, rel=1e-6)
    # the reference's way samples the labels at the logits' two pixel centres (columns 1 and 3)
    assert msc_loss([logits], labels).item() == pytest.approx((nll([0.0, 2.0], 0) + nll([4.0, 0.0], 0)) / 2, rel=1e-6)
    all_ignored = torch.full((1, 1, 4), 255)
    assert msc_loss([logits], all_ignored, resolution="labels").item() == 0.0
    with pytest.raises(ValueError, match="resolution"):
        msc_loss([logits], labels, resolution="image")


# --- augmentation ------------------------------------------------------------------

COLOURS = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20], [20, 230, 230]], np.uint8)


def coloured_scene(height=60, width=90):
    """Label from position (not mirror-symmetric), image colour from label."""
    y, x = np.mgrid[:height, :width]
    label = ((x // 11) + 2 * (y // 13)) % len(COLOURS)
    label[:9, :14] = 4
    return COLOURS[label], label.astype(np.uint8)


def test_random_scale_crop_keeps_image_and_label_aligned():
    image, label = coloured_scene()
    for seed in range(12):
        out_image, out_label = random_scale_crop(image, label, crop=41, rng=np.random.default_rng(seed))
        assert out_image.shape == (41, 41, 3) and out_label.shape == (41, 41)
        assert out_image.dtype == np.uint8 and out_label.dtype == np.uint8
        assert out_image.flags.c_contiguous and out_label.flags.c_contiguous
        # Away from label edges, where bilinear blends colours (the crop's border counts as an
        # edge: the next label is unseen), the colour must be the label's.
        padded = np.pad(out_label, 1, constant_values=254)
        interior = np.ones_like(out_label, dtype=bool)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                interior &= padded[dy:dy + 41, dx:dx + 41] == out_label
        interior &= out_label != 255
        assert interior.sum() > 100
        error = np.abs(out_image[interior].astype(int) - COLOURS[out_label[interior]].astype(int)).max()
        assert error <= 1, f"seed {seed}: image and label misaligned"


def test_random_scale_crop_pads_label_with_255_and_image_with_mean():
    image, label = coloured_scene(20, 30)
    for seed in range(4):
        out_image, out_label = random_scale_crop(image, label, crop=41, scale_range=(1.0, 1.0),
                                                 rng=np.random.default_rng(seed), pad_rgb=(124, 116, 104))
        pad = out_label == 255
        assert pad.sum() == 41 * 41 - 20 * 30
        assert (out_image[pad] == (124, 116, 104)).all()
    _, half = random_scale_crop(image, label, crop=41, scale_choices=(0.5,), rng=np.random.default_rng(0))
    assert (half != 255).sum() == 10 * 15
    with pytest.raises(ValueError, match="label"):
        random_scale_crop(image, label[:, :-1], crop=41)


def _as_reference_names(state: dict, prefix: str = "") -> dict:
    """Our DeepLabV2 state dict under deeplab-pytorch's (Caffe-converted) key names."""
    inverse = {"conv1": ("reduce", "conv"), "bn1": ("reduce", "bn"), "conv2": ("conv3x3", "conv"),
               "bn2": ("conv3x3", "bn"), "conv3": ("increase", "conv"), "bn3": ("increase", "bn")}
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        if parts[:2] == ["backbone", "conv1"]:
            name = ["layer1", "conv1", "conv", *parts[2:]]
        elif parts[:2] == ["backbone", "bn1"]:
            name = ["layer1", "conv1", "bn", *parts[2:]]
        elif parts[0] == "backbone":
            stage, block = f"layer{int(parts[1][5:]) + 1}", f"block{int(parts[2]) + 1}"
            if parts[3] == "downsample":
                name = [stage, block, "shortcut", "conv" if parts[4] == "0" else "bn", *parts[5:]]
            else:
                unit, kind = inverse[parts[3]]
                name = [stage, block, unit, kind, *parts[4:]]
        else:                                   # aspp.branches.K.* -> aspp.cK.*
            name = ["aspp", f"c{parts[2]}", *parts[3:]]
        out[prefix + ".".join(name)] = value
    return out


def test_reference_deeplab_checkpoint_loads_every_backbone_tensor(tmp_path):
    from deeplab.model import map_reference_keys

    source = DeepLabV2("resnet101", num_classes=91)           # COCO-stuff head: its ASPP will not fit
    reference = _as_reference_names(source.state_dict(), prefix="base.")
    assert "base.layer2.block1.reduce.conv.weight" in reference and "base.aspp.c3.bias" in reference
    assert "base.layer5.block3.increase.bn.running_var" in reference and len(reference) > 500
    mapped = map_reference_keys(reference)
    assert set(mapped) == {k for k in source.state_dict() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": reference}, tmp_path / "coco_init.pth")
    target = DeepLabV2("resnet101", num_classes=21)
    missing, unexpected = load_deeplab_checkpoint(target, tmp_path / "coco_init.pth")
    assert all(k.startswith("aspp.") for k in missing) and all(k.startswith("aspp.") for k in unexpected)
    for key, value in target.backbone.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, source.backbone.state_dict()[key]), key
    # a reference-format file of another network is refused, naming the file
    torch.save({"layer1.conv1.conv.weight": torch.zeros(3, 3, 1, 1)}, tmp_path / "other.pth")
    with pytest.raises(PipelineError, match="other.pth"):
        load_deeplab_checkpoint(DeepLabV2("resnet101", num_classes=21), tmp_path / "other.pth")


# --- input convention ------------------------------------------------------------

def test_caffe_input_is_bgr_minus_the_caffe_mean_and_its_padding_maps_to_zero():
    from deeplab.train_utils import CAFFE_MEAN_BGR, deeplab_input, input_pad_rgb

    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 0] = (10, 20, 30)                                  # R, G, B
    x = deeplab_input(image, "caffe_bgr", (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert x[:, 0, 0].tolist() == pytest.approx([30 - 104.008, 20 - 116.669, 10 - 122.675], abs=1e-4)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert deeplab_input(image, "imagenet", mean, std)[:, 0, 0].tolist() == pytest.approx(
        [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (30 / 255 - 0.406) / 0.225], abs=1e-5)
    for norm, bound in (("caffe_bgr", 0.5), ("imagenet", 0.01)):   # 0..255 units, normalised units
        pad = np.full((1, 1, 3), input_pad_rgb(norm, mean), np.uint8)
        assert deeplab_input(pad, norm, mean, std).abs().max() < bound, norm
    assert input_pad_rgb("caffe_bgr", mean) == (123, 117, 104) and CAFFE_MEAN_BGR[0] == 104.008


def test_input_norm_auto_follows_the_checkpoint_and_survives_the_weights_file(tmp_path):
    from deeplab.model import build_deeplab
    from net.registry import load_model, save_model
    from stages.test_deeplab import predict

    reference = _as_reference_names(DeepLabV2("resnet18", num_classes=NUM_CLASSES).state_dict(), prefix="base.")
    torch.save(reference, tmp_path / "coco_init.pth")
    torch.save(MSC(DeepLabV2("resnet18", num_classes=NUM_CLASSES)).state_dict(), tmp_path / "ours.pth")
    args = {"backbone": "resnet18", "num_classes": NUM_CLASSES, "msc_scales": []}
    assert build_deeplab(**args, pretrained=str(tmp_path / "coco_init.pth"), input_norm="auto").input_norm == "caffe_bgr"
    assert build_deeplab(**args, pretrained=str(tmp_path / "ours.pth"), input_norm="auto").input_norm == "imagenet"
    assert build_deeplab(**args, pretrained=False, input_norm="auto").input_norm == "imagenet"
    model = build_deeplab(**args, pretrained=str(tmp_path / "ours.pth"), input_norm="caffe_bgr").eval()
    assert model.input_norm == "caffe_bgr"
    save_model(tmp_path / "deeplab.pth", model, "deeplab", {**args, "pretrained": False, "input_norm": model.input_norm})
    loaded = load_model(tmp_path / "deeplab.pth", "cpu", expect="deeplab")
    assert loaded.input_norm == "caffe_bgr"
    # test_deeplab feeds the image the way the model was trained to read it
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    logits, _ = predict(loaded, image, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "cpu")
    bgr = torch.from_numpy(image[..., ::-1].astype(np.float32) - np.array([104.008, 116.669, 122.675], np.float32))
    with torch.no_grad():
        expected = loaded(bgr.permute(2, 0, 1)[None])[0]
    assert torch.allclose(logits, expected, atol=1e-4)
