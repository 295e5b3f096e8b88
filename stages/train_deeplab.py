"""train_deeplab: DeepLabv2 (MSC) on the pseudo labels of make_sem_seg, iteration-based.

Crops as the reference: a scale from `scales`, padding at the bottom/right, random crop, flip.
Each iteration accumulates `accumulation` batches; the loss is the sum of the
cross-entropies (ignore 255) of every MSC output and of their max. Poly lr per
iteration with lr groups (backbone 1×, ASPP weights 10×, ASPP biases 20× and no
weight decay). Writes the weights `deeplab`; the one trainer checkpoints every
`checkpoint_every` iterations, so an interrupted run continues its schedule.
"""
from __future__ import annotations

import logging

from net.backbone import copy_backbone_from
from net.registry import build_model, read_model_file, save_model
from pipeline.errors import PipelineError
from pipeline.trainer import Trainer, make_loader, optimizer_from_config, schedule_from_config

log = logging.getLogger("wsss")


def model_args(section, num_labels: int) -> dict:
    return {"backbone": section.backbone, "num_classes": num_labels, "pretrained": section.pretrained,
            "msc_scales": list(section.msc_scales), "rates": list(section.aspp_rates),
            "dilate_first_block": section.dilate_first_block,
            "freeze_bn": section.freeze_bn, "input_norm": section.input_norm}


def run(ctx) -> dict:
    from deeplab.train_utils import DeepLabCropDataset, msc_loss, param_groups

    section, data, runtime = ctx.section, ctx.data, ctx.runtime
    dataset, pseudo_labels = ctx.dataset, ctx.artifacts.sem_seg
    ids = dataset.ids(data.infer_split)
    missing = pseudo_labels.missing(ids)
    if missing:
        raise PipelineError(f"train_deeplab: {len(missing)} pseudo label(s) missing, e.g. {pseudo_labels.path(missing[0])}")
    args = model_args(section, len(dataset.class_names))
    model = build_model("deeplab", args).to(runtime.device)
    if section.init_from_cam:
        copy_backbone_from(model.base.backbone, ctx.artifacts.weights.path("cam_cnn"), runtime.device)
    train_set = DeepLabCropDataset(dataset, ids, pseudo_labels, section.crop_size, section.scales, data.mean,
                                   data.std, seed=ctx.seed, input_norm=model.input_norm)
    loader = make_loader(train_set, section.batch_size, runtime, section.num_workers, shuffle=True, seed=ctx.seed,
                         key="train_deeplab.batch_size")
    opt = section.optimizer

    def losses(trainer_model, batch, step):
        images, labels = batch[0].to(runtime.device), batch[1].to(runtime.device)
        return {"loss": msc_loss([o.float() for o in trainer_model(images)], labels,
                                 resolution=section.loss_resolution)}

    history = Trainer(ctx, model, loader, optimizer_from_config(opt, param_groups(model, opt.lr, opt.weight_decay, section.head_lr_mult,
                                                                    section.head_bias_lr_mult)),
                      losses, max_steps=section.iterations, base_lr=opt.lr, schedule=schedule_from_config(opt),
                      lr_key="train_deeplab.optimizer.lr", accumulation=section.accumulation, amp=section.amp,
                      checkpoint_every=section.checkpoint_every, log_every=section.log_every).fit()
    if runtime.is_main:
        save_model(ctx.artifacts.weights.path("deeplab"), model, "deeplab",
                   {**args, "pretrained": False, "input_norm": model.input_norm})
    return {"outputs": {"deeplab": str(ctx.artifacts.weights.path("deeplab")), "train_images": len(ids)},
            "metrics": {"final_loss": history[-1]["loss"] if history else None}}


def expected_outputs(ctx):
    return [ctx.artifacts.weights.path("deeplab")]


def check(ctx) -> None:
    if ctx.section.init_from_cam:
        read_model_file(ctx.artifacts.weights.path("cam_cnn"), "cpu", expect="resnet_cam")
