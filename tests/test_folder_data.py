"""The plain-folder layout (`data.dataset: folder`): parsing, EXIF and colour modes, evaluation on
the images that have masks, one-line errors for bad input, export, and equivalence with the VOC layout."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageOps

from dataset.classes import VOC_CLASSES
from dataset.demo import generate_demo_data
from dataset.folder import FolderDataset, image_size, read_image
from pipeline import artifacts
from pipeline.catalogue import write_cam, write_logits
from pipeline.errors import PipelineError
from pipeline.export import class_table

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


def exif_jpeg(path: Path, pixels: np.ndarray, orientation: int) -> None:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=100)


# ----------------------------------------------------------------------------- parsing

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
    data.validate("train", ("images", "masks"))


def test_labels_file_forms(tmp_path):
    """Ids with or without their extension, spaces around names, empty cells, blank lines, a BOM,
    any number of classes; split lists may name files; hidden files are not images."""
    classes = [f"class {k}" for k in range(30)]
    root = make_folder(tmp_path / "f", {"a": "", "b": "", "c": ""}, classes=classes)
    (root / "labels.csv").write_text("\ufeffimage,labels\na.png, class 29 ; class 0\n\nb,\nc,class 3\n",
                                     encoding="utf-8")
    (root / "images" / "._a.png").write_bytes(b"resource fork")
    (root / "splits").mkdir()
    (root / "splits" / "few.txt").write_text("c.png\n\na\n")
    data = FolderDataset(root)
    assert data.num_classes == 30 and data.class_names[1] == "class 0" and data.class_names[30] == "class 29"
    assert data.class_labels("a").tolist() == [0, 29] and data.class_labels("b").tolist() == []
    assert data.multi_hot("c").nonzero()[0].tolist() == [3]
    assert data.ids("all") == ["a", "b", "c"] and data.ids("few") == ["c", "a"]
    with pytest.raises(PipelineError, match=r"splits/val.txt \(without splits/, the one split is 'all'\)"):
        data.ids("val")


def test_label_cache_follows_the_labels_file(tmp_path):
    root = make_folder(tmp_path / "f", {"a": "cat", "b": "dog"})
    cache = tmp_path / "cache"
    data = FolderDataset(root, cache)
    data.load_label_cache(["all"])
    assert len(list(cache.glob("folder_labels_*.json"))) == 1
    (root / "labels.csv").write_text("image,labels\na,dog\nb,cat;dog\n")
    data = FolderDataset(root, cache)
    data.load_label_cache(["all"])
    assert data.class_labels("a").tolist() == [1] and data.class_labels("b").tolist() == [0, 1]
    assert len(list(cache.glob("folder_labels_*.json"))) == 2


# ----------------------------------------------------------------------------- images

@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_pillow(tmp_path, orientation):
    """Upright as ImageOps.exif_transpose shows it; the header-only size agrees without decoding."""
    pixels = np.random.default_rng(orientation).integers(0, 255, (12, 20, 3), dtype=np.uint8)
    path = tmp_path / "a.jpg"
    exif_jpeg(path, pixels, orientation)
    with Image.open(path) as image:
        expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    image = read_image(path)
    assert image.shape == expected.shape == ((12, 20, 3) if orientation < 5 else (20, 12, 3))
    assert np.array_equal(image, expected)
    assert image_size(path) == image.shape[:2]


def test_rgba_grayscale_palette_to_rgb_and_exif_in_the_data_set(tmp_path):
    root = make_folder(tmp_path / "f", {"a": "cat", "b": "", "c": "dog;cat", "d": "dog"})
    exif_jpeg(root / "images" / "a.jpg", np.zeros((24, 32, 3), np.uint8), 6)     # rotate 90° clockwise
    (root / "images" / "a.png").unlink()
    rgba = np.zeros((24, 32, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (10, 20, 30), 0                                  # transparent: colour kept
    Image.fromarray(rgba, mode="RGBA").save(root / "images" / "b.png")
    Image.fromarray(np.full((24, 32), 50, np.uint8), mode="L").save(root / "images" / "c.png")
    palette = Image.fromarray(np.full((24, 32), 2, np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 0, 0, 0, 200, 100, 50] + [0] * 759)
    palette.save(root / "images" / "d.png")
    data = FolderDataset(root)
    assert data.load_image("a").shape == (32, 24, 3)       # EXIF applied
    assert data.load_image("b")[0, 0].tolist() == [10, 20, 30]
    assert data.load_image("c")[0, 0].tolist() == [50, 50, 50]
    assert data.load_image("d")[0, 0].tolist() == [200, 100, 50]
    assert data.class_labels("b").tolist() == [] and data.class_labels("c").tolist() == [0, 1]
    assert data.ids("all") == ["a", "b", "c", "d"] and not data.has_masks("all")
    # a mask is drawn on the picture as it is shown: the upright size passes, the stored one not
    (root / "masks").mkdir()
    Image.fromarray(np.zeros((32, 24), np.uint8)).save(root / "masks" / "a.png")
    FolderDataset(root).validate("all", ())
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(root / "masks" / "a.png")
    with pytest.raises(PipelineError, match="masks/a.png is 32x24, its image .*a.jpg is 24x32"):
        FolderDataset(root).validate("all", ())


def test_process_pool_stages_read_images_as_the_data_set(tmp_path):
    """The CRF workers (cam_to_ir_label, crf) get the data set's reader: an EXIF-rotated photo
    meets its upright CAMs and logits, not the stored pixels."""
    from stages import cam_to_ir_label, crf

    root = make_folder(tmp_path / "f", {"a": "cat"})
    exif_jpeg(root / "images" / "a.jpg", np.full((24, 32, 3), 120, np.uint8), 8)
    (root / "images" / "a.png").unlink()
    data = FolderDataset(root)
    path = str(data.image_path("a"))
    crf_params = {"n_iters": 1}
    write_cam(tmp_path / "a.npz", np.array([0]), np.ones((1, 8, 6)), np.ones((1, 32, 24)))
    cam_to_ir_label._one_image(data.read_image, path, str(tmp_path / "a.npz"), str(tmp_path / "ir.png"),
                               0.3, 0.05, {"gt_prob": 0.7, **crf_params})
    assert artifacts.load_label_png(tmp_path / "ir.png").shape == (32, 24)
    write_logits(tmp_path / "l.npz", np.zeros((3, 4, 3), np.float32), (32, 24))
    crf._one_image(data.read_image, path, str(tmp_path / "l.npz"), str(tmp_path / "crf.png"), crf_params)
    assert artifacts.load_label_png(tmp_path / "crf.png").shape == (32, 24)
    with pytest.raises(PipelineError, match="made for a"):        # the stored pixels would not fit
        crf._one_image(artifacts.load_rgb, path, str(tmp_path / "l.npz"), str(tmp_path / "crf.png"), crf_params)


# ----------------------------------------------------------------------------- bad input, from the CLI

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
    ("missing_image", ["labels.csv, line 4", "image 'ghost' has no file"]),
    ("image_without_row", ["extra.png", "has no row in", "labels.csv"]),
    ("duplicate_id", ["labels.csv, line 4", "already has a row (line 2)"]),
    ("duplicate_file_id", ["images/a.png and", "images/a.jpg", "share the image id 'a'"]),
    ("duplicate_in_split", ["splits/all.txt, line 3", "'a' is listed twice (line 1)"]),
    ("split_names_unknown_id", ["splits/all.txt, line 2", "'zed' has no row in"]),
    ("duplicate_class", ["classes.txt, line 3", "'cat' is listed twice"]),
    ("mask_wrong_size", ["masks/a.png", "10x8"]),
    ("mask_id_above_c", ["masks/a.png", "label 7", "0..2"]),
    ("mask_without_image", ["masks/z.png", "has no image"]),
    ("unreadable_image", ["images/b.png", "corrupt or unreadable image"]),
    ("image_16_bit", ["images/b.png", "16-bit"]),
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
    if case == "mask_without_image":
        masks = {"z": _mask()}
    root = make_folder(tmp_path / "f", rows, classes, masks)
    labels = root / "labels.csv"
    if case == "missing_image":
        labels.write_text(labels.read_text() + "ghost,cat\n")
    if case == "image_without_row":
        shutil.copy(root / "images" / "a.png", root / "images" / "extra.png")
    if case == "duplicate_id":
        labels.write_text(labels.read_text() + "a,dog\n")
    if case == "duplicate_file_id":
        shutil.copy(root / "images" / "a.png", root / "images" / "a.jpg")
    if case in ("duplicate_in_split", "split_names_unknown_id"):
        (root / "splits").mkdir()
        (root / "splits" / "all.txt").write_text("a\nb\na\n" if case == "duplicate_in_split" else "a\nzed\n")
    if case == "unreadable_image":
        (root / "images" / "b.png").write_bytes(b"not an image at all")
    if case == "image_16_bit":
        Image.fromarray(np.full((24, 32), 40000, np.uint16)).save(root / "images" / "b.png")
    if case == "mask_16_bit":
        (root / "masks").mkdir()
        Image.fromarray(_mask(1).astype(np.uint16) * 300).save(root / "masks" / "a.png")
    # every check runs in the preflight, before the first stage: even a training stage hears of a bad mask
    one_error_line(_run_only(tmp_path, root, "train_cam"), *needles)


def test_eval_stage_asked_for_without_masks_is_refused(tmp_path):
    root = make_folder(tmp_path / "f", {"a": "cat", "b": "dog"})
    proc = _run_only(tmp_path, root, "eval_cam")
    one_error_line(proc, "eval_cam", "nothing to score", "no ground-truth masks")


# ----------------------------------------------------------------------------- runs

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


EVAL_STAGES = ("eval_cam", "eval_sem_seg")


def _metrics(work: Path, run: str) -> dict:
    return {s: json.loads((work / "result" / run / "metrics" / f"{s}.json").read_text()) for s in EVAL_STAGES}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny data set in the VOC layout and as a folder, each run to eval_sem_seg with the same seed."""
    base = tmp_path_factory.mktemp("folder_runs")
    voc, folder = base / "voc", base / "folder"
    generate_demo_data(voc, n_train=12, n_val=4, seed=4)
    voc_to_folder(voc, folder)
    out = {"base": base}
    for layout, root in (("voc12", voc), ("folder", folder)):
        cfg = tiny(root, base / layout, layout)
        cfg["data"]["dataset"] = layout
        config = base / f"{layout}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        proc = cli("run", "--config", config, "--to", "eval_sem_seg")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[layout] = {"root": root, "config": config, "work": base / layout,
                       "metrics": _metrics(base / layout, layout)}
    return out


