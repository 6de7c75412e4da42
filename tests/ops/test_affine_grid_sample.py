"""``affine_grid_sample``: ``F.grid_sample(volume, F.affine_grid(theta, size, align_corners), "bilinear", "zeros",
align_corners)`` for volume ``(N, C, D, H, W)`` and ``theta`` ``(N, 3, 4)`` without the grid, differentiable in both,
and its backward ``affine_grid_sample_backward``. ``theta`` is folded into index-space maps by
``geometry.affine_theta_maps``; the C++ kernels are those of ``affine_sample`` (docs/design.md, "Operators")."""
import math

import pytest
import torch
import torch.nn.functional as F

import tonno_fast as tf
from harness import (REFERENCE, assert_adjoint, assert_close_rel, assert_compiles, assert_deterministic, assert_matches,
                     assert_raises, assert_rejects, deterministic_against_reference, deterministic_algorithms,
                     gradcheck, noncontig, opcheck, rand, random_theta)
from harness import backend, kernels  # noqa: F401  (pytest fixtures)
from tonno_fast import ops
from tonno_fast.geometry import affine_theta_grad, affine_theta_maps

SHAPE = (7, 13, 21)
SMALL = (7, 6, 5)


def _grid_sample(volume, theta, size, align_corners):
    return F.grid_sample(volume, F.affine_grid(theta, size, align_corners=align_corners), mode="bilinear",
                         padding_mode="zeros", align_corners=align_corners)


def _grads(fn, volume, theta, cotangent):
    v, t = volume.detach().clone().requires_grad_(), theta.detach().clone().requires_grad_()
    y = fn(v, t)
    return (y.detach(), *torch.autograd.grad(y, (v, t), cotangent.to(device=y.device, dtype=y.dtype)))


# ---------------------------------------------------------------------------------------------------------
# The fold of theta into index-space maps (tonno_fast.geometry).

@pytest.mark.parametrize("align_corners", [False, True])
def test_theta_maps_place_the_samples_of_affine_grid(align_corners):
    """``M @ (d_o, h_o, w_o, 1)`` is grid_sample's unnormalised index of ``affine_grid``'s sample, size-1 axes
    included; the gradient map is the transpose of the fold (``<M(θ) − M(0), G> = <θ, grad(G)>``)."""
    theta, in_shape = random_theta(2, seed=3), (6, 7, 8)
    for out_shape in ((5, 4, 3), (1, 4, 1)):
        size = [2, 1, *out_shape]
        grid = F.affine_grid(theta, size, align_corners=align_corners)  # (N, D, H, W, 3) x, y, z
        n = torch.tensor(in_shape[::-1], dtype=torch.float64)
        expect = (grid + 1) / 2 * (n - 1) if align_corners else ((grid + 1) * n - 1) / 2
        maps = affine_theta_maps(theta, in_shape, out_shape, align_corners)
        idx = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in out_shape], indexing="ij"),
                          -1)
        got = torch.einsum("nrc,dhwc->ndhwr", maps[:, :, :3], idx) + maps[:, None, None, None, :, 3]
        torch.testing.assert_close(got.flip(-1), expect, rtol=0, atol=1e-12)
        G = rand(2, 3, 4, seed=4)
        zero = affine_theta_maps(torch.zeros_like(theta), in_shape, out_shape, align_corners)
        lhs = float(((maps - zero) * G).sum())
        rhs = float((theta * affine_theta_grad(G, in_shape, out_shape, align_corners, torch.float64)).sum())
        assert abs(lhs - rhs) <= 1e-12 * max(abs(lhs), 1.0)


def test_reference_is_grid_sample():
    torch.manual_seed(0)
    vol = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64)
    theta = torch.randn(2, 3, 4, dtype=torch.float64) * 0.5
    out = tf.affine_grid_sample(vol, theta, (2, 3, 4, 5, 6), align_corners=True, backend="reference")
    grid = torch.nn.functional.affine_grid(theta, (2, 3, 4, 5, 6), align_corners=True)
    torch.testing.assert_close(out, torch.nn.functional.grid_sample(vol, grid, align_corners=True))


# ---------------------------------------------------------------------------------------------------------
# Kernels against grid_sample.

