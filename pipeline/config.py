"""Typed, strictly validated configuration.

The schema is a tree of dataclasses. A YAML file is merged over the defaults,
then `--set a.b=value` overrides (values parsed as YAML scalars/lists), then the
result is validated: an unknown key, a wrong type or a bad value raises a
ConfigError naming the dotted key. The resolved config is dumped with every run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pipeline.errors import PipelineError


class ConfigError(PipelineError):
    pass


# ----------------------------------------------------------------------------- schema
# Defaults are the reference CRT / IRNet / DeepLabv2 hyperparameters (SPEC.md), so
# configs/voc12.yaml only needs paths; the demo config shrinks the models. A field's value
# check sits with the field (`checked(default, RULE)`) and is applied to every value, the
# defaults included.

Rule = tuple[typing.Callable[[Any], bool], str]
POSITIVE: Rule = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE: Rule = (lambda v: v >= 0, "must be >= 0")
UNIT: Rule = (lambda v: 0.0 <= v <= 1.0, "must be within [0, 1]")
MOMENTUM: Rule = (lambda v: 0.0 <= v < 1.0, "must be within [0, 1)")
SCALES: Rule = (lambda v: len(v) > 0 and all(s > 0 for s in v), "must be a non-empty list of positive numbers")
EXTRA_SCALES: Rule = (lambda v: all(s > 0 for s in v), "must be a list of positive numbers (empty: one scale)")
RATES: Rule = (lambda v: len(v) > 0 and all(isinstance(r, int) and r > 0 for r in v),
               "must be a non-empty list of positive integers")
RANGE: Rule = (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "must be [low, high] with 0 < low <= high")
RGB: Rule = (lambda v: len(v) == 3, "must have 3 values (RGB)")
NAME: Rule = (lambda v: v != "" and "/" not in v and "\\" not in v and v not in (".", ".."),
              "must be a plain, non-empty folder name")


def checked(default, rule: Rule | None = None):
    """A dataclass field with its value check; lists, dicts and sections get a factory."""
    metadata = {"check": rule} if rule else {}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=metadata)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: dataclasses.replace(d), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class OptimizerConfig:
    """The optimiser block every training stage shares. lr(step) = lr × schedule(step) × the
    parameter group's multiplier."""
    kind: Literal["sgd", "adamw"] = "sgd"
    lr: float = checked(0.1, POSITIVE)
    # CRT/IRNet pass weight decay into SGD's momentum slot, so they train with momentum 1e-4:
    # 1e-4 reproduces them, 0.9 is plain SGD. Unused by AdamW.
    momentum: float = checked(1e-4, MOMENTUM)
    weight_decay: float = checked(1e-4, NON_NEGATIVE)
    schedule: Literal["poly", "warmup_poly", "warmup_cosine"] = "poly"
    poly_power: float = checked(0.9, POSITIVE)
    warmup_steps: int = checked(0, NON_NEGATIVE)
    warmup_start: float = checked(1e-6, UNIT)    # lr factor at step 0 of the warm-up
    # warmup_poly: the poly decay counts steps from 0 over the whole run (AFA / TSCD's PolyWarmupAdamW:
    # the factor drops from 1 to (1 - warmup/max)^power at the warm-up's end), not from the warm-up's end
    poly_from_zero: bool = False


@dataclass
class CrfParams:
    """Dense-CRF parameters (pydensecrf): Gaussian and bilateral pairwise terms."""
    iters: int = checked(10, POSITIVE)
    gauss_sxy: float = checked(3.0, POSITIVE)
    gauss_compat: float = checked(3.0, NON_NEGATIVE)
    bilat_sxy: float = checked(50.0, POSITIVE)
    bilat_srgb: float = checked(5.0, POSITIVE)
    bilat_compat: float = checked(10.0, NON_NEGATIVE)


@dataclass
class RandomWalkParams:
    """The IRN random walk: affinity (1 − max boundary on the path)^beta within `radius`,
    propagated 2^exp_times times."""
    radius: int = checked(5, POSITIVE)
    beta: float = checked(10.0, POSITIVE)
    exp_times: int = checked(8, NON_NEGATIVE)


