"""Models by registry: every weights file records the model kind beside its arguments, so one
`load_model(path)` rebuilds any of them and no consumer needs the stage that trained it.

    @register_model("irn")
    class IRNet(nn.Module): ...

    save_model(path, model, "irn", {"backbone": "resnet50"})
    model = load_model(path, device, expect="irn")

A weights file is {"kind": str, "model_args": dict, "state_dict": dict}; `pretrained` in the
arguments is ignored on load (the weights come from the file, never from a download).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import torch

from pipeline import artifacts
from pipeline.errors import PipelineError

_BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {}
# Modules whose import registers the built-in kinds (imported on first look-up, so that this
# module imports none of them and there is no import circle).
_BUILTIN_MODULES = ("net.resnet_cam", "net.vit_cam", "net.irn", "deeplab.model", "net.single_stage",
                    "net.single_stage_mit", "net.fsr")


def register_model(kind: str):
    """Class or function decorator: `kind` -> a builder taking the model arguments."""
    def decorator(builder):
        if kind in _BUILDERS and _BUILDERS[kind] is not builder:
            raise ValueError(f"model kind {kind!r} is registered twice")
        _BUILDERS[kind] = builder
        return builder
    return decorator


def _builtins_loaded() -> None:
    for name in _BUILTIN_MODULES:
        importlib.import_module(name)


def model_kinds() -> list[str]:
    _builtins_loaded()
    return sorted(_BUILDERS)


def builder_of(kind: str) -> Callable[..., torch.nn.Module]:
    _builtins_loaded()
    if kind not in _BUILDERS:
        raise PipelineError(f"unknown model kind {kind!r} (kinds: {', '.join(sorted(_BUILDERS))})")
    return _BUILDERS[kind]


def single_stage_kinds() -> tuple[str, ...]:
    """The kinds that are single-stage networks (their class sets `single_stage = True`): what
    train_net writes and make_cam / make_sem_seg / test_seg_head read."""
    _builtins_loaded()
    return tuple(sorted(k for k, b in _BUILDERS.items() if getattr(b, "single_stage", False)))


def build_model(kind: str, args: dict) -> torch.nn.Module:
    return builder_of(kind)(**args)


def save_model(path: Path, model: torch.nn.Module, kind: str, args: dict, **extra) -> None:
    """Final weights with what rebuilds the model (atomic write)."""
    module = model.module if hasattr(model, "module") else model
    artifacts.save_torch(path, {"kind": kind, "model_args": dict(args), "state_dict": module.state_dict(), **extra})


def read_model_file(path: Path, device="cpu", expect: str | tuple[str, ...] | None = None) -> dict:
    """The weights file as a dict, checked to be one of ours (and of kind `expect`)."""
    state = artifacts.load_torch(path, map_location=device)
    if not isinstance(state, dict) or not {"kind", "model_args", "state_dict"} <= set(state):
        raise PipelineError(f"{path} is not a weights file written by this version of the toolkit "
                            "(no kind/model_args/state_dict); re-run the stage that writes it")
    kinds = (expect,) if isinstance(expect, str) else expect
    if kinds is not None and state["kind"] not in kinds:
        wanted = " or ".join(repr(k) for k in kinds)
        raise PipelineError(f"{path} holds a {state['kind']!r} model where a {wanted} model is expected: "
                            "a file copied from another stage? Re-run the stage that writes it")
    return state


def load_model(path: Path, device="cpu", expect: str | tuple[str, ...] | None = None) -> torch.nn.Module:
    """Rebuild the model stored at `path` in eval mode on `device`."""
    state = read_model_file(path, device, expect)
    model = build_model(state["kind"], {**state["model_args"], "pretrained": False})
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise PipelineError(f"{path}: the weights do not fit a {state['kind']!r} model with its recorded "
                            f"arguments ({first})") from None
    return model.to(device).eval()
