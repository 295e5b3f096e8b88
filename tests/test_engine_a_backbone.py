"""net/vit_backbone.py and net/heads.py on tiny random-init timm models, CPU only."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import PipelineError
import torch.nn.functional as F

from net.heads import CamHead, LargeFOVHead
from net.vit_backbone import ViTBackbone

TINY = dict(name="vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4,
            embed_dim=32, num_heads=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _backbone(**kwargs) -> ViTBackbone:
    model = ViTBackbone(**{**TINY, **kwargs})
    # Random-init timm ViTs start with a zero position embedding; give it structure so
    # that resizing it is visible.
    with torch.no_grad():
        model.vit.pos_embed.normal_(std=0.5)
    return model.eval()


def test_patch_tokens_equal_timm_forward_features_at_native_size():
    model = _backbone()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(images)
        reference = model.vit.forward_features(images)
    prefix = model.vit.num_prefix_tokens
    expected = reference[:, prefix:].transpose(1, 2).reshape(2, 32, 4, 4)
    torch.testing.assert_close(out.patch, expected)
    torch.testing.assert_close(out.cls_token, reference[:, 0])
    assert out.attn is None


def test_extras_register_tokens_and_no_embed_class_match_timm():
    for extra in (dict(reg_tokens=2), dict(no_embed_class=True), dict(qk_norm=True, init_values=0.1)):
        model = _backbone(**extra)
        images = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            out = model(images)
            reference = model.vit.forward_features(images)
        prefix = model.vit.num_prefix_tokens
        torch.testing.assert_close(out.patch.flatten(2).transpose(1, 2), reference[:, prefix:])


def test_aux_is_raw_output_of_the_chosen_block():
    model = _backbone(aux_layer=-3)
    assert model.aux_index == 1
    images = torch.randn(2, 3, 40, 24)
    captured = {}
    model.vit.blocks[1].register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    with torch.no_grad():
        out = model(images)
    raw = captured["out"][:, model.vit.num_prefix_tokens:]
    torch.testing.assert_close(out.aux, raw.transpose(1, 2).reshape(2, 32, 5, 3))
    # Not normed: the final norm would change it.
    assert not torch.allclose(out.aux, model.vit.norm(raw).transpose(1, 2).reshape(2, 32, 5, 3))


def _slow_attention(block, x):
    """softmax(q k^T * scale) head by head, from the block's own qkv weights."""
    h = block.norm1(x)
    heads = block.attn.num_heads
    dim = h.shape[-1]
    head_dim = dim // heads
    weight, bias = block.attn.qkv.weight, block.attn.qkv.bias
    maps = []
    for b in range(len(h)):
        per_head = []
        for head in range(heads):
            rows = slice(head * head_dim, (head + 1) * head_dim)
            q = h[b] @ weight[rows].T + bias[rows]
            k = h[b] @ weight[dim:][rows].T + bias[dim:][rows]
            scores = (q @ k.T) / math.sqrt(head_dim)
            e = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            per_head.append(e / e.sum(dim=1, keepdim=True))
        maps.append(torch.stack(per_head))
    return torch.stack(maps)


def test_attention_maps_equal_explicit_softmax():
    model = _backbone()
    images = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        out = model(images, return_attn=True)
        plain = model(images)
        x, grid = model.embed(images)
        assert grid == (3, 5) and len(out.attn) == model.depth
        for block, attn in zip(model.vit.blocks, out.attn):
            assert attn.shape == (2, 2, 1 + 15, 1 + 15)
            torch.testing.assert_close(attn, _slow_attention(block, x), atol=1e-5, rtol=1e-4)
            x = block(x)  # timm's own block gives the next block's input
    # The explicit path (attention returned) and timm's fused path give the same tokens.
    torch.testing.assert_close(out.patch, plain.patch, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [(32, 32), (48, 24), (56, 72), (37, 29), (8, 8)])
