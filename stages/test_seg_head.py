"""test_seg_head: the single-stage papers' evaluation, their segmentation head on `split` (default
data.val_split) with multi-scale + flip inference (net.single_stage.multiscale_seg_logits; COCO
resizes every image to `resize_to` first). Per image: the `seg_head_prediction` artifact and the
`seg_head_logits` artifact (fused logits at stride 4, float16, for crf_seg_head); mIoU to the
stage's metrics when the split has ground truth.
"""
from __future__ import annotations

import logging

from net.registry import load_model, read_model_file, single_stage_kinds
from net.single_stage import segment_image
from pipeline.metrics import score_split
from pipeline.runtime import progress

log = logging.getLogger("wsss")


def split_of(ctx) -> str:
    return ctx.section.split or ctx.data.val_split


def expected_outputs(ctx):
    ids = ctx.dataset.ids(split_of(ctx))
    return [ctx.artifacts.seg_head_prediction.path(i) for i in ids] + \
        [ctx.artifacts.seg_head_logits.path(i) for i in ids]


def run(ctx) -> dict:
    section, data, runtime = ctx.section, ctx.data, ctx.runtime
    dataset, predictions, logits = ctx.dataset, ctx.artifacts.seg_head_prediction, ctx.artifacts.seg_head_logits
    split = split_of(ctx)
    ids = dataset.ids(split)
    todo = sorted(set(ctx.todo(ids, predictions)) | set(ctx.todo(ids, logits)))
    log.info("test_seg_head: %d images of '%s' (%d to compute on this rank), scales %s", len(ids), split,
             len(todo), section.scales)
    model = load_model(ctx.artifacts.weights.path("net"), ctx.device, expect=single_stage_kinds()) if todo else None
    for image_id in progress(todo, "test_seg_head", enabled=runtime.is_main):
        image = dataset.load_image(image_id)
        small, label = segment_image(model, image, section, data.mean, data.std, ctx.device)
        logits.write(image_id, small, image.shape[:2])
        predictions.write(image_id, label)
    runtime.barrier()
    summary = score_split(ctx, split, ids, predictions, len(todo))
    if "metrics" in summary:
        summary["metrics"].update(score_variants(ctx, split, summary["metrics"]["miou"], model))
    return summary


def score_variants(ctx, split: str, primary_miou: float, model=None) -> dict:
    """A model that names inference variants (`inference_variants()` -> {name: net}, the one the
    artifacts come from in `inference_variant`; FSR: student and teacher) gets every variant
    scored on the same images: {"miou_<name>": mIoU} (the others computed here, not written).
    `model`: the loaded network, or None to load it."""
    import numpy as np

    from net.registry import builder_of
    from pipeline.metrics import confusion_matrix, miou_percent

    path = ctx.artifacts.weights.path("net")
    if model is None:
        if not hasattr(builder_of(read_model_file(path, "cpu")["kind"]), "inference_variants"):
            return {}
        model = load_model(path, ctx.device, expect=single_stage_kinds())
    if not hasattr(model, "inference_variants"):
        return {}
    dataset, n = ctx.dataset, len(ctx.dataset.class_names)
    scores = {f"miou_{model.inference_variant}": primary_miou}
    for name, net in model.inference_variants().items():
        if name == model.inference_variant:
            continue
        conf = np.zeros((n, n), np.int64)
        for image_id in progress(dataset.eval_ids(split), f"test_seg_head ({name})"):
            _, label = segment_image(net, dataset.load_image(image_id), ctx.section, ctx.data.mean, ctx.data.std,
                                     ctx.device)
            conf += confusion_matrix(label, dataset.load_mask(image_id), n)
        scores[f"miou_{name}"] = round(miou_percent(conf), 3)
    log.info("test_seg_head: mIoU by inference variant %s (artifacts from the %s)", scores, model.inference_variant)
    ctx.artifacts.metrics.write("test_seg_head", {**ctx.artifacts.metrics.read("test_seg_head"), **scores})
    return scores


def check(ctx) -> None:
    read_model_file(ctx.artifacts.weights.path("net"), "cpu", expect=single_stage_kinds())
