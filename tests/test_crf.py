"""Dense CRF wrapper on constructed images: a sharp vertical colour edge."""
import numpy as np
import pytest

from net.crf import crf_from_labels, dense_crf

HEIGHT, WIDTH, EDGE = 40, 64, 32


@pytest.fixture
def scene():
    """Red left of column EDGE, blue from it on, with mild noise; the true split."""
    rng = np.random.default_rng(0)
    image = np.zeros((HEIGHT, WIDTH, 3), np.int64)
    image[:, :EDGE] = (200, 40, 40)
    image[:, EDGE:] = (40, 40, 200)
    image = np.clip(image + rng.integers(-10, 11, image.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((HEIGHT, WIDTH), np.int64)
    truth[:, EDGE:] = 1
    return image, truth


def blurred_probs(centre, softness):
    """Two-class probabilities whose boundary is at `centre` and spread over `softness` pixels."""
    right = 1 / (1 + np.exp(-(np.arange(WIDTH) - centre) / softness))
    right = np.broadcast_to(right, (HEIGHT, WIDTH))
    return np.stack([1 - right, right]).astype(np.float32)


@pytest.mark.parametrize("shift,softness", [(5, 4), (-5, 8)])
def test_dense_crf_snaps_blurred_unary_to_colour_edge(scene, shift, softness):
    image, truth = scene
    probs = blurred_probs(EDGE + shift, softness)
    before = (probs.argmax(0) == truth).mean()
    posterior = dense_crf(image, probs)
    after = (posterior.argmax(0) == truth).mean()
    assert before < 0.95 and after > before and after > 0.99
    assert posterior.shape == probs.shape and posterior.dtype == np.float32
    assert (posterior >= 0).all() and np.allclose(posterior.sum(0), 1, atol=1e-4)


def test_dense_crf_accepts_non_contiguous_inputs(scene):
    image, truth = scene
    probs = blurred_probs(EDGE + 3, 4)
    flipped = dense_crf(image[:, ::-1], probs[:, :, ::-1])
    assert (flipped.argmax(0) == truth[:, ::-1]).mean() > 0.99


def test_crf_from_labels_keeps_clean_map(scene):
    image, truth = scene
    assert np.array_equal(crf_from_labels(image, truth, n_labels=2), truth)
    three = truth.copy()
    three[:10] = 2
    image = image.copy()
    image[:10] = (40, 200, 40)
    assert np.array_equal(crf_from_labels(image, three, n_labels=3), three)


@pytest.mark.parametrize("displacement", [3, -4])
def test_crf_from_labels_snaps_displaced_edge(scene, displacement):
    image, truth = scene
    labels = np.zeros_like(truth)
    labels[:, EDGE + displacement:] = 1
    refined = crf_from_labels(image, labels, n_labels=2)
    assert refined.dtype == np.int64
    assert np.array_equal(refined, truth)


def test_inputs_are_validated(scene):
    image, truth = scene
    probs = blurred_probs(EDGE, 4)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), probs)
    with pytest.raises(ValueError, match="probs"):
        dense_crf(image, probs[:, :-1])
    with pytest.raises(ValueError, match="lie in"):
        crf_from_labels(image, truth + 1, n_labels=2)
    with pytest.raises(ValueError, match="labels must be"):
        crf_from_labels(image, truth[:-1], n_labels=2)
    assert not crf_from_labels(image, np.zeros_like(truth), n_labels=1).any()