def test_any_input_size_and_position_embedding_resized_bicubic(size):
    model = _backbone()
    images = torch.randn(1, 3, *size)
    with torch.no_grad():
        out = model(images)
    grid = (size[0] // 8, size[1] // 8)
    assert out.patch.shape == (1, 32, *grid) and out.aux.shape == (1, 32, *grid)
    # The resized embedding is ToCo's: bicubic, align_corners=False, no antialias.
    pos = model.vit.pos_embed
    patch_pos = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
    expected = torch.cat([pos[:, :1], expected.flatten(2).transpose(1, 2)], dim=1)
    torch.testing.assert_close(model.position_embedding(grid), expected)


def test_non_multiple_input_floors_like_a_cropped_input():
    model = _backbone()
    images = torch.randn(1, 3, 37, 29)
    with torch.no_grad():
        torch.testing.assert_close(model(images).patch, model(images[:, :, :32, :24]).patch)


def test_pos_embed_frozen_or_trainable_by_flag():
    assert _backbone().vit.pos_embed.requires_grad is False
    model = _backbone(pos_embed_trainable=True)
    assert model.vit.pos_embed.requires_grad is True
    model.train()
    model(torch.randn(1, 3, 48, 32)).patch.sum().backward()
    assert model.vit.pos_embed.grad is not None and model.vit.pos_embed.grad.abs().sum() > 0


def test_aux_layer_deeper_than_model_is_a_clear_error():
    with pytest.raises(PipelineError, match="aux_layer 4 is out of range.*4 blocks"):
        ViTBackbone(**{**TINY, "aux_layer": 4})
    with pytest.raises(PipelineError, match="aux_layer -5"):
        ViTBackbone(**{**TINY, "aux_layer": -5})
    assert ViTBackbone(**{**TINY, "aux_layer": -4}).aux_index == 0


def test_aux_layer_last_block_is_the_normed_tokens_as_in_toco():
    model = _backbone(aux_layer=-1)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    torch.testing.assert_close(out.aux, out.patch)


# ------------------------------------------------------------------------------------ heads


def test_cam_head_hand_computed():
    head = CamHead(in_channels=2, num_classes=2)
    with torch.no_grad():
        head.classifier.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, -2.0]]).reshape(2, 2, 1, 1))
    features = torch.tensor([[[[1.0, 3.0]], [[2.0, -1.0]]]])  # (1, 2, 1, 2): pixels (1, 2) and (3, -1)
    logits, cams = head(features)
    # GMP first: per channel max = (3, 2); logits = W (3, 2) = (3, 3 - 4 = -1)
    torch.testing.assert_close(logits, torch.tensor([[3.0, -1.0]]))
    # CAM = W F per pixel: class 0 (1, 3); class 1 (1 - 4, 3 + 2) = (-3, 5)
    torch.testing.assert_close(cams, torch.tensor([[[[1.0, 3.0]], [[-3.0, 5.0]]]]))
    assert head.classifier.bias is None
    torch.testing.assert_close(head.cam(features), cams)


def test_cam_head_average_pooling():
    head = CamHead(2, 1, pool="gap")
    with torch.no_grad():
        head.classifier.weight.fill_(1.0)
    logits, _ = head(torch.tensor([[[[1.0, 3.0]], [[2.0, -1.0]]]]))
    torch.testing.assert_close(logits, torch.tensor([[2.0 + 0.5]]))
    with pytest.raises(ValueError, match="pool"):
        CamHead(2, 1, pool="median")


def test_largefov_layers_and_hand_computed_dilation():
    head = LargeFOVHead(in_channels=1, num_classes=1, hidden_channels=1, dilation=5)
    convs = [head.conv6, head.conv7, head.conv8]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3), (1, 1)]
    assert [c.dilation for c in convs] == [(5, 5), (5, 5), (1, 1)]
    assert all(c.bias is None for c in convs)
    assert LargeFOVHead(768, 21).conv6.out_channels == 512
    with torch.no_grad():
        for conv in convs:
            conv.weight.zero_()
        head.conv6.weight[0, 0, 0, 0] = 1.0   # reads the pixel 5 up and 5 left
        head.conv7.weight[0, 0, 1, 1] = 1.0   # identity
        head.conv8.weight[0, 0] = 2.0
    x = torch.zeros(1, 1, 11, 11)
    x[0, 0, 2, 3] = 4.0
    x[0, 0, 4, 4] = -1.0
    out = head(x)
    expected = torch.zeros(1, 1, 11, 11)
    expected[0, 0, 7, 8] = 8.0   # 4 moved by (+5, +5), x2; the -1 is cut by the ReLU
    torch.testing.assert_close(out, expected)


def test_chain_backbone_heads_multiscale_refine():
    """The pieces fit: ViT -> (CAM, aux CAM) as one cam_fn -> multi-scale -> PAR label."""
    from engine.multiscale import multiscale_cams
    from engine.pseudo import valid_cams
    from engine.refine import LocalRefiner, refine_cams_with_refiner

    model = _backbone()
    head, aux_head = CamHead(32, 4), CamHead(32, 4)

    def cam_fn(images):
        features = model(images)
        return head.cam(features.patch), aux_head.cam(features.aux)

    images = torch.randn(2, 3, 48, 64)
    cams, aux = multiscale_cams(cam_fn, images)
    assert cams.shape == aux.shape == (2, 4, 48, 64)
    cls_labels = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    label = refine_cams_with_refiner(LocalRefiner("par", iterations=2), torch.rand(2, 3, 48, 64),
                                     valid_cams(cams, cls_labels), cls_labels, 0.7, 0.25, [[0, 48, 0, 64], [0, 40, 0, 64]])
    assert label.shape == (2, 48, 64) and (label[1, 40:] == 255).all()
    assert set(label[0].unique().tolist()) <= {0, 1, 4, 255} and set(label[1].unique().tolist()) <= {0, 2, 255}
