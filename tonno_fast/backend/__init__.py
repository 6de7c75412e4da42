"""Backend registry: which implementation of the five operators runs for a given tensor.

Each backend module exposes the same five functions with the signatures documented in
:mod:`tonno_fast.backend.reference` (index-space maps, no geometry):
``slice_volume``, ``radon``, ``backproject``, ``backproject_slices``, ``affine_grid_sample``.

* ``reference``: plain PyTorch, always available, float64-capable; the oracle.
* ``cpu``: the compiled C++/OpenMP kernels (``tonno_fast._C``), CPU tensors.
* ``cuda``: the compiled CUDA kernels, CUDA tensors.
* ``triton``: Triton kernels (GPU, or the CPU under ``TRITON_INTERPRET=1``).
* ``auto``: ``cuda`` for CUDA tensors (else ``triton``, else ``reference``); ``cpu`` for CPU tensors
  (else ``reference``, with a one-line warning that the extension is missing).
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Dict

import torch

__all__ = ["BACKENDS", "get_backend", "backends", "BackendUnavailable"]

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (not built, no device, or its import failed)."""


_modules: Dict[str, ModuleType] = {}
_errors: Dict[str, str] = {}
_warned = set()


def _load(name: str):
    """Import a backend module once; remember why it failed."""
    if name in _modules:
        return _modules[name]
    if name in _errors:
        return None
    target = {"reference": "reference", "cpu": "native", "cuda": "native", "triton": "triton"}[name]
    try:
        mod = importlib.import_module(f"{__name__}.{target}")
        reason = mod.unavailable_reason(name) if hasattr(mod, "unavailable_reason") else None
    except Exception as exc:  # an optional backend must never break `import tonno_fast`
        reason = f"{type(exc).__name__}: {exc}"
        mod = None
    if reason:
        _errors[name] = reason
        return None
    _modules[name] = mod
    return mod


def backends() -> Dict[str, str]:
    """Availability of every backend: ``{name: "available" or the reason it is not}``."""
    out = {}
    for name in BACKENDS[1:]:
        out[name] = "available" if _load(name) is not None else _errors[name]
    return out


def get_backend(name: str, device: torch.device) -> ModuleType:
    """The backend module to use for tensors on ``device``.

    Raises ``ValueError`` for an unknown name and :class:`BackendUnavailable` when an explicitly
    requested backend cannot run on this device.
    """
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    device = torch.device(device)
    if name == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        for cand in order:
            mod = _load(cand)
            if mod is not None:
                return mod
            if cand == "cpu" and "cpu" not in _warned:
                _warned.add("cpu")
                warnings.warn(f"tonno_fast: compiled CPU kernels unavailable ({_errors['cpu']}); "
                              "using the slower reference backend", RuntimeWarning, stacklevel=3)
        raise AssertionError("reference backend must always load")
    if name == "cpu" and device.type != "cpu":
        raise BackendUnavailable(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if name == "cuda" and device.type != "cuda":
        raise BackendUnavailable(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    mod = _load(name)
    if mod is None:
        raise BackendUnavailable(f"backend={name!r} is unavailable: {_errors[name]}")
    return mod
