"""``backproject``: sinogram ``(B, K, N, S)`` → volume ``(B, K, D, H, W)``, ``out(x) = Σ_n weights[n] ·
lerp(sinogram[..., n, :], t_n(x))`` with ``t_n = volume_maps[n, 0] @ (d, h, w, 1)``, and its adjoint
``backproject_backward``; ``filtered_backprojection`` on top (docs/design.md, "Reconstruction", "Operators")."""
import math

import pytest
import torch

import tonno_fast as tf
from harness import (DIRECTIONS, GEOMETRIES, REFERENCE, against_reference, assert_adjoint, assert_compiles,
                     assert_deterministic, assert_matches, assert_raises, assert_rejects,
                     deterministic_against_reference, fuzz_against_reference, geometry, gradcheck, opcheck, rand, vjp)
from harness import backend, kernels  # noqa: F401  (pytest fixtures)
from conftest import gaussian_blobs
from tonno_fast import ops


def backproject(g):
    """``backproject`` of geometry ``g`` on a backend module, maps and weights in the input's dtype and device."""
    return lambda be, s: be.backproject(s, g.volume_maps(dtype=s.dtype, device=s.device),
                                        g.weights.to(device=s.device, dtype=s.dtype), list(g.volume_shape))


def _atomic_adjoint(kernels) -> bool:
    """Whether ``backproject_backward`` scatters with atomics here (Triton on a GPU; CUDA's is a gather)."""
    return kernels.atomic and kernels.name != "cuda"


# ---------------------------------------------------------------------------------------------------------
# The reference.

def test_reference_definition_single_direction():
    # One direction along +x: out(d,h,w) = w_0 * sinogram(x) with x the voxel's physical x.
    g = tf.make_geometry((3, 4, 5), directions=[[1, 0, 0]], n_slices=9, slice_spacing=1.0)
    sino = torch.arange(9, dtype=torch.float64)[None, None, None]
    out = REFERENCE.backproject(sino, g.volume_maps(), torch.tensor([2.0], dtype=torch.float64), g.volume_shape)
    x = torch.arange(5, dtype=torch.float64) - 2
    expect = 2.0 * (x + 4)  # slice index of x is x + (9-1)/2
    torch.testing.assert_close(out[0, 0], expect.expand(3, 4, 5))


def test_reference_gaussian_reconstruction_from_closed_form_pins_normalisation():
    sigma, n = 5.0, 48
    c = torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64)
    true = gaussian_blobs((n, n, n), blobs=[(tuple(c.tolist()), sigma, 1.0)])
    g = tf.make_geometry((n, n, n), n_directions=256)
    s = g.offsets
    proj = 2 * math.pi * sigma ** 2 * torch.exp(-(s[None] - (g.directions @ c)[:, None]) ** 2 / (2 * sigma ** 2))
    rec = tf.filtered_backprojection(proj[None, None], g, backend="reference")[0, 0]
    assert float((rec - true).norm() / true.norm()) < 0.03


# ---------------------------------------------------------------------------------------------------------
# Kernels against the reference.

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("geom", ["special", "odd", "vec", "small"])
def test_matches_reference(kernels, geom, dtype):
    """Forward and backward of a non-contiguous sinogram; B·K = 6 (a partial batch-channel tile)."""
    g = geometry(geom, kernels)
    sino = rand(2, g.n_slices, g.n_directions, 3, dtype=dtype, seed=11).permute(0, 3, 2, 1)  # (B=2, K=3, N, S)
    assert not sino.is_contiguous()
    out = against_reference(kernels, backproject(g), sino, seed=13)
    assert out.shape == (2, 3, *g.volume_shape) and out.dtype == dtype


