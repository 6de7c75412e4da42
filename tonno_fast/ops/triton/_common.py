"""Shared pieces of the Triton kernels: per-point maths (``@triton.jit`` helpers), the voxel tiles of the
backprojection kernels, launch helpers and heuristics.

The ``@triton.jit`` helpers are the Triton transcription of ``csrc/include/tonno_fast/maths.h`` (one copy,
used by every op module), with the same conventions as the reference backend:

* a map is a row-major 3x4 matrix ``M``; ``M @ (a, b, c, 1)`` is a continuous index into the array read;
* linear interpolation along an axis of size ``n`` at ``x`` uses taps ``floor(x)`` and ``floor(x) + 1`` with
  weights ``1 - f`` and ``f``; a tap outside ``[0, n-1]`` gets weight 0 and a clamped (safe) index 0, exactly
  ``grid_sample(padding_mode="zeros")``;
* the validity test ``(x > -1) & (x < n)`` is False for NaN, and a NaN coordinate is replaced by 0 before
  ``floor`` and the integer cast, so NaN maps read nothing instead of producing garbage indices.

Loads and scattered adds of a corner are masked by ``weight != 0``: an invalid corner is never touched (so a
NaN/inf stored at index 0 cannot leak in through a zero weight), and a valid corner with weight exactly 0
contributes nothing anyway.

The adjoint kernels (scatters) add their contributions through :func:`sink_add`: with ``tl.atomic_add`` by
default, or, under ``torch.use_deterministic_algorithms(True)``, by writing each contribution to its own slot of
two buffers that :func:`run_scatter` then sums in a fixed order (the ``EMIT`` constexpr of every adjoint
kernel: one kernel, two sinks). See :func:`run_scatter` for why and for the memory it takes.

The ops themselves (schemas, checks, fake kernels, autograd) are defined from the launchers by
:func:`tonno_fast.ops.contract.define_triton`.
"""
from __future__ import annotations

import os
from typing import Callable, List, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "launch", "pow2_block", "one_per_thread", "interpreter_block", "interpreter_block_bk",
           "scalars", "DEFAULT_DETERMINISTIC_CHUNK", "deterministic_chunk", "chunks",
           "reduce_contributions", "run_scatter", "sink_add", "voxel_coords", "voxel_tile", "row_offsets",
           "tile_offsets",
           "linear_taps", "linear_taps_dx", "apply_row", "bilinear_gather", "bilinear_scatter",
           "trilinear_gather", "trilinear_scatter", "trilinear_gather_with_grad", "slice_taps"]

@triton.jit
def _probe():
    pass


# `@triton.jit` returns an InterpretedFunction (not a JITFunction) when TRITON_INTERPRET=1 was set before
# triton was imported; testing the object is more reliable than re-reading the environment variable.
INTERPRETED: bool = not isinstance(_probe, triton.runtime.jit.JITFunction)


class launch:
    """``launch(kernel, like)[grid](*args, **meta)``: the kernel wrapped for graph capture (``wrap_triton``;
    under the interpreter, the kernel itself), launched with ``like``'s CUDA device current. Triton launches on
    the *current* device and its current stream, not on the arguments' device: without the guard a tensor on
    ``cuda:1`` would be read by a kernel running on ``cuda:0``."""

    def __init__(self, kernel, like: torch.Tensor):
        self.kernel = torch.library.wrap_triton(kernel)
        self.device = like.device

    def __getitem__(self, grid):
        run = self.kernel[grid]
        if self.device.type != "cuda":
            return run

        def guarded(*args, **kwargs):
            with torch.cuda.device(self.device):
                return run(*args, **kwargs)
        return guarded


