import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts import load_label_png, load_rgb
from dataset.classes import COCO_CLASSES, VOC_CLASSES
import dataset.demo
from dataset.demo import DEMO_TRAIN, DEMO_VAL, demo_data_mismatch, generate_demo_data
from pipeline.errors import PipelineError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _image_files(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in _files(root).items() if k.endswith((".jpg", ".png"))}


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "VOC2012"
    summary = generate_demo_data(out, n_train=12, n_val=5, seed=0, layout="voc")
    return out, summary


def test_same_seed_gives_identical_bytes(voc, tmp_path):
    out, _ = voc
    again = tmp_path / "again"
    generate_demo_data(again, n_train=12, n_val=5, seed=0, layout="voc")
    assert _files(again) == _files(out)


def test_different_seed_gives_different_images(voc, tmp_path):
    out, _ = voc
    other = tmp_path / "other"
    generate_demo_data(other, n_train=12, n_val=5, seed=1, layout="voc")
    first, second = _image_files(out), _image_files(other)
    jpgs = [k for k in first if k.endswith(".jpg") and k in second]
    assert jpgs and all(first[k] != second[k] for k in jpgs)


def test_voc_layout(voc):
    out, summary = voc
    sets = out / "ImageSets" / "Segmentation"
    train = (sets / "train.txt").read_text().split()
    val = (sets / "val.txt").read_text().split()
    assert (sets / "train_aug.txt").read_text().split() == train
    assert len(train) == 12 and len(val) == 5 and not set(train) & set(val)
    assert summary["n_train"] == 12 and summary["n_val"] == 5 and summary["layout"] == "voc"
    used_ids = set(summary["class_ids"])
    assert [VOC_CLASSES[i] for i in summary["class_ids"]] == summary["classes"]
    for image_id in train + val:
        image = load_rgb(out / "JPEGImages" / f"{image_id}.jpg")
        height, width = image.shape[:2]
        assert 112 <= height <= 176 and 112 <= width <= 176
        semantic = load_label_png(out / "SegmentationClass" / f"{image_id}.png")
        aug = load_label_png(out / "SegmentationClassAug" / f"{image_id}.png")
        objects = load_label_png(out / "SegmentationObject" / f"{image_id}.png")
        assert semantic.shape == aug.shape == objects.shape == (height, width)
        assert np.array_equal(semantic, aug)
        assert set(np.unique(semantic)) <= {0, 255} | used_ids
        assert np.array_equal(semantic == 255, objects == 255)  # the same ignore outline

        root = ET.parse(out / "Annotations" / f"{image_id}.xml").getroot()
        assert root.findtext("folder") == "VOC2012" and root.findtext("filename") == f"{image_id}.jpg"
        assert (int(root.findtext("size/width")), int(root.findtext("size/height"))) == (width, height)
        names = [o.findtext("name") for o in root.iter("object")]
        assert 1 <= len(names) <= 3
        present = {VOC_CLASSES[c] for c in np.unique(semantic) if c not in (0, 255)}
        assert set(names) == present
        instances = set(np.unique(objects)) - {0, 255}
        assert instances == set(range(1, len(names) + 1))
        for index, obj in enumerate(root.iter("object"), start=1):
            # instance k carries the class of the k-th XML object, inside its 1-based box
            assert set(np.unique(semantic[objects == index])) == {VOC_CLASSES.index(obj.findtext("name"))}
            box = [int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
            ys, xs = np.nonzero(objects == index)
            assert 1 <= box[0] <= xs.min() + 1 and xs.max() + 1 <= box[2] <= width
            assert 1 <= box[1] <= ys.min() + 1 and ys.max() + 1 <= box[3] <= height


def test_voc_outline_is_thin_and_objects_are_textured(voc):
    import cv2

    out, _ = voc
    for image_id in (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:4]:
        semantic = load_label_png(out / "SegmentationClass" / f"{image_id}.png")
        image = load_rgb(out / "JPEGImages" / f"{image_id}.jpg").astype(np.float32)
        outline = (semantic == 255).astype(np.uint8)
        foreground = (semantic > 0) & (semantic < 255)
        assert outline.any() and foreground.sum() > outline.sum()
        # a 1-2 px band: almost no outline pixel has only outline around it
        inner = cv2.erode(outline, np.ones((3, 3), np.uint8), borderValue=0)
        assert inner.sum() < 0.05 * outline.sum()
        assert image[foreground].std(axis=0).mean() > 8.0  # not a flat colour


def test_coco_layout(tmp_path):
    summary = generate_demo_data(tmp_path, n_train=6, n_val=3, seed=2, layout="coco")
    assert summary["layout"] == "coco"
    assert [COCO_CLASSES[i] for i in summary["class_ids"]] == summary["classes"]
    assert not (tmp_path / "Annotations").exists()
    for split, count in (("train2014", 6), ("val2014", 3)):
        images = sorted((tmp_path / "JPEGImages" / split).glob("*.jpg"))
        assert len(images) == count
        for path in images:
            assert path.stem.startswith(f"COCO_{split}_") and len(path.stem.rsplit("_", 1)[1]) == 12
            label = load_label_png(tmp_path / "SegmentationClass" / split / f"{path.stem}.png")
            assert label.shape == load_rgb(path).shape[:2]
            values = set(np.unique(label)) - {0, 255}
            assert values and values <= set(summary["class_ids"])
            assert all(1 <= v <= 80 for v in values)


def test_regenerating_replaces_an_earlier_demo(tmp_path):
    generate_demo_data(tmp_path, n_train=4, n_val=2, seed=0)
    generate_demo_data(tmp_path, n_train=2, n_val=1, seed=0)
    assert len(list((tmp_path / "JPEGImages").glob("*.jpg"))) == 3
    assert len(list((tmp_path / "SegmentationClassAug").glob("*.png"))) == 3


@pytest.mark.parametrize("kwargs", [
    {"n_train": 0}, {"n_val": 0}, {"n_train": -3}, {"n_train": 2.5}, {"layout": "cityscapes"}, {"seed": -1},
])
def test_bad_arguments_raise(tmp_path, kwargs):
    with pytest.raises(PipelineError):
        generate_demo_data(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "notes.txt").write_text("real data lives here")
    with pytest.raises(PipelineError, match="not empty"):
        generate_demo_data(tmp_path, n_train=1, n_val=1)


def test_mismatch_names_what_differs_and_ignores_folders_that_are_not_demos(tmp_path):
    generate_demo_data(tmp_path / "d", n_train=3, n_val=2, seed=1, layout="coco")
    assert demo_data_mismatch(tmp_path / "d", n_train=3, n_val=2, seed=1, layout="coco") == ""
    assert demo_data_mismatch(tmp_path / "d", n_train=3, n_val=5, seed=1, layout="coco") == "n_val 2 (now 5)"
    both = demo_data_mismatch(tmp_path / "d", n_train=3, n_val=2, seed=0, layout="voc")
    assert "layout 'coco' (now 'voc')" in both and "seed 1 (now 0)" in both
    (tmp_path / "mine").mkdir()
    assert demo_data_mismatch(tmp_path / "mine") == ""          # no marker: the user's own data
    (tmp_path / "d" / "demo_data.json").write_text("{not json")
    assert "unreadable" in demo_data_mismatch(tmp_path / "d", n_train=3, n_val=2, seed=1, layout="coco")


def test_demo_command_regenerates_data_of_other_sizes_and_keeps_matching_data(tmp_path, monkeypatch):
    """`demo` replaces demo data written with other sizes (an older release's 32 val images) and
    leaves matching data alone; the pipeline run itself is stubbed out."""
    import run_pipeline
    from typer.testing import CliRunner

    monkeypatch.setattr(run_pipeline, "_run", lambda config, sets: None)
    root = tmp_path / "VOC2012"
    generate_demo_data(root, n_train=2, n_val=1, seed=0)
    calls = []

    def spy(out, **kwargs):
        calls.append(kwargs)
        (Path(out) / "demo_data.json").write_text(json.dumps(dataset.demo._marker(kwargs["layout"], kwargs["seed"],
                                                                                  DEMO_TRAIN, DEMO_VAL)))
    monkeypatch.setattr(dataset.demo, "generate_demo_data", spy)
    args = ["demo", "--set", f"data.root={root}"]
    result = CliRunner().invoke(run_pipeline.app, args)
    assert result.exit_code == 0, result.output
    assert "n_train 2 (now 160), n_val 1 (now 160)" in result.output and calls == [{"seed": 0, "layout": "voc"}]
    result = CliRunner().invoke(run_pipeline.app, args)          # now current: not generated again
    assert result.exit_code == 0 and len(calls) == 1 and "regenerating" not in result.output
