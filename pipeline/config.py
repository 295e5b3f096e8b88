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
# Defaults are the reference CRT / IRNet / DeepLabv2 hyperparameters (SPEC.md),
# so configs/voc12.yaml only needs paths; the demo config shrinks the models.

@dataclass
class DataConfig:
    dataset: Literal["voc12", "coco"] = "voc12"
    root: str = "data/VOCdevkit/VOC2012"
    train_split: str = "train_aug"      # train_cam, train_irn
    infer_split: str = "train_aug"      # make_cam .. make_sem_seg, export, train_deeplab
    eval_split: str = "train"           # eval_cam, eval_sem_seg
    val_split: str = "val"              # test_deeplab, crf; validation loss of train_cam
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class CNNBranchConfig:
    backbone: str = "resnet152"
    pretrained: Union[bool, str] = True
    output_stride: int = 16
    # The reference freezes BatchNorm and the stem/layer1/layer2 of its ImageNet backbone;
    # switch both off only for random-init backbones (the CPU demo).
    freeze_bn: bool = True
    freeze_early_stages: bool = True


@dataclass
class ViTBranchConfig:
    name: str = "deit_small_patch16_224"
    pretrained: Union[bool, str] = True
    window: int = 224
    recurrence: int = 3
    model_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainCamConfig:
    enabled: bool = True
    cnn: CNNBranchConfig = field(default_factory=CNNBranchConfig)
    vit: ViTBranchConfig = field(default_factory=ViTBranchConfig)
    epochs: int = 10
    batch_size: int = 16
    crop_size: int = 336
    resize_long: list[int] = field(default_factory=lambda: [210, 420])
    optimizer: Literal["sgd", "adamw"] = "sgd"   # CRT: SGD; AdamW helps random-init ViTs (demo)
    lr: float = 0.1
    head_lr_mult: float = 10.0
    # The reference passes weight decay into SGD's momentum slot, so it trains
    # with momentum 1e-4; set 1e-4 to reproduce the paper, 0.9 for plain SGD.
    momentum: float = 1e-4
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    cam_lambda: float = 0.1
    consistency_start_epoch: int = 1   # 0-based: CRT switches it on from the second epoch
    amp: bool = False
    num_workers: int = 2
    validate: bool = True


@dataclass
class MakeCamConfig:
    enabled: bool = True
    cam_source: Literal["vit", "cnn", "fuse"] = "vit"
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0, 0.75, 1.25, 1.75])
    num_workers: int = 2


@dataclass
class EvalCamConfig:
    enabled: bool = True
    threshold: float = 0.15
    sweep: list[float] = field(default_factory=lambda: [0.05, 0.60, 0.05])   # start, stop (inclusive), step


@dataclass
class CamToIrLabelConfig:
    enabled: bool = True
    conf_fg_thres: float = 0.35
    conf_bg_thres: float = 0.15
    crf_gt_prob: float = 0.7
    crf_iters: int = 10
    crf_gauss_sxy: float = 3
    crf_gauss_compat: float = 3
    crf_bilat_sxy: float = 50
    crf_bilat_srgb: float = 5
    crf_bilat_compat: float = 10
    num_workers: int = 0   # 0 = every available core


@dataclass
class TrainIrnConfig:
    enabled: bool = True
    backbone: str = "resnet50"
    pretrained: Union[bool, str] = True
    # Start the (frozen) backbone from this run's CAM CNN branch instead of `pretrained`
    # weights: for runs without ImageNet weights (the CPU demo). Needs the same backbone name.
    init_from_cam: bool = False
    radius: int = 10
    crop_size: int = 512
    rescale: list[float] = field(default_factory=lambda: [0.5, 1.5])
    batch_size: int = 32
    epochs: int = 3
    lr: float = 0.1
    displacement_lr_mult: float = 10.0
    momentum: float = 1e-4   # as train_cam: the reference's effective momentum
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    num_workers: int = 2


@dataclass
class MakeSemSegConfig:
    enabled: bool = True
    radius: int = 5
    beta: float = 10.0
    exp_times: int = 8
    sem_seg_bg_thres: float = 0.25
    num_workers: int = 2


@dataclass
class EvalSemSegConfig:
    enabled: bool = True


@dataclass
class MakeInsSegConfig:
    enabled: bool = False
    radius: int = 5
    beta: float = 10.0
    exp_times: int = 8
    ins_seg_bg_thres: float = 0.25
    min_fragment_fraction: float = 0.01  # pieces under this share of the image score 0 (IRNet)


@dataclass
class EvalInsSegConfig:
    enabled: bool = False
    iou_threshold: float = 0.5
    use_07_metric: bool = False   # False: all-points interpolated AP (VOC 2010+, chainercv default); True: 11-point
    exclude_void: bool = False    # True: drop void (255) pixels from every IoU; False counts them (reference)


@dataclass
class TrainDeeplabConfig:
    enabled: bool = True
    backbone: str = "resnet101"
    pretrained: Union[bool, str] = True
    init_from_cam: bool = False   # as train_irn.init_from_cam (the CPU demo)
    iterations: int = 20000
    batch_size: int = 5
    accumulation: int = 2
    crop_size: int = 321
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    msc_scales: list[float] = field(default_factory=lambda: [0.75, 0.5])
    lr: float = 2.5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    amp: bool = False
    checkpoint_every: int = 1000
    log_every: int = 20
    num_workers: int = 2


