"""The ``triton`` backend: the ``torch.ops.tonno_fast_triton`` operators, defined here from the launchers of the
op modules (:mod:`tonno_fast.ops.triton`) and the contract (:mod:`tonno_fast.ops.contract`).

``backend.<op>`` is the op with the arguments of the other backends; two take the Triton-only fusions as
keywords: :func:`slice_volume` (``window``, ``replicate_channels``) and
:func:`backproject_slices` (``laplacian_spacing``). Importing this module never fails, even where ``triton`` is
missing or broken: the error is kept and :func:`unavailable_reason` reports it. The kernels run on CUDA
tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before ``triton`` is first imported: that is how
CI tests them; the interpreter is far too slow for real sizes).
"""
from __future__ import annotations

import importlib
import math
from typing import Dict, Optional, Sequence

import torch

from .. import contract


def _module_name(op: str) -> str:
    """The module of an op's kernels and launcher: the forward op's name (``radon_backward`` → ``radon``)."""
    return op[:-len("_backward")] if op.endswith("_backward") else op


#: The op modules, in the order of the contract (forward ops only).
OP_MODULES = tuple(dict.fromkeys(_module_name(op) for op, c in contract.CONTRACTS.items() if c.triton))

try:
    from . import _common
    _modules = {name: importlib.import_module(f"{__package__}.{name}") for name in OP_MODULES}
    INTERPRETED = _common.INTERPRETED
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # ImportError, or a broken triton install raising anything at import time
    _modules, INTERPRETED = {}, False
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["unavailable_reason", "op_modules", "slice_volume", "backproject_slices", "INTERPRETED", "OP_MODULES"]


def unavailable_reason(name: str = "triton") -> Optional[str]:
    """``None`` when the Triton kernels can run here, else a one-line reason."""
    if _IMPORT_ERROR is not None:
        return f"the Triton kernels could not be imported ({_IMPORT_ERROR})"
    if INTERPRETED or torch.cuda.is_available():
        return None
    return ("no CUDA device for Triton (set TRITON_INTERPRET=1 before triton is imported to run the kernels "
            "on the CPU through the slow interpreter)")


def op_modules() -> Dict[str, object]:
    """``{name: module}`` of the op modules (empty when the kernels could not be imported)."""
    return dict(_modules)


if _IMPORT_ERROR is None:
    contract.define_triton({op: getattr(_modules[_module_name(op)], op)
                            for op, c in contract.CONTRACTS.items() if c.triton}, interpreted=INTERPRETED)


def __getattr__(name: str):
    """``backend.radon`` is ``torch.ops.tonno_fast_triton.radon`` (every op of the contract)."""
    if name in contract.CONTRACTS and contract.CONTRACTS[name].triton and _IMPORT_ERROR is None:
        return getattr(torch.ops.tonno_fast_triton, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def slice_volume(volume: torch.Tensor, maps: torch.Tensor, n_slices: int, height: int, width: int,
                 fill: float = 0.0, out_dtype: Optional[torch.dtype] = None, *,
                 window: Optional[Sequence[float]] = None, replicate_channels: int = 1) -> torch.Tensor:
    """Slices ``(B, N, S, C*replicate_channels, h, w)`` of ``volume`` ``(B, C, D, H, W)``, with the
    encoder-input fusions of :mod:`.slice_volume`.

    ``window=(lo, hi)`` (inference only): ``(clamp(v, lo, hi) - lo) / (hi - lo)``, in intensity units of the
    volume. ``replicate_channels``: copies of each channel, consecutive (``repeat_interleave`` on dim 3).
    Differentiable in ``volume`` (exact adjoint), except with ``window``.
    """
    if not isinstance(replicate_channels, int) or isinstance(replicate_channels, bool) or replicate_channels < 1:
        raise ValueError(f"replicate_channels must be a positive integer, got {replicate_channels!r}")
    win = None
    if window is not None:
        win = [float(x) for x in window]
        if len(win) != 2 or not win[0] < win[1]:
            raise ValueError(f"window must be (lo, hi) with lo < hi, got {tuple(window)}")
        if volume.requires_grad and torch.is_grad_enabled():
            raise ValueError("window= is an inference-only fusion and volume requires grad; use "
                             "torch.no_grad() or apply the window after slicing")
    return torch.ops.tonno_fast_triton.slice_volume(volume, maps, n_slices, height, width, fill, out_dtype, win,
                                                    replicate_channels)


def backproject_slices(stacks: torch.Tensor, maps: torch.Tensor, weights: torch.Tensor,
                       volume_shape: Sequence[int], laplacian_spacing: Optional[float] = None) -> torch.Tensor:
    """``(B, K, N, S, h, w)`` stacks → ``(B, K, D, H, W)`` volume, with the ``laplacian`` filter along the slice
    axis fused when ``laplacian_spacing`` (the slice spacing Δs, mm) is given; see :mod:`.backproject_slices`."""
    if laplacian_spacing is not None:
        s = float(laplacian_spacing)
        if not (s > 0 and math.isfinite(s)):
            raise ValueError(f"laplacian_spacing must be a positive, finite slice spacing in mm, "
                             f"got {laplacian_spacing!r}")
        laplacian_spacing = s
    return torch.ops.tonno_fast_triton.backproject_slices(stacks, maps, weights, list(volume_shape),
                                                          laplacian_spacing)
