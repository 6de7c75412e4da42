"""Triton ``affine_grid_sample``: ``grid_sample(volume, affine_grid(theta, size))`` without the grid.

``affine_grid_sample(volume (N,C,D,H,W), theta (N,3,4), size [N,C,Do,Ho,Wo], align_corners) -> (N,C,Do,Ho,Wo)``
equals ``F.grid_sample(volume, F.affine_grid(theta, size, align_corners), mode="bilinear",
padding_mode="zeros", align_corners=align_corners)`` (trilinear, zero padding).

The normalised-coordinate conventions of ``affine_grid`` (base grid ``linspace(-1, 1)``, shrunk by
``(n-1)/n`` without ``align_corners``, 0 for a size-1 axis) and of ``grid_sample`` (unnormalisation) are
both affine, so in Python they fold with ``theta`` into one index-space map (the project's design: kernels
only apply maps): input index ``(d, h, w) = M[n] @ (d_o, h_o, w_o, 1)`` with
``M = diag(γ) · flip_rows(θ) · B + δ e₄ᵀ`` (:func:`index_maps`). Rows are flipped because ``grid[..., 0]``
is x (the W axis). The kernel is then a per-batch-item ``slice_volume``: one program per block of output
voxels of item ``n``, taps computed once and reused for every channel.

Backward: the volume gradient is the usual atomic scatter (not bitwise deterministic on a GPU); the
gradient with respect to ``M``, ``∂L/∂M[r, c] = Σ_voxels Σ_channels g · ∂val/∂x_r · p_c`` with
``p = (d_o, h_o, w_o, 1)``, is reduced per program and written as a ``(N, programs, 12)`` partial-sum buffer
that PyTorch sums (no atomics: deterministic), then mapped to ``theta`` through the transpose of the affine
fold, ``∂L/∂θ = flip_rows(diag(γ) ∂L/∂M) · Bᵀ``. Double backward is not implemented.

Block size: output voxels rounded up to a power of two, one per thread, clamped to [32, 256] on a GPU
(128 for the backward, whose theta reduction needs twice the registers), up to 4096 under the interpreter.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import (INTERPRETED, alert_not_deterministic, apply_row, check_float, define_op, interpreter_block,
                      launch, linear_taps, linear_taps_dx, one_per_thread, pow2_block, trilinear_gather,
                      trilinear_gather_with_grad, trilinear_scatter, voxel_coords)

__all__ = ["affine_grid_sample", "index_maps"]


def _base_coeffs(n: int, align_corners: bool) -> Tuple[float, float]:
    """``affine_grid``'s normalised base coordinate of output index ``i`` on an axis of ``n``: ``α i + β``."""
    if n <= 1:
        return 0.0, 0.0
    if align_corners:
        return 2.0 / (n - 1), -1.0
    return 2.0 / n, 1.0 / n - 1.0


def _unnormalise_coeffs(m: int, align_corners: bool) -> Tuple[float, float]:
    """``grid_sample``'s index of normalised coordinate ``g`` on an input axis of ``m``: ``γ g + δ``."""
    if align_corners:
        return (m - 1) / 2.0, (m - 1) / 2.0
    return m / 2.0, (m - 1) / 2.0


def _fold(theta: torch.Tensor, in_shape: Sequence[int], out_shape: Sequence[int], align_corners: bool):
    """``(B, gamma, delta)``: the 4x4 base matrix (output index (d,h,w,1) → normalised (x,y,z,1)) and the
    per-row (d, h, w) unnormalisation of the input."""
    ab = [_base_coeffs(int(n), align_corners) for n in out_shape]  # (D, H, W) order
    Bm = torch.zeros(4, 4, dtype=theta.dtype, device=theta.device)
    # x (grid[...,0]) follows w_o, y follows h_o, z follows d_o.
    Bm[0, 2], Bm[0, 3] = ab[2]
    Bm[1, 1], Bm[1, 3] = ab[1]
    Bm[2, 0], Bm[2, 3] = ab[0]
    Bm[3, 3] = 1.0
    gd = [_unnormalise_coeffs(int(m), align_corners) for m in in_shape]
    gamma = torch.tensor([g for g, _ in gd], dtype=theta.dtype, device=theta.device)
    delta = torch.tensor([d for _, d in gd], dtype=theta.dtype, device=theta.device)
    return Bm, gamma, delta


