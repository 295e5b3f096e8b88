"""The plain-folder layout (`data.dataset: folder`): parsing, EXIF and colour modes, evaluation on
the images that have masks, one-line errors for bad input, and equivalence with the VOC layout."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dataset.classes import VOC_CLASSES
from dataset.demo import generate_demo_data
from dataset.folder import FolderDataset
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_bad_input import one_error_line, tiny  # noqa: E402


def cli(*args):
    return subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def make_folder(root: Path, rows: dict, classes=("cat", "dog"), masks: dict | None = None, size=(24, 32)):
    (root / "images").mkdir(parents=True)
    for image_id in rows:
        Image.fromarray(np.full((*size, 3), 90, np.uint8)).save(root / "images" / f"{image_id}.png")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    (root / "labels.csv").write_text("image,labels\n" + "".join(f"{k},{v}\n" for k, v in rows.items()))
    for image_id, mask in (masks or {}).items():
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(mask).save(root / "masks" / f"{image_id}.png")
    return root


def test_demo_folder_layout_reads_back(tmp_path):
    summary = generate_demo_data(tmp_path / "f", n_train=8, n_val=4, seed=2, layout="folder")
    data = FolderDataset(tmp_path / "f")
    assert data.class_names == ("background", "aeroplane", "bird", "car", "cat", "person")
    assert data.num_classes == 5 and summary["class_ids"] == [1, 2, 3, 4, 5]
    assert data.ids("train") == [f"train_{i:04d}" for i in range(1, 9)] and len(data.ids("val")) == 4
    assert data.eval_ids("train") == ["train_0001", "train_0005"] and data.eval_ids("val") == data.ids("val")
    assert data.has_masks("train") and len(data.ids("all")) == 12
    for image_id in data.eval_ids("train") + data.eval_ids("val"):      # labels agree with the masks
        mask = data.load_mask(image_id)
        present = sorted(int(v) - 1 for v in np.unique(mask) if 0 < v < 255)
        assert data.class_labels(image_id).tolist() == present


def test_exif_rgba_and_grayscale(tmp_path):
    root = make_folder(tmp_path / "f", {"a": "cat", "b": "", "c": "dog;cat"})
    rotated = Image.fromarray(np.zeros((24, 32, 3), np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6                                       # orientation: rotate 90° clockwise
    rotated.save(root / "images" / "a.jpg", exif=exif)
    (root / "images" / "a.png").unlink()
    Image.fromarray(np.full((24, 32, 4), 200, np.uint8), mode="RGBA").save(root / "images" / "b.png")
    Image.fromarray(np.full((24, 32), 50, np.uint8), mode="L").save(root / "images" / "c.png")
    data = FolderDataset(root)
    assert data.load_image("a").shape == (32, 24, 3)       # EXIF applied
    assert data.load_image("b").shape == (24, 32, 3) and data.load_image("c").shape == (24, 32, 3)
    assert data.class_labels("b").tolist() == [] and data.class_labels("c").tolist() == [0, 1]
    assert data.ids("all") == ["a", "b", "c"] and not data.has_masks("all")


def _run_only(tmp_path, root, stage):
    config = tmp_path / "cfg.yaml"
    cfg = tiny(root, tmp_path, "bad")
    cfg["data"].update(dataset="folder", train_split="all", infer_split="all", eval_split="all", val_split="all")
    config.write_text(yaml.safe_dump(cfg))
    return cli("run", "--config", config, "--only", stage)


def _mask(value=1, size=(24, 32), dtype=np.uint8):
    mask = np.zeros(size, dtype)
    mask[5:10, 5:10] = value
    return mask


@pytest.mark.parametrize("case, needles", [
    ("unknown_class", ["labels.csv, line 3", "unknown class 'cow'"]),
    ("missing_image", ["labels.csv", "image 'ghost' has no file"]),
    ("image_without_row", ["extra.png", "has no row"]),
    ("duplicate_id", ["labels.csv, line 4", "already has a row (line 2)"]),
    ("duplicate_class", ["classes.txt, line 3", "'cat' is listed twice"]),
    ("mask_wrong_size", ["masks/a.png", "10x8"]),
    ("mask_id_above_c", ["masks/a.png", "label 7"]),
    ("unreadable_image", ["b.png", "corrupt or unreadable image"]),
    ("mask_16_bit", ["masks/a.png", "16-bit"]),
])
def test_bad_input_is_one_line(tmp_path, case, needles):
    rows = {"a": "cat", "b": "dog"}
    classes, masks = ("cat", "dog"), {}
    if case == "unknown_class":
        rows["b"] = "cow"
    if case == "duplicate_class":
        classes = ("cat", "dog", "cat")
    if case == "mask_wrong_size":
        masks = {"a": _mask(size=(8, 10))}
    if case == "mask_id_above_c":
        masks = {"a": _mask(7)}
    root = make_folder(tmp_path / "f", rows, classes, masks)
    labels = root / "labels.csv"
    if case == "missing_image":
        labels.write_text(labels.read_text() + "ghost,cat\n")
    if case == "image_without_row":
        shutil.copy(root / "images" / "a.png", root / "images" / "extra.png")
    if case == "duplicate_id":
        labels.write_text(labels.read_text() + "a,dog\n")
    if case == "unreadable_image":
        (root / "images" / "b.png").write_bytes(b"not an image at all")
    if case == "mask_16_bit":
        (root / "masks").mkdir()
        Image.fromarray(_mask(1).astype(np.uint16) * 300).save(root / "masks" / "a.png")
    stage = "eval_cam" if case.startswith("mask") else "train_cam"
    one_error_line(_run_only(tmp_path, root, stage), *needles)


def test_eval_split_without_masks_is_left_out_or_refused(tmp_path):
    root = make_folder(tmp_path / "f", {"a": "cat", "b": "dog"})
    proc = _run_only(tmp_path, root, "eval_cam")
    one_error_line(proc, "eval_cam", "nothing to score")


def voc_to_folder(voc: Path, out: Path) -> None:
    """A folder made from a VOC-layout data set, as a user would: images copied, VOC's 20 class
    names, labels from the masks' class ids, splits from ImageSets/Segmentation, masks copied."""
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    (out / "splits").mkdir()
    (out / "classes.txt").write_text("\n".join(VOC_CLASSES[1:]) + "\n")
    rows = ["image,labels"]
    for path in sorted((voc / "JPEGImages").glob("*.jpg")):
        shutil.copyfile(path, out / "images" / path.name)
        mask = np.asarray(Image.open(voc / "SegmentationClass" / f"{path.stem}.png"))
        names = [VOC_CLASSES[v] for v in np.unique(mask) if 0 < v < 255]
        rows.append(f"{path.stem},{';'.join(names)}")
        shutil.copyfile(voc / "SegmentationClass" / f"{path.stem}.png", out / "masks" / f"{path.stem}.png")
    (out / "labels.csv").write_text("\n".join(rows) + "\n")
    for split in ("train", "val"):
        shutil.copyfile(voc / "ImageSets" / "Segmentation" / f"{split}.txt", out / "splits" / f"{split}.txt")


