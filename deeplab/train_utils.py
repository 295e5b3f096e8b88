"""DeepLabv2 training helpers: optimiser parameter groups,
the multi-scale loss and the scale / crop / flip augmentation."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = 255
# ImageNet mean of RGB in 0..255: padding with it gives ~0 after the network's
# (x / 255 - mean) / std normalisation.
IMAGENET_MEAN_RGB = (124, 116, 104)
# deeplab-pytorch's mean for its Caffe-converted checkpoints: BGR order, subtracted on 0..255, no std
CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)


def deeplab_input(image: np.ndarray, input_norm: str, mean, std) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> the (3, H, W) float tensor DeepLab reads under `input_norm`
    ("imagenet": RGB, (x/255 - mean) / std; "caffe_bgr": BGR, x - CAFFE_MEAN_BGR)."""
    from pipeline.transforms import normalize, to_tensor

    if input_norm == "caffe_bgr":
        return to_tensor(image[..., ::-1].astype(np.float32) - np.asarray(CAFFE_MEAN_BGR, np.float32))
    if input_norm != "imagenet":
        raise ValueError(f"input_norm must be 'imagenet' or 'caffe_bgr', got {input_norm!r}")
    return to_tensor(normalize(image, mean, std))


def input_pad_rgb(input_norm: str, mean) -> tuple[int, int, int]:
    """The RGB uint8 colour that `deeplab_input` maps to ~0: the padding of training crops."""
    if input_norm == "caffe_bgr":
        return tuple(int(round(m)) for m in CAFFE_MEAN_BGR[::-1])
    return tuple(int(round(m * 255)) for m in mean)


