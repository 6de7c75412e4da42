"""The compiled backends ``cpu`` and ``cuda``: the ``torch.ops.tonno_fast`` operators of ``tonno_fast._C``.

Importing ``tonno_fast._C`` registers the C++ kernels (``csrc/ops/cpu/``, and ``csrc/ops/cuda/`` when built
with CUDA). This module then defines the ops as :mod:`tonno_fast.ops.contract` states them (schemas, fake
kernels, autograd) and registers the CPU/CUDA implementation of
``affine_grid_sample`` and its backward, which fold ``theta`` into index-space maps
(:func:`tonno_fast.geometry.affine_theta_maps`) and call the kernels of ``affine_sample``: the kernels only
ever apply maps.

``native.<op>`` is ``torch.ops.tonno_fast.<op>`` (the same module serves ``"cpu"`` and ``"cuda"``; the
dispatcher picks the kernel from the tensors' device). If ``tonno_fast._C`` is missing (not built) or fails to
load, this module still imports; :func:`unavailable_reason` says why and the registry falls back to the
reference backend.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

try:
    from .._extension import cuda_missing_reason, load_compiled
    _C = load_compiled()  # loading it registers the C++ kernels; never loaded if built for another torch
    _IMPORT_ERROR: Optional[str] = None
except (ImportError, OSError) as exc:  # not built, built against another torch, or fails to load: one line why
    _C = None
    _IMPORT_ERROR = str(exc)

from ..geometry import affine_theta_grad, affine_theta_maps
from . import contract

__all__ = ["unavailable_reason", "build_info"]


def build_info() -> Optional[Dict]:
    """What ``tonno_fast._C`` was built with (``cuda``, ``cuda_arch``, ``openmp``, ``omp_max_threads``,
    ``torch_version``), or None when the extension is unavailable."""
    return None if _C is None else dict(_C.build_info())


def unavailable_reason(backend: str) -> Optional[str]:
    """None if compiled backend ``backend`` ("cpu" or "cuda") can run here, else a one-line reason."""
    if _C is None:
        return _IMPORT_ERROR
    if backend == "cpu":
        return None
    if backend == "cuda":
        if not _C.build_info()["cuda"]:
            return f"tonno_fast._C was built without CUDA kernels ({cuda_missing_reason()})"
        if not torch.cuda.is_available():
            return "no CUDA device available (torch.cuda.is_available() is False)"
        return None
    return f"unknown compiled backend {backend!r} (expected 'cpu' or 'cuda')"


def __getattr__(name: str):
    """``native.radon`` is ``torch.ops.tonno_fast.radon`` (every op of the contract)."""
    if name in contract.CONTRACTS and _C is not None:
        return getattr(torch.ops.tonno_fast, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------
# affine_grid_sample on the CPU and CUDA kernels of affine_sample.

def _affine_grid_sample(volume: torch.Tensor, theta: torch.Tensor, size: List[int],
                        align_corners: bool) -> torch.Tensor:
    contract.CONTRACTS["affine_grid_sample"].check(volume, theta, size, align_corners)
    maps = affine_theta_maps(theta, volume.shape[2:], size[2:], align_corners)
    return torch.ops.tonno_fast.affine_sample(volume, maps, size)


def _affine_grid_sample_backward(grad: torch.Tensor, volume: torch.Tensor, theta: torch.Tensor,
                                 align_corners: bool, volume_grad: bool,
                                 theta_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    contract.CONTRACTS["affine_grid_sample_backward"].check(grad, volume, theta, align_corners, volume_grad,
                                                            theta_grad)
    maps = affine_theta_maps(theta, volume.shape[2:], grad.shape[2:], align_corners)
    gv, gm = torch.ops.tonno_fast.affine_sample_backward(grad, volume, maps, volume_grad, theta_grad)
    if not theta_grad:
        return gv, theta.new_empty((0,))
    return gv, affine_theta_grad(gm, volume.shape[2:], grad.shape[2:], align_corners, theta.dtype)


if _C is not None:
    contract.register_native()
    torch.library.impl("tonno_fast::affine_grid_sample", ("cpu", "cuda"), _affine_grid_sample)
    torch.library.impl("tonno_fast::affine_grid_sample_backward", ("cpu", "cuda"), _affine_grid_sample_backward)
