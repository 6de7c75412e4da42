"""A small training helper for the weak-supervision step: binary cross-entropy on random slices.

Not a framework: one function that runs an optimiser on batches from an
:class:`~tonno_fast.sampler.ObliqueSliceSampler` and one that measures slice-level accuracy and AUC. Every
slice carries its volume's label, so the loss is BCE between the encoder's logit for the slice and that
label (docs/design.md, "The method"). Bring any ``torch.optim`` optimiser (default: Adam).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .sampler import ObliqueSliceSampler

__all__ = ["train_encoder", "evaluate_encoder", "roc_auc"]


def _logits(encoder: Callable, x: torch.Tensor) -> torch.Tensor:
    out = encoder(x)
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.ndim != 1 or out.shape[0] != x.shape[0]:
        raise ValueError(f"encoder must return one logit per slice, (M,) or (M, 1), for binary training; "
                         f"got {tuple(out.shape)} for M = {x.shape[0]}")
    return out


def train_encoder(encoder: torch.nn.Module, sampler: ObliqueSliceSampler, *, steps: Optional[int] = None,
                  seconds: Optional[float] = None, batch_size: int = 64,
                  optimizer: Optional[torch.optim.Optimizer] = None, lr: float = 1e-3,
                  scheduler=None, pos_weight: Optional[float] = None,
                  transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                  progress: bool = False, log_every: int = 25) -> List[Dict[str, float]]:
    """Train ``encoder`` with BCE on random slices labelled by their volume (weak supervision).

    Args:
        encoder: ``nn.Module`` mapping ``(M, C, h, w)`` slices to ``(M,)`` or ``(M, 1)`` logits.
        sampler: where batches come from (labels 0/1).
        steps: number of optimiser steps; ``seconds``: or a wall-clock budget (whichever ends first; at
            least one of them is required).
        batch_size: slices per step.
        optimizer: any ``torch.optim`` optimiser over the encoder's parameters (default ``Adam(lr)``).
        scheduler: optional learning-rate scheduler, stepped after every optimiser step.
        pos_weight: BCE weight of positive slices (e.g. to counter unbalanced labels).
        transform: optional augmentation applied to each batch of slices (a tensor → tensor function).
        progress: show a tqdm progress bar.
        log_every: record the running mean loss every this many steps.

    Returns:
        History: a list of ``{"step", "loss", "seconds"}`` (running mean of the last ``log_every`` losses).
    """
    if steps is None and seconds is None:
        raise ValueError("give steps (optimiser steps) or seconds (a time budget), or both")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if optimizer is None:
        optimizer = torch.optim.Adam(encoder.parameters(), lr=lr)
    pw = None if pos_weight is None else torch.tensor(float(pos_weight), device=sampler.device)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="training encoder", unit="step")
    encoder.train()
    history: List[Dict[str, float]] = []
    recent: List[float] = []
    t0 = time.perf_counter()
    step = 0
    try:
        while (steps is None or step < steps) and (seconds is None or time.perf_counter() - t0 < seconds):
            batch = sampler.sample(batch_size)
            x = batch.slices if transform is None else transform(batch.slices)
            y = batch.labels.reshape(-1).to(x.device)
            logits = _logits(encoder, x).float()
            loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pw)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            recent.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(recent[-log_every:]):.3f}")
            if step % log_every == 0:
                history.append({"step": step, "loss": float(np.mean(recent[-log_every:])),
                                "seconds": time.perf_counter() - t0})
    finally:
        if bar is not None:
            bar.close()
    encoder.eval()
    return history


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U, ties counted half)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
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


@torch.no_grad()
def evaluate_encoder(encoder: Callable, sampler: ObliqueSliceSampler, *, n_slices: int = 2048,
                     batch_size: int = 256, threshold: float = 0.0) -> Dict[str, float]:
    """Slice-level accuracy (logit ``> threshold``) and AUC on ``n_slices`` random slices of ``sampler``
    (use a sampler over held-out volumes). With ``aux`` lesion masks in the sampler it also reports
    ``lesion_fraction``: the share of positive-volume slices that actually cross a lesion, and the AUC of
    lesion-crossing slices against negative-volume slices."""
    if hasattr(encoder, "eval"):
        encoder.eval()
    scores, labels, crosses = [], [], []
    done = 0
    while done < n_slices:
        b = sampler.sample(min(batch_size, n_slices - done))
        scores.append(_logits(encoder, b.slices).float().cpu())
        labels.append(b.labels.reshape(-1).cpu())
        if b.aux is not None:
            crosses.append((b.aux.float().flatten(1).amax(1) > 0.5).cpu())
        done += b.slices.shape[0]
    s = torch.cat(scores).numpy()
    y = torch.cat(labels).numpy() > 0.5
    out = {"n_slices": int(s.size), "accuracy": float(((s > threshold) == y).mean()), "auc": roc_auc(s, y)}
    if crosses:
        c = torch.cat(crosses).numpy()
        out["lesion_fraction"] = float(c[y].mean()) if y.any() else float("nan")
        keep = c | ~y  # lesion-crossing positives vs all negatives
        out["auc_lesion_slices"] = roc_auc(s[keep], y[keep]) if (c & y).any() else float("nan")
    return out
