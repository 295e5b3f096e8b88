"""Image transforms and torch data sets shared by the training and inference stages."""
from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.classes import IGNORE_LABEL
from pipeline.errors import PipelineError
from pipeline.trainer import decode_key


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> float32 (H, W, 3): (x/255 − mean) / std."""
    return ((image.astype(np.float32) / 255.0) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, C) float -> (C, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def resize(image: np.ndarray, size_hw: tuple[int, int], nearest: bool = False,
           interpolation: str = "bilinear") -> np.ndarray:
    """Resize an (H, W[, C]) array. `interpolation` "bicubic" uses PIL's bicubic filter on uint8
    RGB, as CRT/IRNet rescale their images; "bilinear" uses OpenCV; `nearest` for label maps."""
    h, w = size_hw
    if image.shape[:2] == (h, w):
        return image
    if interpolation == "bicubic" and not nearest and image.dtype == np.uint8 and image.ndim == 3:
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_NEAREST_EXACT if nearest else cv2.INTER_LINEAR)


def scaled_size(shape_hw, scale: float) -> tuple[int, int]:
    return max(1, int(round(shape_hw[0] * scale))), max(1, int(round(shape_hw[1] * scale)))


def random_crop(image: np.ndarray, crop: int, rng: np.random.Generator, label: np.ndarray | None = None,
                image_fill: float = 0.0):
    """Pad to at least crop×crop (image with `image_fill`, label with 255), then crop at a random place."""
    h, w = image.shape[:2]
    ph, pw = max(crop, h), max(crop, w)
    if (ph, pw) != (h, w):
        padded = np.full((ph, pw) + image.shape[2:], image_fill, dtype=image.dtype)
        # place the image at a random offset inside the padding, as the reference does
        oy, ox = rng.integers(0, ph - h + 1), rng.integers(0, pw - w + 1)
        padded[oy:oy + h, ox:ox + w] = image
        image = padded
        if label is not None:
            plab = np.full((ph, pw), IGNORE_LABEL, dtype=label.dtype)
            plab[oy:oy + h, ox:ox + w] = label
            label = plab
    y = rng.integers(0, ph - crop + 1)
    x = rng.integers(0, pw - crop + 1)
    image = image[y:y + crop, x:x + crop]
    if label is not None:
        label = label[y:y + crop, x:x + crop]
    return image, label


class ClassificationDataset(Dataset):
    """Images with multi-hot image-level labels, for train_cam.

    Training: random long-side resize in `resize_long`, horizontal flip, random crop.
    Validation (train=False): long side resized to `crop` (no randomness), padded to crop×crop.
    """

    def __init__(self, dataset, ids, crop: int, resize_long, mean, std, train: bool = True, seed: int = 0,
                 interpolation: str = "bilinear"):
        self.dataset, self.ids, self.crop = dataset, list(ids), crop
        self.resize_long, self.mean, self.std, self.train, self.seed = resize_long, mean, std, train, seed
        self.interpolation = interpolation

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int):
        epoch, index = decode_key(key, len(self.ids))
        image_id = self.ids[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        image = self.dataset.load_image(image_id)
        h, w = image.shape[:2]
        target_long = rng.integers(self.resize_long[0], self.resize_long[1] + 1) if self.train else self.crop
        image = resize(image, scaled_size((h, w), target_long / max(h, w)), interpolation=self.interpolation)
        if self.train and rng.random() < 0.5:
            image = image[:, ::-1]
        image = normalize(image, self.mean, self.std)
        if self.train:
            image, _ = random_crop(image, self.crop, rng)
        else:
            padded = np.zeros((self.crop, self.crop, 3), np.float32)
            padded[:image.shape[0], :image.shape[1]] = image[:self.crop, :self.crop]
            image = padded
        return to_tensor(image), torch.from_numpy(self.dataset.multi_hot(image_id)), index


class SegmentationCropDataset(Dataset):
    """Images with a per-pixel label map (IR labels or pseudo labels) for train_irn / train_deeplab:
    random rescale in `scale_range`, flip, pad (label 255) and random crop."""

    def __init__(self, dataset, ids, labels, crop: int, scale_range, mean, std, seed: int = 0):
        """`labels`: the catalogue's artifact holding the label maps (ir_label or sem_seg)."""
        self.dataset, self.ids, self.labels, self.crop = dataset, list(ids), labels, crop
        self.scale_range, self.mean, self.std, self.seed = scale_range, mean, std, seed

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int):
        epoch, index = decode_key(key, len(self.ids))
        image_id = self.ids[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        image = self.dataset.load_image(image_id)
        label = self.labels.read(image_id)
        if label.shape != image.shape[:2]:
            raise PipelineError(f"label {self.labels.path(image_id)} is {label.shape}, image "
                                f"{self.dataset.image_path(image_id)} is {image.shape[:2]}")
        scale = rng.uniform(self.scale_range[0], self.scale_range[1])
        size = scaled_size(image.shape[:2], scale)
        image, label = resize(image, size), resize(label, size, nearest=True)
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        image = normalize(image, self.mean, self.std)
        image, label = random_crop(image, self.crop, rng, label=label)
        return to_tensor(image), torch.from_numpy(np.ascontiguousarray(label)).long(), index
