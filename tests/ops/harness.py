"""The checks every operator goes through, whatever its implementation.

An op's test module (``tests/ops/test_<op>.py``) states its cases; these helpers state the checks, once:
comparison with the reference backend, the dot-product test of the adjoint, ``gradcheck``, ``opcheck``,
``torch.compile``, bad arguments. The implementation under test is an :class:`Impl` (the ``backend`` and
``kernels`` fixtures of ``conftest.py``): ``reference``, ``cpu``, ``cuda`` or ``triton``, skipped where it cannot
run. Triton runs on CUDA tensors where a GPU exists and on CPU tensors under ``TRITON_INTERPRET=1`` otherwise
(the interpreter is slow: its cases are small).

Tolerances (relative to the largest magnitude of the expected tensor, since sums of many samples carry the
rounding of their largest terms): float64 1e-10, float32 1e-5.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import pytest
import torch

import tonno_fast
from tonno_fast.geometry import fibonacci_directions, make_geometry
from tonno_fast.ops import contract, registry

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = (torch.float64, torch.float32)
#: Every implementation, and those of the two op namespaces (the reference has none: it is plain PyTorch).
BACKENDS = ("reference", "cpu", "cuda", "triton")
KERNELS = ("cpu", "cuda", "triton")


@dataclass(frozen=True)
class Impl:
    """One implementation of the ops: its name, backend module, device and op namespace."""

    name: str
    module: object                  # the backend module: the ops with their schema arguments
    device: torch.device
    namespace: Optional[object]     # torch.ops.tonno_fast or torch.ops.tonno_fast_triton (None: reference)
    interpreted: bool = False       # Triton under TRITON_INTERPRET=1: keep cases tiny

    def op(self, name: str) -> Callable:
        """``torch.ops.<namespace>.<name>`` called with the common arguments of the contract; Triton-only
        fusions get their defaults (call the namespace's op to pass them)."""
        fusions = tuple(d for _, d in contract.CONTRACTS[name].fusions.values()) if self.name == "triton" else ()
        fn = getattr(self.namespace, name)
        return lambda *args: fn(*args, *fusions)

    def call(self, name: str, *args):
        """:meth:`op` with the tensor arguments moved to this implementation's device."""
        return self.op(name)(*(self.to(a) if isinstance(a, torch.Tensor) else a for a in args))

    def to(self, *tensors):
        moved = tuple(t.to(self.device) for t in tensors)
        return moved if len(moved) > 1 else moved[0]

    @property
    def atomic(self) -> bool:
        """Whether the adjoint scatters use atomic adds (a GPU, outside ``torch.use_deterministic_algorithms``):
        not bitwise reproducible."""
        return self.device.type == "cuda" and self.name != "cpu"


def _device(name: str) -> torch.device:
    return torch.device("cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu")


def unavailable(name: str) -> Optional[str]:
    """None if implementation ``name`` runs here, else why not."""
    state = tonno_fast.backends()[name]
    return None if state == "available" else state


def make_impl(name: str) -> Impl:
    device = _device(name)
    module = registry.get_backend(name, device)
    namespace = {"cpu": torch.ops.tonno_fast, "cuda": torch.ops.tonno_fast,
                 "triton": torch.ops.tonno_fast_triton}.get(name)
    return Impl(name, module, device, namespace, name == "triton" and device.type == "cpu")


def params(names: Sequence[str]):
    """pytest params for implementations, skipped where unavailable and marked ``cuda``/``triton``."""
    out = []
    for n in names:
        marks = [pytest.mark.skipif(unavailable(n) is not None, reason=f"backend {n}: {unavailable(n)}")]
        if n in ("cuda", "triton"):
            marks.append(getattr(pytest.mark, n))
        out.append(pytest.param(n, marks=marks, id=n))
    return out


@pytest.fixture(params=params(BACKENDS))
def backend(request) -> Impl:
    """Every implementation: reference, cpu, cuda, triton (skipped where unavailable). Test modules import it."""
    return make_impl(request.param)


@pytest.fixture(params=params(KERNELS))
def kernels(request) -> Impl:
    """The implementations registered as custom ops: cpu and cuda (``torch.ops.tonno_fast``), triton
    (``torch.ops.tonno_fast_triton``). Test modules import it."""
    return make_impl(request.param)


# ---------------------------------------------------------------------------------------------------------
# Data.

# Directions: Fibonacci, the three axes, near the pole and in the xy-plane (x, y, z).
DIRECTIONS = torch.cat([
    fibonacci_directions(5),
    torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                  [1e-9, 0.0, 1.0], [0.01, -0.02, 1.0], [0.6, -0.8, 0.0]], dtype=torch.float64),
])

