"""Bad input through the CLI: each case gets exit 2 (130 for an interruption) and one line
naming the file or key, overwrites nothing, and leaves every finished stage current."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def tiny(root: Path, work: Path, run: str = "bad") -> dict:
    return {
        "run_name": run, "work_dir": str(work), "device": "cpu", "seed": 0,
        "data": {"dataset": "voc12", "root": str(root), "train_split": "train", "infer_split": "train",
                 "eval_split": "train", "val_split": "val"},
        "train_cam": {"cnn": {"backbone": "resnet10t", "pretrained": False, "freeze_bn": False,
                              "freeze_early_stages": False},
                      "vit": {"name": "deit_tiny_patch16_224", "pretrained": False, "window": 32, "recurrence": 1,
                              "model_kwargs": {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}},
                      "epochs": 1, "batch_size": 4, "crop_size": 64, "resize_long": [56, 96],
                      "optimizer": {"kind": "adamw", "lr": 0.002}, "num_workers": 0, "validate": False},
        "make_cam": {"cam_source": "cnn", "scales": [1.0]},
        "cam_to_ir_label": {"num_workers": 1, "crf": {"iters": 2}},
        "train_irn": {"backbone": "resnet10t", "pretrained": False, "init_from_cam": True, "crop_size": 64,
                      "batch_size": 4, "epochs": 1, "radius": 5, "num_workers": 0},
        "make_sem_seg": {"walk": {"exp_times": 2}},
    }


def cli(*args, check_code=None):
    proc = subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if check_code is not None:
        assert proc.returncode == check_code, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def one_error_line(proc, *needles) -> str:
    """Exit 2 and exactly one line on stderr, containing every needle."""
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_input")
    root = base / "data"
    cli("demo-data", "--out", root, "--train", 12, "--val", 4, check_code=0)
    config = base / "cfg.yaml"
    config.write_text(yaml.safe_dump(tiny(root, base)))
    cli("run", "--config", config, "--to", "make_sem_seg", "--skip", "eval_sem_seg", check_code=0)
    return {"root": root, "config": config, "result": base / "result" / "bad", "sess": base / "sess" / "bad",
            "base": base}


def manifests(run) -> dict:
    return {p.name: p.read_text() for p in (run["result"] / "manifests").glob("*.json")}


def status_lines(run) -> dict:
    out = cli("status", "--config", run["config"], check_code=0).stdout
    return {line.split()[0]: line.split()[1] for line in out.splitlines()[2:] if line.strip()}


@pytest.fixture
def restore(run):
    """Files a case breaks are put back (content and times) afterwards."""
    saved = []

    def keep(path: Path) -> Path:
        copy = run["base"] / f"saved_{len(saved)}"
        shutil.copy2(path, copy)
        saved.append((path, copy))
        return path

    yield keep
    for path, copy in saved:
        shutil.copy2(copy, path)


def test_wrong_root_keeps_finished_work(run):
    before = manifests(run)
    one_error_line(cli("run", "--config", run["config"], "--set", "data.root=/nonexistent/voc"), "data.root",
                   "/nonexistent/voc")
    assert manifests(run) == before
    # changing only a split a stage does not read leaves it current
    states = status_lines(run)
    assert states["train_cam"] == "done" and states["make_sem_seg"] == "done"
    out = cli("status", "--config", run["config"], "--set", "data.eval_split=val", check_code=0).stdout
    assert "eval_cam         stale" in out and "data keys it reads changed" in out
    assert all(f"{name:<17}done" in out for name in ("train_cam", "make_cam", "train_irn", "make_sem_seg"))


@pytest.mark.parametrize("override, key", [
    ("seed=-1", "seed"),
    ("train_irn.optimizer.momentum=-1", "train_irn.optimizer.momentum"),
    ("train_cam.optimizer.lr=0", "train_cam.optimizer.lr"),
    ("make_sem_seg.walk.radius=0", "make_sem_seg.walk.radius"),
    ("crf.bilat_srgb=-3", "crf.bilat_srgb"),
    ("train_deeplab.optimizer.poly_power=0", "train_deeplab.optimizer.poly_power"),
    ("method=nope", "method"),
    ("data.dataset=nope", "data.dataset"),
])
def test_bad_config_values(run, override, key):
    one_error_line(cli("run", "--config", run["config"], "--set", override), key)


def test_invalid_yaml_is_one_line(run, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  root: [unclosed\n  x: 1\n")
    one_error_line(cli("run", "--config", bad), str(bad))


def test_mask_of_wrong_size(run, restore):
    mask = restore(run["root"] / "SegmentationClass" / "2007_000001.png")
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(mask)
    one_error_line(cli("stage", "eval_cam", "--config", run["config"]), "2007_000001.png", "10x10")


def test_mask_with_unknown_label(run, restore):
    mask = restore(run["root"] / "SegmentationClass" / "2007_000002.png")
    label = np.asarray(Image.open(mask)).copy()
    label[0, 0] = 77
    Image.fromarray(label, mode="L").save(mask)
    one_error_line(cli("stage", "eval_cam", "--config", run["config"]), "2007_000002.png", "77")


def test_corrupt_cam_file(run, restore):
    cam = restore(run["result"] / "cam" / "2007_000003.npz")
    cam.write_bytes(b"not a zip file")
    one_error_line(cli("stage", "eval_cam", "--config", run["config"]), "2007_000003.npz")


def test_weights_of_another_model(run, restore):
    cnn = restore(run["sess"] / "cam_cnn.pth")
    shutil.copyfile(run["sess"] / "irn.pth", cnn)
    one_error_line(cli("stage", "make_cam", "--config", run["config"]), "cam_cnn.pth", "irn")


def test_corrupt_weights_are_not_trusted(run, restore):
    irn = restore(run["sess"] / "irn.pth")
    irn.write_bytes(b"garbage")
    one_error_line(cli("stage", "make_sem_seg", "--config", run["config"]), "irn.pth")


def test_export_refusals(run, tmp_path):
    labels_file = tmp_path / "a"
    labels_file.mkdir()
    (labels_file / "pseudo_seg_labels").write_text("a file")
    one_error_line(cli("export", "--config", run["config"], "--dest", labels_file), "pseudo_seg_labels",
                   "not a folder")
    a_file = tmp_path / "plain_file"
    a_file.write_text("x")
    one_error_line(cli("export", "--config", run["config"], "--dest", a_file), "plain_file")
    outside = tmp_path / "b"
    outside.mkdir()
    os.symlink(tmp_path / "elsewhere", outside / "pseudo_seg_labels")
    one_error_line(cli("export", "--config", run["config"], "--dest", outside), "outside")
    one_error_line(cli("export", "--config", run["config"], "--dest", "/proc/wsss_export"), "/proc")
    assert a_file.read_text() == "x" and (labels_file / "pseudo_seg_labels").read_text() == "a file"
    # a good export, readable by others (umask), after the refusals
    good = tmp_path / "good"
    cli("export", "--config", run["config"], "--dest", good, "--copy", check_code=0)
    first = sorted((good / "pseudo_seg_labels").iterdir())[0]
    assert first.stat().st_mode & 0o044 == 0o044 or os.umask(os.umask(0)) & 0o044


def test_corrupt_jpeg_in_a_loader_worker(run, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(run["root"], root)
    (root / "JPEGImages" / "2007_000004.jpg").write_bytes(b"\xff\xd8 broken jpeg")
    config = tmp_path / "cfg.yaml"
    cfg = tiny(root, tmp_path, "jpeg")
    cfg["train_cam"]["num_workers"] = 2
    config.write_text(yaml.safe_dump(cfg))
    one_error_line(cli("run", "--config", config, "--only", "train_cam"), "2007_000004.jpg")


def test_second_run_on_the_same_folder_is_refused(run):
    import fcntl

    with open(run["result"] / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        one_error_line(cli("run", "--config", run["config"], "--only", "eval_cam"), "in use")
    states = status_lines(run)
    assert states["make_sem_seg"] == "done"