def pow2_block(n: int, lo: int, hi: int) -> int:
    """The smallest power of two ``>= n``, clamped to ``[lo, hi]`` (``tl.arange`` needs powers of two)."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, int(n)))))


# Under the interpreter every program is a Python-level loop iteration over NumPy vectors, so launchers use
# few, wide programs there. Tests lower these caps to force several programs per row (and masked tails) and
# several batch×channel tiles in the backprojections.
INTERPRETER_MAX_BLOCK = 4096
INTERPRETER_MAX_BLOCK_BK = 16


def interpreter_block(n: int) -> int:
    """Block size for ``n`` elements under the interpreter: ``n`` rounded up, in ``[16, INTERPRETER_MAX_BLOCK]``."""
    return pow2_block(n, min(16, INTERPRETER_MAX_BLOCK), INTERPRETER_MAX_BLOCK)


def one_per_thread(block: int) -> int:
    """``num_warps`` giving one element of a ``block``-long vector per thread (1 to 8 warps).

    NOTE (ptxas -v, sm_90a, float32, Triton 3.8): the gather kernels hold ~40-50 registers per element in
    flight (eight corner offsets, weights, masks); two elements per thread doubled that (slice_volume at 256
    pixels: 80 registers with 4 warps, 48 with 8), cutting occupancy from ~60% to ~37% of the SM's warps
    for a latency-bound gather. Hence one element per thread wherever the tile allows it."""
    return max(1, min(8, block // 32))


def interpreter_block_bk(bk: int) -> int:
    """Rows of batch×channel per backprojection tile under the interpreter."""
    return pow2_block(bk, 1, INTERPRETER_MAX_BLOCK_BK)


#: Contribution slots per chunk of the deterministic adjoints (:func:`run_scatter`) unless the environment
#: variable ``TONNO_FAST_DETERMINISTIC_CHUNK`` says otherwise; the CUDA kernels read the same variable
#: (``csrc/ops/cuda/common.cuh``).
DEFAULT_DETERMINISTIC_CHUNK = 1 << 22
DETERMINISTIC_CHUNK_ENV = "TONNO_FAST_DETERMINISTIC_CHUNK"


def deterministic_chunk() -> int:
    """Contribution slots per chunk of the deterministic adjoints: ``TONNO_FAST_DETERMINISTIC_CHUNK`` (read at each
    call) or :data:`DEFAULT_DETERMINISTIC_CHUNK`."""
    raw = os.environ.get(DETERMINISTIC_CHUNK_ENV, "")
    if raw == "":
        return DEFAULT_DETERMINISTIC_CHUNK
    value = int(raw) if raw.strip().isdigit() else 0
    if value <= 0:
        raise ValueError(f"{DETERMINISTIC_CHUNK_ENV} must be a positive integer (contribution slots per chunk of "
                         f"the deterministic adjoints), got {raw!r}")
    return value


def chunks(n_outer: int, n_inner: int, per_pair: int, cap: int) -> List[Tuple[int, int, int, int]]:
    """The chunks ``(o0, o1, i0, i1)`` of :func:`run_scatter`, in order: ranges of whole outer items when one
    outer item (``n_inner * per_pair`` slots) fits in ``cap``, else ranges of the inner items of one outer item.
    Together they cover ``[0, n_outer) × [0, n_inner)`` once; each holds at most ``max(cap, per_pair)`` slots."""
    pairs = max(1, cap // per_pair)
    if n_inner <= pairs:
        step = pairs // n_inner
        return [(o0, min(n_outer, o0 + step), 0, n_inner) for o0 in range(0, n_outer, step)]
    return [(o, o + 1, i0, min(n_inner, i0 + pairs)) for o in range(n_outer) for i0 in range(0, n_inner, pairs)]


def reduce_contributions(out: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> None:
    """``out.view(-1)[index[s]] += value[s]`` for every slot ``s``, in a fixed order: ``index_put_`` with
    ``accumulate=True``, which on CUDA sorts the slots by target with a stable radix sort and sums each target's
    run in a fixed pattern (what ``torch.index_add`` does under ``torch.use_deterministic_algorithms(True)``, where
    torch's documentation lists it among the ops that then act deterministically), and on a CPU tensor adds
    serially in deterministic mode (also listed there)."""
    out.view(-1).index_put_((index,), value, accumulate=True)


def run_scatter(out: torch.Tensor, n_outer: int, n_inner: int, per_pair: int, dummy: torch.Tensor,
                launch: Callable) -> torch.Tensor:
    """Run an adjoint kernel into ``out`` (zeroed, contiguous) and return it.

    ``launch(o0, o1, i0, i1, index, value, emit)`` launches the kernel over the outer items ``[o0, o1)`` and inner
    items ``[i0, i1)`` of its work; each (outer, inner) pair adds at most ``per_pair`` contributions, which with
    ``emit`` (the kernel's ``EMIT`` constexpr) go to slots ``((o - o0)·(i1 - i0) + i - i0)·per_pair + r`` of the
    buffers ``index`` (int64 flat target in ``out``) and ``value``.

    By default: one launch over everything with atomic adds (``index`` and ``value`` are ``dummy``, a tensor the
    kernel then never touches). Under ``torch.use_deterministic_algorithms(True)`` (``warn_only`` too: nothing
    to warn about any more): chunks of at most ``max(cap, per_pair)`` slots (:func:`chunks`, ``cap`` =
    :func:`deterministic_chunk`), each launched with ``emit`` and summed by :func:`reduce_contributions`, one
    after the other: bitwise reproducible, and the same products as the atomic path, summed in another order.
    Memory: one chunk's buffers, ``8 + itemsize`` bytes per slot (64 MiB at the default 2²² slots in float64),
    plus ``index_put_``'s sort of them (a few int64 per slot), whatever the problem size.

    Slots no contribution writes (invalid corners, masked lanes) keep their prefill: value +0 at index
    ``s mod out.numel()``. Adding +0 changes no element (``x + 0 == x`` but for ``x = -0``, and a sum starting
    from +0, as ``out`` does, is never -0); spreading those slots over ``out`` keeps the sort from piling them
    onto one element.

    Why this design rather than a gather formulation (every output element summing its own contributions):
    the gather needs, for every voxel, the samples whose stencil touches it, i.e. the preimage of its
    neighbourhood under the map, which exists only for invertible maps (``affine_grid_sample`` takes any
    ``theta``) and grows with the sampling density; and it would be a second kernel per op to keep equal to
    the scatter. Emitting reuses the scatter kernel and works for any map. The atomic path stays the default:
    the emit path writes every contribution to memory and sorts it (its speed is not measured yet)."""
    if not torch.are_deterministic_algorithms_enabled():
        launch(0, n_outer, 0, n_inner, dummy, dummy, False)
        return out
    numel = out.numel()
    if numel == 0 or n_outer == 0 or n_inner == 0 or per_pair == 0:
        return out
    for o0, o1, i0, i1 in chunks(n_outer, n_inner, per_pair, deterministic_chunk()):
        slots = (o1 - o0) * (i1 - i0) * per_pair
        index = torch.arange(slots, device=out.device)
        if slots > numel:
            index = index % numel
        value = out.new_zeros(slots)
        launch(o0, o1, i0, i1, index, value, True)
        reduce_contributions(out, index, value)
    return out


def scalars(values, like: torch.Tensor) -> torch.Tensor:
    """Float parameters as a small tensor in ``like``'s dtype: a Python float passed to a compiled Triton
    kernel is a float32 scalar, which would round float64 parameters (fill, window bounds) to 1e-8."""
    return torch.tensor([float(v) for v in values], dtype=like.dtype, device=like.device)


# ----------------------------------------------------------------------------------------------------------
# Tiles of the backprojection kernels: BLOCK_BK batch×channel rows × BLOCK_V flat voxels of a (D, H, W) volume.

@triton.jit
def voxel_coords(vox, H, W, ct):
    """Float ``(d, h, w)`` (dtype ``ct``) of flat voxel indices ``vox`` of a ``(D, H, W)`` volume."""
    return (vox // (H * W)).to(ct), ((vox // W) % H).to(ct), (vox % W).to(ct)


@triton.jit
def voxel_tile(pid, pbk, first, BK, D, H, W, ct, BLOCK_BK: tl.constexpr, BLOCK_V: tl.constexpr):
    """Tile ``(pid, pbk)``: ``V = D·H·W`` (int64), the flat voxels ``vox`` ``(BLOCK_V,)`` (from voxel ``first``)
    and their float coordinates ``fd, fh, fw``, the batch×channel rows ``bk`` ``(BLOCK_BK,)`` and the in-bounds
    mask ``(BLOCK_BK, BLOCK_V)`` of the tile."""
    V = tl.cast(D, tl.int64) * H * W
    vox = first + pid * BLOCK_V + tl.arange(0, BLOCK_V)
    fd, fh, fw = voxel_coords(vox, H, W, ct)
    bk = pbk * BLOCK_BK + tl.arange(0, BLOCK_BK)
    return V, vox, fd, fh, fw, bk, (bk < BK)[:, None] & (vox < V)[None, :]


@triton.jit
def row_offsets(bk, K, sb, sk):
    """``(BLOCK_BK, 1)`` offsets of rows ``bk = b·K + k`` of a tensor with batch/channel strides ``sb, sk``."""
    return ((bk // K) * sb + (bk % K) * sk)[:, None]


@triton.jit
def tile_offsets(bk, K, vox, H, W, sb, sk, sd, sh, sw):
    """``(BLOCK_BK, BLOCK_V)`` offsets of ``[b, k, d, h, w]`` in a (possibly non-contiguous) ``(B, K, D, H, W)``
    tensor with strides ``sb, sk, sd, sh, sw``."""
    return row_offsets(bk, K, sb, sk) + ((vox // (H * W)) * sd + ((vox // W) % H) * sh + (vox % W) * sw)[None, :]


# ----------------------------------------------------------------------------------------------------------
# Per-point maths (maths.h in Triton).

@triton.jit
def apply_row(m_ptr, ROW: tl.constexpr, a, b, c):
    """Row ``ROW`` of the row-major 3x4 map at ``m_ptr`` applied to ``(a, b, c, 1)``."""
    m0 = tl.load(m_ptr + ROW * 4 + 0)
    m1 = tl.load(m_ptr + ROW * 4 + 1)
    m2 = tl.load(m_ptr + ROW * 4 + 2)
    m3 = tl.load(m_ptr + ROW * 4 + 3)
    return m0 * a + m1 * b + m2 * c + m3


@triton.jit
def linear_taps(x, n):
    """Taps of linear interpolation at ``x`` along an axis of size ``n``: ``(i0, i1, w0, w1)``.

    Invalid taps have weight 0 and index 0. NaN-safe (see module docstring)."""
    ok = (x > -1.0) & (x < n)
    xs = tl.where(ok, x, 0.0)
    fl = tl.floor(xs)
    i = fl.to(tl.int64)
    f = xs - fl
    v0 = ok & (i >= 0)
    v1 = ok & (i + 1 <= n - 1)
    w0 = tl.where(v0, 1.0 - f, 0.0)
    w1 = tl.where(v1, f, 0.0)
    i0 = tl.where(v0, i, 0)
    i1 = tl.where(v1, i + 1, 0)
    return i0, i1, w0, w1


@triton.jit
def linear_taps_dx(x, n):
    """Derivatives of the tap weights ``(w0, w1)`` of :func:`linear_taps` with respect to ``x``: ``-1`` and
    ``+1`` for valid taps, else 0 (as maths.h ``linear_taps_dx`` and PyTorch's grid_sample backward)."""
    ok = (x > -1.0) & (x < n)
    i = tl.floor(tl.where(ok, x, 0.0)).to(tl.int64)
    zero = tl.zeros_like(x)
    d0 = tl.where(ok & (i >= 0), zero - 1.0, zero)
    d1 = tl.where(ok & (i + 1 <= n - 1), zero + 1.0, zero)
    return d0, d1


@triton.jit
def bilinear_gather(ptr, base, i0, i1, wi0, wi1, j0, j1, wj0, wj1, s1, s2, mask):
    """``Σ wi wj a[base + i s1 + j s2]`` over the four corners (masked loads, zero weight → no load)."""
    a00 = tl.load(ptr + base + i0 * s1 + j0 * s2, mask=mask & (wi0 * wj0 != 0), other=0.0)
    a01 = tl.load(ptr + base + i0 * s1 + j1 * s2, mask=mask & (wi0 * wj1 != 0), other=0.0)
    a10 = tl.load(ptr + base + i1 * s1 + j0 * s2, mask=mask & (wi1 * wj0 != 0), other=0.0)
    a11 = tl.load(ptr + base + i1 * s1 + j1 * s2, mask=mask & (wi1 * wj1 != 0), other=0.0)
    return wi0 * (wj0 * a00 + wj1 * a01) + wi1 * (wj0 * a10 + wj1 * a11)


@triton.jit
def sink_add(out_ptr, offset, value, mask, idx_ptr, val_ptr, slot, EMIT: tl.constexpr):
    """``out[offset] += value`` where ``mask``: with ``tl.atomic_add`` (the order of the adds, hence the last bits
    of float results, varies between runs on a GPU), or with ``EMIT`` by writing ``(offset, value)`` to slot
    ``slot`` of the buffers ``idx_ptr``/``val_ptr``, which :func:`run_scatter` sums in a fixed order."""
    if EMIT:
        tl.store(idx_ptr + slot, offset, mask=mask)
        tl.store(val_ptr + slot, value, mask=mask)
    else:
        tl.atomic_add(out_ptr + offset, value, mask=mask)


@triton.jit
def bilinear_scatter(ptr, base, i0, i1, wi0, wi1, j0, j1, wj0, wj1, s1, s2, val, mask,
                     idx_ptr, val_ptr, slot, EMIT: tl.constexpr):
    """Adjoint of :func:`bilinear_gather`: ``a[corner] += wi wj val`` through :func:`sink_add` (slots
    ``slot .. slot + 3`` with ``EMIT``)."""
    w00 = wi0 * wj0
    w01 = wi0 * wj1
    w10 = wi1 * wj0
    w11 = wi1 * wj1
    sink_add(ptr, base + i0 * s1 + j0 * s2, w00 * val, mask & (w00 != 0), idx_ptr, val_ptr, slot, EMIT)
    sink_add(ptr, base + i0 * s1 + j1 * s2, w01 * val, mask & (w01 != 0), idx_ptr, val_ptr, slot + 1, EMIT)
    sink_add(ptr, base + i1 * s1 + j0 * s2, w10 * val, mask & (w10 != 0), idx_ptr, val_ptr, slot + 2, EMIT)
    sink_add(ptr, base + i1 * s1 + j1 * s2, w11 * val, mask & (w11 != 0), idx_ptr, val_ptr, slot + 3, EMIT)


@triton.jit
def trilinear_gather(ptr, base, t0, t1, tw0, tw1, i0, i1, wi0, wi1, j0, j1, wj0, wj1, s0, s1, s2, mask):
    """Trilinear value from precomputed taps of the three axes (taps shared by every batch item/channel)."""
    p0 = bilinear_gather(ptr, base + t0 * s0, i0, i1, wi0, wi1, j0, j1, wj0, wj1, s1, s2, mask & (tw0 != 0))
    p1 = bilinear_gather(ptr, base + t1 * s0, i0, i1, wi0, wi1, j0, j1, wj0, wj1, s1, s2, mask & (tw1 != 0))
    return tw0 * p0 + tw1 * p1


@triton.jit
def trilinear_scatter(ptr, base, t0, t1, tw0, tw1, i0, i1, wi0, wi1, j0, j1, wj0, wj1, s0, s1, s2, val, mask,
                      idx_ptr, val_ptr, slot, EMIT: tl.constexpr):
    """Adjoint of :func:`trilinear_gather` through :func:`sink_add` (slots ``slot .. slot + 7`` with ``EMIT``)."""
    bilinear_scatter(ptr, base + t0 * s0, i0, i1, wi0, wi1, j0, j1, wj0, wj1, s1, s2, tw0 * val,
                     mask & (tw0 != 0), idx_ptr, val_ptr, slot, EMIT)
    bilinear_scatter(ptr, base + t1 * s0, i0, i1, wi0, wi1, j0, j1, wj0, wj1, s1, s2, tw1 * val,
                     mask & (tw1 != 0), idx_ptr, val_ptr, slot + 4, EMIT)


@triton.jit
def trilinear_gather_with_grad(ptr, base, t0, t1, tw0, tw1, td0, td1, i0, i1, wi0, wi1, di0, di1,
                               j0, j1, wj0, wj1, dj0, dj1, s0, s1, s2, mask):
    """Trilinear value and its gradient with respect to the continuous index ``(x0, x1, x2)``
    (``d*`` from :func:`linear_taps_dx`). A corner is loaded when it is valid (its derivative weight may be
    nonzero even where the interpolation weight is 0)."""
    m00 = mask & (td0 != 0) & (di0 != 0)
    m01 = mask & (td0 != 0) & (di1 != 0)
    m10 = mask & (td1 != 0) & (di0 != 0)
    m11 = mask & (td1 != 0) & (di1 != 0)
    b0 = base + t0 * s0
    b1 = base + t1 * s0
    a000 = tl.load(ptr + b0 + i0 * s1 + j0 * s2, mask=m00 & (dj0 != 0), other=0.0)
    a001 = tl.load(ptr + b0 + i0 * s1 + j1 * s2, mask=m00 & (dj1 != 0), other=0.0)
    a010 = tl.load(ptr + b0 + i1 * s1 + j0 * s2, mask=m01 & (dj0 != 0), other=0.0)
    a011 = tl.load(ptr + b0 + i1 * s1 + j1 * s2, mask=m01 & (dj1 != 0), other=0.0)
    a100 = tl.load(ptr + b1 + i0 * s1 + j0 * s2, mask=m10 & (dj0 != 0), other=0.0)
    a101 = tl.load(ptr + b1 + i0 * s1 + j1 * s2, mask=m10 & (dj1 != 0), other=0.0)
    a110 = tl.load(ptr + b1 + i1 * s1 + j0 * s2, mask=m11 & (dj0 != 0), other=0.0)
    a111 = tl.load(ptr + b1 + i1 * s1 + j1 * s2, mask=m11 & (dj1 != 0), other=0.0)
    # Bilinear combinations along the last two axes for each slice tap, and their derivatives.
    r0 = wi0 * (wj0 * a000 + wj1 * a001) + wi1 * (wj0 * a010 + wj1 * a011)
    r1 = wi0 * (wj0 * a100 + wj1 * a101) + wi1 * (wj0 * a110 + wj1 * a111)
    val = tw0 * r0 + tw1 * r1
    g0 = td0 * r0 + td1 * r1
    g1 = (tw0 * (di0 * (wj0 * a000 + wj1 * a001) + di1 * (wj0 * a010 + wj1 * a011))
          + tw1 * (di0 * (wj0 * a100 + wj1 * a101) + di1 * (wj0 * a110 + wj1 * a111)))
    g2 = (tw0 * (wi0 * (dj0 * a000 + dj1 * a001) + wi1 * (dj0 * a010 + dj1 * a011))
          + tw1 * (wi0 * (dj0 * a100 + dj1 * a101) + wi1 * (dj0 * a110 + dj1 * a111)))
    return val, g0, g1, g2


@triton.jit
def slice_taps(maps_ptr, n, k, pix, w, D, H, W):
    """Taps of pixel ``pix`` (flat ``i*w + j``) of slice ``k`` of direction ``n`` in a ``(D, H, W)`` volume."""
    ct = maps_ptr.dtype.element_ty
    m_ptr = maps_ptr + n * 12
    fk = k.to(ct)
    fi = (pix // w).to(ct)
    fj = (pix % w).to(ct)
    x0 = apply_row(m_ptr, 0, fk, fi, fj)
    x1 = apply_row(m_ptr, 1, fk, fi, fj)
    x2 = apply_row(m_ptr, 2, fk, fi, fj)
    d0, d1, dw0, dw1 = linear_taps(x0, D)
    h0, h1, hw0, hw1 = linear_taps(x1, H)
    w0, w1, ww0, ww1 = linear_taps(x2, W)
    return d0, d1, dw0, dw1, h0, h1, hw0, hw1, w0, w1, ww0, ww1
