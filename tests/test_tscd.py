"""AFA and TSCD on the single-stage engine (net/single_stage_mit.py, engine/affinity_terms.py):
the published networks the configs build, the affinity head, the affinity loss and AFA's label
propagation against slow explicit versions, and train_net + make_cam + test_seg_head on tiny
random data in process."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.affinity_terms import (affinity_loss, affinity_targets, propagate_with_background, propagated_labels,
                                   radius_window)
from net.registry import build_model
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.trainer import make_optimizer, schedule_from_config, set_lr
from stages.train_net import model_args, term_on

REPO = Path(__file__).resolve().parents[1]
TINY_MIT = {"embed_dims": [8, 16, 16, 24], "num_heads": [1, 1, 2, 3], "depths": [1, 1, 1, 2],
            "drop_path_rate": 0.0}


def _config(name: str, *overrides: str):
    return load_config(REPO / "configs" / f"{name}.yaml", ["train_net.pretrained=false", *overrides])


@pytest.mark.parametrize("name", ["afa_voc12", "tscd_voc12"])
def test_voc12_configs_build_the_published_network(name):
    cfg = _config(name)
    section = cfg.train_net
    net = build_model(section.model, model_args(section, 20))
    enc = net.encoder
    assert cfg.method == name.split("_")[0] and section.model == "single_stage_mit"
    assert enc.strides == (4, 2, 2, 1) and enc.embed_dims == (64, 128, 320, 512) and enc.depths == (2, 2, 2, 2)
    assert enc.num_heads == (1, 2, 5, 8) and enc.sr_ratios == (8, 4, 2, 1) and net.patch_size == 16
    dec = net.decoder
    assert [getattr(dec, f"linear_c{i}").proj.in_features for i in (1, 2, 3, 4)] == [64, 128, 320, 512]
    assert all(getattr(dec, f"linear_c{i}").proj.out_features == 256 for i in (1, 2, 3, 4))
    fuse = dec.linear_fuse[0]
    assert (fuse.in_channels, fuse.out_channels, fuse.bias) == (1024, 256, None)
    assert isinstance(dec.linear_fuse[1], torch.nn.BatchNorm2d) and dec.dropout.p == 0.1
    assert dec.linear_pred.out_channels == 21 and dec.linear_pred.bias is not None
    cls = net.classifier.classifier
    assert (cls.in_channels, cls.out_channels, cls.bias, net.classifier.pool) == (512, 20, None, "gmp")
    proj = net.attn_proj.proj
    assert (proj.in_channels, proj.out_channels) == (16, 1) and proj.bias is not None   # 2 blocks x 8 heads
    assert net.attn_proj.symmetrize is (name == "afa_voc12")
    assert net.seg_align_corners is (name == "tscd_voc12")
    # every parameter trains, in exactly one of AFA's four groups, with the published multipliers
    groups = net.optimizer_groups(section)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in net.parameters() if p.requires_grad)
    by_name = {g["name"]: g for g in groups}
    assert [by_name[n]["lr_mult"] for n in ("encoder", "encoder_norm", "heads", "decoder")] == [1.0, 0.0, 10, 10]
    assert by_name["encoder_norm"]["weight_decay"] == 0.0
    norms = {id(p) for m in enc.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    assert {id(p) for p in by_name["encoder_norm"]["params"]} == norms
    assert {id(p) for p in by_name["heads"]["params"]} == {id(net.classifier.classifier.weight), id(proj.weight),
                                                             id(proj.bias)}
    opt = make_optimizer("adamw", groups, section.optimizer.lr, 0.0, section.optimizer.weight_decay)
    set_lr(opt, section.optimizer.lr, 1.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([6e-5, 0.0, 6e-4, 6e-4])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0, 0.01, 0.01]
    # warm-up from 1e-6 over 1,500 steps, then (1 - t / 20000): the reference log's lrs
    schedule = schedule_from_config(section.optimizer)
    lr = lambda t: 6e-5 * schedule.factor(t, 20000)      # noqa: E731
    assert lr(199) == pytest.approx(7.96e-6, rel=1e-3) and lr(19800) == pytest.approx(6.0e-7)
    assert schedule.factor(1500, 20000) == pytest.approx(0.925)
    losses = section.losses
    for term in ("seg", "reg", "aff"):
        assert getattr(losses, term).weight == (0.01 if term == "reg" else 0.1)
        assert term_on(getattr(losses, term), 2001) and not term_on(getattr(losses, term), 2000)
    assert losses.cls.weight == 1.0 and losses.cls_aux.weight == losses.ptc.weight == losses.ctc.weight == 0
    assert losses.scd.weight == (0.1 if name == "tscd_voc12" else 0.0)
    assert section.refiner.preset == ("varm" if name == "tscd_voc12" else "par")
    assert section.aff.propagate_start == (6001 if name == "afa_voc12" else 0)
    assert (section.thresholds.high, section.thresholds.low, section.crop_size) == (0.55, 0.35, 512)
    with torch.no_grad():
        out = net.eval()(torch.zeros(1, 3, 64, 96))
    assert out.cams.shape == (1, 20, 4, 6) and out.seg.shape == (1, 21, 16, 24) and out.affinity.shape == (1, 24, 24)


def test_coco_configs():
    tscd = _config("tscd_coco").train_net
    afa = _config("afa_coco").train_net
    assert tscd.iterations == afa.iterations == 80000 and tscd.batch_size == 8
    assert term_on(tscd.losses.scd, 5001) and not term_on(tscd.losses.aff, 5000)
    assert (tscd.refiner.preset, tscd.refiner.iterations, afa.refiner.iterations) == ("varm", 10, 15)
    assert afa.aff.propagate_start == 15001 and tscd.aff.propagate_start == 0


def test_terms_the_network_lacks_are_clear_errors():
    section = _config("afa_voc12", "train_net.losses.ptc.weight=0.2").train_net
    with pytest.raises(PipelineError, match="losses.ptc"):
        model_args(section, 20)


def _tiny_net(symmetrize: bool, classes: int = 3):
    torch.manual_seed(0)
    return build_model("single_stage_mit", {"variant": "b0", "num_classes": classes, "decoder_dim": 8,
                                            "symmetrize": symmetrize, **TINY_MIT}).eval()


@pytest.mark.parametrize("symmetrize", [True, False])
def test_affinity_head_against_an_explicit_weighting(symmetrize):
    net = _tiny_net(symmetrize)
    with torch.no_grad():
        out = net(torch.randn(2, 3, 80, 64))
        grid = out.patch.shape[-2:]
        maps = [a for block in out.attns[-2:] for a in block.unbind(1)]         # 2 blocks x 3 heads
        assert len(maps) == 6 and maps[0].shape == (2, grid[0] * grid[1], grid[0] * grid[1])
        w, b = net.attn_proj.proj.weight.flatten(), net.attn_proj.proj.bias
        total = b + sum(w[k] * (m + m.transpose(1, 2) if symmetrize else m) for k, m in enumerate(maps))
        torch.testing.assert_close(out.affinity, torch.sigmoid(total))
        p, _ = net.affinity(torch.randn(1, 3, 80, 64))
    assert torch.allclose(p, p.transpose(1, 2)) is symmetrize


def _slow_targets(labels, grid, radius):
    b, height, width = labels.shape
    h, w = grid
    small = [[[int(labels[n, (r * height) // h, (c * width) // w]) for c in range(w)] for r in range(h)]
             for n in range(b)]
    out = torch.zeros(b, h * w, h * w, dtype=torch.long)
    for n in range(b):
        for i in range(h * w):
            for j in range(h * w):
                li, lj = small[n][i // w][i % w], small[n][j // w][j % w]
                near = abs(i // w - j // w) <= radius and abs(i % w - j % w) <= radius
                out[n, i, j] = 255 if (li == 255 or lj == 255 or not near) else int(li == lj)
    return out


def test_affinity_targets_and_loss_against_slow_versions():
    torch.manual_seed(1)
    labels = torch.randint(0, 4, (2, 80, 48))
    labels[labels == 3] = 255
    labels[0, :40] = 0
    grid, radius = (5, 3), 2
    targets = affinity_targets(labels, grid, radius)
    slow = _slow_targets(labels, grid, radius)
    assert torch.equal(targets, slow)
    assert (slow == 1).any() and (slow == 0).any() and (slow == 255).any()
    p = torch.rand(2, 15, 15, requires_grad=True)
    pos = sum(float(1 - p.detach()[n, i, j]) for n in range(2) for i in range(15) for j in range(15) if slow[n, i, j] == 1)
    neg = sum(float(p.detach()[n, i, j]) for n in range(2) for i in range(15) for j in range(15) if slow[n, i, j] == 0)
    expected = 0.5 * pos / (int((slow == 1).sum()) + 1) + 0.5 * neg / (int((slow == 0).sum()) + 1)
    loss = affinity_loss(p, targets)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert float(p.grad[slow == 255].abs().sum()) == 0.0 and float(p.grad.abs().sum()) > 0
    assert radius_window(4, 4, 1).sum(1).tolist()[:4] == [4, 6, 6, 4]


def _slow_propagation(cams, affinity, cls_labels, bkg, radius, power, eps):
    b, k, h, w = cams.shape
    n = h * w
    out = torch.zeros(b, k + 1, n, dtype=torch.float64)
    for img in range(b):
        walk = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(n):
                if abs(i // w - j // w) <= radius and abs(i % w - j % w) <= radius:
                    walk[i][j] = float(affinity[img, i, j]) ** power
        column = [sum(walk[i][j] for i in range(n)) + eps for j in range(n)]
        keys = [0] + [c + 1 for c in range(k) if cls_labels[img, c] > 0.5]
        for j in range(n):
            for i in range(n):
                values = [bkg if c == 0 else float(cams[img, c - 1].flatten()[i]) for c in keys]
                z = sum(math.exp(v) for v in values)
                for c, v in zip(keys, values):
                    out[img, c, j] += math.exp(v) / z * walk[i][j] / column[j]
    return out.reshape(b, k + 1, h, w)


def test_propagation_against_a_slow_version():
    torch.manual_seed(2)
    cams, affinity = torch.rand(2, 4, 3, 4), torch.rand(2, 12, 12)
    cls_labels = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    fast = propagate_with_background(cams, affinity, cls_labels, 0.35, radius=1, power=2, eps=0.1)
    slow = _slow_propagation(cams, affinity, cls_labels, 0.35, 1, 2, 0.1)
    torch.testing.assert_close(fast.double(), slow, rtol=1e-5, atol=1e-7)
    assert float(fast[0, 2].abs().sum()) == 0.0 and float(fast[1, 1:4].abs().sum()) == 0.0


def test_propagated_labels_follow_the_reference_rules():
    """With a refiner of 0 iterations at full resolution (identity), the propagated label is: upsample, argmax over
    [bg, classes] per background plane, then the high/low combination and the box."""
    from engine.refine import LocalRefiner

    torch.manual_seed(3)
    b, k, grid = 2, 3, (2, 3)
    images, rgb = torch.randn(b, 3, 32, 48), torch.rand(b, 3, 32, 48)
    cams, affinity = torch.rand(b, k, 32, 48), torch.rand(b, 6, 6)
    cls_labels = torch.tensor([[1.0, 1, 0], [0, 1, 0]])
    boxes = torch.tensor([[0, 32, 0, 48], [4, 30, 6, 40]])
    labels = propagated_labels(LocalRefiner("par", iterations=0), images, rgb, cams, cls_labels, affinity, grid,
                               high=0.55, low=0.35, img_box=boxes, radius=8, down_scale=1)
    small = F.interpolate(cams * cls_labels[:, :, None, None], size=grid, mode="bilinear", align_corners=False)
    expect = []
    for bkg in (0.55, 0.35):
        walked = _slow_propagation(small, affinity, cls_labels, bkg, 8, 2, 0.1).float()
        expect.append(F.interpolate(walked, size=(32, 48), mode="bilinear", align_corners=False).argmax(1))
    high, low = expect
    for n, (top, bottom, left, right) in enumerate(boxes.tolist()):
        for y in range(32):
            for x in range(48):
                inside = top <= y < bottom and left <= x < right
                want = (255 if not inside else 0 if high[n, y, x] == 0 and low[n, y, x] == 0
                        else 255 if high[n, y, x] == 0 else int(high[n, y, x]))
                assert int(labels[n, y, x]) == want, (n, y, x)
    assert set(labels[1].unique().tolist()) <= {0, 2, 255}


def test_seg_labels_switch_to_the_propagated_ones_at_propagate_start():
    from engine.terms import Step
    from stages.train_net import SingleStageLoss

    cfg = _config("afa_voc12", "train_net.backbone=mit_b0", "train_net.aff.propagate_start=5",
                  "train_net.cam_scales=[1.0,1.5]", "train_net.refiner.iterations=1")
    cfg.train_net.model_kwargs = dict(TINY_MIT)
    net = build_model("single_stage_mit", model_args(cfg.train_net, 3)).train()
    runtime = type("R", (), {"device": torch.device("cpu")})()
    engine = SingleStageLoss(cfg.train_net, cfg.data, runtime)
    torch.manual_seed(4)
    images, targets = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    boxes = torch.tensor([[0, 64, 0, 64], [0, 48, 8, 64]])
    for iteration, switched in ((4, False), (5, True)):
        step = Step(net, net, images, targets, boxes, None, iteration, cfg.train_net, cfg.data, engine)
        assert (step.seg_labels() is not step.pseudo_labels()) is switched
        assert step.seg_labels().shape == (2, 64, 64)
    assert int(step.seg_labels()[1, 50:, :].ne(255).sum()) == 0          # outside the box


@pytest.mark.parametrize("name", ["afa_voc12", "tscd_voc12"])
def test_train_net_and_the_seg_head_stages_on_tiny_data(tmp_path, name):
    """AFA with its propagation switched on at iteration 3; TSCD (VARM, no propagation) with the
    scd term on from iteration 2."""
    from dataset.demo import generate_demo_data
    from pipeline.methods import get_method
    from pipeline.runner import run_stage
    from pipeline.runtime import Runtime

    root = tmp_path / "data"
    generate_demo_data(root, n_train=4, n_val=2)
    overrides = [f"data.root={root}", "data.train_split=train", "data.infer_split=train", "data.eval_split=train",
                 "data.val_split=val", f"work_dir={tmp_path}", "device=cpu", "train_net.backbone=mit_b0",
                 "train_net.pretrained=false",
                 "train_net.iterations=4", "train_net.batch_size=2", "train_net.crop_size=64",
                 "train_net.cam_scales=[1.0,1.5]", "train_net.refiner.iterations=2", "train_net.num_workers=0",
                 "train_net.checkpoint_every=2", "train_net.log_every=2", "train_net.mit.decoder_dim=8",
                 "train_net.optimizer.warmup_steps=1", "train_net.aff.propagate_start=3",
                 "train_net.losses.seg.start=2", "train_net.losses.aff.start=2", "train_net.losses.reg.start=2",
                 "train_net.reg.max_pixels=256", "make_cam.scales=[1.0]", "test_seg_head.scales=[1.0]"]
    if name == "tscd_voc12":
        overrides += ["train_net.losses.scd.start=2", "train_net.scd.view_scale=0.5"]   # MiT needs 32 px
    cfg = load_config(REPO / "configs" / f"{name}.yaml", overrides)
    cfg.train_net.model_kwargs = dict(TINY_MIT)
    runtime = Runtime(device=torch.device("cpu"))
    method = get_method(cfg.method)
    train = run_stage(cfg, method.stage("train_net"), runtime)
    assert math.isfinite(train["metrics"]["final_loss"])
    state = torch.load(Path(train["outputs"]["net"]), weights_only=True)
    assert state["kind"] == "single_stage_mit" and state["model_args"]["symmetrize"] is (name == "afa_voc12")
    if name == "tscd_voc12":
        return
    assert run_stage(cfg, method.stage("make_cam"), runtime)["outputs"]
    test = run_stage(cfg, method.stage("test_seg_head"), runtime)
    assert test["outputs"]["images"] == 2 and 0.0 <= test["metrics"]["miou"] <= 1.0


def test_segformer_decoder_against_an_explicit_computation():
    """Each stage through its linear layer, stages 2-4 upsampled to stage 1, concatenated c4, c3,
    c2, c1, 1x1 conv + BN + ReLU, (dropout off in eval), 1x1 classifier."""
    from net.single_stage_mit import SegFormerHead

    torch.manual_seed(5)
    head = SegFormerHead([4, 6, 8, 10], embedding_dim=5, num_classes=3).eval()
    head.linear_fuse[1].running_mean.uniform_(-1, 1)
    head.linear_fuse[1].running_var.uniform_(0.5, 2)
    features = [torch.randn(2, c, s, s + 1) for c, s in ((4, 8), (6, 4), (8, 2), (10, 2))]
    embedded = []
    for i in (4, 3, 2, 1):
        layer = getattr(head, f"linear_c{i}").proj
        x = torch.einsum("bchw,ec->behw", features[i - 1], layer.weight) + layer.bias[None, :, None, None]
        embedded.append(F.interpolate(x, size=(8, 9), mode="bilinear", align_corners=False))
    bn = head.linear_fuse[1]
    fused = F.conv2d(torch.cat(embedded, 1), head.linear_fuse[0].weight)
    fused = (fused - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    fused = torch.relu(fused * bn.weight[:, None, None] + bn.bias[:, None, None])
    expected = F.conv2d(fused, head.linear_pred.weight, head.linear_pred.bias)
    with torch.no_grad():
        torch.testing.assert_close(head(features), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["afa_voc12", "tscd_voc12"])
def test_seg_logits_are_upsampled_with_the_networks_align_corners(name):
    from engine.terms import Step

    cfg = _config(name, "train_net.backbone=mit_b0")
    cfg.train_net.model_kwargs = dict(TINY_MIT)
    net = build_model("single_stage_mit", model_args(cfg.train_net, 3)).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = net(images)
    step = Step(net, net, images, None, None, out, 0, cfg.train_net, cfg.data, None)
    corners = name == "tscd_voc12"
    expected = F.interpolate(out.seg, size=(64, 64), mode="bilinear", align_corners=corners)
    torch.testing.assert_close(step.seg_logits(), expected)


def test_flip_mean_halves_the_flip_sum():
    """AFA / TSCD's test averages each flip pair (the CRF sees the logits' scale)."""
    from net.single_stage import multiscale_seg_logits

    class Net:
        def segment(self, x):
            return torch.cat([x[:, :1] * 2, x[:, 1:2].flip(-1) ** 2], 1)

    images = torch.randn(2, 3, 8, 12)
    summed = multiscale_seg_logits(Net(), images, [1.0, 0.5], "sum", "max")
    mean = multiscale_seg_logits(Net(), images, [1.0, 0.5], "mean", "max")
    torch.testing.assert_close(mean, summed / 2)


def test_min_input_size_is_the_smallest_side_the_encoder_takes():
    """32 px for strides (4, 2, 2, 1) and reductions (8, 4, 2, 1): 32 runs, 28 is refused (the scd
    term checks its small view against this number before it builds the view)."""
    net = _tiny_net(symmetrize=False)
    assert net.min_input_size == 32
    with torch.no_grad():
        net(torch.rand(1, 3, 32, 32))
        with pytest.raises(PipelineError, match="too small"):
            net(torch.rand(1, 3, 28, 28))
