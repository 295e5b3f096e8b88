"""Benchmark: the dense-energy regulariser (engine/regulariser.py) at a 448x448 crop with 21 classes,
and the exact dense definition at the largest grid that fits in memory, on this machine's CPU.

    python bench/regulariser.py [--batch 2] [--max-pixels 4096]

Prints per-call time (forward + backward), the process's peak resident memory so far (rows run
from the cheapest to the largest, so a row's growth is that configuration's), and how the reduced-grid energy
compares with the exact one on a grid both can handle.
"""
from __future__ import annotations

import argparse
import time
import resource
from pathlib import Path
import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.regulariser import dense_energy_loss  # noqa: E402


def batch(b: int, size: int, classes: int = 21, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, size, size, generator=g) * 0.3
    images[:, :, :, size // 2:] += 1.0                                  # two regions
    logits = torch.randn(b, classes, size, size, generator=g, requires_grad=True)
    labels = torch.randint(0, classes, (b, size, size), generator=g)
    labels[:, : size // 4] = 255
    boxes = torch.tensor([[0, size, 0, size - size // 8]] * b)
    return images, logits, labels, boxes


def timed(size: int, b: int, max_pixels: int, repeats: int = 3) -> tuple[float, float, float]:
    images, logits, labels, boxes = batch(b, size)
    times, value = [], 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = dense_energy_loss(images, torch.softmax(logits, 1), labels, boxes, [0.485, 0.456, 0.406],
                                 [0.229, 0.224, 0.225], max_pixels=max_pixels)
        loss.backward()
        times.append(time.perf_counter() - t0)
        value = float(loss.detach())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024       # the process's peak RSS so far, MiB
    return sorted(times)[len(times) // 2], peak, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-pixels", type=int, default=4096)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, 21 classes")
    print(f"{'crop':>6} {'grid':>12} {'s/call':>8} {'peak RSS':>9} {'loss':>12}")
    seconds, peak, value = timed(448, args.batch, args.max_pixels)
    side = int(224 * min(1.0, (args.max_pixels / 224 ** 2) ** 0.5))
    print(f"{448:>6} {f'{side}x{side}':>12} {seconds:>8.3f} {peak:>9.1f} {value:>12.4e}   (reduced grid, default)")
    # the exact kernel on the reference's own grid (scale 0.5): the largest crop that fits comfortably
    for crop in (96, 160, 224):
        seconds, peak, value = timed(crop, args.batch, max_pixels=10**9, repeats=1)
        print(f"{crop:>6} {f'{crop // 2}x{crop // 2}':>12} {seconds:>8.3f} {peak:>9.1f} {value:>12.4e}   (exact, no reduction)")
        reduced = timed(crop, args.batch, args.max_pixels, repeats=1)
        print(f"{'':>6} {'reduced':>12} {reduced[0]:>8.3f} {reduced[1]:>9.1f} {reduced[2]:>12.4e}   "
              f"(ratio to exact {reduced[2] / value:.3f})")


if __name__ == "__main__":
    main()
