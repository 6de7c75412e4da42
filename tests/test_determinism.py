"""Determinism and thread safety.

* CPU forward and backward of every op are bitwise identical run to run and for 1 or 2 intra-op threads: the
  CPU kernels partition their outputs (no atomics; each output element is summed in a fixed order by one
  thread), so the thread count only changes who computes an element, not how.
* The ops give identical results when called from several Python threads at once (no hidden global state).
* On CUDA, backward under ``torch.use_deterministic_algorithms(True)`` is either bitwise reproducible or
  refused with a clear error (scatter-adds with atomics are not order-stable).
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import tonno_fast
from tonno_fast import ops
from tonno_fast.geometry import make_geometry


def _available(name):
    return tonno_fast.backends().get(name) == "available"


CPU_BACKENDS = [pytest.param("reference"),
                pytest.param("cpu", marks=pytest.mark.skipif(not _available("cpu"), reason="tonno_fast._C not built"))]

SHAPE = (13, 17, 11)
DIRS = np.array([[0.0, 0.0, 1.0], [0.3, -0.2, 0.9], [1.0, 0.0, 0.0], [0.5, 0.5, 0.1], [-0.2, 0.7, 0.4]])
GEOM = make_geometry(SHAPE, spacing=(2.0, 0.8, 1.1), directions=DIRS, n_slices=15, slice_size=(17, 13))


def _inputs(dtype, device="cpu"):
    g = torch.Generator().manual_seed(7)
    N, S, h, w = GEOM.n_directions, GEOM.n_slices, GEOM.height, GEOM.width

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    theta = (torch.eye(3, 4, dtype=torch.float64) + 0.3 * torch.randn(2, 3, 4, generator=g, dtype=torch.float64))
    return dict(volume=r(2, 2, *SHAPE), sino=r(2, 2, N, S), stacks=r(1, 2, N, S, h, w), ags=r(2, 2, 9, 8, 7),
                theta=theta.to(device=device, dtype=dtype))


def run_all(backend, dtype=torch.float64, device="cpu"):
    """Forward output and input gradients (for a fixed random cotangent) of every op: a list of tensors."""
    x = _inputs(dtype, device)
    results = []

    def fb(fn, *inputs):
        inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
        y = fn(*inputs)
        r = torch.randn(y.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
        grads = torch.autograd.grad(y, inputs, r.to(device=y.device, dtype=y.dtype))
        results.extend([y.detach(), *grads])

    fb(lambda v: ops.slice_volume(v, GEOM, fill=0.25, backend=backend), x["volume"])
    fb(lambda v: ops.radon(v, GEOM, backend=backend), x["volume"])
    fb(lambda s: ops.backproject(s, GEOM, backend=backend), x["sino"])
    fb(lambda s: ops.backproject_slices(s, GEOM, backend=backend), x["stacks"])
    fb(lambda v, t: ops.affine_grid_sample(v, t, (2, 2, 6, 7, 8), False, backend=backend), x["ags"], x["theta"])
    return results


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and x.dtype == y.dtype, i
        assert torch.equal(x, y), f"result {i} differs: max |diff| = {float((x - y).abs().max())}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_bitwise_run_to_run(backend, dtype):
    assert_bitwise(run_all(backend, dtype), run_all(backend, dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_bitwise_across_thread_counts(backend, dtype):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_all(backend, dtype)
        torch.set_num_threads(2)
        two = run_all(backend, dtype)
    finally:
        torch.set_num_threads(before)
    assert_bitwise(one, two)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_deterministic_algorithms_mode(backend):
    """``torch.use_deterministic_algorithms(True)`` is accepted on the CPU and changes nothing."""
    free = run_all(backend)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        strict = run_all(backend)
    finally:
        torch.use_deterministic_algorithms(before)
    assert_bitwise(free, strict)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ops_from_several_python_threads(backend):
    """Four Python threads run every op (forward and backward) at the same time, twice each, while the
    intra-op pool is shared: every thread gets the serial result, bit for bit."""
    serial = run_all(backend)
    barrier = threading.Barrier(4)

    def work(_):
        barrier.wait()  # start together so the calls really overlap
        return [run_all(backend) for _ in range(2)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, range(4)))
    for per_thread in results:
        for res in per_thread:
            assert_bitwise(serial, res)


def test_heatmaps_from_several_python_threads():
    """Whole pipelines in parallel threads (different encoders and volumes) do not interfere."""
    vols = [torch.rand(9, 10, 11, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    encoders = [lambda x: x.sum(dim=(1, 2, 3)), lambda x: x.amax(dim=(1, 2, 3)), lambda x: (x * x).mean(dim=(1, 2, 3))]
    kw = dict(n_directions=5, slice_size=9, n_slices=9, batch_size=7)
    serial = [tonno_fast.tomographic_heatmap(v, e, **kw) for v, e in zip(vols, encoders)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        parallel = list(pool.map(lambda i: tonno_fast.tomographic_heatmap(vols[i], encoders[i], **kw), range(3)))
    assert_bitwise(serial, parallel)


@pytest.mark.skipif(not (torch.cuda.is_available() and _available("cuda")), reason="needs a GPU and CUDA kernels")
def test_cuda_backward_under_deterministic_algorithms():
    """Each CUDA backward is reproducible bit for bit when deterministic algorithms are requested, or refuses
    with an error that says so."""
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        try:
            a = run_all("cuda", device="cuda")
        except RuntimeError as exc:
            assert "determinis" in str(exc), str(exc)
            return
        b = run_all("cuda", device="cuda")
    finally:
        torch.use_deterministic_algorithms(before)
    assert_bitwise(a, b)
