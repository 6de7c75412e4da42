"""Random oblique slice sampler: shapes, labels, orientation distribution, the fused op, shifted geometry."""
import math

import pytest
import torch

import tonno_fast.ops as ops_module
from tonno_fast.geometry import make_geometry, rotate_frames_in_plane, shift_offsets
from tonno_fast.ops import slice_volume
from tonno_fast.sampler import ObliqueSliceSampler, sample_directions
from tonno_fast.training import evaluate_encoder, train_encoder


def test_shifted_axial_slice_is_the_volume_plane():
    # n = e_z, slice the size of the volume at its own spacing, shifted to plane d: exactly volume[d].
    D, H, W = 7, 6, 5
    vol = torch.rand(1, 1, D, H, W, dtype=torch.float64)
    geom = make_geometry((D, H, W), spacing=(2.0, 1.0, 1.0), directions=[[0.0, 0.0, 1.0]] * 3,
                         slice_size=(H, W), pixel_spacing=1.0, n_slices=1)
    shifted = shift_offsets(geom, [(d - (D - 1) / 2) * 2.0 for d in (0, 3, 6)])
    out = slice_volume(vol, shifted, backend="reference")[0, :, 0, 0]
    torch.testing.assert_close(out, vol[0, 0, [0, 3, 6]], rtol=1e-12, atol=1e-12)


def test_shifted_volume_maps_invert_slice_maps():
    geom = make_geometry((9, 8, 7), spacing=(1.5, 1.0, 0.8), n_directions=5, n_slices=3, slice_size=6)
    shifted = shift_offsets(geom, torch.linspace(-4, 5, 5))
    M, V = shifted.slice_maps(), shifted.volume_maps()
    bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64).expand(5, 1, 4)
    comp = V @ torch.cat([M, bottom], dim=1)  # (k, i, j, 1) -> (k, i, j)
    eye = torch.eye(3, 4, dtype=torch.float64).expand(5, 3, 4)
    torch.testing.assert_close(comp, eye, rtol=0, atol=1e-12)
    # Shifting twice adds up, and restricting directions keeps the shifts.
    twice = shift_offsets(shifted, torch.ones(5))
    torch.testing.assert_close(twice.shifts, shifted.shifts + 1)
    torch.testing.assert_close(shifted.with_directions(slice(1, 3)).shifts, shifted.shifts[1:3])


def test_rotate_frames_in_plane_keeps_rotation():
    frames = make_geometry((4, 4, 4), n_directions=6).frames
    rot = rotate_frames_in_plane(frames, torch.linspace(0, 3, 6))
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(6, 3, 3))
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(rot[:, 2], frames[:, 2])
    torch.testing.assert_close(rotate_frames_in_plane(frames, torch.zeros(6)), frames)


def _volumes(n=4, shape=(10, 12, 11)):
    # Volume i is the constant i + 1 inside its box: any slice through it shows that value.
    return [torch.full(shape, float(i + 1)) for i in range(n)]


def test_shapes_labels_and_aux():
    vols = _volumes()
    labels = [0, 1, 0, 1]
    masks = [torch.zeros(10, 12, 11, dtype=torch.bool) for _ in vols]
    for m in masks:
        m[3:7, 4:8, 4:7] = True
    aux = [torch.full((2, 10, 12, 11), 10.0 * (i + 1)) for i in range(4)]
    s = ObliqueSliceSampler(vols, labels, spacing=(1.5, 1.0, 1.0), slice_size=(9, 8), pixel_spacing=1.0,
                            body_masks=masks, aux=aux, seed=0)
    b = s.sample(40)
    assert b.slices.shape == (40, 1, 9, 8)
    assert b.aux.shape == (40, 2, 9, 8)
    assert b.labels.shape == (40,) and b.labels.dtype == torch.float32
    assert b.normals.shape == (40, 3) and b.offsets.shape == (40,)
    assert bool((b.normals[:, 2] >= 0).all())
    torch.testing.assert_close(b.normals.norm(dim=1), torch.ones(40, dtype=torch.float64))
    # Every slice passes through the body box, so its brightest pixel is its volume's constant.
    vmax = b.slices.flatten(1).amax(1)
    torch.testing.assert_close(vmax, (b.volume_index + 1).float())
    torch.testing.assert_close(b.labels, torch.tensor(labels, dtype=torch.float32)[b.volume_index])
    torch.testing.assert_close(b.aux.flatten(2).amax(2), 10 * (b.volume_index + 1).float()[:, None].expand(40, 2))
    # Planes pass through the mask: |offset| is at most the distance of the farthest mask corner.
    assert float(b.offsets.abs().max()) <= math.sqrt((2.5 * 1.5) ** 2 + 2.5 ** 2 + 2.0 ** 2) + 1e-9


def test_reproducible_with_seed_and_balance():
    vols = _volumes(6)
    labels = [0, 0, 0, 0, 0, 1]
    a = ObliqueSliceSampler(vols, labels, slice_size=6, seed=3, balance=True, spacing=(1.0, 1.0, 1.0)).sample(400)
    b = ObliqueSliceSampler(vols, labels, slice_size=6, seed=3, balance=True, spacing=(1.0, 1.0, 1.0)).sample(400)
    torch.testing.assert_close(a.slices, b.slices)
    torch.testing.assert_close(a.normals, b.normals)
    # Balanced: the single positive volume gives about half of the slices (binomial sd 0.025).
    assert abs(float(a.labels.mean()) - 0.5) < 0.1


