"""Methods by registry: a method is a name and an ordered stage list. `config.method` picks
one; `run`, `status`, `report` and `export` work from its list, so a new method brings its
own list (reusing the stages it shares) without an edit to the driver.

    register_method(Method("mine", (StageSpec("train_cam"), StageSpec("make_cam", reads=("train_cam",)))))
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import PipelineError
from pipeline.stage import StageSpec


@dataclass(frozen=True)
class Method:
    name: str
    stages: tuple[StageSpec, ...]
    about: str = ""

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def stage(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise PipelineError(f"unknown stage '{name}' for method '{self.name}' "
                            f"(stages: {', '.join(self.stage_names)})")


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    names = method.stage_names
    if len(set(names)) != len(names):
        raise ValueError(f"method {method.name!r} lists a stage twice")
    for i, spec in enumerate(method.stages):
        for upstream in spec.reads:
            if upstream not in names[:i]:
                raise ValueError(f"method {method.name!r}: stage {spec.name!r} reads {upstream!r}, "
                                 "which does not come before it")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise PipelineError(f"config key 'method': unknown method {name!r} "
                            f"(methods: {', '.join(sorted(_METHODS))})") from None


def method_names() -> list[str]:
    return sorted(_METHODS)


# ----------------------------------------------------------------------------- CRT
# CAM co-training -> CAMs -> IR labels -> IRN -> random-walk pseudo labels -> DeepLab -> CRF.

INFER, TRAIN, EVAL, VAL = "infer_split", "train_split", "eval_split", "val_split"

CRT = register_method(Method("crt", (
    StageSpec("train_cam", writes=("weights", "checkpoint"), splits=(TRAIN, VAL), needs=("images", "labels")),
    StageSpec("make_cam", ("train_cam",), ("cam",), (INFER,), ("images", "labels"), per_image=True),
    StageSpec("eval_cam", ("make_cam",), ("metrics",), (EVAL,), ("masks",)),
    StageSpec("cam_to_ir_label", ("make_cam",), ("ir_label",), (INFER,), per_image=True),
    StageSpec("train_irn", ("cam_to_ir_label",), ("weights", "checkpoint"), (TRAIN,)),
    StageSpec("make_sem_seg", ("train_irn", "make_cam"), ("sem_seg",), (INFER,), per_image=True),
    StageSpec("eval_sem_seg", ("make_sem_seg",), ("metrics",), (EVAL,), ("masks",)),
    StageSpec("make_ins_seg", ("train_irn", "make_cam"), ("ins_seg",), (INFER,), per_image=True),
    StageSpec("eval_ins_seg", ("make_ins_seg",), ("metrics",), (EVAL,), ("masks", "instances")),
    StageSpec("train_deeplab", ("make_sem_seg",), ("weights", "checkpoint"), (INFER,)),
    StageSpec("test_deeplab", ("train_deeplab",), ("logits", "prediction", "metrics"), (VAL,), per_image=True),
    StageSpec("crf", ("test_deeplab",), ("crf_label", "metrics"), (VAL,), per_image=True),
), about="CRT: CNN + transformer CAM co-training, IRN random walk, DeepLabv2 + CRF"))


# ----------------------------------------------------------------------------- ToCo (the single-stage engine)
# One ViT trained end to end -> CAMs -> pseudo labels (segmentation head or CAM + refiner) -> the
# segmentation head evaluated on val (+ CRF); DeepLab on the pseudo labels optionally (off in its configs).

SEG_HEAD_CRF = (("test_stage", "test_seg_head"), ("logits", "seg_head_logits"), ("out", "seg_head_crf_label"))

TOCO = register_method(Method("toco", (
    StageSpec("train_net", writes=("weights", "checkpoint"), splits=(TRAIN,), needs=("images", "labels")),
    StageSpec("make_cam", ("train_net",), ("cam",), (INFER,), ("images", "labels"), per_image=True),
    StageSpec("eval_cam", ("make_cam",), ("metrics",), (EVAL,), ("masks",)),
    StageSpec("make_sem_seg", ("train_net", "make_cam"), ("sem_seg",), (INFER,), ("images", "labels"),
              per_image=True),
    StageSpec("eval_sem_seg", ("make_sem_seg",), ("metrics",), (EVAL,), ("masks",)),
    StageSpec("test_seg_head", ("train_net",), ("seg_head_logits", "seg_head_prediction", "metrics"), (VAL,),
              per_image=True),
    StageSpec("crf_seg_head", ("test_seg_head",), ("seg_head_crf_label", "metrics"), (VAL,), per_image=True,
              module="stages.crf", options=SEG_HEAD_CRF),
    StageSpec("train_deeplab", ("make_sem_seg",), ("weights", "checkpoint"), (INFER,)),
    StageSpec("test_deeplab", ("train_deeplab",), ("logits", "prediction", "metrics"), (VAL,), per_image=True),
    StageSpec("crf", ("test_deeplab",), ("crf_label", "metrics"), (VAL,), per_image=True),
), about="ToCo: token contrast ViT trained end to end; its segmentation head gives the published numbers"))


# ----------------------------------------------------------------------------- the other single-stage methods
# The same stages as ToCo; each differs in `train_net` (its model kind, loss terms, refiner
# preset), set by its configs (configs/<method>_voc12.yaml).

for _name, _about in (
        ("fsr", "FSR: ToCo's engine with an EMA teacher, uncertainty-guided masking and DINO-style losses"),
        ("tsdcam", "TSD-CAM: ToCo's engine with the VARM refiner and CAM-similarity self-distillation"),
        ("tscd", "TSCD: a SegFormer (MiT) encoder with VARM, self correspondence distillation and attention affinity"),
        ("afa", "AFA: a SegFormer (MiT) encoder whose attention affinity propagates the pseudo labels")):
    register_method(Method(_name, TOCO.stages, about=_about))
