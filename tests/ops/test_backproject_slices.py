"""``backproject_slices``: stacks ``(B, K, N, S, h, w)`` → volume ``(B, K, D, H, W)``, ``out(x) = Σ_n weights[n] ·
trilinear(stacks[..., n, :, :, :], volume_maps[n] @ (d, h, w, 1))``, and its adjoint
``backproject_slices_backward`` (docs/design.md, "Operators"). Triton fuses the ``laplacian`` filter."""
import pytest
import torch

import tonno_fast as tf
from harness import (GEOMETRIES, REFERENCE, against_reference, assert_adjoint, assert_compiles, assert_deterministic,
                     assert_raises, assert_rejects, deterministic_against_reference, fuzz_against_reference, geometry,
                     gradcheck, opcheck, rand)
from harness import backend, kernels  # noqa: F401  (pytest fixtures)
from tonno_fast import ops
from tonno_fast.filters import apply_filter


def backproject_slices(g, laplacian_spacing=None):
    """``backproject_slices`` of geometry ``g`` on a backend module (maps and weights in the input's dtype and on
    its device); with ``laplacian_spacing``, the Triton kernel's fused filter, or the filter applied first."""
    def call(be, st):
        vm, w = g.volume_maps(dtype=st.dtype, device=st.device), g.weights.to(device=st.device, dtype=st.dtype)
        if laplacian_spacing is None:
            return be.backproject_slices(st, vm, w, list(g.volume_shape))
        if be is REFERENCE:
            return be.backproject_slices(_laplacian_along_slices(st, laplacian_spacing), vm, w, list(g.volume_shape))
        return be.backproject_slices(st, vm, w, list(g.volume_shape), laplacian_spacing=laplacian_spacing)
    return call


def _laplacian_along_slices(stacks, spacing):
    """tonno_fast.filters' laplacian applied along the slice axis S of (B, K, N, S, h, w)."""
    return apply_filter(stacks.movedim(3, -1), "laplacian", slice_spacing=spacing).movedim(-1, 3)


# ---------------------------------------------------------------------------------------------------------
# The reference.

def test_reference_inverts_slicing_on_the_grid():
    # With a geometry whose sample points are exactly the voxel centres, backproject_slices of the slices is the volume.
    torch.manual_seed(0)
    vol = torch.randn(1, 2, 5, 6, 7, dtype=torch.float64)
    g = tf.make_geometry((5, 6, 7), directions=[[0, 0, 1]], n_slices=5, slice_size=(6, 7), pixel_spacing=1.0)
    stacks = tf.slice_volume(vol, g, backend="reference").permute(0, 3, 1, 2, 4, 5)  # (B,C,N,S,h,w)
    back = tf.backproject_slices(stacks, g, weights=torch.ones(1, dtype=torch.float64), backend="reference")
    torch.testing.assert_close(back, vol)


# ---------------------------------------------------------------------------------------------------------
# Kernels against the reference.

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("geom", ["special", "odd", "vec", "small"])
def test_matches_reference(kernels, geom, dtype):
    """Forward and backward; stacks with a non-contiguous last axis, K = 5 (two channel groups on CUDA)."""
    g = geometry(geom, kernels)
    stacks = rand(1, 5, g.n_directions, g.n_slices, g.height, 2 * g.width, dtype=dtype, seed=17)[..., ::2]
    out = against_reference(kernels, backproject_slices(g), stacks, seed=19)
    assert out.shape == (1, 5, *g.volume_shape) and out.dtype == dtype


def test_geometry_level_op(backend):
    g = GEOMETRIES["small"]
    stacks = rand(1, 2, g.n_directions, g.n_slices, g.height, g.width, device=backend.device)
    torch.testing.assert_close(tf.backproject_slices(stacks, g, backend=backend.name).cpu(),
                               tf.backproject_slices(stacks.cpu(), g, backend="reference"))


def test_adjoint(kernels):
    g = geometry("small", kernels)
    maps, w = kernels.to(g.volume_maps(), g.weights)
    x = rand(1, 2, g.n_directions, g.n_slices, g.height, g.width, seed=61, device=kernels.device)
    ax = kernels.op("backproject_slices")(x, maps, w, list(g.volume_shape))
    y = rand(*ax.shape, seed=8, device=kernels.device)
    stack_shape = [g.n_slices, g.height, g.width]
    assert_adjoint(ax, y, x, kernels.op("backproject_slices_backward")(y, maps, w, stack_shape), 1e-11)


