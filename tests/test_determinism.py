"""Determinism and thread safety.

* CPU forward and backward of every op are bitwise identical run to run and for 1 or 2 intra-op threads: the
  CPU kernels partition their outputs (no atomics; each output element is summed in a fixed order by one
  thread), so the thread count only changes who computes an element, not how.
* The ops give identical results when called from several Python threads at once (no hidden global state).
* On a GPU the adjoints scatter with atomic adds by default (not order-stable); under
  ``torch.use_deterministic_algorithms(True)`` the CUDA and Triton adjoints take their deterministic path
  (contributions emitted to buffers and summed in a fixed order, chunk by chunk: ``run_scatter`` in
  ``csrc/ops/cuda/common.cuh`` and ``tonno_fast/ops/triton/_common.py``) and are bitwise reproducible. The
  chunking and the reduction of that path are unit-tested here; each op's deterministic adjoint is tested
  against the reference in ``tests/ops``.
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
    kw = dict(n_directions=5, slice_size=9, n_slices=9, batch_size=7, spacing=(1.0, 1.0, 1.0))
    serial = [tonno_fast.tomographic_heatmap(v, e, **kw) for v, e in zip(vols, encoders)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        parallel = list(pool.map(lambda i: tonno_fast.tomographic_heatmap(vols[i], encoders[i], **kw), range(3)))
    assert_bitwise(serial, parallel)


GPU_BACKENDS = [pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
                    not (torch.cuda.is_available() and _available("cuda")), reason="needs a GPU and CUDA kernels")]),
                pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(
                    not (torch.cuda.is_available() and _available("triton")), reason="needs a GPU and Triton")])]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_backward_under_deterministic_algorithms(backend, dtype):
    """Every GPU backward runs under ``torch.use_deterministic_algorithms(True)`` (the scatters' deterministic
    path), is reproducible bit for bit, and agrees with the default (atomic) path up to the order of the sums."""
    free = run_all(backend, dtype, device="cuda")
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        a = run_all(backend, dtype, device="cuda")
        b = run_all(backend, dtype, device="cuda")
    finally:
        torch.use_deterministic_algorithms(before)
    assert_bitwise(a, b)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for i, (x, y) in enumerate(zip(a, free)):
        scale = float(y.abs().max()) if y.numel() else 0.0
        assert float((x - y).abs().max()) <= rtol * max(scale, 1.0), i


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and _available("cuda")), reason="needs a GPU and CUDA kernels")
def test_cuda_deterministic_chunks(monkeypatch):
    """The CUDA adjoints' deterministic path split into many chunks (``TONNO_FAST_DETERMINISTIC_CHUNK`` = 300
    slots) is reproducible bit for bit and equals the one-chunk result to rounding (the chunks are summed one
    after the other: another order); a bad setting is refused with an error naming it."""
    one = _deterministic_run("cuda")
    monkeypatch.setenv("TONNO_FAST_DETERMINISTIC_CHUNK", "300")
    many, again = _deterministic_run("cuda"), _deterministic_run("cuda")
    assert_bitwise(many, again)
    for x, y in zip(one, many):
        assert float((x - y).abs().max()) <= 1e-12 * max(float(y.abs().max()), 1.0)
    monkeypatch.setenv("TONNO_FAST_DETERMINISTIC_CHUNK", "zero")
    with pytest.raises(RuntimeError, match="TONNO_FAST_DETERMINISTIC_CHUNK"):
        _deterministic_run("cuda")


def _deterministic_run(backend):
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        return run_all(backend, device="cuda")
    finally:
        torch.use_deterministic_algorithms(before)


# ---------------------------------------------------------------------------------------------------------
# The deterministic path of the Triton adjoints, unit by unit (the CUDA one, common.cuh, is the same algorithm).

def _triton_common():
    state = tonno_fast.backends().get("triton")
    if state != "available":
        pytest.skip(f"triton: {state}")
    from tonno_fast.ops.triton import _common
    return _common


@pytest.mark.triton
@pytest.mark.parametrize("n_outer, n_inner, per_pair, cap", [
    (6, 4, 96, 1 << 22), (6, 4, 96, 1000), (6, 4, 96, 200), (6, 4, 96, 1), (2, 60, 16, 200), (2, 60, 16, 961),
    (5, 7, 3, 21), (5, 7, 3, 20), (1, 1, 8, 1), (3, 1000, 8, 64),
])
def test_chunks_cover_the_work_once_within_the_bound(n_outer, n_inner, per_pair, cap):
    """Every (outer, inner) pair in exactly one chunk, in order; at most max(cap, per_pair) slots a chunk; whole
    outer items whenever one fits, and as few chunks as that allows."""
    c = _triton_common()
    plan = c.chunks(n_outer, n_inner, per_pair, cap)
    pairs = [(o, i) for o0, o1, i0, i1 in plan for o in range(o0, o1) for i in range(i0, i1)]
    assert pairs == [(o, i) for o in range(n_outer) for i in range(n_inner)]
    assert all((o1 - o0) * (i1 - i0) * per_pair <= max(cap, per_pair) for o0, o1, i0, i1 in plan)
    per_chunk = max(1, cap // per_pair)
    if n_inner * per_pair <= cap:
        assert all(i0 == 0 and i1 == n_inner for _, _, i0, i1 in plan)
        assert len(plan) == -(-n_outer // (per_chunk // n_inner))
    else:
        assert all(o1 == o0 + 1 for o0, o1, _, _ in plan)
        assert len(plan) == n_outer * -(-n_inner // per_chunk)


def _emitting_launch(calls, contributions):
    """A stand-in adjoint kernel for run_scatter: pair (o, i) adds the contributions ``contributions[o][i]``
    (a list of (target, value), at most per_pair of them), into their slots (emit) or atomically (``out``)."""
    def launch(o0, o1, i0, i1, index, value, emit, out=None):
        calls.append((o0, o1, i0, i1, emit))
        for o in range(o0, o1):
            for i in range(i0, i1):
                for r, (target, v) in enumerate(contributions[o][i]):
                    if emit:
                        s = ((o - o0) * (i1 - i0) + i - i0) * 4 + r
                        index[s], value[s] = target, v
                    else:
                        out.view(-1)[target] += v
    return launch


@pytest.mark.triton
@pytest.mark.parametrize("cap", [None, "1", "8", "13", "40"])
def test_run_scatter_sums_every_contribution(cap, monkeypatch):
    """run_scatter under deterministic algorithms: every emitted contribution summed once into its target
    (duplicates included, unwritten slots adding nothing) whatever the chunking, bitwise the same on a second run;
    outside that mode a single launch over everything, without buffers."""
    c = _triton_common()
    if cap is not None:
        monkeypatch.setenv("TONNO_FAST_DETERMINISTIC_CHUNK", cap)
    g = torch.Generator().manual_seed(3)
    n_outer, n_inner, numel = 3, 5, 7  # fewer targets than slots: the unwritten slots wrap around the output

    def pair():  # 0 to 4 contributions to random targets
        n = int(torch.randint(5, (1,), generator=g))
        targets = torch.randint(numel, (n,), generator=g).tolist()
        return list(zip(targets, torch.randn(n, generator=g, dtype=torch.float64).tolist()))
    contributions = [[pair() for _ in range(n_inner)] for _ in range(n_outer)]
    expected = torch.zeros(numel, dtype=torch.float64)
    for per_outer in contributions:
        for pair in per_outer:
            for target, v in pair:
                expected[target] += v
    dummy = torch.empty(0)

    def run():
        calls = []
        out = torch.zeros(numel, dtype=torch.float64)
        launch = _emitting_launch(calls, contributions)
        c.run_scatter(out, n_outer, n_inner, 4, dummy, lambda *a: launch(*a, out=out))
        return out, calls

    free, calls = run()
    assert calls == [(0, n_outer, 0, n_inner, False)]
    torch.testing.assert_close(free, expected, rtol=1e-14, atol=1e-14)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        first, calls = run()
        second, _ = run()
    finally:
        torch.use_deterministic_algorithms(before)
    assert all(emit for *_, emit in calls)
    assert [c_[:4] for c_ in calls] == c.chunks(n_outer, n_inner, 4, int(cap) if cap else c.DEFAULT_DETERMINISTIC_CHUNK)
    torch.testing.assert_close(first, expected, rtol=1e-14, atol=1e-14)
    assert torch.equal(first, second)


@pytest.mark.triton
def test_unwritten_slots_change_nothing():
    """The prefill of the slots no contribution writes (+0 spread over the output) leaves every element as the
    contributions make it, bit for bit, signed zeros and NaN included; an output with no element is left alone."""
    c = _triton_common()
    contributions = [[[(0, -0.0), (1, 2.5), (2, float("nan"))], [(1, -2.5)]]]
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        out = torch.zeros(4, dtype=torch.float64)
        c.run_scatter(out, 1, 2, 4, torch.empty(0), _emitting_launch([], contributions))
        empty = torch.zeros(0, dtype=torch.float64)
        c.run_scatter(empty, 1, 2, 4, torch.empty(0), _emitting_launch([], [[[], []]]))
    finally:
        torch.use_deterministic_algorithms(before)
    atomic = torch.zeros(4, dtype=torch.float64)
    for pair in contributions[0]:
        for target, v in pair:
            atomic[target] += v
    assert torch.equal(out[:2], atomic[:2]) and torch.isnan(out[2]) and torch.equal(out[3:], atomic[3:])
    assert str(out[0].item()) == "0.0"  # +0, as the atomic path gives


@pytest.mark.triton
@pytest.mark.parametrize("raw", ["0", "-5", "abc", "1.5"])
def test_bad_chunk_setting_is_refused(raw, monkeypatch):
    c = _triton_common()
    monkeypatch.setenv("TONNO_FAST_DETERMINISTIC_CHUNK", raw)
    with pytest.raises(ValueError, match="TONNO_FAST_DETERMINISTIC_CHUNK must be a positive integer"):
        c.deterministic_chunk()
    monkeypatch.setenv("TONNO_FAST_DETERMINISTIC_CHUNK", "123")
    assert c.deterministic_chunk() == 123
    monkeypatch.delenv("TONNO_FAST_DETERMINISTIC_CHUNK")
    assert c.deterministic_chunk() == c.DEFAULT_DETERMINISTIC_CHUNK == 1 << 22
