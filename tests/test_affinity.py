import numpy as np
import pytest
import scipy.sparse
import torch

from net.affinity import (
    dense_random_walk,
    pair_labels,
    pair_offsets,
    path_max_boundary,
    path_pixels,
    random_walk,
    transition_matrix,
)


def brute_force_path(dy, dx):
    """Points of the bounding box of (0,0)-(dy,dx) at perpendicular distance < 1 from the segment's line."""
    length = np.hypot(dy, dx)
    points = set()
    for py in range(min(0, dy), max(0, dy) + 1):
        for px in range(min(0, dx), max(0, dx) + 1):
            if abs(dy * px - dx * py) / length < 1:
                points.add((py, px))
    return points


@pytest.mark.parametrize("radius", [2, 5, 10])
def test_pair_offsets_cover_the_disk_once(radius):
    offsets = pair_offsets(radius)
    as_set = {tuple(o) for o in offsets}
    assert len(as_set) == len(offsets)
    both_signs = as_set | {(-dy, -dx) for dy, dx in as_set}
    disk = {(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1) if 0 < dy * dy + dx * dx < radius * radius}
    assert both_signs == disk and len(both_signs) == 2 * len(offsets)
    assert all(dy > 0 or (dy == 0 and dx > 0) for dy, dx in offsets)
    assert len(pair_offsets(5)) == 34


def test_path_pixels_hand_worked():
    assert path_pixels(0, 3).tolist() == [[0, 0], [0, 1], [0, 2], [0, 3]]
    assert {tuple(p) for p in path_pixels(1, 1)} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert {tuple(p) for p in path_pixels(2, 2)} == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2)}
    for dy, dx in pair_offsets(10):
        path = path_pixels(int(dy), int(dx))
        assert {tuple(p) for p in path} == brute_force_path(int(dy), int(dx))
        assert tuple(path[0]) == (0, 0)
        # The reverse pair sees the same pixels: affinities are symmetric.
        assert {(dy - py, dx - px) for py, px in path} == {tuple(p) for p in path}


def test_pair_labels_match_brute_force():
    rng = np.random.default_rng(0)
    label = rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(6, 7), p=[0.4, 0.25, 0.2, 0.15])
    radius = 4
    labels = pair_labels(label, radius)
    offsets = pair_offsets(radius)
    h, w = label.shape
    for k, (dy, dx) in enumerate(offsets):
        for y in range(h):
            for x in range(w):
                ty, tx = y + dy, x + dx
                inside = 0 <= ty < h and 0 <= tx < w
                a = label[y, x]
                b = label[ty, tx] if inside else 255
                confident = inside and a != 255 and b != 255
                assert labels["bg_pos"][k, y, x] == (confident and a == b == 0)
                assert labels["fg_pos"][k, y, x] == (confident and a == b and a != 0)
                assert labels["neg"][k, y, x] == (confident and a != b)
    for mask in labels.values():
        assert mask.dtype == bool and mask.shape == (len(offsets), h, w)


def test_path_max_boundary_1d_hand_worked():
    boundary = torch.tensor([[[0.0, 0.2, 0.9, 0.1, 0.0, 0.5]]])
    result = path_max_boundary(boundary, radius=4)
    offsets = [tuple(o) for o in pair_offsets(4)]
    expected = {
        (0, 1): [0.2, 0.9, 0.9, 0.1, 0.5, 1.0],
        (0, 2): [0.9, 0.9, 0.9, 0.5, 1.0, 1.0],
        (0, 3): [0.9, 0.9, 0.9, 1.0, 1.0, 1.0],
    }
    for offset, values in expected.items():
        assert torch.allclose(result[0, offsets.index(offset), 0], torch.tensor(values))
    downward = [k for k, (dy, _) in enumerate(offsets) if dy > 0]
    assert torch.all(result[0, downward] == 1.0)  # targets below a one-row image


def test_path_max_boundary_2d_hand_worked():
    boundary = torch.zeros(1, 5, 5)
    boundary[0, 2, 2] = 0.8
    boundary[0, 0, 4] = 0.3
    result = path_max_boundary(boundary, radius=3)
    offsets = [tuple(o) for o in pair_offsets(3)]

    def value(source, offset):
        return result[0, offsets.index(offset), source[0], source[1]].item()

    assert value((0, 0), (2, 2)) == pytest.approx(0.8)   # ends on the boundary pixel
    assert value((0, 0), (0, 2)) == 0.0                   # straight row above it
    assert value((2, 0), (0, 2)) == pytest.approx(0.8)   # row through it
    assert value((1, 2), (1, -1)) == pytest.approx(0.8)  # diagonal step past it: the 2x2 block counts
    assert value((0, 1), (2, 1)) == pytest.approx(0.8)   # thick line (0,1)-(2,2)
    assert value((0, 3), (2, 1)) == pytest.approx(0.3)   # passes (0,4), not (2,2)
    assert value((3, 3), (1, 1)) == 0.0
    assert value((4, 4), (0, 1)) == 1.0                   # target outside the image