@dataclass
class TestDeeplabConfig:
    enabled: bool = True
    split: str = ""   # empty = data.val_split
    save_logits: bool = True


@dataclass
class CrfConfig:
    enabled: bool = True
    iters: int = 10
    gauss_sxy: float = 1
    gauss_compat: float = 3
    bilat_sxy: float = 67
    bilat_srgb: float = 3
    bilat_compat: float = 4
    num_workers: int = 0


@dataclass
class Config:
    run_name: str = "default"
    work_dir: str = "."
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    train_cam: TrainCamConfig = field(default_factory=TrainCamConfig)
    make_cam: MakeCamConfig = field(default_factory=MakeCamConfig)
    eval_cam: EvalCamConfig = field(default_factory=EvalCamConfig)
    cam_to_ir_label: CamToIrLabelConfig = field(default_factory=CamToIrLabelConfig)
    train_irn: TrainIrnConfig = field(default_factory=TrainIrnConfig)
    make_sem_seg: MakeSemSegConfig = field(default_factory=MakeSemSegConfig)
    eval_sem_seg: EvalSemSegConfig = field(default_factory=EvalSemSegConfig)
    make_ins_seg: MakeInsSegConfig = field(default_factory=MakeInsSegConfig)
    eval_ins_seg: EvalInsSegConfig = field(default_factory=EvalInsSegConfig)
    train_deeplab: TrainDeeplabConfig = field(default_factory=TrainDeeplabConfig)
    test_deeplab: TestDeeplabConfig = field(default_factory=TestDeeplabConfig)
    crf: CrfConfig = field(default_factory=CrfConfig)

    @property
    def result_dir(self) -> Path:
        return Path(self.work_dir) / "result" / self.run_name

    @property
    def sess_dir(self) -> Path:
        return Path(self.work_dir) / "sess" / self.run_name


# Value checks beyond types: dotted key -> (predicate, message).
_VALUE_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {}


def _rule(keys: str, predicate, message: str) -> None:
    for key in keys.split():
        _VALUE_RULES[key] = (predicate, message)


_positive = lambda v: v > 0  # noqa: E731
_non_negative = lambda v: v >= 0  # noqa: E731
_unit = lambda v: 0.0 <= v <= 1.0  # noqa: E731
_rule("train_cam.epochs train_cam.batch_size train_cam.crop_size train_cam.lr train_cam.vit.window "
      "train_cam.vit.recurrence train_irn.radius train_irn.crop_size train_irn.batch_size train_irn.epochs "
      "train_irn.lr make_sem_seg.radius make_ins_seg.radius train_deeplab.iterations train_deeplab.batch_size "
      "train_deeplab.accumulation train_deeplab.crop_size train_deeplab.lr train_deeplab.checkpoint_every "
      "train_deeplab.log_every crf.iters cam_to_ir_label.crf_iters", _positive, "must be > 0")
_rule("make_sem_seg.exp_times make_ins_seg.exp_times train_cam.cam_lambda train_cam.weight_decay train_cam.momentum "
      "train_cam.consistency_start_epoch train_irn.weight_decay train_deeplab.weight_decay "
      "train_cam.num_workers make_cam.num_workers train_irn.num_workers make_sem_seg.num_workers "
      "train_deeplab.num_workers cam_to_ir_label.num_workers crf.num_workers", _non_negative, "must be >= 0")
_rule("eval_cam.threshold cam_to_ir_label.conf_fg_thres cam_to_ir_label.conf_bg_thres cam_to_ir_label.crf_gt_prob "
      "make_sem_seg.sem_seg_bg_thres make_ins_seg.ins_seg_bg_thres make_ins_seg.min_fragment_fraction "
      "eval_ins_seg.iou_threshold", _unit,
      "must be within [0, 1]")
_rule("make_cam.scales train_deeplab.msc_scales", lambda v: len(v) > 0 and all(s > 0 for s in v),
      "must be a non-empty list of positive numbers")
_rule("train_cam.resize_long train_irn.rescale train_deeplab.scale_range",
      lambda v: len(v) == 2 and 0 < v[0] <= v[1], "must be [low, high] with 0 < low <= high")
_rule("eval_cam.sweep", lambda v: len(v) == 3 and v[0] <= v[1] and v[2] > 0, "must be [start, stop, step] with step > 0")
_rule("data.mean data.std", lambda v: len(v) == 3, "must have 3 values (RGB)")
_rule("run_name", lambda v: v != "" and "/" not in v and v not in (".", ".."), "must be a plain, non-empty folder name")


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
    known = {f.name for f in dataclasses.fields(cls)}
    for name in values:
        if name not in known:
            dotted = f"{prefix}.{name}" if prefix else str(name)
            raise ConfigError(f"unknown config key '{dotted}' (known keys here: {', '.join(sorted(known))})")
    kwargs = {}
    for name in known:
        dotted = f"{prefix}.{name}" if prefix else name
        if name in values:
            value = _coerce(values[name], hints[name], dotted)
            rule = _VALUE_RULES.get(dotted)
            if rule and not rule[0](value):
                raise ConfigError(f"config key '{dotted}': {value!r} {rule[1]}")
            kwargs[name] = value
    obj = cls(**kwargs)
    # Defaults are valid by construction except where sections nest defaults of their own.
    return obj


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