@dataclass
class DataConfig:
    dataset: str = "voc12"              # a registered layout: voc12, coco, folder (dataset/registry.py)
    root: str = "data/VOCdevkit/VOC2012"
    train_split: str = "train_aug"      # train_cam, train_irn
    infer_split: str = "train_aug"      # make_cam .. make_sem_seg, export, train_deeplab
    eval_split: str = "train"           # eval_cam, eval_sem_seg
    val_split: str = "val"              # test_deeplab, crf; validation loss of train_cam
    mean: list[float] = checked([0.485, 0.456, 0.406], RGB)
    std: list[float] = checked([0.229, 0.224, 0.225], RGB)


@dataclass
class CNNBranchConfig:
    # torchvision's original ImageNet weights, as the reference (timm's default tags for resnet50/101/152
    # are timm's own recipes, with other features)
    backbone: str = "resnet152.tv_in1k"
    pretrained: Union[bool, str] = True
    output_stride: Literal[8, 16, 32] = 16
    # The reference reaches stride 16 by removing the last stage's stride without dilating it
    # (timm's output_stride=16 dilates it): false reproduces the reference.
    dilate_last_stage: bool = False
    # The reference freezes BatchNorm statistics and the stem/layer1/layer2 of its ImageNet backbone;
    # switch both off only for random-init backbones (the CPU demo).
    freeze_bn: bool = True
    # With frozen statistics, the reference still trains the BatchNorm scale and shift of the
    # later stages (only the stem is fully frozen): true reproduces it.
    bn_affine_trainable: bool = True
    freeze_early_stages: bool = True


@dataclass
class ViTBranchConfig:
    name: str = "deit_small_patch16_224"
    pretrained: Union[bool, str] = True
    window: int = checked(224, POSITIVE)
    recurrence: int = checked(3, POSITIVE)
    # CRT's code adds the outer residual x = x + blocks(x) on every pass, the first included
    # (true); false makes recurrence 1 exactly timm's ViT.
    residual_first_pass: bool = True
    # "reference": each side padded to (side // (window/2) + 1) * (window/2), so a side that is
    # already a multiple still gets a full extra half window, as CRT's code does; "minimal":
    # padded to the next multiple of window/2.
    window_padding: Literal["reference", "minimal"] = "reference"
    model_kwargs: dict[str, Any] = checked({})


@dataclass
class TrainCamConfig:
    enabled: bool = True
    cnn: CNNBranchConfig = checked(CNNBranchConfig())
    vit: ViTBranchConfig = checked(ViTBranchConfig())
    epochs: int = checked(10, POSITIVE)
    batch_size: int = checked(16, POSITIVE)       # global: split over the ranks under torchrun
    crop_size: int = checked(336, POSITIVE)
    resize_long: list[int] = checked([210, 420], RANGE)
    optimizer: OptimizerConfig = checked(OptimizerConfig())   # CRT: SGD; AdamW helps random-init ViTs
    head_lr_mult: float = checked(10.0, POSITIVE)
    cam_lambda: float = checked(0.1, NON_NEGATIVE)
    consistency_start_epoch: int = checked(1, NON_NEGATIVE)   # 0-based: CRT starts at the second epoch
    consistency_align_corners: bool = True   # the reference upsamples both CAMs with align_corners=True
    # Which branch the consistency term leaves alone: "none" (the reference: both learn from it),
    # "cnn" (the CNN's CAM is a fixed target that only the transformer moves to) or "vit".
    consistency_teacher: Literal["none", "cnn", "vit"] = "none"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # image rescaling (the reference: PIL bicubic)
    amp: bool = False
    num_workers: int = checked(2, NON_NEGATIVE)
    validate: bool = True


