"""The reference backend (the oracle): checks against closed forms and a library we did not write."""
import math

import numpy as np
import pytest
import torch

import tonno_fast as tf
from tonno_fast.backend import reference as R
from tonno_fast.filters import apply_filter, reconstruction_scale


def test_axial_slice_at_offset_zero_is_the_middle_image():
    torch.manual_seed(0)
    vol = torch.randn(2, 3, 7, 9, 11, dtype=torch.float64)
    g = tf.make_geometry((7, 9, 11), directions=[[0, 0, 1]], n_slices=7, slice_size=(9, 11), pixel_spacing=1.0)
    s = tf.slice_volume(vol, g, backend="reference")  # (B,N,S,C,h,w)
    assert s.shape == (2, 1, 7, 3, 9, 11)
    torch.testing.assert_close(s[:, 0, 3], vol[:, :, 3], rtol=0, atol=1e-14)
    torch.testing.assert_close(s[:, 0].transpose(1, 2), vol, rtol=0, atol=1e-14)


def test_fill_value_outside():
    vol = torch.ones(1, 1, 4, 4, 4, dtype=torch.float64)
    g = tf.make_geometry((4, 4, 4), directions=[[0, 0, 1]], n_slices=3, slice_size=8, pixel_spacing=1.0,
                         slice_spacing=10.0)
    s = tf.slice_volume(vol, g, fill=-5.0, backend="reference")[0, 0, :, 0]
    assert float(s[0].max()) == -5.0 and float(s[2].min()) == -5.0  # slices at ±10 mm miss the volume
    assert float(s[1, 4, 4]) == 1.0 and float(s[1, 0, 0]) == -5.0


def test_gaussian_plane_integrals_closed_form():
    # Plane integrals of A exp(-|x-c|²/2σ²) are A 2πσ² exp(-(s - c·n)²/2σ²).
    sigma, c = 4.0, torch.tensor([3.0, -2.0, 1.5], dtype=torch.float64)
    shape, spacing = (40, 44, 36), (1.0, 1.0, 1.0)
    from conftest import gaussian_blobs
    vol = gaussian_blobs(shape, spacing, [(tuple(c.tolist()), sigma, 1.0)])
    g = tf.make_geometry(shape, spacing=spacing, n_directions=9)
    sino = tf.radon(vol[None, None], g, backend="reference")[0, 0]
    s = g.offsets
    expect = 2 * math.pi * sigma ** 2 * torch.exp(-(s[None] - (g.directions @ c)[:, None]) ** 2 / (2 * sigma ** 2))
    assert float((sino - expect).norm() / expect.norm()) < 5e-3


def test_radon_matches_scikit_image_times_depth():
    """A volume constant along z, directions in the xy-plane: plane integrals = skimage's line integrals × depth."""
    from scipy.ndimage import gaussian_filter
    from skimage.transform import radon as skradon

    H = W = 41
    D = 5
    img = np.zeros((H, W))
    img[12:16, 24:28] = 1.0
    img[23:26, 12:15] = 2.0
    img = gaussian_filter(img, 1.5)
    yy, xx = np.mgrid[:H, :W]
    img[(yy - 20) ** 2 + (xx - 20) ** 2 > 19 ** 2] = 0  # skimage circle=True: no padding, centre (N-1)/2
    vol = torch.tensor(np.broadcast_to(img, (D, H, W)).copy())
    angles = np.array([0.0, 30.0, 75.0, 90.0, 135.0])
    sk = skradon(img, theta=angles, circle=True)  # (41, n)
    # skimage's angle θ turns the other way round in our (x, y = row) frame: n = (cos θ, -sin θ, 0).
    phis = -np.deg2rad(angles)
    dirs = np.stack([np.cos(phis), np.sin(phis), np.zeros_like(phis)], 1)
    g = tf.make_geometry((D, H, W), directions=dirs, n_slices=41, slice_size=61, pixel_spacing=1.0)
    ours = tf.radon(vol[None, None], g, backend="reference")[0, 0].numpy() / D
    err = np.abs(ours - sk.T).max(axis=1) / np.abs(sk).max()
    assert err[0] < 1e-12 and err[3] < 1e-12  # axis-aligned: no interpolation on either side
    assert err.max() < 0.015  # oblique: the two libraries interpolate differently