# Geometries that reach every path of the CPU kernel: float32 voxel blocks of 4 columns x 2 rows reading
# windows of the sinogram row, with and without clamping (a stack that does not cover the volume); gathers
# where the taps of a block spread over more than 8 values (slices much finer than the voxels); column and
# row tails (W % 4 != 0, odd H); volumes narrower than a block.
PATH_CASES = {
    "covering stack": dict(shape=(5, 10, 16)),
    "partial stack": dict(shape=(5, 9, 23), n_slices=7),
    "fine slices": dict(shape=(4, 6, 13), slice_spacing=0.15),
    "narrow": dict(shape=(3, 5, 3)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(PATH_CASES))
def test_matches_reference_on_every_path(kernels, case, dtype):
    if kernels.interpreted and case != "narrow":
        pytest.skip("too large for the Triton interpreter")
    kw = dict(PATH_CASES[case])
    shape = kw.pop("shape")
    g = tf.make_geometry(shape, spacing=(1.2, 1.0, 0.9), directions=DIRECTIONS, **kw)
    against_reference(kernels, backproject(g), rand(1, 2, g.n_directions, g.n_slices, dtype=dtype, seed=6))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nonfinite_maps_read_padding(kernels, dtype):
    """A NaN or infinite map entry reads padding (zero), as in the reference, on every path."""
    shape = (3, 4, 9)
    g = tf.make_geometry(shape, n_directions=4)
    maps, w = g.volume_maps(), g.weights
    maps[0, 0, 3] = math.nan
    maps[1, 0, 2] = math.inf
    maps[2, 0, 1] = 1e30
    sino = rand(1, 1, g.n_directions, g.n_slices, seed=7)
    expected = REFERENCE.backproject(sino, maps, w, list(shape))
    out = kernels.call("backproject", sino.to(dtype), maps.to(dtype), w.to(dtype), list(shape))
    assert_matches(kernels, out.cpu(), expected.to(dtype))


def test_long_rows_fall_back_to_global_memory(kernels):
    # S so large that one sinogram row does not fit in the CUDA kernel's shared memory.
    if kernels.interpreted:
        pytest.skip("too large for the Triton interpreter")
    g = tf.make_geometry((6, 5, 7), n_directions=3, n_slices=6000, slice_spacing=0.002)
    against_reference(kernels, backproject(g), rand(1, 1, 3, g.n_slices))


def test_geometry_level_op(backend):
    g = GEOMETRIES["small"]
    sino = rand(1, 2, g.n_directions, g.n_slices, seed=1, device=backend.device)
    assert_matches(backend, tf.backproject(sino, g, backend=backend.name),
                   tf.backproject(sino.cpu(), g, backend="reference"))


def test_adjoint(kernels):
    g = geometry("small", kernels)
    maps, w = kernels.to(g.volume_maps(), g.weights)
    x = rand(1, 2, g.n_directions, g.n_slices, seed=59, device=kernels.device)
    ax = kernels.op("backproject")(x, maps, w, list(g.volume_shape))
    y = rand(*ax.shape, seed=43, device=kernels.device)
    assert_adjoint(ax, y, x, kernels.op("backproject_backward")(y, maps, w, g.n_slices), 1e-11)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adjoint_op_in_both_dtypes(kernels, dtype):
    """The adjoint op called directly, float32 and float64, equals the reference's autograd (float64)."""
    g = geometry("odd" if not kernels.interpreted else "small", kernels)
    _, gy, expect = vjp(lambda s: backproject(g)(REFERENCE, s), rand(2, 3, g.n_directions, g.n_slices))
    maps, w = kernels.to(g.volume_maps(dtype=dtype), g.weights.to(dtype))
    out = kernels.op("backproject_backward")(kernels.to(gy.to(dtype)), maps, w, g.n_slices)
    assert_matches(kernels, out, expect.to(dtype))


def test_gradcheck(kernels):
    g = geometry("tiny", kernels)
    gradcheck(lambda s: backproject(g)(kernels.module, s), [rand(1, 2, g.n_directions, g.n_slices)], kernels,
              atomic=_atomic_adjoint(kernels))


def test_opcheck(kernels):
    g = geometry("tiny", kernels)
    vm, w, shape = kernels.to(g.volume_maps()), kernels.to(g.weights), list(g.volume_shape)
    ns = kernels.namespace
    opcheck(ns.backproject.default, (rand(1, 2, g.n_directions, g.n_slices, device=kernels.device), vm, w, shape),
            grad_args=(0,))
    opcheck(ns.backproject_backward.default, (rand(1, 2, *shape, device=kernels.device), vm, w, g.n_slices),
            grad_args=(0,))


def test_compiles(kernels):
    g = geometry("tiny", kernels)
    vm, w = kernels.to(g.volume_maps(), g.weights)
    assert_compiles(lambda s: kernels.op("backproject")(s, vm, w, list(g.volume_shape)),
                    rand(1, 1, g.n_directions, g.n_slices, device=kernels.device),
                    "aot_eager" if kernels.name == "triton" else "inductor")


def test_deterministic(kernels):
    """Both directions are gathers on the CPU and CUDA (bitwise reproducible, also under
    ``torch.use_deterministic_algorithms``); Triton's adjoint scatters, with atomics by default and
    deterministically in that mode."""
    g = geometry("tiny" if kernels.interpreted else "small", kernels)
    vm, w = kernels.to(g.volume_maps(dtype=torch.float32), g.weights.float())
    sino = rand(2, 2, g.n_directions, g.n_slices, dtype=torch.float32, device=kernels.device)
    grad = rand(2, 2, *g.volume_shape, dtype=torch.float32, device=kernels.device)
    assert_deterministic(kernels, lambda: kernels.op("backproject")(sino, vm, w, list(g.volume_shape)),
                         lambda: kernels.op("backproject_backward")(grad, vm, w, g.n_slices))


@pytest.mark.parametrize("chunk", [None, 200, 1000])  # 1 slot a chunk: see test_slice_volume
def test_deterministic_adjoint_matches_reference(kernels, chunk, monkeypatch):
    """Under ``torch.use_deterministic_algorithms(True)`` the adjoint runs everywhere, equals the reference's
    (float64) and repeats bit for bit, in one chunk or in many (Triton's; CUDA's is a gather, never chunked)."""
    g = geometry("tiny" if kernels.interpreted else "small", kernels)
    if chunk is not None and kernels.name == "cuda":
        pytest.skip("CUDA's backproject_backward is a gather: no chunks")
    deterministic_against_reference(kernels, backproject(g), rand(1, 2, g.n_directions, g.n_slices, seed=7), chunk,
                                    monkeypatch)


# ---------------------------------------------------------------------------------------------------------
# Bad arguments.

def _bad_calls():
    g = GEOMETRIES["small"]
    shape, S, N = list(g.volume_shape), g.n_slices, g.n_directions
    sino, maps, w = rand(1, 1, N, S), g.volume_maps(), g.weights
    return [
        ("weights", lambda op: op("backproject")(sino, maps, w[:1], shape)),
        ("weights", lambda op: op("backproject")(sino, maps, w.float(), shape)),
        ("sinogram", lambda op: op("backproject")(sino[0], maps, w, shape)),
        ("sinogram|maps", lambda op: op("backproject")(sino[:, :, :2], maps, w, shape)),
        ("sinogram", lambda op: op("backproject")(sino.int(), maps, w, shape)),
        ("volume_shape", lambda op: op("backproject")(sino, maps, w, shape[:2])),
        ("volume_shape", lambda op: op("backproject")(sino, maps, w, [5, 0, 7])),
        ("n_slices", lambda op: op("backproject_backward")(rand(1, 1, *shape), maps, w, 0)),
        ("grad", lambda op: op("backproject_backward")(rand(1, *shape), maps, w, S)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_rejects_bad_arguments(kernels, case):
    pattern, call = _bad_calls()[case]
    assert_rejects(lambda: call(kernels.call), pattern)


_G = GEOMETRIES["small"]
_SINO = rand(1, 1, _G.n_directions, _G.n_slices, dtype=torch.float32)
_N = _G.n_directions


@pytest.mark.parametrize("call, exc, pattern", [
    pytest.param(lambda: ops.backproject(_SINO[:, :, :2], _G), ValueError,
                 rf"sinogram must have \(N, S\) = \({_N}, {_G.n_slices}\)", id="wrong_n"),
    pytest.param(lambda: ops.backproject(_SINO[0], _G), ValueError, r"sinogram must have shape \(B, K, N, S\)",
                 id="rank_3"),
    pytest.param(lambda: ops.backproject(_SINO.long(), _G), TypeError,
                 r"sinogram must be float32 or float64, got torch.int64", id="int"),
    pytest.param(lambda: ops.backproject(_SINO.half(), _G), TypeError,
                 r"sinogram must be float32 or float64, got torch.float16", id="half"),
    pytest.param(lambda: ops.backproject(_SINO, _G, weights=torch.ones(2)), ValueError,
                 rf"weights must have shape \(N,\) = \({_N},\)", id="weights_count"),
    pytest.param(lambda: ops.backproject(_SINO, _G, weights=torch.ones(_N, 1)), ValueError,
                 r"weights must have shape \(N,\)", id="weights_2d"),
    pytest.param(lambda: ops.backproject(_SINO, _G, weights=torch.ones(_N, device="meta")), ValueError,
                 r"weights is on meta but sinogram is on cpu", id="weights_other_device"),
    pytest.param(lambda: ops.backproject(_SINO, _G, weights=torch.full((_N,), float("nan"))), ValueError,
                 r"weights must be finite", id="weights_nan"),
    pytest.param(lambda: ops.backproject(_SINO, _G, weights=torch.ones(_N, dtype=torch.bool)), TypeError,
                 r"weights must be real numbers", id="weights_bool"),
    pytest.param(lambda: ops.backproject(_SINO.numpy(), _G), TypeError, r"sinogram must be a torch.Tensor",
                 id="not_tensor"),
    pytest.param(lambda: ops.filtered_backprojection(_SINO, _G, filter="hilbert"), ValueError,
                 r"filter must be one of", id="filtered_backprojection_filter"),
])
def test_public_op_rejects(call, exc, pattern):
    assert_raises(call, exc, pattern)


def test_public_op_shapes_beyond_int32_on_meta():
    big = tf.make_geometry((2 ** 11, 2 ** 10, 2 ** 10), n_directions=2, n_slices=3, slice_size=3)
    bp = ops.backproject(torch.empty(1, 1, 2, 3, device="meta"), big, backend="reference")
    assert bp.shape == (1, 1, 2 ** 11, 2 ** 10, 2 ** 10) and bp.numel() == 2 ** 31


# ---------------------------------------------------------------------------------------------------------
# Fuzzing: random geometries and weights against the reference.

def test_fuzz_against_reference(kernels):
    def op(case, g):
        w = torch.rand(g.n_directions, generator=case.generator(), dtype=torch.float64) + 0.5
        return lambda s, backend: ops.backproject(s, g, weights=w, backend=backend)

    fuzz_against_reference(kernels, lambda case, g: case.rand(case.batch, case.channels, g.n_directions, g.n_slices),
                           op)
