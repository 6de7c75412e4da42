"""Shared test fixtures. TRITON_INTERPRET must be set before triton is imported anywhere: there is no GPU in CI,
so Triton kernels run on the CPU through the interpreter."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def gaussian_blobs(shape, spacing=(1.0, 1.0, 1.0), blobs=None, dtype=torch.float64):
    """Sum of Gaussian blobs ``A exp(-|x - c|²/(2σ²))`` sampled at voxel centres; centres (x, y, z) in mm."""
    if blobs is None:
        blobs = PHANTOM_BLOBS
    D, H, W = shape
    sz, sy, sx = spacing
    z = (torch.arange(D, dtype=dtype) - (D - 1) / 2) * sz
    y = (torch.arange(H, dtype=dtype) - (H - 1) / 2) * sy
    x = (torch.arange(W, dtype=dtype) - (W - 1) / 2) * sx
    zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
    v = torch.zeros(shape, dtype=dtype)
    for (cx, cy, cz), sigma, amp in blobs:
        v += amp * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2) / (2 * sigma ** 2))
    return v


# The master-identity phantom: three blobs of σ 3.0–5.5 mm within 12 mm of the centre (docs/design.md,
# "Correctness").
PHANTOM_BLOBS = [((6.0, -6.0, 4.0), 4.5, 1.0), ((-8.0, 5.0, -3.0), 5.5, 0.8), ((2.0, 5.0, -4.0), 3.0, 1.2)]


@pytest.fixture
def phantom48():
    return gaussian_blobs((48, 48, 48))
