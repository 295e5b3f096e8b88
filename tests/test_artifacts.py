import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

from pipeline import artifacts
from pipeline.errors import PipelineError


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.npz"
    with pytest.raises(RuntimeError):
        with artifacts.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "m.json"
    artifacts.save_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with artifacts.atomic_path(target) as tmp:
            tmp.write_text("{broken")
            raise RuntimeError
    assert artifacts.load_json(target) == {"a": 1}


def _slow_writer(path):
    with artifacts.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"x" * 1000)
            f.flush()
            time.sleep(30)


def test_killed_writer_leaves_no_file_under_final_name(tmp_path):
    target = tmp_path / "big.bin"
    proc = mp.get_context("fork").Process(target=_slow_writer, args=(target,))
    proc.start()
    deadline = time.time() + 10
    while time.time() < deadline and not any(tmp_path.glob(".big.bin.*")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert any(tmp_path.glob(".big.bin.*"))  # the temporary was there ...
    assert not target.exists()               # ... but never under the final name


def test_npz_round_trip_without_pickle(tmp_path):
    arrays = {"keys": np.array([1, 5], np.int16), "cam": np.random.rand(2, 3, 4).astype(np.float16)}
    artifacts.save_npz(tmp_path / "a.npz", arrays)
    back = artifacts.load_npz(tmp_path / "a.npz")
    assert set(back) == {"keys", "cam"}
    np.testing.assert_array_equal(back["cam"], arrays["cam"])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(PipelineError, match="bad.npz"):
        artifacts.load_npz(tmp_path / "bad.npz")


def test_label_png_round_trip_keeps_ids(tmp_path):
    label = np.random.default_rng(0).integers(0, 21, (17, 23)).astype(np.uint8)
    label[0, 0] = 255
    artifacts.save_label_png(tmp_path / "l.png", label)
    np.testing.assert_array_equal(artifacts.load_label_png(tmp_path / "l.png"), label)
    from PIL import Image

    assert Image.open(tmp_path / "l.png").mode == "P"


def test_unreadable_image_is_a_clear_error(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="x.jpg"):
        artifacts.load_rgb(tmp_path / "x.jpg")
    with pytest.raises(PipelineError, match="missing"):
        artifacts.load_rgb(tmp_path / "none.jpg")
