"""TSD-CAM on the single-stage engine (methods/tsd-cam.md): the VARM refiner against a slow
per-pixel computation written from the spec's constants, the SCD loss against a slow explicit
formula (value and gradients), the published VOC network and schedule from
configs/tsdcam_voc12.yaml, and a few train_net iterations with the scd term on."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from engine.refine import PRESETS, LocalRefiner
from engine.scd import correlation, random_points, scd_loss, small_view
from net.registry import build_model
from pipeline.config import load_config
from pipeline.errors import PipelineError
from stages.train_net import model_args, term_on, used_terms

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- VARM (tsd-cam.md §3.2)


def slow_varm(image: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel (48, h, w), refined masks) of one image (3, h, w) and masks (M, h, w), in Python
    floats from the spec's constants: 48 neighbours (8 directions x dilations 1, 2, 4, 8, 12, 24,
    coordinates clamped), appearance -mean_c(4 |I_j - I_i| / (std_i + 1e-8))^2 with the unbiased
    std over the 48 neighbour values, variation = mean_c of the squared differences of the
    neighbour-shifted image with itself one row down and one column right (clamped), kernel
    softmax(appearance) - 0.01 softmax(variation), 10 propagation steps."""
    img, m = image.tolist(), masks.tolist()
    channels, h, w = len(img), len(img[0]), len(img[0][0])
    directions = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    offsets = [(d * dy, d * dx) for d in (1, 2, 4, 8, 12, 24) for dy, dx in directions]

    def clamp(y, x):
        return min(max(y, 0), h - 1), min(max(x, 0), w - 1)

    def shifted(plane, y, x, oy, ox):
        """The neighbour-shifted map at (y, x): plane at (y + oy, x + ox), clamped."""
        yy, xx = clamp(y + oy, x + ox)
        return plane[yy][xx]

    def softmax(values):
        top = max(values)
        exps = [math.exp(v - top) for v in values]
        return [e / sum(exps) for e in exps]

    kernel = [[None] * w for _ in range(h)]
    for y in range(h):
        for x in range(w):
            appearance, variation = [0.0] * 48, [0.0] * 48
            for c in range(channels):
                values = [shifted(img[c], y, x, oy, ox) for oy, ox in offsets]
                mean = sum(values) / 48
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / 47)
                for j, (oy, ox) in enumerate(offsets):
                    appearance[j] -= (4 * abs(values[j] - img[c][y][x]) / (std + 1e-8)) ** 2 / channels
                    below = shifted(img[c], min(y + 1, h - 1), x, oy, ox)
                    right = shifted(img[c], y, min(x + 1, w - 1), oy, ox)
                    variation[j] += ((values[j] - below) ** 2 + (values[j] - right) ** 2) / channels
            kernel[y][x] = [a - 0.01 * v for a, v in zip(softmax(appearance), softmax(variation))]
    for _ in range(10):
        m = [[[sum(kernel[y][x][j] * shifted(plane, y, x, oy, ox) for j, (oy, ox) in enumerate(offsets))
               for x in range(w)] for y in range(h)] for plane in m]
    k = torch.tensor(kernel, dtype=torch.float64).permute(2, 0, 1)
    return k, torch.tensor(m, dtype=torch.float64)