def test_path_max_boundary_matches_brute_force_and_routes_gradient():
    rng = np.random.default_rng(1)
    boundary = torch.tensor(rng.random((2, 6, 8)), requires_grad=True)
    radius = 4
    result = path_max_boundary(boundary, radius)
    array = boundary.detach().numpy()
    for k, (dy, dx) in enumerate(pair_offsets(radius)):
        path = brute_force_path(int(dy), int(dx))
        for b in range(2):
            for y in range(6):
                for x in range(8):
                    if 0 <= y + dy < 6 and 0 <= x + dx < 8:
                        expected = max(array[b, y + py, x + px] for py, px in path)
                    else:
                        expected = 1.0
                    assert result[b, k, y, x].item() == pytest.approx(expected)
    result.sum().backward()
    # Each in-image pair sends gradient 1 to the pixel holding its maximum.
    in_image = (result.detach() < 1).sum().item()
    assert boundary.grad.sum().item() == pytest.approx(in_image)


def test_transition_matrix_is_column_stochastic_and_sparse():
    rng = np.random.default_rng(2)
    h, w, radius = 9, 11, 5
    boundary = rng.random((h, w))
    matrix = transition_matrix(boundary, radius=radius, beta=10)
    n = h * w
    k = len(pair_offsets(radius))
    assert scipy.sparse.issparse(matrix) and matrix.shape == (n, n)
    assert np.allclose(np.asarray(matrix.sum(axis=0)).ravel(), 1.0)
    in_image_pairs = sum((h - dy) * (w - abs(dx)) for dy, dx in pair_offsets(radius))
    assert matrix.nnz == n + 2 * in_image_pairs <= n * (2 * k + 1)
    # T = A / column sums with A symmetric and a_ii = 1.
    column_sums = 1.0 / matrix.diagonal()
    affinity = matrix.multiply(column_sums[None, :]).toarray()
    assert np.allclose(affinity, affinity.T) and np.allclose(np.diag(affinity), 1.0)


def _relative_difference(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("shape", [(7, 9), (12, 10), (3, 2), (1, 6)])
@pytest.mark.parametrize("exp_times", [0, 1, 8])
def test_random_walk_equals_dense_definition(shape, exp_times):
    rng = np.random.default_rng(shape[0] * 100 + exp_times)
    boundary = rng.random(shape) ** 2
    boundary[0, :] = rng.random(shape[1])  # border pixels are covered by the grid anyway; make them busy
    cams = rng.random((3, *shape))
    sparse = random_walk(cams, boundary, radius=5, beta=10, exp_times=exp_times)
    dense = dense_random_walk(cams, boundary, radius=5, beta=10, exp_times=exp_times)
    assert sparse.shape == cams.shape
    assert _relative_difference(sparse, dense) < 1e-4
    assert np.array_equal(sparse.argmax(0), dense.argmax(0))


def test_random_walk_float32_and_torch_input():
    rng = np.random.default_rng(3)
    boundary = rng.random((7, 9)).astype(np.float32)
    cams = rng.random((3, 7, 9)).astype(np.float32)
    dense = dense_random_walk(cams, boundary)
    fast = random_walk(cams, boundary, dtype=np.float32)
    assert _relative_difference(fast, dense) < 1e-3
    as_tensor = random_walk(torch.from_numpy(cams), torch.from_numpy(boundary))
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.float32
    assert _relative_difference(as_tensor.numpy(), dense) < 1e-4


def test_random_walk_does_not_cross_a_closed_boundary():
    h, w = 8, 12
    boundary = np.zeros((h, w))
    boundary[:, 6] = 1.0  # a wall: every path crossing it has affinity 0
    cams = np.zeros((2, h, w))
    cams[0, 3, 1] = 1.0   # a seed on the left
    cams[1, 4, 10] = 1.0  # a seed on the right
    result = random_walk(cams, boundary, radius=5, beta=10, exp_times=8)
    assert np.all(result[0, :, 7:] == 0) and np.all(result[1, :, :6] == 0)
    # Within each side the walk has spread the seed over every pixel.
    assert np.all(result[0, :, :6] > 0) and np.all(result[1, :, 7:] > 0)
    assert np.array_equal(result.argmax(0)[:, :6], np.zeros((h, 6), int))
    assert np.array_equal(result.argmax(0)[:, 7:], np.ones((h, 5), int))


def test_random_walk_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="cams"):
        random_walk(np.zeros((2, 4, 5)), np.zeros((4, 6)))
