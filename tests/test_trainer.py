"""The one training loop: schedules against hand-computed values, the sampler's order, and a
resumed run that reproduces an uninterrupted one bit for bit."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.catalogue import Catalogue
from pipeline.errors import PipelineError
from pipeline.runtime import Runtime
from pipeline.stage import StageContext
from pipeline.trainer import EpochSampler, Schedule, Trainer, decode_key, make_loader, rng_state, set_lr, set_rng_state


def test_poly_schedule_hand_values():
    poly = Schedule("poly", power=0.9)
    assert poly.factor(0, 100) == 1.0 and poly.factor(100, 100) == 0.0
    assert poly.factor(50, 100) == pytest.approx(0.5 ** 0.9)
    assert Schedule("poly", power=1.0).factor(75, 100) == pytest.approx(0.25)
    assert poly.factor(150, 100) == 0.0            # clamped past the end


def test_warmup_schedules_hand_values():
    warm = Schedule("warmup_poly", power=1.0, warmup_steps=10, warmup_start=0.0)
    assert warm.factor(0, 110) == 0.0
    assert warm.factor(5, 110) == pytest.approx(0.5)
    assert warm.factor(10, 110) == pytest.approx(1.0)
    assert warm.factor(60, 110) == pytest.approx(0.5)     # half-way through the 100 decay steps
    cosine = Schedule("warmup_cosine", warmup_steps=10, warmup_start=0.1)
    assert cosine.factor(5, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine.factor(60, 110) == pytest.approx(0.5)
    assert cosine.factor(35, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert cosine.factor(110, 110) == pytest.approx(0.0, abs=1e-12)


def test_set_lr_applies_group_multipliers():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr_mult": 10.0}], lr=1.0)
    assert set_lr(opt, 0.01, 0.5) == pytest.approx(0.005)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.05])


def test_sampler_order_depends_on_seed_and_epoch_only():
    def keys(epoch, skip=0, rank=0, world=1):
        sampler = EpochSampler(10, seed=3, shuffle=True, rank=rank, world_size=world)
        sampler.set_epoch(epoch, skip)
        return list(sampler)

    assert keys(1) == keys(1) and keys(1) != keys(2)
    assert [decode_key(k, 10)[0] for k in keys(2)] == [2] * 10
    assert sorted(decode_key(k, 10)[1] for k in keys(2)) == list(range(10))
    assert keys(4, skip=3) == keys(4)[3:]                    # a resumed epoch sees the rest, in order
    shards = [keys(0, rank=r, world=3) for r in range(3)]     # 3 per rank, disjoint
    assert all(len(s) == 3 for s in shards) and len({k for s in shards for k in s}) == 9


def test_rng_state_round_trip():
    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), __import__("random").random())
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


class NoisyData(torch.utils.data.Dataset):
    """Augmentation drawn from (seed, epoch, index), like the project's data sets."""

    def __init__(self, n=12):
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        epoch, index = decode_key(key, len(self.x))
        rng = np.random.default_rng([7, epoch, index])
        return self.x[index] + torch.from_numpy(rng.normal(size=4).astype(np.float32)) * 0.1, torch.tensor(index % 2.0)


def _train(tmp_path, crash_at=None, resume=True):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    runtime = Runtime(device=torch.device("cpu"))
    ctx = StageContext(name="toy_train", section=None, data=None, seed=0, result_dir=tmp_path / "result",
                       sess_dir=tmp_path / "sess", runtime=runtime, fingerprint="fp", resume=resume)
    loader = make_loader(NoisyData(), 4, runtime, 0, shuffle=True, seed=5)

    def losses(m, batch, step):
        if crash_at is not None and step == crash_at:
            raise KeyboardInterrupt
        out = m(batch[0]).squeeze(1)
        return {"loss": torch.nn.functional.mse_loss(out, batch[1]), "mean": out.mean()}

    trainer = Trainer(ctx, model, loader, torch.optim.AdamW(model.parameters(), lr=1e-2), losses, max_steps=9,
                      base_lr=1e-2, schedule=Schedule("warmup_poly", warmup_steps=2), lr_key="toy.lr",
                      checkpoint_every=2)
    history = trainer.fit()
    return model, history


def test_resume_reproduces_uninterrupted_run(tmp_path):
    reference, ref_history = _train(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", crash_at=5)                  # checkpoint at step 4, killed in step 5
    assert Catalogue(tmp_path / "b/result", tmp_path / "b/sess").checkpoint.exists("toy_train")
    resumed, history = _train(tmp_path / "b")
    for p, q in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    untimed = [[{k: v for k, v in r.items() if k != "images_per_s"} for r in h] for h in (history, ref_history)]
    assert untimed[0] == untimed[1]
    # without `resume` the checkpoint is ignored: a fresh run, also equal to the reference
    fresh, _ = _train(tmp_path / "b", resume=False)
    assert all(torch.equal(p, q) for p, q in zip(reference.parameters(), fresh.parameters()))


def test_non_finite_loss_stops_with_the_lr_key(tmp_path):
    runtime = Runtime(device=torch.device("cpu"))
    ctx = StageContext(name="toy", section=None, data=None, seed=0, result_dir=tmp_path, sess_dir=tmp_path,
                       runtime=runtime, fingerprint="fp")
    model = torch.nn.Linear(4, 1)
    loader = make_loader(NoisyData(), 4, runtime, 0, shuffle=True, seed=0)
    trainer = Trainer(ctx, model, loader, torch.optim.SGD(model.parameters(), lr=1.0),
                      lambda m, b, s: {"loss": m(b[0]).sum() * float("nan")}, max_steps=3, base_lr=1.0,
                      schedule=Schedule(), lr_key="toy.optimizer.lr")
    with pytest.raises(PipelineError, match="toy.optimizer.lr"):
        trainer.fit()


def test_global_batch_divides_over_ranks():
    runtime = Runtime(device=torch.device("cpu"), rank=1, world_size=4)
    loader = make_loader(NoisyData(40), 8, runtime, 0, shuffle=True, seed=0)
    assert loader.batch_size == 2
    with pytest.raises(PipelineError, match="global batch"):
        make_loader(NoisyData(40), 6, runtime, 0, shuffle=True, seed=0, key="train_cam.batch_size")
