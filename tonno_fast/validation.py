"""Input checks shared by the public functions: one clear error naming the argument and what was expected."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["as_volume5d", "check_volume5d", "compute_dtype"]


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
    and the original number of dimensions. NumPy arrays are accepted.
    """
    if isinstance(volume, np.ndarray):
        volume = torch.from_numpy(np.ascontiguousarray(volume))
    if not isinstance(volume, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(volume).__name__}")
    if volume.ndim not in (3, 4, 5):
        raise ValueError(f"{name} must have 3 (D,H,W), 4 (C,D,H,W) or 5 (B,C,D,H,W) dimensions, "
                         f"got {volume.ndim} with shape {tuple(volume.shape)}")
    if volume.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(volume.shape)}")
    dtype = compute_dtype(volume, name)
    ndim = volume.ndim
    vol = volume.to(dtype)
    while vol.ndim < 5:
        vol = vol.unsqueeze(0)
    if not allow_nonfinite and not bool(torch.isfinite(vol).all()):
        raise ValueError(f"{name} contains NaN or inf values; clean it (e.g. torch.nan_to_num) or pass "
                         f"allow_nonfinite=True")
    return vol, ndim


def check_volume5d(volume: torch.Tensor, name: str, spatial: Optional[Sequence[int]] = None) -> None:
    if not isinstance(volume, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(volume).__name__}")
    if volume.ndim != 5:
        raise ValueError(f"{name} must have shape (B, C, D, H, W), got {tuple(volume.shape)}")
    if volume.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {volume.dtype}")
    if spatial is not None and tuple(volume.shape[2:]) != tuple(spatial):
        raise ValueError(f"{name} has spatial shape {tuple(volume.shape[2:])} but the geometry was made "
                         f"for {tuple(spatial)}")
