"""engine.crops (local crops for CTC), net.proj_head.ProjectionHead and engine.ema.EMA."""
import pytest
import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import weight_norm

from engine.crops import local_roi, select_local_crops
from engine.ema import EMA
from net.proj_head import ProjectionHead


# ---------------------------------------------------------------------------------------
# local ROI and crops
# ---------------------------------------------------------------------------------------

def test_local_roi_hand_case():
    cams = torch.tensor([[[[0.1, 0.25, 0.3, 0.7, 0.9]], [[0.9, 0.9, 0.9, 0.9, 0.9]]]])  # (1, 2, 1, 5)
    only_first = local_roi(cams, torch.tensor([[1, 0]]))
    assert only_first.tolist() == [[[0, 0, 1, 2, 2]]]
    assert local_roi(cams, torch.tensor([[0, 1]])).tolist() == [[[2, 2, 2, 2, 2]]]


def slow_crops(images, roi, corners, crop_size, ratio, num_global):
    batch, n = corners.shape[:2]
    flags = torch.ones(batch, num_global + n)
    crops = []
    for b in range(batch):
        row = []
        for i in range(n):
            top, left = corners[b, i].tolist()
            row.append(images[b, :, top:top + crop_size, left:left + crop_size])
            total = sum(int(roi[b, y, x]) for y in range(top, top + crop_size) for x in range(left, left + crop_size))
            if total / crop_size ** 2 <= ratio:
                flags[b, num_global + i] = 0
        crops.append(torch.stack(row))
    return torch.stack(crops), flags


def scene(seed, size=40):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, size, size, generator=g)
    roi = torch.zeros(2, size, size, dtype=torch.int16)
    roi[0, 5:30, 8:25] = 2  # an object with an uncertain rim
    roi[0, 3:32, 6:27][roi[0, 3:32, 6:27] == 0] = 1
    roi[1, :, 20:] = 1
    return images, roi


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_local_crops_matches_slow_version(seed):
    images, roi = scene(seed)
    out = select_local_crops(images, roi, num_crops=6, crop_size=12, generator=torch.Generator().manual_seed(seed))
    crops, flags = slow_crops(images, roi, out.corners, 12, 0.2, 2)
    assert torch.equal(out.crops, crops) and torch.equal(out.flags, flags)
    assert out.crops.shape == (2, 6, 3, 12, 12) and out.flags.shape == (2, 8) and (out.flags[:, :2] == 1).all()
    assert (out.flags == 0).any() and (out.flags[:, 2:] == 1).any()
    # The centre of every crop is a candidate: not confident foreground.
    for b in range(2):
        for top, left in out.corners[b].tolist():
            assert roi[b, top + 6, left + 6] <= 1
    assert len({tuple(c) for c in out.corners[0].tolist()}) == 6  # drawn without replacement


def test_uncertain_pixels_are_candidates_too():
    roi = torch.full((1, 40, 40), 2, dtype=torch.int16)
    roi[0, 20, 8:32] = 1  # a line of uncertain pixels, no background at all
    for seed in range(5):
        out = select_local_crops(torch.randn(1, 3, 40, 40), roi, num_crops=8, crop_size=12,
                                 generator=torch.Generator().manual_seed(seed))
        assert (out.corners[0, :, 0] + 6 == 20).all()
        assert ((out.corners[0, :, 1] + 6 >= 8) & (out.corners[0, :, 1] + 6 < 32)).all()


def test_select_local_crops_falls_back_to_any_position_and_is_seeded():
    images = torch.randn(1, 3, 30, 30)
    roi = torch.full((1, 30, 30), 2, dtype=torch.int16)
    roi[0, 10, 10] = 0  # a single candidate: fewer than the crops asked for
    out = select_local_crops(images, roi, num_crops=4, crop_size=10, generator=torch.Generator().manual_seed(3))
    assert (out.flags == 1).all() and out.corners.shape == (1, 4, 2)
    again = select_local_crops(images, roi, num_crops=4, crop_size=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.corners, again.corners)
    with pytest.raises(ValueError, match="too small"):
        select_local_crops(torch.randn(1, 3, 8, 8), torch.zeros(1, 8, 8), num_crops=1, crop_size=10)


