"""make_ins_seg / eval_ins_seg: AP against hand-worked cases, matching, the artifact format,
the detection core on a synthetic displacement field, and both stages on a tiny VOC folder."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import artifacts
from pipeline.catalogue import read_instances, write_cam
from pipeline.catalogue import write_instances as save_instances
from pipeline.config import DataConfig, EvalInsSegConfig, MakeInsSegConfig, RandomWalkParams
from pipeline.errors import PipelineError
from pipeline.metrics import APAccumulator, average_precision, ground_truth_instances, mask_iou, match_image
from pipeline.stage import StageContext
from stages import eval_ins_seg, make_ins_seg
from stages.make_ins_seg import instance_detections

# ----------------------------------------------------------------------------- AP


def test_average_precision_hand_case():
    # ranked: TP, FP, TP with 2 ground truths -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    scores, tp = np.array([0.7, 0.9, 0.8]), np.array([True, True, False])
    # all points: monotone precision 1 on recall (0, 1/2], 2/3 on (1/2, 1] -> 1/2 + 1/3
    assert average_precision(scores, tp, 2) == pytest.approx(5 / 6)
    # 11 points: t = 0 .. 0.5 -> 1 (6 points), t = 0.6 .. 1 -> 2/3 (5 points)
    assert average_precision(scores, tp, 2, use_07_metric=True) == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_average_precision_edge_cases():
    assert np.isnan(average_precision(np.array([0.5]), np.array([False]), 0))      # no ground truth
    assert average_precision(np.zeros(0), np.zeros(0, bool), 3) == 0.0            # nothing detected
    assert average_precision(np.array([0.9, 0.1]), np.array([True, True]), 4) == pytest.approx(0.5)
    # a false positive ranked above the only hit halves the precision
    assert average_precision(np.array([0.9, 0.1]), np.array([False, True]), 1) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- matching

def box(shape, y0, y1, x0, x1):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_ground_truth_instances_take_the_majority_class_and_void():
    objects = np.zeros((4, 6), np.uint8)
    objects[0:2, 0:2] = 1
    objects[2:4, 3:6] = 2
    objects[0, 5] = 255
    semantic = np.where(objects == 1, 15, np.where(objects == 2, 3, 0)).astype(np.uint8)
    semantic[0, 0] = 255          # a void pixel inside an instance does not decide its class
    semantic[0, 5] = 255
    gt = ground_truth_instances(objects, semantic)
    assert gt["class"].tolist() == [14, 2]
    assert gt["mask"].shape == (2, 4, 6) and gt["mask"][0].sum() == 4 and gt["mask"][1].sum() == 6
    assert gt["void"].sum() == 1
    with pytest.raises(ValueError, match="no class"):
        ground_truth_instances(objects, np.zeros_like(semantic))


def test_mask_iou_with_and_without_void():
    gt = box((4, 4), 0, 2, 0, 2)[None]
    pred = box((4, 4), 0, 2, 0, 4)[None]       # the object plus 4 void pixels
    void = box((4, 4), 0, 2, 2, 4)
    assert mask_iou(pred, gt)[0, 0] == pytest.approx(0.5)
    assert mask_iou(pred, gt, void)[0, 0] == pytest.approx(1.0)
    assert mask_iou(pred[:0], gt).shape == (0, 1)


def test_each_ground_truth_is_matched_once():
    shape = (10, 10)
    gt = {"mask": np.stack([box(shape, 0, 5, 0, 5), box(shape, 5, 10, 5, 10)]), "class": np.array([3, 3]),
          "void": np.zeros(shape, bool)}
    pred = {
        "mask": np.stack([box(shape, 0, 5, 0, 5),      # exact hit on instance 0
                          box(shape, 0, 5, 0, 4),      # duplicate of instance 0 (IoU 0.8): false positive
                          box(shape, 5, 10, 5, 7),     # instance 1 at IoU 0.4: false positive
                          box(shape, 0, 5, 0, 5)]),    # right mask, wrong class: false positive of class 7
        "score": np.array([0.6, 0.9, 0.5, 0.8], np.float32),
        "class": np.array([3, 3, 3, 7]),
    }
    matched = match_image(pred, gt, iou_threshold=0.5)
    scores, tp, n_gt = matched[3]
    # ranked by score: the duplicate (0.9) comes first and takes instance 0, the exact one (0.6) is then a duplicate
    assert scores.tolist() == pytest.approx([0.9, 0.6, 0.5]) and tp.tolist() == [True, False, False] and n_gt == 2
    assert matched[7][1].tolist() == [False] and matched[7][2] == 0
    accumulator = APAccumulator(num_classes=10)
    accumulator.add(pred, gt)
    ap = accumulator.per_class_ap()
    assert ap[3] == pytest.approx(0.5) and np.isnan(ap[7]) and np.isnan(ap[0])


def test_void_pixels_count_unless_excluded():
    shape = (4, 4)
    gt = {"mask": box(shape, 0, 2, 0, 2)[None], "class": np.array([0]), "void": box(shape, 0, 2, 2, 4)}
    pred = {"mask": box(shape, 0, 2, 0, 4)[None], "score": np.array([1.0], np.float32), "class": np.array([0])}
    assert match_image(pred, gt, 0.6)[0][1].tolist() == [False]                   # IoU 0.5 (reference)
    assert match_image(pred, gt, 0.6, exclude_void=True)[0][1].tolist() == [True]  # IoU 1


# ----------------------------------------------------------------------------- artifact

@pytest.mark.parametrize("n", [0, 3])
def test_instance_file_round_trip(tmp_path, n):
    rng = np.random.default_rng(n)
    detected = {"score": rng.random(n).astype(np.float32), "class": np.arange(n) + 4,
                "mask": rng.random((n, 5, 7)) > 0.5}              # 35 pixels: not a multiple of 8
    save_instances(tmp_path / "x.npz", detected)
    with np.load(tmp_path / "x.npz", allow_pickle=False) as raw:
        assert {k: raw[k].dtype for k in raw.files} == {"score": np.float32, "class": np.int16, "mask": np.uint8,
                                                         "size": np.int32}
        assert raw["mask"].shape == (n, 5) and raw["size"].tolist() == [5, 7]
    back = read_instances(tmp_path / "x.npz")
    np.testing.assert_array_equal(back["mask"], detected["mask"])
    np.testing.assert_array_equal(back["class"], detected["class"])
    np.testing.assert_array_equal(back["score"], detected["score"])
    artifacts.save_npz(tmp_path / "bad.npz", {"score": np.zeros(1)})
    with pytest.raises(PipelineError, match="lacks"):
        read_instances(tmp_path / "bad.npz")


# ----------------------------------------------------------------------------- detection core

CENTRES = [(9.0, 7.0), (10.0, 22.0)]


def two_discs(h=20, w=30):
    """Stride-4 displacement to the centres of two discs, a boundary ring around each, one class CAM on both."""
    ys, xs = np.mgrid[:h, :w].astype(float)
    displacement, boundary, cam = np.zeros((2, h, w)), np.zeros((h, w)), np.zeros((1, h, w))
    for cy, cx in CENTRES:
        distance = np.hypot(ys - cy, xs - cx)
        inside = distance < 6
        displacement[0][inside] = (cy - ys)[inside]
        displacement[1][inside] = (cx - xs)[inside]
        boundary[(distance >= 5) & (distance < 7)] = 1.0
        cam[0][distance < 5] = 1.0
    return displacement.astype(np.float32), boundary.astype(np.float32), cam.astype(np.float32)


def disc_masks(shape):
    """Full-resolution discs (radius 20 px) at the stride-4 centres, as the stride-4 grid upsampled ×4 sees them."""
    ys, xs = np.mgrid[:shape[0], :shape[1]].astype(float)
    return [np.hypot(ys - (4 * cy + 1.5), xs - (4 * cx + 1.5)) < 20 for cy, cx in CENTRES]


def test_two_centroids_give_two_instances():
    displacement, boundary, cam = two_discs()
    detected = instance_detections(cam, np.array([4]), boundary, displacement, (78, 118), exp_times=4)
    assert detected["mask"].shape == (2, 78, 118)
    assert detected["class"].tolist() == [4, 4]
    assert np.all(detected["score"] > 0.5)
    assert not np.any(detected["mask"][0] & detected["mask"][1])
    iou = mask_iou(detected["mask"], np.stack(disc_masks((78, 118))))
    assert iou[0, 0] > 0.8 and iou[1, 1] > 0.8
    none = instance_detections(cam[:0], np.zeros(0, int), boundary, displacement, (78, 118))
    assert none["mask"].shape == (0, 78, 118) and none["score"].shape == (0,)


def test_small_fragments_score_zero():
    displacement, boundary, cam = two_discs()
    detected = instance_detections(cam, np.array([4]), boundary, displacement, (78, 118), exp_times=4,
                                   min_fragment_fraction=0.5)
    assert len(detected["score"]) == 2 and np.all(detected["score"] == 0)


# ----------------------------------------------------------------------------- both stages on a tiny VOC folder

IMAGE_HW = (80, 120)
IDS = ["2007_000001", "2007_000002"]


class FakeIRN:
    """Stands in for the trained IRN: the two-disc boundary and displacement for the image,
    NaN displacement for the mirror image (the reference ignores it; NaN would break the centroids)."""

    def __call__(self, batch, centre=True):
        assert batch.shape == (2, 3, *IMAGE_HW)
        displacement, boundary, _ = two_discs()
        logit = torch.from_numpy(np.where(boundary > 0, 20.0, -20.0)).float()[None, None]
        mirrored = torch.full((1, 2, 20, 30), float("nan"))
        return torch.cat([logit, logit.flip(-1)]), torch.cat([torch.from_numpy(displacement)[None], mirrored])


@pytest.fixture
def tiny_voc(tmp_path):
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(IDS) + "\n")
    objects = np.zeros(IMAGE_HW, np.uint8)
    for index, disc in enumerate(disc_masks(IMAGE_HW), start=1):
        objects[disc] = index
    for image_id in IDS:
        Image.fromarray(np.full((*IMAGE_HW, 3), 128, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        artifacts.save_label_png(root / "SegmentationObject" / f"{image_id}.png", objects)
        artifacts.save_label_png(root / "SegmentationClass" / f"{image_id}.png", np.where(objects > 0, 5, 0))
    runtime = SimpleNamespace(shard=lambda ids: list(ids), is_main=True, device=torch.device("cpu"))
    data = DataConfig(root=str(root), infer_split="train", eval_split="train")

    def context(name, section):
        return StageContext(name=name, section=section, data=data, seed=0, result_dir=tmp_path / "result",
                            sess_dir=tmp_path / "sess", runtime=runtime, fingerprint="x", work_dir=tmp_path)

    return root, context


def test_stages_on_a_tiny_voc_folder(tiny_voc, monkeypatch):
    root, context = tiny_voc
    _, _, cam = two_discs()
    make = context("make_ins_seg", MakeInsSegConfig(enabled=True, walk=RandomWalkParams(exp_times=4), irn_pad_to=0))
    for image_id in IDS:
        write_cam(make.artifacts.cam.path(image_id), np.array([4]), torch.from_numpy(cam), torch.zeros(1, *IMAGE_HW))
    monkeypatch.setattr(make_ins_seg, "load_model", lambda path, device, expect: FakeIRN())
    summary = make_ins_seg.run(make)
    assert summary["outputs"]["detections_on_rank0"] == 4
    assert all(p.exists() for p in make_ins_seg.expected_outputs(make))
    assert make.artifacts.ins_seg.read(IDS[0])["class"].tolist() == [4, 4]

    evaluate = context("eval_ins_seg", EvalInsSegConfig(enabled=True))
    assert eval_ins_seg.run(evaluate) == {"metrics": {"map": 100.0}}
    record = evaluate.artifacts.metrics.read("eval_ins_seg")
    assert record["per_class_ap"] == {"bottle": 100.0} and record["n_images"] == 2 and record["iou_threshold"] == 0.5

    # a missing instance mask: the data set says so (the preflight leaves eval_ins_seg out), and
    # reading it names the file
    (root / "SegmentationObject" / f"{IDS[1]}.png").unlink()
    assert not evaluate.dataset.has_instance_masks("train")
    with pytest.raises(PipelineError, match=f"SegmentationObject/{IDS[1]}.png"):
        evaluate.dataset.load_instance_mask(IDS[1])
    with pytest.raises(PipelineError, match=f"SegmentationObject/{IDS[1]}.png"):
        eval_ins_seg.run(context("eval_ins_seg", EvalInsSegConfig(enabled=True)))   # run alone, past the preflight
