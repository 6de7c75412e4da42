"""Property-based tests (issue 8): every available backend against the reference backend, forward and backward,
plus the adjoint identities, on random geometries.

Drawn: volume shapes 1–33 per axis, spacings 0.3–5 mm (anisotropic), directions (random, exactly on an axis,
within 1e-15..1e-3 of the pole, within 1e-12..1e-6 of the equator where the hemisphere flip happens, lower
hemisphere, repeated), slice counts and sizes, pixel and slice spacings, batch and channel counts, dtypes, fill
values, output dtypes and chunk sizes.

Reproducible: ``derandomize=True`` (the examples depend only on the test's source) and no example database.
``TONNO_FUZZ_EXAMPLES`` scales the number of examples per test (default 20; the Triton interpreter gets a
fifth of it at tiny sizes); a nightly run can set it to thousands. A failing case found by fuzzing goes into
the ``@example`` list of its test (``REGRESSIONS``), so it runs on every CI run from then on.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tonno_fast
from tonno_fast import ops
from tonno_fast.backend import reference
from tonno_fast.geometry import make_geometry

N_EXAMPLES = int(os.environ.get("TONNO_FUZZ_EXAMPLES", "20"))


def fuzz_settings(n):
    return settings(max_examples=max(1, n), deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


FUZZ = fuzz_settings(N_EXAMPLES)
FUZZ_TRITON = fuzz_settings(N_EXAMPLES // 5)


def _available(name):
    return tonno_fast.backends().get(name) == "available"


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _interpreted(backend):
    return backend == "triton" and not torch.cuda.is_available()


# Every backend that can run here, compared against the reference. Triton runs under TRITON_INTERPRET=1
# without a GPU (tests/conftest.py), which is slow: it gets tiny cases and fewer examples.
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not _available(b), reason=f"backend {b} unavailable"))
            for b in ("cpu", "cuda", "triton")]

# ------------------------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------------------------
AXES = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, -1.0)]
_angle = st.floats(0.0, 2 * math.pi, allow_nan=False)
_unit = st.floats(-1.0, 1.0, allow_nan=False, allow_subnormal=False)

DIRECTION = st.one_of(
    st.sampled_from(AXES),
    st.tuples(_unit, _unit, _unit).filter(lambda v: v[0] ** 2 + v[1] ** 2 + v[2] ** 2 > 1e-4),
    # near the pole: the frame's Rodrigues formula divides by 1 + n_z
    st.builds(lambda e, a, s: (e * math.cos(a), e * math.sin(a), s),
              st.sampled_from([1e-15, 1e-9, 1e-5, 1e-3]), _angle, st.sampled_from([1.0, -1.0])),
    # near the equator: n_z of either sign is flipped to the upper hemisphere
    st.builds(lambda a, e: (math.cos(a), math.sin(a), e), _angle,
              st.sampled_from([0.0, 1e-12, -1e-12, 1e-6, -1e-6])),
)
# 1–4 directions, sometimes with the first one repeated
DIRECTIONS = st.lists(DIRECTION, min_size=1, max_size=4).flatmap(
    lambda ds: st.sampled_from([tuple(ds), tuple(ds) + (ds[0],)]))
SPACING = st.floats(0.3, 5.0, allow_nan=False)


@dataclass(frozen=True)
class Case:
    """One drawn geometry plus data: everything a test needs, printable and usable in ``@example``."""

    shape: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    directions: Tuple[Tuple[float, float, float], ...]
    n_slices: int
    slice_size: Tuple[int, int]
    pixel_spacing: Optional[float]  # None: δ follows slice_size (the slice spans the bounding sphere)
    slice_spacing: Optional[float]  # None: min(spacing)
    batch: int
    channels: int
    dtype: torch.dtype
    fill: float
    seed: int

    def geometry(self):
        return make_geometry(self.shape, spacing=self.spacing, directions=np.array(self.directions),
                             n_slices=self.n_slices, slice_size=self.slice_size, pixel_spacing=self.pixel_spacing,
                             slice_spacing=self.slice_spacing)

    def generator(self):
        return torch.Generator().manual_seed(self.seed)

    def rand(self, *shape):
        """Standard normal data of this case's dtype (on the CPU; tests move it)."""
        return torch.randn(*shape, generator=self.generator(), dtype=torch.float64).to(self.dtype)


