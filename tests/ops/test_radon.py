"""``radon``: plane sums ``δ² Σ_ij trilinear(volume, slice_maps[n] @ (k, i, j, 1))``, volume ``(B, C, D, H, W)`` →
sinogram ``(B, C, N, S)``, and its adjoint ``radon_backward`` (docs/design.md, "Operators")."""
import math
import re

import numpy as np
import pytest
import torch

import tonno_fast as tf
from conftest import gaussian_blobs
from harness import (GEOMETRIES, against_reference, assert_adjoint, assert_compiles, assert_deterministic,
                     assert_matches, assert_rejects, deterministic_against_reference, fuzz_against_reference, geometry,
                     gradcheck, noncontig, opcheck, rand)
from harness import backend, kernels  # noqa: F401  (pytest fixtures)


def radon(g, scale=None):
    """``radon`` of geometry ``g`` on a backend module, maps in the input's dtype and on its device."""
    return lambda be, v: be.radon(v, g.slice_maps(dtype=v.dtype, device=v.device), g.n_slices, g.height, g.width,
                                  g.pixel_area if scale is None else scale)


# ---------------------------------------------------------------------------------------------------------
# The reference: closed forms and another library.

def test_reference_gaussian_plane_integrals_closed_form():
    # Plane integrals of A exp(-|x-c|²/2σ²) are A 2πσ² exp(-(s - c·n)²/2σ²).
    sigma, c = 4.0, torch.tensor([3.0, -2.0, 1.5], dtype=torch.float64)
    shape, spacing = (40, 44, 36), (1.0, 1.0, 1.0)
    vol = gaussian_blobs(shape, spacing, [(tuple(c.tolist()), sigma, 1.0)])
    g = tf.make_geometry(shape, spacing=spacing, n_directions=9)
    sino = tf.radon(vol[None, None], g, backend="reference")[0, 0]
    s = g.offsets
    expect = 2 * math.pi * sigma ** 2 * torch.exp(-(s[None] - (g.directions @ c)[:, None]) ** 2 / (2 * sigma ** 2))
    assert float((sino - expect).norm() / expect.norm()) < 5e-3


def test_reference_matches_scikit_image_times_depth():
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


# ---------------------------------------------------------------------------------------------------------
# Kernels against the reference.

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("geom", ["special", "odd", "vec", "small"])
def test_matches_reference(kernels, geom, dtype):
    """Forward and backward (B·C = 6: two channel groups of the CUDA kernel); a non-contiguous volume."""
    g = geometry(geom, kernels)
    out = against_reference(kernels, radon(g), noncontig(rand(2, 3, *g.volume_shape, dtype=dtype, seed=1)), seed=7)
    assert out.shape == (2, 3, g.n_directions, g.n_slices) and out.dtype == dtype


def test_geometry_level_op(backend):
    """``tonno_fast.radon`` with ``backend=`` reaches the implementation and agrees with the reference."""
    g = GEOMETRIES["small"]
    vol = rand(1, 1, *g.volume_shape, device=backend.device)
    assert_matches(backend, tf.radon(vol, g, backend=backend.name), tf.radon(vol.cpu(), g, backend="reference"))


def test_adjoint(kernels):
    """``<radon x, y> = <x, radon_backward y>`` with the registered adjoint op, float64."""
    g = geometry("small", kernels)
    maps = kernels.to(g.slice_maps())
    x = rand(1, 2, *g.volume_shape, seed=43, device=kernels.device)
    ax = kernels.op("radon")(x, maps, g.n_slices, g.height, g.width, 0.37)
    y = rand(*ax.shape, seed=53, device=kernels.device)
    assert_adjoint(ax, y, x, kernels.op("radon_backward")(y, maps, g.height, g.width, 0.37, list(g.volume_shape)),
                   1e-11)


def test_gradcheck(kernels):
    g = geometry("tiny", kernels)
    maps = kernels.to(g.slice_maps())
    gradcheck(lambda v: kernels.module.radon(v, maps, g.n_slices, g.height, g.width, 0.5),
              [rand(2, 1, *g.volume_shape)], kernels)


def test_opcheck(kernels):
    g = geometry("tiny", kernels)
    sm, shape = kernels.to(g.slice_maps()), list(g.volume_shape)
    vol, grad = rand(1, 2, *shape, device=kernels.device), rand(1, 2, g.n_directions, g.n_slices,
                                                                   device=kernels.device)
    opcheck(kernels.namespace.radon.default, (vol, sm, g.n_slices, g.height, g.width, 2.0), grad_args=(0,))
    opcheck(kernels.namespace.radon_backward.default, (grad, sm, g.height, g.width, 2.0, shape), grad_args=(0,))


def test_compiles(kernels):
    g = geometry("tiny", kernels)
    maps, vmaps, w = kernels.to(g.slice_maps(), g.volume_maps(), g.weights)
    assert_compiles(lambda v: kernels.op("backproject")(kernels.op("radon")(v, maps, g.n_slices, g.height, g.width,
                                                                            1.0), vmaps, w, list(g.volume_shape)),
                    rand(1, 1, *g.volume_shape, device=kernels.device),
                    "aot_eager" if kernels.name == "triton" else "inductor")


