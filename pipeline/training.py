"""Pieces every training stage shares: poly learning rate, checkpoint/resume, DDP wrapping."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline import artifacts

log = logging.getLogger("wsss")


def poly_lr(base_lr: float, step: int, max_steps: int, power: float = 0.9) -> float:
    """base_lr · (1 − step/max_steps)^power, step clamped to [0, max_steps]. Updated every
    step (the DeepLab reference updates it every 10 iterations only)."""
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    return base_lr * (1.0 - min(max(step, 0), max_steps) / max_steps) ** power


def set_poly_lr(optimizer: torch.optim.Optimizer, base_lr: float, step: int, max_steps: int, power: float = 0.9) -> float:
    """Set every group's lr to poly_lr × the group's `lr_mult` (default 1); returns the base lr."""
    lr = poly_lr(base_lr, step, max_steps, power)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    return lr


def check_finite(loss: torch.Tensor, stage: str, step: int) -> None:
    """Stop at the first non-finite loss instead of training on garbage for hours."""
    if not torch.isfinite(loss).all():
        from pipeline.errors import PipelineError

        raise PipelineError(f"{stage}: the loss became {float(loss)} at step {step}; training diverged. "
                            f"Lower {stage}.lr (or switch on amp only on CUDA) and re-run the stage.")


def make_optimizer(kind: str, groups: list[dict], lr: float, momentum: float, weight_decay: float):
    """SGD (the references' choice) or AdamW; groups may carry `lr_mult` and their own weight decay."""
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def resume_training(path: Path, fingerprint: str, resume: bool, model, optimizer, device) -> dict | None:
    """Restore `model` and `optimizer` from the training checkpoint at `path` when it was written
    under the same fingerprint (same config and upstream); returns the checkpoint, or None."""
    if not resume or not path.exists():
        return None
    state = artifacts.load_torch(path, map_location=device)
    if state.get("fingerprint") != fingerprint:
        log.info("ignoring checkpoint %s from a different config", path)
        return None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming from %s", path)
    return state


def ddp(model: torch.nn.Module, runtime) -> torch.nn.Module:
    """Wrap for DistributedDataParallel under torchrun; the model itself otherwise."""
    if not runtime.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def save_model(path: Path, model: torch.nn.Module, model_args: dict, **extra) -> None:
    """Final weights with the arguments needed to rebuild the model (atomic)."""
    state = {"model_args": model_args, "state_dict": unwrap(model).state_dict(), **extra}
    artifacts.save_torch(path, state)


def load_model_file(path: Path, device) -> dict:
    state = artifacts.load_torch(path, map_location=device)
    if "model_args" not in state or "state_dict" not in state:
        from pipeline.errors import PipelineError

        raise PipelineError(f"{path} is not a model file written by this toolkit (no model_args/state_dict)")
    return state


def copy_backbone_from_cam(backbone: torch.nn.Module, cam_file: Path, device) -> int:
    """Copy this run's CAM CNN backbone weights (sess/<run>/cam_cnn.pth) into `backbone` (same timm
    architecture). For runs without ImageNet weights (the CPU demo): a random backbone, frozen or
    trained briefly, sees little; the CAM branch has learnt this data's appearance. Returns the count."""
    from pipeline.errors import PipelineError

    state = load_model_file(cam_file, device)["state_dict"]
    target = backbone.state_dict()
    copied = {key[len("backbone."):]: value for key, value in state.items()
              if key.startswith("backbone.") and key[len("backbone."):] in target
              and target[key[len("backbone."):]].shape == value.shape}
    if not copied:
        raise PipelineError(f"init_from_cam: no backbone tensor of {cam_file} fits this backbone (same name needed)")
    backbone.load_state_dict(copied, strict=False)
    log.info("backbone initialised from %s (%d of %d tensors)", cam_file, len(copied), len(target))
    return len(copied)
