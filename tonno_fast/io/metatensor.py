"""MONAI ``MetaTensor`` in and out, without importing MONAI unless such a tensor is passed.

A ``MetaTensor`` (what MONAI's ``LoadImage``/``LoadImaged`` return, and what its transforms pass on) holds the
image in the file's voxel order, channel first: ``(X, Y, Z)`` without a channel, ``(C, X, Y, Z)`` after
``EnsureChannelFirst``, ``(B, C, X, Y, Z)`` batched by its ``DataLoader``; spatial axes are the voxel axes
``(i, j, k)`` of its ``affine`` (4x4, or ``(B, 4, 4)`` for a batch), which MONAI's spatial transforms keep
up to date (``meta["pixdim"]`` is the file header's and is not). The library's volumes are ``(..., z, y, x)``,
the same axes reversed, exactly as :func:`tonno_fast.load_nifti` reads a file. So a ``MetaTensor`` input is
read as its last three axes reversed with spacing from its affine (:func:`tonno_fast.io.spacing_from_affine`),
and the heatmap goes back as a ``MetaTensor`` in the input's own order and rank with its affine and metadata.
"""
from __future__ import annotations

from typing import Callable, Tuple

import numpy as np
import torch

from .nifti import spacing_from_affine

__all__ = ["is_metatensor", "from_metatensor"]


def is_metatensor(obj) -> bool:
    """Whether ``obj`` is a MONAI ``MetaTensor`` (found by its type's name and module: MONAI is not imported)."""
    return isinstance(obj, torch.Tensor) and any(
        c.__name__ == "MetaTensor" and c.__module__.split(".")[0] == "monai" for c in type(obj).__mro__)


def _spacing(x) -> Tuple[float, float, float]:
    affine = x.affine
    affine = np.asarray(affine.detach().cpu().double() if isinstance(affine, torch.Tensor) else affine,
                        dtype=np.float64)
    if affine.ndim == 2:
        return spacing_from_affine(affine)
    if affine.ndim != 3 or affine.shape[0] < 1:
        raise ValueError(f"the MetaTensor's affine must be 4x4 or (B, 4, 4), got shape {affine.shape}")
    per_item = [spacing_from_affine(a) for a in affine]
    first = per_item[0]
    for b, sp in enumerate(per_item[1:], 1):
        if any(abs(a - c) > 1e-6 * max(a, c) for a, c in zip(sp, first)):
            raise ValueError(f"the volumes of a batched MetaTensor must share one voxel spacing, got {first} for "
                             f"item 0 and {sp} for item {b} (mm, z y x); resample them (e.g. MONAI's Spacingd) "
                             f"or pass them one at a time")
    return first


def from_metatensor(x) -> Tuple[torch.Tensor, Tuple[float, float, float], Callable[[torch.Tensor], torch.Tensor]]:
    """``(data, spacing, restore)`` of a ``MetaTensor`` ``x`` of rank 3 ``(X, Y, Z)``, 4 ``(C, X, Y, Z)`` or 5
    ``(B, C, X, Y, Z)``.

    ``data``: a plain tensor of the same rank with the spatial axes reversed, ``(..., z, y, x)`` = ``(..., D, H,
    W)``; ``spacing``: ``(sz, sy, sx)`` mm from the affine; ``restore``: a pipeline's output for ``data``
    (``(D, H, W)``, or ``(B, K, D, H, W)``) → a ``MetaTensor`` in ``x``'s order with ``x``'s affine,
    metadata and applied operations (so MONAI's inverse transforms apply to it): rank 3 ``(X, Y, Z)`` for a rank-3
    input and one output, else ``(K, X, Y, Z)`` for rank 3 or 4, ``(B, K, X, Y, Z)`` for rank 5.
    """
    rank = x.ndim
    if rank not in (3, 4, 5):
        raise ValueError(f"a MetaTensor volume must have 3 (X, Y, Z), 4 (C, X, Y, Z) or 5 (B, C, X, Y, Z) "
                         f"dimensions, got shape {tuple(x.shape)}")
    spacing = _spacing(x)
    plain = x.as_subclass(torch.Tensor)
    data = plain.permute(*range(rank - 3), rank - 1, rank - 2, rank - 3).contiguous()

    def restore(heat: torch.Tensor) -> torch.Tensor:
        from monai.data import MetaTensor

        if heat.ndim == 5 and rank in (3, 4):
            heat = heat[0]  # (K, D, H, W): the batch of one that a 3D or 4D volume became
        out = heat.permute(*range(heat.ndim - 3), heat.ndim - 1, heat.ndim - 2, heat.ndim - 3).contiguous()
        meta = dict(x.meta)
        meta["affine"] = x.affine.clone()  # the same voxel grid: the input's affine, not a shared tensor
        res = MetaTensor(out, meta=meta, applied_operations=list(x.applied_operations))
        res.is_batch = bool(getattr(x, "is_batch", False))
        return res

    return data, spacing, restore
