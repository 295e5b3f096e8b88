"""The two CAM branches of CRT (net/resnet_cam.py, net/vit_cam.py) on tiny
random-init models, CPU only."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from net.resnet_cam import ResNetCAM
from net.vit_cam import (
    ViTCAM,
    merge_windows,
    overlap_counts,
    tile_windows,
    window_layout,
)
from pipeline.errors import PipelineError

TINY_VIT = dict(name="deit_tiny_patch16_224", num_classes=5, window=64, patch_size=8, depth=2, embed_dim=64, num_heads=2)
# Exercises the optional parts of timm's block: q/k norm, layer scale, register tokens.
TINY_VIT_EXTRAS = dict(TINY_VIT, name="vit_small_patch16_224", qk_norm=True, init_values=0.1, reg_tokens=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _images(height=65, width=97, batch=2):
    return torch.randn(batch, 3, height, width)


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _assert_partition(model, groups):
    backbone, head = groups
    ids = [id(p) for p in backbone + head]
    assert len(ids) == len(set(ids)), "a parameter is in two groups (or twice in one)"
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}


# ---------------------------------------------------------------- ResNet branch


@pytest.mark.parametrize("backbone, dilate", [("resnet18", True), ("resnet18", False), ("resnet10t", True)])
def test_resnet_cam_shapes_at_stride_16(backbone, dilate):
    model = ResNetCAM(backbone, num_classes=5, dilate_last_stage=dilate)
    x = _images()
    logits, cam = model(x)
    assert logits.shape == (2, 5)
    assert cam.shape == (2, 5, math.ceil(65 / 16), math.ceil(97 / 16))
    torch.testing.assert_close(logits, cam.mean(dim=(2, 3)))
    assert model.classifier.bias is None
    with torch.no_grad():
        torch.testing.assert_close(model.eval().cam(x), cam.detach())


def test_resnet_frozen_parts_stay_frozen():
    model = ResNetCAM("resnet18", num_classes=5).train()
    assert model.training and not any(bn.training for bn in _batchnorms(model))
    stats_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}

    logits, _ = model(_images())
    logits.sum().backward()

    for k, v in model.state_dict().items():
        if k in stats_before:
            assert torch.equal(v, stats_before[k]), f"BatchNorm statistic {k} changed in a train-mode forward"
    b = model.backbone
    for module in (b.conv1, b.bn1, b.layer1, b.layer2):
        for p in module.parameters():
            assert not p.requires_grad and p.grad is None
    for bn in _batchnorms(model):
        assert all(not p.requires_grad and p.grad is None for p in bn.parameters())
    assert b.layer3[0].conv1.weight.grad is not None and b.layer4[0].conv1.weight.grad is not None
    assert model.classifier.weight.grad is not None
    _assert_partition(model, model.param_groups())


def test_resnet_gradient_stops_after_layer2_even_if_unfrozen():
    model = ResNetCAM("resnet18", num_classes=5)
    for p in model.backbone.layer2.parameters():
        p.requires_grad_(True)
    model(_images())[0].sum().backward()
    assert all(p.grad is None for p in model.backbone.layer2.parameters())


def test_resnet_bn_affine_trainable_option_reproduces_reference():
    model = ResNetCAM("resnet18", num_classes=5, bn_affine_trainable=True).train()
    model(_images())[0].sum().backward()
    assert model.backbone.layer3[0].bn1.weight.grad is not None
    assert not model.backbone.bn1.weight.requires_grad and not model.backbone.layer1[0].bn1.weight.requires_grad
    assert not any(bn.training for bn in _batchnorms(model))
    _assert_partition(model, model.param_groups())


def test_resnet_undilated_last_stage_is_plain_stride_one():
    """dilate_last_stage=False == a stride-32 ResNet whose layer4 just lost its stride (IRNet's strides 2,2,2,1)."""
    model = ResNetCAM("resnet18", num_classes=5, dilate_last_stage=False).eval()
    reference = ResNetCAM("resnet18", num_classes=5, output_stride=32).eval()
    reference.load_state_dict(model.state_dict())
    reference.backbone.layer4[0].conv1.stride = (1, 1)
    reference.backbone.layer4[0].downsample[0].stride = (1, 1)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model.cam(x), reference.cam(x))


# ---------------------------------------------------------------- window tiling and merging


