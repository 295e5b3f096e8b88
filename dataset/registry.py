"""Data sets by registry: `data.dataset` names a registered layout; an unknown name fails
loudly with the list of known ones. The base class never imports its subclasses: each layout
module registers itself, and the built-in ones are imported on first look-up.

    @register_dataset("voc12")
    class VOC12Dataset(SegmentationDataset): ...
"""
from __future__ import annotations

import importlib
from pathlib import Path

from pipeline.errors import PipelineError

_LAYOUTS: dict[str, type] = {}
_BUILTIN_MODULES = ("dataset.voc12", "dataset.coco", "dataset.folder")


def register_dataset(name: str):
    def decorator(cls):
        if name in _LAYOUTS and _LAYOUTS[name] is not cls:
            raise ValueError(f"data set {name!r} is registered twice")
        _LAYOUTS[name] = cls
        cls.name = name
        return cls
    return decorator


def dataset_names() -> list[str]:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return sorted(_LAYOUTS)


def build_dataset(data_cfg, cache_dir: str | Path | None = None):
    """The data set of a `data` config section."""
    names = dataset_names()
    cls = _LAYOUTS.get(data_cfg.dataset)
    if cls is None:
        raise PipelineError(f"config key 'data.dataset': unknown data set {data_cfg.dataset!r} "
                            f"(data sets: {', '.join(names)})")
    return cls(data_cfg.root, cache_dir)
