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
    """Images with a per-pixel label map (the IR labels) for train_irn: random rescale in
    `scale_range`, flip, pad (label 255) at a random offset and random crop. (DeepLab crops as its
    reference: deeplab/train_utils.DeepLabCropDataset.)"""

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


# ----------------------------------------------------------------------------- single-stage training views

def photometric(image: torch.Tensor, rng: np.random.Generator, jitter_p: float, gray_p: float,
                blur_p: float) -> torch.Tensor:
    """DINO/ToCo photometric augmentation of a (3, H, W) float image in [0, 1]: colour jitter
    (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a random order) with probability
    `jitter_p`, grayscale with `gray_p`, Gaussian blur (sigma U(0.1, 2.0)) with `blur_p`. Every
    draw comes from `rng`, so a sample's augmentation is a function of (seed, epoch, index)."""
    import torchvision.transforms.v2.functional as TF

    if rng.random() < jitter_p:
        ops = [(TF.adjust_brightness, rng.uniform(0.6, 1.4)), (TF.adjust_contrast, rng.uniform(0.6, 1.4)),
               (TF.adjust_saturation, rng.uniform(0.8, 1.2)), (TF.adjust_hue, rng.uniform(-0.1, 0.1))]
        for k in rng.permutation(len(ops)):
            op, factor = ops[k]
            image = op(image, float(factor))
    if rng.random() < gray_p:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if rng.random() < blur_p:
        sigma = float(rng.uniform(0.1, 2.0))
        kernel = 2 * int(round(3 * sigma)) + 1
        image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
    return image.clamp(0, 1)


def _normalised_tensor(image: torch.Tensor, mean, std) -> torch.Tensor:
    return (image - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def solarize(image: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Pixel values at or above `threshold` inverted (PIL's ImageOps.solarize at 128 on [0, 1])."""
    return torch.where(image >= threshold, 1.0 - image, image)


def random_resized_box(height: int, width: int, rng: np.random.Generator, scale=(0.4, 1.0),
                       ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop window: area fraction U(scale), log aspect ratio
    U(log ratio); ten tries, then the central crop clamped to the ratio range (torchvision's rule)."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


class SingleStageCropDataset(Dataset):
    """Training views of the single-stage methods (toco.md §4), per image:
    random rescale of both sides by U(rescale), flip, a crop×crop crop (zero padding at a random
    offset when smaller; `box` = (top, bottom, left, right) of the image inside the crop), then
    the network input: another flip, photometric augmentation (`augment`: jitter_p, gray_p,
    blur_p), normalisation. Returns (image (3, crop, crop), multi-hot (C,), box int64 (4,), index);
    a crop that holds no image at all is an error naming the image.

    With `views=True` (ToCo's class token contrast, toco.md §2.4, §4) three more follow:
    global view 2 (a RandomResizedCrop(crop, scale 0.4-1, bicubic) of the original image, flip,
    jitter 0.8, grayscale 0.2, blur 0.1, solarisation 0.2), the local-source image (the crop
    above with its own flip, jitter 0.8, grayscale 0.2, blur 0.5) and whether the local source
    is mirrored relative to the network input (bool)."""

    def __init__(self, dataset, ids, crop: int, rescale, mean, std, augment: dict, seed: int = 0,
                 views: bool = False):
        self.dataset, self.ids, self.crop, self.rescale = dataset, list(ids), crop, rescale
        self.mean, self.std, self.augment, self.seed, self.views = mean, std, augment, seed, views

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int):
        epoch, index = decode_key(key, len(self.ids))
        image_id = self.ids[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        image = self.dataset.load_image(image_id)
        scale = rng.uniform(self.rescale[0], self.rescale[1])
        image = resize(image, scaled_size(image.shape[:2], scale))
        if rng.random() < 0.5:
            image = image[:, ::-1]
        h, w = image.shape[:2]
        ph, pw = max(h, self.crop), max(w, self.crop)
        oy, ox = rng.integers(0, ph - h + 1), rng.integers(0, pw - w + 1)
        canvas = np.zeros((ph, pw, 3), np.uint8)
        canvas[oy:oy + h, ox:ox + w] = image
        y, x = rng.integers(0, ph - self.crop + 1), rng.integers(0, pw - self.crop + 1)
        crop = canvas[y:y + self.crop, x:x + self.crop]
        top, left = max(oy - y, 0), max(ox - x, 0)
        bottom, right = min(oy + h - y, self.crop), min(ox + w - x, self.crop)
        if bottom <= top or right <= left:      # the crop fell on padding only
            raise PipelineError(f"{self.dataset.image_path(image_id)}: a training crop holds no image "
                                f"(image {h}x{w} after rescaling, crop {self.crop})")
        box = np.array([top, bottom, left, right], np.int64)
        tensor = _as_tensor(crop)
        cropped = tensor
        input_flipped = bool(rng.random() < 0.5)      # the reference flips the network input once more
        if input_flipped:
            tensor = tensor.flip(-1)
            box = np.array([top, bottom, self.crop - right, self.crop - left], np.int64)
        a = self.augment
        tensor = photometric(tensor, rng, a.get("jitter_p", 0.0), a.get("gray_p", 0.0), a.get("blur_p", 0.0))
        sample = (_normalised_tensor(tensor, self.mean, self.std), torch.from_numpy(self.dataset.multi_hot(image_id)),
                  torch.from_numpy(box), index)
        if not self.views:
            return sample
        return sample + self.contrast_views(image_id, cropped, input_flipped, rng)

    def contrast_views(self, image_id: str, cropped: torch.Tensor, input_flipped: bool, rng):
        """(global view 2, local source, local source mirrored relative to the input)."""
        original = self.dataset.load_image(image_id)
        top, left, h, w = random_resized_box(*original.shape[:2], rng)
        window = resize(np.ascontiguousarray(original[top:top + h, left:left + w]), (self.crop, self.crop),
                            interpolation="bicubic")
        second = _as_tensor(window)
        if rng.random() < 0.5:
            second = second.flip(-1)
        second = photometric(second, rng, 0.8, 0.2, 0.1)
        if rng.random() < 0.2:
            second = solarize(second)
        local_flipped = bool(rng.random() < 0.5)
        local = cropped.flip(-1) if local_flipped else cropped
        local = photometric(local, rng, 0.8, 0.2, 0.5)
        return (_normalised_tensor(second, self.mean, self.std), _normalised_tensor(local, self.mean, self.std),
                torch.tensor(local_flipped != input_flipped))
