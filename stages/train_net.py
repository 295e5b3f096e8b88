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

from dataclasses import fields

import torch

from engine.terms import Step, get_term, term_on
from net.registry import build_model, save_model
from pipeline.errors import PipelineError
from pipeline.trainer import Trainer, make_loader, optimizer_from_config, schedule_from_config
from pipeline.transforms import SingleStageCropDataset

log = logging.getLogger("wsss")


def model_args(section, num_classes: int) -> dict:
    """The arguments of `train_net.model`: a model class may define `args_from_config(section,
    num_classes)` for its own blocks (FSR's teacher, MiT's decoder); otherwise the ViT keys (and
    CTC's projection head when the ctc term has a weight)."""
    builder = model_builder(section.model)
    if hasattr(builder, "args_from_config"):
        return builder.args_from_config(section, num_classes)
    args = {"backbone": section.backbone, "num_classes": num_classes, "pretrained": section.pretrained,
            "aux_layer": section.aux_layer, "pos_embed_trainable": section.pos_embed_trainable,
            "seg_hidden": section.seg_hidden, "seg_dilation": section.seg_dilation}
    if section.losses.ctc.weight > 0:
        args.update(projection=dict(section.ctc.projection), projection_momentum=section.ctc.ema)
    return {**args, **section.model_kwargs}


def model_builder(kind: str):
    from net.registry import builder_of

    return builder_of(kind)


def used_terms(section) -> list[str]:
    """The terms of `train_net.losses` with a weight (the others are never computed)."""
    return [f.name for f in fields(section.losses) if getattr(section.losses, f.name).weight > 0]


class SingleStageLoss:
    """The loss of one iteration: one forward, then every term of `train_net.losses` that is on
    (engine/terms.py), summed with its weight. Holds the refiner between iterations."""

    def __init__(self, section, data, runtime):
        from engine.refine import LocalRefiner

        self.section, self.data, self.runtime = section, data, runtime
        r = section.refiner
        self.refiner = LocalRefiner(r.preset, dilations=r.dilations, iterations=r.iterations).to(runtime.device)
        self.terms, self.prepares = {}, {}
        for name in used_terms(section):
            self.terms[name], prepare = get_term(name)
            if prepare is not None:
                self.prepares[name] = prepare

    @torch.no_grad()
    def online_cams(self, net, images):
        """Multi-scale + flip CAMs and aux CAMs of the batch in [0, 1] at the input size (the
        network stays in training mode, as in the reference)."""
        from engine.multiscale import multiscale_cams

        return multiscale_cams(net.cam_pair, images, self.section.cam_scales, flip=True)

    @torch.no_grad()
    def pseudo_labels(self, images, cams, targets, boxes):
        from engine.refine import image_for_refiner_unit, refine_cams_with_refiner

        t = self.section.thresholds
        rgb = image_for_refiner_unit(images, self.data.mean, self.data.std)
        return refine_cams_with_refiner(self.refiner, rgb, cams, targets, t.high, t.low, boxes,
                                        down_scale=self.section.refiner.down_scale)

    def __call__(self, model, batch, step: int) -> dict:
        device = self.runtime.device
        images, targets, boxes = batch[0].to(device), batch[1].to(device), batch[2].to(device)
        net = model.module if hasattr(model, "module") else model
        losses = self.section.losses
        active = [name for name in self.terms if term_on(getattr(losses, name), step)]
        if not active:
            raise PipelineError(f"train_net: no loss term is on at iteration {step}; check train_net.losses")
        state = Step(model, net, images, targets, boxes, None, step, self.section, self.data, self, batch)
        if any(name in active for name in ("ptc", "seg", "reg", "ctc")):
            state.cams()         # the online CAMs come from the weights before this step's forward
        forward_args: dict = {}
        for name in active:
            if name in self.prepares:
                forward_args.update(self.prepares[name](state))
        state.out = model(images, **forward_args)
        terms = {name: self.terms[name](state) for name in active}
        total = sum(getattr(losses, name).weight * value for name, value in terms.items())
        return {"loss": total, **terms}


def run(ctx) -> dict:
    section, data, runtime = ctx.section, ctx.data, ctx.runtime
    dataset = ctx.dataset
    ids = dataset.ids(data.train_split)
    args = model_args(section, dataset.num_classes)
    model = build_model(section.model, args).to(runtime.device)
    builder = model_builder(section.model)
    if hasattr(builder, "train_dataset"):       # a method's own training views (FSR's two crops)
        train_set = builder.train_dataset(section, dataset, ids, data, ctx.seed)
    else:
        train_set = SingleStageCropDataset(dataset, ids, section.crop_size, section.rescale, data.mean, data.std,
                                           {"jitter_p": section.augment.jitter_p, "gray_p": section.augment.gray_p,
                                            "blur_p": section.augment.blur_p}, seed=ctx.seed,
                                           views=section.losses.ctc.weight > 0)
    loader = make_loader(train_set, section.batch_size, runtime, section.num_workers, shuffle=True, seed=ctx.seed,
                         key="train_net.batch_size")
    if hasattr(model, "optimizer_groups"):      # the network's own groups (AFA/TSCD: frozen norms; FSR: weight-decay exclusions)
        groups = model.optimizer_groups(section)
    else:
        encoder, heads = model.param_groups()
        groups = [{"params": encoder, "lr_mult": 1.0}, {"params": heads, "lr_mult": section.head_lr_mult}]
    losses = SingleStageLoss(section, data, runtime)
    opt = section.optimizer

    def after_step(done: int, trained) -> None:
        """The network's own per-step updates (EMA teachers), after the optimiser step."""
        hook = getattr(trained, "after_step", None)
        if hook is not None:
            hook(done, section.iterations)

    history = Trainer(ctx, model, loader, optimizer_from_config(opt, groups), losses, max_steps=section.iterations,
                      base_lr=opt.lr, schedule=schedule_from_config(opt), lr_key="train_net.optimizer.lr",
                      amp=section.amp, checkpoint_every=section.checkpoint_every, log_every=section.log_every,
                      after_step=after_step, find_unused=True).fit()
    if runtime.is_main:
        save_model(ctx.artifacts.weights.path("net"), model, section.model, {**args, "pretrained": False})
    return {"outputs": {"net": str(ctx.artifacts.weights.path("net")), "train_images": len(ids)},
            "metrics": {"final_loss": history[-1]["loss"] if history else None}}


def expected_outputs(ctx):
    return [ctx.artifacts.weights.path("net")]


def check(ctx) -> None:
    section = ctx.section
    for name in used_terms(section):
        get_term(name)          # a term this version lacks is an error before anything runs
    builder = model_builder(section.model)
    if hasattr(builder, "check_config"):        # a method's own config rules (FSR's mask grid)
        builder.check_config(section)
    if section.losses.ctc.weight > 0 and section.ctc.local_crops and section.ctc.local_size >= section.crop_size:
        raise PipelineError(f"train_net.ctc.local_size: {section.ctc.local_size}-px local crops need a larger "
                            f"train_net.crop_size than {section.crop_size}")