def test_local_view_flip_flag():
    images, roi = scene(4)
    mirrored = torch.tensor([True, False])
    kwargs = dict(num_crops=8, crop_size=12, relative_flip=mirrored)
    published = select_local_crops(images, roi, generator=torch.Generator().manual_seed(0), **kwargs)
    unflagged = select_local_crops(images, roi, num_crops=8, crop_size=12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(published.flags, unflagged.flags) and torch.equal(published.corners, unflagged.corners)
    aligned = select_local_crops(images, roi, local_view_independent_flip=False,
                                 generator=torch.Generator().manual_seed(0), **kwargs)
    aligned_roi = torch.stack([roi[0].flip(-1), roi[1]])
    _, flags = slow_crops(images, aligned_roi, aligned.corners, 12, 0.2, 2)
    assert torch.equal(aligned.flags, flags)
    assert not torch.equal(aligned.corners[0], published.corners[0])
    assert torch.equal(aligned.corners[1], published.corners[1])


# ---------------------------------------------------------------------------------------
# projection head
# ---------------------------------------------------------------------------------------

class WeightNormHead(nn.Module):
    """The obvious DINO head: torch's weight norm on the last layer, gain set to 1 and frozen."""

    def __init__(self, head: ProjectionHead):
        super().__init__()
        self.mlp = head.mlp
        self.last = weight_norm(nn.Linear(head.last_layer.in_features, head.last_layer.out_features, bias=False))
        with torch.no_grad():
            self.last.parametrizations.weight.original1.copy_(head.last_layer.weight)
            self.last.parametrizations.weight.original0.fill_(1.0)

    def forward(self, x):
        return self.last(nn.functional.normalize(self.mlp(x), dim=-1))


def test_projection_head_equals_weight_norm_with_unit_gain():
    torch.manual_seed(0)
    head = ProjectionHead(in_dim=24, out_dim=40, hidden_dim=32, bottleneck_dim=16)
    x = torch.randn(5, 24)
    assert torch.allclose(head(x), WeightNormHead(head)(x), atol=1e-6)
    assert head(x).shape == (5, 40)
    # Rows are normalised at every forward: scaling a row of the raw weight changes nothing.
    with torch.no_grad():
        before = head(x)
        head.last_layer.weight[3] *= 7.0
    assert torch.allclose(head(x), before, atol=1e-6)


def test_projection_head_layout_and_init():
    torch.manual_seed(0)
    head = ProjectionHead()
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(768, 2048), (2048, 2048), (2048, 256)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert all((m.bias == 0).all() for m in linears)
    assert abs(linears[1].weight.std().item() - 0.02) < 0.001
    assert head.last_layer.weight.shape == (1024, 256) and head.last_layer.bias is None
    assert isinstance(ProjectionHead(8, 4, num_layers=1).mlp, nn.Linear)


# ---------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------

def test_ema_update_matches_formula_and_never_gets_gradients():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    ema = EMA(student, momentum=0.9)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), student.parameters()))
    assert not any(p.requires_grad for p in ema.parameters())

    optimiser = torch.optim.SGD(student.parameters(), lr=0.5)
    for _ in range(3):
        before = {n: p.clone() for n, p in ema.module.named_parameters()}
        loss = student(torch.randn(8, 4)).pow(2).sum() + ema(torch.randn(8, 4)).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        ema.update(student)
        for name, parameter in student.named_parameters():
            expected = 0.9 * before[name] + 0.1 * parameter.detach()
            assert torch.allclose(dict(ema.module.named_parameters())[name], expected)
    assert all(p.grad is None for p in ema.parameters())
    assert torch.equal(ema.module[1].running_mean, student[1].running_mean)
    assert ema(torch.randn(2, 4)).requires_grad is False
    assert any(k.startswith("module.") for k in ema.state_dict())


def test_ema_momentum_bounds_and_mismatch():
    with pytest.raises(ValueError):
        EMA(nn.Linear(2, 2), momentum=1.5)
    ema = EMA(nn.Linear(2, 2), momentum=0.5)
    with pytest.raises(ValueError, match="match"):
        ema.update(nn.Linear(2, 3, bias=False))
