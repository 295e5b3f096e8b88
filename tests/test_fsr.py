"""FSR on the single-stage engine (methods/fsr.md): the network fsr_voc12.yaml builds, the
uncertainty-guided block mask, the EMA and temperature schedules, the DINO class and patch losses
with centring, the aggregator, and a short train_net run that resumes to the same teacher."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import fsr as E
from net.fsr import ClassAggregationBlock, FsrNet
from net.registry import build_model
from pipeline.config import load_config
from stages.train_net import model_args, term_on, used_terms

REPO = Path(__file__).resolve().parents[1]
TINY = {"backbone": "vit_tiny_patch16_224", "num_classes": 3, "aux_layer": -1, "patch_size": 8, "depth": 2,
        "embed_dim": 32, "num_heads": 2, "img_size": 32, "seg_hidden": 8,
        "projection": {"hidden_dim": 16, "bottleneck_dim": 8, "out_dim": 12, "num_layers": 3}}


def test_fsr_voc12_builds_the_published_network():
    cfg = load_config(REPO / "configs" / "fsr_voc12.yaml", ["train_net.pretrained=false"])
    s = cfg.train_net
    assert cfg.method == "fsr" and s.model == "fsr_vit" and s.losses.ctc.weight == 0
    assert set(used_terms(s)) == {"cls", "cls_aux", "ptc", "seg", "reg", "dino_cls", "dino_patch"}
    assert (s.losses.dino_cls.weight, s.losses.dino_patch.weight, s.losses.ptc.weight) == (0.1, 0.1, 0.2)
    assert term_on(s.losses.seg, 2000) and not term_on(s.losses.seg, 1999)      # it + 1 > 2000
    f = s.fsr
    assert (f.mask_block, f.mask_ratio, f.mask_random_until, f.mask_low, f.mask_high) == (64, 0.4, 4000, 0.2, 0.7)
    assert (f.momentum, f.student_temp, f.teacher_temp_start, f.teacher_temp, f.teacher_temp_warmup) == (
        0.9995, 0.1, 0.04, 0.07, 2500)
    opt = s.optimizer
    assert (opt.weight_decay, opt.schedule, opt.warmup_steps, opt.warmup_start, s.batch_size) == (
        0.05, "warmup_cosine", 1500, 0.1, 8)
    with torch.device("meta"):          # the ViT-B/16 structure only (no memory, no init cost)
        net = build_model(s.model, model_args(s, 20))
    vit = net.backbone.vit
    assert net.backbone.depth == 12 and net.backbone.embed_dim == 768 and net.backbone.patch_size == 16
    assert net.backbone.aux_index == 9 and vit.pos_embed.shape == (1, 1 + 28 * 28, 768) and vit.pos_embed.requires_grad
    assert len(net.backbone.aggregator) == 2 and net.backbone.mask_token.shape == (1, 1, 768)
    assert vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1) and isinstance(vit.blocks[0].drop_path1,
                                                                                    torch.nn.Identity)
    assert net.projection.last_layer.out_features == 4096 and net.center_cls.shape == (1, 4096)
    assert net.seg_head.conv8.out_channels == 21 and net.classifier.pool == "gmp"
    # the teacher: the same architecture, no gradients, outside every optimiser group
    student = {k: v.shape for k, v in net.state_dict().items() if not k.startswith(("teacher.", "center_"))}
    teacher = {k[len("teacher.module."):]: v.shape for k, v in net.state_dict().items() if k.startswith("teacher.")}
    assert student == teacher
    assert not any(p.requires_grad for p in net.teacher.parameters())
    groups = net.optimizer_groups(s)
    grouped = {id(p): g for g in groups for p in g["params"]}
    assert len(grouped) == sum(1 for p in net.parameters() if p.requires_grad)
    assert not {id(p) for p in net.teacher.parameters()} & set(grouped)
    no_wd = [net.backbone.mask_token, vit.pos_embed, vit.cls_token, vit.blocks[0].norm1.weight,
             net.backbone.aggregator[0].q.bias]
    assert all(grouped[id(p)]["weight_decay"] == 0.0 for p in no_wd)
    assert grouped[id(vit.blocks[0].attn.qkv.weight)]["weight_decay"] == 0.05
    assert grouped[id(net.backbone.aggregator[0].q.weight)]["lr_mult"] == 1.0
    assert grouped[id(net.projection.last_layer.weight)]["lr_mult"] == 10
    assert grouped[id(net.seg_head.conv6.weight)]["lr_mult"] == 10
    coco = load_config(REPO / "configs" / "fsr_coco.yaml")
    assert coco.train_net.iterations == 80000 and coco.train_net.fsr.mask_random_until == 16000
    assert (coco.train_net.losses.seg.start, coco.train_net.losses.ptc.start) == (8000, 12000)
    from stages.train_net import check
    bad = load_config(REPO / "configs" / "fsr_voc12.yaml", ["train_net.crop_size=480"])
    with pytest.raises(Exception, match="train_net.fsr.mask_block 64"):
        check(type("Ctx", (), {"section": bad.train_net})())
    demo = load_config(REPO / "configs" / "demo_fsr.yaml")
    assert demo.method == "fsr" and demo.train_net.crop_size % demo.train_net.fsr.mask_block == 0


# ----------------------------------------------------------------------------- masking

def slow_mask(value, noise, block, k, low, high):
    """Per image: a block is uncertain when low < value < high at its top-left pixel; score =
    noise + uncertain; the k highest scores are masked."""
    b, h, w = value.shape
    gh, gw = h // block, w // block
    out = np.zeros((b, gh, gw), bool)
    for i in range(b):
        scores = []
        for y in range(gh):
            for x in range(gw):
                v = float(value[i, y * block, x * block])
                scores.append((float(noise[i, y * gw + x]) + (1.0 if low < v < high else 0.0), y, x))
        for _, y, x in sorted(scores, reverse=True)[:k]:
            out[i, y, x] = True
    return out


def test_block_mask_matches_the_explicit_rule():
    torch.manual_seed(0)
    b, h, block, patch = 3, 448, 64, 16
    grid = E.block_grid(h, h, block, patch)
    assert grid == (7, 7) and E.masked_count(49, 0.4) == 20 and E.masked_count(16, 0.4) == 7
    cams = torch.rand(b, 4, 448, 448)
    targets = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.float32)
    value = (cams * targets[:, :, None, None]).amax(1)
    unc = E.uncertain_blocks(cams, targets, grid, 0.2, 0.7)
    g = torch.Generator().manual_seed(3)
    mask = E.block_mask(b, grid, 0.4, unc, generator=g)
    noise = torch.rand(b, 49, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(mask.numpy(), slow_mask(value.numpy(), noise.numpy(), block, 20, 0.2, 0.7))
    assert (mask.flatten(1).sum(1) == 20).all()
    # uncertain blocks first: all masked ones uncertain when there are enough, else all uncertain masked
    for i in range(b):
        u, m = unc[i].flatten(), mask[i].flatten()
        assert (m <= u).all() if u.sum() >= 20 else (u <= m).all()
    # random strategy: exactly the 20 largest noise values
    random = E.block_mask(b, grid, 0.4, None, generator=torch.Generator().manual_seed(3))
    top = noise.topk(20, dim=1).indices
    assert all(set(torch.nonzero(random[i].flatten()).flatten().tolist()) == set(top[i].tolist()) for i in range(b))
    tokens = E.blocks_to_tokens(mask, block // patch)
    assert tokens.shape == (b, 28, 28)
    for y in range(28):
        for x in range(28):
            assert torch.equal(tokens[:, y, x], mask[:, y // 4, x // 4])
    with pytest.raises(Exception, match="mask_block"):
        E.block_grid(450, 448, 64, 16)



def test_view_two_is_masked_randomly_first_then_where_its_aux_cam_is_uncertain(monkeypatch):
    """engine.fsr._mask: no CAM before mask_random_until; afterwards the uncertain blocks of view
    2's multi-scale aux CAM (0.2 < max over the image's classes < 0.7) are masked first."""
    from types import SimpleNamespace

    import engine.multiscale

    cfg = load_config(REPO / "configs" / "demo_fsr.yaml", ["train_net.crop_size=32", "train_net.fsr.mask_block=16",
                                                           "train_net.fsr.mask_random_until=5"])
    aux = torch.full((4, 3, 32, 32), 0.9)
    aux[:, :, :16, :16] = 0.5          # blocks (0, 0) and (1, 1) uncertain
    aux[:, :, 16:, 16:] = 0.3
    aux[:, 2] = 0.5                    # a class the images do not have: ignored
    calls = []

    def fake_cams(cam_fn, images, scales, flip=True):
        calls.append(images.shape)
        return aux, aux

    monkeypatch.setattr(engine.multiscale, "multiscale_cams", fake_cams)
    targets = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0]])
    aux[:, :, 16:, :16] = torch.where(targets[:, :, None, None] > 0, 0.95, 0.5)     # (1, 0): confident
    second = torch.randn(4, 3, 32, 32)
    for iteration, expect_cam in ((4, False), (5, True)):
        step = SimpleNamespace(section=cfg.train_net, net=SimpleNamespace(patch_size=8, cam_pair=None),
                               batch=(None,) * 4 + (second,), images=second, targets=targets, iteration=iteration)
        calls.clear()
        mask = E._mask(step)
        assert mask.shape == (4, 4, 4) and bool(calls) == expect_cam
        assert (mask.flatten(1).sum(1) == 8).all()          # 2 of 4 blocks, 2x2 tokens each
        if expect_cam:
            blocks = mask[:, ::2, ::2]
            assert blocks[:, 0, 0].all() and blocks[:, 1, 1].all() and not blocks[:, 1, 0].any()

# ----------------------------------------------------------------------------- schedules and losses

def test_ema_momentum_is_cosine_and_the_teacher_follows_the_student():
    T = 20000
    assert E.cosine_momentum(0, T) == pytest.approx(0.9995)
    assert E.cosine_momentum(T // 2, T) == pytest.approx(0.99975)
    assert E.cosine_momentum(T, T) == pytest.approx(1.0)
    assert E.cosine_momentum(T // 4, T) == pytest.approx(1 - 0.0005 * (1 + math.cos(math.pi / 4)) / 2)
    torch.manual_seed(0)
    net = FsrNet(**TINY, momentum=0.9, conv_stem=True)
    for p in net.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn_like(p))
    for name, b in net.named_buffers():
        if name.endswith("running_mean") and not name.startswith("teacher."):
            b.add_(1.0)                 # BatchNorm statistics (the conv stem): copied, not averaged
    before = {k: v.clone() for k, v in net.teacher.module.state_dict().items()}
    student = {k: v.clone() for k, v in net.state_dict().items()}
    net.after_step(51, 100)            # the step of iteration 50
    m = E.cosine_momentum(50, 100, 0.9)
    for name, p in net.teacher.module.named_parameters():
        torch.testing.assert_close(p, m * before[name] + (1 - m) * student[name])
        assert not p.requires_grad
    for name, b in net.teacher.module.named_buffers():
        torch.testing.assert_close(b, student[name])
    assert 0.9 < m < 1.0


def test_teacher_temperature_follows_dino_linspace():
    ramp = np.linspace(0.04, 0.07, 2500)
    for it in (0, 1, 1000, 2499):
        assert E.teacher_temperature(it, 0.04, 0.07, 2500) == pytest.approx(ramp[it])
    assert E.teacher_temperature(2500, 0.04, 0.07, 2500) == E.teacher_temperature(10 ** 6, 0.04, 0.07, 2500) == 0.07


def _softmax(v):
    e = [math.exp(x - max(v)) for x in v]
    return [x / sum(e) for x in e]


def test_dino_losses_match_the_explicit_formula():
    torch.manual_seed(1)
    b, n, p, ts, tt = 3, 5, 7, 0.1, 0.05
    s, t, c = torch.randn(b, p), torch.randn(b, p), torch.randn(1, p)
    slow = 0.0
    for i in range(b):
        pt = _softmax([(float(t[i, k]) - float(c[0, k])) / tt for k in range(p)])
        ps = _softmax([float(s[i, k]) / ts for k in range(p)])
        slow += -sum(pt[k] * math.log(ps[k]) for k in range(p)) / b
    assert float(E.dino_class_loss(s, t, c, ts, tt)) == pytest.approx(slow, rel=1e-5)
    sp, tp, cp = torch.randn(b, n, p), torch.randn(b, n, p), torch.randn(1, 1, p)
    mask = torch.rand(b, n) < 0.5
    mask[2] = False                     # an image with nothing masked counts 0
    slow = 0.0
    for i in range(b):
        total = 0.0
        for j in range(n):
            if mask[i, j]:
                pt = _softmax([(float(tp[i, j, k]) - float(cp[0, 0, k])) / tt for k in range(p)])
                ps = _softmax([float(sp[i, j, k]) / ts for k in range(p)])
                total += -sum(pt[k] * math.log(ps[k]) for k in range(p))
        slow += total / max(1, int(mask[i].sum())) / b
    assert float(E.dino_patch_loss(sp, tp, mask, cp, ts, tt)) == pytest.approx(slow, rel=1e-5)
    centre = torch.ones(1, p)
    E.update_center(centre, t.mean(0, keepdim=True), 0.9)
    torch.testing.assert_close(centre, 0.9 + 0.1 * t.mean(0, keepdim=True))


def test_aggregator_is_cross_attention_from_the_token_to_the_patches():
    torch.manual_seed(2)
    d, heads, n = 8, 2, 5
    block = ClassAggregationBlock(d, heads, 2.0)
    token, patches = torch.randn(2, 1, d), torch.randn(2, n, d)
    u = block.norm1(torch.cat([token, patches], 1))
    q, kv = block.q(u[:, :1]), block.kv(u[:, 1:])
    k, v = kv[..., :d], kv[..., d:]
    hd = d // heads
    reads = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd), dim=-1)
        reads.append(weights @ v[..., sl])
    c = token + block.proj(torch.cat(reads, -1))
    c = c + block.mlp(block.norm2(c))
    torch.testing.assert_close(block(token, patches), c)


def test_class_token_stays_out_of_the_blocks_and_the_mask_token_replaces_patches():
    torch.manual_seed(0)
    net = FsrNet(**TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = net.backbone(x)
        net.backbone.vit.cls_token.add_(torch.randn_like(net.backbone.vit.cls_token))   # not a constant: LN removes it
        b = net.backbone(x)
        torch.testing.assert_close(a.patch, b.patch)          # the blocks never saw the class token
        assert not torch.allclose(a.cls_token, b.cls_token)
        everything = torch.ones(2, 4, 4, dtype=torch.bool)
        masked = net.backbone(torch.stack([x[0], -x[0]]), mask=everything)
        torch.testing.assert_close(masked.patch[0], masked.patch[1])     # nothing of the image is left
        out = net(x, second=x, mask=torch.zeros(2, 4, 4, dtype=torch.bool))
        own = net.projection(net.backbone(x).cls_token)
        torch.testing.assert_close(out.fsr_cls, own)              # unmasked view 2 = view 1
        assert out.fsr_patch.shape == (2, 16, 12) and out.seg.shape == (2, 4, 4, 4)
    variants = net.inference_variants()
    assert set(variants) == {"student", "teacher"} and net.inference_variant == "student"
    net.use_teacher = True
    with torch.no_grad():
        torch.testing.assert_close(net.segment(x), variants["teacher"].segment(x))
        net.train()
        torch.testing.assert_close(net.segment(x), variants["student"].segment(x))    # training: the student


# ----------------------------------------------------------------------------- train_net

class TinyData:
    num_classes = 3

    def __init__(self, n: int = 4):
        self._ids = [f"im{i}" for i in range(n)]

    def ids(self, split):
        return list(self._ids)

    def load_image(self, image_id):
        rng = np.random.default_rng(int(image_id[2:]))
        image = np.zeros((40, 48, 3), np.uint8) + 30
        image[8:30, 10:36] = rng.integers(120, 255, 3)
        return image

    def multi_hot(self, image_id):
        hot = np.zeros(3, np.float32)
        hot[int(image_id[2:]) % 3] = 1
        return hot


def _train(tmp_path, iterations=4, crash_at=None, monkeypatch=None):
    from pipeline.runtime import Runtime
    from pipeline.stage import StageContext
    from stages import train_net

    cfg = load_config(REPO / "configs" / "demo_fsr.yaml", [
        "train_net.model_kwargs={patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2, img_size: 32}",
        "train_net.fsr.projection={hidden_dim: 16, bottleneck_dim: 8, out_dim: 12, num_layers: 3}",
        "train_net.seg_hidden=8", "train_net.crop_size=32", "train_net.fsr.mask_block=16",
        f"train_net.iterations={iterations}", "train_net.batch_size=2", "train_net.checkpoint_every=2",
        "train_net.log_every=2", "train_net.fsr.mask_random_until=2", "train_net.losses.seg.start=2",
        "train_net.losses.reg.start=2", "train_net.fsr.teacher_temp_warmup=3", "train_net.optimizer.warmup_steps=1"])
    ctx = StageContext(name="train_net", section=cfg.train_net, data=cfg.data, seed=0, result_dir=tmp_path / "result",
                       sess_dir=tmp_path / "sess", runtime=Runtime(device=torch.device("cpu")), fingerprint="fp")
    ctx.__dict__["dataset"] = TinyData()
    if crash_at is not None:
        original = train_net.SingleStageLoss.__call__

        def crashing(self, model, batch, step):
            if step == crash_at:
                raise KeyboardInterrupt
            return original(self, model, batch, step)
        monkeypatch.setattr(train_net.SingleStageLoss, "__call__", crashing)
        with pytest.raises(KeyboardInterrupt):
            train_net.run(ctx)
        monkeypatch.undo()
    torch.manual_seed(0)
    summary = train_net.run(ctx)
    state = torch.load(summary["outputs"]["net"], weights_only=True)
    return state, summary


def test_train_net_runs_fsr_and_resumes_to_the_same_teacher(tmp_path, monkeypatch, caplog):
    torch.manual_seed(0)
    with caplog.at_level("INFO", logger="wsss"):
        state, _ = _train(tmp_path / "a")
    last = [r.getMessage() for r in caplog.records if "step 4/4" in r.getMessage()]
    assert last and all(f"{t} " in last[0] for t in ("dino_cls", "dino_patch", "ptc", "seg", "reg")), last
    assert state["kind"] == "fsr_vit"
    weights = state["state_dict"]
    assert any(k.startswith("teacher.module.") for k in weights) and "center_patch" in weights
    assert weights["center_cls"].abs().sum() > 0 and weights["center_patch"].abs().sum() > 0
    key = "backbone.vit.blocks.0.attn.qkv.weight"
    assert not torch.equal(weights[key], weights["teacher.module." + key])      # the teacher lags the student
    torch.manual_seed(0)
    resumed, _ = _train(tmp_path / "b", crash_at=3, monkeypatch=monkeypatch)
    for name, value in weights.items():
        torch.testing.assert_close(resumed["state_dict"][name], value, msg=name)


def test_test_seg_head_scores_the_student_and_the_teacher(tmp_path):
    from net.registry import save_model
    from net.single_stage import segment_image
    from pipeline.config import TestSegHeadConfig
    from pipeline.metrics import confusion_matrix, miou_percent
    from pipeline.runtime import Runtime
    from pipeline.stage import StageContext
    from stages.test_seg_head import score_variants

    class Masked(TinyData):
        class_names = ["background", "a", "b", "c"]

        def eval_ids(self, split):
            return self.ids(split)

        def load_mask(self, image_id):
            mask = np.zeros((40, 48), np.uint8)
            mask[8:30, 10:36] = int(image_id[2:]) % 3 + 1
            return mask

    torch.manual_seed(0)
    net = FsrNet(**TINY, use_teacher=True).eval()
    with torch.no_grad():
        for p in net.teacher.parameters():
            p.add_(torch.randn_like(p))
    cfg = load_config(REPO / "configs" / "demo_fsr.yaml")
    ctx = StageContext(name="test_seg_head", section=TestSegHeadConfig(scales=[1.0]), data=cfg.data, seed=0,
                       result_dir=tmp_path / "result", sess_dir=tmp_path / "sess",
                       runtime=Runtime(device=torch.device("cpu")), fingerprint="fp")
    ctx.__dict__["dataset"] = data = Masked()
    save_model(ctx.artifacts.weights.path("net"), net, "fsr_vit", {**TINY, "use_teacher": True})
    ctx.artifacts.metrics.write("test_seg_head", {"miou": 12.5, "n_images": 4})
    scores = score_variants(ctx, "val", 12.5)
    conf = np.zeros((4, 4), np.int64)
    for i in data.ids("val"):
        _, label = segment_image(_student := net.inference_variants()["student"], data.load_image(i), ctx.section,
                                 cfg.data.mean, cfg.data.std, "cpu")
        conf += confusion_matrix(label, data.load_mask(i), 4)
    assert scores == {"miou_teacher": 12.5, "miou_student": round(miou_percent(conf), 3)}
    assert ctx.artifacts.metrics.read("test_seg_head")["miou_student"] == scores["miou_student"]