#: The geometries of the op tests. "special": anisotropic, directions on and near the axes, default slicing;
#: "odd": odd slice widths (one pixel per CUDA thread); "vec": widths divisible by 8 (CUDA's 16-byte stores),
#: slices beyond the volume; "small": a Triton-interpreter-sized one, slices wider than the volume; "tiny":
#: a few hundred unknowns (gradcheck).
GEOMETRIES = {
    "special": make_geometry((7, 13, 21), spacing=(1.5, 1.0, 0.8), directions=DIRECTIONS),
    "odd": make_geometry((9, 10, 11), spacing=(1.0, 1.2, 0.9), n_directions=5),
    "vec": make_geometry((8, 7, 12), n_directions=3, slice_size=(6, 16), n_slices=9, pixel_spacing=0.8,
                         slice_spacing=1.7),
    "small": make_geometry((9, 10, 11), spacing=(1.2, 1.0, 0.9), directions=[[0, 0, 1], [1, 2, 3], [-2, 0.5, 1]],
                           n_slices=5, slice_size=(6, 7)),
    "tiny": make_geometry((3, 4, 5), spacing=(1.2, 1.0, 0.9), directions=[[0.3, 0.2, 0.9], [0.0, 0.0, 1.0]],
                          slice_size=(3, 4), n_slices=3),
}
INTERPRETER_GEOMETRIES = ("small", "tiny")


def geometry(name: str, impl: Impl):
    """Geometry ``name`` for ``impl``; the large ones are skipped under the Triton interpreter."""
    if impl.interpreted and name not in INTERPRETER_GEOMETRIES:
        pytest.skip(f"geometry {name!r} is too large for the Triton interpreter")
    return GEOMETRIES[name]

def rand(*shape, dtype=torch.float64, seed: int = 0, device="cpu") -> torch.Tensor:
    """Standard normal data, the same for a seed whatever the dtype and device."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous tensor (last two axes swapped in memory)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def random_theta(n: int, seed: int = 0) -> torch.Tensor:
    """Rotation-like affine maps with scales and shifts (float64), so parts of the output fall outside."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    scale = 0.7 + 0.6 * torch.rand(n, 1, 3, generator=g, dtype=torch.float64)
    shift = 0.4 * torch.randn(n, 3, 1, generator=g, dtype=torch.float64)
    return torch.cat([q * scale, shift], dim=2)


# ---------------------------------------------------------------------------------------------------------
# Checks.

def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Same shape, and max |actual - expected| <= rtol * max |expected|."""
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    scale = float(expected.detach().double().abs().max()) if expected.numel() else 0.0
    err = float((actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max()) \
        if actual.numel() else 0.0
    assert err <= rtol * max(scale, 1e-30), f"max abs error {err:.3g} > {rtol:g} * max |expected| {scale:.3g}"


def assert_close_elementwise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """``torch.testing.assert_close`` at 1e-12 (float64) or 1e-5 (float32), the absolute part scaled by the
    largest magnitude of ``expected`` (at least 1); an all-zero ``expected`` is refused (it checks nothing)."""
    t = 1e-5 if expected.dtype == torch.float32 else 1e-12
    s = float(expected.detach().abs().max())
    assert s > 0, "comparison against an all-zero reference checks nothing"
    torch.testing.assert_close(actual.detach().cpu(), expected.detach().cpu(), rtol=t, atol=t * max(s, 1.0))


def assert_matches(impl: Impl, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """``impl``'s result equals the reference's: element-wise (:func:`assert_close_elementwise`) for Triton,
    relative to the largest magnitude (:data:`TOL`) for the others."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    if impl.name == "triton":
        assert_close_elementwise(actual, expected)
    else:
        assert_close_rel(actual, expected, TOL[expected.dtype])


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum())


def assert_adjoint(ax: torch.Tensor, y: torch.Tensor, x: torch.Tensor, aty: torch.Tensor, rtol: float) -> None:
    """The dot-product test ``<A x, y> = <x, Aᵀ y>`` to ``rtol`` of the larger side."""
    lhs, rhs = dot(ax, y), dot(x, aty)
    assert abs(lhs - rhs) <= rtol * max(abs(lhs), abs(rhs), 1e-30), (lhs, rhs)


def vjp(fn: Callable, x: torch.Tensor, seed: int = 1):
    """``(y, gy, dx)``: ``y = fn(x)``, a random cotangent ``gy`` (``seed``) and ``dx = (d fn / d x)ᵀ gy``."""
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    gy = rand(*y.shape, dtype=y.dtype, seed=seed, device=y.device)
    (dx,) = torch.autograd.grad(y, x, gy)
    return y.detach(), gy, dx


