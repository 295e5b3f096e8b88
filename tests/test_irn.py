import math

import numpy as np
import pytest
import torch

from net.affinity import pair_labels, pair_offsets
from net.irn import IRNet, irn_losses, irn_total_loss


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return IRNet("resnet18", pretrained=False)


def batched_labels(label: np.ndarray, radius: int, batch: int = 1) -> dict[str, torch.Tensor]:
    single = pair_labels(label, radius)
    return {key: torch.from_numpy(np.stack([mask] * batch)) for key, mask in single.items()}


@pytest.mark.parametrize("size", [(33, 47), (64, 64), (18, 65)])
def test_output_shapes_on_any_size(model, size):
    model.eval()
    with torch.no_grad():
        boundary, displacement = model(torch.randn(2, 3, *size))
    expected = (math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    assert boundary.shape == (2, 1, *expected)
    assert displacement.shape == (2, 2, *expected)


def test_undilated_backbone_and_scaled_widths():
    model = IRNet("resnet18", dilate_last_stage=False)
    assert [tap[0].out_channels for tap in model.displacement_taps] == [16, 32, 64, 64, 64]
    boundary, _ = model(torch.randn(1, 3, 40, 52))
    assert boundary.shape == (1, 1, 10, 13)


def test_backbone_is_frozen_and_branches_learn(model):
    model.train()
    assert not model.backbone.training
    assert all(not m.training for m in model.backbone.modules())
    statistics = model.backbone.bn1.running_mean.clone()
    for p in model.parameters():
        p.grad = None
    boundary, displacement = model(torch.randn(2, 3, 48, 40))
    label = np.zeros((12, 10), np.uint8)
    label[:, 5:] = 1
    losses = irn_losses(boundary, displacement, batched_labels(label, 4, batch=2), radius=4)
    irn_total_loss(losses).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert torch.equal(statistics, model.backbone.bn1.running_mean)
    boundary_params, displacement_params = model.param_groups()
    assert all(p.grad is not None for p in boundary_params + displacement_params)
    assert {id(p) for p in boundary_params}.isdisjoint(id(p) for p in displacement_params)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in boundary_params + displacement_params}


def test_displacement_centering_reference_leaves_training_alone():
    """The reference never updates the mean in training (it is set after training, by
    stages/train_irn.set_displacement_mean); eval subtracts whatever mean is set."""
    model = IRNet("resnet18")
    image = torch.randn(1, 3, 32, 32)
    model.train()
    with torch.no_grad():
        _, raw = model(image)
    assert torch.equal(model.displacement_centering.running_mean, torch.zeros(2))
    model.displacement_centering.running_mean.copy_(torch.tensor([0.5, -0.25]))
    model.eval()
    with torch.no_grad():
        _, centred = model(image)
        _, uncentred = model(image, centre=False)
    assert torch.allclose(centred, uncentred - torch.tensor([0.5, -0.25]).view(1, 2, 1, 1), atol=1e-6)


def test_displacement_centering_tracks_then_subtracts_the_mean():
    model = IRNet("resnet18")
    model.displacement_centering.track_in_training = True
    image = torch.randn(1, 3, 32, 32)
    model.train()
    with torch.no_grad():
        _, raw = model(image)
    assert torch.allclose(model.displacement_centering.running_mean, 0.1 * raw.mean(dim=(0, 2, 3)), atol=1e-6)
    model.eval()
    with torch.no_grad():
        _, centred = model(image)
    assert torch.allclose(centred, raw - model.displacement_centering.running_mean.view(1, 2, 1, 1), atol=1e-5)


def _two_region_label(h=8, w=10):
    label = np.zeros((h, w), np.uint8)
    label[:, 5:] = 1  # background on the left, class 1 on the right
    return label


def _affinity_loss(losses):
    return (losses["bg_pos"] / 2 + losses["fg_pos"] / 2 + losses["neg"]).item()


def test_boundary_between_regions_costs_less_than_elsewhere():
    radius = 4
    label = _two_region_label()
    labels = batched_labels(label, radius)
    displacement = torch.zeros(1, 2, *label.shape)
    between = torch.full((1, 1, *label.shape), -8.0)
    between[..., 4:6] = 8.0  # boundary on the two columns where the labels meet
    elsewhere = torch.full((1, 1, *label.shape), -8.0)
    elsewhere[..., 1:3] = 8.0  # the same amount of boundary inside the background
    good = irn_losses(between, displacement, labels, radius)
    bad = irn_losses(elsewhere, displacement, labels, radius)
    assert _affinity_loss(good) < _affinity_loss(bad)
    assert good["fg_pos"] < bad["fg_pos"] or good["bg_pos"] < bad["bg_pos"]
    assert good["neg"] < 0.01 and bad["neg"] > 1.0


def test_loss_normalisation_hand_computed():
    radius = 3
    label = _two_region_label(6, 8)
    labels = batched_labels(label, radius)
    uniform = torch.zeros(1, 1, 6, 8)  # sigmoid 0.5 everywhere: affinity 0.5 on every pair
    zero_displacement = torch.zeros(1, 2, 6, 8)
    losses = irn_losses(uniform, zero_displacement, labels, radius)
    half = -math.log(0.5 + 1e-5)
    for key in ("bg_pos", "fg_pos"):
        assert losses[key].item() == pytest.approx(half, rel=1e-4)
    assert losses["neg"].item() == pytest.approx(-math.log(1 + 1e-5 - 0.5), rel=1e-4)
    # Zero displacement: every fg pair is off by its whole offset; mean of |dy|, |dx| over pairs and coordinates.
    fg = labels["fg_pos"][0].numpy()
    offsets = pair_offsets(radius)
    expected = sum(fg[k].sum() * (abs(dy) + abs(dx)) for k, (dy, dx) in enumerate(offsets)) / (2 * fg.sum())
    assert losses["dp_fg"].item() == pytest.approx(expected, rel=1e-4)
    assert losses["dp_bg"].item() == pytest.approx(0.0)


def test_displacement_to_a_common_centroid_has_zero_loss():
    """D(p) = centroid − p on the object, a constant on the background: both losses vanish."""
    radius = 4
    label = _two_region_label()
    h, w = label.shape
    ys, xs = np.mgrid[:h, :w].astype(np.float32)
    displacement = np.stack([3.5 - ys, 7.0 - xs])  # the object's centroid (3.5, 7)
    displacement[:, label == 0] = np.array([0.3, -1.2])[:, None]
    displacement = torch.from_numpy(displacement)[None]
    losses = irn_losses(torch.zeros(1, 1, h, w), displacement, batched_labels(label, radius), radius)
    assert losses["dp_fg"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["dp_bg"].item() == pytest.approx(0.0, abs=1e-5)
    flipped = irn_losses(torch.zeros(1, 1, h, w), -displacement, batched_labels(label, radius), radius)
    assert flipped["dp_fg"].item() > 1.0  # the sign convention matters


def test_irn_losses_reject_labels_of_another_radius():
    label = _two_region_label()
    with pytest.raises(ValueError, match="radius"):
        irn_losses(torch.zeros(1, 1, 8, 10), torch.zeros(1, 2, 8, 10), batched_labels(label, 5), radius=4)
