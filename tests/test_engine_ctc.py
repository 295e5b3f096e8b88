"""engine.losses.ctc_loss (ToCo's class token contrast) against the published loop written out."""
import math

import pytest
import torch

from engine.losses import ctc_loss


@pytest.fixture(autouse=True)
def float64_by_default():
    """The slow version computes in Python floats; compare in float64, scoped to each test."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def slow_ctc(student, teacher, flags, temperature, extra):
    """The published loop, written out with plain exp/log."""
    batch, views = flags.shape
    total = 0.0
    for i in range(batch):
        positives = [j for j in range(views) if flags[i, j] == 1]
        negatives = [j for j in range(views) if flags[i, j] == 0]
        loss = 0.0
        for a in range(teacher.shape[1]):
            ell = [math.exp(float(teacher[i, a] @ student[i, j]) / temperature) for j in range(views)]
            s = sum(ell[n] for n in negatives)
            for j in positives:
                loss += -math.log(ell[j] / (ell[j] + s + 1e-4))
            if extra:
                loss += -math.log(1 / (1 + s + 1e-4))
        total += loss / teacher.shape[1] / (len(positives) + 1e-4)
    return total / batch


@pytest.mark.parametrize("extra", [True, False])
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_ctc_loss_matches_slow_version(extra, temperature):
    g = torch.Generator().manual_seed(7)
    student = torch.randn(3, 10, 16, generator=g) * 0.4
    teacher = torch.randn(3, 2, 16, generator=g) * 0.4
    flags = torch.ones(3, 10)
    flags[:, 2:] = (torch.rand(3, 8, generator=g) < 0.5).double()
    flags[2, 2:] = 1  # one image without negatives
    fast = ctc_loss(student, teacher, flags, temperature=temperature, extra_negative_term=extra)
    assert fast.item() == pytest.approx(slow_ctc(student, teacher, flags, temperature, extra), rel=1e-10)


def test_ctc_loss_hand_case_orthogonal_views():
    student = torch.zeros(1, 10, 4)
    student[..., 0] = 1
    teacher = torch.zeros(1, 2, 4)
    teacher[..., 1] = 1  # every z = 0, every exp = 1
    flags = torch.ones(1, 10)
    c = math.log(1 + 1e-4)
    expected = (2 * 10 * c + 2 * c) / 2 / (10 + 1e-4)
    assert ctc_loss(student, teacher, flags).item() == pytest.approx(expected, rel=1e-10)
    flags[0, 5:] = 0  # 3 positive locals + 2 globals, 5 negatives each exp = 1
    per_teacher = 5 * math.log((1 + 5 + 1e-4) / 1) + math.log(1 + 5 + 1e-4)
    assert ctc_loss(student, teacher, flags).item() == pytest.approx(2 * per_teacher / 2 / (5 + 1e-4), rel=1e-10)


def test_ctc_loss_extra_term_raises_loss_and_large_logits_stay_finite():
    g = torch.Generator().manual_seed(8)
    student = torch.randn(2, 10, 8, generator=g)
    teacher = torch.randn(2, 2, 8, generator=g)
    flags = torch.ones(2, 10)
    flags[:, 6:] = 0
    assert ctc_loss(student, teacher, flags) > ctc_loss(student, teacher, flags, extra_negative_term=False)
    huge = ctc_loss(student * 100, teacher * 100, flags, temperature=0.5)
    assert torch.isfinite(huge)


def test_ctc_loss_gradient_goes_to_student_only_and_view_layout():
    g = torch.Generator().manual_seed(9)
    batch, views = 2, 10
    student_flat = torch.randn(views * batch, 8, generator=g, requires_grad=True)  # view-major, as the reference
    teacher_flat = torch.randn(2 * batch, 8, generator=g)
    flags = torch.ones(batch, views)
    flags[0, 3] = 0
    student = student_flat.reshape(views, batch, -1).transpose(0, 1)
    teacher = teacher_flat.reshape(2, batch, -1).transpose(0, 1)
    loss = ctc_loss(student, teacher, flags)
    loss.backward()
    assert student_flat.grad.abs().sum() > 0
    assert loss.item() == pytest.approx(slow_ctc(student.detach(), teacher, flags, 0.5, True), rel=1e-10)