@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid behavior")  # size-1 axes, align_corners
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("out_size", [(5, 9, 11), (1, 6, 1), (6, 7, 8), (1, 9, 5), (5, 6, 7), (1, 4, 3)])
def test_matches_grid_sample(kernels, dtype, align_corners, out_size):
    """Forward, volume and theta gradients against PyTorch's grid_sample in float64; a size-1 output axis sits
    at normalised 0. A non-contiguous volume."""
    if kernels.interpreted and max(out_size) > 7:
        pytest.skip("too large for the Triton interpreter")
    vol = noncontig(rand(2, 3, *(SMALL if kernels.interpreted else SHAPE), dtype=dtype, seed=4))
    theta = random_theta(2).to(dtype)
    size = [2, 3, *out_size]
    cot = rand(*size, seed=41)
    y, gv, gt = _grads(lambda v, t: kernels.module.affine_grid_sample(v, t, size, align_corners),
                       kernels.to(vol), kernels.to(theta), cot)
    y0, gv0, gt0 = _grads(lambda v, t: _grid_sample(v, t, size, align_corners), vol.double(), theta.double(), cot)
    assert y.dtype == dtype
    for got, expect in ((y, y0), (gv, gv0), (gt, gt0)):
        assert_matches(kernels, got, expect.to(dtype))
    # Volume-only gradient (theta constant) takes the path without the theta reduction.
    v = kernels.to(vol).detach().requires_grad_()
    y = kernels.module.affine_grid_sample(v, kernels.to(theta), size, align_corners)
    (gv_only,) = torch.autograd.grad(y, v, kernels.to(cot.to(dtype)))
    assert_matches(kernels, gv_only, gv0.to(dtype))


def test_size_one_input(kernels):
    """A size-1 input axis (a single slice volume) as grid_sample treats it."""
    vol = rand(1, 2, 1, 6, 7, device=kernels.device)
    theta = random_theta(1, seed=3)
    theta[:, 2] = torch.tensor([0.0, 0.0, 0.1, 0.0], dtype=torch.float64)  # z stays on the slice
    for align in (False, True):
        size = [1, 2, 2, 5, 4]
        expected = REFERENCE.affine_grid_sample(vol.cpu(), theta, size, align)
        assert_close_rel(kernels.module.affine_grid_sample(vol, kernels.to(theta), size, align), expected, 1e-10)


def test_geometry_level_op(backend):
    vol = rand(2, 2, *SMALL, device=backend.device)
    theta = backend.to(random_theta(2, seed=1))
    assert_matches(backend, tf.affine_grid_sample(vol, theta, (2, 2, 4, 3, 5), backend=backend.name),
                   _grid_sample(vol.cpu(), theta.cpu(), (2, 2, 4, 3, 5), False))


@pytest.mark.parametrize("align_corners", [False, True])
def test_backward_op(kernels, align_corners):
    """The backward op called directly: the volume gradient is the adjoint of the forward (dot-product test);
    each gradient asked for alone equals the one computed with the other, and one not asked for is empty."""
    vol = rand(2, 3, *SMALL, device=kernels.device)
    theta = kernels.to(random_theta(2))
    size = [2, 3, 4, 5, 3]
    ax = kernels.op("affine_grid_sample")(vol, theta, size, align_corners)
    y = rand(*ax.shape, seed=9, device=kernels.device)
    gv, gt = kernels.op("affine_grid_sample_backward")(y, vol, theta, align_corners, True, True)
    assert_adjoint(ax, y, vol, gv, 1e-11)
    gv_only, gt_none = kernels.op("affine_grid_sample_backward")(y, vol, theta, align_corners, True, False)
    assert gt_none.numel() == 0 and torch.equal(gv_only, gv)
    gv_none, gt_only = kernels.op("affine_grid_sample_backward")(y, vol, theta, align_corners, False, True)
    assert gv_none.numel() == 0
    torch.testing.assert_close(gt_only, gt, rtol=0, atol=0)


@pytest.mark.parametrize("align_corners", [False, True])
def test_gradcheck(kernels, align_corners):
    vol, theta = rand(2, 2, 3, 4, 5), random_theta(2, seed=11)
    gradcheck(lambda v, t: kernels.module.affine_grid_sample(v, t, [2, 2, 3, 3, 4], align_corners), [vol, theta],
              kernels, second_order=False)