def test_deterministic(kernels):
    """Forward (a gather with a fixed reduction) bitwise reproducible everywhere; the adjoint on the CPU too,
    also across thread counts, and everywhere under ``torch.use_deterministic_algorithms(True)``."""
    g = geometry("tiny" if kernels.interpreted else "small", kernels)
    maps = kernels.to(g.slice_maps(dtype=torch.float32))
    vol = rand(2, 2, *g.volume_shape, dtype=torch.float32, device=kernels.device)
    grad = rand(2, 2, g.n_directions, g.n_slices, dtype=torch.float32, device=kernels.device)
    assert_deterministic(kernels, lambda: kernels.op("radon")(vol, maps, g.n_slices, g.height, g.width, 1.0),
                         lambda: kernels.op("radon_backward")(grad, maps, g.height, g.width, 1.0, list(g.volume_shape)))


@pytest.mark.parametrize("chunk", [None, 1, 200, 1000])
def test_deterministic_adjoint_matches_reference(kernels, chunk, monkeypatch):
    """Under ``torch.use_deterministic_algorithms(True)`` the adjoint runs everywhere, equals the reference's
    (float64) and repeats bit for bit, in one chunk or in many."""
    g = geometry("tiny" if kernels.interpreted else "small", kernels)
    deterministic_against_reference(kernels, radon(g), rand(1, 2, *g.volume_shape, seed=6), chunk, monkeypatch)


# ---------------------------------------------------------------------------------------------------------
# Bad arguments: every implementation refuses them with the same message (contract.py / checks.h).

def _bad_calls(g):
    S, h, w, shape = g.n_slices, g.height, g.width, list(g.volume_shape)
    vol, maps = rand(1, 1, *shape, dtype=torch.float32), g.slice_maps(dtype=torch.float32)
    return [
        ("height", lambda op: op("radon")(vol, maps, S, -1, w, 1.0)),
        ("height", lambda op: op("radon")(vol, maps, S, 0, w, 1.0)),
        ("maps", lambda op: op("radon")(vol, maps.double(), S, h, w, 1.0)),
        ("volume", lambda op: op("radon")(vol[0], maps, S, h, w, 1.0)),
        ("volume_shape", lambda op: op("radon_backward")(rand(1, 1, g.n_directions, S, dtype=torch.float32), maps,
                                                         h, w, 1.0, [4, 0, 6])),
        ("volume_shape", lambda op: op("radon_backward")(rand(1, 1, g.n_directions, S, dtype=torch.float32), maps,
                                                         h, w, 1.0, [5])),
        ("grad|maps", lambda op: op("radon_backward")(rand(1, 1, 2, S, dtype=torch.float32), maps, h, w, 1.0, shape)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls(GEOMETRIES["small"]))))
def test_rejects_bad_arguments(kernels, case):
    pattern, call = _bad_calls(GEOMETRIES["small"])[case]
    assert_rejects(lambda: call(kernels.call), pattern)


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda g: tf.radon(rand(1, 1, *g.volume_shape, dtype=torch.float32)[0], g), ValueError,
     r"volume must have shape \(B, C, D, H, W\)"),
    (lambda g: tf.radon(rand(1, 1, *g.volume_shape) > 0, g), TypeError,
     r"volume must be float32 or float64, got torch.bool"),
], ids=["rank_4", "bool"])
def test_public_op_rejects(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(GEOMETRIES["small"])


def test_fake_kernel_beyond_int32(kernels):
    """Shape arithmetic of the fake kernel for outputs indexed past 2^31 (meta tensors: nothing allocated)."""
    vol = torch.empty(1, 3, 4, 4, 4, device="meta")
    maps = torch.empty(2, 3, 4, device="meta")
    out = kernels.op("radon")(vol, maps, 2 ** 11, 2 ** 10, 2 ** 10, 1.0)
    assert tuple(out.shape) == (1, 3, 2, 2 ** 11) and out.device.type == "meta"


def test_more_than_2_31_samples_per_plane(kernels):
    """h*w = 46341^2 > 2^31 - 1 pixels per plane on a 3x3x3 volume: the plane sum must equal that of a 3x3
    slice with the same pixel grid (every other pixel is outside the volume) or be refused with a clear
    message; a wrapped 32-bit index would read the wrong voxels or crash."""
    if kernels.interpreted:
        pytest.skip("the interpreter cannot run 2^31 points in a test")
    vol = rand(1, 1, 3, 3, 3, seed=1, device=kernels.device).abs()
    dirs = [[0.0, 0.0, 1.0], [0.2, 0.3, 0.9]]
    big_side = 46341  # odd, so the small grid is centred inside the big one
    assert big_side ** 2 > 2 ** 31 - 1
    big = tf.make_geometry((3, 3, 3), directions=dirs, n_slices=3, slice_size=big_side, pixel_spacing=1.0)
    small = tf.make_geometry((3, 3, 3), directions=dirs, n_slices=3, slice_size=9, pixel_spacing=1.0)
    expect = tf.radon(vol.cpu(), small, backend="reference")
    try:
        got = tf.radon(vol, big, backend=kernels.name)
    except RuntimeError as exc:
        assert re.search(r"2\^31|too large|overflow", str(exc)), str(exc)
        return
    torch.testing.assert_close(got.cpu(), expect, rtol=1e-10, atol=1e-12)
    assert math.isfinite(float(got.sum()))


# ---------------------------------------------------------------------------------------------------------
# Fuzzing: random geometries against the reference.

def test_fuzz_against_reference(kernels):
    fuzz_against_reference(kernels, lambda case, g: case.rand(case.batch, case.channels, *case.shape),
                           lambda case, g: lambda v, backend: tf.radon(v, g, backend=backend))