def test_folder_run_equals_the_voc_run(runs):
    voc, folder = runs["voc12"]["metrics"], runs["folder"]["metrics"]
    for stage in EVAL_STAGES:
        assert folder[stage]["n_images"] == voc[stage]["n_images"] == 12
        assert folder[stage]["miou"] == voc[stage]["miou"]
        assert folder[stage]["per_class_iou"] == voc[stage]["per_class_iou"]
    assert voc["eval_cam"]["per_class_iou"].keys() - {"background"}        # not a background-only comparison


def test_export_writes_palette_pngs_and_classes_json(runs):
    folder = runs["folder"]
    dest = runs["base"] / "export"
    proc = cli("export", "--config", folder["config"], "--dest", dest, "--copy")
    assert proc.returncode == 0, proc.stderr[-3000:]
    classes = json.loads((dest / "classes.json").read_text())
    assert classes == json.loads(json.dumps(class_table(FolderDataset(folder["root"]).class_names)))
    palette = artifacts.voc_palette()
    assert classes["0"] == {"name": "background", "colour": [0, 0, 0]}
    assert classes["15"] == {"name": "person", "colour": palette[15].tolist()}
    assert classes["255"] == {"name": "ignore", "colour": [224, 224, 192]} and len(classes) == 22
    pairs = [line.split() for line in (dest / "pseudo_seg_labels.txt").read_text().splitlines()]
    assert len(pairs) == 12
    for image, label in pairs:
        with Image.open(dest / label) as png, Image.open(dest / image) as picture:
            assert png.mode == "P" and png.size == picture.size
            assert np.array_equal(np.asarray(png.getpalette()[:768]).reshape(-1, 3), palette)
            assert set(np.unique(np.asarray(png))) <= set(range(21)) | {255}
    # the VOC layout gets the same table (and keeps its symlinks)
    voc_dest = runs["base"] / "export_voc"
    proc = cli("export", "--config", runs["voc12"]["config"], "--dest", voc_dest)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((voc_dest / "classes.json").read_text()) == classes
    assert all(p.is_symlink() for p in (voc_dest / "pseudo_seg_labels").iterdir())


