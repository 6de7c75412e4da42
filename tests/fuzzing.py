"""Hypothesis strategies and checks shared by the property-based tests (``tests/ops/test_<op>.py`` against the
reference backend, ``tests/test_fuzz.py`` for identities across ops and the whole pipeline).

Drawn: volume shapes 1–33 per axis, spacings 0.3–5 mm (anisotropic), directions (random, exactly on an axis,
within 1e-15..1e-3 of the pole, within 1e-12..1e-6 of the equator where the hemisphere flip happens, lower
hemisphere, repeated), slice counts and sizes, pixel and slice spacings, batch and channel counts, dtypes, fill
values.

Reproducible: ``derandomize=True`` (the examples depend only on the test's source) and no example database.
``TONNO_FUZZ_EXAMPLES`` scales the number of examples per test (default 20; the Triton interpreter gets a
fifth of it at tiny sizes); a nightly run can set it to thousands. A failing case found by fuzzing goes into
``REGRESSIONS``, so it runs on every CI run from then on.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tonno_fast
from tonno_fast.geometry import make_geometry

N_EXAMPLES = int(os.environ.get("TONNO_FUZZ_EXAMPLES", "20"))


def fuzz_settings(n):
    return settings(max_examples=max(1, n), deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


FUZZ = fuzz_settings(N_EXAMPLES)
FUZZ_TRITON = fuzz_settings(N_EXAMPLES // 5)


def available(name):
    return tonno_fast.backends().get(name) == "available"


def device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def interpreted(backend):
    return backend == "triton" and not torch.cuda.is_available()


# Every backend that can run here, compared against the reference. Triton runs under TRITON_INTERPRET=1
# without a GPU (tests/conftest.py), which is slow: it gets tiny cases and fewer examples.
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not available(b), reason=f"backend {b} unavailable"))
            for b in ("cpu", "cuda", "triton")]
ALL_BACKENDS = [pytest.param("reference")] + BACKENDS

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


def case_strategy(backend):
    return TINY_CASES if interpreted(backend) else CASES


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
            if not interpreted(backend) or _tiny(c):
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
    dev = device(backend)
    x = make_input().to(dev)
    y, r, dx = run_op(lambda t: op(t, backend=backend), x, case.seed + 1)
    y_ref, _, dx_ref = run_op(lambda t: op(t, backend="reference"), x.cpu(), case.seed + 1)
    assert_matches(y, y_ref, case.dtype, "forward")
    assert_matches(dx, dx_ref, case.dtype, "backward")
    # slice_volume with fill != 0 is affine (out = A v + fill (1 - Σ w)): the dot-product test is for A.
    with torch.no_grad():
        offset = op(torch.zeros_like(x), backend=backend)
    assert_adjoint(y - offset, r, x, dx, case.dtype, "adjoint")


def fuzz(backend, n_examples=None, regressions=True, strategy=None):
    """Decorator: run ``check(case)`` on drawn cases (and the ``REGRESSIONS``) for ``backend``, with fewer and
    tinier cases under the Triton interpreter."""
    def deco(check):
        settings_ = FUZZ_TRITON if interpreted(backend) else (FUZZ if n_examples is None else fuzz_settings(n_examples))
        test = given(case=strategy or case_strategy(backend))(check)
        if regressions:
            test = examples_for(backend)(test)
        return settings_(test)
    return deco