def param_groups(model: nn.Module, base_lr: float, weight_decay: float, head_lr_mult: float = 10.0,
                 head_bias_lr_mult: float = 20.0) -> list[dict]:
    """SGD parameter groups of the DeepLabv2 recipe (Caffe's lr_mult/decay_mult):
    backbone weights lr x1 with weight decay, ASPP weights x`head_lr_mult`
    (10) with weight decay, ASPP biases x`head_bias_lr_mult` (20) without
    weight decay.

    Works on a DeepLabV2 or an MSC around one. Frozen parameters (BatchNorm)
    are left out; any other trainable parameter is an error, so that nothing
    is silently left untrained. Each group carries `lr_mult` (read by
    `set_poly_lr`) and a `name`; empty groups are dropped.
    """
    groups = {
        "backbone": {"params": [], "lr_mult": 1.0, "weight_decay": weight_decay},
        "aspp_weight": {"params": [], "lr_mult": float(head_lr_mult), "weight_decay": weight_decay},
        "aspp_bias": {"params": [], "lr_mult": float(head_bias_lr_mult), "weight_decay": 0.0},
    }
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        parts = name.split(".")
        if "aspp" in parts:
            groups["aspp_bias" if parts[-1] == "bias" else "aspp_weight"]["params"].append(parameter)
        elif "backbone" in parts:
            groups["backbone"]["params"].append(parameter)
        else:
            raise ValueError(f"parameter {name!r} is neither in the backbone nor in the ASPP head")
    return [
        {"name": name, "lr": base_lr * group["lr_mult"], **group}
        for name, group in groups.items() if group["params"]
    ]


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of (B, H, W) labels, sampling at pixel centres:
    output pixel i takes input pixel floor((i + 0.5) * H_in / H_out).

    This is what the reference does (PIL's NEAREST resize of each label map;
    its comment warns that F.interpolate's "nearest", which samples at
    floor(i * H_in / H_out), and cv2's INTER_NEAREST misalign the labels).
    Torch's "nearest-exact" is the pixel-centre rule.
    """
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    resized = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")
    return resized[:, 0].long()


def msc_loss(outputs: Sequence[torch.Tensor] | torch.Tensor, labels: torch.Tensor,
             ignore_index: int = IGNORE_INDEX, resolution: str = "logits") -> torch.Tensor:
    """Sum over outputs of the mean cross-entropy, pixels labelled `ignore_index`
    excluded. `resolution="logits"` (the reference): each (B, C, h, w) output is
    compared with the (B, H, W) labels resized to (h, w) by `resize_labels`;
    "labels": each output is bilinearly upsampled to (H, W) and every label
    pixel counts. An output with no valid pixel adds 0 (not NaN)."""
    if isinstance(outputs, torch.Tensor):
        outputs = [outputs]
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    if resolution not in ("logits", "labels"):
        raise ValueError(f"resolution must be 'logits' or 'labels', got {resolution!r}")
    total = outputs[0].new_zeros(())
    for logits in outputs:
        if resolution == "labels":
            logits = F.interpolate(logits, size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=False)
        target = resize_labels(labels, logits.shape[2:]).to(logits.device)
        if (target != ignore_index).any():
            total = total + F.cross_entropy(logits, target, ignore_index=ignore_index)
        else:
            total = total + 0.0 * logits.sum()  # keeps the graph connected
    return total


def random_scale_crop(image: np.ndarray, label: np.ndarray, crop: int, scale_range=(0.5, 1.5),
                      rng: np.random.Generator | None = None, scale_choices: Sequence[float] | None = None,
                      pad_rgb: Sequence[int] = IMAGENET_MEAN_RGB, flip: bool = True,
                      ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """Training augmentation of the DeepLabv2 recipe on (H, W, 3) uint8 / (H, W) uint8.

    1. Rescale both by s: uniform in `scale_range`, or drawn from
       `scale_choices` when given (the reference's VOC setting is
       (0.5, 0.75, 1.0, 1.25, 1.5)); new size floor(H * s) x floor(W * s);
       bilinear for the image, pixel-centre nearest for the label.
    2. Pad bottom and right up to `crop`: the image with `pad_rgb` (the
       normalisation mean, so ~0 after normalising), the label with 255.
    3. Random crop x crop window; 4. horizontal flip with probability 1/2.
    Returns C-contiguous arrays of the input dtypes.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if label.shape != image.shape[:2] or label.dtype != np.uint8:
        raise ValueError(f"label must be (H, W) uint8 matching the image {image.shape[:2]}, "
                         f"got {label.shape} {label.dtype}")
    if crop <= 0:
        raise ValueError(f"crop must be positive, got {crop}")
    rng = np.random.default_rng() if rng is None else rng

    scale = float(rng.choice(scale_choices)) if scale_choices is not None else float(rng.uniform(*scale_range))
    height, width = label.shape
    new_height, new_width = max(1, int(height * scale)), max(1, int(width * scale))
    if (new_height, new_width) != (height, width):
        image = cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, (new_width, new_height), interpolation=cv2.INTER_NEAREST_EXACT)

    pad_height, pad_width = max(crop - new_height, 0), max(crop - new_width, 0)
    if pad_height or pad_width:
        padded_image = np.empty((new_height + pad_height, new_width + pad_width, 3), dtype=np.uint8)
        padded_image[:] = np.asarray(pad_rgb, dtype=np.uint8)
        padded_image[:new_height, :new_width] = image
        padded_label = np.full(padded_image.shape[:2], ignore_index, dtype=np.uint8)
        padded_label[:new_height, :new_width] = label
        image, label = padded_image, padded_label

    top = int(rng.integers(0, label.shape[0] - crop + 1))
    left = int(rng.integers(0, label.shape[1] - crop + 1))
    image = image[top:top + crop, left:left + crop]
    label = label[top:top + crop, left:left + crop]
    if flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


class DeepLabCropDataset(torch.utils.data.Dataset):
    """DeepLab's training samples: `random_scale_crop` (a scale from `scales`, bottom/right padding
    with the colour `input_norm` maps to ~0, random crop, flip) of each image and its pseudo label (a
    catalogue artifact), as `deeplab_input`.
    Augmentation draws from (seed, epoch, index): a resumed run sees the same samples."""

    def __init__(self, dataset, ids, labels, crop: int, scales, mean, std, seed: int = 0,
                 input_norm: str = "imagenet"):
        self.dataset, self.ids, self.labels, self.crop = dataset, list(ids), labels, crop
        self.scales, self.mean, self.std, self.seed = tuple(scales), mean, std, seed
        self.input_norm = input_norm
        self.pad_rgb = input_pad_rgb(input_norm, mean)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int):
        from pipeline.errors import PipelineError
        from pipeline.trainer import decode_key

        epoch, index = decode_key(key, len(self.ids))
        image_id = self.ids[index]
        image, label = self.dataset.load_image(image_id), self.labels.read(image_id)
        if label.shape != image.shape[:2]:
            raise PipelineError(f"label {self.labels.path(image_id)} is {label.shape}, image "
                                f"{self.dataset.image_path(image_id)} is {image.shape[:2]}")
        image, label = random_scale_crop(image, label, self.crop, rng=np.random.default_rng([self.seed, epoch, index]),
                                         scale_choices=self.scales, pad_rgb=self.pad_rgb)
        return deeplab_input(image, self.input_norm, self.mean, self.std), torch.from_numpy(label).long(), index
