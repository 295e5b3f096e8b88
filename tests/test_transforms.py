"""The crop data set used by train_irn and train_deeplab keeps image and label aligned."""
import numpy as np

from pipeline.catalogue import Catalogue
from pipeline.transforms import SegmentationCropDataset


class _ColourCodedData:
    """Label k painted in the image as grey level 40·k (blocks of 6 px, so resizing keeps them)."""

    def __init__(self, label):
        self.label = label

    def load_image(self, image_id):
        grey = (self.label.astype(np.uint8) * 40)
        return np.repeat(grey[:, :, None], 3, axis=2)


def test_crop_dataset_keeps_labels_on_their_pixels(tmp_path):
    from pipeline.artifacts import save_label_png

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 5, (9, 13)).astype(np.uint8)
    label = np.kron(blocks, np.ones((6, 6), np.uint8))           # 54×78
    save_label_png(tmp_path / "a.png", label)
    labels = Catalogue(tmp_path, tmp_path).sem_seg
    save_label_png(labels.path("a"), label)
    data = SegmentationCropDataset(_ColourCodedData(label), ["a"], labels, crop=48,
                                   scale_range=[0.7, 1.6], mean=[0, 0, 0], std=[1 / 255] * 3)
    for epoch in range(6):
        image, crop_label, _ = data[epoch * len(data)]          # the sampler's key: epoch × n + index
        image, crop_label = image.numpy()[0], crop_label.numpy()   # image back in 0..255 grey levels
        assert image.shape == crop_label.shape == (48, 48)
        valid = crop_label != 255
        assert valid.any()
        # away from block edges (bilinear mixing there), the grey level gives back the label
        expected = np.round(image / 40).astype(int)
        interior = valid & (np.abs(image - expected * 40) < 2)
        assert interior.mean() > 0.3
        assert (crop_label[interior] == expected[interior]).mean() > 0.98
        # labels are the painted ids, or 255 where the crop reaches into padding
        assert set(np.unique(crop_label)) <= set(range(5)) | {255}
