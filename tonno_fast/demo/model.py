"""The demo's 2D encoder: a small CNN that scores one slice (one logit: "this slice's volume has a lesion").

Four 3×3 conv blocks (conv → BatchNorm → ReLU, max-pooling after the first two), a 1×1 conv that makes a
score map at 1/4 of the input resolution, and log-sum-exp pooling of that map,
``(1/r) log mean exp(r · map)`` with ``r = 10``: close to the maximum when one region lights up, close to the
mean when nothing does, and still growing with the area that lights up (ToNNO wants a score that grows with
what the plane cuts through). The CAM layer is ``features.3`` (16×16 for 64×64 slices).

Why not global average pooling: a lesion covers ~1–3% of a slice, so its features are diluted by the
anatomy around it. Measured on the demo's data (3 mm, lesion radius 12–18 mm, 100 steps of 64 slices):
average pooling stayed at a held-out AUC of 0.27–0.85 for lesion-crossing slices against lesion-free ones,
swinging between steps, while log-sum-exp pooling reached 0.98–1.00 and stayed there. On the harder demo
(bag objective, 12 mm bags, 200 steps, seeds 0–2) neither a top-k mean of the map, global averaging, nor z-scoring
each input slice reached a higher lesion-crossing AUC than the default in any seed (docs/training.md); they stay available as options.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["SliceCNN", "make_encoder", "TARGET_LAYER"]

TARGET_LAYER = "features.3"


NORMS = ("batch", "group", "instance", "none")
POOLINGS = ("lse", "topk", "mean")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":  # per slice, over groups of 4 channels
        return nn.GroupNorm(max(1, channels // 4), channels)
    if kind == "instance":  # per slice and channel, with a learnt scale and shift
        return nn.GroupNorm(channels, channels)
    return nn.Identity()


def _block(c_in: int, c_out: int, pool: bool, norm: str = "batch") -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"), _norm(norm, c_out), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SliceCNN(nn.Module):
    """``(M, in_channels, h, w)`` slices → ``(M, 1)`` logits.

    Args:
        in_channels: slice channels.
        widths: channels of the four conv blocks.
        sharpness: ``r`` of the log-sum-exp pooling (``r → ∞``: max pooling; ``r → 0``: average pooling).
        norm: normalisation layers: ``"batch"``, ``"group"``, ``"instance"`` or ``"none"``.
        pooling: how the score map (``(M, h/4 · w/4)`` per-position logits) becomes one logit per slice:
            ``"lse"`` = ``(1/r) log mean exp(r · map)``, ``"topk"`` = mean of the ``top_k`` largest positions,
            ``"mean"`` = global average.
        top_k: positions averaged by ``pooling="topk"``.
        standardize: z-score each slice (its own mean and standard deviation over all pixels) before the first
            conv, so the net sees intensities relative to the rest of the slice.
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (8, 16, 32, 64), sharpness: float = 10.0,
                 norm: str = "batch", pooling: str = "lse", top_k: int = 4, standardize: bool = False):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"widths must give the channels of 4 blocks, got {tuple(widths)}")
        if not sharpness > 0:
            raise ValueError(f"sharpness must be positive, got {sharpness!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k!r}")
        self.pooling, self.top_k, self.standardize = pooling, int(top_k), bool(standardize)
        self._config = {"in_channels": int(in_channels), "widths": [int(c) for c in widths],
                        "sharpness": float(sharpness), "norm": norm, "pooling": pooling, "top_k": int(top_k),
                        "standardize": bool(standardize)}
        w = [int(in_channels)] + [int(c) for c in widths]
        self.norm = norm
        self.features = nn.Sequential(*[_block(w[i], w[i + 1], pool=i < 2, norm=norm) for i in range(4)])
        self.score = nn.Conv2d(w[-1], 1, 1)
        self.sharpness = float(sharpness)

    def factory_kwargs(self) -> dict:
        """The constructor's arguments (plain values): what :func:`tonno_fast.save_encoder` stores to rebuild it."""
        return dict(self._config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            mu = x.mean(dim=(1, 2, 3), keepdim=True)
            sd = x.std(dim=(1, 2, 3), keepdim=True)
            x = (x - mu) / (sd + 1e-6)
        m = self.score(self.features(x)).flatten(1)  # (M, h/4 · w/4) per-position logits
        return pool_map(m, self.pooling, self.sharpness, self.top_k)[:, None]


def pool_map(m: torch.Tensor, pooling: str, sharpness: float, top_k: int) -> torch.Tensor:
    """``(M, P)`` per-position logits → ``(M,)`` slice logits (see ``SliceCNN``'s ``pooling``)."""
    if pooling == "lse":
        return (torch.logsumexp(sharpness * m, dim=1) - math.log(m.shape[1])) / sharpness
    if pooling == "topk":
        return m.topk(min(top_k, m.shape[1]), dim=1).values.mean(dim=1)
    return m.mean(dim=1)


def make_encoder() -> SliceCNN:
    """Factory for ``tonno-fast heatmap --encoder tonno_fast.demo.model:make_encoder --weights encoder.pt``."""
    return SliceCNN()