def test_gradcheck(kernels):
    g = geometry("tiny", kernels)
    gradcheck(lambda st: backproject_slices(g)(kernels.module, st),
              [rand(1, 1, g.n_directions, g.n_slices, g.height, g.width)], kernels)


def test_opcheck(kernels):
    g = geometry("tiny", kernels)
    vm, w, shape = kernels.to(g.volume_maps()), kernels.to(g.weights), list(g.volume_shape)
    stack_shape = [g.n_slices, g.height, g.width]
    ns = kernels.namespace
    lap = [(None,), (0.9,)] if kernels.name == "triton" else [()]
    for fusion in lap:
        opcheck(ns.backproject_slices.default,
                (rand(1, 2, g.n_directions, *stack_shape, device=kernels.device), vm, w, shape, *fusion),
                grad_args=(0,))
        opcheck(ns.backproject_slices_backward.default,
                (rand(1, 2, *shape, device=kernels.device), vm, w, stack_shape, *fusion), grad_args=(0,))


def test_compiles(kernels):
    g = geometry("tiny", kernels)
    vm, w = kernels.to(g.volume_maps(), g.weights)
    assert_compiles(lambda st: kernels.op("backproject_slices")(st, vm, w, list(g.volume_shape)),
                    rand(1, 1, g.n_directions, g.n_slices, g.height, g.width, device=kernels.device),
                    "aot_eager" if kernels.name == "triton" else "inductor")


def test_deterministic(kernels):
    """The forward (a gather, each voxel written once) is bitwise reproducible; the CPU adjoint too, for any
    thread count; under ``torch.use_deterministic_algorithms(True)`` both, on every implementation (the GPU
    adjoints' deterministic path)."""
    g = geometry("tiny" if kernels.interpreted else "small", kernels)
    vm, w = kernels.to(g.volume_maps(dtype=torch.float32), g.weights.float())
    stack_shape = [g.n_slices, g.height, g.width]
    stacks = rand(2, 2, g.n_directions, *stack_shape, dtype=torch.float32, device=kernels.device)
    grad = rand(2, 2, *g.volume_shape, dtype=torch.float32, device=kernels.device)
    assert_deterministic(kernels, lambda: kernels.op("backproject_slices")(stacks, vm, w, list(g.volume_shape)),
                         lambda: kernels.op("backproject_slices_backward")(grad, vm, w, stack_shape))


@pytest.mark.parametrize("chunk", [None, 200, 1000])  # 1 slot a chunk: see test_slice_volume
def test_deterministic_adjoint_matches_reference(kernels, chunk, monkeypatch):
    """Under ``torch.use_deterministic_algorithms(True)`` the adjoint runs everywhere, equals the reference's
    (float64) and repeats bit for bit, in one chunk or in many."""
    g = geometry("tiny" if kernels.interpreted else "small", kernels)
    stacks = rand(1, 2, g.n_directions, g.n_slices, g.height, g.width, seed=8)
    deterministic_against_reference(kernels, backproject_slices(g), stacks, chunk, monkeypatch)


# ---------------------------------------------------------------------------------------------------------
# Triton's fused laplacian.

def _triton(kernels):
    if kernels.name != "triton":
        pytest.skip("a Triton-only fusion")
    return kernels.module


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_laplacian(kernels, dtype):
    # The edge-replicated laplacian is not symmetric at the first/last slice: the fused adjoint must be its
    # transpose there too (the gradient check of against_reference).
    _triton(kernels)
    g = GEOMETRIES["small"]
    against_reference(kernels, backproject_slices(g, 0.8),
                      rand(2, 1, g.n_directions, g.n_slices, g.height, g.width, dtype=dtype, seed=23), seed=29)


