"""train_deeplab: DeepLabv2 (MSC) on the pseudo labels of make_sem_seg, iteration-based.

Each iteration accumulates `accumulation` batches; the loss is the sum of the
cross-entropies (ignore 255) of every MSC output and of their max. Poly lr per
iteration with lr groups (backbone 1×, ASPP weights 10×, ASPP biases 20× and no
weight decay). Writes sess/<run>/deeplab.pth; sess/<run>/train_deeplab_ckpt.pth every
`checkpoint_every` iterations lets an interrupted run continue its schedule.
"""
from __future__ import annotations

import logging
import time

import torch

from pipeline import artifacts
from pipeline.errors import PipelineError
from pipeline.training import check_finite, copy_backbone_from_cam, ddp, resume_training, save_model, set_poly_lr, unwrap
from pipeline.transforms import SegmentationCropDataset, make_loader, set_epoch
from stages.make_sem_seg import sem_seg_path

log = logging.getLogger("wsss")


def model_args(section, num_labels: int) -> dict:
    return {"backbone": section.backbone, "num_classes": num_labels, "pretrained": section.pretrained,
            "msc_scales": list(section.msc_scales)}


def build_deeplab(args: dict):
    """MSC(DeepLabV2). `pretrained` may be a local file: a DeepLab checkpoint or backbone weights."""
    from deeplab.model import MSC, DeepLabV2, load_deeplab_checkpoint

    pretrained = args["pretrained"]
    local = isinstance(pretrained, str) and pretrained.lower() not in ("true", "false")
    base = DeepLabV2(args["backbone"], num_classes=args["num_classes"], pretrained=False if local else pretrained)
    if local:
        load_deeplab_checkpoint(base, pretrained)
    return MSC(base, scales=tuple(args["msc_scales"]))


def _batches(loader):
    """Endless stream of batches; each pass over the data is a new epoch of augmentation."""
    epoch = 0
    while True:
        set_epoch(loader, epoch)
        yield from loader
        epoch += 1


def run(ctx) -> dict:
    from deeplab.train_utils import msc_loss, param_groups

    section, data, runtime = ctx.section, ctx.data, ctx.runtime
    dataset = ctx.dataset
    ids = dataset.ids(data.infer_split)
    missing = [i for i in ids if not sem_seg_path(ctx, i).exists()]
    if missing:
        raise PipelineError(f"train_deeplab: {len(missing)} pseudo label(s) missing, e.g. {sem_seg_path(ctx, missing[0])}")
    args = model_args(section, len(dataset.class_names))
    model = build_deeplab(args).to(runtime.device)
    if section.init_from_cam:
        copy_backbone_from_cam(model.base.backbone, ctx.sess("cam_cnn.pth"), runtime.device)
    train_set = SegmentationCropDataset(dataset, ids, lambda i: sem_seg_path(ctx, i), section.crop_size,
                                        section.scale_range, data.mean, data.std, seed=ctx.seed)
    loader = make_loader(train_set, section.batch_size, runtime, section.num_workers, shuffle=True, seed=ctx.seed)
    optimizer = torch.optim.SGD(param_groups(model, section.lr, section.weight_decay), lr=section.lr,
                                momentum=section.momentum)
    scaler = torch.amp.GradScaler("cuda", enabled=section.amp and runtime.device.type == "cuda")
    ckpt_path = ctx.sess("train_deeplab_ckpt.pth")
    start, history = 0, []
    state = resume_training(ckpt_path, ctx.fingerprint, ctx.resume, model, optimizer, runtime.device)
    if state is not None:
        start, history = state["iteration"], state["history"]
        log.info("train_deeplab: resuming at iteration %d/%d", start, section.iterations)
    trainer = ddp(model, runtime)
    trainer.train()
    stream = _batches(loader)
    t0, seen, running = time.time(), 0, 0.0

    def checkpoint(iteration: int) -> None:
        if runtime.is_main:
            artifacts.save_torch(ckpt_path, {"model": unwrap(trainer).state_dict(), "optimizer": optimizer.state_dict(),
                                             "iteration": iteration, "history": history,
                                             "fingerprint": ctx.fingerprint})
        runtime.barrier()

    for iteration in range(start, section.iterations):
        lr = set_poly_lr(optimizer, section.lr, iteration, section.iterations, section.poly_power)
        optimizer.zero_grad(set_to_none=True)
        loss_value = 0.0
        for _ in range(section.accumulation):
            images, labels, _ = next(stream)
            images, labels = images.to(runtime.device), labels.to(runtime.device)
            with runtime.autocast(section.amp):
                outputs = trainer(images)
            loss = msc_loss([o.float() for o in outputs], labels) / section.accumulation
            check_finite(loss, "train_deeplab", iteration)
            scaler.scale(loss).backward()
            loss_value += float(loss)
            seen += images.shape[0]
        scaler.step(optimizer)
        scaler.update()
        running += loss_value
        done = iteration + 1
        if done % section.log_every == 0 or done == section.iterations:
            count = section.log_every if done % section.log_every == 0 else done % section.log_every
            record = {"iteration": done, "loss": round(running / count, 5), "lr": lr,
                      "images_per_s": round(seen * runtime.world_size / (time.time() - t0), 2)}
            history.append(record)
            log.info("train_deeplab %d/%d: loss %.4f lr %.2e %.1f img/s", done, section.iterations, record["loss"],
                     lr, record["images_per_s"])
            t0, seen, running = time.time(), 0, 0.0
        if done % section.checkpoint_every == 0 and done < section.iterations:
            checkpoint(done)
    if runtime.is_main:
        save_model(ctx.sess("deeplab.pth"), model, {**args, "pretrained": False})
    return {"outputs": {"deeplab": str(ctx.sess("deeplab.pth")), "train_images": len(ids)},
            "metrics": {"final_loss": history[-1]["loss"] if history else None}}
