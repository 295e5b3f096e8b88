"""Synthetic demo data written in the real VOC 2012 or COCO 2014 (VOC-style) layout; the
pictures come from dataset/demo_paint.py. Same seed, byte-identical files."""
from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image

from dataset.classes import COCO_CLASSES, IGNORE_LABEL, VOC_CLASSES
from dataset.demo_paint import CLASS_NAMES, IMAGE_SIDE_RANGE, KINDS, SPLIT_CODES, Sample, make_sample, outline
from pipeline.artifacts import atomic_path, save_label_png
from pipeline.errors import PipelineError

LAYOUTS = ("voc", "coco", "folder")
JPEG_QUALITY = 95
FOLDER_CLASSES = ("background", "aeroplane", "bird", "car", "cat", "person")   # the demo's five classes
_LABEL_SPACES = {"voc": VOC_CLASSES, "coco": COCO_CLASSES, "folder": FOLDER_CLASSES}
FOLDER_MASK_EVERY = 4     # the folder demo has masks for every val image and one train image in 4
MARKER_NAME = "demo_data.json"  # written last; marks the folder as ours to overwrite
# The demos' data set. 160 val images, not 32: on 32 the val figures were mostly chance (one DeepLab
# scored person 15.6 on the first 32 val images and 26.8 on all 160; the mIoU of its runs swung by 2).
DEMO_TRAIN, DEMO_VAL = 160, 160


# --------------------------------------------------------------------------- writing

def _voc_xml(image_id: str, sample: Sample, class_names: dict[str, str]) -> bytes:
    height, width = sample.instances.shape
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "WSSS synthetic demo"
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(width)
    ET.SubElement(size, "height").text = str(height)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "1"
    for index, kind in enumerate(sample.kinds, start=1):
        ys, xs = np.nonzero(sample.instances == index)
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = class_names[kind]
        ET.SubElement(obj, "pose").text = "Unspecified"
        truncated = xs.min() == 0 or ys.min() == 0 or xs.max() == width - 1 or ys.max() == height - 1
        ET.SubElement(obj, "truncated").text = str(int(truncated))
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        # VOC boxes are 1-based and inclusive
        for tag, value in (("xmin", xs.min()), ("ymin", ys.min()), ("xmax", xs.max()), ("ymax", ys.max())):
            ET.SubElement(box, tag).text = str(int(value) + 1)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="utf-8") + b"\n"


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        # 4:4:4 chroma keeps colour edges as sharp as the luminance ones
        Image.fromarray(image, mode="RGB").save(tmp, format="JPEG", quality=JPEG_QUALITY, subsampling=0)


def _prepare_output(out: Path) -> None:
    """Refuse to write into a folder that holds anything but an earlier demo; clear an earlier demo."""
    if not out.exists():
        return
    if not out.is_dir():
        raise PipelineError(f"demo data output {out} exists and is not a folder")
    if (out / MARKER_NAME).exists():
        (out / MARKER_NAME).unlink()
        for sub in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationClassAug",
                    "SegmentationObject", "ImageSets", "images", "masks", "splits"):
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
    elif any(out.iterdir()):
        raise PipelineError(f"demo data output {out} is not empty and holds no earlier demo ({MARKER_NAME}); "
                            "choose an empty or new folder")


def _marker(layout: str, seed: int, n_train: int, n_val: int) -> dict:
    """What the marker file of a demo data set records (every argument that changes its bytes)."""
    class_names = CLASS_NAMES["voc" if layout == "folder" else layout]
    label_space = _LABEL_SPACES[layout]
    return {"layout": layout, "seed": int(seed), "n_train": int(n_train), "n_val": int(n_val),
            "classes": [class_names[k] for k in KINDS],
            "class_ids": [label_space.index(class_names[k]) for k in KINDS],
            "image_side_range": list(IMAGE_SIDE_RANGE)}


def demo_data_mismatch(out, n_train: int = DEMO_TRAIN, n_val: int = DEMO_VAL, seed: int = 0,
                       layout: str = "voc") -> str:
    """How the demo data set in `out` differs from what `generate_demo_data` with these arguments
    writes ("" when it matches, or when `out` holds no demo marker: not ours to judge)."""
    path = Path(out) / MARKER_NAME
    if not path.is_file():
        return ""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"its {MARKER_NAME} is unreadable ({e})"
    expected = _marker(layout, seed, n_train, n_val)
    if not isinstance(found, dict):
        return f"its {MARKER_NAME} is not a JSON object"
    changed = [f"{key} {found.get(key)!r} (now {value!r})" for key, value in expected.items() if found.get(key) != value]
    return ", ".join(changed)