def test_fused_laplacian_of_constant_stack_is_zero(kernels):
    # Edge replication: a constant score gives an exactly zero Tomographic-CAM heatmap (no edge ring).
    TB, g = _triton(kernels), GEOMETRIES["small"]
    vm, w = kernels.to(g.volume_maps(), g.weights)
    stacks = torch.full((1, 1, g.n_directions, g.n_slices, g.height, g.width), 3.5, dtype=torch.float64,
                        device=kernels.device)
    out = TB.backproject_slices(stacks, vm, w, g.volume_shape, laplacian_spacing=1.3)
    assert float(out.abs().max()) < 1e-12
    with pytest.raises(ValueError, match="laplacian_spacing"):
        TB.backproject_slices(torch.ones_like(stacks), vm, w, g.volume_shape, laplacian_spacing=0)


def test_fused_laplacian_adjoint(kernels):
    _triton(kernels)
    g = GEOMETRIES["small"]
    maps, w = kernels.to(g.volume_maps(), g.weights)
    stack_shape = [g.n_slices, g.height, g.width]
    st = rand(1, 2, g.n_directions, *stack_shape, seed=61, device=kernels.device)
    x = rand(1, 2, *g.volume_shape, seed=43, device=kernels.device)
    ns = kernels.namespace
    ax = ns.backproject_slices(st, maps, w, list(g.volume_shape), 0.7)
    assert_adjoint(ax, x, st, ns.backproject_slices_backward(x, maps, w, stack_shape, 0.7), 1e-11)


# ---------------------------------------------------------------------------------------------------------
# Bad arguments.

def _bad_calls():
    g = GEOMETRIES["small"]
    shape, N = list(g.volume_shape), g.n_directions
    stack_shape = [g.n_slices, g.height, g.width]
    stacks, maps, w = rand(1, 1, N, *stack_shape), g.volume_maps(), g.weights
    return [
        ("stacks", lambda op: op("backproject_slices")(stacks[0], maps, w, shape)),
        ("stacks|maps|weights", lambda op: op("backproject_slices")(stacks[:, :, :2], maps, w, shape)),
        ("stacks", lambda op: op("backproject_slices")(stacks[:, :0], maps, w, shape)),
        ("weights", lambda op: op("backproject_slices")(stacks, maps, w[:2], shape)),
        ("stack_shape", lambda op: op("backproject_slices_backward")(rand(1, 1, *shape), maps, w, stack_shape[:2])),
        ("stack_shape", lambda op: op("backproject_slices_backward")(rand(1, 1, *shape), maps, w,
                                                                     [stack_shape[0], -1, stack_shape[2]])),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_rejects_bad_arguments(kernels, case):
    pattern, call = _bad_calls()[case]
    assert_rejects(lambda: call(kernels.call), pattern)


_G = GEOMETRIES["small"]
_STACKS = rand(1, 1, _G.n_directions, _G.n_slices, _G.height, _G.width, dtype=torch.float32)


@pytest.mark.parametrize("call, exc, pattern", [
    pytest.param(lambda: ops.backproject_slices(_STACKS[..., :2, :2], _G), ValueError,
                 r"stacks must have \(N, S, h, w\) = \(3, 5, 6, 7\)", id="wrong_size"),
    pytest.param(lambda: ops.backproject_slices(_STACKS[0], _G), ValueError,
                 r"stacks must have shape \(B, K, N, S, h, w\)", id="rank_5"),
    pytest.param(lambda: ops.backproject_slices(_STACKS.int(), _G), TypeError, r"stacks must be float32 or float64",
                 id="int"),
    pytest.param(lambda: ops.backproject_slices(_STACKS[:, :0], _G), ValueError, r"stacks must not be empty",
                 id="empty_k"),
])
def test_public_op_rejects(call, exc, pattern):
    assert_raises(call, exc, pattern)


# ---------------------------------------------------------------------------------------------------------
# Fuzzing: random geometries and signed weights against the reference.

def test_fuzz_against_reference(kernels):
    def op(case, g):
        w = torch.rand(g.n_directions, generator=case.generator(), dtype=torch.float64) - 0.5
        return lambda s, backend: ops.backproject_slices(s, g, weights=w, backend=backend)

    fuzz_against_reference(
        kernels, lambda case, g: case.rand(case.batch, case.channels, g.n_directions, g.n_slices, g.height, g.width),
        op)
