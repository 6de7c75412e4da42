"""Geometry-level operators: the five ops of DESIGN.md §4 called with a :class:`~tonno_fast.geometry.Geometry`.

These are the functions other ToNNO code swaps in. They turn the geometry into index-space maps (the
only place that does) and dispatch to a backend (:mod:`tonno_fast.backends`). All are linear in their
tensor input and differentiable; on the compiled backends, backward is the exact adjoint kernel.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .backends import get_backend
from .filters import apply_filter, reconstruction_scale
from .geometry import Geometry
from .validation import check_volume5d, compute_dtype

__all__ = ["slice_volume", "radon", "backproject", "backproject_slices", "affine_grid_sample",
           "filtered_backprojection"]


def slice_volume(volume: torch.Tensor, geometry: Geometry, *, fill: float = 0.0,
                 out_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> torch.Tensor:
    """Oblique slices of ``volume`` ``(B, C, D, H, W)`` (z, y, x) → ``(B, N, S, C, h, w)``.

    Trilinear sampling at the pixel positions of ``geometry`` (mm); points outside read ``fill``.
    ``out_dtype`` (e.g. ``torch.bfloat16``) is the dtype the slices are written in.
    """
    check_volume5d(volume, "volume", geometry.volume_shape)
    be = get_backend(backend, volume.device)
    maps = geometry.slice_maps(dtype=volume.dtype, device=volume.device)
    return be.slice_volume(volume, maps, geometry.n_slices, geometry.height, geometry.width, float(fill),
                           out_dtype)


def radon(volume: torch.Tensor, geometry: Geometry, *, backend: str = "auto") -> torch.Tensor:
    """Plane integrals ``Σ_ij f(p_ij) δ²`` of ``volume`` ``(B, C, D, H, W)`` → sinogram ``(B, C, N, S)``."""
    check_volume5d(volume, "volume", geometry.volume_shape)
    be = get_backend(backend, volume.device)
    maps = geometry.slice_maps(dtype=volume.dtype, device=volume.device)
    return be.radon(volume, maps, geometry.n_slices, geometry.height, geometry.width, geometry.pixel_area)


def backproject(sinogram: torch.Tensor, geometry: Geometry, *, weights: Optional[torch.Tensor] = None,
                backend: str = "auto") -> torch.Tensor:
    """``out(x) = Σ_n weights[n] · sinogram[..., n, :](x·n_n)`` (linear interpolation in s).

    ``sinogram`` ``(B, K, N, S)`` → volume ``(B, K, D, H, W)``. ``weights`` default to the geometry's
    quadrature weights (no filter and no ``1/4π²``: see :func:`filtered_backprojection`).
    """
    _check_sinogram(sinogram, geometry)
    be = get_backend(backend, sinogram.device)
    maps = geometry.volume_maps(dtype=sinogram.dtype, device=sinogram.device)
    w = (geometry.weights if weights is None else weights).to(device=sinogram.device, dtype=sinogram.dtype)
    return be.backproject(sinogram, maps, w, geometry.volume_shape)


def backproject_slices(stacks: torch.Tensor, geometry: Geometry, *, weights: Optional[torch.Tensor] = None,
                       backend: str = "auto") -> torch.Tensor:
    """``out(x) = Σ_n weights[n] · stacks[..., n, :, :, :](k, i, j of x)`` (trilinear in the stack).

    ``stacks`` ``(B, K, N, S, h, w)`` → volume ``(B, K, D, H, W)``.
    """
    if stacks.ndim != 6:
        raise ValueError(f"stacks must have shape (B, K, N, S, h, w), got {tuple(stacks.shape)}")
    expect = (geometry.n_directions, geometry.n_slices, geometry.height, geometry.width)
    if tuple(stacks.shape[2:]) != expect:
        raise ValueError(f"stacks must have (N, S, h, w) = {expect} for this geometry, "
                         f"got {tuple(stacks.shape[2:])}")
    be = get_backend(backend, stacks.device)
    maps = geometry.volume_maps(dtype=stacks.dtype, device=stacks.device)
    w = (geometry.weights if weights is None else weights).to(device=stacks.device, dtype=stacks.dtype)
    return be.backproject_slices(stacks, maps, w, geometry.volume_shape)


def affine_grid_sample(volume: torch.Tensor, theta: torch.Tensor, size: Sequence[int],
                       align_corners: bool = False, *, backend: str = "auto") -> torch.Tensor:
    """Drop-in for ``F.grid_sample(volume, F.affine_grid(theta, size, align_corners), mode="bilinear",
    padding_mode="zeros", align_corners=align_corners)`` with 5-D ``volume`` ``(N, C, D, H, W)`` and
    ``theta`` ``(N, 3, 4)``, without materialising the grid."""
    if volume.ndim != 5:
        raise ValueError(f"volume must be 5-D (N, C, D, H, W), got shape {tuple(volume.shape)}")
    if theta.ndim != 3 or theta.shape[1:] != (3, 4) or theta.shape[0] != volume.shape[0]:
        raise ValueError(f"theta must have shape (N, 3, 4) with N = volume.shape[0] = {volume.shape[0]}, "
                         f"got {tuple(theta.shape)}")
    if len(size) != 5 or int(size[0]) != volume.shape[0] or int(size[1]) != volume.shape[1]:
        raise ValueError(f"size must be (N, C, D_out, H_out, W_out) matching volume's N and C, got {tuple(size)}")
    be = get_backend(backend, volume.device)
    return be.affine_grid_sample(volume, theta, [int(s) for s in size], bool(align_corners))


def filtered_backprojection(sinogram: torch.Tensor, geometry: Geometry, *, filter: str = "ramp2",
                            window: Optional[str] = None, backend: str = "auto") -> torch.Tensor:
    """Invert the 3D Radon transform (DESIGN.md §3): sinogram ``(B, K, N, S)`` → volume ``(B, K, D, H, W)``.

    ``f(x) = 1/(4π²) Σ_k w_k (Λ² p_k)(x·n_k)`` for ``ramp2``; ``filter="none"`` averages backprojections.
    """
    _check_sinogram(sinogram, geometry)
    filtered = apply_filter(sinogram, filter, window, slice_spacing=geometry.slice_spacing)
    scale = reconstruction_scale(filter, geometry.weights)
    return backproject(filtered, geometry, weights=scale, backend=backend)


def _check_sinogram(sinogram: torch.Tensor, geometry: Geometry) -> None:
    if not isinstance(sinogram, torch.Tensor):
        raise TypeError(f"sinogram must be a torch.Tensor, got {type(sinogram).__name__}")
    if sinogram.ndim != 4:
        raise ValueError(f"sinogram must have shape (B, K, N, S), got {tuple(sinogram.shape)}")
    expect = (geometry.n_directions, geometry.n_slices)
    if tuple(sinogram.shape[2:]) != expect:
        raise ValueError(f"sinogram must have (N, S) = {expect} for this geometry, got {tuple(sinogram.shape[2:])}")
    compute_dtype(sinogram, "sinogram")
