"""train_irn: the inter-pixel relation network (boundary + displacement branches) on the IR labels.

Pair labels come from the IR labels at stride 4 within `radius`; loss as IRNet:
(bg_pos/2 + fg_pos/2 + neg)/2 + (dp_fg + dp_bg)/2. Writes the weights `irn`; the one trainer
checkpoints after every epoch.
"""
from __future__ import annotations

import logging

import cv2
import numpy as np
import torch

from net.backbone import copy_backbone_from
from net.registry import build_model, read_model_file, save_model
from pipeline.errors import PipelineError
from pipeline.trainer import Trainer, make_loader, optimizer_from_config, schedule_from_config
from pipeline.transforms import SegmentationCropDataset

log = logging.getLogger("wsss")


def model_args(section) -> dict:
    return {"backbone": section.backbone, "pretrained": section.pretrained,
            "dilate_last_stage": section.dilate_last_stage}


def stride4_label(label: np.ndarray) -> np.ndarray:
    """Nearest-neighbour label map on the ⌈H/4⌉×⌈W/4⌉ grid of the network's outputs."""
    h, w = label.shape
    return cv2.resize(label, (-(-w // 4), -(-h // 4)), interpolation=cv2.INTER_NEAREST_EXACT)


def batch_pair_labels(labels: torch.Tensor, radius: int, device, cropped_sources: bool = True) -> dict[str, torch.Tensor]:
    from net.affinity import pair_labels

    per_image = [pair_labels(stride4_label(lab.numpy().astype(np.uint8)), radius, cropped_sources)
                 for lab in labels]
    return {k: torch.from_numpy(np.stack([p[k] for p in per_image])).to(device) for k in per_image[0]}


@torch.no_grad()
def set_displacement_mean(model, dataset, ids, data, runtime) -> None:
    """As the reference: after training, one pass over the infer split (this rank's share, then
    averaged over ranks) sets the mean displacement that inference subtracts."""
    from pipeline.runtime import progress
    from pipeline.transforms import normalize, to_tensor

    model.eval()
    total, count = torch.zeros(2, dtype=torch.float64), 0
    for image_id in progress(runtime.shard(ids), "train_irn (displacement mean)", enabled=runtime.is_main):
        image = to_tensor(normalize(dataset.load_image(image_id), data.mean, data.std))[None].to(runtime.device)
        _, displacement = model(image, centre=False)
        total += displacement.mean(dim=(0, 2, 3)).double().cpu()
        count += 1
    means = [runtime.all_reduce_sum(float(v)) for v in total]
    count = runtime.all_reduce_sum(float(count))
    model.displacement_centering.running_mean.copy_(torch.tensor(means) / max(count, 1.0))
    log.info("train_irn: mean displacement (%.4f, %.4f) over %d images", *(m / max(count, 1.0) for m in means),
             int(count))


def run(ctx) -> dict:
    from net.irn import irn_losses, irn_total_loss

    section, data, runtime = ctx.section, ctx.data, ctx.runtime
    dataset, ir_labels = ctx.dataset, ctx.artifacts.ir_label
    ids = dataset.ids(data.train_split)
    missing = ir_labels.missing(ids)
    if missing:
        raise PipelineError(f"train_irn: {len(missing)} image(s) of train_split '{data.train_split}' have no IR label "
                            f"(e.g. {ir_labels.path(missing[0])}); train_split must lie inside infer_split "
                            f"'{data.infer_split}'")
    args = model_args(section)
    model = build_model("irn", args).to(runtime.device)
    model.displacement_centering.track_in_training = section.displacement_mean == "running"
    if section.init_from_cam:
        copy_backbone_from(model.backbone, ctx.artifacts.weights.path("cam_cnn"), runtime.device)
    train_set = SegmentationCropDataset(dataset, ids, ir_labels, section.crop_size, section.rescale,
                                        data.mean, data.std, seed=ctx.seed)
    loader = make_loader(train_set, section.batch_size, runtime, section.num_workers, shuffle=True, seed=ctx.seed,
                         key="train_irn.batch_size")
    boundary_params, displacement_params = model.param_groups()
    groups = [{"params": boundary_params, "lr_mult": 1.0},
              {"params": displacement_params, "lr_mult": section.displacement_lr_mult}]

    def losses(trainer_model, batch, step):
        images = batch[0].to(runtime.device)
        pairs = batch_pair_labels(batch[1], section.radius, runtime.device, section.pair_sources == "cropped")
        boundary, displacement = trainer_model(images)
        terms = irn_losses(boundary, displacement, pairs, section.radius)
        return {"loss": irn_total_loss(terms), **terms}

    opt = section.optimizer
    history = Trainer(ctx, model, loader, optimizer_from_config(opt, groups), losses,
                      max_steps=section.epochs * len(loader), base_lr=opt.lr, schedule=schedule_from_config(opt),
                      lr_key="train_irn.optimizer.lr").fit()
    if section.displacement_mean == "inference_pass":
        set_displacement_mean(model, dataset, dataset.ids(data.infer_split), data, runtime)
    if runtime.is_main:
        save_model(ctx.artifacts.weights.path("irn"), model, "irn", args)
    return {"outputs": {"irn": str(ctx.artifacts.weights.path("irn")), "train_images": len(ids)},
            "metrics": {"final_loss": history[-1]["loss"] if history else None}}


def expected_outputs(ctx):
    return [ctx.artifacts.weights.path("irn")]


def check(ctx) -> None:
    if ctx.section.init_from_cam:
        read_model_file(ctx.artifacts.weights.path("cam_cnn"), "cpu", expect="resnet_cam")