@dataclass
class MakeCamConfig:
    enabled: bool = True
    # CRT: "vit" (its transformer branch), "cnn" or "fuse"; single-stage methods: "net" (the CAM
    # head) or "net_aux" (the auxiliary CAM head)
    cam_source: Literal["vit", "cnn", "fuse", "net", "net_aux"] = "vit"
    scales: list[float] = checked([1.0, 0.5, 1.5, 2.0, 0.75, 1.25, 1.75], SCALES)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # image rescaling (the reference: PIL bicubic)
    # Full-resolution CAMs: each scale's map is upsampled to the image size rounded up to this
    # multiple, then cropped. The reference rounds to 16 (its network stride); rounding to 4
    # (the stride-4 grid) shifts peaks by 4-11 px on a 375x500 image.
    full_res_rounding: int = checked(16, POSITIVE)


@dataclass
class EvalCamConfig:
    enabled: bool = True
    threshold: float = checked(0.15, UNIT)
    sweep: list[float] = checked([0.05, 0.60, 0.05], (lambda v: len(v) == 3 and v[0] <= v[1] and v[2] > 0,
                                                       "must be [start, stop, step] with step > 0"))


@dataclass
class CamToIrLabelConfig:
    enabled: bool = True
    conf_fg_thres: float = checked(0.35, UNIT)
    conf_bg_thres: float = checked(0.15, UNIT)
    gt_prob: float = checked(0.7, UNIT)          # confidence of the coarse labels in the CRF unary
    crf: CrfParams = checked(CrfParams())
    num_workers: int = checked(0, NON_NEGATIVE)   # 0 = every available core


@dataclass
class TrainIrnConfig:
    enabled: bool = True
    backbone: str = "resnet50.tv_in1k"         # torchvision's weights, as the reference
    pretrained: Union[bool, str] = True
    dilate_last_stage: bool = False            # stride 16 without dilation, as the reference
    # Start the (frozen) backbone from this run's CAM CNN branch instead of `pretrained`
    # weights: for runs without ImageNet weights (the CPU demo). Needs the same backbone name.
    init_from_cam: bool = False
    radius: int = checked(10, POSITIVE)
    # "cropped": pair sources only where every pair of the radius stays inside the label grid
    # (rows < h - radius + 1, columns within radius - 1 of neither side), as the reference's
    # PathIndex; "all": every source whose target is inside.
    pair_sources: Literal["cropped", "all"] = "cropped"
    # The reference leaves the displacement uncentred in training and sets its mean from one pass
    # over the infer split afterwards ("inference_pass"); "running": a running mean in training.
    displacement_mean: Literal["inference_pass", "running"] = "inference_pass"
    crop_size: int = checked(512, POSITIVE)
    rescale: list[float] = checked([0.5, 1.5], RANGE)
    batch_size: int = checked(32, POSITIVE)
    epochs: int = checked(3, POSITIVE)
    optimizer: OptimizerConfig = checked(OptimizerConfig())
    displacement_lr_mult: float = checked(10.0, POSITIVE)
    num_workers: int = checked(2, NON_NEGATIVE)


@dataclass
class ThresholdConfig:
    high: float = checked(0.7, UNIT)      # CAM above: confident foreground
    low: float = checked(0.25, UNIT)      # CAM at or below: confident background
    bkg: float = checked(0.5, UNIT)       # the background plane of CAM labels (validation, make_cam labels)


@dataclass
class RefinerSection:
    preset: Literal["par", "varm"] = "par"
    iterations: int = checked(10, POSITIVE)
    dilations: list[int] = checked([1, 2, 4, 8, 12, 24], (lambda v: len(v) > 0 and all(d > 0 for d in v),
                                                          "must be a non-empty list of positive dilations"))
    down_scale: int = checked(2, POSITIVE)


@dataclass
class SegInferenceConfig:
    """Multi-scale + flip inference of a single-stage network's segmentation head."""
    scales: list[float] = checked([1.0, 1.5, 1.25], SCALES)
    flip_fuse: Literal["sum", "max", "mean"] = "sum"     # mean: AFA / TSCD
    scale_fuse: Literal["max", "sum"] = "max"
    resize_to: int = checked(0, NON_NEGATIVE)    # COCO: 448 (square resize first); 0 = native size


