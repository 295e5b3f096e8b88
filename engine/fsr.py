"""FSR's training parts (methods/fsr.md §2-§4): the two global views, the uncertainty-guided block
mask of view 2, the EMA and teacher-temperature schedules, and the two DINO-style self-distillation
terms registered with the single-stage engine:

    dino_cls    cer.FSR: the teacher's (centred, sharpened) class-token distribution of view 1
                against the student's aggregated token of the masked view 2
    dino_patch  unc.FSR: the teacher's unmasked view-2 patch distributions against the student's
                masked view-2 patches, on the masked positions only

Both share one `prepare` (`fsr_prepare`): it builds view 2's mask and hands view 2 and the mask to
the network's forward (so DDP sees the student's view-2 outputs). The teacher's projections are
computed once per iteration and shared. Every numeric core is a pure function of tensors here;
tests/test_fsr.py checks each against a slow explicit version.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from engine.terms import Step, register_term
from pipeline.errors import PipelineError

# ----------------------------------------------------------------------------- schedules


def cosine_momentum(iteration: int, total: int, start: float = 0.9995, end: float = 1.0) -> float:
    """The EMA momentum of `iteration` (0-based) of `total`: cosine from `start` at 0 to `end` at
    `total`: end − (end − start)·(1 + cos(π·it/T))/2 (fsr.md §1.4)."""
    if total <= 0:
        raise ValueError(f"total iterations must be positive, got {total}")
    it = min(max(iteration, 0), total)
    return end - (end - start) * (1.0 + math.cos(math.pi * it / total)) / 2.0


def teacher_temperature(iteration: int, start: float = 0.04, end: float = 0.07, warmup: int = 2500) -> float:
    """DINO's teacher temperature: linear from `start` to `end` over the first `warmup`
    iterations (np.linspace(start, end, warmup)[it]), then `end`."""
    if warmup <= 1 or iteration >= warmup - 1:
        return end
    return start + (end - start) * iteration / (warmup - 1)


# ----------------------------------------------------------------------------- masking


def block_grid(height: int, width: int, block: int, patch: int) -> tuple[int, int]:
    """The number of mask blocks per side; the input must tile exactly into blocks, and a block
    into tokens (the reference's mask generator assumes 448² inputs, fsr.md §2.3)."""
    if block % patch:
        raise PipelineError(f"train_net.fsr.mask_block {block} is not a multiple of the patch size {patch}")
    if height % block or width % block:
        raise PipelineError(f"train_net.fsr.mask_block {block} does not tile the {height}x{width} training view "
                            "(train_net.crop_size must be a multiple of it)")
    return height // block, width // block


def masked_count(blocks: int, ratio: float) -> int:
    """⌈blocks · ratio⌉ blocks are masked per image (49 · 0.4 → 20)."""
    return int(math.ceil(blocks * ratio - 1e-9))


def uncertain_blocks(aux_cams: Tensor, targets: Tensor, grid: tuple[int, int], low: float = 0.2,
                     high: float = 0.7) -> Tensor:
    """(B, gh, gw) bool: blocks whose sampled pixel is uncertain, i.e. low < max over the image's
    classes of the multi-scale aux CAM < high; the pixel map is sampled to the block grid by
    nearest interpolation (one pixel per block, its top-left one), as the reference."""
    value = (aux_cams * targets[:, :, None, None].to(aux_cams.dtype)).amax(dim=1)
    uncertain = (value > low) & (value < high)
    return F.interpolate(uncertain[:, None].float(), size=grid, mode="nearest")[:, 0] > 0.5


def block_mask(batch: int, grid: tuple[int, int], ratio: float, uncertain: Tensor | None = None,
               device=None, generator: torch.Generator | None = None) -> Tensor:
    """(B, gh, gw) bool with exactly ⌈gh·gw·ratio⌉ masked blocks per image. Random strategy
    (`uncertain` None): the blocks with the largest uniform noise. Uncertainty-guided: +1 on the
    uncertain blocks' noise, so they are masked first (a random subset of them if there are more),
    then random others."""
    n = grid[0] * grid[1]
    noise = torch.rand(batch, n, device=device, generator=generator)
    if uncertain is not None:
        noise = noise + uncertain.reshape(batch, n).to(noise.dtype)
    chosen = noise.topk(masked_count(n, ratio), dim=1).indices
    mask = torch.zeros(batch, n, dtype=torch.bool, device=noise.device)
    mask.scatter_(1, chosen, True)
    return mask.reshape(batch, *grid)


def blocks_to_tokens(mask: Tensor, tokens_per_block: int) -> Tensor:
    """(B, gh, gw) block mask -> (B, gh·k, gw·k) token mask (each block covers k×k tokens)."""
    return mask.repeat_interleave(tokens_per_block, 1).repeat_interleave(tokens_per_block, 2)


# ----------------------------------------------------------------------------- DINO losses


def dino_class_loss(student: Tensor, teacher: Tensor, center: Tensor, student_temp: float,
                    teacher_temp: float) -> Tensor:
    """mean_b −Σ_k softmax((t − c)/τ_t)_k · log_softmax(s/τ_s)_k; student, teacher (B, P)."""
    target = torch.softmax((teacher - center) / teacher_temp, dim=-1).detach()
    return -(target * F.log_softmax(student / student_temp, dim=-1)).sum(-1).mean()


def dino_patch_loss(student: Tensor, teacher: Tensor, mask: Tensor, center: Tensor, student_temp: float,
                    teacher_temp: float) -> Tensor:
    """mean_b [Σ_{n masked} CE_n / max(1, #masked_b)], CE_n as dino_class_loss per token;
    student, teacher (B, N, P), mask (B, N) bool."""
    target = torch.softmax((teacher - center) / teacher_temp, dim=-1).detach()
    ce = -(target * F.log_softmax(student / student_temp, dim=-1)).sum(-1)
    m = mask.to(ce.dtype)
    return ((ce * m).sum(1) / m.sum(1).clamp(min=1.0)).mean()


@torch.no_grad()
def update_center(center: Tensor, batch_mean: Tensor, momentum: float = 0.9) -> None:
    """c ← m·c + (1 − m)·mean, in place; the mean is averaged over the processes under torchrun."""
    mean = batch_mean.detach().to(center.dtype).clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(mean)
        mean /= torch.distributed.get_world_size()
    center.mul_(momentum).add_(mean, alpha=1.0 - momentum)


# ----------------------------------------------------------------------------- views


class FsrViewsDataset(Dataset):
    """FSR's training views (fsr.md §4), per image, two independent global views, each:
    RandomResizedCrop(crop, scale, ratio 3/4-4/3, bicubic) → flip p 0.5 → colour jitter
    (0.4, 0.4, 0.2, 0.1) with p `jitter_p` → normalisation. Returns (view 1, multi-hot, box
    (0, crop, 0, crop): the crop never pads, index, view 2). Augmentation is a pure function of
    (seed, epoch, index)."""

    def __init__(self, dataset, ids, crop: int, mean, std, scale=(0.32, 1.0), jitter_p: float = 0.5, seed: int = 0):
        self.dataset, self.ids, self.crop = dataset, list(ids), crop
        self.mean, self.std, self.scale, self.jitter_p, self.seed = mean, std, tuple(scale), jitter_p, seed

    def __len__(self) -> int:
        return len(self.ids)

    def _view(self, image: np.ndarray, rng) -> Tensor:
        from pipeline.transforms import _as_tensor, _normalised_tensor, photometric, random_resized_box, resize

        top, left, h, w = random_resized_box(*image.shape[:2], rng, scale=self.scale)
        window = resize(np.ascontiguousarray(image[top:top + h, left:left + w]), (self.crop, self.crop),
                        interpolation="bicubic")
        view = _as_tensor(np.array(window))      # PIL's array is read-only
        if rng.random() < 0.5:
            view = view.flip(-1)
        view = photometric(view, rng, self.jitter_p, 0.0, 0.0)
        return _normalised_tensor(view, self.mean, self.std)

    def __getitem__(self, key: int):
        from pipeline.transforms import decode_key

        epoch, index = decode_key(key, len(self.ids))
        image_id = self.ids[index]
        rng = np.random.default_rng([self.seed, epoch, index, 7])
        image = self.dataset.load_image(image_id)
        first, second = self._view(image, rng), self._view(image, rng)
        box = torch.tensor([0, self.crop, 0, self.crop], dtype=torch.int64)
        return first, torch.from_numpy(self.dataset.multi_hot(image_id)), box, index, second


# ----------------------------------------------------------------------------- terms


def _second_view(step: Step) -> Tensor:
    if len(step.batch) < 5:
        raise PipelineError("train_net.losses.dino_cls / dino_patch: the batch carries no second view "
                            "(train_net.model must be fsr_vit, whose data set gives two views)")
    return step.batch[4].to(step.images.device)


def _mask(step: Step) -> Tensor:
    """View 2's token mask (B, h, w): random blocks before `mask_random_until`, then blocks whose
    aux CAM (multi-scale, student, no grad) is uncertain first."""
    f, net = step.section.fsr, step.net
    second = _second_view(step)
    b, _, height, width = second.shape
    grid = block_grid(height, width, f.mask_block, net.patch_size)
    uncertain = None
    if step.iteration >= f.mask_random_until:
        from engine.multiscale import multiscale_cams

        _, aux = multiscale_cams(net.cam_pair, second, step.section.cam_scales, flip=True)
        uncertain = uncertain_blocks(aux, step.targets, grid, f.mask_low, f.mask_high)
    blocks = block_mask(b, grid, f.mask_ratio, uncertain, device=second.device)
    return blocks_to_tokens(blocks, f.mask_block // net.patch_size)


def fsr_prepare(step: Step) -> dict:
    """View 2 and its mask for the student's forward (computed once for both terms)."""
    mask = step._once("fsr_mask", lambda: _mask(step))
    return {"second": _second_view(step), "mask": mask}


def _teacher(step: Step) -> tuple[Tensor, Tensor]:
    return step._once("fsr_teacher", lambda: tuple(t.float() for t in step.net.teacher.targets(
        step.images, _second_view(step))))


def _temperatures(step: Step) -> tuple[float, float]:
    f = step.section.fsr
    return f.student_temp, teacher_temperature(step.iteration, f.teacher_temp_start, f.teacher_temp,
                                               f.teacher_temp_warmup)


@register_term("dino_cls", prepare=fsr_prepare)
def dino_cls_term(step: Step) -> Tensor:
    """cer.FSR (weight 0.1): teacher view 1 (unmasked) → student view 2 (masked) class token."""
    teacher_cls, _ = _teacher(step)
    s_temp, t_temp = _temperatures(step)
    center = step.net.center_cls
    loss = dino_class_loss(step.out.fsr_cls.float(), teacher_cls, center, s_temp, t_temp)
    update_center(center, teacher_cls.mean(0, keepdim=True), step.section.fsr.center_momentum)
    return loss


@register_term("dino_patch", prepare=fsr_prepare)
def dino_patch_term(step: Step) -> Tensor:
    """unc.FSR (weight 0.1): the teacher's unmasked view-2 patches → the student's masked ones."""
    _, teacher_patch = _teacher(step)
    s_temp, t_temp = _temperatures(step)
    center = step.net.center_patch
    mask = step._once("fsr_mask", lambda: _mask(step)).flatten(1)
    loss = dino_patch_loss(step.out.fsr_patch.float(), teacher_patch, mask, center, s_temp, t_temp)
    update_center(center, teacher_patch.mean(1).mean(0, keepdim=True)[:, None], step.section.fsr.center_momentum)
    return loss
