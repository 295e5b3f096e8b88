import numpy as np

from pipeline.metrics import confusion_matrix, iou_from_confusion, metric_record, miou_percent


def test_confusion_and_iou_hand_computed():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    conf = confusion_matrix(pred, gt, 4)
    expected = np.zeros((4, 4), int)
    expected[0, 0] = 1; expected[0, 1] = 1; expected[1, 1] = 2; expected[2, 0] = 1  # noqa: E702
    np.testing.assert_array_equal(conf, expected)  # the 255 pixel (predicted 2) is ignored
    iou = iou_from_confusion(conf)
    # class 0: tp 1, fp 1 (gt2->0), fn 1 (gt0->1): 1/3; class 1: tp 2, fp 1: 2/3; class 2: tp 0, fn 1: 0; class 3 absent
    np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 3, 0.0])
    assert np.isnan(iou[3])
    assert abs(miou_percent(conf) - 100 * (1 / 3 + 2 / 3 + 0) / 3) < 1e-9


def test_metric_record_format():
    conf = np.diag([5, 0, 3]).astype(np.int64)
    record = metric_record(conf, ["background", "a", "b"], n_images=2)
    assert record["miou"] == 100.0 and record["n_images"] == 2
    assert set(record["per_class_iou"]) == {"background", "b"}  # 'a' absent from both: left out
