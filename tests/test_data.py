"""VOC / COCO data sets on small hand-made folders."""
import json

import numpy as np
import pytest
from PIL import Image

from pipeline import artifacts
from pipeline.config import DataConfig
from dataset.registry import build_dataset
from pipeline.errors import PipelineError


def _xml(names):
    objects = "".join(f"<object><name>{n}</name></object>" for n in names)
    return f"<annotation><filename>x.jpg</filename>{objects}</annotation>"


def make_voc(root, ids=("a", "b", "c", "d"), val=("d",), lists=True):
    for sub in ("JPEGImages", "Annotations", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = {"a": ["cat", "dog", "cat"], "b": ["person"], "c": ["aeroplane"], "d": ["tvmonitor"]}
    for i in ids:
        Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        (root / "Annotations" / f"{i}.xml").write_text(_xml(names[i]))
        artifacts.save_label_png(root / "SegmentationClassAug" / f"{i}.png", np.zeros((8, 10), np.uint8))
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(val) + "\n")
    if lists:
        (root / "ImageSets/Segmentation/train.txt").write_text("a\nb\n")
    return root


def voc(root, cache=None):
    return build_dataset(DataConfig(dataset="voc12", root=str(root)), cache_dir=cache)


def test_labels_from_xml(tmp_path):
    ds = voc(make_voc(tmp_path / "VOC2012"))
    assert ds.num_classes == 20
    assert list(ds.class_labels("a")) == [7, 11]     # cat (8) and dog (12), 0-based, deduplicated
    assert list(ds.class_labels("d")) == [19]
    assert ds.multi_hot("b").sum() == 1 and ds.multi_hot("b")[14] == 1  # person


def test_train_aug_derived_from_aug_minus_val(tmp_path):
    ds = voc(make_voc(tmp_path / "VOC2012"))
    assert ds.ids("train_aug") == ["a", "b", "c"]
    assert ds.ids("train") == ["a", "b"]


def test_label_cache_written_and_invalidated(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    cache = tmp_path / "cache"
    ds = voc(root, cache)
    ds.load_label_cache(["train_aug"])
    files = list(cache.glob("voc12_labels_*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["b"] == [14]
    (root / "Annotations" / "b.xml").write_text(_xml(["person", "horse", "horse"]))  # edit -> new signature
    ds2 = voc(root, cache)
    ds2.load_label_cache(["train_aug"])
    assert list(ds2.class_labels("b")) == [12, 14]
    assert len(list(cache.glob("voc12_labels_*.json"))) == 2


def test_clear_errors(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        voc(tmp_path / "nope")
    root = make_voc(tmp_path / "VOC2012")
    ds = voc(root)
    with pytest.raises(PipelineError, match="not found"):
        ds.ids("trainval")
    (root / "ImageSets/Segmentation/train.txt").write_text("a\nghost\n")
    with pytest.raises(PipelineError, match="ghost"):
        voc(root).check_images("train")
    (root / "Annotations" / "c.xml").write_text("<annotation><object><name>unicorn</name></object></annotation>")
    with pytest.raises(PipelineError, match="unicorn"):
        voc(root).class_labels("c")
    (root / "Annotations" / "c.xml").write_text("<annotation><object>")
    with pytest.raises(PipelineError, match="corrupt"):
        voc(root).class_labels("c")
    (root / "JPEGImages" / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(PipelineError, match="b.jpg"):
        voc(root).load_image("b")
    with pytest.raises(PipelineError, match="mask missing"):
        voc(root).load_mask("zzz")


def test_coco_ids_and_labels_from_masks(tmp_path):
    from dataset.coco import category_id_to_label, label_to_category_id

    assert category_id_to_label(1) == 1 and category_id_to_label(90) == 80 and category_id_to_label(13) == 12
    assert all(category_id_to_label(label_to_category_id(k)) == k for k in range(1, 81))
    with pytest.raises(PipelineError):
        category_id_to_label(12)  # 12 is one of COCO's unused ids
    root = tmp_path / "coco"
    for split in ("train2014", "val2014"):
        (root / "JPEGImages" / split).mkdir(parents=True)
        (root / "SegmentationClass" / split).mkdir(parents=True)
    stem = "COCO_train2014_000000000009"
    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(root / "JPEGImages/train2014" / f"{stem}.jpg")
    mask = np.zeros((6, 7), np.uint8)
    mask[0, 0], mask[1, 1], mask[2, 2] = 80, 1, 255
    artifacts.save_label_png(root / "SegmentationClass/train2014" / f"{stem}.png", mask)
    ds = build_dataset(DataConfig(dataset="coco", root=str(root)))
    assert ds.num_classes == 80 and ds.ids("train2014") == [stem] and ds.ids("train") == [stem]
    assert list(ds.class_labels(stem)) == [0, 79]
    with pytest.raises(PipelineError, match="COCO image folder"):
        (root / "JPEGImages/val2014").rmdir()
        ds.ids("val2014")