REFERENCE = registry.get_backend("reference", "cpu")


def against_reference(impl: Impl, fn: Callable[[object, torch.Tensor], torch.Tensor], x: torch.Tensor,
                      seed: int = 1) -> torch.Tensor:
    """``fn(backend_module, x)`` of ``impl`` equals the reference's (:func:`assert_matches`), forward and backward
    for a random cotangent (``seed``); returns ``impl``'s output. The reference runs on the CPU in float64, so
    ``fn`` builds its geometry tensors in its input's dtype and on its device."""
    y, gy, dx = vjp(lambda t: fn(impl.module, t), x.to(impl.device), seed)
    y_ref, _, dx_ref = vjp(lambda t: fn(REFERENCE, t), x.cpu().double(), seed)  # the float64 oracle
    assert_matches(impl, y, y_ref.to(y.dtype))
    assert_matches(impl, dx, dx_ref.to(dx.dtype))
    return y


def gradcheck(fn: Callable, inputs: Sequence[torch.Tensor], impl: Impl, second_order: bool = True,
              atomic: Optional[bool] = None) -> None:
    """``torch.autograd.gradcheck`` (float64) and, for a linear op, ``gradgradcheck``. Atomic adjoints
    (``atomic``, default ``impl.atomic``) may differ in their last bits between two backward calls: that
    rounding is allowed (``nondet_tol``); the others are held to bitwise reentrancy."""
    if impl.interpreted:
        pytest.skip("finite differences through the Triton interpreter take minutes")
    tol = 1e-12 if (impl.atomic if atomic is None else atomic) else 0.0
    inputs = tuple(t.detach().to(impl.device).requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(fn, inputs, nondet_tol=tol)
    if second_order:
        assert torch.autograd.gradgradcheck(fn, inputs, nondet_tol=tol)


def opcheck(op, args: tuple, grad_args: Sequence[int] = ()) -> None:
    """``torch.library.opcheck`` (schema, fake kernel, autograd registration, AOT dispatch), then again with the
    inputs ``grad_args`` requiring grad."""
    torch.library.opcheck(op, args)
    if grad_args:
        args = tuple(a.detach().clone().requires_grad_() if i in grad_args else a for i, a in enumerate(args))
        torch.library.opcheck(op, args)


def assert_compiles(fn: Callable, x: torch.Tensor, backend: str = "inductor", exact: bool = True) -> None:
    """``torch.compile(fn, fullgraph=True)`` traces ``fn`` (fake kernels) and gives the eager result, forward and
    backward: bit for bit when the graph holds only the custom ops (extern kernels, ``exact``), else to
    :func:`assert_close_elementwise` (the compiler may reorder the other reductions)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    x1, x2 = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    out, eager = compiled(x1), fn(x2)
    g1, g2 = torch.autograd.grad(out.sum(), x1)[0], torch.autograd.grad(eager.sum(), x2)[0]
    if exact:
        assert torch.equal(out, eager)
        assert torch.equal(g1, g2)
    else:
        assert_close_elementwise(out, eager)
        assert_close_elementwise(g1, g2)


def assert_rejects(call: Callable, pattern: str) -> None:
    """A direct op call with a bad argument raises RuntimeError naming it (never crashes, never returns)."""
    with pytest.raises(RuntimeError, match=pattern):
        call()


def ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of ``t``'s floating format at each element (the larger of the two neighbours), as float32."""
    up = torch.nextafter(t, torch.full_like(t, math.inf)).float()
    down = torch.nextafter(t, torch.full_like(t, -math.inf)).float()
    return torch.maximum(up - t.float(), t.float() - down)


@contextlib.contextmanager
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True)`` for the block."""
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def assert_thread_count_invariant(fn: Callable[[], object]) -> None:
    """``fn()`` gives bitwise the same tensors twice with two threads and once with one thread (CPU kernels
    partition their outputs: the thread count changes who computes an element, not how)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = fn(), fn()
        torch.set_num_threads(1)
        single = fn()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(*(r if isinstance(r, (tuple, list)) else (r,) for r in (first, second, single))):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


def _assert_same(a, b) -> None:
    """Bitwise equal tensors, or tuples of them."""
    for x, y in zip(*(r if isinstance(r, (tuple, list)) else (r,) for r in (a, b))):
        assert torch.equal(x, y), f"max |diff| = {float((x.double() - y.double()).abs().max())}"


