"""CPU benchmarks: the compiled kernels (backend "cpu") against the reference backend, in the same run.

Sizes (issue 3): slicing a 64³ and a 128³ float32 volume into 64 directions with the default slicing
(covering the bounding sphere: 111 and 223 slices of 111² and 223² pixels), plus the 128³ → 64 × 128 × 128²
case of PERFORMANCE.md; ``radon`` of 128³ × 64 directions; ``backproject`` of a 64 × S sinogram into 128³;
``backproject_slices`` of 16 directions into 64³; ``affine_grid_sample`` of a 128³ volume. Backward passes
are timed alone (forward done once outside the timer) against the reference's autograd.

Work counts: samples (trilinear reads) for slicing/radon/affine, voxel-direction updates for the
backprojections. No assertions on timing (see RESULTS.md for the numbers).
"""
from __future__ import annotations

import math

import pytest
import torch

from tonno_fast.backend import reference
from tonno_fast.geometry import make_geometry

native = pytest.importorskip("tonno_fast.backend.native")
if native.unavailable_reason("cpu") is not None:
    pytest.skip(f"compiled CPU kernels unavailable: {native.unavailable_reason('cpu')}", allow_module_level=True)

BACKENDS = {"cpu": native, "reference": reference}
# Reference runs of the largest cases take many seconds: fewer rounds.
ROUNDS = {"cpu": 5, "reference": 3}


def _geometry(n, n_directions=64, **kw):
    return make_geometry((n, n, n), n_directions=n_directions, **kw)


def _volume(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, n, n, n, generator=g)


SLICE_CASES = {
    "slice_volume 64^3 x64 dirs default (111^3)": dict(n=64),
    "slice_volume 128^3 x64 dirs 128 x 128^2": dict(n=128, slice_size=128, n_slices=128),
    "slice_volume 128^3 x64 dirs default (223^3)": dict(n=128),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", list(SLICE_CASES))
def test_slice_volume(run_case, case, backend):
    kw = dict(SLICE_CASES[case])
    n = kw.pop("n")
    g = _geometry(n, **kw)
    vol, maps = _volume(n), g.slice_maps(dtype=torch.float32)
    be = BACKENDS[backend]
    work = g.n_directions * g.n_slices * g.height * g.width
    run_case(case, backend, lambda: be.slice_volume(vol, maps, g.n_slices, g.height, g.width),
             work, "sampl/s", rounds=ROUNDS[backend] if n == 64 or backend == "cpu" else 2)


def test_slice_volume_bf16(run_case):
    """bf16 output for encoders: half the bytes written."""
    g = _geometry(128, slice_size=128, n_slices=128)
    vol, maps = _volume(128), g.slice_maps(dtype=torch.float32)
    work = g.n_directions * g.n_slices * g.height * g.width
    run_case("slice_volume 128^3 x64 dirs 128 x 128^2 bf16 out", "cpu",
             lambda: native.slice_volume(vol, maps, g.n_slices, g.height, g.width, 0.0, torch.bfloat16),
             work, "sampl/s")


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_radon(run_case, backend):
    g = _geometry(128)
    vol, maps = _volume(128), g.slice_maps(dtype=torch.float32)
    be = BACKENDS[backend]
    work = g.n_directions * g.n_slices * g.height * g.width
    run_case("radon 128^3 x64 dirs default (223^3)", backend,
             lambda: be.radon(vol, maps, g.n_slices, g.height, g.width, g.pixel_area), work, "sampl/s",
             rounds=ROUNDS[backend] if backend == "cpu" else 2)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_backproject(run_case, backend):
    g = _geometry(128)
    sino = torch.rand(1, 1, g.n_directions, g.n_slices, generator=torch.Generator().manual_seed(1))
    maps, w = g.volume_maps(dtype=torch.float32), g.weights.float()
    be = BACKENDS[backend]
    work = g.n_directions * 128 ** 3
    run_case("backproject 64 x 223 -> 128^3", backend, lambda: be.backproject(sino, maps, w, g.volume_shape),
             work, "upd/s", rounds=ROUNDS[backend])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_backproject_slices(run_case, backend):
    g = _geometry(64, n_directions=16)
    stacks = torch.rand(1, 1, g.n_directions, g.n_slices, g.height, g.width,
                        generator=torch.Generator().manual_seed(2))
    maps, w = g.volume_maps(dtype=torch.float32), g.weights.float()
    be = BACKENDS[backend]
    work = g.n_directions * 64 ** 3
    run_case("backproject_slices 16 x 111^3 -> 64^3", backend,
             lambda: be.backproject_slices(stacks, maps, w, g.volume_shape), work, "upd/s", rounds=ROUNDS[backend])


def _rotation_theta():
    a, b = 0.4, 0.3
    rz = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    rx = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(b), -math.sin(b)], [0.0, math.sin(b), math.cos(b)]])
    return torch.cat([rz @ rx, torch.tensor([[0.05], [-0.1], [0.0]])], dim=1)[None]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_affine_grid_sample(run_case, backend):
    vol, theta = _volume(128), _rotation_theta()
    size = [1, 1, 128, 128, 128]
    be = BACKENDS[backend]
    run_case("affine_grid_sample 128^3 -> 128^3", backend,
             lambda: be.affine_grid_sample(vol, theta, size, False), 128 ** 3, "sampl/s", rounds=ROUNDS[backend])


