"""IRNet's inter-pixel relations: pair offsets, pair labels, boundary-to-affinity
along straight paths, and the random walk that propagates CAMs over them.

Conventions (all at the stride-4 grid of the IRN):
- An offset is (dy, dx). `pair_offsets(radius)` keeps one of each +/- pair: the
  half-plane dy > 0, or dy == 0 and dx > 0, with 0 < dy² + dx² < radius².
  Index k of every (K, h, w) array below is the pair (source (y, x), target
  (y + dy_k, x + dx_k)).
- The straight path of an offset is the set of integer points (py, px) inside
  the bounding box of (0, 0) and (dy, dx) whose perpendicular distance to the
  line through them is below 1:  (dy·px − dx·py)² < dy² + dx².  This is
  IRNet's discretisation (`misc/indexing.py`, `PathIndex.get_all_dir_paths`):
  a "thick" digital line that contains both endpoints and, for a diagonal step,
  all four pixels of the 2×2 block, so a boundary one pixel wide can never be
  crossed without being seen. The path of −d from the target is the same pixel
  set as the path of d from the source (the set is symmetric about d/2), so
  path maxima, and hence affinities, are symmetric.
- The random walk follows IRNet's definition: a_ij = (1 − max boundary on the
  path i→j)^β for pairs within `radius`, a_ii = 1, T = A / column sums, and the
  CAMs x (row vectors, multiplied by 1 − boundary) become x · T^(2^exp_times).
  The reference builds the dense n×n T and squares it; we apply the sparse T
  2^exp_times times, which is the same product in exact arithmetic.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.sparse
import torch

# Above this the dense definition needs > 0.8 GB per float64 matrix: a mistake, not a test.
_MAX_DENSE_PIXELS = 10_000


def pair_offsets(radius: int) -> np.ndarray:
    """(K, 2) int64 array of (dy, dx) with 0 < dy² + dx² < radius², one per ± pair."""
    return _pair_offsets(int(radius)).copy()


@lru_cache(maxsize=None)
def _pair_offsets(radius: int) -> np.ndarray:
    if radius < 2:
        raise ValueError(f"radius must be at least 2 (no pair closer than it otherwise), got {radius}")
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dy * dy + dx * dx < radius * radius]
    return np.asarray(offsets, dtype=np.int64)


def path_pixels(dy: int, dx: int) -> np.ndarray:
    """(L, 2) int64 array of the (py, px) points of the straight path from (0, 0) to
    (dy, dx), endpoints included, ordered from the source to the target (by their
    projection on the direction; the source (0, 0) is first)."""
    length_sq = dy * dy + dx * dx
    ys = range(min(0, dy), max(0, dy) + 1)
    xs = range(min(0, dx), max(0, dx) + 1)
    points = [(py, px) for py in ys for px in xs if (dy * px - dx * py) ** 2 < length_sq]
    points.sort(key=lambda point: point[0] * dy + point[1] * dx)
    return np.asarray(points, dtype=np.int64).reshape(-1, 2)


@lru_cache(maxsize=None)
def _paths(radius: int) -> tuple[np.ndarray, ...]:
    return tuple(path_pixels(int(dy), int(dx)) for dy, dx in _pair_offsets(radius))


def pair_labels(label: np.ndarray, radius: int, cropped_sources: bool = False) -> dict[str, np.ndarray]:
    """Affinity labels of every pair (source, source + offset_k) from a stride-4 label map.

    `label` (h, w) uint8: 0 background, 1..C foreground classes, 255 unsure.
    Returns boolean (K, h, w) masks over source positions: `bg_pos` (both 0),
    `fg_pos` (the same foreground class), `neg` (two different confident labels).
    A pair with an unsure end, or whose target falls outside the image, is in none.
    `cropped_sources` (the reference's PathIndex): only sources whose every pair stays inside
    the grid count, rows [0, h − radius + 1) and columns [radius − 1, w − radius + 1).
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"pair_labels expects an (h, w) label map, got shape {label.shape}")
    h, w = label.shape
    r = int(radius)
    # Padding with the unsure value makes out-of-image targets ignored pairs.
    padded = np.pad(label.astype(np.uint8, copy=False), ((0, r), (r, r)), constant_values=255)
    source = label[None]
    target = np.stack([padded[dy:dy + h, r + dx:r + dx + w] for dy, dx in _pair_offsets(r)])
    confident = (source != 255) & (target != 255)
    if cropped_sources:
        inside = np.zeros((h, w), bool)
        inside[:max(h - r + 1, 0), r - 1:max(w - r + 1, r - 1)] = True
        confident &= inside[None]
    same = source == target
    return {
        "bg_pos": confident & same & (source == 0),
        "fg_pos": confident & same & (source != 0),
        "neg": confident & ~same,
    }


