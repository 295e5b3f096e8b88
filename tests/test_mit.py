"""The MiT (SegFormer) encoder: every layer against a slow explicit computation written with plain
tensor ops, shapes and strides, the attention logits, loading SegFormer-release checkpoints by
their official key names, the errors, and the published B0-B5 sizes."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from net.mit import MIT_VARIANTS, MixTransformer, mit
from pipeline.errors import PipelineError

TINY = {"embed_dims": (8, 16, 24, 32), "num_heads": (1, 2, 3, 4), "mlp_ratios": (4, 2, 4, 3),
        "depths": (1, 2, 1, 2), "sr_ratios": (8, 4, 2, 1)}


# ----------------------------------------------------------------------------------------------
# The slow reference: channels-last (B, H, W, C) maps, weights read by their official names.

def slow_layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def slow_linear(x, weight, bias):
    return torch.einsum("...i,oi->...o", x, weight) + bias


def slow_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def slow_patch_conv(x, weight, bias, stride):
    """(B, H, W, Cin) -> (B, H', W', Cout): zero padding kernel//2, then a sum of kernel taps."""
    k = weight.shape[-1]
    pad = k // 2
    padded = F.pad(x.permute(0, 3, 1, 2), (pad, pad, pad, pad)).permute(0, 2, 3, 1)
    out_h = (x.shape[1] + 2 * pad - k) // stride + 1
    out_w = (x.shape[2] + 2 * pad - k) // stride + 1
    out = bias.expand(x.shape[0], out_h, out_w, -1).clone()
    for dy in range(k):
        for dx in range(k):
            tap = padded[:, dy:dy + stride * (out_h - 1) + 1:stride, dx:dx + stride * (out_w - 1) + 1:stride]
            out = out + torch.einsum("bhwi,oi->bhwo", tap, weight[:, :, dy, dx])
    return out


def slow_depthwise3x3(x, weight, bias):
    """(B, H, W, C) 3x3 depthwise conv, zero padding 1: each channel sums its own 9 shifted taps."""
    h, w = x.shape[1:3]
    padded = F.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1)).permute(0, 2, 3, 1)
    out = bias.expand_as(x).clone()
    for dy in range(3):
        for dx in range(3):
            out = out + padded[:, dy:dy + h, dx:dx + w] * weight[:, 0, dy, dx]
    return out


def slow_spatial_reduction(x, weight, bias, r):
    """(B, H, W, C) -> (B, H//r, W//r, C): non-overlapping r x r patches (the remainder dropped),
    each mapped by the conv weight (Cout, Cin, r, r)."""
    b, h, w, c = x.shape
    hr, wr = h // r, w // r
    patches = x[:, :hr * r, :wr * r].reshape(b, hr, r, wr, r, c)
    return torch.einsum("byiwjc,ocij->bywo", patches, weight) + bias


def slow_attention(x, sd, prefix, heads, sr):
    """Returns the attended tokens (B, H, W, C) and the logits (B, heads, N, Nr)."""
    b, h, w, c = x.shape
    d = c // heads
    q = slow_linear(x, sd[prefix + "q.weight"], sd[prefix + "q.bias"]).reshape(b, h * w, c)
    src = x
    if sr > 1:
        src = slow_spatial_reduction(x, sd[prefix + "sr.weight"], sd[prefix + "sr.bias"], sr)
        src = slow_layer_norm(src, sd[prefix + "norm.weight"], sd[prefix + "norm.bias"], 1e-5)
    src = src.reshape(b, -1, c)
    kv_w, kv_b = sd[prefix + "kv.weight"], sd[prefix + "kv.bias"]
    k = slow_linear(src, kv_w[:c], kv_b[:c])           # keys are the first C outputs of kv
    v = slow_linear(src, kv_w[c:], kv_b[c:])
    outs, logits = [], []
    for head in range(heads):
        sl = slice(head * d, (head + 1) * d)
        logit = torch.einsum("bnd,bmd->bnm", q[..., sl], k[..., sl])
        weights = torch.exp(logit / math.sqrt(d))
        weights = weights / weights.sum(-1, keepdim=True)
        outs.append(torch.einsum("bnm,bmd->bnd", weights, v[..., sl]))
        logits.append(logit)
    out = torch.cat(outs, -1).reshape(b, h, w, c)
    out = slow_linear(out, sd[prefix + "proj.weight"], sd[prefix + "proj.bias"])
    return out, torch.stack(logits, 1)


