"""ToNNO end to end: slice a volume, score every slice with a 2D encoder, invert the Radon transform.

Slices are made chunk by chunk (a few directions at a time) and freed as soon as the encoder has scored
them, so peak memory is set by ``batch_size``, not by the number of directions times slices (§5).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch

from .geometry import Geometry, make_geometry
from .ops import filtered_backprojection, slice_volume
from .validation import as_volume5d

__all__ = ["tomographic_heatmap", "encode_slices", "direction_chunks", "call_encoder"]


def direction_chunks(geometry: Geometry, slices_per_chunk: int) -> Iterator[Tuple[int, int]]:
    """``(start, stop)`` ranges of directions holding about ``slices_per_chunk`` slices each (≥ 1 direction)."""
    step = max(1, int(slices_per_chunk) // max(1, geometry.n_slices))
    for n0 in range(0, geometry.n_directions, step):
        yield n0, min(geometry.n_directions, n0 + step)


def call_encoder(encoder: Callable, batch: torch.Tensor) -> torch.Tensor:
    """Run ``encoder`` on ``(M, C, h, w)`` slices and check its answer: ``(M, K)`` floating scores."""
    try:
        out = encoder(batch)
    except Exception as exc:
        raise RuntimeError(f"encoder raised {type(exc).__name__} on a batch of slices of shape "
                           f"{tuple(batch.shape)}: {exc}") from exc
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"encoder must return a torch.Tensor of scores, got {type(out).__name__}")
    M = batch.shape[0]
    if out.ndim == 1 and out.shape[0] == M:
        out = out[:, None]
    if out.ndim != 2 or out.shape[0] != M:
        raise ValueError(f"encoder must return scores of shape (M,) or (M, K) for M = {M} slices, "
                         f"got {tuple(out.shape)}")
    if not (out.is_floating_point()):
        raise TypeError(f"encoder must return floating-point scores, got dtype {out.dtype}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError("encoder returned NaN or inf scores")
    return out


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="slice")


def encode_slices(volume: torch.Tensor, geometry: Geometry, encoder: Callable, *, batch_size: int = 256,
                  backend: str = "auto", fill: float = 0.0, progress: bool = False) -> torch.Tensor:
    """Score every slice of ``geometry``: volume ``(B, C, D, H, W)`` → sinogram ``(B, K, N, S)``.

    The encoder sees ``(M, C, h, w)`` slices (``M ≤ batch_size``) in the volume's dtype and is called under
    ``torch.no_grad()``; scores come back in the volume's dtype on its device.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    B = volume.shape[0]
    S = geometry.n_slices
    bar = _progress(B * geometry.n_directions * S, progress, "encoding slices")
    chunks = []
    try:
        with torch.no_grad():
            for n0, n1 in direction_chunks(geometry, max(1, batch_size // B)):
                sub = geometry.with_directions(slice(n0, n1))
                slices = slice_volume(volume, sub, fill=fill, backend=backend)  # (B,n,S,C,h,w)
                flat = slices.reshape(-1, *slices.shape[3:])
                scores = []
                for m0 in range(0, flat.shape[0], batch_size):
                    part = call_encoder(encoder, flat[m0:m0 + batch_size])
                    scores.append(part.to(device=volume.device, dtype=volume.dtype))
                    if bar is not None:
                        bar.update(part.shape[0])
                del slices, flat
                s = torch.cat(scores)
                if chunks and s.shape[1] != chunks[0].shape[-1]:
                    raise ValueError(f"encoder returned {s.shape[1]} scores per slice, earlier {chunks[0].shape[-1]}")
                chunks.append(s.reshape(B, n1 - n0, S, -1))
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(chunks, dim=1).permute(0, 3, 1, 2).contiguous()  # (B,K,N,S)


def tomographic_heatmap(volume, encoder: Callable, *, n_directions: int = 64, directions=None, weights=None,
                        spacing=None, slice_size=None, slice_spacing=None, pixel_spacing=None,
                        n_slices: Optional[int] = None, filter: str = "ramp2", window: Optional[str] = None,
                        batch_size: int = 256, backend: str = "auto", progress: bool = False,
                        fill: float = 0.0, allow_nonfinite: bool = False) -> torch.Tensor:
    """ToNNO heatmap of ``volume`` for a 2D ``encoder`` (DESIGN.md §1, §3).

    Args:
        volume: ``(D, H, W)``, ``(C, D, H, W)`` or ``(B, C, D, H, W)`` tensor (axes z, y, x), any real dtype
            (int16 CT is converted to float32).
        encoder: callable ``(M, C, h, w)`` slices → ``(M,)`` or ``(M, K)`` scores (an ``nn.Module``, a function,
            a TorchScript module). Called under ``torch.no_grad()`` in chunks of at most ``batch_size`` slices.
        n_directions: number of Fibonacci directions on the hemisphere (ignored when ``directions`` given).
        directions: ``(N, 3)`` unit vectors (x, y, z), ``(N, 2)`` angles (θ, φ) or ``(N, 3, 3)`` rotations.
        weights: ``(N,)`` quadrature weights (default ``2π/N``).
        spacing: voxel spacing ``(sz, sy, sx)`` mm (default 1 mm).
        slice_size: ``int`` or ``(h, w)`` pixels of each slice (default: covers the bounding sphere).
        slice_spacing: Δs mm between slices (default ``min(spacing)``).
        pixel_spacing: δ mm between pixels (default ``min(spacing)``, or follows ``slice_size``).
        n_slices: slices per direction (default: covers the bounding sphere).
        filter: ``"ramp2"`` (exact 3D inverse), ``"laplacian"``, ``"ramp"`` or ``"none"``.
        window: ``None``, ``"shepp-logan"``, ``"cosine"``, ``"hamming"`` or ``"hann"`` (FFT filters).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        progress: show a progress bar over the slices.
        fill: value read outside the volume.
        allow_nonfinite: accept NaN/inf voxels instead of raising.

    Returns:
        Heatmap on the volume's device, float32 (float64 for a float64 volume): ``(D, H, W)`` for a 3D volume
        and a single-score encoder, else ``(B, K, D, H, W)``.
    """
    from .filters import check_filter
    check_filter(filter, window)
    vol, ndim = as_volume5d(volume, "volume", allow_nonfinite=allow_nonfinite)
    if not callable(encoder):
        raise TypeError(f"encoder must be callable (an nn.Module or a function), got {type(encoder).__name__}")
    geometry = make_geometry(vol.shape[2:], spacing=spacing, n_directions=n_directions, directions=directions,
                             weights=weights, slice_size=slice_size, pixel_spacing=pixel_spacing,
                             slice_spacing=slice_spacing, n_slices=n_slices)
    scores = encode_slices(vol, geometry, encoder, batch_size=batch_size, backend=backend, fill=fill,
                           progress=progress)
    heat = filtered_backprojection(scores, geometry, filter=filter, window=window, backend=backend)
    if ndim == 3 and heat.shape[1] == 1:
        return heat[0, 0]
    return heat
