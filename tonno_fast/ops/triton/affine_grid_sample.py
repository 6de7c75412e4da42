"""Triton ``affine_grid_sample``: ``grid_sample(volume, affine_grid(theta, size))`` without the grid.

``affine_grid_sample(volume (N,C,D,H,W), theta (N,3,4), size [N,C,Do,Ho,Wo], align_corners) -> (N,C,Do,Ho,Wo)``
equals ``F.grid_sample(volume, F.affine_grid(theta, size, align_corners), mode="bilinear",
padding_mode="zeros", align_corners=align_corners)`` (trilinear, zero padding).

The normalised-coordinate conventions of ``affine_grid`` (base grid ``linspace(-1, 1)``, shrunk by
``(n-1)/n`` without ``align_corners``, 0 for a size-1 axis) and of ``grid_sample`` (unnormalisation) are
both affine, so they fold with ``theta`` into one index-space map (kernels only apply maps): input index
``(d, h, w) = M[n] @ (d_o, h_o, w_o, 1)``, :func:`tonno_fast.geometry.affine_theta_maps` (the fold every
backend uses). The kernel is then a per-batch-item ``slice_volume``: one program per block of output voxels of
item ``n``, taps computed once and reused for every channel.

Backward: the volume gradient is the usual atomic scatter (not bitwise reproducible on a GPU; under
``torch.use_deterministic_algorithms(True)`` the same kernel, ``EMIT``, writes its contributions to buffers
summed in a fixed order, chunk by chunk: ``_common.run_scatter``); the
gradient with respect to ``M``, ``∂L/∂M[r, c] = Σ_voxels Σ_channels g · ∂val/∂x_r · p_c`` with
``p = (d_o, h_o, w_o, 1)``, is reduced per program and written as a ``(N, programs, 12)`` partial-sum buffer
that PyTorch sums (no atomics: deterministic), then mapped to ``theta`` through the transpose of the affine
fold (:func:`tonno_fast.geometry.affine_theta_grad`). Double backward is not implemented.

Block size: output voxels rounded up to a power of two, one per thread, clamped to [32, 256] on a GPU
(128 for the backward, whose theta reduction needs twice the registers), up to 4096 under the interpreter.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from ...geometry import affine_theta_grad, affine_theta_maps
from ._common import (INTERPRETED, apply_row, interpreter_block, launch, linear_taps, linear_taps_dx, one_per_thread,
                      pow2_block, run_scatter, trilinear_gather, trilinear_gather_with_grad, trilinear_scatter,
                      voxel_coords)

__all__ = ["affine_grid_sample", "affine_grid_sample_backward"]


@triton.jit
def _out_coords(maps_ptr, n, vox, Ho, Wo, D, H, W, ct):
    fd, fh, fw = voxel_coords(vox, Ho, Wo, ct)
    m_ptr = maps_ptr + n * 12
    x0 = apply_row(m_ptr, 0, fd, fh, fw)
    x1 = apply_row(m_ptr, 1, fd, fh, fw)
    x2 = apply_row(m_ptr, 2, fd, fh, fw)
    return fd, fh, fw, x0, x1, x2


@triton.jit
def _ags_kernel(vol_ptr, maps_ptr, out_ptr, C, D, H, W, svn, svc, svd, svh, svw, Do, Ho, Wo,
                BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    ct = maps_ptr.dtype.element_ty
    Vo = tl.cast(Do, tl.int64) * Ho * Wo
    vox = pid * BLOCK + tl.arange(0, BLOCK)
    mask = vox < Vo
    fd, fh, fw, x0, x1, x2 = _out_coords(maps_ptr, n, vox, Ho, Wo, D, H, W, ct)
    d0, d1, dw0, dw1 = linear_taps(x0, D)
    h0, h1, hw0, hw1 = linear_taps(x1, H)
    w0, w1, ww0, ww1 = linear_taps(x2, W)
    vol_c = vol_ptr + n * svn
    out_c = out_ptr + n * C * Vo + vox
    for c in range(C):
        v = trilinear_gather(vol_c, 0, d0, d1, dw0, dw1, h0, h1, hw0, hw1, w0, w1, ww0, ww1, svd, svh, svw, mask)
        tl.store(out_c, v, mask=mask)
        vol_c += svc
        out_c += Vo


@triton.jit
def _ags_backward_kernel(g_ptr, vol_ptr, maps_ptr, gvol_ptr, part_ptr, idx_ptr, val_ptr,
                         C, D, H, W, sgn, sgc, sgd, sgh, sgw, svn, svc, svd, svh, svw, Do, Ho, Wo, n0, p0, p1,
                         VOLUME_GRAD: tl.constexpr, MAP_GRAD: tl.constexpr, EMIT: tl.constexpr, BLOCK: tl.constexpr):
    """Volume gradient (``VOLUME_GRAD``, a scatter) and per-program partial sums of the map gradient
    (``MAP_GRAD``) of the output points ``[p0, p1)`` of batch item ``n0 + program_id(1)``. Work of the scatter
    (``_common.run_scatter``): outer items = the batch items from ``n0``, inner items = the output points
    ``[p0, p1)``; slot of point ``p`` of item ``n``, channel ``c``, corner ``r``:
    ``(((n - n0)·(p1 - p0) + p - p0)·C + c)·8 + r``. The partial sums assume the whole range (one launch)."""
    pid = tl.program_id(0).to(tl.int64)
    n = n0 + tl.program_id(1).to(tl.int64)
    ct = maps_ptr.dtype.element_ty
    vox = p0 + pid * BLOCK + tl.arange(0, BLOCK)
    mask = vox < p1
    fd, fh, fw, x0, x1, x2 = _out_coords(maps_ptr, n, vox, Ho, Wo, D, H, W, ct)
    d0, d1, dw0, dw1 = linear_taps(x0, D)
    h0, h1, hw0, hw1 = linear_taps(x1, H)
    w0, w1, ww0, ww1 = linear_taps(x2, W)
    if MAP_GRAD:
        dd0, dd1 = linear_taps_dx(x0, D)
        dh0, dh1 = linear_taps_dx(x1, H)
        dv0, dv1 = linear_taps_dx(x2, W)
    s0 = tl.zeros([BLOCK], dtype=ct)
    s1 = tl.zeros([BLOCK], dtype=ct)
    s2 = tl.zeros([BLOCK], dtype=ct)
    g_c = g_ptr + n * sgn + (vox // (Ho * Wo)) * sgd + ((vox // Wo) % Ho) * sgh + (vox % Wo) * sgw
    vol_c = vol_ptr + n * svn
    vol_size = tl.cast(D, tl.int64) * H * W
    gvol_base = n * C * vol_size
    if EMIT:
        point_slot = ((n - n0) * (p1 - p0) + (vox - p0)) * C
    else:
        point_slot = vox
    for c in range(C):
        g = tl.load(g_c, mask=mask, other=0.0).to(ct)
        if VOLUME_GRAD:
            trilinear_scatter(gvol_ptr, gvol_base, d0, d1, dw0, dw1, h0, h1, hw0, hw1, w0, w1, ww0, ww1,
                              H * W, W, 1, g, mask, idx_ptr, val_ptr, (point_slot + c) * 8, EMIT)
        if MAP_GRAD:
            val, g0, g1, g2 = trilinear_gather_with_grad(vol_c, 0, d0, d1, dw0, dw1, dd0, dd1,
                                                         h0, h1, hw0, hw1, dh0, dh1,
                                                         w0, w1, ww0, ww1, dv0, dv1, svd, svh, svw, mask)
            s0 += g * g0
            s1 += g * g1
            s2 += g * g2
        g_c += sgc
        vol_c += svc
        gvol_base += vol_size
    if MAP_GRAD:
        # ∂L/∂M[r, :] = Σ_vox s_r · (d_o, h_o, w_o, 1), reduced over this program's voxels.
        part = part_ptr + (n * tl.num_programs(0) + pid) * 12
        tl.store(part + 0, tl.sum(s0 * fd, axis=0))
        tl.store(part + 1, tl.sum(s0 * fh, axis=0))
        tl.store(part + 2, tl.sum(s0 * fw, axis=0))
        tl.store(part + 3, tl.sum(s0, axis=0))
        tl.store(part + 4, tl.sum(s1 * fd, axis=0))
        tl.store(part + 5, tl.sum(s1 * fh, axis=0))
        tl.store(part + 6, tl.sum(s1 * fw, axis=0))
        tl.store(part + 7, tl.sum(s1, axis=0))
        tl.store(part + 8, tl.sum(s2 * fd, axis=0))
        tl.store(part + 9, tl.sum(s2 * fh, axis=0))
        tl.store(part + 10, tl.sum(s2 * fw, axis=0))
        tl.store(part + 11, tl.sum(s2, axis=0))


def _block(vo: int, backward: bool = False) -> int:
    if INTERPRETED:
        return interpreter_block(vo)
    # NOTE (ptxas, sm_90a, float32): the backward with the theta reduction needs 96 registers per voxel
    # (value, three derivatives, eight corners); 198 at two voxels per thread. Hence 128 there.
    return pow2_block(vo, 32, 128 if backward else 256)


# ----------------------------------------------------------------------------------------------------------
# Launchers: the ops' implementations (schemas, checks, fake kernels and autograd: tonno_fast.ops.contract).

def affine_grid_sample(volume: torch.Tensor, theta: torch.Tensor, size: List[int],
                       align_corners: bool) -> torch.Tensor:
    """``grid_sample(volume, affine_grid(theta, size, align_corners), "bilinear", "zeros", align_corners)``
    for ``volume`` ``(N, C, D, H, W)`` and ``theta`` ``(N, 3, 4)``."""
    N, C, D, H, W = volume.shape
    Do, Ho, Wo = size[2:]
    out = volume.new_empty((N, C, Do, Ho, Wo))
    if out.numel() == 0:
        return out
    maps = affine_theta_maps(theta, (D, H, W), (Do, Ho, Wo), align_corners)
    block = _block(Do * Ho * Wo)
    grid = (triton.cdiv(Do * Ho * Wo, block), N)
    launch(_ags_kernel, volume)[grid](volume, maps, out, C, D, H, W, *volume.stride(), Do, Ho, Wo,
                                      BLOCK=block, num_warps=one_per_thread(block))
    return out


def affine_grid_sample_backward(grad: torch.Tensor, volume: torch.Tensor, theta: torch.Tensor, align_corners: bool,
                                volume_grad: bool, theta_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The gradients with respect to ``volume`` and ``theta`` (a gradient not asked for is an empty tensor).

    By default one launch computes both. Under ``torch.use_deterministic_algorithms(True)`` the volume gradient
    takes the deterministic path of ``_common.run_scatter`` (its own launches, chunk by chunk) and the theta
    gradient, already deterministic (per-program partial sums that PyTorch adds), a launch of its own."""
    N, C, D, H, W = volume.shape
    Do, Ho, Wo = grad.shape[2:]
    Vo = Do * Ho * Wo
    maps = affine_theta_maps(theta, (D, H, W), (Do, Ho, Wo), align_corners)
    block = _block(Vo, backward=True)
    programs = triton.cdiv(Vo, block)
    gvol = volume.new_zeros(volume.shape) if volume_grad else volume.new_empty((0,))
    part = volume.new_zeros((N, programs, 12)) if theta_grad else volume.new_empty((0,))
    if (volume_grad or theta_grad) and Vo > 0 and volume.numel() > 0:
        run = launch(_ags_backward_kernel, grad)

        def kernel(n0, n1, p0, p1, index, value, emit, with_volume=True, with_theta=False):
            run[(triton.cdiv(p1 - p0, block), n1 - n0)](
                grad, volume, maps, gvol if with_volume else volume, part if with_theta else volume, index, value,
                C, D, H, W, *grad.stride(), *volume.stride(), Do, Ho, Wo, n0, p0, p1,
                VOLUME_GRAD=with_volume, MAP_GRAD=with_theta, EMIT=emit, BLOCK=block, num_warps=one_per_thread(block))
        if volume_grad and torch.are_deterministic_algorithms_enabled():
            run_scatter(gvol, N, Vo, 8 * C, maps, kernel)
            if theta_grad:
                kernel(0, N, 0, Vo, maps, maps, False, with_volume=False, with_theta=True)
        else:  # both gradients in one launch (the volume gradient with atomic adds)
            kernel(0, N, 0, Vo, maps, maps, False, with_volume=volume_grad, with_theta=theta_grad)
    if not theta_grad:
        return gvol, theta.new_empty((0,))
    return gvol, affine_theta_grad(part.sum(1).reshape(N, 3, 4), (D, H, W), (Do, Ho, Wo), align_corners,
                                   theta.dtype)


