"""Kill a run at a point of each stage kind (training, per-image, process pool), run it again:
the final outputs equal an uninterrupted run's bit for bit (weights, CAMs, IR labels, metrics)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_bad_input import tiny  # noqa: E402  (one tiny config for the CLI tests)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STAGES = "cam_to_ir_label"


def start(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "run_pipeline.py"), "run", "--config", str(config),
                             "--to", STAGES], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish(config: Path) -> None:
    proc = start(config)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> bool:
    """SIGKILL `proc` as soon as `ready()` holds; False when it finished first."""
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    proc.wait()
    return False


def outputs(result: Path, sess: Path) -> dict:
    out = {}
    for name in ("cam_cnn", "cam_vit"):
        state = torch.load(sess / f"{name}.pth", map_location="cpu", weights_only=True)["state_dict"]
        out[name] = {k: v.numpy() for k, v in state.items()}
    for path in sorted((result / "cam").glob("*.npz")):
        with np.load(path) as data:
            out[f"cam/{path.name}"] = {k: data[k] for k in data.files}
    for path in sorted((result / "ir_label").glob("*.png")):
        out[f"ir/{path.name}"] = np.asarray(Image.open(path))
    out["eval_cam"] = json.loads((result / "metrics" / "eval_cam.json").read_text())
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict) and key != "eval_cam":
            assert a[key].keys() == b[key].keys(), key
            for k in a[key]:
                assert np.array_equal(a[key][k], b[key][k]), f"{key}:{k} differs"
        elif isinstance(a[key], np.ndarray):
            assert np.array_equal(a[key], b[key]), f"{key} differs"
        else:
            assert a[key] == b[key], key


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume") / "data"
    subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), "demo-data", "--out", str(root), "--train", "12",
                    "--val", "4"], check=True, cwd=REPO, capture_output=True)
    return root


def test_killed_runs_resume_to_the_same_outputs(data, tmp_path):
    configs = {}
    for name in ("straight", "killed"):
        cfg = tiny(data, tmp_path / name, name)
        cfg["train_cam"]["epochs"] = 3
        cfg["cam_to_ir_label"]["num_workers"] = 2          # a process pool
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(cfg))
    finish(configs["straight"])
    reference = outputs(tmp_path / "straight/result/straight", tmp_path / "straight/sess/straight")

    result, sess = tmp_path / "killed/result/killed", tmp_path / "killed/sess/killed"
    killed = []
    # 1. in training, right after the first epoch's checkpoint
    killed.append(kill_when(start(configs["killed"]), lambda: (sess / "train_cam_ckpt.pth").exists()))
    # 2. in a per-image stage, with some CAMs written
    killed.append(kill_when(start(configs["killed"]), lambda: len(list((result / "cam").glob("*.npz"))) >= 3))
    # 3. in the process-pool stage, with some IR labels written
    killed.append(kill_when(start(configs["killed"]), lambda: len(list((result / "ir_label").glob("*.png"))) >= 3))
    finish(configs["killed"])
    assert killed[0], "the training stage finished before it could be killed"
    assert_same(reference, outputs(result, sess))
    assert not list(result.rglob(".*.tmp")) and not list(sess.rglob(".*.tmp"))


def _terminal_sigint() -> None:
    """As in a terminal: a process started from a background job (CI) inherits SIGINT ignored,
    and Python then installs no KeyboardInterrupt handler; give the child the default back."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
                    reason="SIGINT is ignored in this process (started from a background job): no Ctrl-C to simulate")
def test_ctrl_c_in_a_process_pool_is_one_line_and_130(data, tmp_path):
    cfg = tiny(data, tmp_path, "sigint")
    cfg["cam_to_ir_label"] = {"num_workers": 2, "crf": {"iters": 1500}}   # seconds per image: surely interrupted
    config = tmp_path / "sigint.yaml"
    config.write_text(yaml.safe_dump(cfg))
    finish_to = subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), "run", "--config", str(config), "--to",
                                "make_cam"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert finish_to.returncode == 0, finish_to.stderr[-2000:]
    result = tmp_path / "result" / "sigint"
    proc = subprocess.Popen([sys.executable, str(REPO / "run_pipeline.py"), "run", "--config", str(config), "--to",
                             STAGES], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_terminal_sigint)
    t0 = time.time()
    while proc.poll() is None and not list((result / "ir_label").glob("*.png")) and time.time() - t0 < 300:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)              # Ctrl-C reaches the whole process group, as in a terminal
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130, err[-2000:]
    assert len(lines) == 1 and "interrupted" in lines[0], err[-2000:]