@pytest.mark.parametrize("size, padded, count", [
    ((65, 97), (96, 128), (2, 3)),
    ((10, 20), (64, 64), (1, 1)),
    ((64, 96), (64, 96), (1, 2)),
    ((128, 33), (128, 64), (3, 1)),
])
def test_window_layout(size, padded, count):
    layout = window_layout(*size, window=64)
    assert (layout.padded_height, layout.padded_width) == padded
    assert (layout.rows, layout.cols) == count
    assert layout.stride == 32


@pytest.mark.parametrize("cell", [1, 8])
def test_tiling_then_merging_equals_untiled_map(cell):
    """With a translation-equivariant per-window function (cell pooling plus a
    pointwise channel mix), merging the window maps must give the map of the whole
    padded image: any misplaced window or wrong average shows up."""
    mix = torch.randn(4, 3)

    def per_window(images):
        pooled = F.avg_pool2d(images, cell) if cell > 1 else images
        return torch.tanh(torch.einsum("kc,bchw->bkhw", mix, pooled))

    x = _images()
    layout = window_layout(65, 97, 64)
    windows = tile_windows(x, layout)
    assert windows.shape == (2 * 6, 3, 64, 64)
    merged = merge_windows(per_window(windows), layout, cell)
    padded = F.pad(x, (0, 128 - 97, 0, 96 - 65))
    torch.testing.assert_close(merged, per_window(padded))


def test_tiling_order_is_image_then_row_major():
    x = _images()
    layout = window_layout(65, 97, 64)
    windows = tile_windows(x, layout).reshape(2, 2, 3, 3, 64, 64)
    padded = F.pad(x, (0, 128 - 97, 0, 96 - 65))
    for b in range(2):
        for r in range(2):
            for c in range(3):
                assert torch.equal(windows[b, r, c], padded[b, :, 32 * r:32 * r + 64, 32 * c:32 * c + 64])


def test_overlap_counts_at_borders():
    layout = window_layout(65, 97, 64)  # padded 96 x 128 -> 2 x 3 windows -> 12 x 16 cells of 8 px
    rows = torch.tensor([1.0] * 4 + [2.0] * 4 + [1.0] * 4)
    cols = torch.tensor([1.0] * 4 + [2.0] * 8 + [1.0] * 4)
    assert torch.equal(overlap_counts(layout, 8), rows[:, None] * cols[None, :])
    assert torch.equal(overlap_counts(window_layout(30, 40, 64), 8), torch.ones(8, 8))


def test_merge_averages_disagreeing_windows():
    layout = window_layout(64, 96, 64)  # two windows side by side, overlapping on the middle 32 px
    maps = torch.stack([torch.full((1, 8, 8), 1.0), torch.full((1, 8, 8), 3.0)])
    merged = merge_windows(maps, layout, 8)[0, 0]
    expected = torch.tensor([1.0] * 4 + [2.0] * 4 + [3.0] * 4).expand(8, 12)
    assert torch.equal(merged, expected)


# ---------------------------------------------------------------- transformer branch


def test_vit_cam_shapes_on_odd_sizes():
    model = ViTCAM(recurrence=2, **TINY_VIT)
    assert model.patch_size == 8
    for height, width in ((65, 97), (20, 30)):
        x = _images(height, width)
        logits, maps = model(x)
        assert logits.shape == (2, 5)
        assert maps.shape == (2, 5, math.ceil(height / 8), math.ceil(width / 8))
        torch.testing.assert_close(logits, maps.mean(dim=(2, 3)))
        cams = model.semantic_cam(x)
        assert cams.shape == maps.shape and bool((cams >= 0).all())


@pytest.mark.parametrize("config", [TINY_VIT, TINY_VIT_EXTRAS], ids=["deit", "qknorm-layerscale-registers"])
def test_explicit_attention_forward_equals_timm(config):
    model = ViTCAM(recurrence=1, **config).eval()
    windows = torch.randn(3, 3, 64, 64)
    attentions = []
    with torch.no_grad():
        expected = model.vit.forward_features(windows)
        torch.testing.assert_close(model.encode(windows, attentions.append), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode(windows), expected)
    tokens = model.vit.num_prefix_tokens + 64
    assert len(attentions) == 2 and attentions[0].shape == (3, 2, tokens, tokens)
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(3, 2, tokens))