# ----------------------------------------------------------------------------------------------------------
# Tooling (compile_check): the kernel variants the GPU launchers use, and small calls to trace.

#: (kernel, pointer dtype overrides, constexprs, num_warps)
COMPILE_VARIANTS = [
    ("_ags_kernel", {}, dict(BLOCK=256), 8),
    ("_ags_backward_kernel", {}, dict(VOLUME_GRAD=True, MAP_GRAD=True, EMIT=False, BLOCK=128), 4),
    ("_ags_backward_kernel", {}, dict(VOLUME_GRAD=True, MAP_GRAD=False, EMIT=False, BLOCK=128), 4),
    ("_ags_backward_kernel", {}, dict(VOLUME_GRAD=False, MAP_GRAD=True, EMIT=False, BLOCK=128), 4),
    ("_ags_backward_kernel", {"idx_ptr": "i64"}, dict(VOLUME_GRAD=True, MAP_GRAD=False, EMIT=True, BLOCK=128), 4),
]


def trace_samples(s):
    """``(op, function, inputs)`` to trace, from compile_check's small samples ``s``."""
    return [
        ("affine_grid_sample", lambda v, t: s.ops.affine_grid_sample(v, t, [2, 2, 3, 4, 5], False),
         (s.r(2, 2, 5, 6, 7), s.theta)),
        ("affine_grid_sample_backward", lambda x, v, t: s.ops.affine_grid_sample_backward(x, v, t, False, True, True),
         (s.r(2, 2, 3, 4, 5), s.r(2, 2, 5, 6, 7), s.theta)),
    ]
