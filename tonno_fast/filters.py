"""Reconstruction filters along the offset axis ``s`` of a sinogram (docs/design.md, "Reconstruction").

Every filter is a linear, symmetric operator applied to the last axis of a tensor ``(..., S)`` whose
samples are ``Δs`` mm apart. Rows are extended by *edge replication* before filtering, so a constant row
gives exactly zero for ``ramp2``, ``laplacian`` and ``ramp``: encoder scores are not zero outside the body,
and zero padding would print a ring at the edge of the heatmap.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["FILTERS", "WINDOWS", "apply_filter", "filter_matrix", "frequency_response", "reconstruction_scale"]

FILTERS = ("ramp2", "laplacian", "ramp", "none")
WINDOWS = ("shepp-logan", "cosine", "hamming", "hann")


def check_filter(filter: str, window: Optional[str]) -> None:
    if not isinstance(filter, str) or filter not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, got {filter!r}")
    if window is not None:
        if not isinstance(window, str) or window not in WINDOWS:
            raise ValueError(f"window must be None or one of {WINDOWS}, got {window!r}")
        if filter not in ("ramp2", "ramp"):
            raise ValueError(f"window={window!r} applies to the FFT filters 'ramp2' and 'ramp', "
                             f"not to filter={filter!r}")


def _padded_length(n: int) -> int:
    """FFT length: a power of two at least 2n (rows are padded to at least twice their length, so the circular
    convolution does not wrap around onto the data)."""
    return 1 << max(1, math.ceil(math.log2(2 * n)))


def frequency_response(filter: str, window: Optional[str], length: int, slice_spacing: float,
                       dtype=torch.float64, device=None) -> torch.Tensor:
    """Real frequency response on ``torch.fft.rfftfreq(length)`` bins, ω in rad/mm.

    ``ramp2``: ω², ``ramp``: |ω|, both band-limited at Nyquist ``Ω = π/Δs``, times the optional window
    evaluated at ``ω/Ω``.
    """
    f = torch.fft.rfftfreq(length, d=slice_spacing, dtype=torch.float64, device=device)
    omega = 2 * math.pi * f
    if filter == "ramp2":
        H = omega ** 2
    elif filter == "ramp":
        H = omega.abs()
    else:
        raise ValueError(f"no FFT response for filter {filter!r}")
    x = omega / (math.pi / slice_spacing)  # 0..1 at Nyquist
    if window == "shepp-logan":
        H = H * torch.sinc(x / 2)
    elif window == "cosine":
        H = H * torch.cos(math.pi * x / 2)
    elif window == "hamming":
        H = H * (0.54 + 0.46 * torch.cos(math.pi * x))
    elif window == "hann":
        H = H * (0.5 + 0.5 * torch.cos(math.pi * x))
    return H.to(dtype)


def apply_filter(sinogram: torch.Tensor, filter: str = "ramp2", window: Optional[str] = None, *,
                 slice_spacing: float = 1.0) -> torch.Tensor:
    """Filter the last axis of ``sinogram`` ``(..., S)`` (samples ``slice_spacing`` mm apart).

    Returns a tensor of the same shape and dtype. ``none`` returns the input unchanged.
    ``laplacian`` is ``-(g[k-1] - 2 g[k] + g[k+1]) / Δs²`` with edge replication.
    FFT filters replicate the edges to a power-of-two length ≥ 2S, the row centred so that the wrap-around
    seam lies as far as possible from the data. Differentiable (plain torch ops).
    """
    check_filter(filter, window)
    if filter == "none":
        return sinogram
    S = sinogram.shape[-1]
    if filter == "laplacian":
        left = torch.cat([sinogram[..., :1], sinogram[..., :-1]], dim=-1)
        right = torch.cat([sinogram[..., 1:], sinogram[..., -1:]], dim=-1)
        return (2 * sinogram - left - right) / (slice_spacing ** 2)
    L = _padded_length(S)
    pad_left = (L - S) // 2
    pad_right = L - S - pad_left
    flat = sinogram.reshape(-1, 1, S)
    work_dtype = torch.float64 if sinogram.dtype == torch.float64 else torch.float32
    ext = torch.nn.functional.pad(flat.to(work_dtype), (pad_left, pad_right), mode="replicate")
    H = frequency_response(filter, window, L, slice_spacing, dtype=work_dtype, device=sinogram.device)
    out = torch.fft.irfft(torch.fft.rfft(ext, dim=-1) * H, n=L, dim=-1)
    return out[..., pad_left:pad_left + S].reshape(sinogram.shape).to(sinogram.dtype)


def filter_matrix(filter: str, window: Optional[str], n_slices: int, slice_spacing: float, dtype=torch.float64,
                  device=None) -> torch.Tensor:
    """The reconstruction filter as an ``(S, S)`` matrix ``F`` with ``F @ g == apply_filter(g)`` along ``S``.

    ``apply_filter`` is linear (edge replication, zero-padded FFT, crop), so its matrix is exactly the
    filter applied to the unit impulses; it is built in float64 and cast. For CAM stacks ``(…, S, h·w)``
    one matmul replaces moving ``S`` last, padding every pixel's row to ≥ 2S and two FFTs: measured 6× faster
    for 64 stacks of 111 × 64² on the CPU, and it needs no work memory beyond its output.
    """
    rows = apply_filter(torch.eye(n_slices, dtype=torch.float64), filter, window, slice_spacing=slice_spacing)
    return rows.T.contiguous().to(dtype=dtype, device=device)  # rows[j] = response to the impulse at j


def reconstruction_scale(filter: str, weights: torch.Tensor) -> torch.Tensor:
    """Per-direction factor applied at backprojection: ``w_k / (4π²)`` for filtered reconstructions (the 3D
    inversion formula), ``w_k / Σ w`` for ``none`` (plain averaging of backprojections)."""
    if filter == "none":
        return weights / weights.sum()
    return weights / (4 * math.pi ** 2)