@pytest.mark.parametrize("axis,angle", [((1.0, 0.0, 0.0), math.radians(40)), ((0.0, 0.6, -0.8), math.radians(20)),
                                        ((0.0, 0.0, 1.0), math.pi / 2)])
def test_cone_orientation_distribution(axis, angle):
    g = torch.Generator().manual_seed(0)
    n = sample_directions(20000, orientation="cone", axis=axis, cone_angle=angle, generator=g)
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    c = (n @ a).abs()
    # cos θ is uniform on [cos α, 1]: mean (1 + cos α)/2, sd (1 - cos α)/√12.
    expect = (1 + math.cos(angle)) / 2
    se = (1 - math.cos(angle)) / math.sqrt(12) / math.sqrt(n.shape[0])
    assert abs(float(c.mean()) - expect) < 5 * se
    assert float(c.min()) >= math.cos(angle) - 1e-12


def test_hemisphere_sampler_is_uniform_through_the_sampler():
    s = ObliqueSliceSampler([torch.rand(6, 6, 6)], [1], slice_size=4, seed=1, spacing=(1.0, 1.0, 1.0))
    n = s.sample(4000).normals
    # Uniform on the hemisphere: n_z ~ U(0, 1) (mean 1/2, sd 1/√12), azimuth uniform (mean n_x = n_y = 0).
    se = 1 / math.sqrt(12 * 4000)
    assert abs(float(n[:, 2].mean()) - 0.5) < 5 * se
    assert abs(float(n[:, 0].mean())) < 0.05 and abs(float(n[:, 1].mean())) < 0.05


def test_one_fused_call_per_volume_per_batch(monkeypatch):
    calls = []
    real = ops_module.slice_volume

    def spy(volume, geometry, **kw):
        calls.append((volume.shape, geometry.n_directions, geometry.n_slices))
        return real(volume, geometry, **kw)

    monkeypatch.setattr(ops_module, "slice_volume", spy)
    s = ObliqueSliceSampler(_volumes(5), [0, 1, 0, 1, 0], slice_size=5, seed=0, volumes_per_batch=3, spacing=(1.0, 1.0, 1.0))
    b = s.sample(64)
    assert len(calls) == len(torch.unique(b.volume_index)) <= 3
    assert sum(c[1] for c in calls) == 64  # every slice came out of the fused op, one direction each
    assert all(c[2] == 1 for c in calls)
    calls.clear()
    s2 = ObliqueSliceSampler(_volumes(5), [0, 1, 0, 1, 0], slice_size=5, seed=0, spacing=(1.0, 1.0, 1.0))
    b2 = s2.sample(200)
    assert len(calls) == len(torch.unique(b2.volume_index)) == 5


def test_bad_arguments():
    with pytest.raises(ValueError, match="labels"):
        ObliqueSliceSampler(_volumes(2), [0, 1, 1], spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="cone_angle"):
        ObliqueSliceSampler(_volumes(2), [0, 1], orientation="cone", cone_angle=2.0, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="body_masks\\[0\\] is empty"):
        ObliqueSliceSampler(_volumes(1), [0], body_masks=[torch.zeros(10, 12, 11, dtype=torch.bool)], spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="orientation"):
        sample_directions(3, orientation="sphere")


def test_training_helper_learns_an_easy_task():
    # Positive volumes hold a bright ball, negatives do not: a tiny CNN must separate their slices.
    torch.manual_seed(0)
    z, y, x = torch.meshgrid(*[torch.arange(16.0) - 7.5] * 3, indexing="ij")
    ball = ((z ** 2 + y ** 2 + x ** 2) < 36).float()
    vols = [0.1 * torch.rand(16, 16, 16) + (i % 2) * ball for i in range(8)]
    labels = [i % 2 for i in range(8)]
    s = ObliqueSliceSampler(vols, labels, slice_size=12, pixel_spacing=1.5, seed=0, balance=True,
                            body_masks=[ball.bool()] * 8, aux=[(i % 2) * ball[None] for i in range(8)], spacing=(1.0, 1.0, 1.0))
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 1))
    hist = train_encoder(net, s, steps=40, batch_size=32, lr=0.05, log_every=20)
    assert [h["step"] for h in hist] == [20, 40]
    res = evaluate_encoder(net, s, n_slices=256)
    assert res["auc"] > 0.95 and res["accuracy"] > 0.85
    assert res["lesion_fraction"] == 1.0  # every plane goes through the ball (the body mask)


def test_spacing_is_required_or_read_from_scans_and_bool_aux():
    vols = _volumes(2)
    with pytest.raises(ValueError, match="spacing is required"):
        ObliqueSliceSampler(vols, [0, 1])
    from tonno_fast.io import NiftiVolume
    import numpy as np
    scans = [NiftiVolume(v, (2.0, 1.0, 1.5), np.eye(4)) for v in vols]
    s = ObliqueSliceSampler(scans, [0, 1], slice_size=5, seed=0)
    assert s.spacings == [(2.0, 1.0, 1.5)] * 2
    # A bool mask as aux is cut like a 0/1 volume (not refused as if it were an image).
    masks = [torch.ones(10, 12, 11, dtype=torch.bool)] * 2
    b = ObliqueSliceSampler(vols, [0, 1], spacing=(1.0, 1.0, 1.0), slice_size=5, aux=masks, seed=0,
                            body_masks=masks).sample(8)
    assert b.aux.dtype == torch.float32 and float(b.aux.max()) == 1.0
    with pytest.raises(TypeError, match=r"volumes\[0\] must be real-valued"):
        ObliqueSliceSampler([m for m in masks], [0, 1], spacing=(1.0, 1.0, 1.0))
