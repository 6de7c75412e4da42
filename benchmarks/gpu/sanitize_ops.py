"""Every CUDA kernel of tonno_fast once, on small inputs, for ``compute-sanitizer --tool memcheck``.

Covers each op and its backward in float32 and float64, the 16-byte-store and the one-pixel-per-thread
paths of slice_volume (bf16 and fp16 output too), fill != 0, slices partly outside the volume, B * C not a
multiple of the kernels' channel groups, and backproject's global-memory fallback for long rows; then every
benchmark problem of tonno_fast/ops/problems.py at a small size, forward and backward (so an op is covered
once it has a problem). It checks nothing numerically (tests/ops does); it exits 0 when every launch completed.
Run: ``compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/gpu/sanitize_ops.py``.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tonno_fast.geometry import make_geometry  # noqa: E402
from tonno_fast.ops.problems import make_problems  # noqa: E402
from tonno_fast.ops.registry import get_backend  # noqa: E402


def main() -> int:
    dev = torch.device("cuda")
    be = get_backend("cuda", dev)  # loads tonno_fast._C and defines the ops
    ops = torch.ops.tonno_fast
    geoms = [make_geometry((5, 6, 7), spacing=(1.0, 1.3, 0.8), n_directions=3),            # odd widths
             make_geometry((6, 5, 4), n_directions=2, slice_size=(3, 16), n_slices=5)]       # vector stores
    for dt in (torch.float32, torch.float64):
        for g in geoms:
            D, H, W = g.volume_shape
            N, S, h, w = g.n_directions, g.n_slices, g.height, g.width
            sm, vm = g.slice_maps(dtype=dt, device=dev), g.volume_maps(dtype=dt, device=dev)
            wt = g.weights.to(dev, dt)
            vol = torch.randn(2, 3, D, H, W, device=dev, dtype=dt)
            for odt in (None, torch.bfloat16, torch.float16):
                ops.slice_volume(vol, sm, S, h, w, 0.5, odt)
            ops.slice_volume_backward(torch.randn(2, N, S, 3, h, w, device=dev, dtype=dt), sm, [D, H, W])
            ops.radon(vol, sm, S, h, w, 0.7)
            ops.radon_backward(torch.randn(2, 3, N, S, device=dev, dtype=dt), sm, h, w, 0.7, [D, H, W])
            sino = torch.randn(2, 3, N, S, device=dev, dtype=dt)
            ops.backproject(sino, vm, wt, [D, H, W])
            ops.backproject_backward(torch.randn(2, 3, D, H, W, device=dev, dtype=dt), vm, wt, S)
            stacks = torch.randn(1, 5, N, S, h, w, device=dev, dtype=dt)
            ops.backproject_slices(stacks, vm, wt, [D, H, W])
            ops.backproject_slices_backward(torch.randn(1, 5, D, H, W, device=dev, dtype=dt), vm, wt, [S, h, w])
        long_rows = make_geometry((4, 4, 4), n_directions=2, n_slices=6000, slice_spacing=0.002)
        ops.backproject(torch.randn(1, 1, 2, 6000, device=dev, dtype=dt),
                        long_rows.volume_maps(dtype=dt, device=dev), long_rows.weights.to(dev, dt), [4, 4, 4])
        avol = torch.randn(2, 3, 5, 6, 7, device=dev, dtype=dt)
        theta = torch.tensor([[0.9, 0.3, 0.0, 0.1], [-0.3, 0.9, 0.1, 0.0], [0.0, -0.1, 1.1, -0.2]], dtype=dt)
        theta = torch.stack([theta, theta.flip(0)]).to(dev)
        for ac in (False, True):
            ops.affine_grid_sample(avol, theta, [2, 3, 4, 1, 6], ac)
            ops.affine_grid_sample_backward(torch.randn(2, 3, 4, 1, 6, device=dev, dtype=dt), avol, theta, ac,
                                            True, True)
    for problem in make_problems(12, 3, stack_volume=10, stack_directions=3, affine_batch=2):
        inputs = problem.make_inputs(dev)
        grads = [inputs[k].requires_grad_() for k in problem.differentiable]
        torch.autograd.grad(problem.call(be, inputs).sum(), grads)
    torch.cuda.synchronize()
    print("sanitize_ops: every CUDA kernel ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
