"""NIfTI in and out with nibabel, in the library's (D, H, W) = (z, y, x) convention.

nibabel returns arrays indexed ``[i, j, k]`` along the file's voxel axes; we transpose to ``[k, j, i]`` so
that the last tensor axis is the file's first (x-like) voxel axis, and report spacing ``(sz, sy, sx)`` from
the affine's column norms. Heatmaps are saved with the transpose undone and the source affine, as float32,
written to a temporary file and renamed so an interrupted run never leaves a partial output.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch

__all__ = ["NiftiVolume", "load_nifti", "save_nifti"]

PathLike = Union[str, os.PathLike]


@dataclass
class NiftiVolume:
    """A loaded scan: ``data`` ``(D, H, W)`` float32 tensor (z, y, x), ``spacing`` ``(sz, sy, sx)`` mm,
    ``affine`` the 4x4 voxel→world matrix of the file (in the file's own i, j, k voxel order)."""

    data: torch.Tensor
    spacing: Tuple[float, float, float]
    affine: np.ndarray
    header: object = None


def _is_nifti_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def load_nifti(path: PathLike, *, volume_index: Optional[int] = None) -> NiftiVolume:
    """Load a ``.nii``/``.nii.gz`` file as a ``(D, H, W)`` float32 tensor (scaling ``scl_slope`` applied).

    4D files need ``volume_index`` (which volume along the 4th axis). Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` for a file that is not a readable 3D NIfTI.
    """
    import nibabel as nib

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {p}")
    if not _is_nifti_name(p):
        raise ValueError(f"{p} is not a NIfTI file (expected a .nii or .nii.gz name)")
    try:
        img = nib.load(str(p))
        data = np.asanyarray(img.dataobj).astype(np.float32, copy=False)
    except Exception as exc:  # nibabel raises many types for broken files
        raise ValueError(f"cannot read {p} as NIfTI: {type(exc).__name__}: {exc}") from None
    data = np.squeeze(data, axis=tuple(range(3, data.ndim))) if data.ndim > 3 and all(
        s == 1 for s in data.shape[3:]) else data
    if data.ndim == 4:
        if volume_index is None:
            raise ValueError(f"{p} is a 4D NIfTI with {data.shape[3]} volumes; choose one with volume_index")
        if not 0 <= volume_index < data.shape[3]:
            raise ValueError(f"volume_index must be in [0, {data.shape[3]}), got {volume_index}")
        data = data[..., volume_index]
    if data.ndim != 3:
        raise ValueError(f"{p} holds a {data.ndim}D image with shape {data.shape}; a 3D volume is needed")
    affine = np.asarray(img.affine, dtype=np.float64)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # along voxel axes i, j, k
    spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
    tensor = torch.from_numpy(np.ascontiguousarray(data.transpose(2, 1, 0)))
    return NiftiVolume(tensor, spacing, affine, img.header)


def save_nifti(path: PathLike, heatmap, affine: np.ndarray, *, header=None) -> Path:
    """Write a ``(D, H, W)`` heatmap as float32 NIfTI with ``affine`` (the source scan's), atomically."""
    import nibabel as nib

    p = Path(path)
    if not _is_nifti_name(p):
        raise ValueError(f"output {p} must end in .nii or .nii.gz")
    arr = heatmap.detach().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    if arr.ndim != 3:
        raise ValueError(f"heatmap must be 3D (D, H, W), got shape {arr.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    img = nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)).astype(np.float32), affine)
    img.header.set_data_dtype(np.float32)
    img.header.set_xyzt_units("mm")
    if header is not None:
        try:
            img.header.set_qform(*header.get_qform(coded=True)) if header.get_qform(coded=True)[1] else None
            img.header.set_sform(*header.get_sform(coded=True)) if header.get_sform(coded=True)[1] else None
        except Exception:
            pass
    img.set_sform(affine, code=max(1, int(img.header["sform_code"])))
    img.set_qform(affine, code=max(1, int(img.header["qform_code"])))
    p.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if p.name.lower().endswith(".nii.gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=str(p.parent))
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p
