"""Triton ``radon``: plane sums of a volume, ``scale * Σ_ij slice_volume(...)``, and its adjoint.

``radon(volume (B,C,D,H,W), slice_maps (N,3,4), S, h, w, scale) -> (B,C,N,S)``.

Kernel layout: one program per (slice ``k``, direction ``n``, batch-channel ``bc``) loops over the slice's
pixels in blocks of ``BLOCK``, accumulates the trilinear samples in a register vector and reduces it once at
the end: no slice is ever written to memory, and no atomics are needed, so the forward is deterministic.
The coordinates are recomputed per channel (a few FMAs, cheap next to the eight scattered reads).
``scale`` (the pixel area δ², mm²) is applied to the small ``(B,C,N,S)`` result in PyTorch, in the
tensor's own dtype (a float kernel argument would be float32).

Block size: ``h*w`` rounded up to a power of two, clamped to [64, 256] on a GPU, one pixel per thread
(NOTE, ptxas sm_90a float32: 64 registers at 256 pixels with 4 warps, i.e. two per thread; see
``_common.one_per_thread``), and up to 4096 under the interpreter.

The adjoint (``radon_backward``) is the slice adjoint kernel of :mod:`.slice_volume` reading one gradient
value per slice (zero pixel strides): atomic adds, not bitwise reproducible on a GPU, or, under
``torch.use_deterministic_algorithms(True)``, its deterministic path (``_common.run_scatter``).
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, interpreter_block, launch, one_per_thread, pow2_block, slice_taps, trilinear_gather
from .slice_volume import launch_adjoint

__all__ = ["radon", "radon_backward"]


@triton.jit
def _radon_kernel(vol_ptr, maps_ptr, out_ptr,
                  C, D, H, W, svb, svc, svd, svh, svw, N, S, h, w, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    bc = tl.program_id(2).to(tl.int64)
    b = bc // C
    c = bc % C
    hw = tl.cast(h, tl.int64) * w
    vol = vol_ptr + b * svb + c * svc
    acc = tl.zeros([BLOCK], dtype=vol_ptr.dtype.element_ty)
    for p0 in range(0, hw, BLOCK):
        pix = p0 + tl.arange(0, BLOCK)
        mask = pix < hw
        d0, d1, dw0, dw1, h0, h1, hw0, hw1, w0, w1, ww0, ww1 = slice_taps(maps_ptr, n, k, pix, w, D, H, W)
        acc += trilinear_gather(vol, 0, d0, d1, dw0, dw1, h0, h1, hw0, hw1, w0, w1, ww0, ww1,
                                svd, svh, svw, mask)
    tl.store(out_ptr + (bc * N + n) * S + k, tl.sum(acc, axis=0))


# ----------------------------------------------------------------------------------------------------------
# Launchers: the ops' implementations (schemas, checks, fake kernels and autograd: tonno_fast.ops.contract).

def radon(volume: torch.Tensor, maps: torch.Tensor, n_slices: int, height: int, width: int,
          scale: float) -> torch.Tensor:
    """Plane sums ``scale * Σ_ij trilinear(volume, maps[n] @ (k,i,j,1))``: ``(B, C, D, H, W)`` → ``(B, C, N, S)``."""
    B, C, D, H, W = volume.shape
    maps = maps.contiguous()
    N = maps.shape[0]
    out = volume.new_zeros((B, C, N, n_slices))
    if out.numel() == 0 or height * width == 0:
        return out
    block = interpreter_block(height * width) if INTERPRETED else pow2_block(height * width, 64, 256)
    grid = (n_slices, N, B * C)
    launch(_radon_kernel, volume)[grid](volume, maps, out, C, D, H, W, *volume.stride(), N, n_slices, height,
                                        width, BLOCK=block, num_warps=one_per_thread(block))
    return out * scale


def radon_backward(grad: torch.Tensor, maps: torch.Tensor, height: int, width: int, scale: float,
                   volume_shape: List[int]) -> torch.Tensor:
    """The adjoint: ``grad`` ``(B, C, N, S)`` → ``(B, C, D, H, W)``."""
    B, C, N, S = grad.shape
    g = grad.to(maps.dtype) * scale
    sb, sc, sn, sk = g.stride()
    return launch_adjoint(g, (sb, sn, sk, sc, 0, 0), maps.contiguous(), S, height, width, (B, C), volume_shape)


# ----------------------------------------------------------------------------------------------------------
# Tooling (compile_check): the kernel variants the GPU launchers use, and small calls to trace.

#: (kernel, pointer dtype overrides, constexprs, num_warps); radon's adjoint is slice_volume's kernel.
COMPILE_VARIANTS = [("_radon_kernel", {}, dict(BLOCK=256), 8)]


def trace_samples(s):
    """``(op, function, inputs)`` to trace, from compile_check's small samples ``s``."""
    return [
        ("radon", lambda v, m: s.ops.radon(v, m, 3, 4, 5, 0.5), (s.r(1, 1, 5, 6, 7), s.sm)),
        ("radon_backward", lambda x, m: s.ops.radon_backward(x, m, 4, 5, 0.5, [5, 6, 7]), (s.r(1, 1, 2, 3), s.sm)),
    ]
