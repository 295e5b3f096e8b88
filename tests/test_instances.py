import numpy as np

from net.instances import cluster_centroids, detect_instances, find_centroids, instance_maps


def two_objects(h=20, w=30):
    """Displacement field pointing to the centres of two discs; background 0."""
    ys, xs = np.mgrid[:h, :w].astype(float)
    displacement = np.zeros((2, h, w))
    objects = np.zeros((h, w), int)
    for index, (cy, cx) in enumerate([(9.0, 7.0), (10.0, 22.0)], start=1):
        inside = (ys - cy) ** 2 + (xs - cx) ** 2 < 6 ** 2
        objects[inside] = index
        displacement[0][inside] = (cy - ys)[inside]
        displacement[1][inside] = (cx - xs)[inside]
    return displacement, objects


def test_centroids_reach_the_object_centres():
    displacement, objects = two_objects()
    centroids = find_centroids(displacement, iterations=50)
    assert np.all(centroids[:, objects == 1] == np.array([[9], [7]]))
    assert np.all(centroids[:, objects == 2] == np.array([[10], [22]]))
    ys, xs = np.mgrid[:20, :30]
    background = objects == 0
    assert np.array_equal(centroids[0][background], ys[background])
    assert np.array_equal(centroids[1][background], xs[background])


def test_clusters_separate_the_two_objects_and_the_background():
    displacement, objects = two_objects()
    ids = cluster_centroids(find_centroids(displacement, iterations=50), displacement)
    assert ids.max() == 2
    for region in range(3):
        assert len(np.unique(ids[objects == region])) == 1
    assert len({ids[objects == region][0] for region in range(3)}) == 3


def test_instance_maps_are_class_major():
    cams = np.stack([np.full((2, 3), 1.0), np.full((2, 3), 2.0)])
    ids = np.array([[0, 0, 1], [1, 1, 0]])
    maps = instance_maps(cams, ids)
    assert maps.shape == (4, 2, 3)
    assert np.array_equal(maps[1], np.where(ids == 1, 1.0, 0.0))
    assert np.array_equal(maps[2], np.where(ids == 0, 2.0, 0.0))


def test_detect_instances_splits_pieces_and_drops_small_ones():
    scores = np.zeros((2, 6, 8))
    scores[0, 1:3, 1:3] = 0.9   # a 4-pixel piece
    scores[0, 4, 6] = 0.8       # a 1-pixel piece of the same map
    scores[1, 3:6, 1:4] = 0.6
    detected = detect_instances(scores, np.array([5, 7]), background_threshold=0.5, min_fragment_size=2)
    assert detected["mask"].shape == (3, 6, 8)
    assert detected["class"].tolist() == [5, 5, 7]
    assert np.allclose(detected["score"], [0.9, 0.0, 0.6])
    empty = detect_instances(np.zeros((1, 4, 4)), np.array([1]), background_threshold=0.5)
    assert empty["mask"].shape == (0, 4, 4) and empty["score"].shape == (0,)