@dataclass
class MakeSemSegConfig:
    enabled: bool = True
    # irn_random_walk (CRT/IRNet); seg_head (a single-stage network's segmentation head, multi-scale
    # + flip); cam_refine (the saved CAMs refined by the local refiner with two background planes)
    source: Literal["irn_random_walk", "seg_head", "cam_refine"] = "irn_random_walk"
    seg_head: SegInferenceConfig = checked(SegInferenceConfig())
    thresholds: ThresholdConfig = checked(ThresholdConfig())
    refiner: RefinerSection = checked(RefinerSection())
    walk: RandomWalkParams = checked(RandomWalkParams())
    # IRN inference pads the image (bottom/right) to at least this square, as the reference, so
    # GroupNorm sees the padded statistics of training (0: no padding)
    irn_pad_to: int = checked(512, NON_NEGATIVE)
    bg_threshold: float = checked(0.25, UNIT)


@dataclass
class EvalSemSegConfig:
    enabled: bool = True


@dataclass
class MakeInsSegConfig:
    enabled: bool = False
    walk: RandomWalkParams = checked(RandomWalkParams())
    irn_pad_to: int = checked(512, NON_NEGATIVE)      # as make_sem_seg.irn_pad_to
    bg_threshold: float = checked(0.25, UNIT)
    min_fragment_fraction: float = checked(0.01, UNIT)  # pieces under this share of the image score 0 (IRNet)


@dataclass
class EvalInsSegConfig:
    enabled: bool = False
    iou_threshold: float = checked(0.5, UNIT)
    use_07_metric: bool = False   # False: all-points interpolated AP (VOC 2010+, chainercv default); True: 11-point
    exclude_void: bool = False    # True: drop void (255) pixels from every IoU; False counts them (reference)


@dataclass
class TrainDeeplabConfig:
    enabled: bool = True
    backbone: str = "resnet101"
    pretrained: Union[bool, str] = True
    init_from_cam: bool = False   # as train_irn.init_from_cam (the CPU demo)
    iterations: int = checked(20000, POSITIVE)
    batch_size: int = checked(5, POSITIVE)        # global, per forward pass; × accumulation per step
    accumulation: int = checked(2, POSITIVE)
    crop_size: int = checked(321, POSITIVE)
    # The reference draws each crop's scale from this set and pads at the bottom/right (image with
    # the mean, label 255) before the random crop (deeplab/train_utils.random_scale_crop).
    scales: list[float] = checked([0.5, 0.75, 1.0, 1.25, 1.5], SCALES)
    # The reference dilates every block of layer3 (2) and layer4 (4), the first included; timm
    # leaves the first block of each at the previous rate.
    dilate_first_block: bool = True
    # The reference freezes BatchNorm (statistics and affine); false trains it with batch
    # statistics: only for backbones without large-scale pre-training (the CPU demo).
    freeze_bn: bool = True
    # MSC: the scales besides 1.0 at which every image also goes through the network (train and
    # test); empty = the 1.0 scale alone.
    msc_scales: list[float] = checked([0.75, 0.5], EXTRA_SCALES)
    # the ASPP branches' dilation rates, set for VOC's 321 crops (41x41 feature maps)
    aspp_rates: list[int] = checked([6, 12, 18, 24], RATES)
    # what the network reads: "imagenet" = RGB, (x/255 - data.mean) / data.std (timm / torchvision
    # weights); "caffe_bgr" = BGR, x - (104.008, 116.669, 122.675) on 0..255, as deeplab-pytorch feeds its
    # Caffe-converted COCO checkpoint; "auto" = caffe_bgr when `pretrained` is a file in that format.
    input_norm: Literal["auto", "imagenet", "caffe_bgr"] = "auto"
    optimizer: OptimizerConfig = checked(OptimizerConfig(lr=2.5e-4, momentum=0.9, weight_decay=5e-4))
    # lr multipliers of the ASPP weights and biases (the reference's Caffe lr_mult 10 and 20)
    head_lr_mult: float = checked(10.0, POSITIVE)
    head_bias_lr_mult: float = checked(20.0, POSITIVE)
    # where the cross-entropy is taken: "logits" = the labels nearest-resized to the 1/8 logit map
    # (the reference); "labels" = the logits bilinearly upsampled to the crop, every label pixel counts
    loss_resolution: Literal["logits", "labels"] = "logits"
    amp: bool = False
    checkpoint_every: int = checked(1000, POSITIVE)
    log_every: int = checked(20, POSITIVE)
    num_workers: int = checked(2, NON_NEGATIVE)