def index_maps(theta: torch.Tensor, in_shape: Sequence[int], out_shape: Sequence[int],
               align_corners: bool) -> torch.Tensor:
    """Index-space maps ``(N, 3, 4)``: input index (d, h, w) of output voxel (d_o, h_o, w_o) (rows d, h, w;
    columns d_o, h_o, w_o, 1). ``in_shape``/``out_shape`` are (D, H, W). Plain differentiable torch ops."""
    Bm, gamma, delta = _fold(theta, in_shape, out_shape, align_corners)
    M = gamma[:, None] * (theta.flip(1) @ Bm)
    return M + torch.cat([torch.zeros_like(delta)[:, None].expand(3, 3), delta[:, None]], dim=1)


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
def _ags_backward_kernel(g_ptr, vol_ptr, maps_ptr, gvol_ptr, part_ptr,
                         C, D, H, W, sgn, sgc, sgd, sgh, sgw, svn, svc, svd, svh, svw, Do, Ho, Wo,
                         VOLUME_GRAD: tl.constexpr, MAP_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    ct = maps_ptr.dtype.element_ty
    vox = pid * BLOCK + tl.arange(0, BLOCK)
    mask = vox < tl.cast(Do, tl.int64) * Ho * Wo
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
    gvol_c = gvol_ptr + n * C * D * H * W
    for c in range(C):
        g = tl.load(g_c, mask=mask, other=0.0).to(ct)
        if VOLUME_GRAD:
            trilinear_scatter(gvol_c, 0, d0, d1, dw0, dw1, h0, h1, hw0, hw1, w0, w1, ww0, ww1,
                              H * W, W, 1, g, mask)
        if MAP_GRAD:
            val, g0, g1, g2 = trilinear_gather_with_grad(vol_c, 0, d0, d1, dw0, dw1, dd0, dd1,
                                                         h0, h1, hw0, hw1, dh0, dh1,
                                                         w0, w1, ww0, ww1, dv0, dv1, svd, svh, svw, mask)
            s0 += g * g0
            s1 += g * g1
            s2 += g * g2
        g_c += sgc
        vol_c += svc
        gvol_c += tl.cast(D, tl.int64) * H * W
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


def _ags_impl(volume: torch.Tensor, theta: torch.Tensor, size: List[int], align_corners: bool) -> torch.Tensor:
    N, C, D, H, W = volume.shape
    Do, Ho, Wo = size[2:]
    out = volume.new_empty((N, C, Do, Ho, Wo))
    if out.numel() == 0:
        return out
    maps = index_maps(theta, (D, H, W), (Do, Ho, Wo), align_corners).contiguous()
    block = _block(Do * Ho * Wo)
    grid = (triton.cdiv(Do * Ho * Wo, block), N)
    launch(_ags_kernel, volume)[grid](volume, maps, out, C, D, H, W, *volume.stride(), Do, Ho, Wo,
                                      BLOCK=block, num_warps=one_per_thread(block))
    return out


_ags_op = define_op("affine_grid_sample", _ags_impl)


@_ags_op.register_fake
def _(volume, theta, size, align_corners):
    return volume.new_empty(tuple(size))


def _ags_backward_impl(grad: torch.Tensor, volume: torch.Tensor, theta: torch.Tensor, align_corners: bool,
                       volume_grad: bool, theta_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    if volume_grad:  # the theta reduction writes per-program partial sums: deterministic
        alert_not_deterministic("affine_grid_sample_backward (volume gradient)", grad.device)
    N, C, D, H, W = volume.shape
    Do, Ho, Wo = grad.shape[2:]
    Vo = Do * Ho * Wo
    maps = index_maps(theta, (D, H, W), (Do, Ho, Wo), align_corners).contiguous()
    block = _block(Vo, backward=True)
    programs = triton.cdiv(Vo, block)
    gvol = volume.new_zeros(volume.shape) if volume_grad else volume.new_empty((0,))
    part = volume.new_zeros((N, programs, 12)) if theta_grad else volume.new_empty((0,))
    if (volume_grad or theta_grad) and Vo > 0 and volume.numel() > 0:
        launch(_ags_backward_kernel, grad)[(programs, N)](
            grad, volume, maps, gvol if volume_grad else volume, part if theta_grad else volume,
            C, D, H, W, *grad.stride(), *volume.stride(), Do, Ho, Wo,
            VOLUME_GRAD=volume_grad, MAP_GRAD=theta_grad, BLOCK=block, num_warps=one_per_thread(block))
    if not theta_grad:
        return gvol, theta.new_empty((0,))
    gM = part.sum(1).reshape(N, 3, 4)
    Bm, gamma, _ = _fold(theta, (D, H, W), (Do, Ho, Wo), align_corners)
    return gvol, (gamma[:, None] * gM).flip(1) @ Bm.T


_ags_bwd_op = define_op("affine_grid_sample_backward", _ags_backward_impl)


@_ags_bwd_op.register_fake
def _(grad, volume, theta, align_corners, volume_grad, theta_grad):
    gv = volume.new_empty(volume.shape) if volume_grad else volume.new_empty((0,))
    gt = theta.new_empty(theta.shape) if theta_grad else theta.new_empty((0,))
    return gv, gt


def _setup(ctx, inputs, output):
    volume, theta, size, align_corners = inputs
    # The volume's values are only read for theta's gradient, but the backward op also takes its shape and
    # strides from it; saving an input costs no copy.
    ctx.save_for_backward(volume, theta)
    ctx.align_corners = align_corners


def _backward(ctx, grad):
    volume, theta = ctx.saved_tensors
    vg, tg = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (vg or tg):
        return None, None, None, None
    gv, gt = torch.ops.tonno_fast_triton.affine_grid_sample_backward(grad, volume, theta, ctx.align_corners,
                                                                     vg, tg)
    return (gv if vg else None), (gt if tg else None), None, None


_ags_op.register_autograd(_backward, setup_context=_setup)


def affine_grid_sample(volume: torch.Tensor, theta: torch.Tensor, size: Sequence[int],
                       align_corners: bool = False) -> torch.Tensor:
    """``grid_sample(volume, affine_grid(theta, size, align_corners), "bilinear", "zeros", align_corners)``
    for ``volume`` ``(N, C, D, H, W)`` and ``theta`` ``(N, 3, 4)`` (same dtype). Differentiable in ``volume``
    and ``theta``."""
    check_float(volume, "volume")
    if volume.ndim != 5:
        raise ValueError(f"volume must be 5-D (N, C, D, H, W), got shape {tuple(volume.shape)}")
    if not isinstance(theta, torch.Tensor) or theta.ndim != 3 or tuple(theta.shape[1:]) != (3, 4) \
            or theta.shape[0] != volume.shape[0]:
        shape = tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__
        raise ValueError(f"theta must have shape (N, 3, 4) with N = volume.shape[0] = {volume.shape[0]}, "
                         f"got {shape}")
    if theta.dtype != volume.dtype or theta.device != volume.device:
        raise TypeError(f"theta must have volume's dtype and device ({volume.dtype}, {volume.device}), "
                        f"got ({theta.dtype}, {theta.device})")
    size = [int(s) for s in size]
    if len(size) != 5 or size[0] != volume.shape[0] or size[1] != volume.shape[1] or min(size) < 0:
        raise ValueError(f"size must be (N, C, D_out, H_out, W_out) matching volume's N and C, got {tuple(size)}")
    return torch.ops.tonno_fast_triton.affine_grid_sample(volume, theta, size, bool(align_corners))
