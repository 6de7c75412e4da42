"""``slice_volume``: oblique slices, volume ``(B, C, D, H, W)`` → ``(B, N, S, C, h, w)``, ``out[b,n,k,c,i,j] =
trilinear(volume[b,c], slice_maps[n] @ (k,i,j,1))`` with corners outside reading ``fill``, and its adjoint
``slice_volume_backward`` (docs/design.md, "Operators")."""
import pytest
import torch

import tonno_fast as tf
from harness import (GEOMETRIES, REFERENCE, TOL, against_reference, assert_adjoint, assert_close_elementwise,
                     assert_compiles, assert_deterministic, assert_raises, assert_rejects,
                     deterministic_against_reference, fuzz_against_reference, geometry, gradcheck, noncontig, opcheck,
                     rand, ulp)
from harness import backend, kernels  # noqa: F401  (pytest fixtures)
from tonno_fast import ops


def slice_volume(g, fill=0.0, out_dtype=None):
    """``slice_volume`` of geometry ``g`` on a backend module, maps in the input's dtype and on its device."""
    return lambda be, v: be.slice_volume(v, g.slice_maps(dtype=v.dtype, device=v.device), g.n_slices, g.height,
                                         g.width, fill, out_dtype)


# ---------------------------------------------------------------------------------------------------------
# The reference.

def test_reference_axial_slice_at_offset_zero_is_the_middle_image():
    torch.manual_seed(0)
    vol = torch.randn(2, 3, 7, 9, 11, dtype=torch.float64)
    g = tf.make_geometry((7, 9, 11), directions=[[0, 0, 1]], n_slices=7, slice_size=(9, 11), pixel_spacing=1.0)
    s = tf.slice_volume(vol, g, backend="reference")  # (B,N,S,C,h,w)
    assert s.shape == (2, 1, 7, 3, 9, 11)
    torch.testing.assert_close(s[:, 0, 3], vol[:, :, 3], rtol=0, atol=1e-14)
    torch.testing.assert_close(s[:, 0].transpose(1, 2), vol, rtol=0, atol=1e-14)


def test_reference_fill_value_outside():
    vol = torch.ones(1, 1, 4, 4, 4, dtype=torch.float64)
    g = tf.make_geometry((4, 4, 4), directions=[[0, 0, 1]], n_slices=3, slice_size=8, pixel_spacing=1.0,
                         slice_spacing=10.0)
    s = tf.slice_volume(vol, g, fill=-5.0, backend="reference")[0, 0, :, 0]
    assert float(s[0].max()) == -5.0 and float(s[2].min()) == -5.0  # slices at ±10 mm miss the volume
    assert float(s[1, 4, 4]) == 1.0 and float(s[1, 0, 0]) == -5.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_adjoint_via_autograd(dtype):
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


# ---------------------------------------------------------------------------------------------------------
# Kernels against the reference.

