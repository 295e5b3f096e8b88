"""Benchmark: training images/s of the single-stage network (train_net) of a config, CPU.

Run from the repository root:  python bench/train_net.py [--config configs/demo_toco.yaml]
                                [--batch 8] [--warmup 2] [--iterations 4]

One training iteration as stages/train_net.py runs it: the online multi-scale + flip CAMs, the
refined pseudo labels (when seg/reg are on), one forward (with CTC's extra views when CTC is on),
the loss terms, backward, the AdamW step and the after-step hook (CTC's EMA head). Four rows:
CTC off / on, each before the segmentation loss starts (cls, cls_aux, ptc [, ctc]) and after it
(+ seg, reg). The batches are synthetic (smooth random images with a bright rectangle per
present class, 1-2 of the data set's classes per image, full boxes), so no data set is read and
the data loader's cost is not counted. Median over `--iterations` timed steps after `--warmup`
untimed ones. Threads: set OMP_NUM_THREADS to what the training job will have.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from net.registry import build_model  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from stages.train_net import SingleStageLoss, model_args, used_terms  # noqa: E402
from engine.terms import term_on  # noqa: E402


class _Runtime:
    device = torch.device("cpu")


def synthetic_batch(count: int, crop: int, num_classes: int, seed: int = 0) -> tuple:
    """The loader's batch layout with CTC's views: (images, multi-hot, boxes, index, global view 2,
    local source, mirrored)."""
    g = torch.Generator().manual_seed(seed)
    images = F.interpolate(torch.randn(count, 3, 8, 8, generator=g), size=(crop, crop), mode="bilinear",
                           align_corners=False)
    targets = torch.zeros(count, num_classes)
    for i in range(count):
        classes = torch.randperm(num_classes, generator=g)[: 1 + i % 2]
        targets[i, classes] = 1
        for c in classes.tolist():
            y, x = torch.randint(0, crop // 2, (2,), generator=g).tolist()
            images[i, c % 3, y:y + crop // 3, x:x + crop // 3] += 2.0
    boxes = torch.tensor([[0, crop, 0, crop]] * count)
    second = images.flip(-1) + 0.1 * torch.randn(images.shape, generator=g)
    source = images + 0.1 * torch.randn(images.shape, generator=g)
    mirrored = torch.zeros(count, dtype=torch.bool)
    return images, targets, boxes, torch.arange(count), second, source, mirrored


def time_setting(section, data, batch: tuple, num_classes: int, step: int, warmup: int, iterations: int):
    """(median seconds per iteration, the terms that ran)."""
    torch.manual_seed(0)
    model = build_model(section.model, model_args(section, num_classes))
    model.train()
    encoder, heads = model.param_groups()
    optimizer = torch.optim.AdamW([{"params": encoder}, {"params": heads, "lr": section.optimizer.lr
                                    * section.head_lr_mult}], lr=section.optimizer.lr,
                                  weight_decay=section.optimizer.weight_decay)
    loss_fn = SingleStageLoss(section, data, _Runtime())
    active = [name for name in used_terms(section) if term_on(getattr(section.losses, name), step)]
    times = []
    for index in range(warmup + iterations):
        start = time.perf_counter()
        total = loss_fn(model, batch, step)["loss"]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if hasattr(model, "after_step"):
            model.after_step(step + 1, section.iterations)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), active


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo_toco.yaml")
    parser.add_argument("--batch", type=int, default=None, help="default: the config's train_net.batch_size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=4)
    args = parser.parse_args()
    cfg = load_config(args.config)
    base, data = cfg.train_net, cfg.data
    batch_size = args.batch or base.batch_size
    num_classes = 80 if data.dataset == "coco" else 20
    batch = synthetic_batch(batch_size, base.crop_size, num_classes)
    seg_start = base.losses.seg.start
    ctc_weight = base.losses.ctc.weight or 0.5
    print(f"{args.config}: {base.backbone} {base.model_kwargs or ''}, crop {base.crop_size}, batch {batch_size}, "
          f"CAM scales {base.cam_scales}, refiner {base.refiner.preset} x{base.refiner.iterations}")
    c = base.ctc
    print(f"CTC when on: weight {ctc_weight}, {c.local_crops} local crops of {c.local_size} px, projection "
          f"{c.projection}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.iterations} "
          f"iterations after {args.warmup} warm-up")
    print(f"{'CTC':<5}{'iteration':>10}  {'terms':<34}{'s/iter':>8}{'images/s':>10}")
    for ctc in (False, True):
        section = copy.deepcopy(base)
        section.losses.ctc.weight = ctc_weight if ctc else 0.0
        for step in (0, seg_start):
            seconds, active = time_setting(section, data, batch, num_classes, step, args.warmup, args.iterations)
            print(f"{'on' if ctc else 'off':<5}{step:>10}  {','.join(active):<34}{seconds:>8.2f}"
                  f"{batch_size / seconds:>10.2f}")


if __name__ == "__main__":
    main()
