"""Triton ``backproject``: smear a (filtered) sinogram back into a volume, and its adjoint.

``backproject(sinogram (B,K,N,S), volume_maps (N,3,4), weights (N,), (D,H,W)) -> (B,K,D,H,W)``:
``out[b,k,x] = Σ_n weights[n] · lerp(sinogram[b,k,n,:], t_n(x))`` with ``t_n(x) = volume_maps[n,0] @ (d,h,w,1)``
the continuous slice index; taps outside ``[0, S-1]`` read zero.

Kernel layout (arithmetic-bound: docs/performance.md): one program owns a tile of
``BLOCK_BK`` (batch×channel rows) × ``BLOCK_V`` voxels and **loops over all directions inside the kernel**:
the accumulator tile lives in registers for the whole sum, so each output voxel is written exactly once
(no atomics, no read-modify-write of the volume, deterministic), and ``t_n`` and the two tap weights are
computed once per voxel and direction and shared by the ``BLOCK_BK`` sinogram rows. The sinogram itself is
tiny (``B·K·N·S`` values, a few hundred kB at most) and is read with gathers that hit L1/L2: Triton exposes
no addressable shared memory, and a register-resident copy of a row could only be indexed through
``tl.gather`` or a one-hot reduction, both costlier than a cached load (NOTE: not measured here — this
machine has no GPU; ``benchmarks/gpu`` times it).

Block sizes: ``BLOCK_BK`` = B·K rounded up to a power of two, at most 8; ``BLOCK_V`` is autotuned on a GPU
over {128, 256, 512} voxels × {4, 8} warps, keyed on the problem size: the only kernel here whose speed
should depend on the tile shape, since a wide ``BLOCK_BK × BLOCK_V`` tile reuses each tap over more rows but
costs registers (NOTE, ptxas sm_90a float32, BLOCK_BK = 8: 54 registers at 128 voxels/4 warps, 96 at
256/4 and 98 at 512/8; 32 for a single row at 256/4; float64 doubles them). Autotuning is safe because the
kernel only writes its own output tile (no accumulation across launches). Under the interpreter there is no
autotuning and up to 4096 voxels per program.

The adjoint (``backproject_backward``: volume gradient → sinogram gradient) scatters every voxel's two taps
with ``tl.atomic_add`` into the ``S`` bins of each direction (tile 8 rows × 128 voxels, 4 warps): correct
but contended on a GPU, and the order of the adds (the last bits of a float32 result) varies from run to
run. Under ``torch.use_deterministic_algorithms(True)`` the same kernel (``EMIT``) writes its contributions
to buffers summed in a fixed order, chunk by chunk (``_common.run_scatter``): bitwise reproducible. A
contention-free alternative (a per-program reduction over the few bins a voxel tile touches) is the next
step if ``benchmarks/gpu`` shows the atomics dominate.
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from ._common import (INTERPRETED, apply_row, interpreter_block, interpreter_block_bk, launch, linear_taps, pow2_block,
                      row_offsets, run_scatter, sink_add, tile_offsets, voxel_tile)

__all__ = ["backproject", "backproject_backward"]


@triton.jit
def _backproject_kernel(sino_ptr, maps_ptr, wts_ptr, out_ptr,
                        BK, K, N, S, D, H, W, ssb, ssk, ssn, sss,
                        BLOCK_BK: tl.constexpr, BLOCK_V: tl.constexpr):
    ct = maps_ptr.dtype.element_ty
    V, vox, fd, fh, fw, bk, m2 = voxel_tile(tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), 0,
                                            BK, D, H, W, ct, BLOCK_BK, BLOCK_V)
    rows = row_offsets(bk, K, ssb, ssk)  # (BLOCK_BK, 1) sinogram row offsets
    acc = tl.zeros([BLOCK_BK, BLOCK_V], dtype=ct)
    m_ptr = maps_ptr
    w_ptr = wts_ptr
    s_ptr = sino_ptr + rows
    for n in range(N):
        t = apply_row(m_ptr, 0, fd, fh, fw)
        t0, t1, tw0, tw1 = linear_taps(t, S)
        g0 = tl.load(s_ptr + (t0 * sss)[None, :], mask=m2 & (tw0 != 0)[None, :], other=0.0)
        g1 = tl.load(s_ptr + (t1 * sss)[None, :], mask=m2 & (tw1 != 0)[None, :], other=0.0)
        acc += tl.load(w_ptr) * (tw0[None, :] * g0 + tw1[None, :] * g1)
        m_ptr += 12
        w_ptr += 1
        s_ptr += ssn
    tl.store(out_ptr + bk[:, None] * V + vox[None, :], acc, mask=m2)


@triton.jit
def _backproject_adjoint_kernel(g_ptr, maps_ptr, wts_ptr, out_ptr, idx_ptr, val_ptr,
                                BK, K, N, S, D, H, W, sgb, sgk, sgd, sgh, sgw, n0, v0, v1,
                                EMIT: tl.constexpr, BLOCK_BK: tl.constexpr, BLOCK_V: tl.constexpr):
    """``out (B,K,N,S) += w_n · tap weight · g[b,k,x]`` for the voxels of one tile and one direction.

    Work (``_common.run_scatter``): outer items = the directions from ``n0`` (grid y), inner items = the voxels
    ``[v0, v1)`` (grid x); slot of voxel ``x``, direction ``n``, row ``bk``, tap ``r``:
    ``(((n - n0)·(v1 - v0) + x - v0)·BK + bk)·2 + r``."""
    n = n0 + tl.program_id(1).to(tl.int64)
    ct = maps_ptr.dtype.element_ty
    V, vox, fd, fh, fw, bk, m2 = voxel_tile(tl.program_id(0).to(tl.int64), tl.program_id(2).to(tl.int64), v0,
                                            BK, D, H, W, ct, BLOCK_BK, BLOCK_V)
    t = apply_row(maps_ptr + n * 12, 0, fd, fh, fw)
    t0, t1, tw0, tw1 = linear_taps(t, S)
    m2 = m2 & ((tw0 + tw1) != 0)[None, :] & (vox < v1)[None, :]
    goff = tile_offsets(bk, K, vox, H, W, sgb, sgk, sgd, sgh, sgw)
    g = tl.load(g_ptr + goff, mask=m2, other=0.0).to(ct) * tl.load(wts_ptr + n)
    rows = (bk[:, None] * N + n) * S
    if EMIT:
        slot = (((n - n0) * (v1 - v0) + (vox - v0))[None, :] * BK + bk[:, None]) * 2
    else:
        slot = 0
    sink_add(out_ptr, rows + t0[None, :], tw0[None, :] * g, m2 & (tw0 != 0)[None, :], idx_ptr, val_ptr, slot, EMIT)
    sink_add(out_ptr, rows + t1[None, :], tw1[None, :] * g, m2 & (tw1 != 0)[None, :], idx_ptr, val_ptr, slot + 1,
             EMIT)


if INTERPRETED:
    _forward_kernel = _backproject_kernel
else:  # pragma: no cover - GPU only
    # A pure gather kernel (each output written once), so re-running it while tuning is harmless.
    _forward_kernel = triton.autotune(
        configs=[triton.Config({"BLOCK_V": bv}, num_warps=nw) for bv in (128, 256, 512) for nw in (4, 8)],
        key=["BK", "N", "S", "D", "H", "W"],
    )(_backproject_kernel)


def _block_bk(bk: int) -> int:
    return interpreter_block_bk(bk) if INTERPRETED else pow2_block(bk, 1, 8)


# ----------------------------------------------------------------------------------------------------------
# Launchers: the ops' implementations (schemas, checks, fake kernels and autograd: tonno_fast.ops.contract).

def backproject(sinogram: torch.Tensor, maps: torch.Tensor, weights: torch.Tensor,
                volume_shape: List[int]) -> torch.Tensor:
    """``(B, K, N, S)`` sinogram → ``(B, K, D, H, W)`` volume (see module doc)."""
    maps, weights = maps.contiguous(), weights.contiguous()
    B, K, N, S = sinogram.shape
    D, H, W = volume_shape
    out = sinogram.new_zeros((B, K, D, H, W))
    V = D * H * W
    if out.numel() == 0 or N == 0 or S == 0:
        return out
    bbk = _block_bk(B * K)
    args = (sinogram, maps, weights, out, B * K, K, N, S, D, H, W, *sinogram.stride())
    if INTERPRETED:
        bv = interpreter_block(V)
        grid = (triton.cdiv(V, bv), triton.cdiv(B * K, bbk))
        launch(_forward_kernel, sinogram)[grid](*args, BLOCK_BK=bbk, BLOCK_V=bv)
    else:  # pragma: no cover - GPU only
        grid = lambda meta: (triton.cdiv(V, meta["BLOCK_V"]), triton.cdiv(B * K, bbk))  # noqa: E731
        launch(_forward_kernel, sinogram)[grid](*args, BLOCK_BK=bbk)
    return out


def backproject_backward(grad: torch.Tensor, maps: torch.Tensor, weights: torch.Tensor, n_slices: int) -> torch.Tensor:
    """The adjoint: ``grad`` ``(B, K, D, H, W)`` → ``(B, K, N, n_slices)``."""
    maps, weights = maps.contiguous(), weights.contiguous()
    B, K, D, H, W = grad.shape
    N = maps.shape[0]
    out = torch.zeros((B, K, N, n_slices), dtype=maps.dtype, device=maps.device)
    V = D * H * W
    if out.numel() == 0 or V == 0:
        return out
    bbk = _block_bk(B * K)
    bv = interpreter_block(V) if INTERPRETED else pow2_block(V, 32, 128)
    run = launch(_backproject_adjoint_kernel, grad)

    def kernel(n0, n1, v0, v1, index, value, emit):
        grid = (triton.cdiv(v1 - v0, bv), n1 - n0, triton.cdiv(B * K, bbk))
        run[grid](grad, maps, weights, out, index, value, B * K, K, N, n_slices, D, H, W, *grad.stride(), n0, v0, v1,
                  EMIT=emit, BLOCK_BK=bbk, BLOCK_V=bv, num_warps=4)
    return run_scatter(out, N, V, 2 * B * K, maps, kernel)


# ----------------------------------------------------------------------------------------------------------
# Tooling (compile_check): the kernel variants the GPU launchers use, and small calls to trace.

#: (kernel, pointer dtype overrides, constexprs, num_warps)
COMPILE_VARIANTS = [
    ("_backproject_kernel", {}, dict(BLOCK_BK=8, BLOCK_V=256), 4),
    ("_backproject_adjoint_kernel", {}, dict(EMIT=False, BLOCK_BK=8, BLOCK_V=128), 4),
    ("_backproject_adjoint_kernel", {"idx_ptr": "i64"}, dict(EMIT=True, BLOCK_BK=8, BLOCK_V=128), 4),
]


def trace_samples(s):
    """``(op, function, inputs)`` to trace, from compile_check's small samples ``s``."""
    return [
        ("backproject", lambda x, m, w: s.ops.backproject(x, m, w, [5, 6, 7]), (s.r(1, 2, 2, 3), s.vm, s.w)),
        ("backproject_backward", lambda x, m, w: s.ops.backproject_backward(x, m, w, 3),
         (s.r(1, 2, 5, 6, 7), s.vm, s.w)),
    ]
