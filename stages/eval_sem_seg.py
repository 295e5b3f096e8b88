"""eval_sem_seg: mIoU of the pseudo labels (make_sem_seg) on `eval_split`.
Writes result/<run>/metrics/eval_sem_seg.json (same format as eval_cam)."""
from __future__ import annotations

from pipeline.errors import PipelineError
from pipeline.metrics import evaluate_and_write
from stages.make_sem_seg import sem_seg_path


def run(ctx) -> dict:
    dataset, split = ctx.dataset, ctx.data.eval_split
    if not dataset.has_masks(split):
        raise PipelineError(f"eval_sem_seg: split '{split}' has images without ground-truth masks")
    if not ctx.runtime.is_main:
        return {}
    ids = dataset.ids(split)
    record = evaluate_and_write(ctx.result_dir, dataset, ids, lambda i: sem_seg_path(ctx, i), "eval_sem_seg")
    return {"metrics": {"miou": record["miou"]}}
