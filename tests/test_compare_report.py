"""The comparison page: two runs on one data set side by side; every picture it references exists."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from dataset.demo import generate_demo_data
from pipeline.artifacts import save_json, save_label_png
from pipeline.config import load_config
from pipeline.errors import PipelineError
from report.compare import write_comparison


def _fake_run(tmp_path: Path, root: Path, name: str, miou: float):
    cfg = load_config(None, [f"work_dir={tmp_path}", f"run_name={name}", f"data.root={root}", "data.train_split=train",
                             "data.infer_split=train", "data.eval_split=train", "data.val_split=val", "device=cpu"])
    from dataset.registry import build_dataset

    dataset = build_dataset(cfg.data)
    for image_id in dataset.ids("train"):
        save_label_png(cfg.result_dir / "sem_seg" / f"{image_id}.png", dataset.load_mask(image_id))
    record = {"miou": miou, "per_class_iou": {"background": 90.0, "bird": miou}, "n_images": 4}
    save_json(cfg.result_dir / "metrics" / "eval_sem_seg.json", record)
    save_json(cfg.result_dir / "manifests" / "eval_sem_seg.json",
              {"stage": "eval_sem_seg", "fingerprint": "x", "run_id": "1", "metrics": {"miou": miou},
               "wall_time_s": 12.5})
    return cfg


def test_two_runs_side_by_side(tmp_path):
    root = tmp_path / "data"
    generate_demo_data(root, n_train=4, n_val=2, seed=1)
    a, b = _fake_run(tmp_path, root, "run_a", 41.5), _fake_run(tmp_path, root, "run_b", 47.25)
    page = write_comparison([a, b], tmp_path / "cmp", n_images=2)
    html = page.read_text()
    assert "run_a (crt)" in html and "run_b (crt)" in html
    assert "41.50" in html and "<b>47.25</b>" in html          # the better run is marked
    sources = re.findall(r'src="(img/[^"]+)"', html)
    assert sources and all((page.parent / s).exists() for s in sources)
    assert sum("pseudo" in s for s in sources) == 4              # 2 images x 2 runs


def test_needs_two_runs(tmp_path):
    cfg = load_config(None, [f"work_dir={tmp_path}"])
    with pytest.raises(PipelineError, match="at least two"):
        write_comparison([cfg], tmp_path / "cmp")
