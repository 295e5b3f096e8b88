"""Your own images: a plain folder with an image-level labels file (`data.dataset: folder`).

    <root>/images/<id>.jpg|.jpeg|.png   any size; RGB, grayscale or RGBA (converted to RGB); EXIF orientation applied
    <root>/classes.txt                  one class name per line, in label order (1..C); background is 0, implicit
    <root>/labels.csv                   header `image,labels`; labels = class names separated by `;` (empty: background only)
    <root>/masks/<id>.png               optional ground truth: ids 0..C, 255 ignore; palette or grayscale, 8-bit
    <root>/splits/<name>.txt            optional: one image id per line; without it the split `all` is every row

Evaluation runs on the images of a split that have a mask (`eval_ids`); a split without any mask
has nothing to score, and the preflight leaves the eval stages out. Every problem in these files is
one error naming the file (and the line).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from dataset.base import SegmentationDataset, read_list_line
from dataset.registry import register_dataset
from pipeline.errors import PipelineError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
EXIF_ORIENTATION = 0x0112
# as ImageOps.exif_transpose: EXIF orientation -> the transpose that shows the picture upright
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")    # 16/32-bit grey: convert("RGB") would clip them


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened image, without decoding its pixels (a PNG's eXIf chunk
    is looked for before the pixel data only)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except (ValueError, TypeError, OSError, SyntaxError):   # a damaged EXIF block: show the pixels as stored
        return 1


def _check_depth(image: Image.Image, path) -> None:
    if image.mode in _WIDE_MODES:
        raise PipelineError(f"image {path} is a {image.mode} (16-bit or wider) image; save it as an 8-bit "
                            "RGB or grayscale JPEG/PNG")


def read_image(path) -> np.ndarray:
    """An image file as the data set sees it: (H, W, 3) uint8 RGB, upright by its EXIF orientation.
    A plain function, so the process-pool stages take it along to their workers."""
    try:
        with Image.open(path) as image:
            _check_depth(image, path)
            upright = _UPRIGHT.get(_orientation(image))
            rgb = image.convert("RGB")
            if upright is not None:
                rgb = rgb.transpose(upright)
            return np.asarray(rgb, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise PipelineError(f"missing image: {path}") from None
    except OSError as e:
        raise PipelineError(f"corrupt or unreadable image {path}: {e}") from None


def image_size(path) -> tuple[int, int]:
    """(H, W) of an image as `read_image` returns it, from its header; checks it opens and its depth."""
    try:
        with Image.open(path) as image:
            _check_depth(image, path)
            width, height = image.size
            if _orientation(image) in (5, 6, 7, 8):
                width, height = height, width
            return height, width
    except FileNotFoundError:
        raise PipelineError(f"missing image: {path}") from None
    except OSError as e:
        raise PipelineError(f"corrupt or unreadable image {path}: {e}") from None


def read_classes(path: Path) -> list[str]:
    if not path.is_file():
        raise PipelineError(f"{path} not found: the folder layout needs one class name per line")
    names, seen = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if name.lower() == "background":
            raise PipelineError(f"{path}, line {number}: 'background' is implicit (label 0); list foreground "
                                "classes only")
        if name in seen:
            raise PipelineError(f"{path}, line {number}: class '{name}' is listed twice (first on line {seen[name]})")
        seen[name] = number
        names.append(name)
    if not names:
        raise PipelineError(f"{path} lists no class")
    return names


def read_labels(path: Path, classes: list[str]) -> tuple[dict[str, list[int]], dict[str, int]]:
    """(image id -> sorted foreground class indices (0-based), in file order; image id -> its line)."""
    if not path.is_file():
        raise PipelineError(f"{path} not found: the folder layout needs `image,labels` rows")
    index = {name: i for i, name in enumerate(classes)}
    rows: dict[str, list[int]] = {}
    first_line: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["image", "labels"]:
            raise PipelineError(f"{path}, line 1: the header must be `image,labels`, got {header!r}")
        for number, row in enumerate(reader, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) > 2:
                raise PipelineError(f"{path}, line {number}: expected 2 columns (image, labels), got {len(row)}; "
                                    "separate class names with ';'")
            image_id = Path(row[0].strip()).stem if Path(row[0].strip()).suffix.lower() in IMAGE_SUFFIXES \
                else row[0].strip()
            if not image_id:
                raise PipelineError(f"{path}, line {number}: empty image id")
            if image_id in rows:
                raise PipelineError(f"{path}, line {number}: image '{image_id}' already has a row "
                                    f"(line {first_line[image_id]})")
            names = [n.strip() for n in (row[1] if len(row) > 1 else "").split(";") if n.strip()]
            unknown = [n for n in names if n not in index]
            if unknown:
                raise PipelineError(f"{path}, line {number}: unknown class '{unknown[0]}' (classes.txt lists: "
                                    f"{', '.join(classes[:12])}{' ...' if len(classes) > 12 else ''})")
            rows[image_id] = sorted({index[n] for n in names})
            first_line[image_id] = number
    if not rows:
        raise PipelineError(f"{path} has no image rows")
    return rows, first_line


@register_dataset("folder")
class FolderDataset(SegmentationDataset):
    read_image = staticmethod(read_image)     # upright by EXIF; RGBA / grayscale / palette to RGB; 16-bit refused

    def __init__(self, root: str | Path, cache_dir: str | Path | None = None):
        super().__init__(root, cache_dir)
        names = read_classes(self.root / "classes.txt")
        self.class_names = ("background", *names)
        self._rows, row_lines = read_labels(self.root / "labels.csv", names)
        self._images = self._index_images()
        self._sizes: dict[str, tuple[int, int]] = {}
        self._validated: set[str] = set()
        missing = [i for i in self._rows if i not in self._images]
        if missing:
            raise PipelineError(f"{self.root / 'labels.csv'}, line {row_lines[missing[0]]}: image '{missing[0]}' "
                                f"has no file in {self.root / 'images'} (.jpg, .jpeg or .png)"
                                + (f"; {len(missing) - 1} more rows lack one" if len(missing) > 1 else ""))
        orphans = [i for i in self._images if i not in self._rows]
        if orphans:
            raise PipelineError(f"{self._images[orphans[0]]} has no row in {self.root / 'labels.csv'} (give it a "
                                "row; an empty labels cell means background only)"
                                + (f"; {len(orphans) - 1} more images lack one" if len(orphans) > 1 else ""))
        masks = self.root / "masks"
        stray = sorted(p for p in masks.glob("*.png") if p.stem not in self._rows and not p.name.startswith(".")) \
            if masks.is_dir() else []
        if stray:   # a misnamed mask would silently never be scored
            raise PipelineError(f"mask {stray[0]} has no image of that id (no row in {self.root / 'labels.csv'})"
                                + (f"; {len(stray) - 1} more masks lack one" if len(stray) > 1 else ""))

    def _index_images(self) -> dict[str, Path]:
        folder = self.root / "images"
        if not folder.is_dir():
            raise PipelineError(f"image folder not found: {folder}")
        found: dict[str, Path] = {}
        for path in sorted(folder.iterdir()):
            # hidden files (e.g. macOS's ._IMG_1.jpg) are not pictures
            if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith(".") or not path.is_file():
                continue
            if path.stem in found:
                raise PipelineError(f"{path} and {found[path.stem]} share the image id '{path.stem}'")
            found[path.stem] = path
        return found

    # -- layout rules ------------------------------------------------------------------
    def _read_split(self, split: str) -> list[str]:
        list_file = self.root / "splits" / f"{split}.txt"
        if list_file.exists():
            ids: list[str] = []
            seen: dict[str, int] = {}
            for number, line in enumerate(list_file.read_text(encoding="utf-8-sig").splitlines(), start=1):
                if not line.strip():
                    continue
                image_id = read_list_line(line)
                if image_id in seen:
                    raise PipelineError(f"{list_file}, line {number}: image '{image_id}' is listed twice "
                                        f"(line {seen[image_id]})")
                if image_id not in self._rows:
                    raise PipelineError(f"{list_file}, line {number}: image '{image_id}' has no row in "
                                        f"{self.root / 'labels.csv'}")
                seen[image_id] = number
                ids.append(image_id)
            return ids
        if split == "all":
            return list(self._rows)
        raise PipelineError(f"split list not found: {list_file} (without splits/, the one split is 'all')")

    def image_path(self, image_id: str) -> Path:
        return self._images.get(image_id, self.root / "images" / f"{image_id}.jpg")

    def mask_path(self, image_id: str) -> Path:
        return self.root / "masks" / f"{image_id}.png"

    def label_sources(self, ids: list[str]) -> list[Path]:
        return [self.root / "labels.csv", self.root / "classes.txt"]

    def _derive_labels(self, image_id: str) -> list[int]:
        if image_id not in self._rows:
            raise PipelineError(f"image '{image_id}' has no row in {self.root / 'labels.csv'}")
        return list(self._rows[image_id])

    def validate(self, split: str, needs: tuple[str, ...]) -> None:
        """Every image of the split opens and is 8-bit (its header: decoding every picture at each
        start would take long), and every mask it has is an 8-bit map of ids 0..C (or 255) of its
        upright image's size, whatever the stage needs: the DeepLab stages score their split's
        masks after training, too late to find a bad one. Each split is checked once per object."""
        if split in self._validated:
            return
        for image_id in self.ids(split):
            if image_id not in self._sizes:
                self._sizes[image_id] = image_size(self.image_path(image_id))
        for image_id in self.eval_ids(split):
            self.load_mask(image_id, size_hw=self._sizes[image_id])
        self._validated.add(split)

    # -- evaluation on the masked images ---------------------------------------------------
    def has_masks(self, split: str) -> bool:
        return bool(self.eval_ids(split))

    def eval_ids(self, split: str) -> list[str]:
        return [i for i in self.ids(split) if self.mask_path(i).exists()]

    def load_mask(self, image_id: str, size_hw: tuple[int, int] | None = None) -> np.ndarray:
        path = self.mask_path(image_id)
        try:
            with Image.open(path) as image:
                if image.mode in _WIDE_MODES:
                    raise PipelineError(f"mask {path} is a {image.mode} (16-bit or float) image; save masks as "
                                        "8-bit palette or grayscale PNGs of class ids")
        except FileNotFoundError:
            raise PipelineError(f"ground-truth mask missing: {path}") from None
        except OSError as e:
            raise PipelineError(f"corrupt or unreadable mask {path}: {e}") from None
        return super().load_mask(image_id, size_hw)
