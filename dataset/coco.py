"""MS COCO 2014 in VOC style: `JPEGImages/{train2014,val2014}/*.jpg` and
`SegmentationClass/{train2014,val2014}/*.png` with labels 0 = background,
1..80 = the COCO categories in their standard order, 255 = ignore.
Image-level labels are derived from the masks."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dataset.classes import COCO_CATEGORY_IDS, COCO_CLASSES
from dataset.base import SegmentationDataset, read_list_file
from dataset.registry import register_dataset
from pipeline.errors import PipelineError

SPLIT_ALIASES = {"train": "train2014", "val": "val2014", "train2014": "train2014", "val2014": "val2014"}


def category_id_to_label(category_id: int) -> int:
    """COCO's sparse category id (1..90) to the contiguous label 1..80."""
    try:
        return COCO_CATEGORY_IDS.index(category_id) + 1
    except ValueError:
        raise PipelineError(f"{category_id} is not a COCO category id") from None


def label_to_category_id(label: int) -> int:
    if not 1 <= label <= 80:
        raise PipelineError(f"COCO label {label} is outside 1..80")
    return COCO_CATEGORY_IDS[label - 1]


def split_folder(image_id: str) -> str:
    """'COCO_train2014_000000000009' -> 'train2014'."""
    parts = image_id.split("_")
    if len(parts) >= 3 and parts[1] in ("train2014", "val2014"):
        return parts[1]
    raise PipelineError(f"cannot tell the COCO split of image id {image_id!r} (expected COCO_<split>_<number>)")


@register_dataset("coco")
class COCODataset(SegmentationDataset):
    name = "coco"
    class_names = COCO_CLASSES

    def _read_split(self, split: str) -> list[str]:
        list_file = self.root / "ImageSets" / f"{split}.txt"
        if list_file.exists():
            return read_list_file(list_file)
        folder = SPLIT_ALIASES.get(split)
        if folder is None:
            raise PipelineError(f"COCO split '{split}': expected train2014 / val2014 (or a list file {list_file})")
        images = self.root / "JPEGImages" / folder
        if not images.is_dir():
            raise PipelineError(f"COCO image folder not found: {images}")
        return sorted(p.stem for p in images.glob("*.jpg"))

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / split_folder(image_id) / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        return self.root / "SegmentationClass" / split_folder(image_id) / f"{image_id}.png"

    def label_sources(self, ids: list[str]) -> list[Path]:
        return [self.mask_path(i) for i in ids]

    def _derive_labels(self, image_id: str) -> list[int]:
        mask = self.load_mask(image_id)
        values = np.unique(mask)
        values = values[(values != 0) & (values != 255)]
        if values.size and values.max() > 80:
            raise PipelineError(f"mask {self.mask_path(image_id)} holds label {int(values.max())} > 80")
        return [int(v) - 1 for v in values]