@dataclass
class TestDeeplabConfig:
    enabled: bool = True
    split: str = ""   # empty = data.val_split
    save_logits: bool = True


@dataclass
class CrfConfig(CrfParams):
    """The crf stage: the same keys as every CRF block, with DeepLab's post-processing values."""
    enabled: bool = True
    gauss_sxy: float = checked(1.0, POSITIVE)
    gauss_compat: float = checked(3.0, NON_NEGATIVE)
    bilat_sxy: float = checked(67.0, POSITIVE)
    bilat_srgb: float = checked(3.0, POSITIVE)
    bilat_compat: float = checked(4.0, NON_NEGATIVE)
    num_workers: int = checked(0, NON_NEGATIVE)


# ----------------------------------------------------------------------------- single-stage methods
# Defaults reproduce ToCo's published VOC run (methods/toco.md §10).

@dataclass
class LossTerm:
    """A loss term's weight and the iterations it is on: [start, end) (end 0 = to the end).
    A term that is off is not computed at all."""
    weight: float = checked(1.0, NON_NEGATIVE)
    start: int = checked(0, NON_NEGATIVE)
    end: int = checked(0, NON_NEGATIVE)


@dataclass
class SingleStageLosses:
    cls: LossTerm = checked(LossTerm(1.0))
    cls_aux: LossTerm = checked(LossTerm(1.0))
    ptc: LossTerm = checked(LossTerm(0.2))
    ctc: LossTerm = checked(LossTerm(0.5))
    seg: LossTerm = checked(LossTerm(0.1, start=2001))
    reg: LossTerm = checked(LossTerm(0.05, start=2001))
    # the other single-stage methods' terms (engine/terms.py registers each); off in ToCo
    scd: LossTerm = checked(LossTerm(0.0))          # TSD-CAM / TSCD: CAM-similarity self-distillation
    dino_cls: LossTerm = checked(LossTerm(0.0))     # FSR: class-token self-distillation
    dino_patch: LossTerm = checked(LossTerm(0.0))   # FSR: masked patch-token self-distillation
    aff: LossTerm = checked(LossTerm(0.0))          # AFA / TSCD: affinity from attention


@dataclass
class AugmentConfig:
    """Photometric augmentation of the network input (probabilities)."""
    jitter_p: float = checked(0.8, UNIT)
    gray_p: float = checked(0.2, UNIT)
    blur_p: float = checked(1.0, UNIT)     # ToCo blurs the network input always


@dataclass
class PtcConfig:
    # The reference applies the pixel box to token indices (toco.md §11); false maps the box to tokens.
    box_in_pixels: bool = True


@dataclass
class CtcConfig:
    temperature: float = checked(0.5, POSITIVE)
    ema: float = checked(0.9, MOMENTUM)             # momentum of the teacher projection head
    local_crops: int = checked(8, NON_NEGATIVE)
    local_size: int = checked(96, POSITIVE)
    negative_ratio: float = checked(0.2, NON_NEGATIVE)
    extra_negative_term: bool = True     # the reference's for-else term; the published numbers include it
    independent_flip: bool = True        # the reference flips the local view independently of the input
    # the projection head (net/proj_head.py): in_dim -> hidden_dim (x num_layers - 1) -> bottleneck_dim -> out_dim
    projection: dict[str, Any] = checked({"hidden_dim": 2048, "bottleneck_dim": 256, "out_dim": 1024, "num_layers": 3})


@dataclass
class RegConfig:
    """The dense-energy regulariser (rloss): inner weight × energy of the bilateral kernel."""
    inner_weight: float = checked(1e-7, NON_NEGATIVE)
    sigma_rgb: float = checked(15.0, POSITIVE)
    sigma_xy: float = checked(100.0, POSITIVE)
    scale: float = checked(0.5, (lambda v: 0 < v <= 1, "must be within (0, 1]"))
    # the exact kernel is evaluated on at most this many pixels per image (energy rescaled to the
    # reference's grid; engine/regulariser.py)
    max_pixels: int = checked(4096, POSITIVE)