def cases(max_side=33, max_slice=12, max_bc=2):
    return st.builds(
        Case,
        shape=st.tuples(*[st.integers(1, max_side)] * 3),
        spacing=st.one_of(SPACING.map(lambda s: (s, s, s)), st.tuples(SPACING, SPACING, SPACING)),
        directions=DIRECTIONS,
        n_slices=st.integers(1, max_slice),
        slice_size=st.tuples(st.integers(1, max_slice), st.integers(1, max_slice)),
        pixel_spacing=st.one_of(st.none(), SPACING),
        slice_spacing=st.one_of(st.none(), SPACING),
        batch=st.integers(1, max_bc),
        channels=st.integers(1, max_bc),
        dtype=st.sampled_from([torch.float32, torch.float64]),
        fill=st.one_of(st.just(0.0), st.floats(-2.0, 2.0, allow_nan=False)),
        seed=st.integers(0, 2 ** 31 - 1),
    )


CASES = cases()
TINY_CASES = cases(max_side=5, max_slice=4, max_bc=1)  # for the Triton interpreter


def _case_for(backend):
    return TINY_CASES if _interpreted(backend) else CASES


# Regressions and hand-picked corners: run on every CI run before the drawn examples.
REGRESSIONS = [
    # a single voxel, one slice of one pixel, exactly axial: every coordinate is an integer
    Case((1, 1, 1), (1.0, 1.0, 1.0), ((0.0, 0.0, 1.0),), 1, (1, 1), None, None, 1, 1, torch.float64, 0.0, 0),
    # even sizes on the axes: samples fall exactly on cell borders and on the -1 / n-1 edges
    Case((4, 6, 2), (1.0, 1.0, 1.0), AXES, 4, (6, 2), 1.0, 1.0, 1, 2, torch.float64, 0.5, 1),
    # a long thin volume, anisotropic, directions at the pole and on the equator, repeated
    Case((33, 1, 2), (0.3, 5.0, 1.7), ((1e-15, 0.0, -1.0), (1.0, 0.0, -1e-12), (1e-15, 0.0, -1.0)), 12, (3, 12),
         None, 0.3, 2, 1, torch.float32, -1.25, 2),
    # largest volume side, fine slicing
    Case((33, 33, 33), (0.5, 0.5, 0.5), ((0.3, -0.4, 0.2),), 12, (12, 12), 0.3, 0.3, 1, 1, torch.float32, 0.0, 3),
]


def _tiny(c):
    return max(c.shape) <= 5 and c.n_slices <= 4 and max(c.slice_size) <= 4


def examples_for(backend):
    """Decorator adding the ``REGRESSIONS`` as explicit examples (only the tiny ones for the interpreter)."""
    def deco(test):
        for c in REGRESSIONS:
            if not _interpreted(backend) or _tiny(c):
                test = example(case=c)(test)
        return test
    return deco


