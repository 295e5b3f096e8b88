"""ToCo on the single-stage engine: the published network that configs/toco_voc12.yaml builds, the
online pseudo-label step, and every ToCo stage end to end on tiny data through the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from net.registry import build_model
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.methods import get_method
from stages.train_net import model_args, term_on

REPO = Path(__file__).resolve().parents[1]


def test_toco_voc12_builds_the_published_network():
    cfg = load_config(REPO / "configs" / "toco_voc12.yaml", ["train_net.pretrained=false"])
    assert cfg.method == "toco" and cfg.train_net.backbone == "vit_base_patch16_224.orig_in21k_ft_in1k"
    net = build_model("single_stage_vit", model_args(cfg.train_net, 20))
    vit = net.backbone
    assert vit.depth == 12 and vit.embed_dim == 768 and vit.patch_size == 16
    assert vit.aux_index == 9                                   # block 10 of 12
    assert not vit.vit.pos_embed.requires_grad                  # frozen, resized per forward
    assert net.classifier.classifier.bias is None and net.classifier.pool == "gmp"
    assert net.seg_head.conv6.dilation == (5, 5) and net.seg_head.conv8.out_channels == 21
    encoder, heads = net.param_groups()
    assert len(encoder) + len(heads) == sum(1 for p in net.parameters() if p.requires_grad)
    assert {id(p) for p in net.seg_head.parameters()} <= {id(p) for p in heads}
    opt = cfg.train_net.optimizer
    assert (opt.kind, opt.lr, opt.weight_decay, opt.warmup_steps, cfg.train_net.head_lr_mult) == (
        "adamw", 6e-5, 0.01, 1500, 10)
    assert (cfg.train_net.thresholds.low, cfg.train_net.thresholds.high) == (0.25, 0.7)
    assert term_on(cfg.train_net.losses.seg, 2001) and not term_on(cfg.train_net.losses.seg, 2000)
    coco = load_config(REPO / "configs" / "toco_coco.yaml")
    assert coco.train_net.iterations == 80000 and coco.train_net.batch_size == 8
    assert coco.train_net.thresholds.high == 0.65 and coco.test_seg_head.resize_to == 448
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 96, 112))
    assert out.cams.shape == (1, 20, 6, 7) and out.seg.shape == (1, 21, 6, 7)


def test_aux_layer_deeper_than_the_model_is_a_clear_error():
    cfg = load_config(None, ["train_net.backbone=vit_tiny_patch16_224", "train_net.pretrained=false",
                             "train_net.aux_layer=14"])
    with pytest.raises(PipelineError, match="aux_layer 14"):
        build_model("single_stage_vit", model_args(cfg.train_net, 20))


def tiny_toco(root: Path, work: Path) -> dict:
    return {
        "method": "toco", "run_name": "toco", "work_dir": str(work), "device": "cpu", "seed": 0,
        "data": {"dataset": "voc12", "root": str(root), "train_split": "train", "infer_split": "train",
                 "eval_split": "train", "val_split": "val"},
        "train_net": {"backbone": "vit_tiny_patch16_224", "pretrained": False, "aux_layer": -2,
                      "model_kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64},
                      "pos_embed_trainable": True, "seg_hidden": 16, "iterations": 8, "batch_size": 4,
                      "crop_size": 64, "cam_scales": [1.0, 0.5], "checkpoint_every": 4, "log_every": 4,
                      "num_workers": 0, "optimizer": {"lr": 0.001, "warmup_steps": 2},
                      "losses": {"seg": {"start": 4}, "reg": {"start": 4}},
                      "ctc": {"local_crops": 2, "local_size": 24,
                              "projection": {"hidden_dim": 16, "bottleneck_dim": 8, "out_dim": 16, "num_layers": 3}}},
        "make_cam": {"cam_source": "net", "scales": [1.0]},
        "make_sem_seg": {"source": "cam_refine"},
        "test_seg_head": {"scales": [1.0]},
        "crf_seg_head": {"iters": 2, "num_workers": 1},
        "train_deeplab": {"enabled": False}, "test_deeplab": {"enabled": False}, "crf": {"enabled": False},
    }


def test_every_toco_stage_end_to_end(tmp_path):
    root = tmp_path / "data"
    subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), "demo-data", "--out", str(root), "--train", "8",
                    "--val", "4"], check=True, cwd=REPO, capture_output=True)
    config = tmp_path / "toco.yaml"
    config.write_text(yaml.safe_dump(tiny_toco(root, tmp_path)))
    proc = subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), "run", "--config", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = tmp_path / "result" / "toco"
    for stage in get_method("toco").stage_names[:7]:
        assert f"{stage:<17}done" in proc.stdout, proc.stdout
    assert "train_deeplab    disabled" in proc.stdout
    log = proc.stderr + proc.stdout
    assert "seg " in log and "reg " in log and "ctc " in log      # the later terms and CTC ran
    cam = np.load(next((result / "cam").glob("*.npz")))
    assert {"keys", "cam", "high_res", "net_high_res", "aux_high_res"} <= set(cam.files)
    eval_cam = json.loads((result / "metrics" / "eval_cam.json").read_text())
    assert set(eval_cam["sources"]) == {"net", "aux"}
    for stage in ("test_seg_head", "crf_seg_head"):
        assert json.loads((result / "metrics" / f"{stage}.json").read_text())["n_images"] == 4
    assert len(list((result / "seg_head" / "crf").glob("*.png"))) == 4
    state = torch.load(tmp_path / "sess" / "toco" / "net.pth", weights_only=True)
    assert state["kind"] == "single_stage_vit"
    assert any(k.startswith("teacher_projection.") for k in state["state_dict"])    # the EMA head is saved
    too_big = subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), "stage", "train_net", "--config",
                              str(config), "--set", "train_net.ctc.local_size=64"], cwd=REPO, capture_output=True,
                             text=True, timeout=600)
    assert too_big.returncode == 2 and "train_net.ctc.local_size" in too_big.stderr
    assert (tmp_path / "sess" / "toco" / "net.pth").exists()       # refused before anything was discarded


def test_contrast_views_go_through_the_projection_head_in_the_flag_order():
    """projected[b] = the head on [input, global view 2, the image's local crops in order], the
    layout ctc_loss's flags follow (globals first)."""
    torch.manual_seed(0)
    net = build_model("single_stage_vit", {"backbone": "vit_tiny_patch16_224", "num_classes": 3, "aux_layer": -1,
                                           "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2,
                                           "img_size": 32, "seg_hidden": 8, "pos_embed_trainable": True,
                                           "projection": {"hidden_dim": 8, "bottleneck_dim": 4, "out_dim": 6}}).eval()
    images, second, crops = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2 * 3, 3, 16, 16)
    with torch.no_grad():
        out = net(images, views=[second, crops])
        head = lambda x: net.projection(net.backbone(x).cls_token)    # noqa: E731
        assert out.projected.shape == (2, 5, 6)
        torch.testing.assert_close(out.projected[:, 0], head(images))
        torch.testing.assert_close(out.projected[:, 1], head(second))
        torch.testing.assert_close(out.projected[1, 2:], head(crops[3:]))
    assert not any(p.requires_grad for p in net.teacher_projection.parameters())
    encoder, heads = net.param_groups()
    assert {id(p) for p in net.projection.parameters()} <= {id(p) for p in heads}
    assert not {id(p) for p in net.teacher_projection.parameters()} & {id(p) for p in encoder + heads}


