"""The reference backend: plain, vectorised PyTorch (``grid_sample`` and ``gather``), float32 and float64.

It is the oracle that every kernel is tested against and the fallback when no compiled backend is
available. Autograd comes from PyTorch itself (so it has no ``*_backward`` ops). Work is chunked over
directions so that the temporary coordinate grids stay under ``_CHUNK_BYTES``; there is no Python loop over
voxels or slices. Arguments are those of the ops' schemas (:mod:`tonno_fast.ops.contract`), checked by the
public operators, with maps and weights in the main tensor's dtype and on its device.

All functions use the index-space maps of :mod:`tonno_fast.geometry`:

* ``slice_volume(volume (B,C,D,H,W), slice_maps (N,3,4), S, h, w, fill, out_dtype) -> (B,N,S,C,h,w)``:
  ``out[b,n,k,c,i,j] = trilinear(volume[b,c], slice_maps[n] @ (k,i,j,1))``; a corner outside the volume
  reads ``fill``.
* ``radon(volume, slice_maps, S, h, w, scale) -> (B,C,N,S)``: ``scale * Σ_ij slice_volume(...)``.
* ``backproject(sinogram (B,K,N,S), volume_maps (N,3,4), weights (N,), (D,H,W)) -> (B,K,D,H,W)``:
  ``Σ_n weights[n] * lerp(sinogram[b,k,n], t)`` with ``t = volume_maps[n, 0] @ (d,h,w,1)``.
* ``backproject_slices(stacks (B,K,N,S,h,w), volume_maps, weights, (D,H,W)) -> (B,K,D,H,W)``:
  ``Σ_n weights[n] * trilinear(stacks[b,k,n], volume_maps[n] @ (d,h,w,1))``.
* ``affine_grid_sample(volume (N,C,D,H,W), theta (N,3,4), size, align_corners)``: exactly
  ``grid_sample(volume, affine_grid(theta, size, align_corners), "bilinear", "zeros", align_corners)``.

Every interpolation treats samples outside the array as zero (each corner/tap separately), as
``grid_sample(padding_mode="zeros")`` does.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["slice_volume", "radon", "backproject", "backproject_slices", "affine_grid_sample"]

name = "reference"

_CHUNK_BYTES = 256 * 2 ** 20  # temporary grid memory per chunk


def _chunk(n_items: int, bytes_per_item: int) -> int:
    return max(1, min(n_items, _CHUNK_BYTES // max(1, bytes_per_item)))


def _normalise(index: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Continuous indices ``(..., 3)`` in (d, h, w) order → ``grid_sample`` coordinates ``(..., 3)`` in
    (x, y, z) order with ``align_corners=False`` (valid for axes of size 1 too)."""
    size = torch.tensor(list(sizes), dtype=index.dtype, device=index.device)
    g = (2 * index + 1) / size - 1
    return g.flip(-1)


