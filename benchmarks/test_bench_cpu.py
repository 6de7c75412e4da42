"""CPU benchmarks: the compiled kernels (backend "cpu") against the reference backend, in the same run.

The problems are the operators' benchmark problems (``tonno_fast/ops/problems.py``) at the sizes of the CPU
targets: slicing a 64³ and a 128³ float32 volume into 64 directions with the default slicing (covering the
bounding sphere: 111 and 223 slices of 111² and 223² pixels), and 128³ → 64 × 128 × 128² (float32 and bf16
output, the latter half the bytes written); ``radon`` of 128³ × 64 directions; ``backproject`` of a 64 × S
sinogram into 128³; ``backproject_slices`` of 16 directions into 64³; ``affine_grid_sample`` of a 128³
volume. Backward passes are timed alone (forward done once outside the timer) against the reference's
autograd, for slicing and radon at 64³ and the others as above.

Work counts: samples (trilinear reads) for slicing/radon/affine, voxel-direction updates for the
backprojections. No assertions on timing (see RESULTS.md for the numbers).
"""
from __future__ import annotations

import pytest
import torch

from tonno_fast.ops.problems import make_problems
from tonno_fast.ops.registry import backends, get_backend

if backends()["cpu"] != "available":
    pytest.skip(f"compiled CPU kernels unavailable: {backends()['cpu']}", allow_module_level=True)

BACKENDS = ("cpu", "reference")
CPU = torch.device("cpu")

FORWARD = (make_problems(64, ops=["slice_volume"])
           + make_problems(128, slices=128, ops=["slice_volume"], out_dtypes=(torch.float32, torch.bfloat16))
           + make_problems(128, stack_volume=64))
BACKWARD = (make_problems(64, ops=["slice_volume", "radon"])
            + make_problems(128, stack_volume=64, ops=["backproject", "backproject_slices", "affine_grid_sample"]))


def _rounds(problem, backend: str) -> int:
    """Medians of 5 rounds (compiled) and 3 (reference; 2 for its runs of many seconds)."""
    if backend == "cpu":
        return 5
    return 2 if problem.work > 2e8 else 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("problem", FORWARD, ids=lambda p: p.name)
def test_forward(run_case, problem, backend):
    be, inputs = get_backend(backend, CPU), problem.make_inputs(CPU)
    run_case(problem.name, backend, lambda: problem.call(be, inputs), problem.work, problem.unit,
             rounds=_rounds(problem, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("problem", BACKWARD, ids=lambda p: p.name)
def test_backward(run_case, problem, backend):
    """``torch.autograd.grad`` on a graph built once (retain_graph), for the problem's differentiable inputs."""
    run_case(f"backward {problem.name}", backend, problem.backward(get_backend(backend, CPU), CPU), problem.work,
             problem.unit, rounds=_rounds(problem, backend))