def test_opcheck(kernels):
    ns = kernels.namespace
    vol, theta = rand(1, 2, 4, 5, 3, device=kernels.device), kernels.to(random_theta(1))
    opcheck(ns.affine_grid_sample.default, (vol, theta, [1, 2, 2, 3, 4], False), grad_args=(0, 1))
    opcheck(ns.affine_grid_sample_backward.default,
            (rand(1, 2, 2, 3, 4, device=kernels.device), vol, theta, True, True, True))
    if kernels.name != "triton":  # the C++ kernels behind it
        maps = affine_theta_maps(theta, vol.shape[2:], (2, 3, 4), False)
        opcheck(ns.affine_sample.default, (vol, maps, [1, 2, 2, 3, 4]))
        opcheck(ns.affine_sample_backward.default, (rand(1, 2, 2, 3, 4, device=kernels.device), vol, maps, True,
                                                    True))


def test_compiles(kernels):
    theta = kernels.to(random_theta(2))
    assert_compiles(lambda v: kernels.op("affine_grid_sample")(v, theta, [2, 1, 3, 4, 2], False),
                    rand(2, 1, 4, 3, 5, device=kernels.device), "aot_eager" if kernels.name == "triton" else "inductor")


def test_deterministic(kernels):
    """The forward and the theta gradient (a reduction in a fixed order) are bitwise reproducible everywhere;
    the volume gradient too on the CPU, whatever the thread count, and everywhere under
    ``torch.use_deterministic_algorithms(True)`` (the GPU scatter's deterministic path), alone or with the theta
    gradient, which it leaves unchanged."""
    vol = rand(2, 2, *SMALL, dtype=torch.float32, device=kernels.device)
    theta = kernels.to(random_theta(2).float())
    grad = rand(2, 2, 4, 3, 5, dtype=torch.float32, device=kernels.device)
    op, bwd = kernels.op("affine_grid_sample"), kernels.op("affine_grid_sample_backward")
    assert_deterministic(kernels, lambda: op(vol, theta, [2, 2, 4, 3, 5], False),
                         lambda: bwd(grad, vol, theta, False, True, True))
    theta_only = bwd(grad, vol, theta, False, False, True)[1]
    with deterministic_algorithms():
        assert torch.equal(bwd(grad, vol, theta, False, False, True)[1], theta_only)
        assert torch.equal(bwd(grad, vol, theta, False, True, True)[1], theta_only)
        assert torch.equal(bwd(grad, vol, theta, False, True, False)[0], bwd(grad, vol, theta, False, True, True)[0])


@pytest.mark.parametrize("chunk", [None, 200, 1000])  # 1 slot a chunk: see test_slice_volume
def test_deterministic_adjoint_matches_reference(kernels, chunk, monkeypatch):
    """Under ``torch.use_deterministic_algorithms(True)`` the volume gradient runs everywhere, equals the
    reference's (float64) and repeats bit for bit, in one chunk or in many."""
    theta = random_theta(2, seed=2)
    fn = lambda be, v: be.affine_grid_sample(v, theta.to(v), [2, 2, 4, 3, 5], False)  # noqa: E731
    deterministic_against_reference(kernels, fn, rand(2, 2, *SMALL, seed=9), chunk, monkeypatch)


# ---------------------------------------------------------------------------------------------------------
# Bad arguments.

_VOL = rand(1, 1, 4, 5, 6)
_VAGS = rand(2, 1, 3, 4, 5, dtype=torch.float32)
_THETA = torch.eye(3, 4).expand(2, 3, 4).clone()