def slow_mit(images, sd, cfg, strides):
    x = images.permute(0, 2, 3, 1)
    features, attns = [], []
    for i in range(4):
        s = i + 1
        x = slow_patch_conv(x, sd[f"patch_embed{s}.proj.weight"], sd[f"patch_embed{s}.proj.bias"], strides[i])
        x = slow_layer_norm(x, sd[f"patch_embed{s}.norm.weight"], sd[f"patch_embed{s}.norm.bias"], 1e-5)
        for j in range(cfg["depths"][i]):
            p = f"block{s}.{j}."
            y = slow_layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
            y, logit = slow_attention(y, sd, p + "attn.", cfg["num_heads"][i], cfg["sr_ratios"][i])
            attns.append(logit)
            x = x + y
            y = slow_layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
            y = slow_linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])
            y = slow_depthwise3x3(y, sd[p + "mlp.dwconv.dwconv.weight"], sd[p + "mlp.dwconv.dwconv.bias"])
            y = slow_linear(slow_gelu(y), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
            x = x + y
        x = slow_layer_norm(x, sd[f"norm{s}.weight"], sd[f"norm{s}.bias"], 1e-6)
        features.append(x.permute(0, 3, 1, 2))
    return features, attns


def randomised(model):
    """Random non-trivial values in every tensor (LayerNorm affine and biases included)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if "norm" in name and "weight" in name else 0.0))
    return model


@pytest.mark.parametrize("strides,size", [((4, 2, 2, 1), (64, 64)), ((4, 2, 2, 2), (70, 54))])
def test_encoder_equals_the_slow_explicit_computation(strides, size):
    torch.manual_seed(0)
    model = randomised(MixTransformer(**TINY, strides=strides, drop_path_rate=0.3)).eval().double()
    images = torch.randn(2, 3, *size, dtype=torch.float64)
    sd = model.state_dict()
    slow_features, slow_attns = slow_mit(images, sd, TINY, strides)
    with torch.no_grad():
        features, attns = model(images, attn_blocks=True)
        plain, none = model(images)
    assert none == [] and len(attns) == sum(TINY["depths"]) == len(slow_attns)
    for ours, fast, slow in zip(features, plain, slow_features):
        assert ours.shape == slow.shape
        torch.testing.assert_close(ours, slow, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)   # the fused-attention path
    for ours, slow in zip(attns, slow_attns):
        assert ours.shape == slow.shape
        torch.testing.assert_close(ours, slow, rtol=1e-9, atol=1e-9)


def test_shapes_strides_and_attention_logit_shapes():
    images = torch.randn(1, 3, 64, 96)
    for strides, sides in [((4, 2, 2, 1), [4, 8, 16, 16]), ((4, 2, 2, 2), [4, 8, 16, 32])]:
        model = MixTransformer(**TINY, strides=strides).eval()
        with torch.no_grad():
            features, attns = model(images, attn_blocks=True)
        assert [f.shape for f in features] == [(1, c, 64 // s, 96 // s) for c, s in zip(TINY["embed_dims"], sides)]
        n = [(64 // s) * (96 // s) for s in sides]
        reduced = [(64 // s // r) * (96 // s // r) for s, r in zip(sides, TINY["sr_ratios"])]
        expected = [(1, TINY["num_heads"][i], n[i], reduced[i]) for i in range(4) for _ in range(TINY["depths"][i])]
        assert [a.shape for a in attns] == expected
    # stride-1 stage 4: 3x3 kernel, padding 1 (the release's kernel kept, so its weights fit)
    with torch.device("meta"):                                      # layout only: no init cost
        afa, imagenet = mit("b1", pretrained=False), mit("b1", strides=(4, 2, 2, 2))
    conv = afa.patch_embed4.proj
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
    conv = afa.patch_embed1.proj
    assert (conv.kernel_size, conv.stride, conv.padding) == ((7, 7), (4, 4), (3, 3))
    assert imagenet.patch_embed4.proj.stride == (2, 2) and imagenet.embed_dims == (64, 128, 320, 512)


def test_attention_logits_carry_gradient_and_drop_path_is_linear():
    model = MixTransformer(**TINY, drop_path_rate=0.25)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0
             for s in range(1, 5) for b in getattr(model, f"block{s}")]
    assert rates == pytest.approx(torch.linspace(0, 0.25, sum(TINY["depths"])).tolist())
    _, attns = model(torch.randn(1, 3, 32, 32), attn_blocks=True)
    attns[-1].sum().backward()
    assert model.block4[-1].attn.q.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Checkpoints: a synthetic file built from the release's naming scheme, not from our state_dict.

def official_shapes(variant: str, in_chans: int = 3, num_classes: int = 1000) -> dict:
    """Key -> shape of a SegFormer-release `mit_bX.pth` (ImageNet classifier head included)."""
    dims, depths = MIT_VARIANTS[variant]["embed_dims"], MIT_VARIANTS[variant]["depths"]
    sr_ratios, mlp_ratio = (8, 4, 2, 1), 4
    shapes, previous = {}, in_chans
    for i, (c, depth) in enumerate(zip(dims, depths)):
        s, k = i + 1, (7 if i == 0 else 3)
        shapes[f"patch_embed{s}.proj.weight"] = (c, previous, k, k)
        shapes[f"patch_embed{s}.proj.bias"] = (c,)
        shapes[f"patch_embed{s}.norm.weight"] = shapes[f"patch_embed{s}.norm.bias"] = (c,)
        for j in range(depth):
            p = f"block{s}.{j}."
            for norm in ("norm1", "norm2"):
                shapes[p + norm + ".weight"] = shapes[p + norm + ".bias"] = (c,)
            shapes[p + "attn.q.weight"], shapes[p + "attn.q.bias"] = (c, c), (c,)
            shapes[p + "attn.kv.weight"], shapes[p + "attn.kv.bias"] = (2 * c, c), (2 * c,)
            shapes[p + "attn.proj.weight"], shapes[p + "attn.proj.bias"] = (c, c), (c,)
            if sr_ratios[i] > 1:
                shapes[p + "attn.sr.weight"] = (c, c, sr_ratios[i], sr_ratios[i])
                shapes[p + "attn.sr.bias"] = shapes[p + "attn.norm.weight"] = shapes[p + "attn.norm.bias"] = (c,)
            hidden = c * mlp_ratio
            shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (hidden, c), (hidden,)
            shapes[p + "mlp.dwconv.dwconv.weight"], shapes[p + "mlp.dwconv.dwconv.bias"] = (hidden, 1, 3, 3), (hidden,)
            shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (c, hidden), (c,)
        shapes[f"norm{s}.weight"] = shapes[f"norm{s}.bias"] = (c,)
        previous = c
    shapes["head.weight"], shapes["head.bias"] = (num_classes, dims[-1]), (num_classes,)
    return shapes


def write_official(path, variant, shapes=None):
    gen = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v, generator=gen) for k, v in (shapes or official_shapes(variant)).items()}
    torch.save(state, path)
    return state


@pytest.mark.parametrize("variant", ["b0", "b1"])
def test_official_checkpoint_loads_every_tensor(tmp_path, variant, caplog):
    path = tmp_path / f"mit_{variant}.pth"
    state = write_official(path, variant)
    with caplog.at_level(logging.INFO, logger="net.mit"):
        model = mit(variant, pretrained=str(path))
    own = model.state_dict()
    assert set(own) == set(state) - {"head.weight", "head.bias"}      # every tensor matched, no extra
    for key, value in own.items():
        assert torch.equal(value, state[key]), key
    assert f"{len(own)} tensors matched, 0 missing, 0 unexpected" in caplog.text


def hugging_face_names(official: dict) -> dict:
    """The release -> Hugging Face renaming of transformers' SegFormer conversion script, written out
    in that direction: `segformer.encoder.` prefix, patch_embedN -> patch_embeddings.N-1, normN ->
    layer_norm.N-1, blockN -> block.N-1, norm1/2 -> layer_norm_1/2, attn.q -> attention.self.query,
    attn.proj -> attention.output.dense, attn.sr / attn.norm -> attention.self.sr / .layer_norm,
    fc1/fc2 -> dense1/dense2, kv split into key (first half) and value, head -> classifier."""
    out = {}
    for key, value in official.items():
        if key.startswith("head."):
            out["classifier." + key[5:]] = value
            continue
        parts = key.split(".")
        stage = int(parts[0][-1]) - 1
        if parts[0].startswith("patch_embed"):
            out[f"segformer.encoder.patch_embeddings.{stage}.{parts[1].replace('norm', 'layer_norm')}.{parts[2]}"] = value
        elif parts[0].startswith("norm"):
            out[f"segformer.encoder.layer_norm.{stage}.{parts[1]}"] = value
        else:
            head = f"segformer.encoder.block.{stage}.{parts[1]}."
            rest = ".".join(parts[2:])
            if rest.startswith("attn.kv."):
                half = value.shape[0] // 2
                out[head + "attention.self.key." + parts[-1]] = value[:half].clone()
                out[head + "attention.self.value." + parts[-1]] = value[half:].clone()
                continue
            for old, new in (("norm1.", "layer_norm_1."), ("norm2.", "layer_norm_2."),
                             ("attn.q.", "attention.self.query."), ("attn.proj.", "attention.output.dense."),
                             ("attn.sr.", "attention.self.sr."), ("attn.norm.", "attention.self.layer_norm."),
                             ("mlp.fc1.", "mlp.dense1."), ("mlp.fc2.", "mlp.dense2.")):
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[head + rest] = value
    return out


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_hugging_face_checkpoint_loads_the_same_weights(tmp_path, suffix):
    from safetensors.torch import save_file

    official = write_official(tmp_path / "mit_b0.pth", "b0")
    path = tmp_path / f"model{suffix}"
    renamed = hugging_face_names(official)
    assert len(renamed) == len(official) + sum(".attn.kv." in k for k in official)
    if suffix == ".bin":
        torch.save(renamed, path)
    else:
        save_file(renamed, str(path))
    own = mit("b0", pretrained=path).state_dict()
    assert set(own) == set(official) - {"head.weight", "head.bias"}
    for key, value in own.items():
        assert torch.equal(value, official[key]), key


def test_checkpoint_errors(tmp_path):
    b0 = tmp_path / "mit_b0.pth"
    write_official(b0, "b0")
    with pytest.raises(PipelineError, match=r"mit_b0\.pth.*patch_embed1\.proj\.weight has shape"):
        mit("b1", pretrained=b0)                                     # another variant's file
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}, other)
    with pytest.raises(PipelineError, match=r"resnet\.pth do not fit this model: 0 of"):
        mit("b0", pretrained=other)
    deeper = tmp_path / "mit_b2_like.pth"                            # B2 depths with B1 widths: extra blocks
    torch.save({k: torch.zeros(v) for k, v in official_shapes("b2").items()}, deeper)
    with pytest.raises(PipelineError, match="unknown"):
        mit("b1", pretrained=deeper)
    with pytest.raises(PipelineError, match="not found"):
        mit("b0", pretrained=tmp_path / "absent.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="garbage.pth"):
        mit("b0", pretrained=garbage)
    with pytest.raises(PipelineError, match="downloaded.*path"):
        mit("b1", pretrained=True)
    with pytest.raises(PipelineError, match="unknown MiT variant"):
        mit("b9")
    with pytest.raises(PipelineError, match="unknown MiT argument"):
        mit("b0", depth=3)
    with pytest.raises(PipelineError, match="strides"):
        mit("b0", strides=(4, 2, 2))
    with pytest.raises(PipelineError, match="too small"):
        MixTransformer(**TINY)(torch.zeros(1, 3, 24, 64))


# Encoder-only sizes (the ImageNet head excluded). SegFormer's Table 1 lists encoder parameters
# (millions) 3.4 / 13.1 / 24.2 / 44.0 / 60.8 / 81.4; our exact counts below round to those within
# 0.1M (B0's 3.32M is the tightest).
EXACT = {"b0": 3_319_392, "b1": 13_151_424, "b2": 24_196_288, "b3": 44_072_128, "b4": 60_842_688,
         "b5": 81_443_008}
PUBLISHED_M = {"b0": 3.4, "b1": 13.1, "b2": 24.2, "b3": 44.0, "b4": 60.8, "b5": 81.4}


@pytest.mark.parametrize("variant", list(MIT_VARIANTS))
def test_parameter_counts_match_the_published_sizes(variant):
    with torch.device("meta"):
        model = mit(variant)
    count = sum(p.numel() for p in model.parameters())
    assert count == EXACT[variant]
    assert abs(count / 1e6 - PUBLISHED_M[variant]) < 0.1
    assert count == sum(math.prod(s) for k, s in official_shapes(variant).items() if not k.startswith("head."))