# ---------------------------------------------------------------------------------------------------------
# Backward passes: time torch.autograd.grad on a graph built once (retain_graph).

def _time_backward(run_case, case, backend, forward, inputs, work, unit, rounds):
    out = forward()
    gout = torch.rand(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    run_case(case, backend, lambda: torch.autograd.grad(out, inputs, gout, retain_graph=True), work, unit,
             rounds=rounds)


# The two ops that sample slices: the same geometry, volume and work (samples); radon adds its scale.
SLICE_OPS = {
    "slice_volume": lambda be, vol, maps, g: be.slice_volume(vol, maps, g.n_slices, g.height, g.width),
    "radon": lambda be, vol, maps, g: be.radon(vol, maps, g.n_slices, g.height, g.width, 1.0),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("op", list(SLICE_OPS))
def test_slice_op_backward(run_case, op, backend):
    g = _geometry(64)
    vol = _volume(64).requires_grad_()
    maps = g.slice_maps(dtype=torch.float32)
    be = BACKENDS[backend]
    work = g.n_directions * g.n_slices * g.height * g.width
    _time_backward(run_case, f"backward {op} 64^3 x64 dirs default", backend,
                   lambda: SLICE_OPS[op](be, vol, maps, g), (vol,), work, "sampl/s", ROUNDS[backend])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_backproject_backward(run_case, backend):
    g = _geometry(128)
    sino = torch.rand(1, 1, g.n_directions, g.n_slices).requires_grad_()
    maps, w = g.volume_maps(dtype=torch.float32), g.weights.float()
    be = BACKENDS[backend]
    _time_backward(run_case, "backward backproject 64 x 223 -> 128^3", backend,
                   lambda: be.backproject(sino, maps, w, g.volume_shape), (sino,), g.n_directions * 128 ** 3,
                   "upd/s", ROUNDS[backend])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_backproject_slices_backward(run_case, backend):
    g = _geometry(64, n_directions=16)
    stacks = torch.rand(1, 1, g.n_directions, g.n_slices, g.height, g.width).requires_grad_()
    maps, w = g.volume_maps(dtype=torch.float32), g.weights.float()
    be = BACKENDS[backend]
    _time_backward(run_case, "backward backproject_slices 16 -> 64^3", backend,
                   lambda: be.backproject_slices(stacks, maps, w, g.volume_shape), (stacks,),
                   g.n_directions * 64 ** 3, "upd/s", ROUNDS[backend])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_affine_grid_sample_backward(run_case, backend):
    vol, theta = _volume(128).requires_grad_(), _rotation_theta().requires_grad_()
    size = [1, 1, 128, 128, 128]
    be = BACKENDS[backend]
    _time_backward(run_case, "backward affine_grid_sample 128^3 (volume+theta)", backend,
                   lambda: be.affine_grid_sample(vol, theta, size, False), (vol, theta), 128 ** 3, "sampl/s",
                   ROUNDS[backend])
