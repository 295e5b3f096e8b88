"""Benchmark: the sparse random walk of make_sem_seg against the reference's dense one.

Run from the repository root:  python bench/random_walk.py

1. A VOC-sized image (500×375, stride-4 grid 94×125, n = 11,750) with synthetic
   object outlines as the boundary map and K = 3 blob-shaped CAMs.
2. `net.affinity.random_walk` timed there (median of a few runs, operator
   construction included), next to the other sparse formulations it was chosen
   over: scipy CSR (all maps at once and one map at a time), torch sparse CSR and
   a torch stencil of shifted slices, in float64 and float32.
3. The dense definition (n×n T squared exp_times times) timed on a grid small
   enough to run here, and extrapolated to VOC size: 2n³ FLOPs per squaring
   at the measured FLOP rate, n²·4 bytes per float32 matrix (as the reference).
4. Agreement of sparse and dense on the small grid: relative difference and argmax.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from net.affinity import _neighbour_weights, dense_random_walk, pair_offsets, random_walk, transition_matrix  # noqa: E402

RADIUS, BETA, EXP_TIMES, NUM_MAPS = 5, 10, 8, 3
VOC_GRID = (94, 125)  # ceil(375 / 4), ceil(500 / 4)
SMALL_GRID = (24, 32)


def synthetic_scene(shape: tuple[int, int], num_objects: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(boundary (h, w) in [0, 1], cams (K, h, w)): smoothed outlines of random
    ellipses, and CAMs peaking inside the objects (map 0 a diffuse background)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    ys, xs = np.mgrid[:h, :w]
    segments = np.zeros(shape, np.int64)
    for index in range(1, num_objects + 1):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.12, 0.3) * h, rng.uniform(0.12, 0.3) * w
        segments[((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 < 1] = index
    edges = np.zeros(shape)
    edges[:-1] += segments[:-1] != segments[1:]
    edges[:, :-1] += segments[:, :-1] != segments[:, 1:]
    boundary = scipy.ndimage.gaussian_filter(np.minimum(edges, 1.0), sigma=0.8)
    boundary = np.clip(boundary / boundary.max() + rng.normal(0, 0.03, shape), 0, 1)
    cams = [scipy.ndimage.gaussian_filter(rng.uniform(0.1, 0.3, shape), sigma=3)]
    for index in range(1, NUM_MAPS):
        inside = (segments == index).astype(float)
        # CAMs fire on the discriminative part only: shrink the object, blur.
        core = scipy.ndimage.binary_erosion(inside, iterations=max(1, int(inside.sum() ** 0.5 / 6)))
        cams.append(scipy.ndimage.gaussian_filter(core.astype(float), sigma=2) * rng.uniform(0.7, 1.0))
    return boundary, np.stack(cams)


def median_time(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


# Alternative formulations (the ones random_walk was chosen over) -------------

def walk_scipy_csr(cams, boundary, dtype, per_map: bool):
    operator = transition_matrix(boundary, RADIUS, BETA).T.tocsr().astype(dtype)  # (x T)ᵀ = Tᵀ xᵀ
    k, h, w = cams.shape
    x = (cams * (1 - boundary)).reshape(k, -1).astype(dtype)
    if per_map:
        out = []
        for vector in x:
            for _ in range(2 ** EXP_TIMES):
                vector = operator @ vector
            out.append(vector)
        return np.stack(out).reshape(k, h, w)
    columns = np.ascontiguousarray(x.T)
    for _ in range(2 ** EXP_TIMES):
        columns = operator @ columns
    return columns.T.reshape(k, h, w)


def walk_torch_csr(cams, boundary, dtype):
    csr = transition_matrix(boundary, RADIUS, BETA).T.tocsr()
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    warnings.filterwarnings("ignore", message="Sparse")  # "beta state" / invariant-check notices
    operator = torch.sparse_csr_tensor(
        torch.from_numpy(csr.indptr.astype(np.int64)), torch.from_numpy(csr.indices.astype(np.int64)),
        torch.from_numpy(csr.data).to(torch_dtype), size=csr.shape)
    k, h, w = cams.shape
    columns = torch.from_numpy((cams * (1 - boundary)).reshape(k, -1).T.copy()).to(torch_dtype)
    for _ in range(2 ** EXP_TIMES):
        columns = operator @ columns
    return columns.T.reshape(k, h, w).numpy()


def walk_torch_stencil(cams, boundary, dtype):
    """y_j = Σ_o x[j + o] · weight[o, j] with x kept in a zero-padded flat buffer."""
    offsets, weights = _neighbour_weights(boundary, RADIUS, BETA)
    k, h, w = cams.shape
    n = h * w
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    weights = torch.from_numpy(weights.reshape(len(offsets), n)).to(torch_dtype)
    flat = [int(dy * w + dx) for dy, dx in offsets]
    pad = max(abs(f) for f in flat)
    buffer = torch.zeros((k, n + 2 * pad), dtype=torch_dtype)
    buffer[:, pad:pad + n] = torch.from_numpy((cams * (1 - boundary)).reshape(k, n))
    accumulator = torch.empty((k, n), dtype=torch_dtype)
    for _ in range(2 ** EXP_TIMES):
        accumulator.zero_()
        for f, weight in zip(flat, weights):
            accumulator.addcmul_(buffer[:, pad + f:pad + f + n], weight)
        buffer[:, pad:pad + n] = accumulator
    return accumulator.reshape(k, h, w).numpy()


def main() -> None:
    h, w = VOC_GRID
    n = h * w
    boundary, cams = synthetic_scene(VOC_GRID, num_objects=3, seed=0)
    print(f"random walk: radius {RADIUS}, beta {BETA}, exp_times {EXP_TIMES} (T applied {2 ** EXP_TIMES} times), K = {NUM_MAPS} maps")
    # One thread everywhere: make_sem_seg already keeps every core busy with one
    # image per worker process, and torch's thread pool degrades badly when the
    # cores are shared (its 2-thread sparse CSR took 8 s here under load).
    torch.set_num_threads(1)
    print(f"VOC-size grid {h}x{w} (500x375 image at stride 4), n = {n:,}; single-threaded (torch threads 1)")

    tracemalloc.start()
    sparse_time, sparse_result = median_time(lambda: random_walk(cams, boundary, RADIUS, BETA, EXP_TIMES), repeats=5)
    _, sparse_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    operator = transition_matrix(boundary, RADIUS, BETA)
    print(f"\nsparse T: nnz {operator.nnz:,} = {operator.nnz / n:.1f} per pixel (at most 2K+1 = {2 * len(pair_offsets(RADIUS)) + 1}; fewer near the image border)")
    print(f"random_walk (scipy DIA, float64), median of 5: {sparse_time * 1000:.0f} ms, "
          f"peak traced numpy memory {sparse_peak / 2**20:.1f} MiB")

    print("\nformulations compared (median of 3, ms):        float64   float32")
    candidates = {
        "scipy DIA, one map at a time (chosen)": lambda dt: random_walk(cams, boundary, RADIUS, BETA, EXP_TIMES, dtype=dt),
        "scipy CSR, one map at a time": lambda dt: walk_scipy_csr(cams, boundary, dt, per_map=True),
        "scipy CSR, K maps as an n x K matrix": lambda dt: walk_scipy_csr(cams, boundary, dt, per_map=False),
        "torch sparse CSR, n x K matrix": lambda dt: walk_torch_csr(cams, boundary, dt),
        "torch stencil of shifted slices": lambda dt: walk_torch_stencil(cams, boundary, dt),
    }
    for name, function in candidates.items():
        times = []
        for dtype in (np.float64, np.float32):
            seconds, result = median_time(lambda: function(dtype), repeats=3)
            difference = np.abs(result - sparse_result).max() / np.abs(sparse_result).max()
            assert difference < 1e-3, (name, difference)
            times.append(seconds * 1000)
        print(f"  {name:44s} {times[0]:8.0f}  {times[1]:8.0f}")

    sh, sw = SMALL_GRID
    small_n = sh * sw
    small_boundary, small_cams = synthetic_scene(SMALL_GRID, num_objects=2, seed=1)
    dense_time, dense_result = median_time(
        lambda: dense_random_walk(small_cams, small_boundary, RADIUS, BETA, EXP_TIMES, dtype=np.float32), repeats=3)
    dense64 = dense_random_walk(small_cams, small_boundary, RADIUS, BETA, EXP_TIMES)
    small_sparse_time, small_sparse = median_time(
        lambda: random_walk(small_cams, small_boundary, RADIUS, BETA, EXP_TIMES), repeats=3)
    # Time of the squarings alone, to measure this machine's dense FLOP rate.
    matrix = np.random.default_rng(0).random((small_n, small_n), dtype=np.float32)
    squaring_time, _ = median_time(lambda: [matrix @ matrix for _ in range(EXP_TIMES)], repeats=3)
    small_flops = 2 * small_n ** 3 * EXP_TIMES
    rate = small_flops / squaring_time
    voc_flops = 2 * n ** 3 * EXP_TIMES
    voc_dense_time = voc_flops / rate
    print(f"\ndense definition on {sh}x{sw} (n = {small_n}): {dense_time * 1000:.0f} ms (float32, incl. building A); "
          f"sparse there: {small_sparse_time * 1000:.1f} ms")
    print(f"  measured dense rate {rate / 1e9:.1f} GFLOP/s ({small_flops / 1e9:.2f} GFLOP in {squaring_time * 1000:.0f} ms)")
    print(f"dense at VOC size (extrapolated): {voc_flops / 1e12:.1f} TFLOP = {voc_dense_time:,.0f} s "
          f"({voc_dense_time / 3600:.1f} h) at that rate; {n * n * 4 / 1e6:,.0f} MB per float32 n x n matrix "
          f"(>= {2 * n * n * 4 / 1e9:.1f} GB to square)")
    print(f"sparse / dense at VOC size: {sparse_time:.3f} s vs {voc_dense_time:,.0f} s = {voc_dense_time / sparse_time:,.0f}x faster; "
          f"memory {sparse_peak / 2**20:.1f} MiB vs {2 * n * n * 4 / 2**20:,.0f} MiB")

    relative = np.abs(small_sparse - dense64).max() / np.abs(dense64).max()
    relative32 = np.abs(dense_result - dense64).max() / np.abs(dense64).max()
    same_argmax = (small_sparse.argmax(0) == dense64.argmax(0)).mean()
    same_argmax32 = (small_sparse.argmax(0) == dense_result.argmax(0)).mean()
    print(f"\nagreement on {sh}x{sw}: sparse vs dense float64 max relative difference {relative:.1e}, "
          f"argmax identical on {same_argmax:.2%} of pixels")
    print(f"  (dense float32, the reference's precision, vs dense float64: {relative32:.1e}; "
          f"sparse vs dense float32 argmax identical on {same_argmax32:.2%})")
    print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