def test_varm_preset_equals_the_spec_computed_per_pixel():
    torch.manual_seed(0)
    image = torch.rand(3, 6, 7, dtype=torch.float64)
    image[:, :, 4:] += 0.4                                       # an edge
    masks = torch.rand(2, 6, 7, dtype=torch.float64).softmax(dim=0)
    refiner = LocalRefiner("varm")
    assert PRESETS["aprm"] is PRESETS["varm"]                    # TSD-CAM's name for the same module
    assert refiner.config.iterations == 10 and refiner.config.dilations == (1, 2, 4, 8, 12, 24)
    kernel, refined = slow_varm(image, masks)
    torch.testing.assert_close(refiner.kernel(image[None])[0], kernel, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(refiner(image[None], masks[None])[0], refined, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(kernel.sum(dim=0), torch.full((6, 7), 0.99, dtype=torch.float64))


# ----------------------------------------------------------------------------- SCD (tsd-cam.md §2.3)


def bilinear_at(maps: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """maps (C, H, W) at normalised (x, y) in [-1, 1], corners on the corner pixels, clamped."""
    h, w = maps.shape[-2:]
    fx, fy = min(max((x + 1) / 2 * (w - 1), 0.0), w - 1.0), min(max((y + 1) / 2 * (h - 1), 0.0), h - 1.0)
    x0, y0 = int(math.floor(fx)), int(math.floor(fy))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    ax, ay = fx - x0, fy - y0
    return ((1 - ay) * ((1 - ax) * maps[:, y0, x0] + ax * maps[:, y0, x1])
            + ay * ((1 - ax) * maps[:, y1, x0] + ax * maps[:, y1, x1]))


def slow_scd(cams_a, cams_b, seg_a, seg_b, points_a, points_b, batch_mean=False) -> torch.Tensor:
    """-mean_{b,p,q} max(cos(seg_a(p), seg_b(q)), 0) * T'[p, q], with T the cosine of the CAMs at
    the same points, T' = T - mean_q T + mean_{p,q} T (or the mean over the batch too); one pair
    at a time."""
    def cos(u, v):
        return (u * v).sum() / (u.norm().clamp(min=1e-10) * v.norm().clamp(min=1e-10))

    teachers, students = [], []
    for b in range(len(cams_a)):
        pa = [tuple(map(float, p)) for p in points_a[b].reshape(-1, 2)]
        pb = [tuple(map(float, p)) for p in points_b[b].reshape(-1, 2)]
        ta = [bilinear_at(cams_a[b].detach(), *p) for p in pa]
        tb = [bilinear_at(cams_b[b].detach(), *p) for p in pb]
        sa = [bilinear_at(seg_a[b], *p) for p in pa]
        sb = [bilinear_at(seg_b[b], *p) for p in pb]
        teachers.append([[float(cos(u, v)) for v in tb] for u in ta])
        students.append([[cos(u, v) for v in sb] for u in sa])
    everything = [t for teacher in teachers for row in teacher for t in row]
    total, count = 0.0, 0
    for teacher, student in zip(teachers, students):
        pa, pb = teacher, teacher[0]
        overall = (sum(everything) / len(everything) if batch_mean
                   else sum(map(sum, teacher)) / (len(pa) * len(pb)))
        for i in range(len(pa)):
            row_mean = sum(teacher[i]) / len(pb)
            for j in range(len(pb)):
                target = teacher[i][j] - row_mean + overall
                total = total - torch.clamp(student[i][j], min=0) * target
                count += 1
    return total / count


def test_scd_loss_equals_the_slow_formula_and_trains_only_the_seg_logits_of_both_views():
    torch.manual_seed(0)
    cams_a = torch.rand(2, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    cams_b = torch.rand(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    seg_a = torch.randn(2, 4, 9, 8, dtype=torch.float64, requires_grad=True)
    seg_b = torch.randn(2, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    points_a, points_b = random_points(2, 3).double(), random_points(2, 3).double()
    points_a[0, 0, 0] = torch.tensor([-1.3, 1.2])                # outside: border padding
    fast = scd_loss(cams_a, cams_b, seg_a, seg_b, points_a, points_b)
    slow = slow_scd(cams_a, cams_b, seg_a, seg_b, points_a, points_b)
    assert fast.dtype == torch.float32                           # computed in float32, as on the GPU
    torch.testing.assert_close(fast.double(), slow, atol=1e-6, rtol=1e-5)
    fast_grads = torch.autograd.grad(fast, (seg_a, seg_b))
    slow_grads = torch.autograd.grad(slow, (seg_a, seg_b))
    for fast_grad, slow_grad in zip(fast_grads, slow_grads):
        assert fast_grad.abs().sum() > 0                         # the gradient reaches both views
        torch.testing.assert_close(fast_grad, slow_grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(scd_loss(cams_a, cams_b, seg_a, seg_b, points_a, points_b, batch_mean=True).double(),
                               slow_scd(cams_a, cams_b, seg_a, seg_b, points_a, points_b, batch_mean=True),
                               atol=1e-6, rtol=1e-5)                # the reference's batch-wide mean
    fast = scd_loss(cams_a, cams_b, seg_a, seg_b, points_a, points_b)
    fast.backward()
    assert cams_a.grad is None and cams_b.grad is None           # the CAMs are targets


def test_scd_teacher_is_centred_per_point_and_identical_codes_give_a_negative_loss():
    torch.manual_seed(1)
    cams = torch.rand(1, 5, 6, 6)
    points_a, points_b = random_points(1, 4), random_points(1, 4)
    # student = teacher: the loss is -mean(max(T, 0) * T'), negative for non-negative CAMs
    loss = scd_loss(cams, cams, cams, cams, points_a, points_b)
    from engine.scd import sample_at

    teacher = correlation(sample_at(cams, points_a), sample_at(cams, points_b))
    centred = teacher - teacher.mean(dim=(3, 4), keepdim=True) + teacher.mean()
    torch.testing.assert_close(loss, -(teacher.clamp(min=0) * centred).mean())
    assert loss < 0


def test_small_view_is_the_floored_align_corners_resize():
    images = torch.randn(2, 3, 512, 448)
    view = small_view(images, 0.3)
    assert view.shape == (2, 3, 153, 134)
    torch.testing.assert_close(view, F.interpolate(images, size=(153, 134), mode="bilinear", align_corners=True))
    assert small_view(torch.randn(1, 3, 64, 64), 0.3).shape[-2:] == (19, 19)


# ----------------------------------------------------------------------------- the published recipe


def test_tsdcam_voc12_builds_the_published_network_and_schedule():
    cfg = load_config(REPO / "configs" / "tsdcam_voc12.yaml", ["train_net.pretrained=false"])
    section = cfg.train_net
    assert cfg.method == "tsdcam" and section.backbone == "vit_base_patch16_224.orig_in21k_ft_in1k"
    assert section.crop_size == 512 and section.batch_size == 4 and section.iterations == 20000
    assert section.refiner.preset == "varm" and LocalRefiner(section.refiner.preset).config == PRESETS["varm"]
    assert used_terms(section) == ["cls", "cls_aux", "ptc", "seg", "reg", "scd"]      # no CTC
    losses = section.losses
    assert [term_on(getattr(losses, n), 2000) for n in ("cls", "cls_aux", "ptc", "seg", "reg", "scd")] == [
        True, True, False, False, False, False]                  # classification-only warm-up
    assert all(term_on(getattr(losses, n), 2001) for n in ("ptc", "seg", "reg", "scd"))
    assert (losses.ptc.weight, losses.seg.weight, losses.reg.weight, losses.scd.weight) == (0.2, 0.1, 0.05, 0.1)
    assert (section.scd.view_scale, section.scd.samples, section.scd.seg_align_corners) == (0.3, 40, False)
    crf = cfg.crf_seg_head
    assert (crf.iters, crf.gauss_sxy, crf.gauss_compat, crf.bilat_sxy, crf.bilat_srgb, crf.bilat_compat) == (
        10, 3, 3, 140, 5, 5)
    net = build_model(section.model, model_args(section, 20))
    vit = net.backbone
    assert vit.depth == 12 and vit.embed_dim == 768 and vit.patch_size == 16 and vit.aux_index == 9
    assert net.projection is None and net.teacher_projection is None       # no CTC heads
    assert net.classifier.pool == "gmp" and net.seg_head.conv8.out_channels == 21
    released = load_config(REPO / "configs" / "tsdcam_voc12_released.yaml").train_net
    assert used_terms(released) == ["cls", "cls_aux", "seg"] and released.losses.seg.start == 2001
    coco = load_config(REPO / "configs" / "tsdcam_coco.yaml")
    c = coco.train_net.losses
    assert coco.train_net.iterations == 80000 and coco.train_net.batch_size == 8 and coco.train_net.crop_size == 512
    assert (c.seg.start, c.reg.start, c.ptc.start, c.scd.start, c.ctc.weight) == (8001, 8001, 12001, 12001, 0)
    demo = load_config(REPO / "configs" / "demo_tsdcam.yaml")
    assert demo.method == "tsdcam" and demo.train_net.losses.scd.weight > 0 and demo.device == "cpu"


# ----------------------------------------------------------------------------- in the engine


def tiny_net(**extra):
    return build_model("single_stage_vit", {"backbone": "vit_tiny_patch16_224", "num_classes": 3, "aux_layer": -1,
                                            "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2,
                                            "img_size": 64, "seg_hidden": 8, "pos_embed_trainable": True, **extra})


def test_the_view_goes_through_the_forward_and_the_term_falls_back_to_a_second_call():
    from engine.scd import scd_prepare, scd_term
    from engine.terms import Step
    from pipeline.config import TrainNetConfig

    class NoViews(torch.nn.Module):
        """A network whose forward takes no seg_views (the term calls it again on the view)."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, images):
            return self.net(images)

    class Engine:
        def online_cams(self, net, images):
            return torch.rand(len(images), 3, *images.shape[-2:]), None

    torch.manual_seed(0)
    section = TrainNetConfig()
    section.scd.samples = 5
    images = torch.randn(2, 3, 64, 64)
    for wrap in (False, True):
        net = tiny_net()
        model = NoViews(net) if wrap else net
        step = Step(model, model, images, torch.ones(2, 3), torch.tensor([[0, 64, 0, 64]] * 2), None, 5000, section,
                    None, Engine())
        args = scd_prepare(step)
        assert step.kept("scd_view").shape[-2:] == (19, 19)
        assert ("seg_views" in args) is not wrap
        step.out = model(images, **args)
        step.out.seg.retain_grad()
        if not wrap:
            assert step.out.view_seg[0].shape == (2, 4, 2, 2)
            torch.testing.assert_close(step.out.view_seg[0], net.segment(step.kept("scd_view")))
            step.out.view_seg[0].retain_grad()
        loss = scd_term(step)
        loss.backward()
        assert step.out.seg.grad.abs().sum() > 0                    # both views' seg logits are students
        if not wrap:
            assert step.out.view_seg[0].grad.abs().sum() > 0
        assert net.seg_head.conv8.weight.grad.abs().sum() > 0
        assert net.classifier.classifier.weight.grad is None        # the CAM heads get nothing from SCD
    section.scd.view_scale = 0.1                                    # 6-px view, 3 px at CAM scale 0.5
    step = Step(net, net, images, torch.ones(2, 3), torch.tensor([[0, 64, 0, 64]] * 2), None, 5000, section,
                None, Engine())
    with pytest.raises(PipelineError, match="train_net.scd.view_scale"):
        scd_prepare(step)


@pytest.mark.parametrize("corners", [True, False])
def test_scd_term_on_the_mit_network_with_its_upsampling(corners):
    """TSCD reuses the term on its MiT network (stride-4 logits, align_corners=True upsampling):
    the term equals scd_loss on the logits upsampled with the configured flag."""
    from engine.scd import scd_prepare, scd_term
    from engine.terms import Step
    from pipeline.config import TrainNetConfig

    class Engine:
        def online_cams(self, net, images):
            cams = torch.rand(len(images), 3, *images.shape[-2:])
            return cams, cams

    torch.manual_seed(0)
    net = build_model("single_stage_mit", {"variant": "b0", "num_classes": 3, "decoder_dim": 8,
                                           "seg_align_corners": True, "embed_dims": [8, 16, 16, 24],
                                           "num_heads": [1, 1, 2, 3], "depths": [1, 1, 1, 1]})
    section = TrainNetConfig()
    section.scd.samples, section.scd.seg_align_corners = 4, corners
    section.cam_scales = [1.0]                 # the view's CAMs at 38 px: MiT takes >= 32
    images = torch.randn(2, 3, 128, 128)
    step = Step(net, net, images, torch.ones(2, 3), torch.tensor([[0, 128, 0, 128]] * 2), None, 5000, section,
                None, Engine())
    step.out = net(images, **scd_prepare(step))
    assert step.out.view_seg[0].shape == (2, 4, 10, 10)        # stride 4 of the 38-px view
    state = torch.get_rng_state()
    loss = scd_term(step)
    torch.set_rng_state(state)
    points_a, points_b = random_points(2, 4), random_points(2, 4)
    up = lambda x, size: F.interpolate(x, size=size, mode="bilinear", align_corners=corners)  # noqa: E731
    expected = scd_loss(step.cams(), step.kept("scd_view_cams"), up(step.out.seg, (128, 128)),
                        up(step.out.view_seg[0], (38, 38)), points_a, points_b)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert net.decoder.linear_pred.weight.grad.abs().sum() > 0
    assert net.classifier.classifier.weight.grad is None


def test_train_net_runs_a_few_iterations_with_scd(tmp_path, caplog):
    from dataset.demo import generate_demo_data
    from pipeline.methods import get_method
    from pipeline.runner import run_stage
    from pipeline.runtime import Runtime

    root = tmp_path / "data"
    generate_demo_data(root, n_train=4, n_val=2, seed=0, layout="voc")
    config = {
        "base": str(REPO / "configs" / "demo_tsdcam.yaml"), "run_name": "tsdcam", "work_dir": str(tmp_path),
        "data": {"root": str(root)},
        "train_net": {"model_kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 16, "num_heads": 2, "img_size": 64},
                      "seg_hidden": 8, "iterations": 3, "batch_size": 2, "crop_size": 64, "log_every": 1,
                      "checkpoint_every": 3, "scd": {"samples": 6},
                      "losses": {"ptc": {"start": 1}, "seg": {"start": 1}, "reg": {"start": 1},
                                 "scd": {"start": 1}}},
    }
    path = tmp_path / "tsdcam.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    spec = next(s for s in get_method("tsdcam").stages if s.name == "train_net")
    with caplog.at_level(logging.INFO, logger="wsss"):
        manifest = run_stage(cfg, spec, Runtime(device=torch.device("cpu")), fresh=True)
    assert math.isfinite(manifest["metrics"]["final_loss"])
    assert "scd" in caplog.text and "ctc" not in caplog.text
    assert (tmp_path / "sess" / "tsdcam" / "net.pth").exists()
