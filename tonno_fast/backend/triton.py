"""The ``triton`` backend: the five operators as Triton kernels (:mod:`tonno_fast.triton`).

Same signatures as :mod:`tonno_fast.backend.reference` (index-space maps, no geometry), so the pipeline
and the GPU benchmarks call it interchangeably; :func:`slice_volume` and :func:`backproject_slices` also take
the fusion keywords of the kernel modules (``window``/``replicate_channels``, ``laplacian_spacing``).

Importing this module never fails, even where ``triton`` is missing or broken: the import error is kept and
:func:`unavailable_reason` reports it (the registry then marks the backend unavailable). The kernels run on
CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before ``triton`` is first imported: that
is how CI tests them; the interpreter is far too slow for real sizes).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["slice_volume", "radon", "backproject", "backproject_slices", "affine_grid_sample",
           "unavailable_reason"]

name = "triton"

try:
    from .. import triton as _kernels

    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # ImportError, or a broken triton install raising anything at import time
    _kernels = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def unavailable_reason(name: str = "triton") -> Optional[str]:
    """``None`` when the Triton kernels can run here, else a one-line reason."""
    if _kernels is None:
        return f"the Triton kernels could not be imported ({_IMPORT_ERROR})"
    if _kernels.INTERPRETED:
        return None
    if not torch.cuda.is_available():
        return ("no CUDA device for Triton (set TRITON_INTERPRET=1 before triton is imported to run the kernels "
                "on the CPU through the slow interpreter)")
    return None


def _k():
    if _kernels is None:
        raise RuntimeError(f"backend 'triton' is unavailable: {unavailable_reason()}")
    return _kernels


def slice_volume(volume: torch.Tensor, slice_maps: torch.Tensor, n_slices: int, height: int, width: int,
                 fill: float = 0.0, out_dtype: Optional[torch.dtype] = None, *,
                 window: Optional[Sequence[float]] = None, replicate_channels: int = 1) -> torch.Tensor:
    """``(B, C, D, H, W)`` → ``(B, N, S, C*replicate_channels, h, w)``; see :mod:`tonno_fast.triton.slice_volume`."""
    return _k().slice_volume.slice_volume(volume, slice_maps, n_slices, height, width, fill, out_dtype, window=window,
                             replicate_channels=replicate_channels)


def radon(volume: torch.Tensor, slice_maps: torch.Tensor, n_slices: int, height: int, width: int,
          scale: float = 1.0) -> torch.Tensor:
    """``(B, C, D, H, W)`` → ``(B, C, N, S)``; see :mod:`tonno_fast.triton.radon`."""
    return _k().radon.radon(volume, slice_maps, n_slices, height, width, scale)


def backproject(sinogram: torch.Tensor, volume_maps: torch.Tensor, weights: torch.Tensor,
                volume_shape: Sequence[int]) -> torch.Tensor:
    """``(B, K, N, S)`` → ``(B, K, D, H, W)``; see :mod:`tonno_fast.triton.backproject`."""
    return _k().backproject.backproject(sinogram, volume_maps, weights, volume_shape)


def backproject_slices(stacks: torch.Tensor, volume_maps: torch.Tensor, weights: torch.Tensor,
                       volume_shape: Sequence[int], laplacian_spacing: Optional[float] = None) -> torch.Tensor:
    """``(B, K, N, S, h, w)`` → ``(B, K, D, H, W)``; see :mod:`tonno_fast.triton.backproject_slices`."""
    return _k().backproject_slices.backproject_slices(stacks, volume_maps, weights, volume_shape, laplacian_spacing)


def affine_grid_sample(volume: torch.Tensor, theta: torch.Tensor, size: Sequence[int],
                       align_corners: bool = False) -> torch.Tensor:
    """``grid_sample(volume, affine_grid(theta, size))`` without the grid; see
    :mod:`tonno_fast.triton.affine_grid_sample`."""
    return _k().affine_grid_sample.affine_grid_sample(volume, theta, size, align_corners)