def path_max_boundary(boundary: torch.Tensor, radius: int) -> torch.Tensor:
    """Maximum of `boundary` (B, h, w) along the straight path of every pair: (B, K, h, w).

    Value [b, k, y, x] is the maximum over the path pixels (see the module doc)
    from (y, x) to (y + dy_k, x + dx_k), endpoints included; 1 where the target is
    outside the image. Differentiable: the gradient of each value goes to the one
    pixel holding the maximum (as max-pooling does).
    """
    if boundary.dim() != 3:
        raise ValueError(f"path_max_boundary expects (B, h, w), got shape {tuple(boundary.shape)}")
    r = int(radius)
    batch, h, w = boundary.shape
    # Padding with 1 (certain boundary) gives out-of-image targets zero affinity:
    # the target is on its own path, and every path pixel lies in the bounding box
    # of source and target, so a path leaves the image only when its target does.
    padded = torch.nn.functional.pad(boundary, (r, r, 0, r), value=1.0)
    padded_width = w + 2 * r
    base = (torch.arange(h, device=boundary.device)[:, None] * padded_width + torch.arange(w, device=boundary.device)[None, :] + r)
    flat_indices = []
    with torch.no_grad():
        source = padded.detach()
        for path in _paths(r):
            # Only the location of the maximum is tracked here; the value is gathered
            # below, so that autograd keeps one index per pair, not every path pixel.
            # (A running maximum: stacking the path and calling argmax is ~7x slower on CPU.)
            best_value = source[:, :h, r:r + w]
            best_delta = torch.zeros_like(best_value, dtype=torch.long)
            for py, px in path[1:]:
                value = source[:, py:py + h, r + px:r + px + w]
                larger = value > best_value
                best_value = torch.where(larger, value, best_value)
                best_delta.masked_fill_(larger, int(py * padded_width + px))
            flat_indices.append(base + best_delta)
    index = torch.stack(flat_indices, dim=1).reshape(batch, -1)
    return padded.reshape(batch, -1).gather(1, index).reshape(batch, -1, h, w)


