"""Property-based tests across operators and of the whole pipeline: identities between the ops on every backend,
the reference backend's chunking, and ``tomographic_heatmap`` independent of how the slices are chunked. Each
op against the reference on random geometries is fuzzed in its own module (``tests/ops/test_<op>.py``); the
strategies are in ``fuzzing.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tonno_fast
from fuzzing import (ALL_BACKENDS, FUZZ, FUZZ_TRITON, N_EXAMPLES, TINY_CASES, assert_adjoint, assert_matches,
                     case_strategy, cases, device, examples_for, fuzz_settings, interpreted, run_op)
from tonno_fast import ops
from tonno_fast.ops import reference


# ------------------------------------------------------------------------------------------------------------
# Properties that hold on every backend, the reference included
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_operator_identities(backend):
    """``radon = δ² Σ_ij slice_volume``; ``slice_volume(v, fill=f) = slice_volume(v - f) + f``; the adjoint
    identity of ``slice_volume`` and ``backproject_slices`` through autograd; and a volume that is constant
    along a direction's normal backprojects its sinogram row exactly (``backproject`` is linear interpolation
    of ``t`` between slices)."""
    @(FUZZ_TRITON if interpreted(backend) else FUZZ)
    @examples_for(backend)
    @given(case=case_strategy(backend))
    def check(case):
        g = case.geometry()
        dev = device(backend)
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
    tiny = interpreted(backend)

    @(FUZZ_TRITON if tiny else fuzz_settings(max(1, N_EXAMPLES // 2)))
    @given(p=pipelines(TINY_CASES if tiny else cases(max_side=12, max_slice=8)))
    def check(p):
        case = p["case"]
        v = case.rand(case.batch, case.channels, *case.shape).to(device(backend))
        kw = dict(spacing=case.spacing, directions=np.array(case.directions), n_slices=case.n_slices,
                  slice_size=case.slice_size, pixel_spacing=case.pixel_spacing, slice_spacing=case.slice_spacing,
                  filter=p["filter"], fill=case.fill)
        got = tonno_fast.tomographic_heatmap(v, p["encoder"], batch_size=p["batch_size"],
                                             max_memory=p["max_memory"], backend=backend, **kw)
        ref = tonno_fast.tomographic_heatmap(v.cpu(), p["encoder"], batch_size=1 << 20, backend="reference", **kw)
        assert_matches(got, ref, case.dtype, "heatmap")
    check()
