"""The operators, called with a :class:`~tonno_fast.geometry.Geometry`: the functions other ToNNO code swaps in.

``slice_volume``, ``radon``, ``backproject``, ``backproject_slices`` and ``affine_grid_sample`` (see
docs/design.md, "Operators"), plus ``filtered_backprojection``. Each checks its arguments (the public
boundary: one clear ``TypeError``/``ValueError`` naming the argument), turns the geometry into index-space maps
in the input's dtype and on its device (:mod:`tonno_fast.geometry` does the geometry) and calls the op of a
backend (:mod:`tonno_fast.ops.registry`). All are linear in their tensor input and differentiable; on the
compiled backends, backward is the exact adjoint kernel.

Package layout (one contract per op, several implementations; docs/adding-an-op.md):

* :mod:`.contract`: per op, the argument checks, output shapes, and adjoint that every kernel honours, and
  the ``torch.library`` registration of both op namespaces;
* :mod:`.registry`: which backend runs (:func:`backends`, ``backend="auto"``);
* :mod:`.reference` (plain PyTorch, the oracle), :mod:`.native` (the C++/CUDA ops of ``tonno_fast._C``),
  :mod:`.triton` (Triton kernels): the implementations;
* :mod:`.problems`: the benchmark problems of every op.
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch

from ..filters import apply_filter, reconstruction_scale
from ..geometry import Geometry
from ..validation import check_float_tensor, check_nonempty, check_same_device, check_volume5d, finite_float
from .contract import OUT_DTYPES
from .registry import BackendUnavailable, backends, get_backend

__all__ = ["slice_volume", "radon", "backproject", "backproject_slices", "affine_grid_sample",
           "filtered_backprojection", "backends", "BackendUnavailable"]


def slice_volume(volume: torch.Tensor, geometry: Geometry, *, fill: float = 0.0,
                 out_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> torch.Tensor:
    """Oblique slices of ``volume`` ``(B, C, D, H, W)`` (z, y, x) → ``(B, N, S, C, h, w)``.

    Trilinear sampling at the pixel positions of ``geometry`` (mm); points outside read ``fill`` (a finite
    number). ``out_dtype`` (``torch.float32``, ``float64``, ``float16`` or ``bfloat16``; default the volume's
    dtype) is the dtype the slices are written in.
    """
    _check_geometry(geometry)
    check_volume5d(volume, "volume", geometry.volume_shape)
    fill = finite_float(fill, "fill")
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be None or one of {OUT_DTYPES}, got {out_dtype!r}")
    maps = geometry.slice_maps(dtype=volume.dtype, device=volume.device)
    return get_backend(backend, volume.device).slice_volume(volume, maps, geometry.n_slices, geometry.height,
                                                            geometry.width, fill, out_dtype)


def radon(volume: torch.Tensor, geometry: Geometry, *, backend: str = "auto") -> torch.Tensor:
    """Plane integrals ``Σ_ij f(p_ij) δ²`` (mm²) of ``volume`` ``(B, C, D, H, W)`` → sinogram ``(B, C, N, S)``."""
    _check_geometry(geometry)
    check_volume5d(volume, "volume", geometry.volume_shape)
    maps = geometry.slice_maps(dtype=volume.dtype, device=volume.device)
    return get_backend(backend, volume.device).radon(volume, maps, geometry.n_slices, geometry.height,
                                                     geometry.width, geometry.pixel_area)


def backproject(sinogram: torch.Tensor, geometry: Geometry, *, weights: Optional[torch.Tensor] = None,
                backend: str = "auto") -> torch.Tensor:
    """``out(x) = Σ_n weights[n] · sinogram[..., n, :](x·n_n)`` (linear interpolation in s).

    ``sinogram`` ``(B, K, N, S)`` → volume ``(B, K, D, H, W)``. ``weights`` ``(N,)`` default to the geometry's
    quadrature weights (no filter and no ``1/4π²``: see :func:`filtered_backprojection`).
    """
    _check_sinogram(sinogram, geometry)
    return _backproject(sinogram, geometry, weights, backend)


def backproject_slices(stacks: torch.Tensor, geometry: Geometry, *, weights: Optional[torch.Tensor] = None,
                       backend: str = "auto") -> torch.Tensor:
    """``out(x) = Σ_n weights[n] · stacks[..., n, :, :, :](k, i, j of x)`` (trilinear in the stack).

    ``stacks`` ``(B, K, N, S, h, w)`` → volume ``(B, K, D, H, W)``; ``weights`` as in :func:`backproject`.
    """
    _check_geometry(geometry)
    check_float_tensor(stacks, "stacks", "(B, K, N, S, h, w)")
    if stacks.ndim != 6:
        raise ValueError(f"stacks must have shape (B, K, N, S, h, w), got {tuple(stacks.shape)}")
    expect = (geometry.n_directions, geometry.n_slices, geometry.height, geometry.width)
    if tuple(stacks.shape[2:]) != expect:
        raise ValueError(f"stacks must have (N, S, h, w) = {expect} for this geometry, "
                         f"got {tuple(stacks.shape[2:])}")
    check_nonempty(stacks, "stacks")
    maps = geometry.volume_maps(dtype=stacks.dtype, device=stacks.device)
    w = _weights(weights, geometry, stacks, "stacks")
    return get_backend(backend, stacks.device).backproject_slices(stacks, maps, w, list(geometry.volume_shape))


def affine_grid_sample(volume: torch.Tensor, theta: torch.Tensor, size: Sequence[int],
                       align_corners: bool = False, *, backend: str = "auto") -> torch.Tensor:
    """Drop-in for ``F.grid_sample(volume, F.affine_grid(theta, size, align_corners), mode="bilinear",
    padding_mode="zeros", align_corners=align_corners)`` with 5-D ``volume`` ``(N, C, D, H, W)`` and
    ``theta`` ``(N, 3, 4)``, without materialising the grid. Differentiable in ``volume`` and ``theta``."""
    check_float_tensor(volume, "volume", "(N, C, D, H, W)")
    if volume.ndim != 5:
        raise ValueError(f"volume must be 5-D (N, C, D, H, W), got shape {tuple(volume.shape)}")
    check_nonempty(volume, "volume")
    if not isinstance(theta, torch.Tensor):
        raise TypeError(f"theta must be a torch.Tensor of shape (N, 3, 4), got {type(theta).__name__}")
    if theta.ndim != 3 or theta.shape[1:] != (3, 4) or theta.shape[0] != volume.shape[0]:
        raise ValueError(f"theta must have shape (N, 3, 4) with N = volume.shape[0] = {volume.shape[0]}, "
                         f"got {tuple(theta.shape)}")
    # Same rule as F.grid_sample(volume, F.affine_grid(theta, ...)): no silent casts or copies between devices.
    if theta.dtype != volume.dtype:
        raise TypeError(f"theta must have the volume's dtype {volume.dtype}, got {theta.dtype}")
    check_same_device(theta, "theta", volume, "volume")
    try:
        sizes = [operator.index(s) for s in size]  # ints only: 2.5 is refused, not truncated
    except TypeError:
        sizes = None
    if sizes is None or len(sizes) != 5:
        raise ValueError(f"size must be 5 integers (N, C, D_out, H_out, W_out), got {size!r}")
    if sizes[0] != volume.shape[0] or sizes[1] != volume.shape[1] or min(sizes[2:]) < 1:
        raise ValueError(f"size must be (N, C, D_out, H_out, W_out) with volume's N = {volume.shape[0]}, "
                         f"C = {volume.shape[1]} and positive output sizes, got {tuple(sizes)}")
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners must be a bool, got {type(align_corners).__name__}")
    return get_backend(backend, volume.device).affine_grid_sample(volume, theta, sizes, align_corners)


def filtered_backprojection(sinogram: torch.Tensor, geometry: Geometry, *, filter: str = "ramp2",
                            window: Optional[str] = None, backend: str = "auto") -> torch.Tensor:
    """Invert the 3D Radon transform (docs/design.md, "Reconstruction"): sinogram ``(B, K, N, S)`` → volume
    ``(B, K, D, H, W)``.

    ``f(x) = 1/(4π²) Σ_k w_k (Λ² p_k)(x·n_k)`` for ``ramp2``; ``filter="none"`` averages backprojections.
    """
    _check_sinogram(sinogram, geometry)
    filtered = apply_filter(sinogram, filter, window, slice_spacing=geometry.slice_spacing)
    return _backproject(filtered, geometry, reconstruction_scale(filter, geometry.weights), backend)


def _backproject(sinogram: torch.Tensor, geometry: Geometry, weights, backend: str) -> torch.Tensor:
    """:func:`backproject` once ``sinogram`` is known to fit ``geometry``."""
    maps = geometry.volume_maps(dtype=sinogram.dtype, device=sinogram.device)
    w = _weights(weights, geometry, sinogram, "sinogram")
    return get_backend(backend, sinogram.device).backproject(sinogram, maps, w, list(geometry.volume_shape))


def _check_geometry(geometry) -> None:
    if not isinstance(geometry, Geometry):
        raise TypeError(f"geometry must be a tonno_fast.Geometry (see make_geometry), got {type(geometry).__name__}")


def _check_sinogram(sinogram: torch.Tensor, geometry: Geometry) -> None:
    _check_geometry(geometry)
    check_float_tensor(sinogram, "sinogram", "(B, K, N, S)")
    if sinogram.ndim != 4:
        raise ValueError(f"sinogram must have shape (B, K, N, S), got {tuple(sinogram.shape)}")
    expect = (geometry.n_directions, geometry.n_slices)
    if tuple(sinogram.shape[2:]) != expect:
        raise ValueError(f"sinogram must have (N, S) = {expect} for this geometry, got {tuple(sinogram.shape[2:])}")
    check_nonempty(sinogram, "sinogram")


def _weights(weights, geometry: Geometry, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """Per-direction weights ``(N,)`` in ``like``'s dtype and on its device.

    ``None`` means the geometry's quadrature weights. A tensor may live on the CPU (it is small and copied,
    as the filters' reconstruction scale is) or on ``like``'s device; any other device is refused.
    """
    if weights is None:
        return geometry.weights.to(device=like.device, dtype=like.dtype)
    if not isinstance(weights, torch.Tensor):
        weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.dtype == torch.bool or weights.is_complex():
        raise TypeError(f"weights must be real numbers, got dtype {weights.dtype}")
    if weights.ndim != 1 or weights.shape[0] != geometry.n_directions:
        raise ValueError(f"weights must have shape (N,) = ({geometry.n_directions},), one per direction, "
                         f"got {tuple(weights.shape)}")
    if weights.device.type != "cpu" and weights.device != like.device:
        raise ValueError(f"weights is on {weights.device} but {like_name} is on {like.device}; "
                         f"pass CPU weights or weights on {like.device}")
    w = weights.to(device=like.device, dtype=like.dtype)
    if w.device.type != "meta" and not bool(torch.isfinite(w).all()):
        raise ValueError("weights must be finite, got NaN or inf")
    return w
