"""End to end: the whole pipeline through the CLI on tiny synthetic data, on the CPU, then the
driver's promises: skip when current, re-run when stale, per-image resume, forced single-stage
reruns, export, clear errors, training resume after a kill, and rank-sharded inference."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ALL_RUN = ["train_cam", "make_cam", "eval_cam", "cam_to_ir_label", "train_irn", "make_sem_seg", "eval_sem_seg",
           "make_ins_seg", "eval_ins_seg", "train_deeplab", "test_deeplab", "crf"]


def tiny_config(data_root: Path, work_dir: Path, run_name: str = "tiny") -> dict:
    return {
        "run_name": run_name, "work_dir": str(work_dir), "device": "cpu", "seed": 0,
        "data": {"dataset": "voc12", "root": str(data_root), "train_split": "train", "infer_split": "train",
                 "eval_split": "train", "val_split": "val"},
        "train_cam": {
            "cnn": {"backbone": "resnet10t", "pretrained": False, "freeze_bn": False, "freeze_early_stages": False},
            "vit": {"name": "deit_tiny_patch16_224", "pretrained": False, "window": 32, "recurrence": 2,
                    "model_kwargs": {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}},
            "epochs": 2, "batch_size": 4, "crop_size": 64, "resize_long": [56, 96],
            "optimizer": {"kind": "adamw", "lr": 0.002}, "num_workers": 0},
        "make_cam": {"cam_source": "fuse", "scales": [1.0, 0.5]},
        "cam_to_ir_label": {"num_workers": 1, "crf": {"iters": 3}},
        "train_irn": {"backbone": "resnet10t", "pretrained": False, "init_from_cam": True, "crop_size": 64,
                      "batch_size": 4, "epochs": 1, "radius": 5, "num_workers": 0},
        "make_sem_seg": {"walk": {"exp_times": 3}, "irn_pad_to": 64},
        "make_ins_seg": {"enabled": True, "walk": {"exp_times": 3}, "irn_pad_to": 64},
        "eval_ins_seg": {"enabled": True},
        "train_deeplab": {"backbone": "resnet10t", "pretrained": False, "iterations": 4, "batch_size": 2,
                          "accumulation": 2, "crop_size": 64, "optimizer": {"lr": 0.01}, "checkpoint_every": 2,
                          "log_every": 1, "num_workers": 0, "loss_resolution": "labels"},
        "crf": {"num_workers": 2, "iters": 3},
    }


def cli(*args, cwd=REPO, env=None, check=True, timeout=600):
    proc = subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def background_only_miou(root: Path, ids) -> float:
    """The mIoU of a prediction that is background everywhere: the floor every eval stage must beat."""
    from pipeline.metrics import confusion_matrix, miou_percent

    conf = 0
    for i in ids:
        gt = np.asarray(Image.open(root / "SegmentationClass" / f"{i}.png"))
        conf = conf + confusion_matrix(np.zeros_like(gt), gt, 21)
    return miou_percent(conf)


def manifest(result: Path, stage: str) -> dict:
    return json.loads((result / "manifests" / f"{stage}.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    data = base / "VOC2012"
    cli("demo-data", "--out", data, "--train", 8, "--val", 4, "--seed", 3)
    config = base / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(data, base)))
    first = cli("run", "--config", config)
    # later tests change the run; keep its manifests as they were when everything was done
    shutil.copytree(base / "result" / "tiny" / "manifests", base / "manifests_after_first_run")
    return base, config, base / "result" / "tiny", first


def test_full_pipeline_writes_every_artifact_and_metric(tiny_run):
    base, config, result, first = tiny_run
    ids = (base / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    val_ids = (base / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    for stage in ALL_RUN:
        assert (result / "manifests" / f"{stage}.json").exists(), stage
    for name in ("cam_cnn.pth", "cam_vit.pth", "irn.pth", "deeplab.pth"):
        assert (base / "sess" / "tiny" / name).exists()
    for i in ids:
        cam = np.load(result / "cam" / f"{i}.npz", allow_pickle=False)
        image = Image.open(base / "VOC2012" / "JPEGImages" / f"{i}.jpg")
        w, h = image.size
        assert cam["high_res"].shape[1:] == (h, w) and cam["cam"].shape[1:] == (-(-h // 4), -(-w // 4))
        assert cam["cam"].dtype == np.float16 and cam["high_res"].dtype == np.uint8
        assert np.asarray(Image.open(result / "sem_seg" / f"{i}.png")).shape == (h, w)
        assert np.asarray(Image.open(result / "ir_label" / f"{i}.png")).shape == (h, w)
    for i in val_ids:
        assert (result / "deeplab" / "crf" / f"{i}.png").exists()
        assert (result / "deeplab" / "logit" / f"{i}.npz").exists()
    for stage in ("eval_cam", "eval_sem_seg", "test_deeplab", "crf"):
        record = json.loads((result / "metrics" / f"{stage}.json").read_text())
        assert 0 <= record["miou"] <= 100 and record["n_images"] > 0 and "background" in record["per_class_iou"]
    eval_cam = json.loads((result / "metrics" / "eval_cam.json").read_text())
    assert "best_threshold" in eval_cam and set(eval_cam["sources"]) == {"cnn", "vit", "fuse"}
    # the CAMs and the pseudo labels beat predicting background everywhere, even this tiny run
    baseline = background_only_miou(base / "VOC2012", ids)
    assert eval_cam["best_miou"] > baseline + 2, (eval_cam["best_miou"], baseline)
    assert json.loads((result / "metrics" / "eval_sem_seg.json").read_text())["miou"] > baseline, baseline
    assert 0 <= json.loads((result / "metrics" / "eval_ins_seg.json").read_text())["map"] <= 100
    assert (result / "config.yaml").exists() and (result / "logs" / "rank0.log").exists()
    status = cli("status", "--config", config).stdout
    for stage in ALL_RUN:
        assert f"{stage:<17}done" in status, status
    assert "mIoU" in status and "mAP" in status


def test_rerun_skips_current_stages(tiny_run):
    base, config, result, _ = tiny_run
    before = {s: manifest(result, s)["run_id"] for s in ALL_RUN}
    out = cli("run", "--config", config).stdout
    assert out.count("is current, skipped") == len(ALL_RUN)
    assert {s: manifest(result, s)["run_id"] for s in ALL_RUN} == before


def test_export_symlinks_and_list(tiny_run, tmp_path):
    base, config, result, _ = tiny_run
    cli("export", "--config", config, "--dest", tmp_path / "out")
    labels = tmp_path / "out" / "pseudo_seg_labels"
    lines = (tmp_path / "out" / "pseudo_seg_labels.txt").read_text().split("\n")
    lines = [line for line in lines if line]
    assert len(lines) == len(list(labels.glob("*.png"))) == 8
    for line in lines:
        image_rel, label_rel = line.split()
        image = Image.open(tmp_path / "out" / image_rel)
        label = np.asarray(Image.open(tmp_path / "out" / label_rel))
        assert label.dtype == np.uint8 and label.shape == (image.size[1], image.size[0])
        assert (tmp_path / "out" / label_rel).is_symlink()
    cli("export", "--config", config, "--dest", tmp_path / "copy", "--copy")
    assert not next((tmp_path / "copy" / "pseudo_seg_labels").glob("*.png")).is_symlink()


def test_config_change_reruns_only_that_stage_and_forced_stage(tiny_run):
    base, config, result, _ = tiny_run
    before = {s: manifest(result, s)["run_id"] for s in ALL_RUN}
    status = cli("status", "--config", config, "--set", "eval_cam.threshold=0.3").stdout
    assert "eval_cam         stale" in status
    cli("run", "--config", config, "--set", "eval_cam.threshold=0.3")
    after = {s: manifest(result, s)["run_id"] for s in ALL_RUN}
    assert [s for s in ALL_RUN if after[s] != before[s]] == ["eval_cam"]
    assert json.loads((result / "metrics" / "eval_cam.json").read_text())["threshold"] == 0.3
    # `stage` re-runs a current stage; its dependants become stale
    cli("stage", "eval_sem_seg", "--config", config, "--set", "eval_cam.threshold=0.3")
    assert manifest(result, "eval_sem_seg")["run_id"] != after["eval_sem_seg"]


def test_per_image_resume_and_staleness_downstream(tiny_run):
    base, config, result, _ = tiny_run
    cams = sorted((result / "cam").glob("*.npz"))
    removed, kept = cams[::2], cams[1::2]
    mtimes = {p: p.stat().st_mtime_ns for p in kept}
    for p in removed:
        p.unlink()
    assert "make_cam         incomplete" in cli("status", "--config", config).stdout
    cli("run", "--config", config, "--only", "make_cam")
    assert manifest(result, "make_cam")["outputs"]["computed_on_rank0"] == len(removed)
    assert all(p.exists() for p in removed)
    assert {p: p.stat().st_mtime_ns for p in kept} == mtimes  # untouched
    status = cli("status", "--config", config).stdout
    assert "eval_cam         stale" in status and "make_sem_seg     stale" in status
    # export refuses stale pseudo labels
    proc = cli("export", "--config", config, "--dest", base / "x", check=False)
    assert proc.returncode == 2 and "make_sem_seg" in proc.stderr and "stale" in proc.stderr


def test_clear_errors(tiny_run, tmp_path):
    base, config, result, _ = tiny_run
    proc = cli("run", "--config", config, "--only", "make_camm", check=False)
    assert proc.returncode == 2 and "unknown stage 'make_camm'" in proc.stderr
    proc = cli("run", "--config", config, "--set", "run_name=fresh", "--only", "make_sem_seg", check=False)
    assert proc.returncode == 2 and "train_irn" in proc.stderr and "not run" in proc.stderr
    assert not (base / "result" / "fresh" / "sem_seg").exists()
    proc = cli("run", "--config", config, "--set", "train_cam.epochs=zero", check=False)
    assert proc.returncode == 2 and "train_cam.epochs" in proc.stderr
    proc = cli("run", "--config", config, "--set", "data.root=/nonexistent", "--set", "run_name=x", check=False)
    assert proc.returncode == 2 and "/nonexistent" in proc.stderr


def test_train_cam_resumes_after_kill(tiny_run):
    base, config, result, _ = tiny_run
    sets = ["--set", "run_name=killed", "--set", "train_cam.epochs=4"]
    ckpt = base / "sess" / "killed" / "train_cam_ckpt.pth"
    proc = subprocess.Popen([sys.executable, str(REPO / "run_pipeline.py"), "run", "--config", str(config),
                             "--only", "train_cam", *sets], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (base / "result" / "killed" / "manifests" / "train_cam.json").exists()
    out = cli("run", "--config", config, "--only", "train_cam", *sets).stdout
    assert "train_cam: resuming at step" in out and "(epoch 1.00)" not in out
    assert "(epoch 4.00)" in out


def test_train_deeplab_resume_keeps_schedule(tiny_run):
    base, config, result, _ = tiny_run
    full = json.loads((base / "manifests_after_first_run" / "train_deeplab.json").read_text())
    # the run checkpointed at iteration 2 of 4; drop its final state and resume from there
    shutil.copytree(base / "sess" / "tiny", base / "sess" / "dl", dirs_exist_ok=True)
    shutil.copytree(base / "manifests_after_first_run", base / "result" / "dl" / "manifests")
    shutil.copytree(result / "sem_seg", base / "result" / "dl" / "sem_seg")
    for name in ("train_deeplab.json",):
        (base / "result" / "dl" / "manifests" / name).unlink()
    (base / "sess" / "dl" / "deeplab.pth").unlink()
    out = cli("run", "--config", config, "--set", "run_name=dl", "--only", "train_deeplab").stdout
    assert "resuming at step 2/4" in out
    import torch

    resumed = torch.load(base / "sess" / "dl" / "deeplab.pth", weights_only=True)["state_dict"]
    original = torch.load(base / "sess" / "tiny" / "deeplab.pth", weights_only=True)["state_dict"]
    assert resumed.keys() == original.keys()
    assert all(torch.equal(resumed[k], original[k]) for k in original)   # the same weights as without the break
    assert full["outputs"]["train_images"] == 8


def test_two_rank_make_cam_matches_one_rank(tiny_run):
    base, config, result, _ = tiny_run
    (base / "result" / "ddp" / "manifests").mkdir(parents=True)
    shutil.copy(result / "manifests" / "train_cam.json", base / "result" / "ddp" / "manifests")
    (base / "sess" / "ddp").mkdir(parents=True)
    for name in ("cam_cnn.pth", "cam_vit.pth"):
        shutil.copy(base / "sess" / "tiny" / name, base / "sess" / "ddp" / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                           str(REPO / "run_pipeline.py"), "stage", "make_cam", "--config", str(config),
                           "--set", "run_name=ddp"], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = sorted(p.name for p in (result / "cam").glob("*.npz"))
    two = sorted(p.name for p in (base / "result" / "ddp" / "cam").glob("*.npz"))
    assert one == two and len(one) == 8
    for name in one:
        a = np.load(result / "cam" / name)
        b = np.load(base / "result" / "ddp" / "cam" / name)
        np.testing.assert_array_equal(a["keys"], b["keys"])
        np.testing.assert_allclose(a["cam"].astype(np.float32), b["cam"].astype(np.float32), atol=2e-3)
        assert np.abs(a["high_res"].astype(int) - b["high_res"].astype(int)).max() <= 1
    assert manifest(base / "result" / "ddp", "make_cam")["outputs"]["images"] == 8


def test_coco_layout_end_to_end(tmp_path):
    data = tmp_path / "coco"
    cli("demo-data", "--out", data, "--train", 6, "--val", 3, "--seed", 5, "--layout", "coco")
    cfg = tiny_config(data, tmp_path, run_name="coco")
    cfg["data"].update(dataset="coco", train_split="train2014", infer_split="train2014", eval_split="train2014",
                       val_split="val2014")
    cfg["make_ins_seg"]["enabled"] = cfg["eval_ins_seg"]["enabled"] = False
    config = tmp_path / "coco.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cli("run", "--config", config)
    result = tmp_path / "result" / "coco"
    for stage in ("eval_cam", "eval_sem_seg", "test_deeplab", "crf"):
        record = json.loads((result / "metrics" / f"{stage}.json").read_text())
        assert record["n_images"] in (6, 3)
        assert set(record["per_class_iou"]) <= set(__import__("dataset.classes", fromlist=["x"]).COCO_CLASSES)
    # 81 output classes for COCO: logits carry background + 80
    logit = np.load(next((result / "deeplab" / "logit").glob("*.npz")))["logit"]
    assert logit.shape[0] == 81
    cam = np.load(next((result / "cam").glob("COCO_train2014_*.npz")))
    assert cam["keys"].max() < 80


def test_test_deeplab_on_a_split_without_ground_truth(tiny_run):
    base, config, result, _ = tiny_run
    root = base / "VOC2012"
    val_id = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    shutil.copy(root / "JPEGImages" / f"{val_id}.jpg", root / "JPEGImages" / "2099_000001.jpg")
    (root / "ImageSets" / "Segmentation" / "test.txt").write_text("2099_000001\n")
    # a run of its own, from the state after the first full run (earlier tests made it stale)
    shutil.copytree(base / "manifests_after_first_run", base / "result" / "nogt" / "manifests")
    shutil.copytree(base / "sess" / "tiny", base / "sess" / "nogt")
    (base / "result" / "nogt" / "metrics").mkdir()
    (base / "result" / "nogt" / "metrics" / "test_deeplab.json").write_text("{}")
    sets = ["--set", "test_deeplab.split=test", "--set", "run_name=nogt"]
    out = cli("stage", "test_deeplab", "--config", config, *sets).stdout
    assert "no ground-truth masks" in out
    nogt = base / "result" / "nogt"
    assert (nogt / "deeplab" / "pred" / "2099_000001.png").exists()
    assert "miou" not in manifest(nogt, "test_deeplab")["metrics"]
    assert not (nogt / "metrics" / "test_deeplab.json").exists()  # no figure from another split left behind


def test_deleted_weights_or_changed_image_rerun_exactly_the_dependants(tiny_run):
    """Deleting one weights file, or changing one image, re-runs exactly the stages that depend on it,
    in full, and `status` says why first. (Last in this file: it changes the run.)"""
    base, config, result, _ = tiny_run
    cli("run", "--config", config)                                   # everything current again
    before = {s: manifest(result, s)["run_id"] for s in ALL_RUN}
    (base / "sess" / "tiny" / "irn.pth").unlink()
    status = cli("status", "--config", config).stdout
    assert "train_irn        incomplete" in status and "irn.pth" in status
    cli("run", "--config", config)
    after = {s: manifest(result, s)["run_id"] for s in ALL_RUN}
    rerun = [s for s in ALL_RUN if after[s] != before[s]]
    assert rerun == ["train_irn", "make_sem_seg", "eval_sem_seg", "make_ins_seg", "eval_ins_seg", "train_deeplab",
                     "test_deeplab", "crf"], rerun
    assert manifest(result, "make_sem_seg")["outputs"]["computed_on_rank0"] == 8     # in full
    # one changed training image: its CAM and everything downstream
    image = base / "VOC2012" / "JPEGImages" / f"{(base / 'VOC2012' / 'ImageSets' / 'Segmentation' / 'train.txt').read_text().split()[0]}.jpg"
    pixels = np.asarray(Image.open(image)).copy()
    pixels[:8, :8] = 255 - pixels[:8, :8]
    Image.fromarray(pixels).save(image, quality=95)
    status = cli("status", "--config", config).stdout
    assert "train_cam        stale" in status and "input files changed" in status
    assert "test_deeplab     stale" in status                       # downstream, through the chain