# ------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------
def _tol(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-5


def assert_matches(got, ref, dtype, what):
    """``got`` equals the reference to ~1e-10 (float64) / ~1e-5 (float32) relative to the largest value."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, (what, got.shape, ref.shape, got.dtype, ref.dtype)
    tol = _tol(dtype)
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(got.cpu(), ref.cpu(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def assert_adjoint(forward_out, probe, x, x_grad, dtype, what):
    """Dot-product test ``<A x, y> = <x, Aᵀ y>`` with ``Aᵀ y`` the backward of the backend."""
    lhs = float((forward_out.double() * probe.double()).sum())
    rhs = float((x.double() * x_grad.double()).sum())
    norm = float(forward_out.double().norm() * probe.double().norm()) + 1e-300
    assert abs(lhs - rhs) <= 10 * _tol(dtype) * norm, f"{what}: <Ax,y>={lhs} <x,Aᵀy>={rhs}"


def run_op(fn, x, probe_seed):
    """``y = fn(x)`` and the gradient of ``<y, r>`` for a random ``r``: (y, r, dx)."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(probe_seed), dtype=torch.float64)
    r = r.to(device=y.device, dtype=y.dtype)
    (dx,) = torch.autograd.grad(y, x, r)
    return y.detach(), r, dx


def compare(case, backend, make_input, op):
    """Forward, backward and the adjoint identity of ``op(x, backend=...)`` against the reference."""
    dev = _device(backend)
    x = make_input().to(dev)
    y, r, dx = run_op(lambda t: op(t, backend=backend), x, case.seed + 1)
    y_ref, _, dx_ref = run_op(lambda t: op(t, backend="reference"), x.cpu(), case.seed + 1)
    assert_matches(y, y_ref, case.dtype, "forward")
    assert_matches(dx, dx_ref, case.dtype, "backward")
    # slice_volume with fill != 0 is affine (out = A v + fill (1 - Σ w)): the dot-product test is for A.
    with torch.no_grad():
        offset = op(torch.zeros_like(x), backend=backend)
    assert_adjoint(y - offset, r, x, dx, case.dtype, "adjoint")


# ------------------------------------------------------------------------------------------------------------
# Backends against the reference
# ------------------------------------------------------------------------------------------------------------
def _slice_volume_case(case, g):
    return (lambda: case.rand(case.batch, case.channels, *case.shape),
            lambda v, backend: ops.slice_volume(v, g, fill=case.fill, backend=backend))


def _radon_case(case, g):
    return (lambda: case.rand(case.batch, case.channels, *case.shape),
            lambda v, backend: ops.radon(v, g, backend=backend))


def _backproject_case(case, g):
    w = torch.rand(g.n_directions, generator=case.generator(), dtype=torch.float64) + 0.5
    return (lambda: case.rand(case.batch, case.channels, g.n_directions, g.n_slices),
            lambda s, backend: ops.backproject(s, g, weights=w, backend=backend))


def _backproject_slices_case(case, g):
    w = torch.rand(g.n_directions, generator=case.generator(), dtype=torch.float64) - 0.5
    shape = (case.batch, case.channels, g.n_directions, g.n_slices, g.height, g.width)
    return (lambda: case.rand(*shape),
            lambda s, backend: ops.backproject_slices(s, g, weights=w, backend=backend))


# (make_input, op) of ``compare`` for each operator, from a drawn case and its geometry.
OP_CASES = {"slice_volume": _slice_volume_case, "radon": _radon_case, "backproject": _backproject_case,
            "backproject_slices": _backproject_slices_case}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OP_CASES))