def test_folder_run_equals_the_voc_run(tmp_path):
    voc = tmp_path / "voc"
    generate_demo_data(voc, n_train=12, n_val=4, seed=4)
    voc_to_folder(voc, tmp_path / "folder")
    figures = {}
    for layout, root in (("voc12", voc), ("folder", tmp_path / "folder")):
        cfg = tiny(root, tmp_path / layout, layout)
        cfg["data"]["dataset"] = layout
        config = tmp_path / f"{layout}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        proc = cli("run", "--config", config, "--to", "eval_sem_seg")
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = tmp_path / layout / "result" / layout
        figures[layout] = [json.loads((result / "metrics" / f"{s}.json").read_text())["miou"]
                           for s in ("eval_cam", "eval_sem_seg")]
        if layout == "folder":
            proc = cli("export", "--config", config, "--dest", tmp_path / "export", "--copy")
            assert proc.returncode == 0, proc.stderr[-3000:]
            classes = json.loads((tmp_path / "export" / "classes.json").read_text())
            assert classes["0"]["name"] == "background" and classes["15"]["name"] == "person"
            assert classes["255"]["name"] == "ignore" and len(classes["1"]["colour"]) == 3
            label = Image.open(next((tmp_path / "export" / "pseudo_seg_labels").glob("*.png")))
            assert label.mode == "P"
    assert figures["voc12"] == figures["folder"]
