"""The Triton backend against the reference backend, run on the CPU through ``TRITON_INTERPRET=1``
(conftest sets it before triton is imported).

The interpreter executes every program as a Python loop over NumPy vectors, so sizes are tiny and odd
(9×10×11 volumes, 3 directions, 5×6×7 stacks) and float64 is used wherever a tight tolerance makes the
test sharper: float64 must match to ~1e-12 relative, float32 to ~1e-5.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import tonno_fast as tf  # noqa: E402
from tonno_fast.backend import get_backend  # noqa: E402
from tonno_fast.backend import reference as R  # noqa: E402
from tonno_fast.filters import apply_filter  # noqa: E402

TB = importlib.import_module("tonno_fast.backend.triton")

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(TB.unavailable_reason() is not None, reason=f"triton backend: {TB.unavailable_reason()}"),
]

SHAPE = (9, 10, 11)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # subprocesses import tonno_fast from here
DTYPES = [torch.float32, torch.float64]


def tols(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


def close(actual, expected):
    """assert_close with the atol scaled by the magnitude of the expected values (sums of many samples)."""
    t = tols(expected.dtype)
    s = float(expected.detach().abs().max())
    assert s > 0, "comparison against an all-zero reference checks nothing"
    torch.testing.assert_close(actual, expected, rtol=t["rtol"], atol=t["atol"] * max(s, 1.0))


@pytest.fixture(scope="module")
def geo():
    # An axis-aligned direction and two oblique ones; anisotropic voxels; slices wider than the volume (the
    # pixel spacing follows slice_size to span the bounding sphere) so many samples straddle its faces.
    return tf.make_geometry(SHAPE, spacing=(1.2, 1.0, 0.9), directions=[[0, 0, 1], [1, 2, 3], [-2, 0.5, 1]],
                            n_slices=5, slice_size=(6, 7))


def maps_of(geo, dtype):
    return (geo.slice_maps(dtype=dtype), geo.volume_maps(dtype=dtype), geo.weights.to(dtype))


def randn(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def both(fn_t, fn_r, x, cot_seed):
    """The Triton op ``fn_t`` and the reference ``fn_r`` agree at ``x``, and so do their gradients for a random
    cotangent (seed ``cot_seed``, ``x``'s dtype). Returns both outputs."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = fn_t(x1), fn_r(x2)
    close(out, ref)
    cot = randn(*ref.shape, dtype=x.dtype, seed=cot_seed)
    close(torch.autograd.grad(out, x1, cot)[0], torch.autograd.grad(ref, x2, cot)[0])
    return out, ref


# ----------------------------------------------------------------------------------------------------------
# Backend plumbing

def test_backend_available_and_dispatched():
    assert TB.unavailable_reason("triton") is None
    assert tf.backends()["triton"] == "available"
    assert get_backend("triton", torch.device("cpu")) is TB


def test_import_never_fails_without_triton():
    # A fresh interpreter where `import triton` raises: tonno_fast and the backend module still import, and the
    # backend reports why it is unavailable.
    code = ("import sys, importlib; sys.modules['triton'] = None\n"
            "import tonno_fast\n"
            "m = importlib.import_module('tonno_fast.backend.triton')\n"
            "r = m.unavailable_reason('triton'); assert r and 'triton' in r, r\n"
            "assert 'triton' in tonno_fast.backends()['triton']\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_kernels_compile_for_sm90_and_trace_as_triton_ops():
    """The interpreter never runs the Triton compiler: compile every kernel variant the GPU launchers use
    (float32, float64, and float32 with every integer argument specialised to 1 as the JIT does for B = 1 or
    unit strides) down to an sm_90 cubin, in a process without TRITON_INTERPRET."""
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton install has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-m", "tonno_fast.triton.compile_check", "--arch", "90",
                          "--dtypes", "fp32", "fp64", "--ones", "--trace"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    from tonno_fast.triton.compile_check import VARIANTS
    assert out.stdout.count(": ok") == 3 * len(VARIANTS), out.stdout
    # ... and every op traced as the triton_op a GPU machine registers, decomposed into kernel launches.
    assert out.stdout.count(": traced, 1 kernel launch") == 10, out.stdout


def test_geometry_level_ops_with_backend_triton(geo):
    vol = randn(1, 1, *SHAPE)
    close(tf.radon(vol, geo, backend="triton"), tf.radon(vol, geo, backend="reference"))
    sino = randn(1, 2, geo.n_directions, geo.n_slices, seed=1)
    close(tf.backproject(sino, geo, backend="triton"), tf.backproject(sino, geo, backend="reference"))


# ----------------------------------------------------------------------------------------------------------
# slice_volume

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fill", [0.0, -0.7])
def test_slice_volume_forward_and_backward(geo, dtype, fill):
    sm, _, _ = maps_of(geo, dtype)
    # Non-contiguous volume (a permuted view) with B = 2, C = 2.
    vol = randn(2, 11, 10, 9, 2, dtype=dtype).permute(0, 4, 3, 2, 1)
    assert not vol.is_contiguous()
    args = (geo.n_slices, geo.height, geo.width, fill)
    v1 = vol.clone().requires_grad_()
    out = TB.slice_volume(v1, sm, *args)
    v2 = vol.detach().clone().requires_grad_()
    ref = R.slice_volume(v2, sm, *args)
    assert out.shape == ref.shape == (2, 3, 5, 2, 6, 7) and out.dtype == dtype and out.is_contiguous()
    close(out, ref)
    if fill != 0.0:  # some pixels lie wholly outside and must read exactly `fill`
        assert bool((out.detach() == fill).any())
    cot = randn(*ref.shape, dtype=dtype, seed=3)
    (ga,) = torch.autograd.grad(out, v1, cot)
    (gb,) = torch.autograd.grad(ref, v2, cot)
    close(ga, gb)


def test_axial_slices_are_the_volume_exactly():
    # n = e_z at the voxel grid: every coordinate is an integer, up to the last index of each axis (where the
    # upper tap is invalid with weight 0), so the slices are the volume's planes bit for bit; backprojecting
    # them (weight 1) gives the volume back bit for bit too.
    g = tf.make_geometry(SHAPE, directions=[[0, 0, 1]], n_slices=9, slice_size=(10, 11), pixel_spacing=1.0)
    sm, vm, _ = maps_of(g, torch.float64)
    vol = randn(1, 2, *SHAPE, seed=89)
    out = TB.slice_volume(vol, sm, 9, 10, 11)
    assert torch.equal(out[:, 0].transpose(1, 2), vol)
    back = TB.backproject_slices(out.permute(0, 3, 1, 2, 4, 5), vm, torch.ones(1, dtype=torch.float64), SHAPE)
    assert torch.equal(back, vol)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_slice_volume_half_output(geo, dtype, out_dtype):
    sm, _, _ = maps_of(geo, dtype)
    vol = randn(1, 2, *SHAPE, dtype=dtype)
    out = TB.slice_volume(vol, sm, geo.n_slices, geo.height, geo.width, 0.25, out_dtype)
    ref = R.slice_volume(vol, sm, geo.n_slices, geo.height, geo.width, 0.25)
    assert out.dtype == out_dtype
    # One rounding to the 16-bit format (via float32): within one unit in the last place of the result.
    eps = torch.finfo(out_dtype).eps
    torch.testing.assert_close(out.to(dtype), ref, rtol=eps, atol=eps * float(ref.abs().max()) / 4)


def test_slice_volume_half_output_gradient(geo):
    # The gradient arrives in bf16 and is accumulated in the volume's dtype.
    sm, _, _ = maps_of(geo, torch.float32)
    v = randn(1, 1, *SHAPE, dtype=torch.float32).requires_grad_()
    out = TB.slice_volume(v, sm, geo.n_slices, geo.height, geo.width, 0.0, torch.bfloat16)
    cot = randn(*out.shape, dtype=torch.float32, seed=2).to(torch.bfloat16)
    (g,) = torch.autograd.grad(out, v, cot)
    assert g.dtype == torch.float32
    v2 = v.detach().clone().requires_grad_()
    ref = R.slice_volume(v2, sm, geo.n_slices, geo.height, geo.width)
    close(g, torch.autograd.grad(ref, v2, cot.float())[0])


def test_slice_volume_encoder_fusions(geo):
    dtype = torch.float32
    sm, _, _ = maps_of(geo, dtype)
    vol = 100 * randn(1, 1, *SHAPE, dtype=dtype)
    args = (geo.n_slices, geo.height, geo.width, -50.0)
    out = TB.slice_volume(vol, sm, *args, torch.bfloat16, window=(-40.0, 120.0), replicate_channels=3)
    ref = R.slice_volume(vol, sm, *args)
    expect = ((ref.clamp(-40.0, 120.0) + 40.0) / 160.0).repeat_interleave(3, dim=3)
    assert out.shape == (1, 3, 5, 3, 6, 7) and out.dtype == torch.bfloat16
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0  # the window saturates at both ends
    torch.testing.assert_close(out.float(), expect, rtol=2 ** -8, atol=2 ** -9)

    with pytest.raises(ValueError, match="inference-only"):
        TB.slice_volume(vol.clone().requires_grad_(), sm, *args, window=(-40.0, 120.0))
    with pytest.raises(ValueError, match="lo < hi"):
        TB.slice_volume(vol, sm, *args, window=(1.0, 1.0))


def test_slice_volume_replicated_channels_gradient(geo):
    dtype = torch.float64
    sm, _, _ = maps_of(geo, dtype)
    vol = randn(1, 2, *SHAPE, dtype=dtype)
    both(lambda v: TB.slice_volume(v, sm, geo.n_slices, geo.height, geo.width, replicate_channels=3),
         lambda v: R.slice_volume(v, sm, geo.n_slices, geo.height, geo.width).repeat_interleave(3, dim=3), vol, 5)


def test_nan_maps_read_nothing():
    # NaN coordinates must fail the bounds test (NaN-safe comparison) and read `fill`, never index garbage.
    vol = randn(1, 1, *SHAPE)
    maps = torch.zeros(1, 3, 4, dtype=torch.float64)
    maps[0, :, 3] = torch.tensor([float("nan"), 4.0, 5.0])
    out = TB.slice_volume(vol, maps, 2, 3, 4, 0.5)
    assert bool((out == 0.5).all())
    v = vol.clone().requires_grad_()
    (g,) = torch.autograd.grad(TB.slice_volume(v, maps, 2, 3, 4).sum(), v)
    assert bool((g == 0).all())


# ----------------------------------------------------------------------------------------------------------
# radon

@pytest.mark.parametrize("dtype", DTYPES)
def test_radon_forward_and_backward(geo, dtype):
    sm, _, _ = maps_of(geo, dtype)
    args = (geo.n_slices, geo.height, geo.width, geo.pixel_area)
    out, _ = both(lambda v: TB.radon(v, sm, *args), lambda v: R.radon(v, sm, *args),
                  randn(2, 2, *SHAPE, dtype=dtype), 7)
    assert out.shape == (2, 2, 3, 5)


# ----------------------------------------------------------------------------------------------------------
# backproject

@pytest.mark.parametrize("dtype", DTYPES)
def test_backproject_forward_and_backward(geo, dtype):
    _, vm, w = maps_of(geo, dtype)
    # Non-contiguous sinogram; B·K = 6 also exercises a partial batch-channel tile.
    sino = randn(2, 5, 3, 3, dtype=dtype, seed=11).permute(0, 3, 2, 1)  # (B=2, K=3, N=3, S=5)
    assert not sino.is_contiguous()
    out, _ = both(lambda s: TB.backproject(s, vm, w, SHAPE), lambda s: R.backproject(s, vm, w, SHAPE), sino, 13)
    assert out.shape == (2, 3, *SHAPE)


# ----------------------------------------------------------------------------------------------------------
# backproject_slices

@pytest.mark.parametrize("dtype", DTYPES)
def test_backproject_slices_forward_and_backward(geo, dtype):
    _, vm, w = maps_of(geo, dtype)
    stacks = randn(1, 2, 3, 5, 6, 14, dtype=dtype, seed=17)[..., ::2]  # non-contiguous last axis
    both(lambda s: TB.backproject_slices(s, vm, w, SHAPE), lambda s: R.backproject_slices(s, vm, w, SHAPE),
         stacks, 19)


def _laplacian_along_slices(stacks, spacing):
    """Reference: tonno_fast.filters' laplacian applied along the slice axis S of (B, K, N, S, h, w)."""
    return apply_filter(stacks.movedim(3, -1), "laplacian", slice_spacing=spacing).movedim(-1, 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backproject_slices_fused_laplacian(geo, dtype):
    _, vm, w = maps_of(geo, dtype)
    stacks = randn(2, 1, 3, 5, 6, 7, dtype=dtype, seed=23)
    # The edge-replicated laplacian is not symmetric at the first/last slice: the fused adjoint must be
    # its transpose there too (the gradient check of `both`).
    both(lambda s: TB.backproject_slices(s, vm, w, SHAPE, laplacian_spacing=0.8),
         lambda s: R.backproject_slices(_laplacian_along_slices(s, 0.8), vm, w, SHAPE), stacks, 29)


def test_fused_laplacian_of_constant_stack_is_zero(geo):
    # Edge replication: a constant score gives an exactly zero Tomographic-CAM heatmap (no edge ring).
    _, vm, w = maps_of(geo, torch.float64)
    out = TB.backproject_slices(torch.full((1, 1, 3, 5, 6, 7), 3.5, dtype=torch.float64), vm, w, SHAPE,
                                laplacian_spacing=1.3)
    assert float(out.abs().max()) < 1e-12
    with pytest.raises(ValueError, match="laplacian_spacing"):
        TB.backproject_slices(torch.ones(1, 1, 3, 5, 6, 7, dtype=torch.float64), vm, w, SHAPE, laplacian_spacing=0)


# ----------------------------------------------------------------------------------------------------------
# affine_grid_sample

# F.affine_grid warns about size-1 axes with align_corners=True (the reference's own behaviour, matched here).
@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid behavior")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("out_size", [(5, 6, 7), (1, 4, 3)])
def test_affine_grid_sample_forward_and_gradients(dtype, align_corners, out_size):
    vol = randn(2, 2, 7, 6, 5, dtype=dtype, seed=31)
    theta = torch.eye(3, 4, dtype=dtype) + 0.3 * randn(2, 3, 4, dtype=dtype, seed=37)
    size = [2, 2, *out_size]
    v1, t1 = vol.clone().requires_grad_(), theta.clone().requires_grad_()
    v2, t2 = vol.clone().requires_grad_(), theta.clone().requires_grad_()
    out = TB.affine_grid_sample(v1, t1, size, align_corners)
    ref = R.affine_grid_sample(v2, t2, size, align_corners)
    assert out.shape == (2, 2, *out_size)
    close(out, ref)
    cot = randn(*ref.shape, dtype=dtype, seed=41)
    ga = torch.autograd.grad(out, (v1, t1), cot)
    gb = torch.autograd.grad(ref, (v2, t2), cot)
    close(ga[0], gb[0])
    close(ga[1], gb[1])
    # Volume-only gradient (theta constant) takes the kernel path without the theta reduction.
    (gv,) = torch.autograd.grad(TB.affine_grid_sample(v1, theta, size, align_corners), v1, cot)
    close(gv, gb[0])


# ----------------------------------------------------------------------------------------------------------
# Launch shapes: several programs per row with masked tails, several batch×channel tiles.

def test_small_blocks_and_many_tiles(monkeypatch):
    """With the interpreter's block caps lowered (16 pixels / 64 voxels, 2 batch×channel rows), every kernel
    runs several programs per slice / voxel range (program offsets, masked tails, radon's pixel loop) and the
    backprojections several batch×channel tiles (B·K = 3: one full, one partial). Forward and adjoint against
    the reference, float64, on a smaller volume to keep the program count down."""
    from tonno_fast.triton import _common
    monkeypatch.setattr(_common, "INTERPRETER_MAX_BLOCK", 16)
    monkeypatch.setattr(_common, "INTERPRETER_MAX_BLOCK_BK", 2)
    shape = (5, 6, 7)
    geo = tf.make_geometry(shape, directions=[[0, 0, 1], [1, 2, 3]], n_slices=3, slice_size=(4, 5))
    sm, vm, w = maps_of(geo, torch.float64)
    S, h, wd = geo.n_slices, geo.height, geo.width

    vol = randn(1, 1, *shape, seed=71)
    both(lambda v: TB.slice_volume(v, sm, S, h, wd, 0.3), lambda v: R.slice_volume(v, sm, S, h, wd, 0.3), vol, 1)
    both(lambda v: TB.radon(v, sm, S, h, wd), lambda v: R.radon(v, sm, S, h, wd), vol, 2)
    # Voxel-parallel kernels: 210 voxels in blocks of 64 (3 full programs and a tail) is enough.
    monkeypatch.setattr(_common, "INTERPRETER_MAX_BLOCK", 64)
    sino = randn(1, 3, 2, S, seed=73)
    both(lambda s: TB.backproject(s, vm, w, shape), lambda s: R.backproject(s, vm, w, shape), sino, 3)
    stacks = randn(1, 3, 2, S, h, wd, seed=79)
    both(lambda s: TB.backproject_slices(s, vm, w, shape, 0.9),
         lambda s: R.backproject_slices(_laplacian_along_slices(s, 0.9), vm, w, shape), stacks, 4)
    theta = torch.eye(3, 4, dtype=torch.float64) + 0.2 * randn(1, 3, 4, seed=83)
    both(lambda v: TB.affine_grid_sample(v, theta, [1, 1, 4, 3, 5]),
         lambda v: R.affine_grid_sample(v, theta, [1, 1, 4, 3, 5]), vol, 5)


def test_deterministic_mode_alert():
    # The atomic-add adjoints refuse torch.use_deterministic_algorithms(True) for CUDA tensors; under the
    # interpreter (sequential programs) and on other devices they are deterministic and pass silently.
    from tonno_fast.triton import _common
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        _common.alert_not_deterministic("x", torch.device("cpu"))
        if not _common.INTERPRETED:
            with pytest.raises(RuntimeError, match="not bitwise deterministic"):
                _common.alert_not_deterministic("x", torch.device("cuda"))
        else:
            _common.alert_not_deterministic("x", torch.device("cuda"))
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


# ----------------------------------------------------------------------------------------------------------
# Adjoint dot-product tests: <A x, y> = <x, Aᵀ y> to rounding, for the registered adjoint ops.

def _dot(a, b):
    return float((a.double() * b.double()).sum())


def test_adjoint_dot_products(geo):
    from tonno_fast.triton import (backproject_backward, backproject_slices_backward, radon_backward,
                                   slice_volume_backward)
    dt = torch.float64
    sm, vm, w = maps_of(geo, dt)
    S, h, wd = geo.n_slices, geo.height, geo.width
    x = randn(1, 2, *SHAPE, seed=43)
    y = randn(1, 3, S, 2, h, wd, seed=47)
    lhs = _dot(TB.slice_volume(x, sm, S, h, wd), y)
    assert abs(lhs - _dot(x, slice_volume_backward(y, sm, SHAPE))) < 1e-11 * abs(lhs)

    y = randn(1, 2, 3, S, seed=53)
    lhs = _dot(TB.radon(x, sm, S, h, wd, 0.6), y)
    assert abs(lhs - _dot(x, radon_backward(y, sm, h, wd, 0.6, SHAPE))) < 1e-11 * abs(lhs)

    s = randn(1, 2, 3, S, seed=59)
    lhs = _dot(TB.backproject(s, vm, w, SHAPE), x)
    assert abs(lhs - _dot(s, backproject_backward(x, vm, w, S))) < 1e-11 * abs(lhs)

    st = randn(1, 2, 3, S, h, wd, seed=61)
    for spacing in (None, 0.7):
        lhs = _dot(TB.backproject_slices(st, vm, w, SHAPE, spacing), x)
        rhs = _dot(st, backproject_slices_backward(x, vm, w, (S, h, wd), spacing))
        assert abs(lhs - rhs) < 1e-11 * abs(lhs)


# ----------------------------------------------------------------------------------------------------------
# torch.library: opcheck (schema, fake kernels, autograd registration, AOT dispatch) and torch.compile.

def _opcheck_cases():
    dt = torch.float64
    g = tf.make_geometry((5, 6, 7), directions=[[0, 0, 1], [1, 2, 3]], n_slices=3, slice_size=(4, 5))
    sm, vm, w = g.slice_maps(dtype=dt), g.volume_maps(dtype=dt), g.weights.to(dt)
    ops = torch.ops.tonno_fast_triton

    def rg(*shape, seed=0):
        return randn(*shape, seed=seed).requires_grad_()

    theta = (torch.eye(3, 4, dtype=dt) + 0.2 * randn(2, 3, 4, seed=5)).requires_grad_()
    return [
        ("slice_volume", ops.slice_volume, (rg(1, 2, 5, 6, 7), sm, 3, 4, 5, 0.5, None, None, 1)),
        ("slice_volume_replicate", ops.slice_volume, (rg(1, 1, 5, 6, 7), sm, 3, 4, 5, 0.0, None, None, 3)),
        ("slice_volume_backward", ops.slice_volume_backward, (rg(1, 2, 3, 2, 4, 5), sm, [5, 6, 7])),
        ("radon", ops.radon, (rg(1, 2, 5, 6, 7), sm, 3, 4, 5, 0.7)),
        ("radon_backward", ops.radon_backward, (rg(1, 2, 2, 3), sm, 4, 5, 0.7, [5, 6, 7])),
        ("backproject", ops.backproject, (rg(1, 2, 2, 3), vm, w, [5, 6, 7])),
        ("backproject_backward", ops.backproject_backward, (rg(1, 2, 5, 6, 7), vm, w, 3)),
        ("backproject_slices", ops.backproject_slices, (rg(1, 2, 2, 3, 4, 5), vm, w, [5, 6, 7], None)),
        ("backproject_slices_laplacian", ops.backproject_slices, (rg(1, 2, 2, 3, 4, 5), vm, w, [5, 6, 7], 0.9)),
        ("backproject_slices_backward", ops.backproject_slices_backward,
         (rg(1, 2, 5, 6, 7), vm, w, [3, 4, 5], 0.9)),
        ("affine_grid_sample", ops.affine_grid_sample, (rg(2, 2, 5, 6, 7), theta, [2, 2, 3, 4, 5], False)),
        ("affine_grid_sample_backward", ops.affine_grid_sample_backward,
         (randn(2, 2, 3, 4, 5, seed=7), randn(2, 2, 5, 6, 7, seed=9), theta.detach(), True, True, True)),
    ]


@pytest.mark.parametrize("case", _opcheck_cases(), ids=lambda c: c[0])
def test_opcheck(case):
    _, op, args = case
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(geo):
    dt = torch.float64
    sm, vm, w = maps_of(geo, dt)
    S, h, wd = geo.n_slices, geo.height, geo.width

    def f(vol):  # slice → per-slice score → backproject, as the ToNNO pipeline does
        scores = TB.slice_volume(vol, sm, S, h, wd).sum(dim=(-2, -1))[..., 0]  # (B, N, S), C = 1
        return TB.backproject(scores[:, None], vm, w, SHAPE)

    vol = randn(1, 1, *SHAPE, seed=67)
    v1, v2 = vol.clone().requires_grad_(), vol.clone().requires_grad_()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out, ref = compiled(v1), f(v2)
    close(out, ref)
    close(torch.autograd.grad(out.sum(), v1)[0], torch.autograd.grad(ref.sum(), v2)[0])
