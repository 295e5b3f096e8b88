"""train_cam: CRT's dual-branch co-training of a CNN CAM branch and a transformer CAM branch.

Loss = MLSM(cnn logits) + MLSM(vit logits) + λ · mean|CAM_cnn↑ − CAM_vit↑| (from epoch
`consistency_start_epoch`), where ↑ is bilinear upsampling of the raw CAMs to the crop.
Writes sess/<run>/cam_cnn.pth and cam_vit.pth (model_args + state_dict); a checkpoint
sess/<run>/train_cam_ckpt.pth after every epoch lets an interrupted run resume.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from pipeline import artifacts
from pipeline.transforms import ClassificationDataset, make_loader, set_epoch
from pipeline.training import check_finite, ddp, make_optimizer, resume_training, save_model, set_poly_lr, unwrap

log = logging.getLogger("wsss")


def cnn_model_args(section, num_classes: int) -> dict:
    return {"backbone": section.cnn.backbone, "num_classes": num_classes,
            "pretrained": section.cnn.pretrained, "output_stride": section.cnn.output_stride,
            "freeze_bn": section.cnn.freeze_bn, "freeze_early_stages": section.cnn.freeze_early_stages}


def vit_model_args(section, num_classes: int) -> dict:
    return {"name": section.vit.name, "num_classes": num_classes, "pretrained": section.vit.pretrained,
            "window": section.vit.window, "recurrence": section.vit.recurrence, **section.vit.model_kwargs}


def build_cnn(args: dict):
    from net.resnet_cam import ResNetCAM

    return ResNetCAM(**args)


def build_vit(args: dict):
    from net.vit_cam import ViTCAM

    return ViTCAM(**args)


def cotraining_loss(logits_cnn, logits_vit, cam_cnn, cam_vit, targets, size, cam_lambda: float,
                    consistency_on: bool) -> dict[str, torch.Tensor]:
    """The three CRT loss terms and their sum. Raw CAMs are upsampled to `size` (H, W).
    No stop-gradient on the consistency term: both branches learn from it."""
    cls_cnn = F.multilabel_soft_margin_loss(logits_cnn, targets)
    cls_vit = F.multilabel_soft_margin_loss(logits_vit, targets)
    if consistency_on and cam_lambda > 0:
        up_cnn = F.interpolate(cam_cnn, size=size, mode="bilinear", align_corners=False)
        up_vit = F.interpolate(cam_vit, size=size, mode="bilinear", align_corners=False)
        consistency = (up_cnn - up_vit).abs().mean()
    else:
        consistency = logits_cnn.new_zeros(())
    total = cls_cnn + cls_vit + cam_lambda * consistency
    return {"loss": total, "cls_cnn": cls_cnn, "cls_vit": cls_vit, "consistency": consistency}


class CoTrainer(torch.nn.Module):
    """Both branches in one module so that one DDP wrapper synchronises them."""

    def __init__(self, cnn, vit):
        super().__init__()
        self.cnn, self.vit = cnn, vit

    def forward(self, images):
        logits_cnn, cam_cnn = self.cnn(images)
        logits_vit, cam_vit = self.vit(images)
        return logits_cnn, cam_cnn, logits_vit, cam_vit


def _param_groups(model: CoTrainer, section) -> list[dict]:
    cnn_backbone, cnn_head = model.cnn.param_groups()
    vit_backbone, vit_head = model.vit.param_groups()
    common = {"weight_decay": section.weight_decay}
    return [
        {"params": cnn_backbone + vit_backbone, "lr_mult": 1.0, **common},
        {"params": cnn_head + vit_head, "lr_mult": section.head_lr_mult, **common},
    ]


@torch.no_grad()
def _validation_loss(model, loader, runtime) -> float:
    model.eval()
    total, count = 0.0, 0
    for images, targets, _ in loader:
        images, targets = images.to(runtime.device), targets.to(runtime.device)
        logits_cnn, _, logits_vit, _ = model(images)
        loss = F.multilabel_soft_margin_loss(logits_cnn, targets) + F.multilabel_soft_margin_loss(logits_vit, targets)
        total += float(loss) * images.shape[0]
        count += images.shape[0]
    total, count = runtime.all_reduce_sum(total), runtime.all_reduce_sum(count)
    return total / max(count, 1)


def run(ctx) -> dict:
    section, data, runtime = ctx.section, ctx.data, ctx.runtime
    dataset = ctx.dataset
    train_ids = dataset.ids(data.train_split)
    dataset.check_images(data.train_split)
    dataset.load_label_cache([data.train_split])
    num_classes = dataset.num_classes

    cnn_args, vit_args = cnn_model_args(section, num_classes), vit_model_args(section, num_classes)
    model = CoTrainer(build_cnn(cnn_args), build_vit(vit_args)).to(runtime.device)
    train_set = ClassificationDataset(dataset, train_ids, section.crop_size, section.resize_long,
                                      data.mean, data.std, train=True, seed=ctx.seed)
    loader = make_loader(train_set, section.batch_size, runtime, section.num_workers, shuffle=True, seed=ctx.seed)
    val_loader = None
    if section.validate and data.val_split:
        val_ids = dataset.ids(data.val_split)
        dataset.load_label_cache([data.val_split])
        val_set = ClassificationDataset(dataset, val_ids, section.crop_size, section.resize_long,
                                        data.mean, data.std, train=False)
        val_loader = make_loader(val_set, section.batch_size, runtime, 0, shuffle=False, seed=ctx.seed,
                                 drop_last=False)

    optimizer = make_optimizer(section.optimizer, _param_groups(model, section), section.lr, section.momentum,
                               section.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=section.amp and runtime.device.type == "cuda")
    steps_per_epoch = len(loader)
    max_steps = section.epochs * steps_per_epoch
    ckpt_path = ctx.sess("train_cam_ckpt.pth")
    start_epoch, history = 0, []
    state = resume_training(ckpt_path, ctx.fingerprint, ctx.resume, model, optimizer, runtime.device)
    if state is not None:
        start_epoch, history = state["epoch"] + 1, state["history"]
        log.info("train_cam: resuming at epoch %d/%d", start_epoch + 1, section.epochs)
    trainer = ddp(model, runtime)

    for epoch in range(start_epoch, section.epochs):
        set_epoch(loader, epoch)
        trainer.train()
        consistency_on = epoch >= section.consistency_start_epoch
        sums = {"loss": 0.0, "cls_cnn": 0.0, "cls_vit": 0.0, "consistency": 0.0}
        t0, seen = time.time(), 0
        for it, (images, targets, _) in enumerate(loader):
            step = epoch * steps_per_epoch + it
            lr = set_poly_lr(optimizer, section.lr, step, max_steps, section.poly_power)
            images, targets = images.to(runtime.device), targets.to(runtime.device)
            with runtime.autocast(section.amp):
                logits_cnn, cam_cnn, logits_vit, cam_vit = trainer(images)
            losses = cotraining_loss(logits_cnn.float(), logits_vit.float(), cam_cnn.float(), cam_vit.float(),
                                     targets, images.shape[-2:], section.cam_lambda, consistency_on)
            check_finite(losses["loss"], "train_cam", step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            for k in sums:
                sums[k] += float(losses[k])
            seen += images.shape[0]
        n = max(len(loader), 1)
        record = {k: round(v / n, 5) for k, v in sums.items()}
        record.update(epoch=epoch + 1, lr=lr, images_per_s=round(seen * runtime.world_size / (time.time() - t0), 2))
        if val_loader is not None:
            record["val_loss"] = round(_validation_loss(trainer, val_loader, runtime), 5)
        history.append(record)
        log.info("train_cam epoch %d/%d: loss %.4f (cls_cnn %.4f, cls_vit %.4f, consistency %.4f) lr %.2e "
                 "%.1f img/s%s", epoch + 1, section.epochs, record["loss"], record["cls_cnn"], record["cls_vit"],
                 record["consistency"], lr, record["images_per_s"],
                 f", val loss {record['val_loss']:.4f}" if "val_loss" in record else "")
        if runtime.is_main:
            artifacts.save_torch(ckpt_path, {"model": unwrap(trainer).state_dict(), "optimizer": optimizer.state_dict(),
                                             "epoch": epoch, "history": history, "fingerprint": ctx.fingerprint})
        runtime.barrier()

    if runtime.is_main:
        save_model(ctx.sess("cam_cnn.pth"), model.cnn, cnn_args)
        save_model(ctx.sess("cam_vit.pth"), model.vit, vit_args)
    return {"outputs": {"cam_cnn": str(ctx.sess("cam_cnn.pth")), "cam_vit": str(ctx.sess("cam_vit.pth")),
                        "train_images": len(train_ids)},
            "metrics": {"final_loss": history[-1]["loss"] if history else None,
                        "val_loss": history[-1].get("val_loss") if history else None}}
