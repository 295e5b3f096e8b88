"""eval_sem_seg: mIoU of the pseudo labels (make_sem_seg) on `eval_split`; writes the stage's
metrics record (same format as eval_cam)."""
from __future__ import annotations

from pipeline.metrics import evaluate_and_write


def run(ctx) -> dict:
    if not ctx.runtime.is_main:
        return {}
    ids = ctx.dataset.eval_ids(ctx.data.eval_split)     # the images with masks
    record = evaluate_and_write(ctx.artifacts, ctx.dataset, ids, ctx.artifacts.sem_seg, "eval_sem_seg")
    return {"metrics": {"miou": record["miou"]}}
