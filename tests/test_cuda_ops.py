"""The CUDA kernels (csrc/ops/cuda/*.cu) against the reference backend.

Two kinds of test:

* ``test_cuda_kernels_built`` runs everywhere (CI has nvcc and a CUDA build of torch but no GPU): when the
  extension could have been built with CUDA, ``tonno_fast._C`` must hold a CUDA kernel for every op.
* everything in ``TestOnGPU`` (marked ``cuda``) needs a CUDA device and is skipped without one: forward
  against the reference in float64 (~1e-10) and float32 (~1e-5), bf16/fp16 output, backward kernels
  against the reference's autograd, adjoint dot products, ``gradcheck``, ``opcheck``, and the behaviour
  under ``torch.use_deterministic_algorithms(True)``.
"""
import math
import os

import pytest
import torch

from tonno_fast.backend import reference as R
from tonno_fast.geometry import make_geometry

OPS = ("slice_volume", "radon", "backproject", "backproject_slices", "affine_grid_sample")
ALL_OPS = OPS + tuple(f"{op}_backward" for op in OPS)

try:
    import tonno_fast._C as _C

    _C_ERROR = None
except Exception as exc:  # ImportError, or an undefined symbol when the build is stale
    _C = None
    _C_ERROR = f"{type(exc).__name__}: {exc}"


def _cuda_build_expected():
    """Why the extension should hold CUDA kernels here (None if it should not), mirroring setup.py."""
    if os.environ.get("TONNO_FAST_NO_CUDA", "0") == "1":
        return None
    if torch.version.cuda is None:
        return None
    from torch.utils import cpp_extension

    cuda_home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME or "/usr/local/cuda"
    if not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        return None
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) and nvcc in {cuda_home}"