def test_op_matches_reference(backend, op):
    @(FUZZ_TRITON if _interpreted(backend) else FUZZ)
    @examples_for(backend)
    @given(case=_case_for(backend))
    def check(case):
        compare(case, backend, *OP_CASES[op](case, case.geometry()))
    check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_slice_volume_low_precision_output(backend, out_dtype):
    """bf16/fp16 output: the float result rounded once (at most one unit in the last place apart)."""
    @(FUZZ_TRITON if _interpreted(backend) else fuzz_settings(max(1, N_EXAMPLES // 4)))
    @given(case=_case_for(backend))
    def check(case):
        g = case.geometry()
        v = case.rand(case.batch, case.channels, *case.shape).to(_device(backend))
        got = ops.slice_volume(v, g, fill=case.fill, out_dtype=out_dtype, backend=backend)
        exact = ops.slice_volume(v.cpu(), g, fill=case.fill, backend="reference")
        assert got.dtype == out_dtype and got.shape == exact.shape
        ulp = torch.finfo(out_dtype).eps  # relative spacing of the low-precision format
        scale = max(1.0, float(exact.abs().max()))
        torch.testing.assert_close(got.cpu().to(exact.dtype), exact, rtol=ulp, atol=ulp * 1e-2 * scale)
    check()


THETA = st.one_of(
    st.just(((1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0))),  # identity: exact grid points
    st.permutations([0, 1, 2]).map(lambda p: tuple(tuple(1.0 if j == p[i] else 0.0 for j in range(4))
                                                   for i in range(3))),
    st.tuples(*[st.tuples(*[st.floats(-1.5, 1.5, allow_nan=False, allow_subnormal=False)] * 4)] * 3),
)


@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid behavior has changed")  # size-1 outputs
@pytest.mark.parametrize("backend", BACKENDS)
def test_affine_grid_sample_matches_reference(backend):
    """Forward, volume gradient and theta gradient against ``F.grid_sample(F.affine_grid(...))``."""
    tiny = _interpreted(backend)
    side = st.integers(1, 5 if tiny else 17)

    @(FUZZ_TRITON if tiny else FUZZ)
    @given(n=st.integers(1, 2), c=st.integers(1, 2), vol=st.tuples(side, side, side), out=st.tuples(side, side, side),
           thetas=st.lists(THETA, min_size=2, max_size=2), align=st.booleans(),
           dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2 ** 31 - 1))
    def check(n, c, vol, out, thetas, align, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        dev = _device(backend)
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

        y, r, gv, gt = run(backend, v, th)
        y0, _, gv0, gt0 = run("reference", v.cpu(), th.cpu())
        assert_matches(y, y0, dtype, "forward")
        assert_matches(gv, gv0, dtype, "volume gradient")
        assert_adjoint(y, r, v, gv, dtype, "adjoint (volume)")
        # The theta gradient involves the slope of the interpolant, which jumps where a sample sits on a grid
        # line (a kink: both one-sided slopes are valid, and a 1-ulp difference in the coordinate picks the
        # other one). Compare it only away from kinks.
        if _kink_distance(th, size, vol, align) > (1e-6 if dtype == torch.float64 else 1e-3):
            # float32: each entry sums one product per output point, so rounding grows like sqrt(count).
            scale = math.sqrt(y.numel()) if dtype == torch.float32 else 1.0
            torch.testing.assert_close(gt.cpu(), gt0, rtol=_tol(dtype) * scale,
                                       atol=_tol(dtype) * scale * max(1.0, float(gt0.abs().max())))
    check()


def _kink_distance(theta, size, vol_shape, align):
    """Smallest distance (in voxels) from a sample point of ``affine_grid(theta, size)`` to a grid line of the
    input ``vol_shape`` (D, H, W): where the trilinear interpolant is not differentiable."""
    grid = F.affine_grid(theta.detach().double().cpu(), list(size), align_corners=align)  # (..., 3) x, y, z
    n = torch.tensor(vol_shape[::-1], dtype=torch.float64)  # W, H, D
    coord = (grid + 1) / 2 * (n - 1) if align else ((grid + 1) * n - 1) / 2
    return float((coord - coord.round()).abs().min())


# ------------------------------------------------------------------------------------------------------------
# Properties that hold on every backend, the reference included
# ------------------------------------------------------------------------------------------------------------
ALL_BACKENDS = [pytest.param("reference")] + BACKENDS


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_operator_identities(backend):
    """``radon = δ² Σ_ij slice_volume``; ``slice_volume(v, fill=f) = slice_volume(v - f) + f``; the adjoint
    identity of ``slice_volume`` and ``backproject_slices`` through autograd; and a volume that is constant
    along a direction's normal backprojects its sinogram row exactly (``backproject`` is linear interpolation
    of ``t`` between slices)."""
    @(FUZZ_TRITON if _interpreted(backend) else FUZZ)
    @examples_for(backend)
    @given(case=_case_for(backend))
    def check(case):
        g = case.geometry()
        dev = _device(backend)
        v = case.rand(case.batch, case.channels, *case.shape).to(dev)
        sl = ops.slice_volume(v, g, backend=backend)
        rad = ops.radon(v, g, backend=backend)
        assert_matches(rad, sl.sum(dim=(-2, -1)).permute(0, 3, 1, 2) * g.pixel_area, case.dtype, "radon = Σ slices")
        if case.fill != 0.0:
            filled = ops.slice_volume(v, g, fill=case.fill, backend=backend)
            assert_matches(filled, ops.slice_volume(v - case.fill, g, backend=backend) + case.fill, case.dtype,
                           "fill")
        y, r, dx = run_op(lambda t: ops.slice_volume(t, g, backend=backend), v, case.seed + 2)
        assert_adjoint(y, r, v, dx, case.dtype, "slice_volume adjoint")
        st_ = case.rand(case.batch, case.channels, g.n_directions, g.n_slices, g.height, g.width).to(dev)
        y, r, dx = run_op(lambda t: ops.backproject_slices(t, g, backend=backend), st_, case.seed + 3)
        assert_adjoint(y, r, st_, dx, case.dtype, "backproject_slices adjoint")
        sino = case.rand(case.batch, case.channels, g.n_directions, g.n_slices).to(dev)
        y, r, dx = run_op(lambda t: ops.backproject(t, g, backend=backend), sino, case.seed + 4)
        assert_adjoint(y, r, sino, dx, case.dtype, "backproject adjoint")
    check()


def test_reference_chunking_is_invisible(monkeypatch):
    """The reference backend splits directions into chunks by memory (``_CHUNK_BYTES``): any chunk size gives
    the same slices and plane sums bit for bit (each direction is computed alone either way), and the same
    backprojections to rounding (the sum over directions is grouped by chunk)."""
    @fuzz_settings(max(1, N_EXAMPLES // 2))
    @given(case=cases(max_side=7, max_slice=5), chunk=st.sampled_from([1, 700, 50_000]))
    def check(case, chunk):
        g = case.geometry()
        v = case.rand(case.batch, case.channels, *case.shape)
        sino = case.rand(case.batch, case.channels, g.n_directions, g.n_slices)
        stacks = case.rand(case.batch, case.channels, g.n_directions, g.n_slices, g.height, g.width)
        outs = []
        for c in (chunk, reference._CHUNK_BYTES if chunk != reference._CHUNK_BYTES else 1):
            with monkeypatch.context() as m:
                m.setattr(reference, "_CHUNK_BYTES", c)
                outs.append([ops.slice_volume(v, g, fill=case.fill, backend="reference"),
                             ops.radon(v, g, backend="reference"),
                             ops.backproject(sino, g, backend="reference"),
                             ops.backproject_slices(stacks, g, backend="reference")])
        for a, b, what in zip(outs[0][:2], outs[1][:2], ("slice_volume", "radon")):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")
        for a, b, what in zip(outs[0][2:], outs[1][2:], ("backproject", "backproject_slices")):
            assert_matches(a, b, case.dtype, what)
    check()


# ------------------------------------------------------------------------------------------------------------
# The whole pipeline
# ------------------------------------------------------------------------------------------------------------
def _sum_encoder(x):
    return x.sum(dim=(1, 2, 3))


def _two_scores(x):
    s = x.sum(dim=(1, 2, 3))
    return torch.stack([s, (x * x).mean(dim=(1, 2, 3))], dim=1)


def pipelines(case_strategy):
    return st.fixed_dictionaries({
        "case": case_strategy,
        "filter": st.sampled_from(["ramp2", "laplacian", "ramp", "none"]),
        "encoder": st.sampled_from([_sum_encoder, _two_scores]),
        "batch_size": st.sampled_from([1, 3, 7, 64, 4096]),
        "max_memory": st.sampled_from([None, 1, 1 << 12, 1 << 16]),
    })


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_heatmap_independent_of_chunking_and_backend(backend):
    """``tomographic_heatmap`` with any ``batch_size`` and ``max_memory`` (how slices are chunked through the
    encoder) equals the unchunked reference result."""
    tiny = _interpreted(backend)

    @(FUZZ_TRITON if tiny else fuzz_settings(max(1, N_EXAMPLES // 2)))
    @given(p=pipelines(TINY_CASES if tiny else cases(max_side=12, max_slice=8)))
    def check(p):
        case = p["case"]
        v = case.rand(case.batch, case.channels, *case.shape).to(_device(backend))
        kw = dict(spacing=case.spacing, directions=np.array(case.directions), n_slices=case.n_slices,
                  slice_size=case.slice_size, pixel_spacing=case.pixel_spacing, slice_spacing=case.slice_spacing,
                  filter=p["filter"], fill=case.fill)
        got = tonno_fast.tomographic_heatmap(v, p["encoder"], batch_size=p["batch_size"],
                                             max_memory=p["max_memory"], backend=backend, **kw)
        ref = tonno_fast.tomographic_heatmap(v.cpu(), p["encoder"], batch_size=1 << 20, backend="reference", **kw)
        assert_matches(got, ref, case.dtype, "heatmap")
    check()