@dataclass
class FsrConfig:
    """FSR's parts (methods/fsr.md): EMA teacher, uncertainty-guided masking, DINO losses. The
    defaults are the published VOC run (fsr.md §5, §10); the loss weights are
    train_net.losses.dino_cls / dino_patch (0.1 each, `end` = the reference's fsr_iters)."""
    # the DINO projector on the aggregated token and every patch token (fsr.md §1.3)
    projection: dict[str, Any] = checked({"hidden_dim": 2048, "bottleneck_dim": 256, "out_dim": 4096, "num_layers": 3})
    aggregator_depth: int = checked(2, POSITIVE)     # cross-attention blocks class token <- patches (cls_depth)
    drop_path: float = checked(0.1, UNIT)            # stochastic depth, linear over the blocks to this value
    momentum: float = checked(0.9995, MOMENTUM)      # EMA teacher: cosine from this to 1 over all iterations
    use_teacher: bool = False                        # inference stages use the teacher (test_seg_head scores both)
    mask_block: int = checked(64, POSITIVE)          # block size in pixels (4x4 tokens of 16 px)
    mask_ratio: float = checked(0.4, UNIT)           # ceil(blocks x ratio) blocks masked per image (49 -> 20)
    mask_random_until: int = checked(4000, NON_NEGATIVE)   # random blocks before (max_iters/5), uncertain after
    mask_low: float = checked(0.2, UNIT)             # uncertain: low < max_c(aux CAM of view 2) < high
    mask_high: float = checked(0.7, UNIT)
    student_temp: float = checked(0.1, POSITIVE)
    teacher_temp_start: float = checked(0.04, POSITIVE)    # linear to teacher_temp over teacher_temp_warmup
    teacher_temp: float = checked(0.07, POSITIVE)
    teacher_temp_warmup: int = checked(2500, NON_NEGATIVE)  # max_iters/8
    center_momentum: float = checked(0.9, MOMENTUM)  # the teacher centres' EMA
    view_scale: list[float] = checked([0.32, 1.0], RANGE)  # RandomResizedCrop area range of both views
    jitter_p: float = checked(0.5, UNIT)             # colour jitter probability of each view


@dataclass
class ScdConfig:
    """The CAM-similarity self-distillation of TSD-CAM / TSCD (methods/tsd-cam.md §2.3, tscd.md §5;
    engine/scd.py): the crop's and a downscaled copy's CAM correlation (teacher, no gradient)
    distilled into their segmentation-logit correlation (student). Defaults: TSD-CAM's reference.
    The references' gradient-free "ER" term (an L1 between the two views' CAMs) is not computed."""
    view_scale: float = checked(0.3, (lambda v: 0 < v < 1, "must be within (0, 1)"))   # second view: crop x 0.3
    samples: int = checked(40, POSITIVE)           # samples x samples random points per image and view
    view_align_corners: bool = True                # the downscale of the crop to the second view
    # the upsampling of each view's seg logits to its own size: TSD-CAM false, TSCD true
    seg_align_corners: bool = False
    # the teacher's mean added back over the device's batch (the reference) or per image
    batch_mean: bool = False


@dataclass
class AffConfig:
    """The affinity-from-attention head and loss of AFA / TSCD (methods/afa.md §2-§3, tscd.md §2-§3;
    engine/affinity_terms.py)."""
    symmetrize: bool = True          # A + Aᵀ before the head's 1x1 conv: AFA yes, TSCD no
    blocks: int = checked(0, NON_NEGATIVE)   # how many of the last stage's blocks feed the head; 0 = all
    radius: int = checked(8, POSITIVE)        # pairs farther apart (rows or columns, stride-16 cells) are ignored
    # AFA: from this iteration on, the segmentation target is the CAM propagated by the affinity of the
    # largest CAM scale (one step, P masked to `radius`, ^power, / (column sum + eps)), refined and
    # thresholded like the pseudo labels (afa.md §3.5); 0 = never (TSCD)
    propagate_start: int = checked(0, NON_NEGATIVE)
    propagate_power: float = checked(2.0, POSITIVE)
    propagate_eps: float = checked(0.1, POSITIVE)