def test_gaussian_reconstruction_from_closed_form_pins_normalisation():
    sigma, n = 5.0, 48
    c = torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64)
    from conftest import gaussian_blobs
    true = gaussian_blobs((n, n, n), blobs=[(tuple(c.tolist()), sigma, 1.0)])
    g = tf.make_geometry((n, n, n), n_directions=256)
    s = g.offsets
    proj = 2 * math.pi * sigma ** 2 * torch.exp(-(s[None] - (g.directions @ c)[:, None]) ** 2 / (2 * sigma ** 2))
    rec = tf.filtered_backprojection(proj[None, None], g, backend="reference")[0, 0]
    assert float((rec - true).norm() / true.norm()) < 0.03


def test_backproject_definition_single_direction():
    # One direction along +x: out(d,h,w) = w_0 * sinogram(x) with x the voxel's physical x.
    g = tf.make_geometry((3, 4, 5), directions=[[1, 0, 0]], n_slices=9, slice_spacing=1.0)
    sino = torch.arange(9, dtype=torch.float64)[None, None, None]
    out = R.backproject(sino, g.volume_maps(), torch.tensor([2.0], dtype=torch.float64), g.volume_shape)
    x = torch.arange(5, dtype=torch.float64) - 2
    expect = 2.0 * (x + 4)  # slice index of x is x + (9-1)/2
    torch.testing.assert_close(out[0, 0], expect.expand(3, 4, 5))


def test_backproject_slices_inverts_slicing_on_the_grid():
    # With a geometry whose sample points are exactly the voxel centres, backproject_slices of the slices is the volume.
    torch.manual_seed(0)
    vol = torch.randn(1, 2, 5, 6, 7, dtype=torch.float64)
    g = tf.make_geometry((5, 6, 7), directions=[[0, 0, 1]], n_slices=5, slice_size=(6, 7), pixel_spacing=1.0)
    stacks = tf.slice_volume(vol, g, backend="reference").permute(0, 3, 1, 2, 4, 5)  # (B,C,N,S,h,w)
    back = tf.backproject_slices(stacks, g, weights=torch.ones(1, dtype=torch.float64), backend="reference")
    torch.testing.assert_close(back, vol)


def test_affine_grid_sample_reference_is_grid_sample():
    torch.manual_seed(0)
    vol = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64)
    theta = torch.randn(2, 3, 4, dtype=torch.float64) * 0.5
    out = tf.affine_grid_sample(vol, theta, (2, 3, 4, 5, 6), align_corners=True, backend="reference")
    grid = torch.nn.functional.affine_grid(theta, (2, 3, 4, 5, 6), align_corners=True)
    torch.testing.assert_close(out, torch.nn.functional.grid_sample(vol, grid, align_corners=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_adjoint_pairs_via_autograd(dtype):
    """<A x, y> = <x, Aᵀ y> where Aᵀ is what autograd computes: the reference is a consistent oracle."""
    torch.manual_seed(0)
    g = tf.make_geometry((6, 7, 8), spacing=(1.5, 1.0, 0.8), n_directions=3, n_slices=9, slice_size=(8, 10))
    x = torch.randn(1, 2, 6, 7, 8, dtype=dtype, requires_grad=True)
    y = torch.randn(1, 3, 9, 2, 8, 10, dtype=dtype)
    (gx,) = torch.autograd.grad(tf.slice_volume(x, g, backend="reference"), x, y)
    lhs = float((tf.slice_volume(x.detach(), g, backend="reference") * y).sum())
    rhs = float((x * gx).sum())
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert abs(lhs - rhs) <= tol * (abs(lhs) + 1)
