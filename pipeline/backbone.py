"""timm model creation with the three ways of getting weights the toolkit supports:
`pretrained: true` (timm's download, on the user's machine), `false` (random init:
tests and the CPU demo) or a local checkpoint path (offline clusters)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import timm

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


def create_timm_model(name: str, pretrained: bool | str = False, **kwargs) -> torch.nn.Module:
    """Create a timm model; fails loudly on an unknown name.

    `pretrained` True downloads timm's weights; a string is a local checkpoint
    loaded non-strictly (a report of missing / unexpected keys is logged).
    """
    if not timm.is_model(name):
        raise PipelineError(f"unknown timm model name: {name!r}")
    if isinstance(pretrained, str) and pretrained.lower() in ("true", "false"):
        pretrained = pretrained.lower() == "true"
    model = timm.create_model(name, pretrained=pretrained is True, **kwargs)
    if isinstance(pretrained, str):
        load_local_weights(model, pretrained)
    return model


def read_state_dict(path: str | Path, what: str) -> dict:
    """The state dict in a local weights file (pickle-free load), unwrapped from a
    "state_dict" / "model" / "model_state" key if it sits under one. `what` names
    the file in errors ("pretrained weights", "DeepLab checkpoint")."""
    file = Path(path)
    if not file.is_file():
        raise PipelineError(f"{what} file not found: {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise PipelineError(f"cannot read {what} {file}: {e}") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise PipelineError(f"{what} {file} holds no state dict")
    return state


def load_local_weights(model: torch.nn.Module, path: str, prefix_strip: tuple[str, ...] = ("module.", "model.")) -> tuple[list[str], list[str]]:
    """Load a local checkpoint non-strictly into `model`; returns (missing, unexpected)."""
    file = Path(path)
    state = read_state_dict(file, "pretrained weights")
    cleaned = {}
    for k, v in state.items():
        for p in prefix_strip:
            if k.startswith(p):
                k = k[len(p):]
        cleaned[k] = v
    own = model.state_dict()
    compatible = {k: v for k, v in cleaned.items() if k in own and own[k].shape == v.shape}
    missing = sorted(set(own) - set(compatible))
    unexpected = sorted(set(cleaned) - set(compatible))
    model.load_state_dict(compatible, strict=False)
    log.info("loaded %s: %d tensors, %d missing, %d unexpected/mismatched", file, len(compatible), len(missing), len(unexpected))
    if missing:
        log.info("missing keys (first 10): %s", missing[:10])
    if unexpected:
        log.info("unexpected keys (first 10): %s", unexpected[:10])
    if not compatible:
        raise PipelineError(f"no tensor in {file} matches the model: wrong checkpoint for this backbone?")
    return missing, unexpected
