"""train_irn: the inter-pixel relation network (boundary + displacement branches) on the IR labels.

Pair labels come from the IR labels at stride 4 within `radius`; loss as IRNet:
(bg_pos/2 + fg_pos/2 + neg)/2 + (dp_fg + dp_bg)/2. Writes sess/<run>/irn.pth (model_args +
state_dict); sess/<run>/train_irn_ckpt.pth after every epoch for resuming.
"""
from __future__ import annotations

import logging
import time

import cv2
import numpy as np
import torch

from pipeline import artifacts
from pipeline.errors import PipelineError
from pipeline.training import check_finite, copy_backbone_from_cam, ddp, resume_training, save_model, set_poly_lr, unwrap
from pipeline.transforms import SegmentationCropDataset, make_loader, set_epoch
from stages.cam_to_ir_label import ir_label_path

log = logging.getLogger("wsss")


def model_args(section) -> dict:
    return {"backbone": section.backbone, "pretrained": section.pretrained}


def build_irn(args: dict):
    from net.irn import IRNet

    return IRNet(**args)


def stride4_label(label: np.ndarray) -> np.ndarray:
    """Nearest-neighbour label map on the ⌈H/4⌉×⌈W/4⌉ grid of the network's outputs."""
    h, w = label.shape
    return cv2.resize(label, (-(-w // 4), -(-h // 4)), interpolation=cv2.INTER_NEAREST_EXACT)


def batch_pair_labels(labels: torch.Tensor, radius: int, device) -> dict[str, torch.Tensor]:
    from net.affinity import pair_labels

    per_image = [pair_labels(stride4_label(lab.numpy().astype(np.uint8)), radius) for lab in labels]
    return {k: torch.from_numpy(np.stack([p[k] for p in per_image])).to(device) for k in per_image[0]}


def run(ctx) -> dict:
    from net.irn import irn_losses, irn_total_loss

    section, data, runtime = ctx.section, ctx.data, ctx.runtime
    dataset = ctx.dataset
    ids = dataset.ids(data.train_split)
    missing = [i for i in ids if not ir_label_path(ctx, i).exists()]
    if missing:
        raise PipelineError(f"train_irn: {len(missing)} image(s) of train_split '{data.train_split}' have no IR label "
                            f"(e.g. {ir_label_path(ctx, missing[0])}); train_split must lie inside infer_split "
                            f"'{data.infer_split}'")
    args = model_args(section)
    model = build_irn(args).to(runtime.device)
    if section.init_from_cam:
        n = copy_backbone_from_cam(model.backbone, ctx.sess("cam_cnn.pth"), runtime.device)
        log.info("train_irn: backbone initialised from the CAM CNN branch (%d tensors)", n)
    train_set = SegmentationCropDataset(dataset, ids, lambda i: ir_label_path(ctx, i), section.crop_size,
                                        section.rescale, data.mean, data.std, seed=ctx.seed)
    loader = make_loader(train_set, section.batch_size, runtime, section.num_workers, shuffle=True, seed=ctx.seed)
    boundary_params, displacement_params = model.param_groups()
    optimizer = torch.optim.SGD(
        [{"params": boundary_params, "lr_mult": 1.0},
         {"params": displacement_params, "lr_mult": section.displacement_lr_mult}],
        lr=section.lr, momentum=section.momentum, weight_decay=section.weight_decay)
    max_steps = section.epochs * len(loader)
    ckpt_path = ctx.sess("train_irn_ckpt.pth")
    start_epoch, history = 0, []
    state = resume_training(ckpt_path, ctx.fingerprint, ctx.resume, model, optimizer, runtime.device)
    if state is not None:
        start_epoch, history = state["epoch"] + 1, state["history"]
    trainer = ddp(model, runtime)
    keys = ("bg_pos", "fg_pos", "neg", "dp_fg", "dp_bg")
    for epoch in range(start_epoch, section.epochs):
        set_epoch(loader, epoch)
        trainer.train()
        sums = dict.fromkeys(keys + ("loss",), 0.0)
        t0, seen = time.time(), 0
        for it, (images, labels, _) in enumerate(loader):
            lr = set_poly_lr(optimizer, section.lr, epoch * len(loader) + it, max_steps, section.poly_power)
            images = images.to(runtime.device)
            pairs = batch_pair_labels(labels, section.radius, runtime.device)
            boundary, displacement = trainer(images)
            losses = irn_losses(boundary, displacement, pairs, section.radius)
            loss = irn_total_loss(losses)
            check_finite(loss, "train_irn", epoch * len(loader) + it)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k in keys:
                sums[k] += float(losses[k])
            sums["loss"] += float(loss)
            seen += images.shape[0]
        record = {k: round(v / max(len(loader), 1), 5) for k, v in sums.items()}
        record.update(epoch=epoch + 1, lr=lr, images_per_s=round(seen * runtime.world_size / (time.time() - t0), 2))
        history.append(record)
        log.info("train_irn epoch %d/%d: loss %.4f (bg_pos %.4f fg_pos %.4f neg %.4f dp_fg %.4f dp_bg %.4f) "
                 "lr %.2e %.1f img/s", epoch + 1, section.epochs, record["loss"], *(record[k] for k in keys), lr,
                 record["images_per_s"])
        if runtime.is_main:
            artifacts.save_torch(ckpt_path, {"model": unwrap(trainer).state_dict(), "optimizer": optimizer.state_dict(),
                                             "epoch": epoch, "history": history, "fingerprint": ctx.fingerprint})
        runtime.barrier()
    if runtime.is_main:
        save_model(ctx.sess("irn.pth"), model, args)
    return {"outputs": {"irn": str(ctx.sess("irn.pth")), "train_images": len(ids)},
            "metrics": {"final_loss": history[-1]["loss"] if history else None}}
