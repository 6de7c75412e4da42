"""Input checks shared by the public functions: one clear error naming the argument and what was expected.

Policy for volumes (``as_volume5d``, used by :func:`tonno_fast.tomographic_heatmap`), decided once here:

* ``bool`` volumes (masks) are **refused** with ``TypeError``: a mask has no intensity scale an encoder was
  trained on, so the caller converts it explicitly (``mask.float()``) and thereby says what 0/1 mean.
* integer volumes (int16 CT, uint8, ...) and float16/bfloat16 are **converted to float32**; float64 stays
  float64. int32/int64 magnitudes above 2**24 lose precision in float32 (never the case for CT/MRI).
* complex volumes are refused with ``TypeError``.
* non-finite voxels (NaN, ±inf) are **refused** with ``ValueError`` unless ``allow_nonfinite=True``, which
  passes them unchanged to the encoder (which must then return finite scores: a NaN score would spread over
  the whole heatmap through the filter and the backprojection).

The geometry-level operators (:mod:`tonno_fast.ops`) take float32/float64 tensors only, do not scan their
input for NaN (a full pass, and a device synchronisation on GPU) and propagate non-finite values the way any
PyTorch operator does.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["as_volume5d", "scan_and_spacing", "ScanInput", "NonFiniteError", "check_volume5d", "compute_dtype", "check_float_tensor", "check_nonempty",
           "check_same_device", "finite_float", "positive_int", "FLOAT_DTYPES"]

#: dtypes every operator computes in.
FLOAT_DTYPES = (torch.float32, torch.float64)


class NonFiniteError(ValueError):
    """A volume holds ``count`` NaN or inf voxels and ``allow_nonfinite`` was not given (the command line names
    its own option)."""

    def __init__(self, message: str, count: int = 0):
        super().__init__(message)
        self.count = count


def compute_dtype(t: torch.Tensor, name: str) -> torch.dtype:
    """float64 for float64 input, float32 for any other real dtype; bool and complex are refused."""
    if t.dtype == torch.bool:
        raise TypeError(f"{name} must be a real-valued tensor, got dtype torch.bool "
                        f"(convert a mask explicitly, e.g. {name}.float())")
    if t.is_complex():
        raise TypeError(f"{name} must be real-valued, got complex dtype {t.dtype}")
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def as_volume5d(volume, name: str = "volume", *, allow_nonfinite: bool = False
                ) -> Tuple[torch.Tensor, int]:
    """Convert ``(D,H,W)``, ``(C,D,H,W)`` or ``(B,C,D,H,W)`` input to a float ``(B,C,D,H,W)`` tensor.

    Returns the tensor (float32, or float64 for float64 input; integers such as int16 CT are converted)
    and the original number of dimensions. NumPy arrays are accepted. See the module docstring for the
    policy on bool, integer and non-finite input.
    """
    if isinstance(volume, np.ndarray):
        if not volume.dtype.isnative:  # e.g. big-endian data read from a file: torch needs native order
            volume = volume.astype(volume.dtype.newbyteorder("="))
        volume = torch.from_numpy(np.ascontiguousarray(volume))
    if not isinstance(volume, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(volume).__name__}")
    if volume.ndim not in (3, 4, 5):
        raise ValueError(f"{name} must have 3 (D,H,W), 4 (C,D,H,W) or 5 (B,C,D,H,W) dimensions, "
                         f"got {volume.ndim} with shape {tuple(volume.shape)}")
    if volume.numel() == 0:
        raise ValueError(f"{name} must not be empty (every axis at least 1), got shape {tuple(volume.shape)}")
    dtype = compute_dtype(volume, name)
    ndim = volume.ndim
    vol = volume.to(dtype)
    while vol.ndim < 5:
        vol = vol.unsqueeze(0)
    if not isinstance(allow_nonfinite, bool):
        raise TypeError(f"allow_nonfinite must be a bool, got {type(allow_nonfinite).__name__}")
    if not allow_nonfinite and vol.device.type != "meta" and not bool(torch.isfinite(vol).all()):
        bad = int((~torch.isfinite(vol)).sum())
        raise NonFiniteError(f"{name} contains {bad} NaN or inf values; clean it (e.g. torch.nan_to_num) or pass "
                             f"allow_nonfinite=True", bad)
    return vol, ndim


class ScanInput(NamedTuple):
    """What :func:`scan_and_spacing` makes of a pipeline's ``volume`` argument."""

    data: Any  #: tensor or array, axes (..., z, y, x)
    spacing: Optional[Tuple[float, float, float]]  #: (sz, sy, sx) mm: the object's own, else the one given
    restore: Callable[[torch.Tensor], Any]  #: the pipeline's output → the input's own kind (a MetaTensor)