def test_cuda_kernels_built():
    if _C is None:
        pytest.skip(f"tonno_fast._C is not built or does not load ({_C_ERROR})")
    why = _cuda_build_expected()
    if why is None:
        pytest.skip("no CUDA toolchain or no CUDA build of torch here (or TONNO_FAST_NO_CUDA=1): "
                    "a CPU-only extension is expected")
    info = _C.build_info()
    assert info["cuda"] is True, f"tonno_fast._C was built without CUDA kernels although {why} are present"
    assert len(info["cuda_arch"]) >= 1, f"build_info() lists no CUDA architecture: {info}"
    missing = [op for op in ALL_OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"tonno_fast::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for tonno_fast::{missing}"


# ---------------------------------------------------------------------------------------------------------
# GPU tests.

# Tolerances relative to the largest magnitude of the expected tensor (as in tests/test_cpu_ops.py): sums of many
# samples (radon, backprojections) carry the rounding of their largest terms, not of the result.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = (torch.float64, torch.float32)
DEV = "cuda"


def _ops():
    return torch.ops.tonno_fast


def _geometries():
    """Small geometries that reach every code path: anisotropic spacing, odd slice widths (one pixel per
    thread), widths divisible by 8 (16-byte stores in every output dtype), slices beyond the volume."""
    return {
        "odd": make_geometry((9, 10, 11), spacing=(1.0, 1.2, 0.9), n_directions=5),
        "vec": make_geometry((8, 7, 12), n_directions=3, slice_size=(6, 16), n_slices=9, pixel_spacing=0.8,
                             slice_spacing=1.7),
    }


GEOMS = _geometries()


def _maps(g, dtype, kind="slice"):
    return (g.slice_maps if kind == "slice" else g.volume_maps)(dtype=dtype, device=DEV)


def _randn(*shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=DEV, dtype=dtype)


def _thetas(n, dtype, seed=0):
    """Rotations by up to ~40 degrees with anisotropic scale and a shift: slices leave the volume in part."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 3, generator=gen, dtype=torch.float64) * 0.7
    cz, sz, cy, sy = torch.cos(a[:, 0]), torch.sin(a[:, 0]), torch.cos(a[:, 1]), torch.sin(a[:, 1])
    one, zero = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    rz = torch.stack([torch.stack([cz, -sz, zero], -1), torch.stack([sz, cz, zero], -1),
                      torch.stack([zero, zero, one], -1)], -2)
    ry = torch.stack([torch.stack([cy, zero, sy], -1), torch.stack([zero, one, zero], -1),
                      torch.stack([-sy, zero, cy], -1)], -2)
    lin = rz @ ry * torch.tensor([1.1, 0.9, 1.0], dtype=torch.float64)
    shift = (torch.rand(n, 3, 1, generator=gen, dtype=torch.float64) - 0.5) * 0.4
    return torch.cat([lin, shift], -1).to(device=DEV, dtype=dtype)


def _assert_close(actual, expected, tol):
    """Same shape and dtype, and max |actual - expected| <= tol * max |expected|."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
        f"{tuple(actual.shape)} {actual.dtype} vs {tuple(expected.shape)} {expected.dtype}"
    err = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
    scale = float(expected.double().abs().max()) if expected.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"max abs error {err:.3g} > {tol:g} * max |expected| {scale:.3g}"


def _dot(a, b):
    return float((a.double() * b.double()).sum())


def _reference_vjp(fn, x):
    """A random cotangent ``gy`` (seed 1, ``x``'s dtype) of the reference op ``fn`` at ``x`` and the reference
    gradient ``(d fn / d x)^T gy`` by autograd: what the backward kernels must return."""
    x = x.detach().requires_grad_()
    y = fn(x)
    gy = _randn(*y.shape, dtype=x.dtype, seed=1)
    (dx,) = torch.autograd.grad(y, x, gy)
    return gy, dx


def _native():
    """The compiled backend module (fake kernels + autograd registration); skip when it cannot load."""
    from tonno_fast.backend import BackendUnavailable, get_backend

    try:
        return get_backend("cuda", torch.device(DEV))
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(_C is None, reason=f"tonno_fast._C is not built ({_C_ERROR})")
class TestOnGPU:
    # ---- forward against the reference ------------------------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("geom", sorted(GEOMS))
    @pytest.mark.parametrize("fill", [0.0, -0.7])
    def test_slice_volume(self, dtype, geom, fill):
        g = GEOMS[geom]
        vol = _randn(2, 3, *g.volume_shape, dtype=dtype)
        maps = _maps(g, dtype)
        out = _ops().slice_volume(vol, maps, g.n_slices, g.height, g.width, fill, None)
        expect = R.slice_volume(vol, maps, g.n_slices, g.height, g.width, fill)
        assert out.dtype == dtype and out.is_contiguous()
        _assert_close(out, expect, TOL[dtype])

    @pytest.mark.parametrize("out_dtype, rel", [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)])
    @pytest.mark.parametrize("geom", sorted(GEOMS))
    def test_slice_volume_low_precision_output(self, out_dtype, rel, geom):
        g = GEOMS[geom]
        vol = _randn(1, 2, *g.volume_shape, dtype=torch.float32)
        maps = _maps(g, torch.float32)
        out = _ops().slice_volume(vol, maps, g.n_slices, g.height, g.width, 0.0, out_dtype)
        exact = R.slice_volume(vol.double(), maps.double(), g.n_slices, g.height, g.width)
        assert out.dtype == out_dtype
        # The float32 value (within the float32 tolerance of the exact one), rounded once: at most half an ulp
        # of the output format, relative.
        excess = (out.double() - exact).abs() - rel * exact.abs()
        assert float(excess.max()) <= TOL[torch.float32] * float(exact.abs().max()), float(excess.max())

    def test_slice_volume_noncontiguous_volume(self):
        g = GEOMS["odd"]
        base = _randn(3, 2, *g.volume_shape, dtype=torch.float64)
        vol = base.transpose(0, 1)  # (2, 3, D, H, W), not contiguous
        maps = _maps(g, torch.float64)
        out = _ops().slice_volume(vol, maps, g.n_slices, g.height, g.width, 0.0, None)
        _assert_close(out, R.slice_volume(vol.contiguous(), maps, g.n_slices, g.height, g.width),
                      TOL[torch.float64])

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("geom", sorted(GEOMS))
    def test_radon(self, dtype, geom):
        g = GEOMS[geom]
        vol = _randn(2, 3, *g.volume_shape, dtype=dtype)  # B * C = 6: two channel groups of the kernel
        maps = _maps(g, dtype)
        out = _ops().radon(vol, maps, g.n_slices, g.height, g.width, g.pixel_area)
        expect = R.radon(vol, maps, g.n_slices, g.height, g.width, g.pixel_area)
        _assert_close(out, expect, TOL[dtype])

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("geom", sorted(GEOMS))
    def test_backproject(self, dtype, geom):
        g = GEOMS[geom]
        sino = _randn(2, 3, g.n_directions, g.n_slices, dtype=dtype)
        maps, w = _maps(g, dtype, "volume"), g.weights.to(DEV, dtype)
        out = _ops().backproject(sino, maps, w, list(g.volume_shape))
        expect = R.backproject(sino, maps, w, g.volume_shape)
        _assert_close(out, expect, TOL[dtype])

    def test_backproject_long_rows_fall_back_to_global_memory(self):
        # S so large that one sinogram row does not fit in the kernel's shared memory.
        g = make_geometry((6, 5, 7), n_directions=3, n_slices=6000, slice_spacing=0.002)
        sino = _randn(1, 1, 3, g.n_slices, dtype=torch.float64)
        maps, w = _maps(g, torch.float64, "volume"), g.weights.to(DEV, torch.float64)
        _assert_close(_ops().backproject(sino, maps, w, list(g.volume_shape)),
                      R.backproject(sino, maps, w, g.volume_shape), TOL[torch.float64])

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("geom", sorted(GEOMS))
    def test_backproject_slices(self, dtype, geom):
        g = GEOMS[geom]
        stacks = _randn(1, 5, g.n_directions, g.n_slices, g.height, g.width, dtype=dtype)  # 5 planes: 2 groups
        maps, w = _maps(g, dtype, "volume"), g.weights.to(DEV, dtype)
        out = _ops().backproject_slices(stacks, maps, w, list(g.volume_shape))
        expect = R.backproject_slices(stacks, maps, w, g.volume_shape)
        _assert_close(out, expect, TOL[dtype])

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("align_corners", [False, True])
    @pytest.mark.parametrize("out_size", [(6, 7, 8), (1, 9, 5)])  # a size-1 axis maps to normalised 0
    def test_affine_grid_sample(self, dtype, align_corners, out_size):
        vol = _randn(3, 2, 7, 8, 9, dtype=dtype)
        theta = _thetas(3, dtype)
        size = [3, 2, *out_size]
        out = _ops().affine_grid_sample(vol, theta, size, align_corners)
        expect = R.affine_grid_sample(vol, theta, size, align_corners)
        _assert_close(out, expect, TOL[dtype])

    # ---- backward kernels: the reference's autograd, and adjoint dot products -----------------------------

    @pytest.mark.parametrize("geom", sorted(GEOMS))
    def test_slice_volume_backward(self, geom):
        g = GEOMS[geom]
        dt = torch.float64
        x = _randn(2, 3, *g.volume_shape, dtype=dt)
        maps = _maps(g, dt)
        gy, expect = _reference_vjp(lambda v: R.slice_volume(v, maps, g.n_slices, g.height, g.width, 0.3), x)
        out = _ops().slice_volume_backward(gy, maps, list(g.volume_shape))
        _assert_close(out, expect, TOL[dt])  # fill (0.3) is a constant: no gradient
        # the dot-product test needs the linear map: fill = 0
        ax = _ops().slice_volume(x, maps, g.n_slices, g.height, g.width, 0.0, None)
        assert math.isclose(_dot(ax, gy), _dot(x, out), rel_tol=1e-10)

    @pytest.mark.parametrize("geom", sorted(GEOMS))
    def test_radon_backward(self, geom):
        g = GEOMS[geom]
        dt = torch.float64
        vol = _randn(2, 3, *g.volume_shape, dtype=dt)
        maps = _maps(g, dt)
        gy, expect = _reference_vjp(lambda v: R.radon(v, maps, g.n_slices, g.height, g.width, g.pixel_area), vol)
        out = _ops().radon_backward(gy, maps, g.height, g.width, g.pixel_area, list(g.volume_shape))
        _assert_close(out, expect, TOL[dt])
        ax = _ops().radon(vol, maps, g.n_slices, g.height, g.width, g.pixel_area)
        assert math.isclose(_dot(ax, gy), _dot(vol, out), rel_tol=1e-10)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("geom", sorted(GEOMS))
    def test_backproject_backward(self, dtype, geom):
        g = GEOMS[geom]
        sino = _randn(2, 3, g.n_directions, g.n_slices, dtype=torch.float64)
        maps64, w64 = _maps(g, torch.float64, "volume"), g.weights.to(DEV, torch.float64)
        gy, expect = _reference_vjp(lambda s: R.backproject(s, maps64, w64, g.volume_shape), sino)
        out = _ops().backproject_backward(gy.to(dtype), maps64.to(dtype), w64.to(dtype), g.n_slices)
        _assert_close(out, expect.to(dtype), TOL[dtype])
        if dtype == torch.float64:
            ax = _ops().backproject(sino, maps64, w64, list(g.volume_shape))
            assert math.isclose(_dot(ax, gy), _dot(sino, out), rel_tol=1e-10)

    @pytest.mark.parametrize("geom", sorted(GEOMS))
    def test_backproject_slices_backward(self, geom):
        g = GEOMS[geom]
        dt = torch.float64
        stacks = _randn(1, 5, g.n_directions, g.n_slices, g.height, g.width, dtype=dt)
        maps, w = _maps(g, dt, "volume"), g.weights.to(DEV, dt)
        gy, expect = _reference_vjp(lambda st: R.backproject_slices(st, maps, w, g.volume_shape), stacks)
        out = _ops().backproject_slices_backward(gy, maps, w, [g.n_slices, g.height, g.width])
        _assert_close(out, expect, TOL[dt])
        ax = _ops().backproject_slices(stacks, maps, w, list(g.volume_shape))
        assert math.isclose(_dot(ax, gy), _dot(stacks, out), rel_tol=1e-10)

    @pytest.mark.parametrize("align_corners", [False, True])
    @pytest.mark.parametrize("out_size", [(6, 7, 8), (1, 9, 5)])
    def test_affine_grid_sample_backward(self, align_corners, out_size):
        dt = torch.float64
        vol = _randn(3, 2, 7, 8, 9, dtype=dt).requires_grad_()
        theta = _thetas(3, dt).requires_grad_()
        size = [3, 2, *out_size]
        y = R.affine_grid_sample(vol, theta, size, align_corners)
        gy = _randn(*y.shape, dtype=dt, seed=1)
        gv_ref, gt_ref = torch.autograd.grad(y, (vol, theta), gy)
        gv, gt = _ops().affine_grid_sample_backward(gy, vol.detach(), theta.detach(), align_corners, True, True)
        _assert_close(gv, gv_ref, TOL[dt])
        _assert_close(gt, gt_ref, TOL[dt])
        gv_only, gt_none = _ops().affine_grid_sample_backward(gy, vol.detach(), theta.detach(), align_corners,
                                                              True, False)
        assert gt_none.numel() == 0 and torch.equal(gv_only, gv)
        gv_none, gt_only = _ops().affine_grid_sample_backward(gy, vol.detach(), theta.detach(), align_corners,
                                                              False, True)
        assert gv_none.numel() == 0
        torch.testing.assert_close(gt_only, gt, rtol=0, atol=0)

    # ---- autograd through the registered ops (tonno_fast.backend.native) -------------------------------

    def test_gradcheck(self):
        be = _native()
        dt = torch.float64
        g = make_geometry((4, 5, 3), spacing=(1.0, 0.8, 1.3), n_directions=2, slice_size=(3, 4), n_slices=3)
        sm, vm, w = _maps(g, dt), _maps(g, dt, "volume"), g.weights.to(DEV, dt)
        vol = _randn(1, 2, *g.volume_shape, dtype=dt).requires_grad_()
        sino = _randn(1, 2, g.n_directions, g.n_slices, dtype=dt).requires_grad_()
        stacks = _randn(1, 1, g.n_directions, g.n_slices, g.height, g.width, dtype=dt).requires_grad_()
        shape = list(g.volume_shape)
        # The adjoints that scatter with atomicAdd may differ in the last bits from one backward call to the
        # next (gradcheck's reentrancy check): nondet_tol covers that rounding; backproject's adjoint is
        # deterministic and is held to bitwise reentrancy.
        atomic_tol = 1e-12
        checks = {
            "slice_volume": (lambda v: be.slice_volume(v, sm, g.n_slices, g.height, g.width, 0.5, None), (vol,),
                             atomic_tol),
            "radon": (lambda v: be.radon(v, sm, g.n_slices, g.height, g.width, 0.7), (vol,), atomic_tol),
            "backproject": (lambda s: be.backproject(s, vm, w, shape), (sino,), 0.0),
            "backproject_slices": (lambda s: be.backproject_slices(s, vm, w, shape), (stacks,), atomic_tol),
        }
        for name, (fn, args, tol) in checks.items():
            assert torch.autograd.gradcheck(fn, args, nondet_tol=tol, check_grad_dtypes=True), name
        avol = _randn(2, 1, 4, 3, 5, dtype=dt).requires_grad_()
        theta = _thetas(2, dt).requires_grad_()
        for ac in (False, True):
            fn = lambda v, t, ac=ac: be.affine_grid_sample(v, t, [2, 1, 3, 4, 2], ac)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (avol, theta), nondet_tol=atomic_tol), f"align_corners={ac}"

    def test_opcheck(self):
        _native()  # registers the fake kernels and autograd formulas
        dt = torch.float64
        g = make_geometry((4, 5, 3), n_directions=2, slice_size=(3, 4), n_slices=3)
        sm, vm, w = _maps(g, dt), _maps(g, dt, "volume"), g.weights.to(DEV, dt)
        shape = list(g.volume_shape)
        ops = _ops()
        for req in (False, True):
            vol = _randn(1, 2, *g.volume_shape, dtype=dt).requires_grad_(req)
            sino = _randn(1, 2, 2, 3, dtype=dt).requires_grad_(req)
            stacks = _randn(1, 1, 2, 3, 3, 4, dtype=dt).requires_grad_(req)
            avol = _randn(2, 1, 4, 3, 5, dtype=dt).requires_grad_(req)
            theta = _thetas(2, dt).requires_grad_(req)
            samples = [
                (ops.slice_volume.default, (vol, sm, 3, 3, 4, 0.5, None)),
                (ops.slice_volume.default, (vol, sm, 3, 3, 4, 0.0, torch.float32)),
                (ops.radon.default, (vol, sm, 3, 3, 4, 0.7)),
                (ops.backproject.default, (sino, vm, w, shape)),
                (ops.backproject_slices.default, (stacks, vm, w, shape)),
                (ops.affine_grid_sample.default, (avol, theta, [2, 1, 3, 4, 2], False)),
            ]
            if not req:
                samples += [
                    (ops.slice_volume_backward.default, (_randn(1, 2, 3, 2, 3, 4, dtype=dt), sm, shape)),
                    (ops.radon_backward.default, (_randn(1, 2, 2, 3, dtype=dt), sm, 3, 4, 0.7, shape)),
                    (ops.backproject_backward.default, (_randn(1, 2, *shape, dtype=dt), vm, w, 3)),
                    (ops.backproject_slices_backward.default, (_randn(1, 1, *shape, dtype=dt), vm, w, [3, 3, 4])),
                    (ops.affine_grid_sample_backward.default,
                     (_randn(2, 1, 3, 4, 2, dtype=dt), avol, theta, True, True, True)),
                ]
            for op, args in samples:
                torch.library.opcheck(op, args)

    # ---- determinism and input checks --------------------------------------------------------------------

    def test_deterministic_mode(self, deterministic):
        g = GEOMS["odd"]
        dt = torch.float32
        vol = _randn(1, 2, *g.volume_shape, dtype=dt)
        sm, vm, w = _maps(g, dt), _maps(g, dt, "volume"), g.weights.to(DEV, dt)
        shape = list(g.volume_shape)
        ops = _ops()
        # Gathers (and the reductions of radon and of backproject's adjoint) are deterministic: bitwise equal.
        runs = [(ops.slice_volume(vol, sm, g.n_slices, g.height, g.width, 0.0, None),
                 ops.radon(vol, sm, g.n_slices, g.height, g.width, 1.0),
                 ops.backproject_backward(vol, vm, w, g.n_slices)) for _ in range(2)]
        for a, b in zip(*runs):
            assert torch.equal(a, b)
        # Scatters with atomicAdd refuse to run, naming the op.
        gy = _randn(1, g.n_directions, g.n_slices, 2, g.height, g.width, dtype=dt)
        with pytest.raises(RuntimeError, match="tonno_fast::slice_volume_backward"):
            ops.slice_volume_backward(gy, sm, shape)
        with pytest.raises(RuntimeError, match="tonno_fast::radon_backward"):
            ops.radon_backward(runs[0][1], sm, g.height, g.width, 1.0, shape)
        with pytest.raises(RuntimeError, match="tonno_fast::backproject_slices_backward"):
            ops.backproject_slices_backward(vol, vm, w, [g.n_slices, g.height, g.width])
        avol, theta = _randn(2, 1, 4, 3, 5, dtype=dt), _thetas(2, dt)
        ga = _randn(2, 1, 3, 4, 2, dtype=dt)
        with pytest.raises(RuntimeError, match="tonno_fast::affine_grid_sample_backward"):
            ops.affine_grid_sample_backward(ga, avol, theta, False, True, False)
        # ...but the theta gradient alone is a deterministic reduction.
        t1 = ops.affine_grid_sample_backward(ga, avol, theta, False, False, True)[1]
        t2 = ops.affine_grid_sample_backward(ga, avol, theta, False, False, True)[1]
        assert torch.equal(t1, t2)

    def test_errors_name_the_argument(self):
        g = GEOMS["odd"]
        vol = _randn(1, 1, *g.volume_shape, dtype=torch.float32)
        maps = _maps(g, torch.float32)
        ops = _ops()
        with pytest.raises(RuntimeError, match="maps must have the dtype of volume"):
            ops.slice_volume(vol, maps.double(), g.n_slices, g.height, g.width, 0.0, None)
        with pytest.raises(RuntimeError, match="maps must be on the device of volume"):
            ops.slice_volume(vol, maps.cpu(), g.n_slices, g.height, g.width, 0.0, None)
        with pytest.raises(RuntimeError, match=r"maps must have shape \(N, 3, 4\)"):
            ops.radon(vol, maps[:, :2], g.n_slices, g.height, g.width, 1.0)
        with pytest.raises(RuntimeError, match="out_dtype must be"):
            ops.slice_volume(vol, maps, g.n_slices, g.height, g.width, 0.0, torch.int32)
        sino = _randn(1, 1, g.n_directions, g.n_slices, dtype=torch.float32)
        with pytest.raises(RuntimeError, match=r"weights must have shape \(N,\)"):
            ops.backproject(sino, _maps(g, torch.float32, "volume"), torch.ones(2, device=DEV), [9, 10, 11])
        with pytest.raises(RuntimeError, match="volume_shape must have 3 entries"):
            ops.backproject(sino, _maps(g, torch.float32, "volume"), g.weights.to(DEV, torch.float32), [9, 10])
