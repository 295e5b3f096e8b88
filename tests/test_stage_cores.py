"""Pure cores of the stages, against hand-worked cases."""
import numpy as np
import pytest
import torch

from pipeline.trainer import Schedule, set_lr
from stages.cam_to_ir_label import combine_confident
from stages.crf import upsampled_probs
from stages.eval_cam import cam_to_prediction, sweep_thresholds
from stages.make_cam import normalize_cams, strided_size
from stages.make_sem_seg import walk_to_labels
from stages.train_cam import cotraining_loss


def test_cam_to_prediction_hand_case():
    cams = np.array([[[0.9, 0.1], [0.5, 0.0]],     # class index 4 -> label 5
                     [[0.2, 0.3], [0.6, 0.05]]])   # class index 10 -> label 11
    pred = cam_to_prediction(cams, np.array([4, 10]), threshold=0.25)
    np.testing.assert_array_equal(pred, [[5, 11], [11, 0]])
    np.testing.assert_array_equal(cam_to_prediction(cams, np.array([4, 10]), 0.95), np.zeros((2, 2)))
    assert cam_to_prediction(np.zeros((0, 3, 2)), np.array([], int), 0.1).shape == (3, 2)


def test_sweep_thresholds_inclusive():
    assert sweep_thresholds([0.05, 0.6, 0.05]) == [round(0.05 * k, 4) for k in range(1, 13)]


def test_combine_confident_rule():
    fg = np.array([[3, 0, 0, 7]])
    bg = np.array([[3, 0, 5, 0]])
    # fg says 3 -> 3; both background -> 0; fg background but bg map says 5 -> unsure; fg 7 -> 7
    np.testing.assert_array_equal(combine_confident(fg, bg), [[3, 0, 255, 7]])


def test_normalize_cams_keeps_only_image_classes_with_max_one():
    cams = torch.rand(20, 5, 6) * 3 - 1
    out = normalize_cams(cams, np.array([2, 17]))
    assert out.shape == (2, 5, 6)
    assert torch.allclose(out.flatten(1).max(1).values, torch.ones(2), atol=1e-4)
    assert (out >= 0).all()
    torch.testing.assert_close(out[1], torch.relu(cams[17]) / (torch.relu(cams[17]).max() + 1e-5))


def test_strided_size_rounds_up():
    assert strided_size((375, 500), 4) == (94, 125) and strided_size((8, 9), 4) == (2, 3)


def test_cotraining_loss_consistency_term():
    logits = torch.randn(2, 5)
    targets = (torch.rand(2, 5) > 0.5).float()
    cam = torch.rand(2, 5, 4, 4)
    same = cotraining_loss(logits, logits, cam, cam.clone(), targets, (16, 16), 0.1, consistency_on=True)
    assert float(same["consistency"]) == 0.0
    other = torch.rand(2, 5, 4, 4)
    on = cotraining_loss(logits, logits, cam, other, targets, (16, 16), 0.1, consistency_on=True)
    off = cotraining_loss(logits, logits, cam, other, targets, (16, 16), 0.1, consistency_on=False)
    assert float(on["consistency"]) > 0 and float(off["consistency"]) == 0
    assert torch.isclose(on["loss"] - off["loss"], 0.1 * on["consistency"])
    # both branches get gradient from the consistency term (no stop-gradient)
    a, b = cam.clone().requires_grad_(), other.clone().requires_grad_()
    cotraining_loss(logits, logits, a, b, targets, (16, 16), 0.1, True)["consistency"].backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


@pytest.mark.parametrize("teacher", ["cnn", "vit"])
def test_consistency_teacher_stops_the_gradient_into_its_own_branch(teacher):
    logits, targets = torch.randn(2, 5), (torch.rand(2, 5) > 0.5).float()
    cam, other = torch.rand(2, 5, 4, 4), torch.rand(2, 5, 4, 4)
    a, b = cam.clone().requires_grad_(), other.clone().requires_grad_()
    out = cotraining_loss(logits, logits, a, b, targets, (16, 16), 0.1, True, teacher=teacher)
    reference = cotraining_loss(logits, logits, cam, other, targets, (16, 16), 0.1, True)
    assert torch.equal(out["consistency"].detach(), reference["consistency"])   # same value, other gradient
    out["consistency"].backward()
    taught, fixed = (b, a) if teacher == "cnn" else (a, b)
    assert fixed.grad is None and taught.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="teacher"):
        cotraining_loss(logits, logits, cam, other, targets, (16, 16), 0.1, True, teacher="both")


def test_poly_lr_values_and_groups():
    poly = Schedule("poly", power=0.9)
    assert 0.1 * poly.factor(0, 100) == 0.1 and 0.1 * poly.factor(100, 100) == 0.0
    assert 0.1 * poly.factor(50, 100) == pytest.approx(0.1 * 0.5 ** 0.9)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr_mult": 10.0}], lr=1.0)
    set_lr(opt, 0.1, poly.factor(50, 100))
    assert opt.param_groups[0]["lr"] == pytest.approx(10 * 0.1 * 0.5 ** 0.9)


def test_walk_to_labels_background_plane_and_crop():
    walked = np.zeros((2, 2, 3), np.float32)
    walked[0, 0, 0] = 1.0   # strong class index 3 at top-left
    walked[1, 1, 2] = 0.5   # weaker class index 6 at bottom-right
    label = walk_to_labels(walked, np.array([3, 6]), (7, 10), bg_threshold=0.25)
    assert label.shape == (7, 10)
    assert label[1, 1] == 4 and label[6, 9] == 7 and label[0, 9] == 0
    assert set(np.unique(label)) <= {0, 4, 7}


def test_upsampled_probs_are_a_distribution():
    logit = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)
    probs = upsampled_probs(logit, (24, 40))
    assert probs.shape == (4, 24, 40)
    np.testing.assert_allclose(probs.sum(0), 1.0, rtol=1e-5)
    one = upsampled_probs(logit[:1], (6, 10))
    np.testing.assert_allclose(one, 1.0)


def test_deeplab_logits_round_trip(tmp_path):
    from pipeline.catalogue import read_logits, write_logits

    logit = torch.randn(21, 5, 7) * 4
    write_logits(tmp_path / "x.npz", logit, (37, 51))
    back, size = read_logits(tmp_path / "x.npz")
    assert size == (37, 51) and back.dtype == np.float32
    np.testing.assert_allclose(back, logit.numpy(), atol=4e-3)  # float16 storage
    assert (back.argmax(0) == logit.numpy().argmax(0)).mean() > 0.99
