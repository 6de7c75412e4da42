"""Triton ``backproject_slices``: map per-slice 2D maps (CAM stacks) back into the volume, and its adjoint.

``backproject_slices(stacks (B,K,N,S,h,w), volume_maps (N,3,4), weights (N,), (D,H,W)) -> (B,K,D,H,W)``:
``out[b,k,x] = Σ_n weights[n] · trilinear(stacks[b,k,n], volume_maps[n] @ (d,h,w,1))``; corners outside the
stack read zero.

Fused filter (``laplacian_spacing=Δs``, mm): the stacks are first filtered along the slice axis with the
3-tap ``laplacian`` of :mod:`tonno_fast.filters`, ``g'[k] = -(g[k-1] - 2 g[k] + g[k+1]) / Δs²`` with edge
replication (``g[-1] = g[0]``, ``g[S] = g[S-1]``), i.e. the Tomographic-CAM backprojection in one pass
without materialising the filtered stacks. Interpolating the filtered stack at slice coordinate ``t`` with
slice taps ``k0 = floor(t)`` (weight ``a``) and ``k0 + 1`` (weight ``b``) reads four planes of the raw stack,
clamped to ``[0, S-1]`` (the clamp *is* the edge replication):
``-a·g[k0-1] + (2a - b)·g[k0] + (2b - a)·g[k0+1] - b·g[k0+2]``, each plane read bilinearly (16 loads
instead of 8). The adjoint scatters into the same four planes with the same weights, so it is exactly the
transpose, boundary rows included (the edge-replicated laplacian is not symmetric there).

Kernel layout as :mod:`.backproject`: a tile of ``BLOCK_BK`` batch×channel rows × ``BLOCK_V`` voxels, loop
over directions inside the kernel, accumulator in registers, each voxel written once (deterministic).
On a GPU the tile is 4 rows × 128 voxels with 4 warps: the 8- (16-, laplacian) corner gathers need far
more registers than ``backproject``'s two taps (NOTE, ptxas sm_90a float32: 71 registers, 72 with the
laplacian; 163 at 256 voxels), and the loads are cache-latency bound, so the tile is fixed rather than
autotuned. Under the interpreter: up to 16 rows × 4096 voxels.

The adjoint (``backproject_slices_backward``) scatters each voxel's value into the 8 (16) stack corners of
every direction with ``tl.atomic_add``: not bitwise reproducible on a GPU. Under
``torch.use_deterministic_algorithms(True)`` the same kernel (``EMIT``) writes its contributions to buffers
summed in a fixed order, chunk by chunk (``_common.run_scatter``): bitwise reproducible.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._common import (INTERPRETED, apply_row, bilinear_gather, bilinear_scatter, interpreter_block,
                      interpreter_block_bk, launch, linear_taps, pow2_block, row_offsets, run_scatter, scalars,
                      tile_offsets, trilinear_gather, trilinear_scatter, voxel_tile)

__all__ = ["backproject_slices", "backproject_slices_backward"]


@triton.jit
def _laplacian_planes(t, S):
    """The four clamped plane indices and weights of a laplacian-filtered stack read at slice coordinate
    ``t`` (see module doc); all weights are 0 when no slice tap is valid (NaN-safe)."""
    ok = (t > -1.0) & (t < S)
    ts = tl.where(ok, t, 0.0)
    fl = tl.floor(ts)
    k0 = fl.to(tl.int64)
    f = ts - fl
    a = tl.where(ok & (k0 >= 0), 1.0 - f, 0.0)
    b = tl.where(ok & (k0 + 1 <= S - 1), f, 0.0)
    q0 = tl.minimum(tl.maximum(k0 - 1, 0), S - 1)
    q1 = tl.minimum(tl.maximum(k0, 0), S - 1)
    q2 = tl.minimum(tl.maximum(k0 + 1, 0), S - 1)
    q3 = tl.minimum(tl.maximum(k0 + 2, 0), S - 1)
    return q0, q1, q2, q3, -a, 2.0 * a - b, 2.0 * b - a, -b


@triton.jit
def _plane_gather(ptr, base, q, c, s_plane, i0, i1, wi0, wi1, j0, j1, wj0, wj1, s1, s2, mask):
    """``c · bilinear(plane q)`` for one of the four :func:`_laplacian_planes` (no load where ``c == 0``)."""
    return c[None, :] * bilinear_gather(ptr, base + (q * s_plane)[None, :], i0, i1, wi0, wi1, j0, j1, wj0, wj1,
                                        s1, s2, mask & (c != 0)[None, :])


@triton.jit
def _plane_scatter(ptr, base, q, c, s_plane, i0, i1, wi0, wi1, j0, j1, wj0, wj1, s1, s2, val, mask,
                   idx_ptr, val_ptr, slot, EMIT: tl.constexpr):
    """Adjoint of :func:`_plane_gather`: ``plane q += c · val`` spread over the bilinear corners (slots
    ``slot .. slot + 3`` with ``EMIT``)."""
    bilinear_scatter(ptr, base + (q * s_plane)[None, :], i0, i1, wi0, wi1, j0, j1, wj0, wj1, s1, s2,
                     c[None, :] * val, mask & (c != 0)[None, :], idx_ptr, val_ptr, slot, EMIT)


@triton.jit
def _stack_coords(m_ptr, fd, fh, fw, h, w):
    """Slice coordinate ``t`` and the in-plane taps of voxels ``(fd, fh, fw)`` in the stack of map ``m_ptr``."""
    i = apply_row(m_ptr, 1, fd, fh, fw)
    j = apply_row(m_ptr, 2, fd, fh, fw)
    i0, i1, wi0, wi1 = linear_taps(i, h)
    j0, j1, wj0, wj1 = linear_taps(j, w)
    # Row taps broadcast over the (BLOCK_BK, BLOCK_V) tile.
    return (apply_row(m_ptr, 0, fd, fh, fw), i0[None, :], i1[None, :], wi0[None, :], wi1[None, :],
            j0[None, :], j1[None, :], wj0[None, :], wj1[None, :])


@triton.jit
def _bps_kernel(st_ptr, maps_ptr, wts_ptr, par_ptr, out_ptr,
                BK, K, N, S, h, w, D, H, W, ssb, ssk, ssn, sss, ssh, ssw,
                LAPLACIAN: tl.constexpr, BLOCK_BK: tl.constexpr, BLOCK_V: tl.constexpr):
    ct = maps_ptr.dtype.element_ty
    V, vox, fd, fh, fw, bk, m2 = voxel_tile(tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), 0,
                                            BK, D, H, W, ct, BLOCK_BK, BLOCK_V)
    base = row_offsets(bk, K, ssb, ssk)  # (BLOCK_BK, 1) offsets of stacks[b, k, 0]
    acc = tl.zeros([BLOCK_BK, BLOCK_V], dtype=ct)
    m_ptr = maps_ptr
    for n in range(N):
        t, i0, i1, wi0, wi1, j0, j1, wj0, wj1 = _stack_coords(m_ptr, fd, fh, fw, h, w)
        if LAPLACIAN:
            q0, q1, q2, q3, c0, c1, c2, c3 = _laplacian_planes(t, S)
            v = _plane_gather(st_ptr, base, q0, c0, sss, i0, i1, wi0, wi1, j0, j1, wj0, wj1, ssh, ssw, m2)
            v += _plane_gather(st_ptr, base, q1, c1, sss, i0, i1, wi0, wi1, j0, j1, wj0, wj1, ssh, ssw, m2)
            v += _plane_gather(st_ptr, base, q2, c2, sss, i0, i1, wi0, wi1, j0, j1, wj0, wj1, ssh, ssw, m2)
            v += _plane_gather(st_ptr, base, q3, c3, sss, i0, i1, wi0, wi1, j0, j1, wj0, wj1, ssh, ssw, m2)
            v = v * tl.load(par_ptr)  # 1 / Δs²
        else:
            t0, t1, tw0, tw1 = linear_taps(t, S)
            v = trilinear_gather(st_ptr, base, t0[None, :], t1[None, :], tw0[None, :], tw1[None, :],
                                 i0, i1, wi0, wi1, j0, j1, wj0, wj1, sss, ssh, ssw, m2)
        acc += tl.load(wts_ptr + n) * v
        m_ptr += 12
        base += ssn
    tl.store(out_ptr + bk[:, None] * V + vox[None, :], acc, mask=m2)


@triton.jit
def _bps_adjoint_kernel(g_ptr, maps_ptr, wts_ptr, par_ptr, out_ptr, idx_ptr, val_ptr,
                        BK, K, N, S, h, w, D, H, W, sgb, sgk, sgd, sgh, sgw, n0, v0, v1,
                        EMIT: tl.constexpr, LAPLACIAN: tl.constexpr, BLOCK_BK: tl.constexpr, BLOCK_V: tl.constexpr):
    """``out (B,K,N,S,h,w)`` (contiguous) ``+= w_n · corner weights · g[b,k,x]`` for one tile and direction.

    Work (``_common.run_scatter``): outer items = the directions from ``n0`` (grid y), inner items = the voxels
    ``[v0, v1)`` (grid x); ``NC`` = 8 corners (16 with the laplacian: 4 planes × 4) per voxel, direction and row;
    slot of voxel ``x``, direction ``n``, row ``bk``, corner ``r``:
    ``(((n - n0)·(v1 - v0) + x - v0)·BK + bk)·NC + r``."""
    n = n0 + tl.program_id(1).to(tl.int64)
    ct = maps_ptr.dtype.element_ty
    V, vox, fd, fh, fw, bk, m2 = voxel_tile(tl.program_id(0).to(tl.int64), tl.program_id(2).to(tl.int64), v0,
                                            BK, D, H, W, ct, BLOCK_BK, BLOCK_V)
    m2 = m2 & (vox < v1)[None, :]
    t, i0, i1, wi0, wi1, j0, j1, wj0, wj1 = _stack_coords(maps_ptr + n * 12, fd, fh, fw, h, w)
    goff = tile_offsets(bk, K, vox, H, W, sgb, sgk, sgd, sgh, sgw)
    g = tl.load(g_ptr + goff, mask=m2, other=0.0).to(ct) * tl.load(wts_ptr + n)
    base = (bk[:, None] * N + n) * (tl.cast(S, tl.int64) * h * w)
    hw = tl.cast(h, tl.int64) * w
    if EMIT:
        slot = ((n - n0) * (v1 - v0) + (vox - v0))[None, :] * BK + bk[:, None]  # times NC below
    else:
        slot = 0
    if LAPLACIAN:
        q0, q1, q2, q3, c0, c1, c2, c3 = _laplacian_planes(t, S)
        g = g * tl.load(par_ptr)
        _plane_scatter(out_ptr, base, q0, c0, hw, i0, i1, wi0, wi1, j0, j1, wj0, wj1, w, 1, g, m2,
                       idx_ptr, val_ptr, slot * 16, EMIT)
        _plane_scatter(out_ptr, base, q1, c1, hw, i0, i1, wi0, wi1, j0, j1, wj0, wj1, w, 1, g, m2,
                       idx_ptr, val_ptr, slot * 16 + 4, EMIT)
        _plane_scatter(out_ptr, base, q2, c2, hw, i0, i1, wi0, wi1, j0, j1, wj0, wj1, w, 1, g, m2,
                       idx_ptr, val_ptr, slot * 16 + 8, EMIT)
        _plane_scatter(out_ptr, base, q3, c3, hw, i0, i1, wi0, wi1, j0, j1, wj0, wj1, w, 1, g, m2,
                       idx_ptr, val_ptr, slot * 16 + 12, EMIT)
    else:
        t0, t1, tw0, tw1 = linear_taps(t, S)
        trilinear_scatter(out_ptr, base, t0[None, :], t1[None, :], tw0[None, :], tw1[None, :],
                          i0, i1, wi0, wi1, j0, j1, wj0, wj1, hw, w, 1, g, m2, idx_ptr, val_ptr, slot * 8, EMIT)


def _blocks(bk: int, V: int):
    if INTERPRETED:
        return interpreter_block_bk(bk), interpreter_block(V)
    return pow2_block(bk, 1, 4), pow2_block(V, 32, 128)


def _params(laplacian_spacing: Optional[float], like: torch.Tensor) -> torch.Tensor:
    """``[1/Δs²]`` for the fused laplacian; without it the kernel never reads the pointer (``like`` stands in,
    sparing a host-to-device copy)."""
    return like if laplacian_spacing is None else scalars([1.0 / laplacian_spacing ** 2], like)


# ----------------------------------------------------------------------------------------------------------
# Launchers: the ops' implementations (schemas, checks, fake kernels and autograd: tonno_fast.ops.contract).

def backproject_slices(stacks: torch.Tensor, maps: torch.Tensor, weights: torch.Tensor, volume_shape: List[int],
                       laplacian_spacing: Optional[float]) -> torch.Tensor:
    """``(B, K, N, S, h, w)`` stacks → ``(B, K, D, H, W)`` volume; ``laplacian_spacing``: slice spacing Δs (mm) of
    the fused ``laplacian`` filter along the slice axis (``None``: no filter). See module doc."""
    maps, weights = maps.contiguous(), weights.contiguous()
    B, K, N, S, h, w = stacks.shape
    D, H, W = volume_shape
    out = stacks.new_zeros((B, K, D, H, W))
    V = D * H * W
    if out.numel() == 0 or N * S * h * w == 0:
        return out
    bbk, bv = _blocks(B * K, V)
    grid = (triton.cdiv(V, bv), triton.cdiv(B * K, bbk))
    launch(_bps_kernel, stacks)[grid](stacks, maps, weights, _params(laplacian_spacing, stacks), out,
                                      B * K, K, N, S, h, w, D, H, W, *stacks.stride(),
                                      LAPLACIAN=laplacian_spacing is not None, BLOCK_BK=bbk, BLOCK_V=bv,
                                      num_warps=4)
    return out


def backproject_slices_backward(grad: torch.Tensor, maps: torch.Tensor, weights: torch.Tensor, stack_shape: List[int],
                                laplacian_spacing: Optional[float]) -> torch.Tensor:
    """The adjoint: ``grad`` ``(B, K, D, H, W)`` → ``(B, K, N, S, h, w)`` with ``stack_shape = (S, h, w)``."""
    maps, weights = maps.contiguous(), weights.contiguous()
    B, K, D, H, W = grad.shape
    S, h, w = stack_shape
    N = maps.shape[0]
    out = torch.zeros((B, K, N, S, h, w), dtype=maps.dtype, device=maps.device)
    V = D * H * W
    if out.numel() == 0 or V == 0:
        return out
    bbk, bv = _blocks(B * K, V)
    params = _params(laplacian_spacing, maps)
    run = launch(_bps_adjoint_kernel, grad)

    def kernel(n0, n1, v0, v1, index, value, emit):
        grid = (triton.cdiv(v1 - v0, bv), n1 - n0, triton.cdiv(B * K, bbk))
        run[grid](grad, maps, weights, params, out, index, value, B * K, K, N, S, h, w, D, H, W, *grad.stride(),
                  n0, v0, v1, EMIT=emit, LAPLACIAN=laplacian_spacing is not None, BLOCK_BK=bbk, BLOCK_V=bv,
                  num_warps=4)
    corners = 16 if laplacian_spacing is not None else 8
    return run_scatter(out, N, V, corners * B * K, maps, kernel)


# ----------------------------------------------------------------------------------------------------------
# Tooling (compile_check): the kernel variants the GPU launchers use, and small calls to trace.

#: (kernel, pointer dtype overrides, constexprs, num_warps)
COMPILE_VARIANTS = (
    [("_bps_kernel", {}, dict(LAPLACIAN=laplacian, BLOCK_BK=4, BLOCK_V=128), 4) for laplacian in (False, True)]
    + [("_bps_adjoint_kernel", {"idx_ptr": "i64"} if emit else {},
        dict(EMIT=emit, LAPLACIAN=laplacian, BLOCK_BK=4, BLOCK_V=128), 4)
       for emit in (False, True) for laplacian in (False, True)])


def trace_samples(s):
    """``(op, function, inputs)`` to trace, from compile_check's small samples ``s``."""
    return [
        ("backproject_slices", lambda x, m, w: s.ops.backproject_slices(x, m, w, [5, 6, 7], 0.9),
         (s.r(1, 2, 2, 3, 4, 5), s.vm, s.w)),
        ("backproject_slices_backward", lambda x, m, w: s.ops.backproject_slices_backward(x, m, w, [3, 4, 5], 0.9),
         (s.r(1, 2, 5, 6, 7), s.vm, s.w)),
    ]
