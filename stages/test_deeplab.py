"""test_deeplab: full-image MSC inference of the trained DeepLab on `split` (default data.val_split).

Per image: result/<run>/deeplab/pred/<id>.png (label ids) and, with `save_logits`,
result/<run>/deeplab/logit/<id>.npz {"logit": float16 (C, ⌈H/8⌉, ⌈W/8⌉), "size": int32 [H, W]}
(stride-8 logits: 64× fewer bytes than full resolution; the crf stage upsamples them).
mIoU to metrics/test_deeplab.json when the split has ground truth; otherwise (a test
set for the benchmark server) predictions only, and the log says so.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import artifacts
from pipeline.errors import PipelineError
from pipeline.metrics import evaluate_and_write
from pipeline.runtime import progress
from pipeline.training import load_model_file
from pipeline.transforms import normalize, to_tensor

log = logging.getLogger("wsss")


def split_of(ctx) -> str:
    return ctx.section.split or ctx.data.val_split


def logit_path(result_dir, image_id: str):
    return result_dir / "deeplab" / "logit" / f"{image_id}.npz"


def pred_path(result_dir, image_id: str):
    return result_dir / "deeplab" / "pred" / f"{image_id}.png"


def expected_outputs(ctx):
    ids = ctx.dataset.ids(split_of(ctx))
    paths = [pred_path(ctx.result_dir, i) for i in ids]
    if ctx.section.save_logits:
        paths += [logit_path(ctx.result_dir, i) for i in ids]
    return paths


def save_logits(path, logit: torch.Tensor, size_hw) -> None:
    artifacts.save_npz(path, {"logit": logit.cpu().numpy().astype(np.float16),
                              "size": np.asarray(size_hw, np.int32)})


def read_logits(path) -> tuple[np.ndarray, tuple[int, int]]:
    data = artifacts.load_npz(path)
    if "logit" not in data or "size" not in data:
        raise PipelineError(f"{path} is not a logit file written by test_deeplab")
    return data["logit"].astype(np.float32), (int(data["size"][0]), int(data["size"][1]))


def load_deeplab(ctx):
    from stages.train_deeplab import build_deeplab

    state = load_model_file(ctx.sess("deeplab.pth"), ctx.device)
    model = build_deeplab({**state["model_args"], "pretrained": False})
    model.load_state_dict(state["state_dict"])
    return model.to(ctx.device).eval()


@torch.no_grad()
def predict(model, image: np.ndarray, mean, std, device) -> tuple[torch.Tensor, np.ndarray]:
    """Stride-8 logits (C, h, w) of the MSC max and the full-resolution argmax labels."""
    x = to_tensor(normalize(image, mean, std))[None].to(device)
    logit = model(x)[0].float()
    full = F.interpolate(logit[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
    return logit, full.argmax(0).cpu().numpy().astype(np.uint8)


def run(ctx) -> dict:
    section, data, runtime = ctx.section, ctx.data, ctx.runtime
    dataset = ctx.dataset
    split = split_of(ctx)
    ids = dataset.ids(split)
    dataset.check_images(split)
    todo = ctx.todo(ids, lambda i: pred_path(ctx.result_dir, i))
    if section.save_logits and ctx.resume:
        todo = sorted(set(todo) | {i for i in runtime.shard(ids) if not logit_path(ctx.result_dir, i).exists()})
    log.info("test_deeplab: %d images of '%s' (%d to compute on this rank)", len(ids), split, len(todo))
    model = load_deeplab(ctx) if todo else None
    for image_id in progress(todo, "test_deeplab", enabled=runtime.is_main):
        image = dataset.load_image(image_id)
        logit, label = predict(model, image, data.mean, data.std, ctx.device)
        if section.save_logits:
            save_logits(logit_path(ctx.result_dir, image_id), logit, image.shape[:2])
        artifacts.save_label_png(pred_path(ctx.result_dir, image_id), label)
    runtime.barrier()
    summary = {"outputs": {"images": len(ids), "split": split, "computed_on_rank0": len(todo)}}
    if not runtime.is_main:
        return summary
    if not dataset.has_masks(split):
        log.info("test_deeplab: split '%s' has no ground-truth masks: predictions written, no metric computed", split)
        (ctx.result_dir / "metrics" / "test_deeplab.json").unlink(missing_ok=True)  # an older split's figure
        return summary
    record = evaluate_and_write(ctx.result_dir, dataset, ids, lambda i: pred_path(ctx.result_dir, i), "test_deeplab",
                                split=split)
    summary["metrics"] = {"miou": record["miou"]}
    return summary
