"""Artifact I/O. Every write goes to a temporary name in the same folder and is
renamed into place, so a crash never leaves a half-written file under a name a
later stage would trust."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def clean_stale_temporaries(*folders: Path) -> int:
    """Remove the temporaries an interrupted writer left (`.<name>.<random>.tmp`); returns the count.
    Call only while holding the run's lock, so no live writer's file is removed."""
    count = 0
    for folder in folders:
        if Path(folder).is_dir():
            for tmp in Path(folder).rglob(".*.tmp"):
                if tmp.is_file() or tmp.is_symlink():
                    tmp.unlink(missing_ok=True)
                    count += 1
    return count


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` on success.

    On any exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists() and not tmp_path.is_symlink():
            # mkstemp makes 0600 files; artifacts are ordinary files, readable as the umask allows
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def save_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def load_json(path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"missing file: {path}") from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"corrupt JSON file {path}: {e}") from None


def save_npz(path, arrays: Mapping[str, np.ndarray], compress: bool = True) -> None:
    """Pickle-free .npz: plain named arrays, readable with `np.load` alone."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compress else np.savez)(f, **arrays)


def load_npz(path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise PipelineError(f"missing file: {path}") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise PipelineError(f"corrupt or unreadable array file {path}: {e}; delete it and re-run its stage") \
            from None


def voc_palette() -> np.ndarray:
    """The standard PASCAL VOC colour map, (256, 3) uint8; index 255 is (224, 224, 192)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[index] = (r, g, b)
    return palette


def save_label_png(path, label: np.ndarray) -> None:
    """Save a uint8 label map as a palette PNG (pixel values are the label ids)."""
    if label.dtype != np.uint8:
        label = label.astype(np.uint8)
    image = Image.fromarray(label, mode="P")
    image.putpalette(voc_palette().reshape(-1).tolist())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def load_label_png(path) -> np.ndarray:
    """Load a label PNG as uint8 label ids (palette indices, not colours)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise PipelineError(f"label image {path} has mode {image.mode}; expected a palette or grey PNG of label ids")
            return np.asarray(image, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise PipelineError(f"missing file: {path}") from None
    except PipelineError:
        raise
    except OSError as e:
        raise PipelineError(f"corrupt or unreadable label image {path}: {e}") from None


def load_rgb(path) -> np.ndarray:
    """Load an image as (H, W, 3) uint8 RGB."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise PipelineError(f"missing image: {path}") from None
    except OSError as e:
        raise PipelineError(f"corrupt or unreadable image {path}: {e}") from None


def save_torch(path, obj) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path, map_location="cpu"):
    import torch

    path = Path(path)
    if not path.exists():
        raise PipelineError(f"missing checkpoint: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise PipelineError(f"corrupt or unreadable checkpoint {path}: {e}") from None