@dataclass
class MitConfig:
    """The SegFormer network of AFA / TSCD (net/single_stage_mit.py; `backbone: mit_b1`)."""
    strides: list[int] = checked([4, 2, 2, 1], (lambda v: len(v) == 4 and all(s > 0 for s in v),
                                                "must be 4 positive strides"))
    decoder_dim: int = checked(256, POSITIVE)          # the all-MLP decoder's embedding
    decoder_dropout: float = checked(0.1, UNIT)
    pool: Literal["gmp", "gap"] = "gmp"
    norm_lr_mult: float = checked(0.0, NON_NEGATIVE)   # every encoder LayerNorm: 0 = frozen (AFA / TSCD)
    norm_weight_decay: float = checked(0.0, NON_NEGATIVE)
    seg_align_corners: bool = False    # segmentation logits -> crop upsampling: AFA False, TSCD True
    sync_bn: bool = True               # the decoder's BatchNorm as SyncBN under torchrun (the reference's)


@dataclass
class TrainNetConfig:
    """The single-stage network (ToCo's engine): one network trained end to end."""
    enabled: bool = True
    model: str = "single_stage_vit"      # a registered model kind (net/registry.py): the method's network
    backbone: str = "vit_base_patch16_224.orig_in21k_ft_in1k"
    pretrained: Union[bool, str] = True
    aux_layer: int = -3                  # ToCo: block 10 of 12
    pos_embed_trainable: bool = False
    model_kwargs: dict[str, Any] = checked({})
    seg_hidden: int = checked(512, POSITIVE)
    seg_dilation: int = checked(5, POSITIVE)
    iterations: int = checked(20000, POSITIVE)
    batch_size: int = checked(4, POSITIVE)       # global
    crop_size: int = checked(448, POSITIVE)
    rescale: list[float] = checked([0.5, 2.0], RANGE)
    augment: AugmentConfig = checked(AugmentConfig())
    cam_scales: list[float] = checked([1.0, 0.5, 1.5], SCALES)
    thresholds: ThresholdConfig = checked(ThresholdConfig())
    refiner: RefinerSection = checked(RefinerSection())
    losses: SingleStageLosses = checked(SingleStageLosses())
    ptc: PtcConfig = checked(PtcConfig())
    ctc: CtcConfig = checked(CtcConfig())
    reg: RegConfig = checked(RegConfig())
    fsr: FsrConfig = checked(FsrConfig())
    scd: ScdConfig = checked(ScdConfig())
    aff: AffConfig = checked(AffConfig())
    mit: MitConfig = checked(MitConfig())
    optimizer: OptimizerConfig = checked(OptimizerConfig(kind="adamw", lr=6e-5, weight_decay=0.01,
                                                         schedule="warmup_poly", warmup_steps=1500))
    head_lr_mult: float = checked(10.0, POSITIVE)
    amp: bool = False
    checkpoint_every: int = checked(1000, POSITIVE)
    log_every: int = checked(50, POSITIVE)
    num_workers: int = checked(2, NON_NEGATIVE)


@dataclass
class TestSegHeadConfig(SegInferenceConfig):
    """The single-stage papers' evaluation: the segmentation head on the val split, multi-scale
    + flip (VOC: flips summed, scales maxed)."""
    enabled: bool = True
    split: str = ""                       # empty = data.val_split


@dataclass
class CrfSegHeadConfig(CrfParams):
    """ToCo's CRF on the segmentation head's logits: Gaussian 1/1, bilateral 121/5/4."""
    enabled: bool = True
    gauss_sxy: float = checked(1.0, POSITIVE)
    gauss_compat: float = checked(1.0, NON_NEGATIVE)
    bilat_sxy: float = checked(121.0, POSITIVE)
    bilat_srgb: float = checked(5.0, POSITIVE)
    bilat_compat: float = checked(4.0, NON_NEGATIVE)
    num_workers: int = checked(0, NON_NEGATIVE)


