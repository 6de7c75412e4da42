"""The compiled CPU kernels (``torch.ops.tonno_fast.*`` from ``tonno_fast._C``) against the reference backend.

Every op equals :mod:`tonno_fast.backend.reference` (float64 to 1e-10 and float32 to 1e-5, relative to the
largest absolute value); every backward is the exact adjoint of its forward (dot-product test); gradients
pass ``gradcheck``; every op passes ``torch.library.opcheck``; backward kernels are bitwise deterministic
across runs and thread counts; bad inputs give a RuntimeError naming the argument.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from tonno_fast.backend import reference as ref
from tonno_fast.geometry import fibonacci_directions, make_geometry

native = pytest.importorskip("tonno_fast.backend.native")
if native.unavailable_reason("cpu") is not None:
    pytest.skip(f"compiled CPU kernels unavailable: {native.unavailable_reason('cpu')}", allow_module_level=True)

ops = torch.ops.tonno_fast

# Directions: Fibonacci, the three axes, near-pole and in-plane ones (x, y, z).
DIRECTIONS = torch.cat([
    fibonacci_directions(5),
    torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                  [1e-9, 0.0, 1.0], [0.01, -0.02, 1.0], [0.6, -0.8, 0.0]], dtype=torch.float64),
])
SHAPE = (7, 13, 21)
SPACING = (1.5, 1.0, 0.8)


@pytest.fixture(scope="module")
def geom():
    return make_geometry(SHAPE, spacing=SPACING, directions=DIRECTIONS)


@pytest.fixture(scope="module")
def tiny():
    """For gradcheck: a few hundred unknowns at most."""
    return make_geometry((3, 4, 5), spacing=(1.2, 1.0, 0.9), directions=[[0.3, 0.2, 0.9], [0.0, 0.0, 1.0]],
                         slice_size=(3, 4), n_slices=3)


def assert_close_rel(actual, expected, rtol):
    """max |actual - expected| <= rtol * max |expected| (and the shapes match)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rtol * max(scale, 1e-30), f"max abs error {err:.3g} > {rtol:g} * max |expected| {scale:.3g}"


def noncontig(t):
    """The same values as a non-contiguous tensor (last two axes swapped in memory)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def random_theta(n, seed=0):
    """Rotation-ish affine maps with shifts, so parts of the output fall outside the input."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    scale = 0.7 + 0.6 * torch.rand(n, 1, 3, generator=g, dtype=torch.float64)
    shift = 0.4 * torch.randn(n, 3, 1, generator=g, dtype=torch.float64)
    return torch.cat([q * scale, shift], dim=2)