def test_eval_on_the_masked_images_then_none(runs):
    """Masks for some images: the eval stages re-run and score exactly those, as the VOC layout
    scores a split that lists exactly those. No mask at all: they are left out with one line
    each, and the run succeeds."""
    folder, voc = runs["folder"], runs["voc12"]
    ids = FolderDataset(folder["root"]).eval_ids("train")
    kept = ids[::3]
    for image_id in ids:
        if image_id not in kept:
            (folder["root"] / "masks" / f"{image_id}.png").unlink()
    (voc["root"] / "ImageSets" / "Segmentation" / "kept.txt").write_text("\n".join(kept) + "\n")
    proc = cli("run", "--config", folder["config"], "--to", "eval_sem_seg")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli("run", "--config", voc["config"], "--to", "eval_sem_seg", "--set", "data.eval_split=kept")
    assert proc.returncode == 0, proc.stderr[-3000:]
    subset, reference = _metrics(folder["work"], "folder"), _metrics(voc["work"], "voc12")
    for stage in EVAL_STAGES:
        assert subset[stage]["n_images"] == reference[stage]["n_images"] == len(kept) == 4
        assert subset[stage]["miou"] == reference[stage]["miou"]
        assert subset[stage]["per_class_iou"] == reference[stage]["per_class_iou"]

    shutil.rmtree(folder["root"] / "masks")
    proc = cli("run", "--config", folder["config"], "--to", "eval_sem_seg")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    for stage in EVAL_STAGES:
        lines = [line for line in log.splitlines() if f"{stage} left out" in line]
        assert len(lines) == 1 and "split 'train' has no ground-truth masks" in lines[0], log[-3000:]