@dataclass
class Config:
    run_name: str = checked("default", NAME)
    work_dir: str = "."
    method: str = "crt"              # a registered method: its stage list (pipeline/methods.py)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = checked(0, NON_NEGATIVE)
    data: DataConfig = checked(DataConfig())
    train_cam: TrainCamConfig = checked(TrainCamConfig())
    make_cam: MakeCamConfig = checked(MakeCamConfig())
    eval_cam: EvalCamConfig = checked(EvalCamConfig())
    cam_to_ir_label: CamToIrLabelConfig = checked(CamToIrLabelConfig())
    train_irn: TrainIrnConfig = checked(TrainIrnConfig())
    make_sem_seg: MakeSemSegConfig = checked(MakeSemSegConfig())
    eval_sem_seg: EvalSemSegConfig = checked(EvalSemSegConfig())
    make_ins_seg: MakeInsSegConfig = checked(MakeInsSegConfig())
    eval_ins_seg: EvalInsSegConfig = checked(EvalInsSegConfig())
    train_deeplab: TrainDeeplabConfig = checked(TrainDeeplabConfig())
    test_deeplab: TestDeeplabConfig = checked(TestDeeplabConfig())
    crf: CrfConfig = checked(CrfConfig())
    train_net: TrainNetConfig = checked(TrainNetConfig())
    test_seg_head: TestSegHeadConfig = checked(TestSegHeadConfig())
    crf_seg_head: CrfSegHeadConfig = checked(CrfSegHeadConfig())

    @property
    def result_dir(self) -> Path:
        return Path(self.work_dir) / "result" / self.run_name

    @property
    def sess_dir(self) -> Path:
        return Path(self.work_dir) / "sess" / self.run_name


# ----------------------------------------------------------------------------- validation

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str) -> Any:
    """Return `value` checked (and int→float widened) against type `tp`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping (section), got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{key}': {value!r} is not one of {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = set(fields)
    for name in values:
        if name not in known:
            dotted = f"{prefix}.{name}" if prefix else str(name)
            raise ConfigError(f"unknown config key '{dotted}' (known keys here: {', '.join(sorted(known))})")
    kwargs = {}
    for name in known:
        dotted = f"{prefix}.{name}" if prefix else name
        if name in values:
            value = values[name]
            default = _field_default(fields[name])
            if dataclasses.is_dataclass(default) and isinstance(value, dict):
                # a partial section overrides this field's own defaults (e.g. DeepLab's optimiser
                # values), not the section class's generic ones
                value = _deep_merge(dataclasses.asdict(default), value)
            kwargs[name] = _coerce(value, hints[name], dotted)
    obj = cls(**kwargs)
    check_values(obj, prefix)
    return obj


def _field_default(f):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def check_values(obj, prefix: str = "") -> None:
    """Apply every field's value check (defaults included) to a built section."""
    for f in dataclasses.fields(obj):
        rule = f.metadata.get("check")
        value = getattr(obj, f.name)
        if rule and not dataclasses.is_dataclass(value) and not rule[0](value):
            dotted = f"{prefix}.{f.name}" if prefix else f.name
            raise ConfigError(f"config key '{dotted}': {value!r} {rule[1]}")


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "model_kwargs":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    tree = json.loads(json.dumps(tree))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return tree


def _read_yaml_tree(path: Path, seen: tuple = ()) -> dict:
    """A YAML config as plain data; `base: other.yaml` (relative to this file) is read first and
    this file's keys are merged over it, so a variant states only what differs."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through 'base'")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise ConfigError(f"config key 'base' in {path}: expected a file name, got {base!r}")
    return _deep_merge(_read_yaml_tree(path.parent / base, seen + (path.resolve(),)), loaded)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (optional) over the defaults, apply `--set` overrides, validate."""
    tree = _read_yaml_tree(Path(path)) if path is not None else {}
    tree = apply_overrides(tree, overrides or [])
    return _build(Config, tree)


def config_to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def dump_config(cfg: Config, path: Path) -> None:
    from pipeline.artifacts import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def fingerprint(obj) -> str:
    """Stable short hash of plain data (dataclasses are converted first)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