def test_random_resized_box_stays_inside_and_keeps_its_area_range():
    from pipeline.transforms import random_resized_box

    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        top, left, bh, bw = random_resized_box(h, w, rng)
        assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w and bh > 0 and bw > 0
        assert bh * bw >= 0.4 * h * w * 0.8 or (bh, bw) in ((h, w), (h, min(w, round(h * 4 / 3))),
                                                             (min(h, round(w * 4 / 3)), w))


def test_conv_stem_keeps_the_patch_grid_and_floors_like_the_patch_conv():
    from net.vit_backbone import ViTBackbone

    plain = ViTBackbone("vit_tiny_patch16_224", aux_layer=-1, patch_size=8, depth=1, embed_dim=16, num_heads=2, img_size=32)
    stem = ViTBackbone("vit_tiny_patch16_224", aux_layer=-1, patch_size=8, depth=1, embed_dim=16, num_heads=2, img_size=32,
                       conv_stem=True)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in stem.vit.patch_embed.proj.modules()) == 4   # 3 stride-2 + 1x1
    for size in ((32, 32), (37, 45)):
        x = torch.randn(2, 3, *size)
        assert stem(x).patch.shape == plain(x).patch.shape == (2, 16, size[0] // 8, size[1] // 8)
    with pytest.raises(PipelineError, match="power-of-two"):
        ViTBackbone("vit_tiny_patch16_224", aux_layer=-1, patch_size=6, depth=1, embed_dim=16, num_heads=2, img_size=36,
                    conv_stem=True)


def test_background_only_image_gets_empty_cams_and_the_others_their_classes():
    """A folder-layout image may carry no class: make_cam writes it with no planes (as the CRT path
    does) instead of failing in the upsampling; an image with classes gets one plane per class."""
    from stages.make_cam import single_stage_cams

    torch.manual_seed(0)
    net = build_model("single_stage_vit", {"backbone": "vit_tiny_patch16_224", "pretrained": False, "num_classes": 5,
                                           "aux_layer": -1, "seg_hidden": 8, "patch_size": 8, "depth": 1,
                                           "embed_dim": 16, "num_heads": 1, "img_size": 32}).eval()
    image = np.random.default_rng(0).integers(0, 255, (40, 36, 3), dtype=np.uint8)
    mean, std = [0.5] * 3, [0.25] * 3
    empty = single_stage_cams(net, image, np.array([], np.int64), [1.0], mean, std, "cpu")
    assert empty["net"][0].shape == (0, 10, 9) and empty["net"][1].shape == (0, 40, 36)
    two = single_stage_cams(net, image, np.array([1, 3]), [1.0], mean, std, "cpu")
    assert two["aux"][0].shape == (2, 10, 9) and two["aux"][1].shape == (2, 40, 36)