def assert_deterministic(impl: Impl, forward: Callable, adjoint: Callable) -> None:
    """``forward()`` (a gather) is bitwise reproducible. The adjoint too on the CPU, for any thread count
    (:func:`assert_thread_count_invariant`). Under ``torch.use_deterministic_algorithms(True)``, everywhere, both
    run (the GPU adjoints take their deterministic path rather than refusing) and are bitwise reproducible."""
    assert torch.equal(forward(), forward())
    if impl.device.type == "cpu":
        assert_thread_count_invariant(adjoint)
    with deterministic_algorithms(), triton_reductions():
        assert torch.equal(forward(), forward())
        _assert_same(adjoint(), adjoint())


@contextlib.contextmanager
def triton_reductions():
    """Records the deterministic path of the Triton adjoints (``tonno_fast.ops.triton._common``): yields a dict
    with ``chunks`` (how many chunks :func:`~tonno_fast.ops.triton._common.run_scatter` planned), ``caps`` (the
    slots per chunk it planned them with) and ``sums`` (the calls of its reduction, ``reduce_contributions``).
    Under the interpreter the programs run one after another, so the atomic path would be reproducible there
    too: these counts are what shows the deterministic path ran."""
    record = {"chunks": 0, "caps": set(), "sums": 0}
    if unavailable("triton") is not None:
        yield record
        return
    from tonno_fast.ops.triton import _common
    chunks, reduce = _common.chunks, _common.reduce_contributions

    def counted_chunks(n_outer, n_inner, per_pair, cap):
        out = chunks(n_outer, n_inner, per_pair, cap)
        record["chunks"] += len(out)
        record["caps"].add(cap)
        return out

    def counted_reduce(*args):
        record["sums"] += 1
        return reduce(*args)

    _common.chunks, _common.reduce_contributions = counted_chunks, counted_reduce
    try:
        yield record
    finally:
        _common.chunks, _common.reduce_contributions = chunks, reduce


def deterministic_against_reference(impl: Impl, fn: Callable[[object, torch.Tensor], torch.Tensor], x: torch.Tensor,
                                    chunk: Optional[int], monkeypatch, seed: int = 1) -> None:
    """Under ``torch.use_deterministic_algorithms(True)``: the backward of ``fn`` (as in :func:`against_reference`)
    on ``impl`` runs, equals the reference's and is bitwise the same on a second run. ``chunk``: contribution slots
    per chunk of the GPU adjoints' deterministic path (``TONNO_FAST_DETERMINISTIC_CHUNK``; ``None``: the default,
    one chunk at these sizes). For Triton it also checks that the deterministic path ran, with ``chunk`` slots
    per chunk, and summed as many chunks as it planned."""
    if chunk is not None:
        if impl.name == "cpu":
            pytest.skip("the CPU adjoints are deterministic partitions: no chunks")
        monkeypatch.setenv("TONNO_FAST_DETERMINISTIC_CHUNK", str(chunk))
    with deterministic_algorithms(), triton_reductions() as record:
        against_reference(impl, fn, x, seed)
        first = vjp(lambda t: fn(impl.module, t), x.to(impl.device), seed)[2]
        second = vjp(lambda t: fn(impl.module, t), x.to(impl.device), seed)[2]
    assert torch.equal(first, second)
    if impl.name == "triton":  # three backward runs above: at least one chunk each, several with one slot each
        from tonno_fast.ops.triton._common import DEFAULT_DETERMINISTIC_CHUNK
        assert record["caps"] == {chunk or DEFAULT_DETERMINISTIC_CHUNK}, record
        assert record["sums"] == record["chunks"] >= (6 if chunk in (1, 200) else 3), record
    else:
        assert record["sums"] == 0, record


def fuzz_against_reference(impl: Impl, make_input: Callable, op: Callable) -> None:
    """Property-based test (``fuzzing.py``, hypothesis): for drawn cases (``case``, its geometry ``g``),
    ``op(case, g)(x, backend=...)`` on ``impl`` equals the reference for ``x = make_input(case, g)``, forward,
    backward and the adjoint identity."""
    fuzzing = pytest.importorskip("fuzzing")  # needs hypothesis

    @fuzzing.fuzz(impl.name)
    def check(case):
        g = case.geometry()
        fuzzing.compare(case, impl.name, lambda: make_input(case, g), op(case, g))
    check()


def assert_raises(call: Callable, exc: type, pattern: str) -> None:
    """A public function refuses a bad argument with ``exc`` and a message matching ``pattern``."""
    with pytest.raises(exc, match=pattern):
        call()
