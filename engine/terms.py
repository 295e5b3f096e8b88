"""The loss terms of the single-stage engine, by registry: one function per name in
`train_net.losses`, given the iteration's shared `Step` and returning a scalar tensor.

    @register_term("scd")
    def scd(step: Step) -> Tensor:
        cams = step.cams()               # multi-scale + flip CAMs of the batch, computed once
        ...

The driver (stages/train_net.py) runs one forward of the network (`step.out`), then each term
that is on at this iteration (weight > 0, inside [start, end)); a term that is off costs
nothing, and the parts several terms share (online CAMs, refined pseudo labels, upsampled
segmentation logits) are computed on the first request and kept for the others. A method's own
terms live in its own module, listed in `TERM_MODULES` so that importing this module registers
them all.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import PipelineError

TermFn = Callable[["Step"], Tensor]
PrepareFn = Callable[["Step"], dict]
_TERMS: dict[str, TermFn] = {}
_PREPARE: dict[str, PrepareFn] = {}
# modules whose import registers more terms (the other methods' parts)
TERM_MODULES: tuple[str, ...] = ("engine.fsr", "engine.affinity_terms", "engine.scd")


def register_term(name: str, prepare: PrepareFn | None = None):
    """`prepare(step)`, when given, runs before the forward and returns keyword arguments for
    it (extra views whose outputs the term needs: inside the forward, DDP sees them)."""
    def decorator(fn: TermFn) -> TermFn:
        if name in _TERMS and _TERMS[name] is not fn:
            raise ValueError(f"loss term {name!r} is registered twice")
        _TERMS[name] = fn
        if prepare is not None:
            _PREPARE[name] = prepare
        return fn
    return decorator


LabelHook = Callable[["Step", Tensor], "Tensor | None"]
_LABEL_HOOKS: list[LabelHook] = []


def register_label_hook(fn: LabelHook) -> LabelHook:
    """`fn(step, labels) -> labels or None` may rewrite an iteration's segmentation target (what
    `Step.seg_labels` gives the seg and reg terms; AFA's affinity-propagated labels). Every
    registered hook runs, in registration order, and reads the config itself to decide whether
    it is on (None: unchanged)."""
    if fn not in _LABEL_HOOKS:
        _LABEL_HOOKS.append(fn)
    return fn


def _load_term_modules() -> None:
    for module in TERM_MODULES:
        importlib.import_module(module)


def label_hooks() -> tuple[LabelHook, ...]:
    _load_term_modules()
    return tuple(_LABEL_HOOKS)


def get_term(name: str) -> tuple[TermFn, PrepareFn | None]:
    """(term, its prepare or None)."""
    _load_term_modules()
    if name not in _TERMS:
        raise PipelineError(f"train_net.losses.{name}: no such loss term in this version of the toolkit "
                            f"(terms: {', '.join(sorted(_TERMS))})")
    return _TERMS[name], _PREPARE.get(name)


def term_on(term, step: int) -> bool:
    """A loss term is computed only inside its [start, end) iterations and with a weight."""
    return term.weight > 0 and step >= term.start and (term.end == 0 or step < term.end)


class Step:
    """One iteration as the loss terms see it.

    batch      the loader's batch as it came (extra views after the first four entries)
    model      the network as trained (DDP-wrapped under torchrun): forward with gradient
    net        the same network unwrapped (its heads, teachers and helpers)
    images, targets, boxes   the batch: normalised crops, multi-hot labels, valid boxes (top, bottom, left, right)
    out        the network's output on `images` (one forward, with gradient)
    iteration  the iteration index; section, data: the config's train_net and data blocks
    engine     the loss driver: its refiner and anything a term keeps between iterations
    """

    def __init__(self, model, net, images: Tensor, targets: Tensor, boxes: Tensor, out: Any, iteration: int,
                 section, data, engine, batch: tuple = ()):
        self.model, self.net, self.images, self.targets, self.boxes = model, net, images, targets, boxes
        self.batch = batch
        self.out, self.iteration, self.section, self.data, self.engine = out, iteration, section, data, engine
        self._cache: dict[str, Any] = {}

    def keep(self, key: str, value: Any) -> Any:
        """Something a term's prepare hands to the term (e.g. CTC's crop flags)."""
        self._cache[key] = value
        return value

    def kept(self, key: str) -> Any:
        return self._cache[key]

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def cams(self) -> Tensor:
        """Multi-scale + flip CAMs of the batch in [0, 1] at the input size (no gradient)."""
        return self._online()[0]

    def aux_cams(self) -> Tensor:
        return self._online()[1]

    def _online(self) -> tuple[Tensor, Tensor]:
        return self._once("cams", lambda: self.engine.online_cams(self.net, self.images))

    def pseudo_labels(self) -> Tensor:
        """The refined two-threshold pseudo labels (B, H, W): 0 background, 1..C, 255 ignore."""
        return self._once("labels", lambda: self.engine.pseudo_labels(self.images, self.cams(), self.targets,
                                                                      self.boxes))

    def seg_labels(self) -> Tensor:
        """The segmentation target (B, H, W): the pseudo labels, as rewritten by any label hook
        that is on (`register_label_hook`)."""
        def make() -> Tensor:
            labels = self.pseudo_labels()
            for hook in label_hooks():
                rewritten = hook(self, labels)
                labels = labels if rewritten is None else rewritten
            return labels
        return self._once("seg_labels", make)

    def seg_logits(self) -> Tensor:
        """The segmentation logits upsampled to the input size (with gradient), bilinearly with the
        network's `seg_align_corners` (default False; TSCD True)."""
        corners = bool(getattr(self.net, "seg_align_corners", False))
        return self._once("seg", lambda: F.interpolate(self.out.seg.float(), size=self.images.shape[-2:],
                                                       mode="bilinear", align_corners=corners))