_BAD_CALLS = [
    ("theta", lambda op: op("affine_grid_sample")(_VOL, random_theta(2), [1, 1, 2, 2, 2], False)),
    ("theta", lambda op: op("affine_grid_sample")(_VAGS, _THETA[:, :, :3], [2, 1, 3, 3, 3], False)),
    ("theta", lambda op: op("affine_grid_sample")(_VAGS, _THETA[:1], [2, 1, 3, 3, 3], False)),
    ("theta", lambda op: op("affine_grid_sample")(_VAGS, _THETA.double(), [2, 1, 3, 3, 3], False)),
    ("size", lambda op: op("affine_grid_sample")(_VOL, random_theta(1), [1, 2, 2, 2, 2], False)),
    ("size", lambda op: op("affine_grid_sample")(_VOL, random_theta(1), [1, 1, 2, 0, 2], False)),
    ("size", lambda op: op("affine_grid_sample")(_VAGS, _THETA, [2, 1, 3, 3], False)),
    ("size", lambda op: op("affine_grid_sample")(_VAGS, _THETA, [2, 1, 3, -3, 3], False)),
    ("size", lambda op: op("affine_grid_sample")(_VAGS, _THETA, [2, 4, 3, 3, 3], False)),
    ("grad", lambda op: op("affine_grid_sample_backward")(rand(1, 2, 2, 2, 2), _VOL, random_theta(1), False, True,
                                                          True)),
    ("theta|grad", lambda op: op("affine_grid_sample_backward")(torch.rand(2, 1, 2, 2, 2), _VAGS, _THETA[:1], False,
                                                                True, True)),
]


@pytest.mark.parametrize("case", range(len(_BAD_CALLS)))
def test_rejects_bad_arguments(kernels, case):
    pattern, call = _BAD_CALLS[case]
    assert_rejects(lambda: call(kernels.call), pattern)


@pytest.mark.parametrize("call, exc, pattern", [
    pytest.param(lambda: ops.affine_grid_sample(_VAGS, _THETA.double(), (2, 1, 3, 3, 3)), TypeError,
                 r"theta must have the volume's dtype torch.float32, got torch.float64", id="theta_dtype"),
    pytest.param(lambda: ops.affine_grid_sample(_VAGS, _THETA.to("meta"), (2, 1, 3, 3, 3)), ValueError,
                 r"theta is on meta but volume is on cpu", id="theta_device"),
    pytest.param(lambda: ops.affine_grid_sample(_VAGS, _THETA[:, :, :3], (2, 1, 3, 3, 3)), ValueError,
                 r"theta must have shape \(N, 3, 4\)", id="theta_shape"),
    pytest.param(lambda: ops.affine_grid_sample(_VAGS, _THETA[:1], (2, 1, 3, 3, 3)), ValueError,
                 r"theta must have shape \(N, 3, 4\) with N = volume.shape\[0\] = 2", id="theta_batch"),
    pytest.param(lambda: ops.affine_grid_sample(_VAGS, _THETA.tolist(), (2, 1, 3, 3, 3)), TypeError,
                 r"theta must be a torch.Tensor", id="theta_list"),
    pytest.param(lambda: ops.affine_grid_sample(_VAGS, _THETA, (2, 1, -3, 3, 3)), ValueError,
                 r"size must be .*positive output sizes, got \(2, 1, -3, 3, 3\)", id="size_negative"),
    pytest.param(lambda: ops.affine_grid_sample(_VAGS, _THETA, (2, 1, 0, 3, 3)), ValueError,
                 r"size must be .*positive output sizes", id="size_zero"),
    pytest.param(lambda: ops.affine_grid_sample(_VAGS, _THETA, (2, 1, 2.5, 3, 3)), ValueError,
                 r"size must be 5 integers", id="size_float"),
    pytest.param(lambda: ops.affine_grid_sample(_VAGS, _THETA, (2, 1, 3, 3)), ValueError,
                 r"size must be 5 integers", id="size_length"),
    pytest.param(lambda: ops.affine_grid_sample(_VAGS, _THETA, (2, 3, 3, 3, 3)), ValueError,
                 r"size must be \(N, C, D_out, H_out, W_out\) with volume's N = 2, C = 1", id="size_channels"),
    pytest.param(lambda: ops.affine_grid_sample(_VAGS[0], _THETA, (2, 1, 3, 3, 3)), ValueError,
                 r"volume must be 5-D", id="volume_rank"),
    pytest.param(lambda: ops.affine_grid_sample(_VAGS.int(), _THETA, (2, 1, 3, 3, 3)), TypeError,
                 r"volume must be float32 or float64", id="volume_int"),
    pytest.param(lambda: ops.affine_grid_sample(_VAGS, _THETA, (2, 1, 3, 3, 3), 1), TypeError,
                 r"align_corners must be a bool", id="align_corners_int"),
])
def test_public_op_rejects(call, exc, pattern):
    assert_raises(call, exc, pattern)


