"""Bags of parallel slices, bag pooling, and the training loop: objectives, seeds, validation, early stopping,
chance-level warnings."""
import logging
import math

import pytest
import torch
from torch import nn

from tonno_fast.sampler import ObliqueSliceSampler
from tonno_fast.training import evaluate_encoder, pool_bags, train_encoder

SP = (1.0, 1.0, 1.0)


def _ball(n=16, radius=6.0, centre=(0.0, 0.0, 0.0)):
    z, y, x = torch.meshgrid(*[torch.arange(float(n)) - (n - 1) / 2] * 3, indexing="ij")
    cz, cy, cx = centre
    return ((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) < radius ** 2


def _box_volumes(n=4, shape=(12, 14, 10)):
    """Volume i is i + 1 inside a box (its body mask), 0 outside."""
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[3:9, 2:11, 3:8] = True
    return [mask.float() * (i + 1) for i in range(n)], [mask] * n


def test_bags_are_parallel_stacks_that_cross_the_body_exactly():
    vols, masks = _box_volumes()
    s = ObliqueSliceSampler(vols, [0, 1, 0, 1], spacing=(1.5, 1.0, 1.2), slice_size=24, pixel_spacing=1.0,
                            body_masks=masks, aux=masks, seed=0)
    b = s.sample_bags(6, slice_spacing=2.0)
    assert b.n_bags == 6 and b.sizes.sum() == b.slices.shape[0] == b.offsets.shape[0] == b.bag_index.shape[0]
    assert b.slices.shape[1:] == (1, 24, 24) and b.aux.shape[1:] == (1, 24, 24)
    torch.testing.assert_close(b.bag_index, torch.repeat_interleave(torch.arange(6), b.sizes))
    torch.testing.assert_close(b.slice_labels, b.labels[b.bag_index])
    for k in range(6):
        sel = b.bag_index == k
        off = b.offsets[sel]
        torch.testing.assert_close(off[1:] - off[:-1], torch.full((int(sel.sum()) - 1,), 2.0, dtype=torch.float64))
        # Every slice of the bag cuts its volume's body (value i + 1; the outermost ones may only graze the
        # outer half of the boundary voxels, where trilinear interpolation reads less).
        peak = b.slices[sel].flatten(1).amax(1)
        value = float(b.volume_index[k] + 1)
        assert bool((peak > 0).all()) and float(peak.max()) == pytest.approx(value)
        assert bool((peak[1:-1] > value / 2).all())
        assert bool((b.aux[sel].flatten(1).amax(1) > 0).all())
        # ...and covers the body's whole extent: one more step on either side would leave it.
        lo, hi = s.body_extent(int(b.volume_index[k]), b.normals[k])
        assert lo <= float(off[0]) < lo + 2.0 and hi - 2.0 < float(off[-1]) <= hi


def test_bag_runs_and_balanced_bag_batches():
    vols, masks = _box_volumes(6)
    labels = [0, 0, 0, 0, 0, 1]
    s = ObliqueSliceSampler(vols, labels, spacing=SP, slice_size=8, body_masks=masks, balance=True, seed=1)
    b = s.sample_bags(8, bag_size=3)
    assert int(b.labels.sum()) == 4  # exactly half of every batch, not only on average
    assert bool((b.sizes <= 3).all())
    for k in range(8):
        off = b.offsets[b.bag_index == k]
        torch.testing.assert_close(off[1:] - off[:-1], torch.ones(off.numel() - 1, dtype=torch.float64))
    # Reproducible with the seed; reseed restarts the stream.
    a = ObliqueSliceSampler(vols, labels, spacing=SP, slice_size=8, body_masks=masks, seed=5).sample_bags(3)
    s2 = ObliqueSliceSampler(vols, labels, spacing=SP, slice_size=8, body_masks=masks, seed=9)
    s2.reseed(5)
    c = s2.sample_bags(3)
    torch.testing.assert_close(a.slices, c.slices)
    torch.testing.assert_close(a.offsets, c.offsets)
    # The mean bag size is the body's mean extent over the slice spacing.
    assert 3 < s.mean_bag_size() < 11 and s.mean_bag_size(bag_size=3) <= 3
    with pytest.raises(ValueError, match="n_bags"):
        s.sample_bags(0)
    with pytest.raises(ValueError, match="bag_size"):
        s.sample_bags(2, bag_size=0)
    with pytest.raises(ValueError, match="slice_spacing"):
        s.sample_bags(2, slice_spacing=-1.0)


def test_pool_bags():
    z = torch.tensor([0.0, 1.0, 3.0, -2.0, 5.0])
    sizes = [3, 2]
    torch.testing.assert_close(pool_bags(z, sizes, "max"), torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(pool_bags(z, sizes, "mean"), torch.tensor([4 / 3, 1.5]))
    # LSE: max as r grows, mean as r shrinks, and the exact formula in between.
    torch.testing.assert_close(pool_bags(z, sizes, "lse", r=200.0), torch.tensor([3.0, 5.0]), atol=0.01, rtol=0)
    torch.testing.assert_close(pool_bags(z, sizes, "lse", r=1e-4), torch.tensor([4 / 3, 1.5]), atol=1e-3, rtol=0)
    expect = (torch.logsumexp(2 * z[:3], 0) - math.log(3)) / 2
    torch.testing.assert_close(pool_bags(z, sizes, "lse", r=2.0)[0], expect)
    # Every slice of a bag gets a gradient under LSE, only the top one under max.
    zz = z.clone().requires_grad_()
    pool_bags(zz, sizes, "lse", r=2.0).sum().backward()
    assert bool((zz.grad > 0).all())
    with pytest.raises(ValueError, match="sizes"):
        pool_bags(z, [2, 2])
    with pytest.raises(ValueError, match="pooling"):
        pool_bags(z, sizes, "attention")


def _mil_task(n=8, seed=0):
    """Positives hold a small bright ball off-centre: most of their slices do not cross it."""
    g = torch.Generator().manual_seed(seed)
    vols, labels, lesions = [], [], []
    body = _ball(16, 7.5)
    for i in range(n):
        les = _ball(16, 2.5, centre=(2.0, -2.0, 1.0)) if i % 2 else torch.zeros(16, 16, 16, dtype=torch.bool)
        vols.append(0.2 * torch.rand(16, 16, 16, generator=g) * body + 1.5 * les)
        labels.append(i % 2)
        lesions.append(les)
    return vols, labels, lesions, body


def _sampler(seed, n=8):
    vols, labels, lesions, body = _mil_task(n)
    return ObliqueSliceSampler(vols, labels, spacing=SP, slice_size=16, pixel_spacing=1.0,
                               body_masks=[body] * n, aux=lesions, balance=True, seed=seed)


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(4, 1))


def test_bag_objective_learns_a_small_lesion_task():
    hist = train_encoder(_net, _sampler(0), steps=60, batch_size=32, objective="bag", lr=0.03, seed=0,
                         validation=_sampler(1), validate_every=30, log_every=20)
    assert [h["step"] for h in hist] == [20, 40, 60]
    assert [v["step"] for v in hist.validation] == [30, 60]
    assert hist.steps == 60 and hist.encoder is not None and not hist.encoder.training
    res = evaluate_encoder(hist.encoder, _sampler(2), n_slices=512)
    assert res["auc_lesion_slices"] > 0.95, res
    assert 0.05 < res["lesion_fraction"] < 0.6  # most positive slices miss the lesion: the MIL setting
    assert hist.validation[-1]["bag_auc"] > 0.9 and "lesion_auc" in hist.validation[-1]


def test_seed_makes_runs_bitwise_reproducible():
    kw = dict(steps=6, batch_size=16, objective="bag", lr=0.01, slice_weight=0.5)
    a = train_encoder(_net, _sampler(0), seed=3, **kw).encoder.state_dict()
    b = train_encoder(_net, _sampler(7), seed=3, **kw).encoder.state_dict()  # the seed overrides the sampler's
    c = train_encoder(_net, _sampler(0), seed=4, **kw).encoder.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # The slice objective too, and torch's global generator is left as it was.
    state = torch.random.get_rng_state()
    d = train_encoder(_net, _sampler(0), seed=3, steps=4, batch_size=16).encoder.state_dict()
    e = train_encoder(_net, _sampler(0), seed=3, steps=4, batch_size=16).encoder.state_dict()
    assert all(torch.equal(d[k], e[k]) for k in d)
    assert torch.equal(torch.random.get_rng_state(), state)


class _Frozen(nn.Module):
    """A constant logit of 0 (loss ln 2, AUC 0.5) with one trainable parameter that gets no gradient signal
    towards anything useful: the chance-level warnings must fire."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return (x.flatten(1).mean(1) * 0 + self.w * 0)[:, None]


def test_chance_level_warnings_and_early_stopping(caplog):
    with caplog.at_level(logging.WARNING, logger="tonno_fast.training"):
        hist = train_encoder(_Frozen(), _sampler(0), steps=100, batch_size=8, objective="bag", seed=0,
                             validation=_sampler(1), validate_every=10, patience=3, chance_steps=20,
                             log_every=5)
    # The first validation sets the best; three more without improvement stop the run.
    assert hist.stopped_early and hist.steps == 40 and [v["step"] for v in hist.validation] == [10, 20, 30, 40]
    assert hist.best["step"] == 10
    messages = [w["message"] for w in hist.warnings]
    assert any("ln 2" in m for m in messages) and any("at chance" in m and "bag_auc" in m for m in messages)
    assert any("ln 2" in r.getMessage() for r in caplog.records)
    assert all(abs(h["loss"] - math.log(2)) < 1e-6 for h in hist)


@pytest.mark.parametrize("monitor, pick, tol", [("auc", max, 1e-12), ("loss", min, 1e-6)])
def test_best_weights_are_kept(monitor, pick, tol):
    # The weights of the best validation number: the highest AUC, or the lowest validation bag loss.
    val = _sampler(1)
    hist = train_encoder(_net, _sampler(0), steps=40, batch_size=32, objective="bag", lr=0.03, seed=1,
                         validation=val, validate_every=10, validation_size=16, monitor=monitor)
    best = pick(hist.validation, key=lambda v: v[monitor])
    assert hist.best == {"step": best["step"], monitor: best[monitor]}
    # The encoder handed back scores the validation set exactly as at the best step.
    from tonno_fast.training import _Validator
    again = _Validator(val, 16, None, None, "lse", 5.0, 256)(hist.encoder)
    assert again[monitor] == pytest.approx(best[monitor], abs=tol)


def test_bad_training_arguments():
    s = _sampler(0)
    with pytest.raises(ValueError, match="objective"):
        train_encoder(_net(), s, steps=1, objective="instance")
    with pytest.raises(ValueError, match="pooling"):
        train_encoder(_net(), s, steps=1, objective="bag", pooling="attention")
    with pytest.raises(ValueError, match="patience needs a validation"):
        train_encoder(_net(), s, steps=1, patience=2)
    with pytest.raises(ValueError, match="monitor"):
        train_encoder(_net(), s, steps=1, monitor="lesion_auc", validation=_sampler(1))
    with pytest.raises(ValueError, match="steps"):
        train_encoder(_net(), s)
    with pytest.raises(TypeError, match="factory returned"):
        train_encoder(lambda: 3, s, steps=1)
