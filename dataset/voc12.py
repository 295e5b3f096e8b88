"""PASCAL VOC 2012 (`VOCdevkit/VOC2012`), with image-level labels from the XML annotations."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from pipeline import artifacts
from dataset.classes import VOC_CLASSES
from dataset.base import SegmentationDataset, read_list_file
from dataset.registry import register_dataset
from pipeline.errors import PipelineError

_CLASS_INDEX = {name: i - 1 for i, name in enumerate(VOC_CLASSES) if i > 0}


@register_dataset("voc12")
class VOC12Dataset(SegmentationDataset):
    name = "voc12"
    class_names = VOC_CLASSES

    def _read_split(self, split: str) -> list[str]:
        list_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if list_file.exists():
            return read_list_file(list_file)
        if split == "train_aug":
            # train_aug = every SegmentationClassAug mask minus the val images.
            aug = self.root / "SegmentationClassAug"
            if not aug.is_dir():
                raise PipelineError(
                    f"split 'train_aug' needs {list_file} or the folder {aug} (SBD augmented masks)"
                )
            val_file = self.root / "ImageSets" / "Segmentation" / "val.txt"
            val = set(read_list_file(val_file)) if val_file.exists() else set()
            return sorted(p.stem for p in aug.glob("*.png") if p.stem not in val)
        raise PipelineError(f"split list not found: {list_file}")

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        # SegmentationClassAug covers train_aug; SegmentationClass has the official masks.
        official = self.root / "SegmentationClass" / f"{image_id}.png"
        if official.exists():
            return official
        return self.root / "SegmentationClassAug" / f"{image_id}.png"

    def instance_mask_path(self, image_id: str) -> Path:
        """SegmentationObject PNG: instance index 1..n per pixel, 0 background, 255 void."""
        return self.root / "SegmentationObject" / f"{image_id}.png"

    def has_instance_masks(self, split: str) -> bool:
        return all(self.instance_mask_path(i).exists() for i in self.ids(split))

    def load_instance_mask(self, image_id: str) -> np.ndarray:
        path = self.instance_mask_path(image_id)
        if not path.exists():
            raise PipelineError(f"instance ground truth missing: {path} (SegmentationObject is needed by eval_ins_seg)")
        return artifacts.load_label_png(path)

    def annotation_path(self, image_id: str) -> Path:
        return self.root / "Annotations" / f"{image_id}.xml"

    def label_sources(self, ids: list[str]) -> list[Path]:
        return [self.annotation_path(i) for i in ids]

    def _derive_labels(self, image_id: str) -> list[int]:
        path = self.annotation_path(image_id)
        try:
            tree = ET.parse(path)
        except FileNotFoundError:
            raise PipelineError(f"annotation missing: {path}") from None
        except ET.ParseError as e:
            raise PipelineError(f"corrupt annotation {path}: {e}") from None
        labels = set()
        for obj in tree.getroot().iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in _CLASS_INDEX:
                raise PipelineError(f"annotation {path} names unknown class {name!r}")
            labels.add(_CLASS_INDEX[name])
        return sorted(labels)
