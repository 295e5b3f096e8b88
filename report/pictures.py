"""The report's pictures: label maps in the VOC palette, CAM overlays, thumbnails, the IoU and
sweep charts (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dataset.classes import IGNORE_LABEL
from pipeline import artifacts

UNSURE_RGB = (210, 210, 210)
THUMB_SIDE = 156          # long side of every picture of the sample section, in pixels
STAGE_COLOURS = {"eval_cam": "#4c72b0", "eval_sem_seg": "#dd8452", "test_seg_head": "#8172b3",
                 "crf_seg_head": "#937860", "test_deeplab": "#55a868", "crf": "#c44e52"}


# ----------------------------------------------------------------------------- pictures

def colorize_label(label: np.ndarray) -> np.ndarray:
    """(H, W) label ids -> (H, W, 3) uint8 RGB: VOC palette, 255 (unsure / ignore) grey."""
    rgb = artifacts.voc_palette()[label]
    rgb[label == IGNORE_LABEL] = UNSURE_RGB
    return rgb


def fit(image: np.ndarray, side: int = THUMB_SIDE, nearest: bool = False) -> np.ndarray:
    """Resize so the long side is `side` pixels (nearest neighbour for label maps)."""
    import cv2

    h, w = image.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    if nearest:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)


def cam_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Jet heat map of `cam` (values in [0, 1]) blended over the RGB image."""
    import cv2
    from matplotlib import colormaps

    if cam.shape != image.shape[:2]:
        cam = cv2.resize(cam.astype(np.float32), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * heat, 0, 255).astype(np.uint8)


def save_png(path: Path, rgb: np.ndarray) -> None:
    with artifacts.atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="PNG")


def _new_figure(width: float, height: float):
    # An explicit Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path: Path) -> None:
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def iou_chart(path: Path, classes: list[str], series: list[tuple[str, str, dict]]) -> None:
    """Grouped bars: per class (and mIoU last), one bar per stage. series = [(stage, title, record)]."""
    groups = classes + ["mIoU"]
    n_groups, n_series = len(groups), len(series)
    width = 0.8 / n_series
    horizontal = n_groups > 24
    if horizontal:
        fig = _new_figure(8, max(4, 0.12 * n_groups * n_series + 1))
    else:
        fig = _new_figure(min(18, max(6.5, 1.2 + n_groups * (0.16 * n_series + 0.25))), 4.2)
    ax = fig.add_subplot(111)
    pos = np.arange(n_groups)
    for s, (stage, title, record) in enumerate(series):
        values = [record.get("per_class_iou", {}).get(c, np.nan) for c in classes] + [record.get("miou", np.nan)]
        offset = pos - 0.4 + width * (s + 0.5)
        if horizontal:
            ax.barh(offset, values, height=width, label=title, color=STAGE_COLOURS.get(stage))
        else:
            ax.bar(offset, values, width=width, label=title, color=STAGE_COLOURS.get(stage))
    if horizontal:
        ax.set_yticks(pos, groups)
        ax.invert_yaxis()
        ax.set_xlabel("IoU (%)")
        ax.set_xlim(0, 100)
        ax.grid(axis="x", alpha=0.3)
    else:
        tilt = n_groups > 5 or max(len(g) for g in groups) > 10
        ax.set_xticks(pos, groups, rotation=30 if tilt else 0, ha="right" if tilt else "center",
                      rotation_mode="anchor")
        ax.set_ylabel("IoU (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.axvline(n_groups - 1.5, color="#999999", lw=0.8, ls=":")
    ax.set_axisbelow(True)
    ax.legend(loc="upper right", fontsize=9, ncol=min(4, n_series), frameon=False)
    ax.set_title("Per-class IoU by stage")
    _save_figure(fig, path)


def sweep_chart(path: Path, record: dict) -> None:
    """mIoU of the CAMs against the background threshold, with the configured and best thresholds marked."""
    points = sorted((float(t), float(v)) for t, v in record["sweep"].items())
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    fig = _new_figure(6.5, 3.6)
    ax = fig.add_subplot(111)
    ax.plot(xs, ys, marker="o", color=STAGE_COLOURS["eval_cam"], lw=1.8, ms=4, label="mIoU")
    threshold = record.get("threshold")
    if threshold is not None:
        ax.axvline(threshold, color="#555555", ls="--", lw=1,
                   label=f"configured {threshold:.2f} ({record.get('miou', float('nan')):.1f}%)")
    best = record.get("best_threshold")
    if best is not None and record.get("best_miou") is not None:
        ax.plot([best], [record["best_miou"]], marker="*", ms=14, color=STAGE_COLOURS["crf"], ls="none",
                label=f"best {best:.2f} ({record['best_miou']:.1f}%)")
    ax.set_xlabel("background threshold")
    ax.set_ylabel("CAM mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, frameon=False)
    ax.set_title("CAM threshold sweep")
    _save_figure(fig, path)