def _apply_maps(maps: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Coordinates ``maps[n] @ (a, b, c, 1)`` for every point of a grid of ``sizes = (A, B, C)``:
    ``(N, A, B, C, 3)``."""
    dev, dt = maps.device, maps.dtype
    a = torch.arange(sizes[0], device=dev, dtype=dt)
    b = torch.arange(sizes[1], device=dev, dtype=dt)
    c = torch.arange(sizes[2], device=dev, dtype=dt)
    M = maps[:, None, None, None]  # (N,1,1,1,3,4)
    return (M[..., 0] * a[:, None, None, None] + M[..., 1] * b[None, :, None, None]
            + M[..., 2] * c[None, None, :, None] + M[..., 3])


def slice_volume(volume: torch.Tensor, slice_maps: torch.Tensor, n_slices: int, height: int, width: int,
                 fill: float = 0.0, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    maps = slice_maps
    B, C, D, H, W = volume.shape
    N = maps.shape[0]
    src = volume - fill if fill != 0.0 else volume
    per_dir = n_slices * height * width * (3 + B * C) * volume.element_size()
    step = _chunk(N, per_dir)
    outs = []
    for n0 in range(0, N, step):
        m = maps[n0:n0 + step]
        grid = _normalise(_apply_maps(m, (n_slices, height, width)), (D, H, W))  # (n,S,h,w,3)
        n = m.shape[0]
        grid = grid.reshape(1, n * n_slices, height, width, 3).expand(B, -1, -1, -1, -1)
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        outs.append(out.reshape(B, C, n, n_slices, height, width))
    out = torch.cat(outs, dim=2).permute(0, 2, 3, 1, 4, 5)  # (B,N,S,C,h,w)
    if fill != 0.0:
        out = out + fill
    return out.to(out_dtype or volume.dtype).contiguous()


def radon(volume: torch.Tensor, slice_maps: torch.Tensor, n_slices: int, height: int, width: int,
          scale: float = 1.0) -> torch.Tensor:
    maps = slice_maps
    B, C = volume.shape[:2]
    N = maps.shape[0]
    per_dir = n_slices * height * width * (3 + B * C) * volume.element_size() * 2
    step = _chunk(N, per_dir)
    sums = [slice_volume(volume, maps[n0:n0 + step], n_slices, height, width).sum(dim=(-2, -1))
            for n0 in range(0, N, step)]  # (B,n,S,C)
    return torch.cat(sums, dim=1).permute(0, 3, 1, 2).contiguous() * scale  # (B,C,N,S)


def backproject(sinogram: torch.Tensor, volume_maps: torch.Tensor, weights: torch.Tensor,
                volume_shape: Sequence[int]) -> torch.Tensor:
    maps, w = volume_maps, weights
    B, K, N, S = sinogram.shape
    D, H, W = (int(x) for x in volume_shape)
    V = D * H * W
    step = _chunk(N, V * (4 + 3 * B * K) * sinogram.element_size())
    out = sinogram.new_zeros(B, K, V)
    for n0 in range(0, N, step):
        m = maps[n0:n0 + step, 0:1]  # (n,1,4): continuous slice index
        t = _apply_maps(m.expand(-1, 3, -1), (D, H, W))[..., 0].reshape(m.shape[0], V)  # (n,V)
        k0 = torch.floor(t)
        f = t - k0
        k0 = k0.long()
        g = sinogram[:, :, n0:n0 + step]  # (B,K,n,S)
        acc = 0
        for tap, wt in ((k0, 1 - f), (k0 + 1, f)):
            valid = (tap >= 0) & (tap < S)
            idx = tap.clamp(0, S - 1).expand(B, K, -1, -1)
            vals = torch.gather(g, 3, idx)
            acc = acc + vals * torch.where(valid, wt, torch.zeros_like(wt))
        out = out + (acc * w[n0:n0 + step, None]).sum(dim=2)
    return out.reshape(B, K, D, H, W)


def backproject_slices(stacks: torch.Tensor, volume_maps: torch.Tensor, weights: torch.Tensor,
                       volume_shape: Sequence[int]) -> torch.Tensor:
    maps, w = volume_maps, weights
    B, K, N, S, h, wd = stacks.shape
    D, H, W = (int(x) for x in volume_shape)
    step = _chunk(N, D * H * W * (3 + 2 * B * K) * stacks.element_size())
    out = stacks.new_zeros(B, K, D, H, W)
    for n0 in range(0, N, step):
        m = maps[n0:n0 + step]
        n = m.shape[0]
        grid = _normalise(_apply_maps(m, (D, H, W)), (S, h, wd))  # (n,D,H,W,3)
        src = stacks[:, :, n0:n0 + step].permute(2, 0, 1, 3, 4, 5).reshape(n, B * K, S, h, wd)
        vals = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out + torch.einsum("n,nxdhw->xdhw", w[n0:n0 + step], vals).reshape(B, K, D, H, W)
    return out


def affine_grid_sample(volume: torch.Tensor, theta: torch.Tensor, size: Sequence[int],
                       align_corners: bool = False) -> torch.Tensor:
    grid = F.affine_grid(theta, list(size), align_corners=align_corners)
    return F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)