# ----------------------------------------------------------------------------- ToCo's terms


@register_term("cls")
def cls_term(step: Step) -> Tensor:
    return F.multilabel_soft_margin_loss(step.out.logits.float(), step.targets)


@register_term("cls_aux")
def cls_aux_term(step: Step) -> Tensor:
    return F.multilabel_soft_margin_loss(step.out.aux_logits.float(), step.targets)


@register_term("ptc")
def ptc_term(step: Step) -> Tensor:
    from engine.losses import ptc_loss
    from engine.pseudo import token_labels

    t = step.section.thresholds
    grid = tuple(step.out.patch.shape[-2:])
    labels = token_labels(step.aux_cams(), step.targets, grid, t.high, t.low, t.bkg, step.boxes,
                          step.net.patch_size, box_in_pixels=step.section.ptc.box_in_pixels)
    return ptc_loss(step.out.patch.float(), labels)


@register_term("seg")
def seg_term(step: Step) -> Tensor:
    from engine.losses import balanced_seg_ce

    return balanced_seg_ce(step.seg_logits(), step.seg_labels())


@register_term("reg")
def reg_term(step: Step) -> Tensor:
    from engine.regulariser import dense_energy_loss

    r = step.section.reg
    return dense_energy_loss(step.images, torch.softmax(step.seg_logits(), dim=1), step.seg_labels(),
                             step.boxes, step.data.mean, step.data.std, sigma_rgb=r.sigma_rgb, sigma_xy=r.sigma_xy,
                             scale=r.scale, weight=r.inner_weight, max_pixels=r.max_pixels)


def ctc_prepare(step: Step) -> dict:
    """CTC's views (toco.md §2.4): global view 2 and the local crops, cut from the local-source
    image around pixels the aux CAMs do not call confident foreground."""
    from engine.crops import local_roi, select_local_crops

    if len(step.batch) < 7:
        raise PipelineError("train_net.losses.ctc: the batch carries no contrast views (a data set built "
                            "without views=True)")
    device = step.images.device
    second, source, mirrored = (x.to(device) for x in step.batch[4:7])
    c, t = step.section.ctc, step.section.thresholds
    roi = local_roi(step.aux_cams(), step.targets, low=t.low, high=t.high)
    crops = select_local_crops(source, roi, num_crops=c.local_crops, crop_size=c.local_size,
                               negative_ratio=c.negative_ratio, num_global=2, relative_flip=mirrored,
                               local_view_independent_flip=c.independent_flip)
    step.keep("ctc_flags", crops.flags)
    views = [second]
    if c.local_crops:
        views.append(crops.crops.reshape(-1, *crops.crops.shape[2:]))
    return {"views": views}


@register_term("ctc", prepare=ctc_prepare)
def ctc_term(step: Step) -> Tensor:
    """Student: the projection head on every view's class token; teacher: the EMA head (updated
    first, momentum `ctc.ema`) on the stop-gradient class tokens of the two global views."""
    from engine.losses import ctc_loss

    c, net = step.section.ctc, step.net
    net.teacher_projection.update(net.projection)
    teacher = net.teacher_projection(step.out.view_cls[:, :2].detach().float())
    return ctc_loss(step.out.projected.float(), teacher, step.kept("ctc_flags").float(),
                    temperature=c.temperature, extra_negative_term=c.extra_negative_term)
