"""train_net: the single-stage network (ToCo's engine, shared by FSR and TSD-CAM), trained end to
end on image-level labels with online pseudo labels (methods/toco.md §2-§5).

Per iteration: the multi-scale + flip CAMs and aux CAMs of the batch (no gradient, the current
model); pseudo labels from the CAMs refined by the local refiner (two background planes); one
forward; the enabled loss terms, each with its weight and [start, end) iterations (a term that is
off is not computed):
    cls, cls_aux   multilabel soft margin on the max-pooled classifiers
    ptc            patch token contrast against the aux-CAM token labels
    ctc            class token contrast of global and local views (EMA projection head)
    seg            balanced cross-entropy of the segmentation head on the refined pseudo labels
    reg            the dense-energy regulariser on the segmentation softmax
AdamW with the heads at `head_lr_mult` × lr, linear warm-up then poly. Writes the weights `net`;
the one trainer checkpoints every `checkpoint_every` iterations.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from net.registry import build_model, save_model
from pipeline.errors import PipelineError
from pipeline.trainer import Trainer, make_loader, optimizer_from_config, schedule_from_config
from pipeline.transforms import SingleStageCropDataset

log = logging.getLogger("wsss")


def model_args(section, num_classes: int) -> dict:
    args = {"backbone": section.backbone, "num_classes": num_classes, "pretrained": section.pretrained,
            "aux_layer": section.aux_layer, "pos_embed_trainable": section.pos_embed_trainable,
            "seg_hidden": section.seg_hidden, "seg_dilation": section.seg_dilation, **section.model_kwargs}
    return args


def term_on(term, step: int) -> bool:
    """A loss term is computed only inside its [start, end) iterations and with a weight."""
    return term.weight > 0 and step >= term.start and (term.end == 0 or step < term.end)


class SingleStageLoss:
    """The loss of one training iteration; holds the refiner and the teacher head between steps."""

    def __init__(self, section, data, model, runtime):
        from engine.refine import LocalRefiner

        self.section, self.data, self.runtime = section, data, runtime
        r = section.refiner
        self.refiner = LocalRefiner(r.preset, dilations=r.dilations, iterations=r.iterations).to(runtime.device)
        self.teacher_head = None
        if model.projection is not None:
            import copy

            self.teacher_head = copy.deepcopy(model.projection).to(runtime.device)
            for p in self.teacher_head.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def online_cams(self, model, images):
        """Multi-scale + flip CAMs and aux CAMs of the batch in [0, 1] at the input size."""
        from engine.multiscale import multiscale_cams

        return multiscale_cams(model.cam_pair, images, self.section.cam_scales, flip=True)

    @torch.no_grad()
    def pseudo_labels(self, images, cams, targets, boxes):
        from engine.refine import image_for_refiner, refine_cams_with_refiner

        t = self.section.thresholds
        rgb = image_for_refiner(images, self.data.mean, self.data.std)
        return refine_cams_with_refiner(self.refiner, rgb, cams, targets, t.high, t.low, boxes,
                                        down_scale=self.section.refiner.down_scale)

    def __call__(self, model, batch, step: int) -> dict:
        s, device = self.section, self.runtime.device
        images, targets, boxes = batch[0].to(device), batch[1].to(device), batch[2].to(device)
        net = model.module if hasattr(model, "module") else model
        losses = s.losses
        need_cams = any(term_on(getattr(losses, k), step) for k in ("ptc", "ctc", "seg", "reg"))
        cams = aux_cams = None
        if need_cams:
            cams, aux_cams = self.online_cams(net, images)
        out = model(images)
        terms: dict[str, torch.Tensor] = {}
        if term_on(losses.cls, step):
            terms["cls"] = F.multilabel_soft_margin_loss(out.logits.float(), targets)
        if term_on(losses.cls_aux, step):
            terms["cls_aux"] = F.multilabel_soft_margin_loss(out.aux_logits.float(), targets)
        if term_on(losses.ptc, step):
            terms["ptc"] = self.ptc(out, aux_cams, targets, boxes)
        if term_on(losses.seg, step) or term_on(losses.reg, step):
            labels = self.pseudo_labels(images, cams, targets, boxes)
            seg = F.interpolate(out.seg.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
            if term_on(losses.seg, step):
                from engine.losses import balanced_seg_ce

                terms["seg"] = balanced_seg_ce(seg, labels)
            if term_on(losses.reg, step):
                terms["reg"] = self.reg(images, seg, labels, boxes)
        if not terms:
            raise PipelineError(f"train_net: no loss term is on at iteration {step}; check train_net.losses")
        total = sum(getattr(losses, name).weight * value for name, value in terms.items())
        return {"loss": total, **terms}

    def ptc(self, out, aux_cams, targets, boxes):
        from engine.losses import ptc_loss
        from engine.pseudo import token_labels

        t = self.section.thresholds
        grid = out.patch.shape[-2:]
        labels = token_labels(aux_cams, targets, tuple(grid), t.high, t.low, t.bkg, boxes,
                              self.net_patch_size, box_in_pixels=self.section.ptc.box_in_pixels)
        return ptc_loss(out.patch.float(), labels)

    def reg(self, images, seg_logits, labels, boxes):
        from engine.regulariser import dense_energy_loss

        r = self.section.reg
        return dense_energy_loss(images, torch.softmax(seg_logits, dim=1), labels, boxes, self.data.mean,
                                 self.data.std, sigma_rgb=r.sigma_rgb, sigma_xy=r.sigma_xy, scale=r.scale,
                                 weight=r.inner_weight, max_pixels=r.max_pixels)


def run(ctx) -> dict:
    section, data, runtime = ctx.section, ctx.data, ctx.runtime
    dataset = ctx.dataset
    ids = dataset.ids(data.train_split)
    args = model_args(section, dataset.num_classes)
    model = build_model("single_stage_vit", args).to(runtime.device)
    train_set = SingleStageCropDataset(dataset, ids, section.crop_size, section.rescale, data.mean, data.std,
                                       {"jitter_p": section.augment.jitter_p, "gray_p": section.augment.gray_p,
                                        "blur_p": section.augment.blur_p}, seed=ctx.seed)
    loader = make_loader(train_set, section.batch_size, runtime, section.num_workers, shuffle=True, seed=ctx.seed,
                         key="train_net.batch_size")
    encoder, heads = model.param_groups()
    groups = [{"params": encoder, "lr_mult": 1.0}, {"params": heads, "lr_mult": section.head_lr_mult}]
    losses = SingleStageLoss(section, data, model, runtime)
    losses.net_patch_size = model.backbone.patch_size
    opt = section.optimizer
    history = Trainer(ctx, model, loader, optimizer_from_config(opt, groups), losses, max_steps=section.iterations,
                      base_lr=opt.lr, schedule=schedule_from_config(opt), lr_key="train_net.optimizer.lr",
                      amp=section.amp, checkpoint_every=section.checkpoint_every, log_every=section.log_every).fit()
    if runtime.is_main:
        save_model(ctx.artifacts.weights.path("net"), model, "single_stage_vit", {**args, "pretrained": False})
    return {"outputs": {"net": str(ctx.artifacts.weights.path("net")), "train_images": len(ids)},
            "metrics": {"final_loss": history[-1]["loss"] if history else None}}


def expected_outputs(ctx):
    return [ctx.artifacts.weights.path("net")]


def check(ctx) -> None:
    if ctx.section.losses.ctc.weight > 0:
        raise PipelineError("train_net.losses.ctc: class token contrast (CTC) is not in this version of the "
                            "toolkit yet; set train_net.losses.ctc.weight: 0")
