"""Which implementation of the operators runs for a given tensor.

A backend is a module exposing every op of :data:`tonno_fast.ops.contract.CONTRACTS` under its name, with the
op's schema (index-space maps, no geometry; arguments as in :mod:`tonno_fast.ops.contract`):

* ``reference`` (:mod:`tonno_fast.ops.reference`): plain PyTorch, always available, float64-capable; the oracle;
* ``cpu`` and ``cuda`` (:mod:`tonno_fast.ops.native`): the compiled ``torch.ops.tonno_fast`` ops of
  ``tonno_fast._C`` on CPU and CUDA tensors;
* ``triton`` (:mod:`tonno_fast.ops.triton.backend`): the ``torch.ops.tonno_fast_triton`` ops (a GPU, or the CPU under
  ``TRITON_INTERPRET=1``);
* ``auto``: ``cuda`` for CUDA tensors (else ``triton``, else ``reference``); ``cpu`` for CPU tensors (else
  ``reference``, with a one-line warning that the extension is missing).
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Dict

import torch

__all__ = ["BACKENDS", "get_backend", "backends", "BackendUnavailable"]

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
_MODULES = {"reference": "reference", "cpu": "native", "cuda": "native", "triton": "triton.backend"}


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (not built, no device, or its import failed)."""


_loaded: Dict[str, ModuleType] = {}
_errors: Dict[str, str] = {}
_warned = set()


def _load(name: str):
    """The backend module ``name``, imported once, or None (the reason is kept in ``_errors``)."""
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        return None
    try:
        mod = importlib.import_module(f"{__package__}.{_MODULES[name]}")
        reason = mod.unavailable_reason(name) if hasattr(mod, "unavailable_reason") else None
    except Exception as exc:  # an optional backend must never break `import tonno_fast`
        mod, reason = None, f"{type(exc).__name__}: {exc}"
    if reason:
        _errors[name] = reason
        return None
    _loaded[name] = mod
    return mod


def backends() -> Dict[str, str]:
    """Availability of every backend: ``{name: "available" or the reason it is not}``."""
    return {name: "available" if _load(name) is not None else _errors[name] for name in BACKENDS[1:]}


def get_backend(name: str, device: torch.device) -> ModuleType:
    """The backend module to use for tensors on ``device``.

    Raises ``ValueError`` for an unknown name and :class:`BackendUnavailable` when an explicitly requested
    backend cannot run on this device.
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
        raise AssertionError("the reference backend always loads")
    if name in ("cpu", "cuda") and device.type != name:
        raise BackendUnavailable(f"backend={name!r} needs {name.upper()} tensors, got tensors on {device}")
    mod = _load(name)
    if mod is None:
        raise BackendUnavailable(f"backend={name!r} is unavailable: {_errors[name]}")
    if name == "triton" and device.type != "cuda" and not mod.INTERPRETED:
        raise BackendUnavailable(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                                 f"imported), got tensors on {device}")
    return mod
