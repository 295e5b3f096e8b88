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


def load_non_strict(module: torch.nn.Module, state: dict, source: str | Path,
                    min_share: float = 0.0) -> tuple[list[str], list[str]]:
    """The one non-strict loader: copy every tensor of `state` whose name and shape match
    `module`'s, log a report of matched / missing / unexpected keys, and return
    (missing, unexpected). Fails naming `source` when nothing matches, or when fewer than
    `min_share` of the module's tensors are matched (a file for another model)."""
    own = module.state_dict()
    compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    # BatchNorm's batch counter is unused (statistics are frozen) and absent from many files.
    missing = sorted(k for k in set(own) - set(compatible) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(compatible))
    if not compatible:
        raise PipelineError(f"no tensor in {source} matches the model: wrong file for this model?")
    share = len(compatible) / max(len([k for k in own if not k.endswith("num_batches_tracked")]), 1)
    if share < min_share:
        raise PipelineError(f"{source} matches only {share:.0%} of the model's tensors ({len(compatible)} of "
                            f"{len(own)}; at least {min_share:.0%} expected): a file for another model?")
    module.load_state_dict(compatible, strict=False)
    log_load_report(source, len(compatible), missing, unexpected, "unexpected or mismatched")
    return missing, unexpected


def log_load_report(source, matched: int, missing: list, unexpected: list, unexpected_word: str = "unexpected",
                    note: str = "", logger: logging.Logger = log) -> None:
    """The log lines of a weights load, on `logger`: the counts, then the first 10 missing /
    unexpected keys."""
    logger.info("loaded %s: %d tensors matched, %d missing, %d %s%s", source, matched, len(missing), len(unexpected),
             unexpected_word, note)
    if missing:
        logger.info("missing keys (first 10): %s", missing[:10])
    if unexpected:
        logger.info("unexpected keys (first 10): %s", unexpected[:10])


def strip_prefixes(state: dict, prefixes: tuple[str, ...]) -> dict:
    """Drop wrapper prefixes such as DDP's "module." from every key."""
    cleaned = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def load_local_weights(model: torch.nn.Module, path: str) -> tuple[list[str], list[str]]:
    """Pretrained backbone weights from a local file, loaded non-strictly."""
    state = strip_prefixes(read_state_dict(path, "pretrained weights"), ("module.", "model."))
    return load_non_strict(model, state, path)


def copy_backbone_from(backbone: torch.nn.Module, weights_file: Path, device="cpu") -> int:
    """Copy the `backbone.*` tensors of another of this run's models (the CAM CNN branch) into
    `backbone` (same timm architecture); returns the count. For runs without ImageNet weights
    (the CPU demo): a random frozen backbone sees little, the CAM branch has learnt this data."""
    from net.registry import read_model_file

    state = read_model_file(weights_file, device)["state_dict"]
    own = {key[len("backbone."):]: value for key, value in state.items() if key.startswith("backbone.")}
    missing, _ = load_non_strict(backbone, own, f"{weights_file} (init_from_cam)")
    return len(backbone.state_dict()) - len(missing)
