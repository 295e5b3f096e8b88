"""Benchmark: the batched CAM -> pseudo-label route (`refine_cams_with_refiner`)
against the reference's per-image loop (`refine_cams_per_image`), CPU.

Run from the repository root:  python bench/refiner.py [--images 4] [--repeats 3]

Setting: 448x448 crops (refined at 224x224), 20 classes of which K = 3 are present
per image, ToCo's thresholds (0.7 / 0.25), 10 iterations, dilations 1..24, both
presets (PAR, VARM). The CAMs are Gaussian blobs and the images random colour patches
with sharp edges, so the kernels are not uniform.

The two routes must give identical labels (asserted). The batched route wins by
computing each image's kernel once for both background planes and by refining a
whole batch per call; the loop, like the reference, builds the kernel twice per
image. Threads: set OMP_NUM_THREADS to what the training job will have.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.refine import LocalRefiner, refine_cams_per_image, refine_cams_with_refiner  # noqa: E402

SIZE, NUM_CLASSES, PRESENT, HIGH, LOW = 448, 20, 3, 0.7, 0.25


def synthetic_batch(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images in [0, 1], CAMs in [0, 1], class labels with PRESENT classes, boxes)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 7, 7, generator=generator)
    images = F.interpolate(coarse, size=(SIZE, SIZE), mode="nearest")  # colour patches with sharp edges
    images = (images + 0.05 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    labels = torch.zeros(count, NUM_CLASSES)
    for index in range(count):
        labels[index, torch.randperm(NUM_CLASSES, generator=generator)[:PRESENT]] = 1
    # One Gaussian blob per class (sigma 50-90 px) at a random place: confident in the
    # middle, unsure around it, background far away, like a trained CAM.
    centres = torch.rand(count, NUM_CLASSES, 2, generator=generator) * SIZE
    sigmas = 50 + 40 * torch.rand(count, NUM_CLASSES, 1, 1, generator=generator)
    coords = torch.arange(SIZE, dtype=torch.float32)
    squared = ((coords[None, None, :, None] - centres[..., 0, None, None]) ** 2
               + (coords[None, None, None, :] - centres[..., 1, None, None]) ** 2)
    cams = torch.exp(-squared / (2 * sigmas ** 2))
    boxes = torch.tensor([[0, SIZE, 0, SIZE]] * count)
    boxes[0] = torch.tensor([0, 400, 48, SIZE])  # one padded crop
    return images, cams * labels[:, :, None, None], labels, boxes


def timed(function, repeats: int) -> tuple[float, torch.Tensor]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    images, cams, labels, boxes = synthetic_batch(args.images)
    print(f"{args.images} images {SIZE}x{SIZE}, K={PRESENT} of {NUM_CLASSES} classes, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    print(f"{'preset':<7}{'route':<12}{'s/batch':>9}{'images/s':>10}{'speed-up':>10}")
    with torch.no_grad():
        for preset in ("par", "varm"):
            refiner = LocalRefiner(preset)
            common = (refiner, images, cams, labels, HIGH, LOW, boxes)
            loop_s, looped = timed(lambda: refine_cams_per_image(*common), args.repeats)
            batch_s, batched = timed(lambda: refine_cams_with_refiner(*common), args.repeats)
            assert torch.equal(batched, looped), f"{preset}: batched and per-image labels differ"
            print(f"{preset:<7}{'per-image':<12}{loop_s:>9.2f}{args.images / loop_s:>10.2f}{'':>10}")
            print(f"{preset:<7}{'batched':<12}{batch_s:>9.2f}{args.images / batch_s:>10.2f}{loop_s / batch_s:>9.2f}x")
            background, ignored = ((batched == v).float().mean().item() for v in (0, 255))
            print(f"{'':<7}labels identical; background {background:.0%}, ignored {ignored:.0%}, "
                  f"foreground {1 - background - ignored:.0%}")


if __name__ == "__main__":
    main()