@pytest.mark.parametrize("residual_first_pass", [False, True])
def test_recurrence_applies_outer_residual(residual_first_pass):
    model = ViTCAM(recurrence=3, residual_first_pass=residual_first_pass, **TINY_VIT).eval()
    vit = model.vit
    windows = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x = vit._pos_embed(vit.patch_embed(windows))
        x = x + vit.blocks(x) if residual_first_pass else vit.blocks(x)
        for _ in range(2):
            x = x + vit.blocks(x)
        torch.testing.assert_close(model.encode(windows), vit.norm(x))
        torch.testing.assert_close(model.encode(windows, lambda a: None), vit.norm(x), rtol=1e-5, atol=1e-5)


def _slow_semantic_cam(model, images):
    """CRT's CAM written out: loops over windows, block applications and heads."""
    vit, p, window = model.vit, model.patch_size, model.window
    _, _, height, width = images.shape
    half = window // 2
    padded_h = max(window, -(-height // half) * half)
    padded_w = max(window, -(-width // half) * half)
    padded = torch.zeros(images.shape[0], 3, padded_h, padded_w)
    padded[:, :, :height, :width] = images
    grid = window // p
    total = torch.zeros(images.shape[0], model.head.out_channels, padded_h // p, padded_w // p)
    for b in range(images.shape[0]):
        count = torch.zeros(padded_h // p, padded_w // p)
        for top in range(0, padded_h - window + 1, half):
            for left in range(0, padded_w - window + 1, half):
                crop = padded[b:b + 1, :, top:top + window, left:left + window]
                x = vit._pos_embed(vit.patch_embed(crop))[0]  # (N, D)
                cls_attention = torch.zeros(grid * grid)
                for step in range(model.recurrence):
                    y = x
                    for block in vit.blocks:
                        attn = block.attn
                        h = block.norm1(y)
                        q_all, k_all, v_all = attn.qkv(h).chunk(3, dim=-1)
                        heads_out = []
                        for head in range(attn.num_heads):
                            cols = slice(head * attn.head_dim, (head + 1) * attn.head_dim)
                            q, k, v = q_all[:, cols], k_all[:, cols], v_all[:, cols]
                            weights = torch.softmax(q @ k.T / math.sqrt(attn.head_dim), dim=-1)
                            cls_attention += weights[0, 1:] / attn.num_heads
                            heads_out.append(weights @ v)
                        y = y + attn.proj(torch.cat(heads_out, dim=-1))
                        y = y + block.mlp(block.norm2(y))
                    x = y if step == 0 else x + y
                tokens = vit.norm(x)[1:]  # (g*g, D), row-major patches
                maps = model.head(tokens.T.reshape(1, -1, grid, grid))[0]
                r, c = top // p, left // p
                total[b, :, r:r + grid, c:c + grid] += maps * cls_attention.reshape(grid, grid)
                count[r:r + grid, c:c + grid] += 1
        total[b] /= count
    return F.relu(total[:, :, :-(-height // p), :-(-width // p)])


def test_semantic_cam_equals_slow_explicit_computation():
    model = ViTCAM(recurrence=2, **TINY_VIT).eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model.semantic_cam(x), _slow_semantic_cam(model, x), rtol=1e-4, atol=1e-5)


def test_semantic_cam_needs_class_token():
    model = ViTCAM(recurrence=1, **dict(TINY_VIT, name="vit_small_patch16_224"), class_token=False, global_pool="avg")
    x = _images(32, 32)
    assert model(x)[1].shape == (2, 5, 4, 4)
    with pytest.raises(PipelineError, match="class token"):
        model.semantic_cam(x)


def test_vit_param_groups_and_gradients():
    model = ViTCAM(recurrence=2, **TINY_VIT).train()
    backbone, head = model.param_groups()
    _assert_partition(model, (backbone, head))
    assert {id(p) for p in head} == {id(p) for p in model.head.parameters()}
    model(_images())[0].sum().backward()
    assert model.head.weight.grad is not None and model.vit.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize("kwargs", [dict(window=60), dict(img_size=96), dict(recurrence=0)])
def test_vit_cam_rejects_bad_configuration(kwargs):
    config = dict(TINY_VIT, recurrence=1)
    config.update(kwargs)
    with pytest.raises(PipelineError):
        ViTCAM(**config)
