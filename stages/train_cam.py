"""train_cam: CRT's dual-branch co-training of a CNN CAM branch and a transformer CAM branch.

Loss = MLSM(cnn logits) + MLSM(vit logits) + λ · mean|CAM_cnn↑ − CAM_vit↑| (from epoch
`consistency_start_epoch`), where ↑ is bilinear upsampling of the raw CAMs to the crop; both
branches learn from the last term unless `consistency_teacher` names one to leave alone.
Writes the weights cam_cnn and cam_vit (the catalogue's `weights` kind); the one trainer
checkpoints after every epoch, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from net.registry import build_model, save_model
from pipeline.trainer import Trainer, make_loader, optimizer_from_config, schedule_from_config
from pipeline.transforms import ClassificationDataset

log = logging.getLogger("wsss")


def cnn_model_args(section, num_classes: int) -> dict:
    return {"backbone": section.cnn.backbone, "num_classes": num_classes,
            "pretrained": section.cnn.pretrained, "output_stride": section.cnn.output_stride,
            "dilate_last_stage": section.cnn.dilate_last_stage, "freeze_bn": section.cnn.freeze_bn,
            "bn_affine_trainable": section.cnn.bn_affine_trainable,
            "freeze_early_stages": section.cnn.freeze_early_stages}


def vit_model_args(section, num_classes: int) -> dict:
    return {"name": section.vit.name, "num_classes": num_classes, "pretrained": section.vit.pretrained,
            "window": section.vit.window, "recurrence": section.vit.recurrence,
            "residual_first_pass": section.vit.residual_first_pass, "window_padding": section.vit.window_padding,
            **section.vit.model_kwargs}


def cotraining_loss(logits_cnn, logits_vit, cam_cnn, cam_vit, targets, size, cam_lambda: float,
                    consistency_on: bool, align_corners: bool = True,
                    teacher: str = "none") -> dict[str, torch.Tensor]:
    """The three CRT loss terms and their sum. Raw CAMs are upsampled to `size` (H, W), with
    `align_corners` as the reference (True). With `teacher` "none" (the reference) both branches
    learn from the consistency term; "cnn" or "vit" stops its gradient into that branch, whose
    CAM is then a fixed target for the other."""
    cls_cnn = F.multilabel_soft_margin_loss(logits_cnn, targets)
    cls_vit = F.multilabel_soft_margin_loss(logits_vit, targets)
    if teacher not in ("none", "cnn", "vit"):
        raise ValueError(f"consistency teacher must be none, cnn or vit, got {teacher!r}")
    if consistency_on and cam_lambda > 0:
        cam_cnn = cam_cnn.detach() if teacher == "cnn" else cam_cnn
        cam_vit = cam_vit.detach() if teacher == "vit" else cam_vit
        up_cnn = F.interpolate(cam_cnn, size=size, mode="bilinear", align_corners=align_corners)
        up_vit = F.interpolate(cam_vit, size=size, mode="bilinear", align_corners=align_corners)
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
    return [{"params": cnn_backbone + vit_backbone, "lr_mult": 1.0},
            {"params": cnn_head + vit_head, "lr_mult": section.head_lr_mult}]


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
    num_classes = dataset.num_classes

    cnn_args, vit_args = cnn_model_args(section, num_classes), vit_model_args(section, num_classes)
    model = CoTrainer(build_model("resnet_cam", cnn_args), build_model("vit_cam", vit_args)).to(runtime.device)
    train_set = ClassificationDataset(dataset, train_ids, section.crop_size, section.resize_long,
                                      data.mean, data.std, train=True, seed=ctx.seed,
                                      interpolation=section.interpolation)
    loader = make_loader(train_set, section.batch_size, runtime, section.num_workers, shuffle=True, seed=ctx.seed,
                         key="train_cam.batch_size")
    val_loader = None
    if section.validate and data.val_split:
        val_set = ClassificationDataset(dataset, dataset.ids(data.val_split), section.crop_size, section.resize_long,
                                        data.mean, data.std, train=False, interpolation=section.interpolation)
        val_loader = make_loader(val_set, section.batch_size, runtime, 0, shuffle=False, seed=ctx.seed,
                                 drop_last=False, key="train_cam.batch_size")
    steps_per_epoch = len(loader)

    def losses(trainer_model, batch, step):
        images, targets = batch[0].to(runtime.device), batch[1].to(runtime.device)
        logits_cnn, cam_cnn, logits_vit, cam_vit = trainer_model(images)
        consistency_on = step // steps_per_epoch >= section.consistency_start_epoch
        return cotraining_loss(logits_cnn.float(), logits_vit.float(), cam_cnn.float(), cam_vit.float(),
                               targets, images.shape[-2:], section.cam_lambda, consistency_on,
                               section.consistency_align_corners, section.consistency_teacher)

    def validate(epoch, trainer_model):
        return {"val_loss": round(_validation_loss(trainer_model, val_loader, runtime), 5)} if val_loader else {}

    opt = section.optimizer
    history = Trainer(ctx, model, loader, optimizer_from_config(opt, _param_groups(model, section)), losses,
                      max_steps=section.epochs * steps_per_epoch, base_lr=opt.lr, schedule=schedule_from_config(opt),
                      lr_key="train_cam.optimizer.lr", amp=section.amp, on_epoch_end=validate).fit()
    if runtime.is_main:
        save_model(ctx.artifacts.weights.path("cam_cnn"), model.cnn, "resnet_cam", cnn_args)
        save_model(ctx.artifacts.weights.path("cam_vit"), model.vit, "vit_cam", vit_args)
    return {"outputs": {"cam_cnn": str(ctx.artifacts.weights.path("cam_cnn")),
                        "cam_vit": str(ctx.artifacts.weights.path("cam_vit")), "train_images": len(train_ids)},
            "metrics": {"final_loss": history[-1]["loss"] if history else None,
                        "val_loss": history[-1].get("val_loss") if history else None}}


def expected_outputs(ctx):
    return [ctx.artifacts.weights.path("cam_cnn"), ctx.artifacts.weights.path("cam_vit")]
