"""Shared pieces of the Triton kernels: per-point maths (``@triton.jit`` helpers), the voxel tiles of the
backprojection kernels, op registration (with the autograd of forward/adjoint op pairs), launch heuristics.

The ``@triton.jit`` helpers are the Triton transcription of ``csrc/include/tonno_fast/maths.h`` (one copy,
used by every op module), with the same conventions as the reference backend:

* a map is a row-major 3x4 matrix ``M``; ``M @ (a, b, c, 1)`` is a continuous index into the array read;
* linear interpolation along an axis of size ``n`` at ``x`` uses taps ``floor(x)`` and ``floor(x) + 1`` with
  weights ``1 - f`` and ``f``; a tap outside ``[0, n-1]`` gets weight 0 and a clamped (safe) index 0, exactly
  ``grid_sample(padding_mode="zeros")``;
* the validity test ``(x > -1) & (x < n)`` is False for NaN, and a NaN coordinate is replaced by 0 before
  ``floor`` and the integer cast, so NaN maps read nothing instead of producing garbage indices.

Loads and atomic adds of a corner are masked by ``weight != 0``: an invalid corner is never touched (so a
NaN/inf stored at index 0 cannot leak in through a zero weight), and a valid corner with weight exactly 0
contributes nothing anyway.

Registration (:func:`define_op`): ops live in the namespace ``tonno_fast_triton`` (the C++ ops own
``tonno_fast``). On a GPU they are ``torch.library.triton_op`` s, so ``torch.compile``/Inductor sees the
Triton kernels through ``wrap_triton``. Under ``TRITON_INTERPRET=1`` (CPU CI) they are plain
``torch.library.custom_op`` s instead: in torch 2.14 ``wrap_triton`` returns the interpreted kernel
unchanged, so ``triton_op``'s functional decomposition (used by ``opcheck``'s AOT tests and by
``torch.compile``) would run the interpreter on fake tensors and fail ("Attempted to access the data
pointer on an invalid python storage"); as an opaque ``custom_op`` with an explicit fake kernel the op
passes ``opcheck`` and compiles as a graph break-free extern call. The op bodies are identical in both
cases, so the interpreter tests exercise exactly the code that runs on the GPU.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "NAMESPACE", "define_op", "launch", "pow2_block", "one_per_thread", "interpreter_block",
           "interpreter_block_bk", "scalars", "check_maps", "check_weights", "check_float", "alert_not_deterministic",
           "register_linear_autograd", "voxel_coords", "voxel_tile", "row_offsets", "tile_offsets",
           "linear_taps", "linear_taps_dx", "apply_row", "bilinear_gather", "bilinear_scatter",
           "trilinear_gather", "trilinear_scatter", "trilinear_gather_with_grad"]

NAMESPACE = "tonno_fast_triton"


@triton.jit
def _probe():
    pass


# `@triton.jit` returns an InterpretedFunction (not a JITFunction) when TRITON_INTERPRET=1 was set before
# triton was imported; testing the object is more reliable than re-reading the environment variable.
INTERPRETED: bool = not isinstance(_probe, triton.runtime.jit.JITFunction)


def define_op(name: str, fn: Callable):
    """Register ``fn`` (type-annotated, no mutation) as ``tonno_fast_triton::<name>``; returns the
    ``CustomOpDef`` (``register_fake`` / ``register_autograd`` work the same for both kinds)."""
    qualname = f"{NAMESPACE}::{name}"
    if INTERPRETED:
        return torch.library.custom_op(qualname, fn, mutates_args=())
    return torch.library.triton_op(qualname, fn, mutates_args=())


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


def alert_not_deterministic(caller: str, device: torch.device) -> None:
    """Honour ``torch.use_deterministic_algorithms``: the adjoint kernels accumulate with ``tl.atomic_add``,
    whose order (hence the last bits of float results) varies between runs on a GPU. Under the interpreter the
    programs run one after another, so the result is deterministic there. The CPU backend is the
    deterministic path."""
    if INTERPRETED or torch.device(device).type != "cuda" or not torch.are_deterministic_algorithms_enabled():
        return
    msg = (f"{caller} (Triton backend) accumulates with atomic adds and is not bitwise deterministic on a GPU, "
           f"but torch.use_deterministic_algorithms(True) is set; run on CPU tensors with backend='cpu' for a "
           f"deterministic adjoint, or pass warn_only=True")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, stacklevel=3)
    else:
        raise RuntimeError(msg)


def check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if not (t.is_cuda or INTERPRETED):
        raise RuntimeError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                           f"imported); {name} is on {t.device}")


def check_maps(maps: torch.Tensor, like: torch.Tensor, name: str, dtype=None) -> torch.Tensor:
    """``maps`` ``(N, 3, 4)`` on ``like``'s device in ``dtype`` (default ``like.dtype``: the compute dtype),
    contiguous (kernels read 12 scalars per direction)."""
    if not isinstance(maps, torch.Tensor) or maps.ndim != 3 or tuple(maps.shape[1:]) != (3, 4):
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"{name} must have shape (N, 3, 4), got {shape}")
    return maps.detach().to(device=like.device, dtype=dtype or like.dtype).contiguous()


def check_weights(weights: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(weights, torch.Tensor) or weights.ndim != 1 or weights.shape[0] != n:
        shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"weights must have shape (N,) = ({n},), one per direction, got {shape}")
    return weights.detach().to(device=like.device, dtype=like.dtype).contiguous()


def register_linear_autograd(op, adjoint: str, n_geometry: int, adjoint_args: Callable) -> None:
    """Autograd of the linear op ``op`` (a ``CustomOpDef``) whose inputs are ``(x, *geometry, *params)`` with
    ``n_geometry`` geometry tensors (maps, weights: constants, detached by the public wrappers): the gradient
    of ``x`` is ``tonno_fast_triton::<adjoint>(grad, *geometry, *adjoint_args(*inputs))``. Registering each
    op of a forward/adjoint pair with the other as ``adjoint`` gives double backward too.

    ``adjoint`` is looked up when the backward runs, so an op may name an adjoint registered after it."""

    def setup(ctx, inputs, output):
        ctx.n_inputs = len(inputs)
        ctx.adjoint_args = adjoint_args(*inputs)
        ctx.save_for_backward(*inputs[1:1 + n_geometry])

    def backward(ctx, grad):
        gx = getattr(getattr(torch.ops, NAMESPACE), adjoint)(grad, *ctx.saved_tensors, *ctx.adjoint_args)
        return (gx,) + (None,) * (ctx.n_inputs - 1)

    op.register_autograd(backward, setup_context=setup)


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
def voxel_tile(pid, pbk, BK, D, H, W, ct, BLOCK_BK: tl.constexpr, BLOCK_V: tl.constexpr):
    """Tile ``(pid, pbk)``: ``V = D·H·W`` (int64), the flat voxels ``vox`` ``(BLOCK_V,)`` and their float
    coordinates ``fd, fh, fw``, the batch×channel rows ``bk`` ``(BLOCK_BK,)`` and the in-bounds mask
    ``(BLOCK_BK, BLOCK_V)`` of the tile."""
    V = tl.cast(D, tl.int64) * H * W
    vox = pid * BLOCK_V + tl.arange(0, BLOCK_V)
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
def bilinear_scatter(ptr, base, i0, i1, wi0, wi1, j0, j1, wj0, wj1, s1, s2, val, mask):
    """Adjoint of :func:`bilinear_gather`: ``a[corner] += wi wj val`` with atomic adds (order of the adds,
    hence the last bits of float results, is not deterministic on a GPU)."""
    w00 = wi0 * wj0
    w01 = wi0 * wj1
    w10 = wi1 * wj0
    w11 = wi1 * wj1
    tl.atomic_add(ptr + base + i0 * s1 + j0 * s2, w00 * val, mask=mask & (w00 != 0))
    tl.atomic_add(ptr + base + i0 * s1 + j1 * s2, w01 * val, mask=mask & (w01 != 0))
    tl.atomic_add(ptr + base + i1 * s1 + j0 * s2, w10 * val, mask=mask & (w10 != 0))
    tl.atomic_add(ptr + base + i1 * s1 + j1 * s2, w11 * val, mask=mask & (w11 != 0))


@triton.jit
def trilinear_gather(ptr, base, t0, t1, tw0, tw1, i0, i1, wi0, wi1, j0, j1, wj0, wj1, s0, s1, s2, mask):
    """Trilinear value from precomputed taps of the three axes (taps shared by every batch item/channel)."""
    p0 = bilinear_gather(ptr, base + t0 * s0, i0, i1, wi0, wi1, j0, j1, wj0, wj1, s1, s2, mask & (tw0 != 0))
    p1 = bilinear_gather(ptr, base + t1 * s0, i0, i1, wi0, wi1, j0, j1, wj0, wj1, s1, s2, mask & (tw1 != 0))
    return tw0 * p0 + tw1 * p1


@triton.jit
def trilinear_scatter(ptr, base, t0, t1, tw0, tw1, i0, i1, wi0, wi1, j0, j1, wj0, wj1, s0, s1, s2, val, mask):
    """Adjoint of :func:`trilinear_gather` (atomic adds)."""
    bilinear_scatter(ptr, base + t0 * s0, i0, i1, wi0, wi1, j0, j1, wj0, wj1, s1, s2, tw0 * val,
                     mask & (tw0 != 0))
    bilinear_scatter(ptr, base + t1 * s0, i0, i1, wi0, wi1, j0, j1, wj0, wj1, s1, s2, tw1 * val,
                     mask & (tw1 != 0))


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