def _same(heat: torch.Tensor) -> torch.Tensor:
    return heat


def scan_and_spacing(volume, spacing) -> ScanInput:
    """``(data, spacing, restore)`` of a pipeline's ``volume`` and ``spacing`` arguments: the one place where the
    objects users hold become the library's ``(..., z, y, x)`` volumes with a spacing in mm.

    * a MONAI ``MetaTensor`` ``(X, Y, Z)``, ``(C, X, Y, Z)`` or ``(B, C, X, Y, Z)`` in its file's voxel order:
      spatial axes reversed, spacing from its affine, and ``restore`` turns the heatmap into a ``MetaTensor`` of
      the input's order, rank and affine (:func:`tonno_fast.io.metatensor.from_metatensor`; MONAI is imported
      only then);
    * a nibabel image (``nib.load(path)``, a ``Nifti1Image``): read as :func:`tonno_fast.load_nifti` reads a
      file, ``(z, y, x)`` = the voxel axes ``(k, j, i)``, spacing from its affine;
    * a scan that carries its spacing (an object with ``.data`` and ``.spacing``, such as
      :func:`tonno_fast.load_nifti`'s result): both;
    * a tensor or NumPy array: itself (axes ``(..., z, y, x)``) and the ``spacing`` given.

    A given ``spacing`` that contradicts the object's own is refused with ``ValueError``. ``restore`` is the
    identity except for a ``MetaTensor``.
    """
    from .io.metatensor import from_metatensor, is_metatensor
    from .io.nifti import is_nibabel_image, load_nifti

    restore = _same
    if is_metatensor(volume):
        data, own, restore = from_metatensor(volume)
        source = "the MetaTensor's affine"
    elif is_nibabel_image(volume):
        scan = load_nifti(volume)
        data, own, source = scan.data, scan.spacing, "the nibabel image's affine"
    elif isinstance(volume, (torch.Tensor, np.ndarray)) or not (hasattr(volume, "data") and hasattr(volume, "spacing")):
        return ScanInput(volume, spacing, restore)
    else:
        data, own, source = volume.data, tuple(float(s) for s in volume.spacing), "the scan's own spacing"
    if spacing is not None:
        from .geometry import normalize_spacing
        given = normalize_spacing(spacing)
        if any(abs(a - b) > 1e-6 * max(a, b) for a, b in zip(given, own)):
            raise ValueError(f"spacing={given} contradicts {source} {own} (mm, z y x); leave spacing out")
    return ScanInput(data, own, restore)


def check_float_tensor(t, name: str, shape_hint: str) -> None:
    """``t`` must be a float32/float64 tensor (the dtypes the kernels compute in)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_hint}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype} (convert it, e.g. {name}.float())")


def check_nonempty(t: torch.Tensor, name: str) -> None:
    """Every axis of ``t`` at least 1. The operators refuse empty batches rather than return empty results, so
    that every backend behaves alike (the compiled kernels refuse them too)."""
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty (every axis at least 1), got shape {tuple(t.shape)}")


def check_same_device(t: torch.Tensor, name: str, like: torch.Tensor, like_name: str) -> None:
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}; "
                         f"move them to the same device")


def finite_float(x, name: str) -> float:
    """A finite Python float from a real number (``bool`` and strings refused)."""
    if isinstance(x, (bool, str, bytes)) or not isinstance(x, (int, float, np.integer, np.floating)):
        if not (isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_complex()):
            raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def positive_int(x, name: str, *, allow_none: bool = False) -> Optional[int]:
    """``x`` as a Python int if it is a positive integer (``int`` or NumPy integer; ``bool`` refused), else
    ``ValueError`` naming ``name``. With ``allow_none``, ``None`` passes through."""
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {x!r}")
    return int(x)


def check_volume5d(volume: torch.Tensor, name: str, spatial: Optional[Sequence[int]] = None) -> None:
    """``volume`` must be a float32/float64 ``(B, C, D, H, W)`` tensor, with ``(D, H, W) == spatial`` if given."""
    check_float_tensor(volume, name, "(B, C, D, H, W)")
    if volume.ndim != 5:
        raise ValueError(f"{name} must have shape (B, C, D, H, W), got {tuple(volume.shape)}")
    check_nonempty(volume, name)
    if spatial is not None and tuple(volume.shape[2:]) != tuple(spatial):
        raise ValueError(f"{name} has spatial shape {tuple(volume.shape[2:])} but the geometry was made "
                         f"for {tuple(spatial)}")
