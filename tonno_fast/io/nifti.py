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

__all__ = ["NiftiVolume", "load_nifti", "save_nifti", "is_nibabel_image", "spacing_from_affine"]

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


def load_nifti(path, *, volume_index: Optional[int] = None) -> NiftiVolume:
    """Load a ``.nii``/``.nii.gz`` file, or a nibabel image already in memory (``nib.load(...)``, a
    ``Nifti1Image``, any nibabel spatial image), as a ``(D, H, W)`` float32 tensor (z, y, x: the file's voxel
    axes ``(i, j, k)`` reversed; ``scl_slope`` applied) with spacing ``(sz, sy, sx)`` mm from the affine
    (:func:`spacing_from_affine`) and the affine itself.

    4D images need ``volume_index`` (which volume along the 4th axis). Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` for a file or image that is not a readable 3D volume.
    """
    if is_nibabel_image(path):
        return _from_image(path, "the nibabel image", volume_index)
    import nibabel as nib

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_nifti takes a path or a nibabel image, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {p}")
    if not _is_nifti_name(p):
        raise ValueError(f"{p} is not a NIfTI file (expected a .nii or .nii.gz name)")
    try:
        img = nib.load(str(p))
    except Exception as exc:  # nibabel raises many types for broken files
        raise ValueError(f"cannot read {p} as NIfTI: {type(exc).__name__}: {exc}") from None
    return _from_image(img, str(p), volume_index)


def is_nibabel_image(obj) -> bool:
    """Whether ``obj`` is a nibabel image (found by its type's module, so nibabel is not imported for this)."""
    return (any(c.__module__.split(".")[0] == "nibabel" for c in type(obj).__mro__)
            and hasattr(obj, "dataobj") and hasattr(obj, "affine"))


def spacing_from_affine(affine) -> Tuple[float, float, float]:
    """Voxel spacing ``(sz, sy, sx)`` mm of a 4x4 voxel→world matrix over voxel axes ``(i, j, k)`` (a NIfTI
    file's, a nibabel image's, a MONAI ``MetaTensor``'s): the norms of its columns ``k, j, i``, i.e. in the
    library's (z, y, x) axis order. Checked first (:func:`_check_affine`)."""
    affine = np.asarray(affine, dtype=np.float64)
    _check_affine(affine, "the affine")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # along voxel axes i, j, k
    return float(zooms[2]), float(zooms[1]), float(zooms[0])


def _from_image(img, name: str, volume_index: Optional[int]) -> NiftiVolume:
    """A nibabel image → :class:`NiftiVolume` (what :func:`load_nifti` returns)."""
    try:
        data = np.asanyarray(img.dataobj).astype(np.float32, copy=False)
    except Exception as exc:  # nibabel raises many types for broken files
        raise ValueError(f"cannot read {name} as NIfTI: {type(exc).__name__}: {exc}") from None
    data = np.squeeze(data, axis=tuple(range(3, data.ndim))) if data.ndim > 3 and all(
        s == 1 for s in data.shape[3:]) else data
    if data.ndim == 4:
        if volume_index is None:
            raise ValueError(f"{name} is a 4D NIfTI with {data.shape[3]} volumes; choose one with volume_index")
        if isinstance(volume_index, bool) or not isinstance(volume_index, (int, np.integer)):
            raise TypeError(f"volume_index must be an integer, got {type(volume_index).__name__}")
        if not 0 <= volume_index < data.shape[3]:
            raise ValueError(f"volume_index must be in [0, {data.shape[3]}), got {volume_index}")
        data = data[..., volume_index]
    if data.ndim != 3:
        raise ValueError(f"{name} holds a {data.ndim}D image with shape {data.shape}; a 3D volume is needed")
    affine = img.affine
    if affine is None:  # an image made with affine=None: nibabel's own choice from the header's zooms
        affine = img.header.get_best_affine()
    affine = np.asarray(affine, dtype=np.float64)
    _check_affine(affine, f"the affine of {name}")
    spacing = spacing_from_affine(affine)
    tensor = torch.from_numpy(np.ascontiguousarray(data.transpose(2, 1, 0)))
    return NiftiVolume(tensor, spacing, affine, getattr(img, "header", None))


def _check_affine(affine: np.ndarray, name: str) -> None:
    """A usable voxel→world matrix: 4x4, finite, with an invertible 3x3 part (non-zero voxel sizes)."""
    if affine.shape != (4, 4):
        raise ValueError(f"{name} must be 4x4, got {affine.shape}")
    if not np.isfinite(affine).all():
        raise ValueError(f"{name} must be finite, got NaN or inf entries")
    # |det| / Π column norms is 1 for orthogonal voxel axes and 0 for a zero or repeated axis; scale-free, so
    # micrometre voxels given in mm pass.
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if (norms == 0).any() or abs(np.linalg.det(affine[:3, :3])) / norms.prod() < 1e-6:
        raise ValueError(f"{name} must be invertible (non-zero voxel sizes), got a singular 3x3 part "
                         f"{affine[:3, :3].tolist()}")


def save_nifti(path: PathLike, heatmap, affine: np.ndarray, *, header=None) -> Path:
    """Write a ``(D, H, W)`` heatmap as float32 NIfTI with ``affine`` (the source scan's), atomically.

    The image goes to a temporary file in the target folder, is flushed to disk and then renamed over
    ``path`` (``os.replace``, atomic on POSIX and Windows): an interruption at any point (Ctrl-C, an error,
    a crash) leaves either the previous file or no file, never a partial one. The result gets the usual
    permissions (``0o666`` minus the umask), not the private ``0o600`` of a temporary file.
    """
    import nibabel as nib

    p = Path(path)
    if not _is_nifti_name(p):
        raise ValueError(f"output {p} must end in .nii or .nii.gz")
    # float() first: numpy has no bfloat16.
    arr = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    if arr.ndim != 3:
        raise ValueError(f"heatmap must be 3D (D, H, W), got shape {arr.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    _check_affine(affine, "affine")
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
        with open(tmp, "rb+") as fh:  # on disk before the rename, so a power cut cannot expose a partial file
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def _umask() -> int:
    """The process umask: from /proc on Linux (no side effect), else by setting and restoring it (which another
    thread creating a file in that instant could notice)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