# ---------------------------------------------------------------------------------------------------------
# Forward ops equal the reference.

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fill", [0.0, -0.75])
def test_slice_volume(geom, dtype, fill):
    vol = rand(2, 3, *SHAPE, dtype=dtype)
    maps = geom.slice_maps(dtype=dtype)
    out = native.slice_volume(noncontig(vol), maps, geom.n_slices, geom.height, geom.width, fill)
    expected = ref.slice_volume(vol.double(), maps.double(), geom.n_slices, geom.height, geom.width, fill)
    assert out.dtype == dtype
    assert_close_rel(out, expected, TOL[dtype])


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_slice_volume_low_precision_output(geom, out_dtype):
    vol = rand(1, 2, *SHAPE, dtype=torch.float32)
    maps = geom.slice_maps(dtype=torch.float32)
    out = native.slice_volume(vol, maps, geom.n_slices, geom.height, geom.width, 0.5, out_dtype)
    full = native.slice_volume(vol, maps, geom.n_slices, geom.height, geom.width, 0.5)
    assert out.dtype == out_dtype
    # Computed in float32, rounded once when written: within one ulp of out_dtype of the float32 result, up
    # to the float32 tolerance of every other test (FMA contraction differs between the two instantiations,
    # visible where v and fill * (1 - sum w) nearly cancel).
    up = torch.nextafter(out, torch.full_like(out, math.inf)).float()
    down = torch.nextafter(out, torch.full_like(out, -math.inf)).float()
    ulp = torch.maximum(up - out.float(), out.float() - down)
    f32_rounding = TOL[torch.float32] * full.abs().max()
    assert ((out.float() - full).abs() <= ulp + f32_rounding).all()
    assert (out == full.to(out_dtype)).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_radon(geom, dtype):
    vol = rand(2, 3, *SHAPE, dtype=dtype, seed=1)
    maps = geom.slice_maps(dtype=dtype)
    out = native.radon(noncontig(vol), maps, geom.n_slices, geom.height, geom.width, geom.pixel_area)
    expected = ref.radon(vol.double(), maps.double(), geom.n_slices, geom.height, geom.width, geom.pixel_area)
    assert_close_rel(out, expected, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backproject(geom, dtype):
    sino = rand(2, 3, geom.n_directions, geom.n_slices, dtype=dtype, seed=2)
    maps, w = geom.volume_maps(dtype=dtype), geom.weights.to(dtype)
    out = native.backproject(noncontig(sino), maps, w, SHAPE)
    expected = ref.backproject(sino.double(), maps.double(), w.double(), SHAPE)
    assert_close_rel(out, expected, TOL[dtype])


# Geometries that reach every path of the backprojection kernel: float32 voxel blocks of 4 columns x 2 rows
# reading windows of the sinogram row, with and without clamping (a stack that does not cover the volume);
# gathers where the taps of a block spread over more than 8 values (slices much finer than the voxels);
# column and row tails (W % 4 != 0, odd H); volumes narrower than a block.
BACKPROJECT_CASES = {
    "covering stack": dict(shape=(5, 10, 16)),
    "partial stack": dict(shape=(5, 9, 23), n_slices=7),
    "fine slices": dict(shape=(4, 6, 13), slice_spacing=0.15),
    "narrow": dict(shape=(3, 5, 3)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(BACKPROJECT_CASES))
def test_backproject_paths(case, dtype):
    kw = dict(BACKPROJECT_CASES[case])
    shape = kw.pop("shape")
    g = make_geometry(shape, spacing=(1.2, 1.0, 0.9), directions=DIRECTIONS, **kw)
    sino = rand(1, 2, g.n_directions, g.n_slices, dtype=dtype, seed=6)
    maps, w = g.volume_maps(dtype=dtype), g.weights.to(dtype)
    out = native.backproject(sino, maps, w, shape)
    expected = ref.backproject(sino.double(), maps.double(), w.double(), shape)
    assert_close_rel(out, expected, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backproject_nonfinite_maps(dtype):
    """A NaN or infinite map entry reads padding (zero), as in the reference, on every path."""
    shape = (3, 4, 9)
    g = make_geometry(shape, n_directions=4)
    maps, w = g.volume_maps(), g.weights
    maps[0, 0, 3] = math.nan
    maps[1, 0, 2] = math.inf
    maps[2, 0, 1] = 1e30
    sino = rand(1, 1, g.n_directions, g.n_slices, seed=7)
    expected = ref.backproject(sino, maps, w, shape)
    out = native.backproject(sino.to(dtype), maps.to(dtype), w.to(dtype), shape)
    assert_close_rel(out, expected, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backproject_slices(geom, dtype):
    stacks = rand(2, 3, geom.n_directions, geom.n_slices, geom.height, geom.width, dtype=dtype, seed=3)
    maps, w = geom.volume_maps(dtype=dtype), geom.weights.to(dtype)
    out = native.backproject_slices(noncontig(stacks), maps, w, SHAPE)
    expected = ref.backproject_slices(stacks.double(), maps.double(), w.double(), SHAPE)
    assert_close_rel(out, expected, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("out_size", [(5, 9, 11), (1, 6, 1)])  # size-1 axes: affine_grid puts them at 0
@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid behavior")
def test_affine_grid_sample(dtype, align_corners, out_size):
    vol = rand(2, 3, *SHAPE, dtype=dtype, seed=4)
    theta = random_theta(2).to(dtype)
    size = [2, 3, *out_size]
    out = native.affine_grid_sample(noncontig(vol), theta, size, align_corners)
    expected = F.grid_sample(vol.double(), F.affine_grid(theta.double(), size, align_corners=align_corners),
                             mode="bilinear", padding_mode="zeros", align_corners=align_corners)
    assert_close_rel(out, expected, TOL[dtype])


def test_affine_grid_sample_size_one_input():
    """A size-1 input axis (a single slice volume) as grid_sample treats it."""
    vol = rand(1, 2, 1, 6, 7)
    theta = random_theta(1, seed=3)
    theta[:, 2] = torch.tensor([0.0, 0.0, 0.1, 0.0], dtype=torch.float64)  # z stays on the slice
    for align in (False, True):
        size = [1, 2, 2, 5, 4]
        expected = ref.affine_grid_sample(vol, theta, size, align)
        assert_close_rel(native.affine_grid_sample(vol, theta, size, align), expected, 1e-10)


def test_ops_module_uses_cpu_backend(geom):
    """The geometry-level API with backend="cpu" and "auto" reaches the compiled kernels."""
    import tonno_fast
    from tonno_fast.backend import get_backend

    assert get_backend("auto", torch.device("cpu")) is native
    assert tonno_fast.backends()["cpu"] == "available"
    vol = rand(1, 1, *SHAPE)
    a = tonno_fast.radon(vol, geom, backend="cpu")
    b = tonno_fast.radon(vol, geom, backend="reference")
    assert_close_rel(a, b, 1e-10)


def test_build_info():
    info = native.build_info()
    assert set(info) == {"cuda", "cuda_arch", "openmp", "omp_max_threads", "torch_version"}
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["omp_max_threads"] >= 1
    assert isinstance(info["cuda_arch"], list) and (info["cuda"] or info["cuda_arch"] == [])


# ---------------------------------------------------------------------------------------------------------
# Adjoints: <A x, y> = <x, A^T y> in float64.

def _dot(a, b):
    return (a * b).sum().item()


def _check_adjoint(ax, y, x, aty):
    lhs, rhs = _dot(ax, y), _dot(x, aty)
    assert abs(lhs - rhs) <= 1e-10 * max(abs(lhs), abs(rhs), 1e-30), (lhs, rhs)


def test_adjoint_slice_volume(geom):
    x = rand(2, 3, *SHAPE)
    maps = geom.slice_maps()
    ax = ops.slice_volume(x, maps, geom.n_slices, geom.height, geom.width, 0.0, None)
    y = rand(*ax.shape, seed=5)
    _check_adjoint(ax, y, x, ops.slice_volume_backward(y, maps, list(SHAPE)))


def test_adjoint_radon(geom):
    x = rand(2, 3, *SHAPE)
    maps = geom.slice_maps()
    ax = ops.radon(x, maps, geom.n_slices, geom.height, geom.width, 0.37)
    y = rand(*ax.shape, seed=6)
    _check_adjoint(ax, y, x, ops.radon_backward(y, maps, geom.height, geom.width, 0.37, list(SHAPE)))


def test_adjoint_backproject(geom):
    x = rand(2, 3, geom.n_directions, geom.n_slices)
    maps, w = geom.volume_maps(), geom.weights
    ax = ops.backproject(x, maps, w, list(SHAPE))
    y = rand(*ax.shape, seed=7)
    _check_adjoint(ax, y, x, ops.backproject_backward(y, maps, w, geom.n_slices))


def test_adjoint_backproject_slices(geom):
    x = rand(2, 3, geom.n_directions, geom.n_slices, geom.height, geom.width)
    maps, w = geom.volume_maps(), geom.weights
    ax = ops.backproject_slices(x, maps, w, list(SHAPE))
    y = rand(*ax.shape, seed=8)
    _check_adjoint(ax, y, x, ops.backproject_slices_backward(y, maps, w, list(x.shape[3:])))


@pytest.mark.parametrize("align_corners", [False, True])
def test_adjoint_affine_grid_sample(align_corners):
    x = rand(2, 3, *SHAPE)
    theta = random_theta(2)
    ax = ops.affine_grid_sample(x, theta, [2, 3, 6, 8, 9], align_corners)
    y = rand(*ax.shape, seed=9)
    gv, gt = ops.affine_grid_sample_backward(y, x, theta, align_corners, True, False)
    assert gt.numel() == 0
    _check_adjoint(ax, y, x, gv)


# ---------------------------------------------------------------------------------------------------------
# Autograd: gradcheck in float64 (first and second order for the linear ops), gradients vs the reference.

def _slice_volume_fn(tiny):
    maps = tiny.slice_maps()
    return (rand(1, 2, *tiny.volume_shape),
            lambda v: native.slice_volume(v, maps, tiny.n_slices, tiny.height, tiny.width, 0.3))


def _radon_fn(tiny):
    maps = tiny.slice_maps()
    return rand(2, 1, *tiny.volume_shape), lambda v: native.radon(v, maps, tiny.n_slices, tiny.height, tiny.width, 0.5)


def _backproject_fn(tiny):
    maps, w = tiny.volume_maps(), tiny.weights
    return (rand(1, 2, tiny.n_directions, tiny.n_slices),
            lambda s: native.backproject(s, maps, w, tiny.volume_shape))


def _backproject_slices_fn(tiny):
    maps, w = tiny.volume_maps(), tiny.weights
    return (rand(1, 1, tiny.n_directions, tiny.n_slices, tiny.height, tiny.width),
            lambda s: native.backproject_slices(s, maps, w, tiny.volume_shape))


# The linear ops: (float64 input, op as a function of it) on the ``tiny`` geometry.
LINEAR_FNS = {"slice_volume": _slice_volume_fn, "radon": _radon_fn, "backproject": _backproject_fn,
              "backproject_slices": _backproject_slices_fn}


@pytest.mark.parametrize("op", list(LINEAR_FNS))
def test_gradcheck_linear(op, tiny):
    x, f = LINEAR_FNS[op](tiny)
    x.requires_grad_()
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("align_corners", [False, True])
def test_gradcheck_affine_grid_sample(align_corners):
    vol = rand(2, 2, 3, 4, 5).requires_grad_()
    theta = random_theta(2, seed=11).requires_grad_()
    f = lambda v, t: native.affine_grid_sample(v, t, [2, 2, 3, 3, 4], align_corners)  # noqa: E731
    assert torch.autograd.gradcheck(f, (vol, theta))


def test_affine_grid_sample_grads_match_reference():
    vol = rand(2, 3, *SHAPE).requires_grad_()
    theta = random_theta(2, seed=12).requires_grad_()
    size = [2, 3, 5, 6, 7]
    gout = rand(*size, seed=13)
    gv, gt = torch.autograd.grad(native.affine_grid_sample(vol, theta, size, False), (vol, theta), gout)
    ev, et = torch.autograd.grad(ref.affine_grid_sample(vol, theta, size, False), (vol, theta), gout)
    assert_close_rel(gv, ev, 1e-10)
    assert_close_rel(gt, et, 1e-10)


def test_slice_volume_grad_through_bf16_output(geom):
    """The gradient of a bf16 output arrives in bf16 and is returned in the volume's dtype."""
    vol = rand(1, 1, *SHAPE, dtype=torch.float32).requires_grad_()
    out = native.slice_volume(vol, geom.slice_maps(dtype=torch.float32), geom.n_slices, geom.height,
                              geom.width, 0.0, torch.bfloat16)
    out.float().sum().backward()
    assert vol.grad.dtype == torch.float32 and vol.grad.abs().sum() > 0


def test_maps_are_not_differentiable(tiny):
    maps = tiny.slice_maps().requires_grad_()
    x = rand(1, 1, *tiny.volume_shape).requires_grad_()
    out = native.slice_volume(x, maps, tiny.n_slices, tiny.height, tiny.width)
    with pytest.raises(RuntimeError, match="slice maps are not differentiable"):
        out.sum().backward()


# ---------------------------------------------------------------------------------------------------------
# torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch) on every op.

def _opcheck_samples(g):
    S, h, w, shape = g.n_slices, g.height, g.width, list(g.volume_shape)
    sm, vm, wt = g.slice_maps(), g.volume_maps(), g.weights
    N = g.n_directions
    vol = rand(1, 2, *shape)
    return [
        (ops.slice_volume, (vol, sm, S, h, w, 0.5, None)),
        (ops.slice_volume, (vol.float(), sm.float(), S, h, w, 0.0, torch.bfloat16)),
        (ops.slice_volume_backward, (rand(1, N, S, 2, h, w), sm, shape)),
        (ops.radon, (vol, sm, S, h, w, 2.0)),
        (ops.radon_backward, (rand(1, 2, N, S), sm, h, w, 2.0, shape)),
        (ops.backproject, (rand(1, 2, N, S), vm, wt, shape)),
        (ops.backproject_backward, (rand(1, 2, *shape), vm, wt, S)),
        (ops.backproject_slices, (rand(1, 2, N, S, h, w), vm, wt, shape)),
        (ops.backproject_slices_backward, (rand(1, 2, *shape), vm, wt, [S, h, w])),
        (ops.affine_grid_sample, (vol, random_theta(1), [1, 2, 2, 3, 4], False)),
        (ops.affine_grid_sample_backward, (rand(1, 2, 2, 3, 4), vol, random_theta(1), True, True, True)),
    ]


def test_opcheck(tiny):
    for op, args in _opcheck_samples(tiny):
        torch.library.opcheck(op, args)
        # Again with the differentiable input requiring grad (only for float outputs of the forward ops).
        if args[0].dtype == torch.float64 and op is not ops.affine_grid_sample_backward:
            grad_args = (args[0].clone().requires_grad_(),) + args[1:]
            if op is ops.affine_grid_sample:
                grad_args = (grad_args[0], args[1].clone().requires_grad_()) + args[2:]
            torch.library.opcheck(op, grad_args)


def test_torch_compile_fullgraph(tiny):
    """Smoke test: the ops trace into one graph (fake kernels) and run compiled (inductor), forward and
    backward. The graph holds only the custom ops (extern kernels), so inductor compiles no C++ here."""
    torch._dynamo.reset()
    maps = tiny.slice_maps()
    vmaps, w = tiny.volume_maps(), tiny.weights

    @torch.compile(fullgraph=True)
    def f(v):
        sino = ops.radon(v, maps, tiny.n_slices, tiny.height, tiny.width, 1.0)
        return ops.backproject(sino, vmaps, w, list(tiny.volume_shape))

    x = rand(1, 1, *tiny.volume_shape).requires_grad_()
    out = f(x)
    eager = ops.backproject(ops.radon(x, maps, tiny.n_slices, tiny.height, tiny.width, 1.0), vmaps, w,
                            list(tiny.volume_shape))
    assert torch.equal(out, eager)
    (g,) = torch.autograd.grad(out.sum(), x)
    (ge,) = torch.autograd.grad(eager.sum(), x)
    assert torch.equal(g, ge)


# ---------------------------------------------------------------------------------------------------------
# Determinism: backward (scatter) kernels give bitwise identical results run to run and for 1 or 2 threads.

def _backward_results():
    g = make_geometry((24, 17, 19), n_directions=6, slice_size=21, n_slices=25)
    sm, vm, w = g.slice_maps(dtype=torch.float32), g.volume_maps(dtype=torch.float32), g.weights.float()
    shape = list(g.volume_shape)
    N, S, h, wd = g.n_directions, g.n_slices, g.height, g.width
    theta = random_theta(2).float()
    vol = rand(2, 2, *shape, dtype=torch.float32)
    return [
        ops.slice_volume_backward(rand(2, N, S, 2, h, wd, dtype=torch.float32), sm, shape),
        ops.radon_backward(rand(2, 2, N, S, dtype=torch.float32), sm, h, wd, 1.0, shape),
        ops.backproject_backward(rand(2, 2, *shape, dtype=torch.float32), vm, w, S),
        ops.backproject_slices_backward(rand(2, 2, *shape, dtype=torch.float32), vm, w, [S, h, wd]),
        *ops.affine_grid_sample_backward(rand(2, 2, 20, 18, 16, dtype=torch.float32), vol, theta, False, True, True),
    ]


def test_backward_deterministic():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = _backward_results(), _backward_results()
        torch.set_num_threads(1)
        single = _backward_results()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: a RuntimeError naming the argument, never a crash.

def _bad_calls():
    vol = rand(1, 1, 4, 5, 6)
    maps = make_geometry((4, 5, 6), n_directions=2, slice_size=3, n_slices=3).slice_maps()
    w = torch.ones(2, dtype=torch.float64)
    return [
        ("volume", lambda: ops.slice_volume(vol[0], maps, 3, 3, 3, 0.0, None)),
        ("volume", lambda: ops.slice_volume(vol.long(), maps.long(), 3, 3, 3, 0.0, None)),
        ("maps", lambda: ops.slice_volume(vol, maps.float(), 3, 3, 3, 0.0, None)),
        ("maps", lambda: ops.slice_volume(vol, maps[:, :2], 3, 3, 3, 0.0, None)),
        ("n_slices", lambda: ops.slice_volume(vol, maps, 0, 3, 3, 0.0, None)),
        ("out_dtype", lambda: ops.slice_volume(vol, maps, 3, 3, 3, 0.0, torch.int32)),
        ("volume", lambda: ops.slice_volume(vol[:, :, :0], maps, 3, 3, 3, 0.0, None)),
        ("volume_shape", lambda: ops.slice_volume_backward(rand(1, 2, 3, 1, 3, 3), maps, [4, 5])),
        ("grad", lambda: ops.slice_volume_backward(rand(1, 3, 3, 1, 3, 3), maps, [4, 5, 6])),
        ("height", lambda: ops.radon(vol, maps, 3, -1, 3, 1.0)),
        ("volume_shape", lambda: ops.radon_backward(rand(1, 1, 2, 3), maps, 3, 3, 1.0, [4, 0, 6])),
        ("weights", lambda: ops.backproject(rand(1, 1, 2, 3), maps, w[:1], [4, 5, 6])),
        ("weights", lambda: ops.backproject(rand(1, 1, 2, 3), maps, w.float(), [4, 5, 6])),
        ("sinogram", lambda: ops.backproject(rand(1, 2, 3), maps, w, [4, 5, 6])),
        ("sinogram", lambda: ops.backproject(rand(1, 1, 3, 3), maps, w, [4, 5, 6])),
        ("n_slices", lambda: ops.backproject_backward(vol, maps, w, 0)),
        ("stacks", lambda: ops.backproject_slices(rand(1, 1, 2, 3, 3), maps, w, [4, 5, 6])),
        ("stack_shape", lambda: ops.backproject_slices_backward(vol, maps, w, [3, 3])),
        ("theta", lambda: ops.affine_grid_sample(vol, random_theta(2), [1, 1, 2, 2, 2], False)),
        ("size", lambda: ops.affine_grid_sample(vol, random_theta(1), [1, 2, 2, 2, 2], False)),
        ("size", lambda: ops.affine_grid_sample(vol, random_theta(1), [1, 1, 2, 0, 2], False)),
        ("grad", lambda: ops.affine_grid_sample_backward(rand(1, 2, 2, 2, 2), vol, random_theta(1), False, True,
                                                         True)),
    ]


@pytest.mark.parametrize("arg,call", _bad_calls(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs(arg, call):
    with pytest.raises(RuntimeError, match=arg):
        call()
