"""PNG overlays of heatmaps on their volume: three orthogonal views, image in grey, heatmap yellow → red (high).

Uses matplotlib's non-interactive Agg backend (no display needed). Arrays are ``(D, H, W)`` (z, y, x) with
spacing ``(sz, sy, sx)`` mm; views are shown with the physical aspect ratio, superior/anterior up.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["overlay_png", "normalise_for_display"]


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def normalise_for_display(heatmap: np.ndarray, body_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Map a heatmap to [0, 1] for display: 0 at its median and 1 at its 99.9th percentile inside
    ``body_mask`` (below the median is transparent; a few extreme voxels do not wash out the rest), so one
    colour scale fits every method."""
    h = _np(heatmap).astype(np.float64)
    vals = h[body_mask] if body_mask is not None and body_mask.any() else h.reshape(-1)
    lo, hi = float(np.median(vals)), float(np.percentile(vals, 99.9))
    out = np.clip((h - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(h)
    if body_mask is not None:
        out = out * body_mask
    return out


def _views(a: np.ndarray, centre: Sequence[int]):
    d, h, w = centre
    # axial (rows y, cols x), coronal (rows z, cols x), sagittal (rows z, cols y)
    return a[d], a[:, h], a[:, :, w]


def overlay_png(path: Union[str, Path], image, heatmaps: Union[Mapping[str, object], object], *,
                spacing: Sequence[float] = (1.0, 1.0, 1.0), centre: Optional[Sequence[int]] = None,
                mask=None, body_mask=None, title: Optional[str] = None, dpi: int = 100) -> Path:
    """Write a PNG: one row per heatmap, three columns (axial, coronal, sagittal) through ``centre``.

    Args:
        path: output ``.png``.
        image: ``(D, H, W)`` volume shown in grey.
        heatmaps: one ``(D, H, W)`` heatmap or ``{name: heatmap}`` (one row each, in order).
        spacing: ``(sz, sy, sx)`` mm, for the aspect ratio.
        centre: ``(d, h, w)`` voxel the three planes pass through (default: the centre of ``mask``, else
            the heatmap's maximum in the first row).
        mask: optional ground-truth mask drawn as a green contour.
        body_mask: optional mask: heatmaps are normalised (and shown) inside it only.
        title: figure title.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    img = _np(image).astype(np.float32)
    if img.ndim != 3:
        raise ValueError(f"image must be (D, H, W), got shape {img.shape}")
    maps: Dict[str, np.ndarray] = ({str(k): _np(v) for k, v in heatmaps.items()} if isinstance(heatmaps, Mapping)
                                   else {"heatmap": _np(heatmaps)})
    for k, v in maps.items():
        if v.shape != img.shape:
            raise ValueError(f"heatmap {k!r} has shape {v.shape}, image has {img.shape}")
    m = None if mask is None else _np(mask).astype(bool)
    body = None if body_mask is None else _np(body_mask).astype(bool)
    if centre is None:
        if m is not None and m.any():
            centre = tuple(int(round(c)) for c in np.argwhere(m).mean(0))
        else:
            first = next(iter(maps.values()))
            centre = np.unravel_index(int(np.argmax(first)), first.shape)
    centre = tuple(int(c) for c in centre)
    sz, sy, sx = (float(s) for s in spacing)
    aspects = (sy / sx, sz / sx, sz / sy)
    lo, hi = np.percentile(img, [1, 99.5])
    hi = lo + 1.5 * (hi - lo)  # a dimmer grey, so yellow (mid) heatmap values stay visible on bright tissue
    fig, axes = plt.subplots(len(maps), 3, figsize=(9, 3 * len(maps)), squeeze=False)
    for r, (name, heat) in enumerate(maps.items()):
        norm = normalise_for_display(heat, body)
        for c, (im, hv, mv, asp) in enumerate(zip(_views(img, centre), _views(norm, centre),
                                                   _views(m, centre) if m is not None else (None,) * 3, aspects)):
            ax = axes[r, c]
            ax.imshow(im, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=asp, interpolation="nearest")
            rgba = plt.get_cmap("autumn_r")(hv)  # yellow → red: visible on grey and white, high = red
            rgba[..., 3] = np.clip(1.5 * hv, 0, 0.85)  # transparent where the heatmap is low
            ax.imshow(rgba, origin="lower", aspect=asp, interpolation="nearest")
            if mv is not None and mv.any():
                ax.contour(mv.astype(float), levels=[0.5], colors="lime", linewidths=0.8, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
            if r == 0:
                ax.set_title(("axial", "coronal", "sagittal")[c])
    if title:
        fig.suptitle(title)
        # Leave room at the top for the title above the column headings.
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3 * len(maps))))
    else:
        fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    return p
