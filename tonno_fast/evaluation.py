"""Measure heatmaps against ground-truth masks: Dice, IoU, thresholds with and without the ground truth.

A heatmap is turned into a mask by a threshold (voxels ``>= t`` are positive). Two kinds of threshold are
reported and must not be confused:

* the **best threshold** (:func:`threshold_sweep`): the one that maximises Dice against the ground truth.
  It needs the answer, so it is an upper bound on what the heatmap can give, not a usable operating point;
* **ground-truth-free thresholds**, chosen from the heatmap alone: :func:`otsu_threshold` and
  :func:`quantile_threshold` (e.g. the top 1% of voxels).

Every function can be restricted to a body mask (e.g. the brain): voxels outside it are ignored both when
choosing a threshold and when scoring, because a heatmap's values outside the body say nothing about the
lesion and would otherwise dominate quantiles and histograms. Arrays are ``(D, H, W)`` tensors or NumPy
arrays of the same shape; masks are boolean (or 0/1).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["dice", "iou", "threshold_sweep", "otsu_threshold", "quantile_threshold", "evaluate_heatmap",
           "evaluate_heatmaps", "roc_auc"]


def _np(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        x = x.numpy()
    try:
        return np.asarray(x)
    except Exception:
        raise TypeError(f"{name} must be a tensor or array, got {type(x).__name__}") from None


def _mask(x, name: str, shape=None) -> np.ndarray:
    m = _np(x, name)
    if m.dtype != bool:
        if not np.isin(np.unique(m), (0, 1)).all():
            raise ValueError(f"{name} must be a boolean (or 0/1) mask")
        m = m.astype(bool)
    if shape is not None and m.shape != tuple(shape):
        raise ValueError(f"{name} has shape {m.shape}, expected {tuple(shape)}")
    return m


def _values(heatmap, body_mask) -> np.ndarray:
    h = _np(heatmap, "heatmap").astype(np.float64)
    if not np.isfinite(h).all():
        raise ValueError("heatmap contains NaN or inf")
    if body_mask is None:
        return h.reshape(-1)
    b = _mask(body_mask, "body_mask", h.shape)
    if not b.any():
        raise ValueError("body_mask is empty")
    return h[b]


def dice(pred, target) -> float:
    """Dice ``2|P∩T| / (|P| + |T|)`` of two boolean masks of the same shape (1.0 when both are empty)."""
    p = _mask(pred, "pred")
    t = _mask(target, "target", p.shape)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, t).sum()) / denom


def iou(pred, target) -> float:
    """Intersection over union ``|P∩T| / |P∪T|`` of two boolean masks (1.0 when both are empty)."""
    p = _mask(pred, "pred")
    t = _mask(target, "target", p.shape)
    union = int(np.logical_or(p, t).sum())
    return 1.0 if union == 0 else int(np.logical_and(p, t).sum()) / union


def _scores_at(heatmap, target, threshold: float, body_mask) -> Dict[str, float]:
    h = _np(heatmap, "heatmap")
    pred = h >= threshold
    t = _mask(target, "mask", h.shape)
    if body_mask is not None:
        b = _mask(body_mask, "body_mask", h.shape)
        pred, t = pred & b, t & b
    return {"threshold": float(threshold), "dice": dice(pred, t), "iou": iou(pred, t),
            "fraction": float(pred.sum()) / float(pred.size if body_mask is None else b.sum())}


def threshold_sweep(heatmap, mask, *, body_mask=None) -> Dict[str, float]:
    """The best threshold: the cut of the heatmap that maximises Dice against ``mask`` (needs the answer).

    Exact over every distinct heatmap value (inside ``body_mask`` if given): sort the values in decreasing
    order; keeping the top ``k`` voxels gives ``Dice(k) = 2 TP(k) / (k + |T|)``, with ``TP(k)`` a cumulative
    sum. Returns ``{"threshold", "dice", "iou", "fraction"}`` (``fraction``: share of voxels kept).
    """
    h = _np(heatmap, "heatmap")
    t = _mask(mask, "mask", h.shape)
    vals = _values(h, body_mask)
    truth = t.reshape(-1) if body_mask is None else t[_mask(body_mask, "body_mask", h.shape)]
    n_true = int(truth.sum())
    if n_true == 0:
        raise ValueError("mask has no positive voxel (inside body_mask): Dice is undefined for a best threshold")
    order = np.argsort(-vals, kind="stable")
    v = vals[order]
    tp = np.cumsum(truth[order])
    # Only cut between different values: a threshold keeps all voxels tied at it.
    last = np.r_[v[1:] != v[:-1], True]
    k = np.arange(1, v.size + 1)
    d = np.where(last, 2.0 * tp / (k + n_true), -1.0)
    best = int(np.argmax(d))
    return _scores_at(h, t, float(v[best]), body_mask)


def otsu_threshold(heatmap, *, body_mask=None, bins: int = 256) -> float:
    """Otsu's threshold of the heatmap's values (inside ``body_mask``): maximises the between-class variance
    of a ``bins``-bin histogram. Chosen without the ground truth."""
    vals = _values(heatmap, body_mask)
    lo, hi = float(vals.min()), float(vals.max())
    if hi <= lo:
        return hi
    counts, edges = np.histogram(vals, bins=int(bins), range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(counts)[:-1].astype(np.float64)
    w1 = counts.sum() - w0
    m0 = np.cumsum(counts * centres)[:-1]
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (float((counts * centres).sum()) - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[1:-1][int(np.argmax(between))])


def quantile_threshold(heatmap, q: float = 0.99, *, body_mask=None) -> float:
    """The ``q``-quantile of the heatmap's values (inside ``body_mask``): keeps the top ``1 - q`` of the voxels.
    Chosen without the ground truth (it encodes a prior on the lesion load)."""
    if not (0.0 < float(q) < 1.0):
        raise ValueError(f"q must be in (0, 1), got {q!r}")
    return float(np.quantile(_values(heatmap, body_mask), float(q)))


def evaluate_heatmap(heatmap, mask, *, body_mask=None, quantiles: Sequence[float] = (0.99,),
                     otsu: bool = True) -> Dict[str, Dict[str, float]]:
    """Dice and IoU of one heatmap at the best threshold and at ground-truth-free thresholds.

    Returns ``{"best": {...}, "otsu": {...}, "q0.99": {...}}``, each ``{"threshold", "dice", "iou",
    "fraction"}``; ``"best"`` is the oracle threshold of :func:`threshold_sweep`.
    """
    out = {"best": threshold_sweep(heatmap, mask, body_mask=body_mask)}
    if otsu:
        out["otsu"] = _scores_at(heatmap, mask, otsu_threshold(heatmap, body_mask=body_mask), body_mask)
    for q in quantiles:
        out[f"q{q:g}"] = _scores_at(heatmap, mask, quantile_threshold(heatmap, q, body_mask=body_mask), body_mask)
    return out


def evaluate_heatmaps(heatmaps: Sequence, masks: Sequence, *, body_masks: Optional[Sequence] = None,
                      quantiles: Sequence[float] = (0.99,), otsu: bool = True) -> Dict[str, object]:
    """:func:`evaluate_heatmap` per volume and averaged.

    Returns ``{"per_volume": [result, ...], "mean": {rule: {"dice", "iou"}}, "std": {rule: {...}}}`` where
    ``rule`` is ``"best"``, ``"otsu"`` or ``"q<q>"``.
    """
    if len(heatmaps) != len(masks):
        raise ValueError(f"heatmaps and masks must pair up: got {len(heatmaps)} and {len(masks)}")
    if body_masks is not None and len(body_masks) != len(masks):
        raise ValueError(f"body_masks must have one mask per heatmap: got {len(body_masks)} for {len(masks)}")
    if not heatmaps:
        raise ValueError("heatmaps must not be empty")
    per: List[Dict[str, Dict[str, float]]] = []
    for i, (h, m) in enumerate(zip(heatmaps, masks)):
        per.append(evaluate_heatmap(h, m, body_mask=None if body_masks is None else body_masks[i],
                                    quantiles=quantiles, otsu=otsu))
    mean, std = {}, {}
    for rule in per[0]:
        mean[rule] = {k: float(np.mean([r[rule][k] for r in per])) for k in ("dice", "iou")}
        std[rule] = {k: float(np.std([r[rule][k] for r in per])) for k in ("dice", "iou")}
    return {"per_volume": per, "mean": mean, "std": std}


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U statistic, ties counted
    half): the probability that a random positive scores above a random negative. ``scores`` and ``labels``
    are 1-D arrays or tensors of the same length (labels bool or 0/1); both classes must occur."""
    s = _np(scores, "scores").astype(np.float64).reshape(-1)
    y = _np(labels, "labels").reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same length, got {s.size} and {y.size}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs both positive and negative labels")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
