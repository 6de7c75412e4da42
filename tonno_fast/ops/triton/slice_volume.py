"""Triton ``slice_volume``: oblique slices of a volume, and its adjoint (a scatter into the volume).

``slice_volume(volume (B,C,D,H,W), slice_maps (N,3,4), S, h, w, fill, out_dtype) -> (B,N,S,C,h,w)``:
``out[b,n,k,c,i,j] = trilinear(volume[b,c], slice_maps[n] @ (k,i,j,1))``; corners outside the volume read
``fill`` (``Σ_valid w v + fill (1 - Σ_valid w)``), exactly the reference backend.

Kernel layout: one program per (block of ``BLOCK`` pixels of one slice ``k`` of direction ``n``); the
coordinates and the trilinear taps are computed once per pixel and reused for every batch item and channel
(loops over ``B`` and ``C`` inside the kernel), so the arithmetic is amortised and the eight reads of
neighbouring pixels hit the same cache lines. The volume is read through its strides (no copy for
non-contiguous input); the output is written contiguous.

Inference-only fusions for encoders (options of :func:`slice_volume`, not differentiable with ``window``):

* ``out_dtype`` bf16/fp16: the slices are written in the encoder's dtype directly (half the bytes of the
  dominant cost, the output write). Values are rounded via float32 (``x.to(fp32).to(bf16)``): Triton's
  interpreter mis-converts float64 → bf16 directly, and the CUDA kernels round the same way.
* ``window=(lo, hi)``: intensity windowing ``(clamp(v, lo, hi) - lo) / (hi - lo)`` → [0, 1].
* ``replicate_channels=r``: each channel written ``r`` times (``out.repeat_interleave(r, dim=3)``), e.g. a
  grey-level CT as the 3 channels an ImageNet encoder expects, without a separate copy pass. This one is
  linear and keeps its gradient (the backward sums the copies).

Block sizes: ``BLOCK`` = ``h*w`` rounded up to a power of two, clamped to [32, 256] on a GPU, one pixel per
thread (8 warps at 256). NOTE (ptxas, sm_90a, float32): 48 registers at 256 pixels/8 warps, 80 with 4 warps
(two pixels per thread), which would cut the resident warps from 40 to 24 per SM for a latency-bound gather.
Under the interpreter up to ``INTERPRETER_MAX_BLOCK`` (4096), since every program costs a Python loop
iteration there. No autotuning: the kernel is bound by scattered reads and the output write, which the tile
shape barely moves (not measured: no GPU on the machine where this was written).

The adjoint (``slice_volume_backward``) scatters each pixel's gradient to its eight corners with
``tl.atomic_add``: on a GPU the order of the adds, hence the last bits of a float32 result, varies from run to
run. Under ``torch.use_deterministic_algorithms(True)`` the same kernel (``EMIT``) writes its contributions
to buffers that are summed in a fixed order, chunk by chunk (``_common.run_scatter``): bitwise reproducible.
The same kernel serves ``radon``'s adjoint by reading the gradient with zero pixel strides (one value per
slice).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._common import (INTERPRETED, interpreter_block, launch, one_per_thread, pow2_block, run_scatter, scalars,
                      slice_taps, trilinear_gather, trilinear_scatter)

__all__ = ["slice_volume", "slice_volume_backward"]


@triton.jit
def _slice_kernel(vol_ptr, maps_ptr, par_ptr, out_ptr,
                  B, C, D, H, W, svb, svc, svd, svh, svw,
                  N, S, h, w, R,
                  HAS_FILL: tl.constexpr, WINDOW: tl.constexpr, VIA_F32: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    n = tl.program_id(2).to(tl.int64)
    hw = tl.cast(h, tl.int64) * w
    pix = pid * BLOCK + tl.arange(0, BLOCK)
    mask = pix < hw
    d0, d1, dw0, dw1, h0, h1, hw0, hw1, w0, w1, ww0, ww1 = slice_taps(maps_ptr, n, k, pix, w, D, H, W)
    if HAS_FILL:
        # fill * (1 - Σ_valid w): the outside part of the trilinear stencil reads `fill` (maths.h inside_weight).
        fill_term = tl.load(par_ptr) * (1.0 - (dw0 + dw1) * (hw0 + hw1) * (ww0 + ww1))
    if WINDOW:
        lo = tl.load(par_ptr + 1)
        hi = tl.load(par_ptr + 2)
        inv = tl.load(par_ptr + 3)
    # out[b, n, k, c*R + r, pix] of a contiguous (B, N, S, C*R, h, w) tensor; pointers advance in the loops and
    # the per-batch step is computed in 64 bits (N·S·C·h·w exceeds 2^31 at realistic sizes).
    out_row = out_ptr + (n * S + k) * C * R * hw + pix
    out_batch = tl.cast(N, tl.int64) * S * C * R * hw
    vol_b = vol_ptr
    for b in range(B):
        vol_c = vol_b
        out_c = out_row
        for c in range(C):
            v = trilinear_gather(vol_c, 0, d0, d1, dw0, dw1, h0, h1, hw0, hw1, w0, w1, ww0, ww1,
                                 svd, svh, svw, mask)
            if HAS_FILL:
                v += fill_term
            if WINDOW:
                v = (tl.minimum(tl.maximum(v, lo), hi) - lo) * inv
            if VIA_F32:
                v = v.to(tl.float32)
            v = v.to(out_ptr.dtype.element_ty)
            for r in range(R):
                tl.store(out_c, v, mask=mask)
                out_c += hw
            vol_c += svc
        vol_b += svb
        out_row += out_batch


@triton.jit
def _slice_adjoint_kernel(g_ptr, maps_ptr, out_ptr, idx_ptr, val_ptr,
                          C, D, H, W, sgb, sgn, sgk, sgc, sgi, sgj,
                          S, h, w, slice0, slice1, bc0, bc1, EMIT: tl.constexpr, BLOCK: tl.constexpr):
    """``out (B,C,D,H,W) += Σ_pixels trilinear-weights · g[b,n,k,c,i,j]``; ``g`` read through its strides
    (``sgi = sgj = 0`` for radon's adjoint: one value per slice).

    Work (``_common.run_scatter``): outer items = the slices ``[slice0, slice1)`` (flat ``n·S + k``), inner items =
    the ``(b, c)`` planes ``[bc0, bc1)``; grid (pixel blocks, y, z) with slice ``slice0 + y + z·(programs along
    y)`` (several programs along z only past 65535 slices: the GPU's limit along y); slot of pixel ``p``, plane
    ``bc``, corner ``r``: ``(((slice - slice0)·h·w + p)·(bc1 - bc0) + bc - bc0)·8 + r``."""
    pid = tl.program_id(0).to(tl.int64)
    flat = slice0 + tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    live = flat < slice1
    flat = tl.minimum(flat, slice1 - 1)  # the programs past the end read a valid map, and write nothing
    n = flat // S
    k = flat % S
    hw = tl.cast(h, tl.int64) * w
    pix = pid * BLOCK + tl.arange(0, BLOCK)
    mask = (pix < hw) & live
    d0, d1, dw0, dw1, h0, h1, hw0, hw1, w0, w1, ww0, ww1 = slice_taps(maps_ptr, n, k, pix, w, D, H, W)
    any_valid = mask & ((dw0 + dw1) * (hw0 + hw1) * (ww0 + ww1) != 0)
    ct = out_ptr.dtype.element_ty
    g_pix = g_ptr + n * sgn + k * sgk + (pix // w) * sgi + (pix % w) * sgj
    vol_size = tl.cast(D, tl.int64) * H * W
    if EMIT:
        pix_slot = ((flat - slice0) * hw + pix) * (bc1 - bc0)
    else:
        pix_slot = pix
    for bc in range(bc0, bc1):
        bc = tl.cast(bc, tl.int64)
        b = bc // C
        c = bc % C
        g = tl.load(g_pix + b * sgb + c * sgc, mask=any_valid, other=0.0).to(ct)
        trilinear_scatter(out_ptr, bc * vol_size, d0, d1, dw0, dw1, h0, h1, hw0, hw1, w0, w1, ww0, ww1,
                          H * W, W, 1, g, any_valid, idx_ptr, val_ptr, (pix_slot + bc - bc0) * 8, EMIT)


def _block(hw: int) -> tuple:
    if INTERPRETED:
        return interpreter_block(hw), 4
    block = pow2_block(hw, 32, 256)
    return block, one_per_thread(block)


def _launch_forward(volume, maps, n_slices, height, width, fill, out_dtype, window, replicate_channels):
    B, C, D, H, W = volume.shape
    N = maps.shape[0]
    out = volume.new_empty((B, N, n_slices, C * replicate_channels, height, width),
                           dtype=out_dtype or volume.dtype)
    if out.numel() == 0:
        return out
    if fill != 0.0 or window is not None:
        lo, hi = (window if window is not None else (0.0, 1.0))
        params = scalars([fill, lo, hi, 1.0 / (hi - lo)], volume)
    else:  # never read (HAS_FILL and WINDOW are off): no host-to-device copy on the common path
        params = maps
    block, warps = _block(height * width)
    grid = (triton.cdiv(height * width, block), n_slices, N)
    launch(_slice_kernel, volume)[grid](
        volume, maps, params, out, B, C, D, H, W, *volume.stride(), N, n_slices, height, width,
        replicate_channels, HAS_FILL=fill != 0.0, WINDOW=window is not None,
        VIA_F32=out.dtype in (torch.bfloat16, torch.float16), BLOCK=block, num_warps=warps)
    return out


def launch_adjoint(grad, strides, maps, n_slices, height, width, batch_channels, volume_shape):
    """Scatter ``grad`` (read with ``strides`` = (b, n, k, c, i, j)) into a new ``(B, C, D, H, W)`` tensor in
    ``maps``' dtype (atomic adds, or the deterministic path of ``_common.run_scatter``). Shared with radon's
    adjoint."""
    B, C = batch_channels
    D, H, W = (int(x) for x in volume_shape)
    N = maps.shape[0]
    out = torch.zeros((B, C, D, H, W), dtype=maps.dtype, device=maps.device)
    if out.numel() == 0 or N * n_slices * height * width == 0:
        return out
    block, warps = _block(height * width)
    run = launch(_slice_adjoint_kernel, grad)

    def kernel(slice0, slice1, bc0, bc1, index, value, emit):
        gy = min(slice1 - slice0, 65535)
        grid = (triton.cdiv(height * width, block), gy, triton.cdiv(slice1 - slice0, gy))
        run[grid](grad, maps, out, index, value, C, D, H, W, *strides, n_slices, height, width, slice0, slice1,
                  bc0, bc1, EMIT=emit, BLOCK=block, num_warps=warps)
    return run_scatter(out, N * n_slices, B * C, 8 * height * width, maps, kernel)


# ----------------------------------------------------------------------------------------------------------
# Launchers: the ops' implementations (schemas, checks, fake kernels and autograd: tonno_fast.ops.contract).

def slice_volume(volume: torch.Tensor, maps: torch.Tensor, n_slices: int, height: int, width: int, fill: float,
                 out_dtype: Optional[torch.dtype], window: Optional[List[float]],
                 replicate_channels: int) -> torch.Tensor:
    """Slices ``(B, N, S, C*replicate_channels, h, w)`` of ``volume`` ``(B, C, D, H, W)`` (see module doc)."""
    return _launch_forward(volume, maps.contiguous(), n_slices, height, width, fill, out_dtype, window,
                           replicate_channels)


def slice_volume_backward(grad: torch.Tensor, maps: torch.Tensor, volume_shape: List[int]) -> torch.Tensor:
    """The adjoint: ``grad`` ``(B, N, S, C, h, w)`` → ``(B, C, D, H, W)``."""
    B, N, S, C, h, w = grad.shape
    return launch_adjoint(grad, grad.stride(), maps.contiguous(), S, h, w, (B, C), volume_shape)


# ----------------------------------------------------------------------------------------------------------
# Tooling (compile_check): the kernel variants the GPU launchers use, and small calls to trace.

#: (kernel, pointer dtype overrides, constexprs, num_warps)
COMPILE_VARIANTS = [
    ("_slice_kernel", {}, dict(HAS_FILL=False, WINDOW=False, VIA_F32=False, BLOCK=256), 8),
    ("_slice_kernel", {"out_ptr": "bf16"}, dict(HAS_FILL=True, WINDOW=True, VIA_F32=True, BLOCK=256), 8),
    ("_slice_adjoint_kernel", {"g_ptr": "bf16"}, dict(EMIT=False, BLOCK=256), 8),
    ("_slice_adjoint_kernel", {"g_ptr": "bf16", "idx_ptr": "i64"}, dict(EMIT=True, BLOCK=256), 8),
]


def trace_samples(s):
    """``(op, function, inputs)`` to trace, from compile_check's small samples ``s``."""
    return [
        ("slice_volume", lambda v, m: s.ops.slice_volume(v, m, 3, 4, 5, 0.5, torch.bfloat16, [0.0, 1.0], 3),
         (s.r(1, 1, 5, 6, 7), s.sm)),
        ("slice_volume_backward", lambda x, m: s.ops.slice_volume_backward(x, m, [5, 6, 7]),
         (s.r(1, 2, 3, 1, 4, 5), s.sm)),
    ]
