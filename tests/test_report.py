"""The run report (`run_pipeline.py report`) on a tiny fake run: no training, hand-written
manifests (with the driver's real fingerprints), metric files and per-image artifacts."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.artifacts import save_json, save_label_png, voc_palette
from pipeline.config import load_config
from dataset.registry import build_dataset
from dataset.demo import generate_demo_data
from pipeline.errors import PipelineError
from report.page import UNSURE_RGB, colorize_label, config_drift, pick_samples, write_report
from pipeline.runner import stage_fingerprint, stage_status
from pipeline.runtime import init_runtime
from pipeline.catalogue import read_cam
from pipeline.catalogue import write_cam as save_cam
from pipeline.methods import CRT

STAGE_NAMES = CRT.stage_names
get_stage = CRT.stage

REPO = Path(__file__).resolve().parents[1]
ALL_DONE = ("train_cam", "make_cam", "eval_cam", "cam_to_ir_label", "train_irn", "make_sem_seg", "eval_sem_seg",
            "train_deeplab", "test_deeplab", "crf")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_data") / "VOC2012"
    generate_demo_data(root, n_train=4, n_val=2, seed=0)
    return root


def write_config(path: Path, data_root: Path, work_dir: Path, run_name: str) -> Path:
    path.write_text(yaml.safe_dump({
        "run_name": run_name, "work_dir": str(work_dir), "device": "cpu",
        "data": {"dataset": "voc12", "root": str(data_root), "train_split": "train", "infer_split": "train",
                 "eval_split": "train", "val_split": "val"},
        "test_deeplab": {"save_logits": False},
    }))
    return path


def per_class(names, base: float) -> dict:
    return {n: round(base + 3 * i, 3) for i, n in enumerate(names)}


def metric_file(result: Path, stage: str, names, base: float, **extra) -> None:
    record = {"miou": base + 5, "per_class_iou": per_class(names, base), "n_images": 4, "pixel_accuracy": 80.0}
    record.update(extra)
    save_json(result / "metrics" / f"{stage}.json", record)


def fake_run(cfg, stages=ALL_DONE) -> None:
    """Manifests (matching fingerprints and upstream run ids), metrics and artifacts for `stages`."""
    result = cfg.result_dir
    dataset = build_dataset(cfg.data)
    train, val = dataset.ids("train"), dataset.ids("val")
    names = ["background", "aeroplane", "bird", "car", "cat", "person"]
    for image_id in train:
        gt = dataset.load_mask(image_id)
        keys = np.unique(gt[(gt > 0) & (gt < 255)]).astype(np.int64) - 1
        if "make_cam" in stages:
            high = torch.from_numpy(np.stack([(gt == k + 1).astype(np.float32) * 0.9 for k in keys])
                                    if len(keys) else np.zeros((0,) + gt.shape, np.float32))
            save_cam(result / "cam" / f"{image_id}.npz", keys, high[:, ::4, ::4], high)
        if "cam_to_ir_label" in stages:
            ir = gt.copy()
            ir[:10] = 255
            save_label_png(result / "ir_label" / f"{image_id}.png", ir)
        if "make_sem_seg" in stages:
            save_label_png(result / "sem_seg" / f"{image_id}.png", np.where(gt == 255, 0, gt).astype(np.uint8))
    for image_id in val:
        gt = np.where(dataset.load_mask(image_id) == 255, 0, dataset.load_mask(image_id)).astype(np.uint8)
        if "test_deeplab" in stages:
            save_label_png(result / "deeplab" / "pred" / f"{image_id}.png", gt)
        if "crf" in stages:
            save_label_png(result / "deeplab" / "crf" / f"{image_id}.png", gt)
    if "eval_cam" in stages:
        metric_file(result, "eval_cam", names, 20.0, threshold=0.15, best_threshold=0.3, best_miou=33.0,
                    sweep={"0.05": 20.0, "0.1": 24.0, "0.15": 25.0, "0.2": 30.0, "0.25": 32.0, "0.3": 33.0})
    if "eval_sem_seg" in stages:
        metric_file(result, "eval_sem_seg", names, 30.0)
    if "test_deeplab" in stages:
        metric_file(result, "test_deeplab", names, 40.0, split="val")
    if "crf" in stages:
        metric_file(result, "crf", names, 45.0, split="val")
    weights = {"train_cam": ("cam_cnn", "cam_vit"), "train_irn": ("irn",), "train_deeplab": ("deeplab",)}
    for stage, names in weights.items():
        if stage in stages:
            for name in names:
                (cfg.sess_dir / f"{name}.pth").parent.mkdir(parents=True, exist_ok=True)
                (cfg.sess_dir / f"{name}.pth").write_bytes(b"weights stand-in")
    run_ids = {}
    for name in STAGE_NAMES:
        if name not in stages:
            continue
        run_ids[name] = uuid.uuid4().hex
        upstream = {u: {"fingerprint": stage_fingerprint(cfg, u), "run_id": run_ids.get(u)}
                    for u in get_stage(name).reads}
        outputs = {"images": len(val), "split": "val"} if name in ("test_deeplab", "crf") else {"images": len(train)}
        metrics = {}
        path = result / "metrics" / f"{name}.json"
        if path.exists():
            metrics = {"miou": json.loads(path.read_text())["miou"]}
        save_json(result / "manifests" / f"{name}.json", {
            "stage": name, "fingerprint": stage_fingerprint(cfg, name), "run_id": run_ids[name],
            "upstream": upstream, "outputs": outputs, "metrics": metrics, "wall_time_s": 12.5,
            "finished_at": "2026-01-01T00:00:00"})


def placeholders(text: str, what: str) -> int:
    """Picture placeholders ("not run", "not available") on the page."""
    return len(re.findall(r'<div class="na"[^>]*>' + re.escape(what) + "</div>", text))


def img_sources(page: Path) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]+)"', page.read_text())


def assert_images_resolve(page: Path) -> list[str]:
    sources = img_sources(page)
    for src in sources:
        assert not src.startswith(("http:", "https:", "//")), src
        if not src.startswith("data:"):
            assert (page.parent / unquote(src)).is_file(), src
    return sources


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_root):
    work = tmp_path_factory.mktemp("report_full")
    config = write_config(work / "cfg.yaml", data_root, work, "full")
    cfg = load_config(config)
    fake_run(cfg)
    return config, cfg


def test_fake_run_is_done(full_run):
    _, cfg = full_run
    runtime = init_runtime("cpu")
    for name in ALL_DONE:
        assert stage_status(cfg, name, runtime).state == "done", name


def test_full_report(full_run):
    _, cfg = full_run
    page = write_report(cfg, n_images=3)
    assert page == cfg.result_dir / "report" / "index.html"
    text = page.read_text()
    assert "<script" not in text.lower()
    sources = assert_images_resolve(page)
    assert "img/iou_per_class.png" in sources and "img/cam_sweep.png" in sources
    # config summary, stage table and wall times
    assert cfg.run_name in text and str(cfg.data.root) in text and "voc12" in text
    for name in STAGE_NAMES:
        assert f"<td>{name}</td>" in text
    assert "12.5 s" in text
    # every eval stage side by side, mIoU per stage
    for title in ("CAM", "Pseudo labels", "DeepLab", "DeepLab + CRF"):
        assert f"{title} mIoU" in text
    for value in ("25.0%", "35.0%", "45.0%", "50.0%"):
        assert value in text
    # samples: 3 of the 4 train images, one CAM per class of the image, IR, pseudo, GT; DeepLab section for val
    dataset = build_dataset(cfg.data)
    chosen = pick_samples(dataset.ids("train"), 3)
    for k, image_id in enumerate(chosen):
        keys = read_cam(cfg.result_dir / "cam" / f"{image_id}.npz")["keys"]
        for kind in ["image", "ir", "pseudo", "gt"] + [f"cam{int(c) + 1}" for c in keys]:
            assert f"img/s{k:02d}_{image_id}_{kind}.png" in sources, (image_id, kind)
        assert f"<h3>{image_id}</h3>" in text
    assert text.count('class="sample"') == 3 + 2        # 3 eval samples + the 2 val images of DeepLab
    assert 'id="deeplab"' in text
    assert "Legend:" in text and "unsure" in text
    assert "not run" not in text
    assert placeholders(text, "not available") == 3              # no DeepLab + CRF on the train split


def test_report_pictures_use_palette_and_grey_unsure(full_run):
    _, cfg = full_run
    write_report(cfg, n_images=1)
    img_dir = cfg.result_dir / "report" / "img"
    ir = np.asarray(Image.open(next(img_dir.glob("s00_*_ir.png"))).convert("RGB"))
    colours = {tuple(c) for c in ir.reshape(-1, 3)}
    assert UNSURE_RGB in colours                     # the unsure rows of the fake IR label
    assert (0, 0, 0) in colours


def test_rewrite_removes_old_pictures(full_run):
    _, cfg = full_run
    write_report(cfg, n_images=4)
    page = write_report(cfg, n_images=1)
    on_disk = {p.name for p in (page.parent / "img").glob("*.png")}
    referenced = {Path(unquote(s)).name for s in img_sources(page)}
    assert on_disk == referenced


def test_partial_run_shows_not_run(tmp_path, data_root):
    config = write_config(tmp_path / "cfg.yaml", data_root, tmp_path, "partial")
    cfg = load_config(config)
    fake_run(cfg, stages=("train_cam", "make_cam", "eval_cam"))
    page = write_report(cfg, n_images=2)
    text = page.read_text()
    assert_images_resolve(page)
    assert "not run" in text
    assert "img/cam_sweep.png" in img_sources(page)
    assert "img/iou_per_class.png" in img_sources(page)          # CAM column only
    # IR label, pseudo label, DeepLab + CRF placeholders on every sample
    assert placeholders(text, "not run") == 2 * 3
    assert 'id="deeplab"' not in text


def test_nothing_run_still_writes_page(tmp_path, data_root):
    config = write_config(tmp_path / "cfg.yaml", data_root, tmp_path, "empty")
    cfg = load_config(config)
    # an old metric file of a stage whose manifest is gone (e.g. being re-run) is not shown
    metric_file(cfg.result_dir, "eval_cam", ["background"], 10.0, sweep={"0.1": 1.0})
    page = write_report(cfg, n_images=2)
    text = page.read_text()
    sources = assert_images_resolve(page)
    assert "No evaluation stage has run yet" in text
    assert "eval_cam: not run" in text
    assert all("/s0" in s and s.endswith(("_image.png", "_gt.png")) for s in sources)
    assert placeholders(text, "not run") == 2 * 4                # CAM, IR, pseudo, CRF


def test_stale_run_and_config_drift(full_run, tmp_path):
    config, cfg = full_run
    shutil.copy(config, tmp_path / "cfg.yaml")
    (cfg.result_dir / "config.yaml").write_text(yaml.safe_dump(yaml.safe_load(config.read_text())))
    changed = load_config(config, ["eval_cam.threshold=0.3"])
    assert [k for k, _, _ in config_drift(changed)] == ["eval_cam.threshold"]
    text = write_report(changed, n_images=1).read_text()
    assert "stale" in text and "eval_cam.threshold" in text
    (cfg.result_dir / "config.yaml").unlink()


def test_missing_data_root_still_writes_page(tmp_path):
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "nowhere", tmp_path, "nodata")
    page = write_report(load_config(config), n_images=2)
    assert "Data set not available" in page.read_text()
    assert_images_resolve(page)


def test_negative_n_images_is_a_user_error(full_run):
    with pytest.raises(PipelineError):
        write_report(full_run[1], n_images=-1)


def test_helpers():
    assert pick_samples(list("abcdefgh"), 4) == ["a", "c", "e", "g"]
    assert pick_samples(list("ab"), 5) == ["a", "b"]
    assert pick_samples(list("ab"), 0) == []
    label = np.array([[0, 7], [255, 15]], np.uint8)
    rgb = colorize_label(label)
    assert tuple(rgb[1, 0]) == UNSURE_RGB and tuple(rgb[0, 1]) == tuple(voc_palette()[7])
    assert UNSURE_RGB not in {tuple(c) for c in voc_palette()[:255]}


def test_cli_report(full_run):
    config, cfg = full_run
    proc = subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), "report", "--config", str(config),
                           "--n-images", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report written" in proc.stdout
    page = cfg.result_dir / "report" / "index.html"
    assert str(page) in proc.stdout
    assert_images_resolve(page)