@pytest.mark.parametrize("fill", [0.0, -0.7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("geom", ["special", "odd", "vec", "small"])
def test_matches_reference(kernels, geom, dtype, fill):
    """Forward and backward (fill is a constant: no gradient) of a non-contiguous volume, B = 2, C = 3."""
    g = geometry(geom, kernels)
    out = against_reference(kernels, slice_volume(g, fill), noncontig(rand(2, 3, *g.volume_shape, dtype=dtype)))
    assert out.shape == (2, g.n_directions, g.n_slices, 3, g.height, g.width)
    assert out.dtype == dtype and out.is_contiguous()
    if fill != 0.0:  # the slices cover the bounding sphere: pixels wholly outside read exactly `fill`
        assert bool((out == fill).any())


def test_volume_with_batch_and_channels_swapped_in_memory(kernels):
    g = geometry("small", kernels)
    vol = rand(3, 2, *g.volume_shape).transpose(0, 1)  # (2, 3, D, H, W), not contiguous
    against_reference(kernels, slice_volume(g), vol)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geom", ["special", "odd", "vec", "small"])
def test_low_precision_output(kernels, geom, dtype, out_dtype):
    """bf16/fp16 written directly: the value computed in the volume's dtype, rounded once (via float32)."""
    g = geometry(geom, kernels)
    vol = rand(1, 2, *g.volume_shape, dtype=dtype, device=kernels.device)
    out = slice_volume(g, 0.5, out_dtype)(kernels.module, vol)
    full = slice_volume(g, 0.5)(kernels.module, vol)
    exact = slice_volume(g, 0.5)(REFERENCE, vol.cpu().double())
    assert out.dtype == out_dtype and out.shape == full.shape
    # Within one ulp of out_dtype of the kernel's own result, up to the float32 tolerance of every other
    # test (FMA contraction differs between the instantiations, visible where v and fill (1 - Σw) nearly
    # cancel), and nearly always exactly that result rounded.
    f32_rounding = TOL[torch.float32] * full.abs().max()
    assert ((out.float() - full.float()).abs() <= ulp(out) + f32_rounding).all()
    # The C++ kernels round to nearest: nearly always exactly the float result rounded, and at most half an ulp
    # of the output format (relative) from the exact value beyond the float32 tolerance. (Triton's interpreter
    # truncates when it converts to 16 bits: up to one ulp.)
    if kernels.name == "cpu":
        assert (out == full.to(out_dtype)).float().mean() > 0.99
    if kernels.name != "triton":
        rel = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[out_dtype]
        excess = (out.double().cpu() - exact).abs() - rel * exact.abs()
        assert float(excess.max()) <= TOL[torch.float32] * float(exact.abs().max()), float(excess.max())
    eps = torch.finfo(out_dtype).eps
    torch.testing.assert_close(out.cpu().double(), exact, rtol=eps, atol=eps * float(exact.abs().max()) / 4)


def test_gradient_through_low_precision_output(kernels):
    """The gradient of a bf16 output arrives in bf16 and is returned in the volume's dtype."""
    g = geometry("small", kernels)
    v = rand(1, 1, *g.volume_shape, dtype=torch.float32, device=kernels.device).requires_grad_()
    out = slice_volume(g, 0.0, torch.bfloat16)(kernels.module, v)
    cot = rand(*out.shape, dtype=torch.float32, seed=2, device=kernels.device).to(torch.bfloat16)
    (grad,) = torch.autograd.grad(out, v, cot)
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0
    v2 = v.detach().cpu().requires_grad_()
    ref = slice_volume(g)(REFERENCE, v2)
    assert_close_elementwise(grad, torch.autograd.grad(ref, v2, cot.float().cpu())[0])


def test_adjoint(kernels):
    """``<A x, y> = <x, Aᵀ y>`` with the registered adjoint op, float64."""
    g = geometry("small", kernels)
    maps = kernels.to(g.slice_maps())
    x = rand(2, 3, *g.volume_shape, device=kernels.device)
    ax = kernels.op("slice_volume")(x, maps, g.n_slices, g.height, g.width, 0.0, None)
    y = rand(*ax.shape, seed=5, device=kernels.device)
    assert_adjoint(ax, y, x, kernels.op("slice_volume_backward")(y, maps, list(g.volume_shape)), 1e-11)


def test_gradcheck(kernels):
    g = geometry("tiny", kernels)
    gradcheck(lambda v: slice_volume(g, 0.3)(kernels.module, v), [rand(1, 2, *g.volume_shape)], kernels)


def test_maps_are_not_differentiable(kernels):
    g = geometry("tiny", kernels)
    maps = kernels.to(g.slice_maps()).requires_grad_()
    x = rand(1, 1, *g.volume_shape, device=kernels.device).requires_grad_()
    out = kernels.op("slice_volume")(x, maps, g.n_slices, g.height, g.width, 0.0, None)
    with pytest.raises(RuntimeError, match="slice maps are not differentiable"):
        out.sum().backward()


def test_opcheck(kernels):
    g = geometry("tiny", kernels)
    S, h, w, shape, N = g.n_slices, g.height, g.width, list(g.volume_shape), g.n_directions
    sm = kernels.to(g.slice_maps())
    vol = rand(1, 2, *shape, device=kernels.device)
    ns = kernels.namespace
    fusions = (None, 1) if kernels.name == "triton" else ()
    opcheck(ns.slice_volume.default, (vol, sm, S, h, w, 0.5, None, *fusions), grad_args=(0,))
    opcheck(ns.slice_volume.default, (vol, sm, S, h, w, 0.0, torch.float32, *fusions), grad_args=(0,))
    opcheck(ns.slice_volume.default, (vol.float(), sm.float(), S, h, w, 0.0, torch.bfloat16, *fusions))
    opcheck(ns.slice_volume_backward.default, (rand(1, N, S, 2, h, w, device=kernels.device), sm, shape),
            grad_args=(0,))
    if kernels.name == "triton":  # the channel replication is linear and differentiable too
        opcheck(ns.slice_volume.default, (vol[:, :1], sm, S, h, w, 0.0, None, None, 3), grad_args=(0,))


def test_compiles(kernels):
    """slice → per-slice score → backproject, as the ToNNO pipeline does."""
    g = geometry("small", kernels)
    sm, vm, w = kernels.to(g.slice_maps(), g.volume_maps(), g.weights)

    def f(vol):
        scores = kernels.op("slice_volume")(vol, sm, g.n_slices, g.height, g.width, 0.0, None).sum(dim=(-2, -1))
        return kernels.op("backproject")(scores[..., 0][:, None], vm, w, list(g.volume_shape))

    assert_compiles(f, rand(1, 1, *g.volume_shape, seed=67, device=kernels.device),
                    "aot_eager" if kernels.name == "triton" else "inductor", exact=False)


def test_deterministic(kernels):
    """The forward (a gather) bitwise reproducible; the CPU adjoint too, for any thread count; under
    ``torch.use_deterministic_algorithms(True)`` both, on every implementation (the GPU adjoints' deterministic
    path)."""
    g = geometry("tiny" if kernels.interpreted else "small", kernels)
    sm = kernels.to(g.slice_maps(dtype=torch.float32))
    vol = rand(2, 2, *g.volume_shape, dtype=torch.float32, device=kernels.device)
    grad = rand(2, g.n_directions, g.n_slices, 2, g.height, g.width, dtype=torch.float32, device=kernels.device)
    assert_deterministic(kernels, lambda: kernels.op("slice_volume")(vol, sm, g.n_slices, g.height, g.width, 0.0, None),
                         lambda: kernels.op("slice_volume_backward")(grad, sm, list(g.volume_shape)))


@pytest.mark.parametrize("chunk", [None, 1, 200, 1000])
def test_deterministic_adjoint_matches_reference(kernels, chunk, monkeypatch):
    """Under ``torch.use_deterministic_algorithms(True)`` the adjoint runs everywhere, equals the reference's
    (float64) and repeats bit for bit, in one chunk or in many (``chunk`` slots each; 1: fewer than one
    (slice, channel) pair needs, so one pair per chunk: the bound is max(chunk, 8·h·w) slots)."""
    g = geometry("tiny" if kernels.interpreted else "small", kernels)
    deterministic_against_reference(kernels, slice_volume(g, fill=0.3), rand(1, 2, *g.volume_shape, seed=5), chunk,
                                    monkeypatch)


# ---------------------------------------------------------------------------------------------------------
# Exact cases.

def test_axial_slices_are_the_volume_exactly(kernels):
    # n = e_z at the voxel grid: every coordinate is an integer, up to the last index of each axis (where the
    # upper tap is invalid with weight 0), so the slices are the volume's planes bit for bit; backprojecting
    # them (weight 1) gives the volume back bit for bit too.
    shape = GEOMETRIES["small"].volume_shape
    g = tf.make_geometry(shape, directions=[[0, 0, 1]], n_slices=9, slice_size=(10, 11), pixel_spacing=1.0)
    sm, vm = kernels.to(g.slice_maps(), g.volume_maps())
    vol = rand(1, 2, *shape, seed=89, device=kernels.device)
    out = kernels.op("slice_volume")(vol, sm, 9, 10, 11, 0.0, None)
    assert torch.equal(out[:, 0].transpose(1, 2), vol)
    back = kernels.op("backproject_slices")(out.permute(0, 3, 1, 2, 4, 5), vm,
                                            kernels.to(torch.ones(1, dtype=torch.float64)), list(shape))
    assert torch.equal(back, vol)


def test_nan_maps_read_nothing(kernels):
    # NaN coordinates must fail the bounds test (NaN-safe comparison) and read `fill`, never index garbage.
    shape = GEOMETRIES["small"].volume_shape
    vol = rand(1, 1, *shape, device=kernels.device)
    maps = torch.zeros(1, 3, 4, dtype=torch.float64)
    maps[0, :, 3] = torch.tensor([float("nan"), 4.0, 5.0])
    maps = kernels.to(maps)
    out = kernels.op("slice_volume")(vol, maps, 2, 3, 4, 0.5, None)
    assert bool((out == 0.5).all())
    v = vol.clone().requires_grad_()
    (grad,) = torch.autograd.grad(kernels.op("slice_volume")(v, maps, 2, 3, 4, 0.0, None).sum(), v)
    assert bool((grad == 0).all())


# ---------------------------------------------------------------------------------------------------------
# Triton's encoder-input fusions.

def _triton(kernels):
    if kernels.name != "triton":
        pytest.skip("a Triton-only fusion")
    return kernels.module


def test_window_and_channel_replication(kernels):
    TB, g = _triton(kernels), GEOMETRIES["small"]
    dtype = torch.float32
    sm = kernels.to(g.slice_maps(dtype=dtype))
    vol = 100 * rand(1, 1, *g.volume_shape, dtype=dtype, device=kernels.device)
    args = (g.n_slices, g.height, g.width, -50.0)
    out = TB.slice_volume(vol, sm, *args, torch.bfloat16, window=(-40.0, 120.0), replicate_channels=3)
    ref = REFERENCE.slice_volume(vol.cpu(), sm.cpu(), *args)
    expect = ((ref.clamp(-40.0, 120.0) + 40.0) / 160.0).repeat_interleave(3, dim=3)
    assert out.shape == (1, 3, 5, 3, 6, 7) and out.dtype == torch.bfloat16
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0  # the window saturates at both ends
    torch.testing.assert_close(out.float().cpu(), expect, rtol=2 ** -8, atol=2 ** -9)

    with pytest.raises(ValueError, match="inference-only"):
        TB.slice_volume(vol.clone().requires_grad_(), sm, *args, window=(-40.0, 120.0))
    with pytest.raises(ValueError, match="lo < hi"):
        TB.slice_volume(vol, sm, *args, window=(1.0, 1.0))


def test_replicated_channels_gradient(kernels):
    TB, g = _triton(kernels), GEOMETRIES["small"]

    def sliced(be, v):  # the fusion on Triton, the copies made afterwards on the reference
        sm = g.slice_maps(dtype=v.dtype, device=v.device)
        if be is TB:
            return TB.slice_volume(v, sm, g.n_slices, g.height, g.width, replicate_channels=3)
        return be.slice_volume(v, sm, g.n_slices, g.height, g.width).repeat_interleave(3, dim=3)

    against_reference(kernels, sliced, rand(1, 2, *g.volume_shape), seed=5)


# ---------------------------------------------------------------------------------------------------------
# Bad arguments.

def _bad_calls():
    g = GEOMETRIES["small"]
    shape, S, h, w, N = list(g.volume_shape), g.n_slices, g.height, g.width, g.n_directions
    vol, maps = rand(1, 1, *shape), g.slice_maps()
    grad = rand(1, N, S, 1, h, w)
    return [
        ("volume", lambda op: op("slice_volume")(vol[0], maps, S, h, w, 0.0, None)),
        ("volume", lambda op: op("slice_volume")(vol.long(), maps.long(), S, h, w, 0.0, None)),
        ("volume", lambda op: op("slice_volume")(vol[:, :, :0], maps, S, h, w, 0.0, None)),
        ("volume", lambda op: op("slice_volume")(vol[:0], maps, S, h, w, 0.0, None)),
        ("maps", lambda op: op("slice_volume")(vol, maps.float(), S, h, w, 0.0, None)),
        ("maps", lambda op: op("slice_volume")(vol, maps[:, :2], S, h, w, 0.0, None)),
        ("maps", lambda op: op("slice_volume")(vol, maps[:, :, :3], S, h, w, 0.0, None)),
        ("maps", lambda op: op("slice_volume")(vol, maps[:0], S, h, w, 0.0, None)),
        ("n_slices", lambda op: op("slice_volume")(vol, maps, 0, h, w, 0.0, None)),
        ("height", lambda op: op("slice_volume")(vol, maps, S, -2, w, 0.0, None)),
        ("width", lambda op: op("slice_volume")(vol, maps, S, h, 0, 0.0, None)),
        ("out_dtype", lambda op: op("slice_volume")(vol, maps, S, h, w, 0.0, torch.int32)),
        ("grad", lambda op: op("slice_volume_backward")(grad[0], maps, shape)),
        ("grad|maps", lambda op: op("slice_volume_backward")(grad, maps[:2], shape)),
        ("volume_shape", lambda op: op("slice_volume_backward")(grad, maps, shape[:2])),
        ("volume_shape", lambda op: op("slice_volume_backward")(grad, maps, [5, -6, 7])),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_rejects_bad_arguments(kernels, case):
    pattern, call = _bad_calls()[case]
    assert_rejects(lambda: call(kernels.call), pattern)


def test_rejects_maps_on_another_device(kernels):
    """maps on another device than the volume (meta stands in for a GPU on CPU-only machines)."""
    g = GEOMETRIES["small"]
    vol = rand(1, 1, *g.volume_shape, dtype=torch.float32, device=kernels.device)
    with pytest.raises(RuntimeError, match=r"maps|device"):
        kernels.op("slice_volume")(vol, g.slice_maps(dtype=torch.float32).to("meta"), g.n_slices, g.height,
                                   g.width, 0.0, None)
        # A fake kernel that accepts the mix still must not return a CPU result computed from meta maps.
        raise RuntimeError("maps on meta with a CPU volume was accepted")
    if kernels.device.type == "cuda":
        with pytest.raises(RuntimeError, match="maps must be on the device of volume"):
            kernels.op("slice_volume")(vol, g.slice_maps(dtype=torch.float32), g.n_slices, g.height, g.width,
                                       0.0, None)


def test_fake_kernel_beyond_int32(kernels):
    vol = torch.empty(1, 3, 4, 4, 4, device="meta")
    maps = torch.empty(2, 3, 4, device="meta")
    out = kernels.op("slice_volume")(vol, maps, 2 ** 11, 2 ** 10, 2 ** 10, 0.0, None)
    assert tuple(out.shape) == (1, 2, 2 ** 11, 3, 2 ** 10, 2 ** 10) and out.device.type == "meta"


def test_public_op_shapes_beyond_int32_on_meta():
    """Shape arithmetic for outputs with more than 2^31 elements (meta tensors: nothing is allocated)."""
    geom = tf.make_geometry((8, 8, 8), n_directions=2, n_slices=2 ** 11, slice_size=2 ** 10)
    vol = torch.empty(1, 2, 8, 8, 8, device="meta")
    out = ops.slice_volume(vol, geom, backend="reference")
    assert out.shape == (1, 2, 2 ** 11, 2, 2 ** 10, 2 ** 10) and out.numel() == 2 ** 33


_G = GEOMETRIES["small"]
_V5 = rand(1, 1, *_G.volume_shape, dtype=torch.float32)


@pytest.mark.parametrize("call, exc, pattern", [
    pytest.param(lambda: ops.slice_volume(_V5.int(), _G), TypeError,
                 r"volume must be float32 or float64, got torch.int32", id="int"),
    pytest.param(lambda: ops.slice_volume(_V5.half(), _G), TypeError,
                 r"volume must be float32 or float64, got torch.float16", id="half"),
    pytest.param(lambda: ops.slice_volume(_V5[0, 0], _G), ValueError, r"volume must have shape \(B, C, D, H, W\)",
                 id="rank_3"),
    pytest.param(lambda: ops.slice_volume(torch.rand(1, 1, 9, 10, 12), _G), ValueError,
                 r"volume has spatial shape \(9, 10, 12\) but the geometry was made for \(9, 10, 11\)",
                 id="shape_mismatch"),
    pytest.param(lambda: ops.slice_volume(torch.rand(0, 1, *_G.volume_shape), _G), ValueError,
                 r"volume must not be empty", id="empty_batch"),
    pytest.param(lambda: ops.slice_volume(_V5, _G, out_dtype=torch.int32), TypeError,
                 r"out_dtype must be None or one of", id="out_dtype_int"),
    pytest.param(lambda: ops.slice_volume(_V5, _G, fill=float("inf")), ValueError, r"fill must be finite",
                 id="fill_inf"),
    pytest.param(lambda: ops.slice_volume(_V5, "geometry"), TypeError, r"geometry must be a tonno_fast.Geometry",
                 id="not_geometry"),
    pytest.param(lambda: ops.slice_volume(_V5.numpy(), _G), TypeError, r"volume must be a torch.Tensor",
                 id="not_tensor"),
])
def test_public_op_rejects(call, exc, pattern):
    assert_raises(call, exc, pattern)


# ---------------------------------------------------------------------------------------------------------
# Fuzzing: random geometries against the reference.

def test_fuzz_against_reference(kernels):
    fuzz_against_reference(kernels, lambda case, g: case.rand(case.batch, case.channels, *case.shape),
                           lambda case, g: lambda v, backend: ops.slice_volume(v, g, fill=case.fill, backend=backend))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_fuzz_low_precision_output(kernels, out_dtype):
    """bf16/fp16 output: the float result rounded once (at most one unit in the last place apart)."""
    fuzzing = pytest.importorskip("fuzzing")  # hypothesis
    backend_name = kernels.name

    @fuzzing.fuzz(backend_name, n_examples=max(1, fuzzing.N_EXAMPLES // 4), regressions=False)
    def check(case):
        g = case.geometry()
        v = case.rand(case.batch, case.channels, *case.shape).to(fuzzing.device(backend_name))
        got = ops.slice_volume(v, g, fill=case.fill, out_dtype=out_dtype, backend=backend_name)
        exact = ops.slice_volume(v.cpu(), g, fill=case.fill, backend="reference")
        assert got.dtype == out_dtype and got.shape == exact.shape
        eps = torch.finfo(out_dtype).eps  # relative spacing of the low-precision format
        scale = max(1.0, float(exact.abs().max()))
        torch.testing.assert_close(got.cpu().to(exact.dtype), exact, rtol=eps, atol=eps * 1e-2 * scale)
    check()