def _neighbour_weights(boundary: np.ndarray, radius: int, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Column-normalised affinities of every pixel j to its neighbours j + o.

    Returns (offsets (O, 2) including (0, 0), weights (O, h, w) float64) with
    weights[o, y, x] = a(j, j + o) / s_j for j = (y, x), s_j = Σ_i a_ij, so that
    (x·T)_j = Σ_o x[j + o] · weights[o, j]. Zero where j + o is outside the image.
    """
    h, w = boundary.shape
    offsets = _pair_offsets(int(radius))
    path_max = path_max_boundary(torch.from_numpy(np.asarray(boundary, dtype=np.float64))[None], radius)[0].numpy()
    forward = np.clip(1.0 - path_max, 0.0, 1.0) ** beta  # a(j, j + d_k), zero off the image
    backward = np.zeros_like(forward)  # a(j, j − d_k) = a(j − d_k, j): `forward` moved by +d_k
    for k, (dy, dx) in enumerate(offsets):
        if dy >= h or abs(dx) >= w:
            continue  # no in-image pair at this offset
        backward[k, dy:, max(dx, 0):w + min(dx, 0)] = forward[k, :h - dy, max(-dx, 0):w - max(dx, 0)]
    all_offsets = np.concatenate([np.zeros((1, 2), np.int64), offsets, -offsets])
    weights = np.concatenate([np.ones((1, h, w)), forward, backward])
    weights /= weights.sum(axis=0, keepdims=True)
    return all_offsets, weights


def _as_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def transition_matrix(boundary, radius: int = 5, beta: float = 10) -> scipy.sparse.csr_matrix:
    """Sparse random-walk transition matrix T (n × n, n = h·w, row-major pixels), float64.

    T[i, j] = a_ij / Σ_i' a_i'j with a_ij = (1 − path max of `boundary` (h, w))^β
    for i ≠ j within `radius` (both directions) and a_jj = 1: every column sums
    to 1. Every in-image pair is stored, even at weight 0, so nnz = n + 2·(number
    of in-image pairs) ≤ n·(2K + 1).
    """
    boundary = _as_numpy(boundary)
    h, w = boundary.shape
    offsets, weights = _neighbour_weights(boundary, radius, beta)
    ys, xs = np.mgrid[:h, :w]
    rows, cols, values = [], [], []
    for (dy, dx), weight in zip(offsets, weights):
        inside = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
        cols.append((ys * w + xs)[inside])
        rows.append(((ys + dy) * w + xs + dx)[inside])
        values.append(weight[inside])
    n = h * w
    matrix = scipy.sparse.coo_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    return matrix.tocsr()


def _walk_operator(boundary: np.ndarray, radius: int, beta: float, dtype=np.float64) -> scipy.sparse.dia_matrix:
    """Tᵀ in scipy's diagonal (DIA) format: one diagonal per neighbour offset.

    (x·T)ᵀ = Tᵀ·xᵀ, and row j of Tᵀ holds the weights of pixel j's neighbours at
    flat offsets dy·w + dx: a banded matrix with at most 2K + 1 diagonals.
    """
    h, w = boundary.shape
    n = h * w
    offsets, weights = _neighbour_weights(boundary, radius, beta)
    weights = weights.reshape(len(offsets), n)
    diagonals: dict[int, np.ndarray] = {}
    for (dy, dx), weight in zip(offsets, weights):
        flat = int(dy * w + dx)
        if abs(flat) >= n:
            continue
        # DIA stores entry (j, j + flat) at data[:, j + flat]. On grids narrower
        # than the radius two offsets can share a flat offset; one of them then
        # wraps to another row, where its weight is 0, so adding them is exact.
        column = diagonals.setdefault(flat, np.zeros(n))
        if flat >= 0:
            column[flat:] += weight[:n - flat]
        else:
            column[:n + flat] += weight[-flat:]
    keys = sorted(diagonals)
    data = np.stack([diagonals[key] for key in keys]).astype(dtype)
    return scipy.sparse.dia_matrix((data, np.asarray(keys)), shape=(n, n))


def random_walk(cams, boundary, radius: int = 5, beta: float = 10, exp_times: int = 8, dtype=np.float64):
    """Propagate `cams` (K, h, w) over the boundary-derived affinities: x · T^(2^exp_times).

    x = cams · (1 − boundary), one row vector per map. `cams` and `boundary`
    (h, w) may be numpy arrays or torch tensors; the result has the type of
    `cams` (float32, on the device of `cams` for a tensor). The walk itself
    runs on the CPU: T is applied 2^exp_times times as a banded (DIA) sparse
    matrix, one map at a time. Of the formulations measured in
    `bench/random_walk.py` (scipy CSR, torch sparse CSR, a torch stencil of
    shifted slices, scipy DIA) DIA is the fastest on 2 cores: its inner loop is
    a contiguous multiply-add along each of the ≤ 2K + 1 diagonals with no index
    array to read, and the whole operator (about 3 MB at VOC size) stays in cache.
    `dtype` is the arithmetic: float64 (default) agrees with the dense
    definition to ~1e-12 relative; float32 is ~1.7x faster but its rounding
    accumulates over the 256 steps to ~5e-5 relative (harmless for labels, but
    not a faithful reproduction of the definition).
    """
    cams_np = _as_numpy(cams)
    boundary_np = _as_numpy(boundary).astype(np.float64, copy=False)
    if cams_np.ndim != 3 or cams_np.shape[1:] != boundary_np.shape:
        raise ValueError(f"random_walk expects cams (K, h, w) and boundary (h, w), got {cams_np.shape} and {boundary_np.shape}")
    if exp_times < 0:
        raise ValueError(f"exp_times must be >= 0, got {exp_times}")
    k, h, w = cams_np.shape
    operator = _walk_operator(boundary_np, radius, beta, dtype)
    source = (cams_np * (1.0 - boundary_np)).reshape(k, h * w).astype(dtype)
    result = np.empty_like(source)
    for channel in range(k):
        vector = source[channel]
        for _ in range(2 ** exp_times):
            vector = operator @ vector
        result[channel] = vector
    result = result.reshape(k, h, w).astype(np.float32)
    if isinstance(cams, torch.Tensor):
        return torch.from_numpy(result).to(cams.device)
    return result


def dense_random_walk(cams, boundary, radius: int = 5, beta: float = 10, exp_times: int = 8, dtype=np.float64) -> np.ndarray:
    """The reference definition, for tests and the benchmark only: builds the dense
    n×n affinity matrix pair by pair, T = A / column sums, squares T `exp_times`
    times and returns x · T (K, h, w). O(n³) time and O(n²) memory: small grids only.
    """
    cams = _as_numpy(cams).astype(dtype)
    boundary = _as_numpy(boundary).astype(np.float64)
    k, h, w = cams.shape
    n = h * w
    if n > _MAX_DENSE_PIXELS:
        raise ValueError(f"dense_random_walk on {h}x{w} = {n} pixels would need {n * n * 8 / 1e9:.1f} GB per matrix; use random_walk")
    path_max = path_max_boundary(torch.from_numpy(boundary)[None], radius)[0].numpy()
    affinity = np.eye(n, dtype=dtype)
    for index, (dy, dx) in enumerate(_pair_offsets(int(radius))):
        for y in range(h):
            for x in range(w):
                ty, tx = y + dy, x + dx
                if 0 <= ty < h and 0 <= tx < w:
                    value = (1.0 - path_max[index, y, x]) ** beta
                    affinity[y * w + x, ty * w + tx] = value
                    affinity[ty * w + tx, y * w + x] = value
    transition = affinity / affinity.sum(axis=0, keepdims=True)
    for _ in range(exp_times):
        transition = transition @ transition
    x = cams * (1.0 - boundary)
    return (x.reshape(k, n) @ transition).reshape(k, h, w)
