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
value per slice (zero pixel strides): atomic adds, not bitwise deterministic on a GPU.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import triton
import triton.language as tl

from ._common import (INTERPRETED, check_float, check_maps, define_op, interpreter_block, launch, one_per_thread,
                      pow2_block, register_linear_autograd, trilinear_gather)
from .slice_volume import _slice_coords, launch_adjoint

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
        d0, d1, dw0, dw1, h0, h1, hw0, hw1, w0, w1, ww0, ww1 = _slice_coords(maps_ptr, n, k, pix, w, D, H, W)
        acc += trilinear_gather(vol, 0, d0, d1, dw0, dw1, h0, h1, hw0, hw1, w0, w1, ww0, ww1,
                                svd, svh, svw, mask)
    tl.store(out_ptr + (bc * N + n) * S + k, tl.sum(acc, axis=0))


def _radon_impl(volume: torch.Tensor, maps: torch.Tensor, n_slices: int, height: int, width: int,
                scale: float) -> torch.Tensor:
    B, C, D, H, W = volume.shape
    N = maps.shape[0]
    out = volume.new_zeros((B, C, N, n_slices))
    if out.numel() == 0 or height * width == 0:
        return out
    block = interpreter_block(height * width) if INTERPRETED else pow2_block(height * width, 64, 256)
    grid = (n_slices, N, B * C)
    launch(_radon_kernel, volume)[grid](volume, maps, out, C, D, H, W, *volume.stride(), N, n_slices, height,
                                        width, BLOCK=block, num_warps=one_per_thread(block))
    return out * scale


_radon_op = define_op("radon", _radon_impl)


@_radon_op.register_fake
def _(volume, maps, n_slices, height, width, scale):
    return volume.new_empty((volume.shape[0], volume.shape[1], maps.shape[0], n_slices))


def _radon_backward_impl(grad: torch.Tensor, maps: torch.Tensor, height: int, width: int, scale: float,
                         volume_shape: List[int]) -> torch.Tensor:
    B, C, N, S = grad.shape
    g = grad.to(maps.dtype) * scale
    sb, sc, sn, sk = g.stride()
    return launch_adjoint(g, (sb, sn, sk, sc, 0, 0), maps, S, height, width, (B, C), volume_shape,
                          "radon_backward")


_radon_bwd_op = define_op("radon_backward", _radon_backward_impl)


@_radon_bwd_op.register_fake
def _(grad, maps, height, width, scale, volume_shape):
    return grad.new_empty((grad.shape[0], grad.shape[1], *volume_shape), dtype=maps.dtype)


register_linear_autograd(
    _radon_op, "radon_backward", 1,
    lambda volume, maps, n_slices, height, width, scale: (height, width, scale, list(volume.shape[2:])))
register_linear_autograd(
    _radon_bwd_op, "radon", 1,
    lambda grad, maps, height, width, scale, volume_shape: (grad.shape[3], height, width, scale))


def radon(volume: torch.Tensor, slice_maps: torch.Tensor, n_slices: int, height: int, width: int,
          scale: float = 1.0) -> torch.Tensor:
    """Plane sums ``scale * Σ_ij trilinear(volume, slice_maps[n] @ (k,i,j,1))``: ``(B, C, D, H, W)`` →
    ``(B, C, N, S)``. Differentiable in ``volume`` (exact adjoint)."""
    check_float(volume, "volume")
    if volume.ndim != 5:
        raise ValueError(f"volume must have shape (B, C, D, H, W), got {tuple(volume.shape)}")
    maps = check_maps(slice_maps, volume, "slice_maps")
    return torch.ops.tonno_fast_triton.radon(volume, maps, int(n_slices), int(height), int(width), float(scale))


def radon_backward(grad: torch.Tensor, slice_maps: torch.Tensor, height: int, width: int, scale: float,
                   volume_shape: Sequence[int]) -> torch.Tensor:
    """The adjoint: ``grad`` ``(B, C, N, S)`` → ``(B, C, D, H, W)``."""
    check_float(grad, "grad")
    maps = check_maps(slice_maps, grad, "slice_maps")
    return torch.ops.tonno_fast_triton.radon_backward(grad, maps, int(height), int(width), float(scale),
                                                      [int(x) for x in volume_shape])
