"""The data set interface every registered layout implements (VOC, COCO, ...).

A data set knows its split lists, where each image and mask lives, and the
image-level labels of each image (foreground class indices 0..C-1, i.e. label
id − 1). Labels are derived once (from XML or masks) and cached in a JSON file
keyed by a signature of the source files, so a change to them invalidates it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from pipeline import artifacts
from pipeline.errors import PipelineError

log = logging.getLogger("wsss")


class SegmentationDataset:
    """Base class. Subclasses set `name`, `class_names` and implement the path and label rules."""

    name = "base"
    class_names: tuple[str, ...] = ()
    # image file -> (H, W, 3) uint8 RGB; a plain function, so process-pool stages (CRF) read
    # images in their workers exactly as `load_image` does
    read_image = staticmethod(artifacts.load_rgb)

    def __init__(self, root: str | Path, cache_dir: str | Path | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise PipelineError(f"data.root does not exist or is not a folder: {self.root}")
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._labels: dict[str, list[int]] | None = None
        self._ids: dict[str, list[str]] = {}

    # -- layout rules (subclasses) -------------------------------------------------
    def _read_split(self, split: str) -> list[str]:
        raise NotImplementedError  # abstract: each layout lists its splits differently

    def image_path(self, image_id: str) -> Path:
        raise NotImplementedError  # abstract

    def mask_path(self, image_id: str) -> Path:
        raise NotImplementedError  # abstract

    def label_sources(self, ids: list[str]) -> list[Path]:
        """Files the image-level labels are derived from (their stats key the cache)."""
        raise NotImplementedError  # abstract

    def _derive_labels(self, image_id: str) -> list[int]:
        raise NotImplementedError  # abstract

    # -- shared behaviour ----------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of foreground classes (model outputs)."""
        return len(self.class_names) - 1

    def ids(self, split: str) -> list[str]:
        if split not in self._ids:
            ids = self._read_split(split)
            if not ids:
                raise PipelineError(f"split '{split}' of {self.root} is empty")
            self._ids[split] = ids
        return self._ids[split]

    def check_images(self, split: str) -> None:
        missing = [i for i in self.ids(split) if not self.image_path(i).exists()]
        if missing:
            raise PipelineError(
                f"split '{split}' names {len(missing)} image(s) missing from {self.root}, e.g. {self.image_path(missing[0])}"
            )

    def has_masks(self, split: str) -> bool:
        return all(self.mask_path(i).exists() for i in self.ids(split))

    def validate(self, split: str, needs: tuple[str, ...]) -> None:
        """Check, before any stage runs, what the stages need of `split` ("images", "masks", ...)
        beyond existence. The big public layouts skip it (reading every file would take long);
        a user's own folder is checked file by file."""

    def eval_ids(self, split: str) -> list[str]:
        """The images of `split` that evaluation scores (layouts with partial ground truth: those
        that have a mask)."""
        return self.ids(split)

    def has_instance_masks(self, split: str) -> bool:
        """Instance ground truth (eval_ins_seg); layouts without it answer False."""
        return False

    def load_image(self, image_id: str) -> np.ndarray:
        return self.read_image(self.image_path(image_id))

    def load_mask(self, image_id: str, size_hw: tuple[int, int] | None = None) -> np.ndarray:
        """The ground-truth label ids of an image, checked: ids 0..C or 255, and (when given)
        the image's size."""
        path = self.mask_path(image_id)
        if not path.exists():
            raise PipelineError(f"ground-truth mask missing: {path}")
        mask = artifacts.load_label_png(path)
        bad = mask[(mask != 255) & (mask >= len(self.class_names))]
        if bad.size:
            raise PipelineError(f"mask {path} holds label {int(bad.max())}; this data set has labels "
                                f"0..{len(self.class_names) - 1} and 255 (ignore)")
        if size_hw is not None and mask.shape != tuple(size_hw):
            raise PipelineError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]}, its image "
                                f"{self.image_path(image_id)} is {size_hw[1]}x{size_hw[0]}")
        return mask

    def class_labels(self, image_id: str) -> np.ndarray:
        """Foreground class indices (0-based) present in the image."""
        labels = self._all_labels().get(image_id)
        if labels is None:
            labels = self._derive_labels(image_id)
            self._labels[image_id] = labels  # type: ignore[index]
        return np.asarray(labels, dtype=np.int64)

    def multi_hot(self, image_id: str) -> np.ndarray:
        target = np.zeros(self.num_classes, dtype=np.float32)
        target[self.class_labels(image_id)] = 1.0
        return target

    def _all_labels(self) -> dict[str, list[int]]:
        if self._labels is not None:
            return self._labels
        self._labels = {}
        return self._labels

    def load_label_cache(self, splits: list[str]) -> None:
        """Derive (or read from the cache) the labels of every image of `splits`."""
        ids = sorted({i for s in splits for i in self.ids(s)})
        sources = self.label_sources(ids)
        digest = hashlib.sha256()
        digest.update(str(self.root.resolve()).encode())
        for path in sources:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise PipelineError(f"label source missing: {path}") from None
            digest.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        signature = digest.hexdigest()[:20]
        cache = self.cache_dir / f"{self.name}_labels_{signature}.json" if self.cache_dir else None
        if cache is not None and cache.exists():
            try:
                self._labels = {**self._all_labels(), **json.loads(cache.read_text())}
                return
            except json.JSONDecodeError:
                log.warning("ignoring corrupt label cache %s", cache)
        labels = {i: self._derive_labels(i) for i in ids}
        self._labels = {**self._all_labels(), **labels}
        if cache is not None:
            artifacts.save_json(cache, labels)


def read_list_file(path: Path) -> list[str]:
    """A split list: one id per line (extra columns ignored, e.g. 'id label' lists)."""
    return [read_list_line(line) for line in path.read_text().splitlines() if line.strip()]


def read_list_line(line: str) -> str:
    """The image id of one non-empty line of a split list."""
    return Path(line.split()[0]).stem
