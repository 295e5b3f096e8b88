"""The artifact catalogue: every kind of file the pipeline writes, declared once with its
place, its reader and its writer. Stages, `export` and `report` find files only here, so a
folder name or a file format is written in exactly one line.

    artifacts = Catalogue(result_dir, sess_dir)
    artifacts.cam.path(image_id)              # result/<run>/cam/<id>.npz
    artifacts.cam.write(image_id, keys=..., strided=..., high_res=...)
    artifacts.cam.read(image_id)              # {"keys", "cam", "high_res"} as float32 maps
    artifacts.metrics.read("eval_cam")        # result/<run>/metrics/eval_cam.json

Per-image kinds are keyed by image id; the others by a name (a stage, a model file).

Formats (all pickle-free):
  cam         npz  keys int16 (K,) 0-based class indices; cam float16 (K, ⌈H/4⌉, ⌈W/4⌉) stride-4
                   maps each normalised to max 1; high_res uint8 (K, H, W) full-resolution maps × 255.
                   Optional extra planes per source (eval_cam compares them): `<source>_high_res`.
  ir_label    png  palette PNG of label ids, 255 = unsure
  sem_seg     png  palette PNG of label ids: the pseudo labels
  ins_seg     npz  score float32 (N,); class int16 (N,) 0-based; mask uint8 (N, ⌈H·W/8⌉) each detection's
                   (H, W) mask packed 8 pixels a byte (np.packbits, row-major); size int32 [H, W]
  logits      npz  logit float16 (C, ⌈H/8⌉, ⌈W/8⌉) stride-8 logits; size int32 [H, W]
  prediction  png  label ids of the segmenter on the test split
  crf_label   png  label ids after dense-CRF post-processing
  seg_head_*  the same three for a single-stage network's segmentation head (seg_head/...)
  metrics     json one record per evaluating stage
  manifest    json one per finished stage (see pipeline/runner.py)
  weights     pth  {"kind", "model_args", "state_dict"}: read with net.registry.load_model
  checkpoint  pth  a training stage's resumable state (see pipeline/trainer.py)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline import artifacts
from pipeline.errors import PipelineError


# ----------------------------------------------------------------------------- codecs

def write_cam(path, keys: np.ndarray, strided, high_res, extra: dict | None = None) -> None:
    """`strided` (K, h, w) and `high_res` (K, H, W) in [0, 1] (torch or numpy). `extra` maps a
    source name to further full-resolution maps of the same shape (kept for evaluation only)."""
    def as_numpy(x):
        return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)

    def quantise(x):
        return np.round(np.clip(as_numpy(x), 0, 1) * 255).astype(np.uint8)

    arrays = {"keys": np.asarray(keys).astype(np.int16), "cam": as_numpy(strided).astype(np.float16),
              "high_res": quantise(high_res)}
    for source, maps in (extra or {}).items():
        arrays[f"{source}_high_res"] = quantise(maps)
    artifacts.save_npz(path, arrays)


def read_cam(path) -> dict[str, np.ndarray]:
    """{"keys": int64 (K,), "cam": float32 (K,h,w), "high_res": float32 (K,H,W), "<source>_high_res": ...}."""
    data = artifacts.load_npz(path)
    missing = {"keys", "cam", "high_res"} - set(data)
    if missing:
        raise PipelineError(f"CAM file {path} lacks {sorted(missing)}: not written by make_cam?")
    out = {"keys": data["keys"].astype(np.int64), "cam": data["cam"].astype(np.float32)}
    for name, value in data.items():
        if name.endswith("high_res"):
            out[name] = value.astype(np.float32) / 255.0
    return out


def write_logits(path, logit, size_hw) -> None:
    logit = logit.detach().cpu().numpy() if hasattr(logit, "detach") else np.asarray(logit)
    artifacts.save_npz(path, {"logit": logit.astype(np.float16), "size": np.asarray(size_hw, np.int32)})


def read_logits(path) -> tuple[np.ndarray, tuple[int, int]]:
    data = artifacts.load_npz(path)
    if "logit" not in data or "size" not in data:
        raise PipelineError(f"{path} is not a logit file written by test_deeplab")
    return data["logit"].astype(np.float32), (int(data["size"][0]), int(data["size"][1]))


def write_instances(path, detected: dict) -> None:
    """`detected`: {"score" (N,), "class" (N,) 0-based, "mask" (N, H, W) bool}."""
    masks = np.asarray(detected["mask"], dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"instance masks must be (N, H, W), got {masks.shape}")
    n, height, width = masks.shape
    artifacts.save_npz(path, {
        "score": np.asarray(detected["score"], np.float32).reshape(n),
        "class": np.asarray(detected["class"], np.int16).reshape(n),
        "mask": np.packbits(masks.reshape(n, height * width), axis=1),
        "size": np.asarray([height, width], np.int32),
    })


def read_instances(path) -> dict[str, np.ndarray]:
    """{"score": float32 (N,), "class": int64 (N,), "mask": bool (N, H, W)} of an ins_seg artifact."""
    data = artifacts.load_npz(path)
    missing = {"score", "class", "mask", "size"} - set(data)
    if missing:
        raise PipelineError(f"instance file {path} lacks {sorted(missing)}: not written by make_ins_seg?")
    height, width = (int(v) for v in data["size"])
    n = len(data["score"])
    if data["mask"].shape != (n, -(-height * width // 8)) or len(data["class"]) != n:
        raise PipelineError(f"instance file {path} is inconsistent: {n} scores, {len(data['class'])} classes, "
                            f"mask {data['mask'].shape} for size {height}x{width}")
    masks = np.unpackbits(data["mask"], axis=1, count=height * width).astype(bool).reshape(n, height, width)
    return {"score": data["score"].astype(np.float32), "class": data["class"].astype(np.int64), "mask": masks}


# ----------------------------------------------------------------------------- the kinds

@dataclass(frozen=True)
class ArtifactKind:
    name: str
    under: str                 # "result" or "sess"
    pattern: str               # relative path with "{key}"
    read: Callable[..., Any]
    write: Callable[..., Any]
    per_image: bool
    about: str


KINDS: dict[str, ArtifactKind] = {k.name: k for k in (
    ArtifactKind("cam", "result", "cam/{key}.npz", read_cam, write_cam, True, "class activation maps"),
    ArtifactKind("ir_label", "result", "ir_label/{key}.png", artifacts.load_label_png, artifacts.save_label_png,
                 True, "confident labels for the IRN"),
    ArtifactKind("sem_seg", "result", "sem_seg/{key}.png", artifacts.load_label_png, artifacts.save_label_png,
                 True, "pseudo labels"),
    ArtifactKind("ins_seg", "result", "ins_seg/{key}.npz", read_instances, write_instances, True,
                 "instance pseudo labels"),
    ArtifactKind("logits", "result", "deeplab/logit/{key}.npz", read_logits, write_logits, True,
                 "segmenter logits"),
    ArtifactKind("prediction", "result", "deeplab/pred/{key}.png", artifacts.load_label_png,
                 artifacts.save_label_png, True, "segmenter predictions"),
    ArtifactKind("crf_label", "result", "deeplab/crf/{key}.png", artifacts.load_label_png,
                 artifacts.save_label_png, True, "CRF-refined predictions"),
    ArtifactKind("seg_head_logits", "result", "seg_head/logit/{key}.npz", read_logits, write_logits, True,
                 "segmentation-head logits"),
    ArtifactKind("seg_head_prediction", "result", "seg_head/pred/{key}.png", artifacts.load_label_png,
                 artifacts.save_label_png, True, "segmentation-head predictions"),
    ArtifactKind("seg_head_crf_label", "result", "seg_head/crf/{key}.png", artifacts.load_label_png,
                 artifacts.save_label_png, True, "CRF-refined segmentation-head predictions"),
    ArtifactKind("metrics", "result", "metrics/{key}.json", artifacts.load_json, artifacts.save_json, False,
                 "a stage's evaluation record"),
    ArtifactKind("manifest", "result", "manifests/{key}.json", artifacts.load_json, artifacts.save_json, False,
                 "a finished stage's manifest"),
    ArtifactKind("weights", "sess", "{key}.pth", artifacts.load_torch, artifacts.save_torch, False,
                 "trained model weights"),
    ArtifactKind("checkpoint", "sess", "{key}_ckpt.pth", artifacts.load_torch, artifacts.save_torch, False,
                 "a training stage's resumable state"),
)}


@dataclass(frozen=True)
class BoundArtifact:
    """One kind of artifact inside one run's folders."""
    kind: ArtifactKind
    base: Path

    def path(self, key: str) -> Path:
        return self.base / self.kind.pattern.format(key=key)

    @property
    def folder(self) -> Path:
        return self.path("x").parent

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def read(self, key: str, *args, **kwargs):
        return self.kind.read(self.path(key), *args, **kwargs)

    def write(self, key: str, *args, **kwargs) -> None:
        self.kind.write(self.path(key), *args, **kwargs)

    def missing(self, keys) -> list[str]:
        return [k for k in keys if not self.path(k).exists()]


class Catalogue:
    """The artifact kinds of one run, as attributes: `catalogue.cam`, `catalogue.sem_seg`, ..."""

    def __init__(self, result_dir: Path, sess_dir: Path):
        self.result_dir, self.sess_dir = Path(result_dir), Path(sess_dir)

    def __getattr__(self, name: str) -> BoundArtifact:
        kind = KINDS.get(name)
        if kind is None:
            raise AttributeError(f"no artifact kind {name!r} (kinds: {', '.join(KINDS)})")
        return BoundArtifact(kind, self.result_dir if kind.under == "result" else self.sess_dir)

    def __getitem__(self, name: str) -> BoundArtifact:
        return getattr(self, name)