def generate_demo_data(out, n_train: int = DEMO_TRAIN, n_val: int = DEMO_VAL, seed: int = 0,
                       layout: str = "voc") -> dict:
    """Write a synthetic data set in the VOC 2012 (`out` is the VOC2012 folder)
    or the VOC-style COCO 2014 layout, and return a summary of it.

    The same arguments give byte-identical files. An earlier demo in `out` is
    replaced; a non-empty folder that is not a demo is refused.
    """
    if layout not in LAYOUTS:
        raise PipelineError(f"unknown demo data layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    for name, value in (("n_train", n_train), ("n_val", n_val)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise PipelineError(f"demo data {name} must be an integer >= 1, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PipelineError(f"demo data seed must be an integer >= 0, got {seed!r}")
    out = Path(out)
    _prepare_output(out)
    class_names = CLASS_NAMES["voc" if layout == "folder" else layout]
    label_space = _LABEL_SPACES[layout]
    marker = _marker(layout, seed, n_train, n_val)
    class_ids = dict(zip(KINDS, marker["class_ids"]))
    lookup = np.zeros(256, np.uint8)  # instance index -> class id, filled per image

    split_ids: dict[str, list[str]] = {}
    label_rows = ["image,labels"]
    for split, count in (("train", int(n_train)), ("val", int(n_val))):
        split_rng = np.random.default_rng([seed, SPLIT_CODES[split]])
        # the first object's class cycles through a reshuffled class list, so classes stay balanced
        primaries = [KINDS[i] for _ in range(count // len(KINDS) + 1) for i in split_rng.permutation(len(KINDS))]
        ids = []
        for index in range(count):
            sample = make_sample(np.random.default_rng([seed, SPLIT_CODES[split], index]), primaries[index])
            edges = outline(sample.instances)
            lookup[:] = 0
            for k, kind in enumerate(sample.kinds, start=1):
                lookup[k] = class_ids[kind]
            semantic = lookup[sample.instances]
            semantic[edges] = IGNORE_LABEL
            if layout == "voc":
                # one running number across splits, as VOC ids are unique over train and val
                image_id = f"2007_{index + 1 + (0 if split == 'train' else int(n_train)):06d}"
                _write_jpeg(out / "JPEGImages" / f"{image_id}.jpg", sample.image)
                _write_bytes(out / "Annotations" / f"{image_id}.xml", _voc_xml(image_id, sample, class_names))
                save_label_png(out / "SegmentationClass" / f"{image_id}.png", semantic)
                save_label_png(out / "SegmentationClassAug" / f"{image_id}.png", semantic)
                objects = sample.instances.copy()
                objects[edges] = IGNORE_LABEL
                save_label_png(out / "SegmentationObject" / f"{image_id}.png", objects)
            elif layout == "folder":
                image_id = f"{split}_{index + 1:04d}"
                _write_jpeg(out / "images" / f"{image_id}.jpg", sample.image)
                if split == "val" or index % FOLDER_MASK_EVERY == 0:
                    save_label_png(out / "masks" / f"{image_id}.png", semantic)
                names = sorted({class_names[kind] for kind in sample.kinds}, key=label_space.index)
                label_rows.append(f"{image_id},{';'.join(names)}")
            else:
                folder = f"{split}2014"
                image_id = f"COCO_{folder}_{index + 1:012d}"
                _write_jpeg(out / "JPEGImages" / folder / f"{image_id}.jpg", sample.image)
                save_label_png(out / "SegmentationClass" / folder / f"{image_id}.png", semantic)
            ids.append(image_id)
        split_ids[split] = ids

    if layout == "voc":
        lists = out / "ImageSets" / "Segmentation"
        for name, ids in (("train", split_ids["train"]), ("val", split_ids["val"]), ("train_aug", split_ids["train"])):
            _write_bytes(lists / f"{name}.txt", ("\n".join(ids) + "\n").encode())

    if layout == "folder":
        _write_bytes(out / "classes.txt", ("\n".join(FOLDER_CLASSES[1:]) + "\n").encode())
        _write_bytes(out / "labels.csv", ("\n".join(label_rows) + "\n").encode())
        for name, ids in split_ids.items():
            _write_bytes(out / "splits" / f"{name}.txt", ("\n".join(ids) + "\n").encode())

    # the marker leaves out the path, so the folder's bytes do not depend on where it was written
    _write_bytes(out / MARKER_NAME, (json.dumps(marker, indent=2) + "\n").encode())
    return {"out": str(out), **marker}
