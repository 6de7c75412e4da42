"""Geometry (docs/design.md, "Geometry"): directions, frames, index-space maps, default sizes."""
import math

import numpy as np
import pytest
import torch

from tonno_fast.geometry import (bounding_radius, fibonacci_directions, frames_from_directions, make_geometry,
                                 parse_directions)


def test_fibonacci_directions_unit_upper_hemisphere_and_near_uniform():
    d = fibonacci_directions(200)
    assert d.shape == (200, 3)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(200, dtype=torch.float64))
    assert (d[:, 2] > 0).all()
    # Equal-area bands: the mean of z over the hemisphere is 1/2; the mean of x and y vanish.
    assert abs(float(d[:, 2].mean()) - 0.5) < 1e-3
    assert abs(float(d[:, 0].mean())) < 0.02 and abs(float(d[:, 1].mean())) < 0.02


def test_frames_orthonormal_right_handed_and_axial_identity():
    frames = frames_from_directions(fibonacci_directions(50))
    eye = torch.eye(3, dtype=torch.float64).expand(50, 3, 3)
    torch.testing.assert_close(frames @ frames.transpose(1, 2), eye)
    torch.testing.assert_close(torch.linalg.det(frames), torch.ones(50, dtype=torch.float64))
    axial = frames_from_directions(torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64))[0]
    torch.testing.assert_close(axial, torch.eye(3, dtype=torch.float64))


def test_frame_is_smallest_rotation():
    # The rotation taking e_z to n about the axis e_z x n leaves that axis fixed.
    n = torch.tensor([[0.3, -0.4, math.sqrt(1 - 0.25)]], dtype=torch.float64)
    R = frames_from_directions(n)[0].T  # columns u, v, n: maps e_x, e_y, e_z
    axis = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), n[0])
    torch.testing.assert_close(R @ axis, axis)


def test_parse_directions_forms_agree():
    theta, phi = 0.7, 2.1
    vec = [math.sin(theta) * math.cos(phi), math.sin(theta) * math.sin(phi), math.cos(theta)]
    f_vec = parse_directions([[2 * c for c in vec]])  # non-unit vectors are normalised
    f_ang = parse_directions([[theta, phi]])
    torch.testing.assert_close(f_vec, f_ang)
    f_mat = parse_directions(f_vec.transpose(1, 2))  # rotation matrices with columns u, v, n
    torch.testing.assert_close(f_mat, f_vec)
    # lower hemisphere flips to the same plane family
    torch.testing.assert_close(parse_directions([[-c for c in vec]]), f_vec)


@pytest.mark.parametrize("bad, msg", [
    ([[0.0, 0.0, 0.0]], "non-zero"),
    ([[float("nan"), 0.0, 1.0]], "finite"),
    ([[1.0, 0.0, 0.0, 0.0]], "shape"),
    (np.eye(3)[None] * 2, "rotation"),
])
def test_parse_directions_rejects(bad, msg):
    with pytest.raises(ValueError, match=msg):
        parse_directions(bad)


def test_default_sizes_cover_bounding_sphere():
    g = make_geometry((64, 64, 64))
    assert (g.n_slices, g.height, g.width) == (111, 111, 111)  # the 64³ geometry of docs/performance.md
    r = bounding_radius((64, 64, 64), (1.0, 1.0, 1.0))
    assert (g.n_slices - 1) / 2 * g.slice_spacing >= r - g.slice_spacing / 2
    g2 = make_geometry((20, 40, 40), spacing=(2.5, 0.8, 0.8))
    assert g2.slice_spacing == g2.pixel_spacing == 0.8
    assert g2.n_slices % 2 == 1


def test_slice_size_sets_pixel_spacing():
    g = make_geometry((30, 40, 50), spacing=(2.0, 1.0, 1.0), slice_size=224)
    r = bounding_radius((30, 40, 50), (2.0, 1.0, 1.0))
    assert g.height == g.width == 224
    assert g.pixel_spacing == pytest.approx(2 * r / 224)


def test_maps_are_inverse_of_each_other_and_match_physical_positions():
    g = make_geometry((7, 13, 21), spacing=(2.0, 0.7, 1.3), n_directions=5, n_slices=9, slice_size=(11, 6))
    M, V = g.slice_maps(), g.volume_maps()
    k, i, j = 3.0, 7.0, 2.0
    for n in range(g.n_directions):
        idx = M[n] @ torch.tensor([k, i, j, 1.0], dtype=torch.float64)
        back = V[n] @ torch.cat([idx, torch.ones(1, dtype=torch.float64)])
        torch.testing.assert_close(back, torch.tensor([k, i, j], dtype=torch.float64))
        # physical position of the pixel (docs/design.md, "Geometry") against the voxel-centre formula
        u, v, nn = g.frames[n]
        s = (k - (g.n_slices - 1) / 2) * g.slice_spacing
        p = s * nn + (j - (g.width - 1) / 2) * g.pixel_spacing * u + (i - (g.height - 1) / 2) * g.pixel_spacing * v
        D, H, W = g.volume_shape
        sz, sy, sx = g.spacing
        expect = torch.stack([p[2] / sz + (D - 1) / 2, p[1] / sy + (H - 1) / 2, p[0] / sx + (W - 1) / 2])
        torch.testing.assert_close(idx, expect)


def test_weights_default_and_mismatch():
    g = make_geometry((8, 8, 8), n_directions=10)
    torch.testing.assert_close(g.weights.sum(), torch.tensor(2 * math.pi, dtype=torch.float64))
    with pytest.raises(ValueError, match="weights"):
        make_geometry((8, 8, 8), directions=[[0, 0, 1], [1, 0, 0]], weights=[1.0])


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(spacing=(1.0, 0.0, 1.0)), ValueError, "spacing"),
    (dict(spacing=(1.0, -2.0, 1.0)), ValueError, "spacing"),
    (dict(spacing=(1.0, 1.0)), ValueError, "spacing"),
    (dict(n_directions=0), ValueError, "n_directions"),
    (dict(slice_spacing=0), ValueError, "slice_spacing"),
    (dict(n_slices=-3), ValueError, "n_slices"),
    (dict(slice_size=(0, 5)), ValueError, "slice_size"),
])
def test_make_geometry_rejects(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        make_geometry((8, 8, 8), **kw)


def test_with_slices_is_a_range_of_the_stack():
    """Slices k0 ≤ k < k1 of every stack (k beyond [0, S) too) as a geometry of their own: slice j is slice
    k0 + j (the translation moved by k0 slice steps along the normal, the in-plane columns unchanged)."""
    g = make_geometry((7, 8, 9), spacing=(1.5, 1.0, 0.8), n_directions=3, n_slices=5, slice_size=(6, 7))
    M = g.slice_maps()
    assert g.with_slices(0, 5) is g
    for k0, k1 in ((0, 3), (1, 4), (-2, 1), (3, 8)):
        part = g.with_slices(k0, k1)
        assert part.n_slices == k1 - k0 and (part.height, part.width) == (g.height, g.width)
        Mp = part.slice_maps()
        torch.testing.assert_close(Mp[:, :, :3], M[:, :, :3], rtol=0, atol=1e-12)
        torch.testing.assert_close(Mp[:, :, 3], M[:, :, 3] + k0 * M[:, :, 0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="must not be empty"):
        g.with_slices(2, 2)