# ---------------------------------------------------------------------------------------------------------
# Fuzzing: random thetas, sizes and alignments against grid_sample.

def _kink_distance(theta, size, vol_shape, align):
    """Smallest distance (in voxels) from a sample point of ``affine_grid(theta, size)`` to a grid line of the
    input ``vol_shape`` (D, H, W): where the trilinear interpolant is not differentiable."""
    grid = F.affine_grid(theta.detach().double().cpu(), list(size), align_corners=align)  # (..., 3) x, y, z
    n = torch.tensor(vol_shape[::-1], dtype=torch.float64)  # W, H, D
    coord = (grid + 1) / 2 * (n - 1) if align else ((grid + 1) * n - 1) / 2
    return float((coord - coord.round()).abs().min())


@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid behavior has changed")  # size-1 outputs
def test_fuzz_against_reference(kernels):
    """Forward, volume gradient and theta gradient against ``F.grid_sample(F.affine_grid(...))``."""
    fuzzing = pytest.importorskip("fuzzing")  # hypothesis
    from hypothesis import given
    from hypothesis import strategies as st

    backend_name = kernels.name
    theta = st.one_of(
        st.just(((1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0))),  # identity: exact grid points
        st.permutations([0, 1, 2]).map(lambda p: tuple(tuple(1.0 if j == p[i] else 0.0 for j in range(4))
                                                       for i in range(3))),
        st.tuples(*[st.tuples(*[st.floats(-1.5, 1.5, allow_nan=False, allow_subnormal=False)] * 4)] * 3),
    )
    tiny = fuzzing.interpreted(backend_name)
    side = st.integers(1, 5 if tiny else 17)

    @(fuzzing.FUZZ_TRITON if tiny else fuzzing.FUZZ)
    @given(n=st.integers(1, 2), c=st.integers(1, 2), vol=st.tuples(side, side, side), out=st.tuples(side, side, side),
           thetas=st.lists(theta, min_size=2, max_size=2), align=st.booleans(),
           dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2 ** 31 - 1))
    def check(n, c, vol, out, thetas, align, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        dev = fuzzing.device(backend_name)
        v = torch.randn(n, c, *vol, generator=gen, dtype=torch.float64).to(device=dev, dtype=dtype)
        th = torch.tensor(thetas[:n], dtype=torch.float64).to(device=dev, dtype=dtype)
        size = (n, c) + out

        def run(bk, v, th):
            v = v.detach().clone().requires_grad_(True)
            th = th.detach().clone().requires_grad_(True)
            y = ops.affine_grid_sample(v, th, size, align, backend=bk)
            r = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1),
                            dtype=torch.float64).to(device=y.device, dtype=y.dtype)
            gv, gt = torch.autograd.grad(y, (v, th), r)
            return y.detach(), r, gv, gt

        y, r, gv, gt = run(backend_name, v, th)
        y0, _, gv0, gt0 = run("reference", v.cpu(), th.cpu())
        fuzzing.assert_matches(y, y0, dtype, "forward")
        fuzzing.assert_matches(gv, gv0, dtype, "volume gradient")
        fuzzing.assert_adjoint(y, r, v, gv, dtype, "adjoint (volume)")
        # The theta gradient involves the slope of the interpolant, which jumps where a sample sits on a grid
        # line (a kink: both one-sided slopes are valid, and a 1-ulp difference in the coordinate picks the
        # other one). Compare it only away from kinks.
        if _kink_distance(th, size, vol, align) > (1e-6 if dtype == torch.float64 else 1e-3):
            # float32: each entry sums one product per output point, so rounding grows like sqrt(count).
            scale = math.sqrt(y.numel()) if dtype == torch.float32 else 1.0
            torch.testing.assert_close(gt.cpu(), gt0, rtol=fuzzing._tol(dtype) * scale,
                                       atol=fuzzing._tol(dtype) * scale * max(1.0, float(gt0.abs().max())))
    check()
