"""Slicing geometry: directions, in-plane frames, offsets, slice sizes and index-space maps.

This is the only module that knows about frames and millimetres (docs/design.md, "Geometry"). Every backend
receives the geometry already reduced to *index-space affine maps*, so kernels never recompute a frame:

* ``slice_maps`` ``(N, 3, 4)``: continuous volume index ``(d, h, w) = M[n] @ (k, i, j, 1)`` of pixel
  ``(i, j)`` of slice ``k`` of direction ``n`` (used by ``slice_volume`` and ``radon``).
* ``volume_maps`` ``(N, 3, 4)``: the inverse, ``(k, i, j) = V[n] @ (d, h, w, 1)``: where voxel ``(d, h, w)``
  falls in the stack of direction ``n`` (used by ``backproject_slices``; its row 0, the continuous slice
  index ``k``, is what ``backproject`` needs).

Conventions (all lengths in mm):

* Volumes are ``(B, C, D, H, W)``; axes D, H, W are physical z, y, x with spacing ``(sz, sy, sx)``.
  Voxel ``(d, h, w)`` sits at ``x = (w - (W-1)/2) sx``, ``y = (h - (H-1)/2) sy``, ``z = (d - (D-1)/2) sz``.
* Vectors (directions, frame axes) are given in physical ``(x, y, z)`` order.
* ``frames[n]`` is a 3x3 matrix whose *rows* are ``u, v, n`` (in-plane column axis, in-plane row axis,
  normal). Pixel ``(i, j)`` of the slice at offset ``s`` sits at
  ``p = s n + (j - (w-1)/2) δ u + (i - (h-1)/2) δ v``; offsets are ``s_k = (k - (S-1)/2) Δs``.
* Default frame of a direction: the smallest rotation taking ``e_z`` to ``n`` applied to ``e_x``, ``e_y``,
  so ``n = e_z`` gives exactly the axial image ``volume[d]`` (rows along y, columns along x).
* Directions with ``n_z < 0`` are replaced by ``-n``: the same planes, offsets reversed. The default
  quadrature weight is ``2π / N`` per direction (weights sum to the hemisphere's area).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .validation import positive_int

__all__ = [
    "Geometry",
    "fibonacci_directions",
    "frames_from_directions",
    "parse_directions",
    "make_geometry",
    "normalize_spacing",
    "bounding_radius",
]

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]

_GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))


def normalize_spacing(spacing, name: str = "spacing") -> Tuple[float, float, float]:
    """Return voxel spacing as a tuple ``(sz, sy, sx)`` of positive finite floats (mm).

    ``None`` means 1 mm isotropic; a single number means isotropic spacing.
    """
    if spacing is None:
        return (1.0, 1.0, 1.0)
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.detach().cpu().tolist()
    if isinstance(spacing, (str, bytes)):
        raise TypeError(f"{name} must be a number or a sequence of 3 numbers (sz, sy, sx) in mm, got {spacing!r}")
    if isinstance(spacing, (int, float, np.floating, np.integer)):
        spacing = (float(spacing),) * 3
    try:
        vals = tuple(float(s) for s in spacing)
    except TypeError:
        raise TypeError(f"{name} must be a number or a sequence of 3 numbers (sz, sy, sx) in mm, "
                        f"got {type(spacing).__name__}") from None
    if len(vals) != 3:
        raise ValueError(f"{name} must have 3 entries (sz, sy, sx) in mm, got {len(vals)}: {vals}")
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise ValueError(f"{name} must be positive and finite (mm), got {vals}")
    return vals


def fibonacci_directions(n: int, dtype=torch.float64) -> torch.Tensor:
    """``n`` near-uniform unit vectors on the upper hemisphere (Fibonacci lattice), ``(n, 3)`` in (x, y, z).

    ``z_k = 1 - (k + 1/2)/n`` (equal-area bands) and azimuth ``k`` times the golden angle.
    """
    positive_int(n, "n_directions")
    k = torch.arange(n, dtype=torch.float64)
    z = 1.0 - (k + 0.5) / n
    r = torch.sqrt(torch.clamp(1.0 - z * z, min=0.0))
    phi = k * _GOLDEN_ANGLE
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=1).to(dtype)


def frames_from_directions(directions: torch.Tensor) -> torch.Tensor:
    """Frames ``(N, 3, 3)`` (rows ``u, v, n``) of unit directions ``(N, 3)`` with ``n_z >= 0``.

    ``u, v`` are ``e_x, e_y`` turned by the smallest rotation that takes ``e_z`` to ``n`` (Rodrigues):
    ``u = (1 - a²/(1+c), -ab/(1+c), -a)``, ``v = (-ab/(1+c), 1 - b²/(1+c), -b)`` for ``n = (a, b, c)``.
    """
    a, b, c = directions.unbind(-1)
    q = 1.0 / (1.0 + c)
    u = torch.stack([1.0 - a * a * q, -a * b * q, -a], dim=-1)
    v = torch.stack([-a * b * q, 1.0 - b * b * q, -b], dim=-1)
    return torch.stack([u, v, directions], dim=-2)


def _as_float64(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}") from None
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got NaN or inf")
    return t


def parse_directions(directions: ArrayLike) -> torch.Tensor:
    """Turn user directions into frames ``(N, 3, 3)`` float64 (rows ``u, v, n``).

    Accepted forms:

    * ``(N, 3)`` vectors (x, y, z); normalised; zero vectors are an error;
    * ``(N, 2)`` spherical angles ``(θ polar from +z, φ azimuth from +x)`` in radians;
    * ``(N, 3, 3)`` rotation matrices whose *columns* are ``u, v, n`` (they map slice coordinates
      ``(x_in, y_in, s)`` to physical ``(x, y, z)``); kept as given (orthonormal, det +1 required).

    Directions (or matrices) with ``n_z < 0`` are flipped to ``-n`` (``u`` and ``n`` negated for matrices,
    which keeps a right-handed frame): the same planes with offsets reversed.
    """
    t = _as_float64(directions, "directions")
    if t.ndim == 1 and t.numel() in (2, 3):
        t = t[None]
    if t.ndim == 3 and t.shape[1:] == (3, 3):
        if t.shape[0] == 0:
            raise ValueError("directions must not be empty")
        frames = t.transpose(1, 2).contiguous()  # rows u, v, n
        eye = torch.eye(3, dtype=torch.float64)
        err = (frames @ frames.transpose(1, 2) - eye).abs().amax()
        if err > 1e-6:
            raise ValueError(f"directions given as (N, 3, 3) matrices must be rotation matrices "
                             f"(orthonormal columns u, v, n); max |RᵀR - I| = {float(err):.3g}")
        det = torch.linalg.det(frames)
        if (det <= 0).any():
            raise ValueError("directions given as (N, 3, 3) matrices must be rotations (det +1), "
                             "got a reflection")
        flip = frames[:, 2, 2] < 0
        frames[flip, 0] = -frames[flip, 0]
        frames[flip, 2] = -frames[flip, 2]
        return frames
    if t.ndim != 2 or t.shape[1] not in (2, 3) or t.shape[0] == 0:
        raise ValueError(f"directions must have shape (N, 3) unit vectors, (N, 2) angles (θ, φ) or "
                         f"(N, 3, 3) rotation matrices, got {tuple(t.shape)}")
    if t.shape[1] == 2:
        theta, phi = t.unbind(1)
        vec = torch.stack([torch.sin(theta) * torch.cos(phi), torch.sin(theta) * torch.sin(phi),
                           torch.cos(theta)], dim=1)
    else:
        norm = t.norm(dim=1, keepdim=True)
        if (norm < 1e-12).any():
            bad = int(torch.nonzero(norm[:, 0] < 1e-12)[0])
            raise ValueError(f"directions must be non-zero vectors; direction {bad} is {t[bad].tolist()}")
        vec = t / norm
    vec = torch.where(vec[:, 2:3] < 0, -vec, vec)
    return frames_from_directions(vec)


def bounding_radius(volume_shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Radius (mm) of the sphere around the volume's box: half the diagonal of ``(D sz, H sy, W sx)``."""
    return 0.5 * math.sqrt(sum((n * s) ** 2 for n, s in zip(volume_shape, spacing)))


def _covering_count(radius: float, step: float) -> int:
    """Smallest odd count of samples, ``step`` apart and centred on 0, whose cells cover ``[-radius, radius]``.

    Odd so that offset 0 (the volume centre) is always sampled. 64³ at 1 mm gives 111.
    """
    return 2 * max(0, math.ceil(radius / step - 0.5)) + 1


def _positive_float(x, name: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number (mm), got {type(x).__name__}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be positive and finite (mm), got {x!r}")
    return v


@dataclass(frozen=True)
class Geometry:
    """A complete slicing geometry for volumes of one shape and spacing.

    Attributes:
        volume_shape: ``(D, H, W)`` voxels.
        spacing: ``(sz, sy, sx)`` mm.
        frames: ``(N, 3, 3)`` float64, rows ``u, v, n`` in (x, y, z).
        weights: ``(N,)`` float64 quadrature weights (default ``2π/N``).
        n_slices: ``S`` slices per direction; offsets ``(k - (S-1)/2) Δs``.
        height, width: slice size ``h × w`` pixels.
        pixel_spacing: in-plane pixel spacing ``δ`` (mm).
        slice_spacing: distance ``Δs`` between slices (mm).
    """

    volume_shape: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    frames: torch.Tensor
    weights: torch.Tensor
    n_slices: int
    height: int
    width: int
    pixel_spacing: float
    slice_spacing: float

    @property
    def n_directions(self) -> int:
        return int(self.frames.shape[0])

    @property
    def directions(self) -> torch.Tensor:
        """Unit normals ``(N, 3)`` float64 in (x, y, z)."""
        return self.frames[:, 2]

    @property
    def offsets(self) -> torch.Tensor:
        """Slice offsets ``s_k`` (mm), ``(S,)`` float64."""
        return (torch.arange(self.n_slices, dtype=torch.float64) - (self.n_slices - 1) / 2) * self.slice_spacing

    @property
    def pixel_area(self) -> float:
        return self.pixel_spacing ** 2

    def _index_from_physical(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``P (3, 3)``, ``c (3,)`` with volume index ``(d, h, w) = P @ (x, y, z) + c``."""
        sz, sy, sx = self.spacing
        P = torch.tensor([[0.0, 0.0, 1.0 / sz], [0.0, 1.0 / sy, 0.0], [1.0 / sx, 0.0, 0.0]], dtype=torch.float64)
        D, H, W = self.volume_shape
        c = torch.tensor([(D - 1) / 2, (H - 1) / 2, (W - 1) / 2], dtype=torch.float64)
        return P, c

    def slice_maps(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """``(N, 3, 4)``: volume index ``(d, h, w) = M[n] @ (k, i, j, 1)`` for pixel (i, j) of slice k."""
        P, c = self._index_from_physical()
        u, v, n = self.frames[:, 0], self.frames[:, 1], self.frames[:, 2]
        ck, ci, cj = (self.n_slices - 1) / 2, (self.height - 1) / 2, (self.width - 1) / 2
        dk = n * self.slice_spacing
        di = v * self.pixel_spacing
        dj = u * self.pixel_spacing
        origin = -(ck * dk + ci * di + cj * dj)
        cols = torch.stack([dk, di, dj, origin], dim=-1)  # (N, 3 physical, 4)
        M = P @ cols
        M[:, :, 3] += c
        return M.to(dtype=dtype, device=device)

    def volume_maps(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """``(N, 3, 4)``: stack coordinates ``(k, i, j) = V[n] @ (d, h, w, 1)`` of voxel (d, h, w)."""
        P, c = self._index_from_physical()
        Pinv = torch.linalg.inv(P)  # physical = Pinv @ (index - c)
        steps = torch.tensor([self.slice_spacing, self.pixel_spacing, self.pixel_spacing], dtype=torch.float64)
        rows = torch.stack([self.frames[:, 2], self.frames[:, 1], self.frames[:, 0]], dim=1)  # n, v, u
        L = rows @ Pinv / steps[:, None]  # (N, 3, 3) index -> (k, i, j) offsets
        centre = torch.tensor([(self.n_slices - 1) / 2, (self.height - 1) / 2, (self.width - 1) / 2],
                              dtype=torch.float64)
        t = centre - L @ c
        V = torch.cat([L, t[:, :, None].expand(-1, 3, 1)], dim=-1)
        return V.to(dtype=dtype, device=device)

    def with_directions(self, index) -> "Geometry":
        """The same geometry restricted to a subset of directions (for chunking)."""
        return Geometry(self.volume_shape, self.spacing, self.frames[index], self.weights[index],
                        self.n_slices, self.height, self.width, self.pixel_spacing, self.slice_spacing)

    def with_slices(self, k0: int, k1: int) -> "Geometry":
        """Slices ``k0 ≤ k < k1`` of every stack, as a geometry of ``k1 - k0`` slices whose slice ``j`` is slice
        ``k0 + j`` here (for chunking). ``k`` may lie outside ``[0, S)``: the parallel planes ``Δs`` further
        out, e.g. the context slices beyond the ends of a stack. The stacks are moved along their normals
        (:func:`shift_offsets`) by the offset of the range's centre."""
        if (k0, k1) == (0, self.n_slices):
            return self
        if k1 <= k0:
            raise ValueError(f"a slice range k0 <= k < k1 must not be empty, got k0 = {k0}, k1 = {k1}")
        shift = ((k0 + k1 - 1) / 2 - (self.n_slices - 1) / 2) * self.slice_spacing
        return shift_offsets(replace(self, n_slices=k1 - k0),
                             torch.full((self.n_directions,), shift, dtype=torch.float64))


def make_geometry(volume_shape: Sequence[int], *, spacing=None, n_directions: int = 64, directions=None,
                  weights=None, slice_size=None, pixel_spacing=None, slice_spacing=None,
                  n_slices=None) -> Geometry:
    """Build a :class:`Geometry` with the defaults of docs/design.md, "Geometry".

    Args:
        volume_shape: ``(D, H, W)``.
        spacing: voxel spacing ``(sz, sy, sx)`` mm (default 1 mm isotropic).
        n_directions: number of Fibonacci directions when ``directions`` is None.
        directions: user directions (see :func:`parse_directions`).
        weights: ``(N,)`` quadrature weights (default ``2π/N``).
        slice_size: ``int`` or ``(h, w)`` pixels. Default: enough to cover the bounding sphere at
            ``pixel_spacing``. If given without ``pixel_spacing``, ``δ`` follows so the slice spans the sphere.
        pixel_spacing: in-plane pixel spacing δ (mm); default ``min(spacing)``.
        slice_spacing: Δs (mm); default ``min(spacing)``.
        n_slices: slices per direction; default: enough to cover the bounding sphere.
    """
    if isinstance(volume_shape, torch.Size):
        volume_shape = tuple(volume_shape)
    if isinstance(volume_shape, (str, bytes)) or not hasattr(volume_shape, "__len__") or len(volume_shape) != 3:
        raise ValueError(f"volume_shape must be a sequence of 3 integers (D, H, W), got {volume_shape!r}")
    # Refuse 2.5 or "7" rather than truncate: a wrong shape would silently mis-place every slice.
    if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in volume_shape):
        raise TypeError(f"volume_shape must hold integers (D, H, W), got {tuple(volume_shape)!r}")
    shape = tuple(int(s) for s in volume_shape)
    if min(shape) < 1:
        raise ValueError(f"volume_shape must have at least one voxel along each axis, got {shape}")
    spacing = normalize_spacing(spacing)
    if directions is None:
        frames = frames_from_directions(fibonacci_directions(n_directions))
    else:
        frames = parse_directions(directions)
    N = frames.shape[0]
    if weights is None:
        w = torch.full((N,), 2 * math.pi / N, dtype=torch.float64)
    else:
        w = _as_float64(weights, "weights").reshape(-1)
        if w.shape[0] != N:
            raise ValueError(f"weights must have one entry per direction: got {w.shape[0]} weights "
                             f"for {N} directions")
    radius = bounding_radius(shape, spacing)
    if slice_size is None:
        delta = min(spacing) if pixel_spacing is None else _positive_float(pixel_spacing, "pixel_spacing")
        h = w_px = _covering_count(radius, delta)
    else:
        if isinstance(slice_size, (int, np.integer)) and not isinstance(slice_size, bool):
            h = w_px = positive_int(slice_size, "slice_size")
        else:
            try:
                h, w_px = slice_size
            except (TypeError, ValueError):
                raise ValueError(f"slice_size must be an int or a pair (h, w), got {slice_size!r}") from None
            h = positive_int(h, "slice_size[0]")
            w_px = positive_int(w_px, "slice_size[1]")
        if pixel_spacing is None:
            delta = 2 * radius / min(h, w_px)
        else:
            delta = _positive_float(pixel_spacing, "pixel_spacing")
    ds = min(spacing) if slice_spacing is None else _positive_float(slice_spacing, "slice_spacing")
    S = _covering_count(radius, ds) if n_slices is None else positive_int(n_slices, "n_slices")
    return Geometry(shape, spacing, frames, w, S, h, w_px, float(delta), float(ds))


def rotate_frames_in_plane(frames: torch.Tensor, angles) -> torch.Tensor:
    """Turn each frame's in-plane axes about its normal: ``(N, 3, 3)`` rows ``u, v, n`` → rows ``u', v', n``.

    ``u' = cos α u + sin α v``, ``v' = -sin α u + cos α v`` with ``angles`` ``(N,)`` (radians), so the image
    content of a slice turns by ``-α`` and the frame stays right-handed. Used by the training sampler to
    add a random in-plane rotation without touching the slicing kernels.
    """
    frames = _as_float64(frames, "frames")
    if frames.ndim != 3 or frames.shape[1:] != (3, 3):
        raise ValueError(f"frames must have shape (N, 3, 3), got {tuple(frames.shape)}")
    a = _as_float64(angles, "angles").reshape(-1)
    if a.shape[0] != frames.shape[0]:
        raise ValueError(f"angles must have one entry per frame: got {a.shape[0]} for {frames.shape[0]} frames")
    c, s = torch.cos(a)[:, None], torch.sin(a)[:, None]
    u, v, n = frames[:, 0], frames[:, 1], frames[:, 2]
    return torch.stack([c * u + s * v, -s * u + c * v, n], dim=1)


@dataclass(frozen=True)
class ShiftedGeometry(Geometry):
    """A :class:`Geometry` whose stack of direction ``n`` is moved along its normal by ``shifts[n]`` mm.

    Slice ``k`` of direction ``n`` lies at offset ``shifts[n] + (k - (S-1)/2) Δs`` (``offsets`` stays the
    unshifted ``(S,)`` grid); its in-plane centre is the projection of the volume centre onto the plane.
    The training sampler uses it with ``S = 1`` to cut one slice per direction at a random offset, so a
    whole batch of independent random slices is one ``slice_volume`` call. Built by :func:`shift_offsets`.

    Attributes (besides :class:`Geometry`'s):
        shifts: ``(N,)`` float64 offsets (mm) along each direction's normal.
    """

    shifts: Optional[torch.Tensor] = None

    def slice_maps(self, dtype=torch.float64, device=None) -> torch.Tensor:
        M = super().slice_maps()
        P, _ = self._index_from_physical()
        # A physical translation shifts[n] * n moves every pixel's volume index by P @ (shifts[n] * n).
        M[:, :, 3] += (self.frames[:, 2] * self.shifts[:, None]) @ P.T
        return M.to(dtype=dtype, device=device)

    def volume_maps(self, dtype=torch.float64, device=None) -> torch.Tensor:
        V = super().volume_maps()
        # Row 0 is the continuous slice index (x·n - shift)/Δs + (S-1)/2; in-plane rows are unaffected
        # because the shift is along the normal.
        V[:, 0, 3] -= self.shifts / self.slice_spacing
        return V.to(dtype=dtype, device=device)

    def with_directions(self, index) -> "ShiftedGeometry":
        return ShiftedGeometry(self.volume_shape, self.spacing, self.frames[index], self.weights[index],
                               self.n_slices, self.height, self.width, self.pixel_spacing,
                               self.slice_spacing, self.shifts[index])


def shift_offsets(geometry: Geometry, shifts) -> ShiftedGeometry:
    """``geometry`` with the stack of direction ``n`` moved by ``shifts[n]`` mm along its normal.

    Args:
        geometry: any :class:`Geometry` (a :class:`ShiftedGeometry`'s shifts are added to).
        shifts: ``(N,)`` offsets in mm, one per direction.
    """
    s = _as_float64(shifts, "shifts").reshape(-1)
    if s.shape[0] != geometry.n_directions:
        raise ValueError(f"shifts must have one entry per direction: got {s.shape[0]} for "
                         f"{geometry.n_directions} directions")
    if isinstance(geometry, ShiftedGeometry):
        s = s + geometry.shifts
    return ShiftedGeometry(geometry.volume_shape, geometry.spacing, geometry.frames, geometry.weights,
                           geometry.n_slices, geometry.height, geometry.width, geometry.pixel_spacing,
                           geometry.slice_spacing, s)


# ---------------------------------------------------------------------------------------------------------
# affine_grid_sample's theta as index-space maps.

def _affine_fold(in_shape: Sequence[int], out_shape: Sequence[int], align_corners: bool, device):
    """The linear fold of ``F.affine_grid`` and ``grid_sample``'s coordinate conventions around ``theta``:
    ``(K, offset)`` with ``M[i, j] = Σ_rc K[i, j, r, c] θ[r, c] + offset[i, j]`` (float64, on ``device``).

    ``M = P θ A + offset``: ``A`` (4×4) takes the output index ``(d, h, w, 1)`` to normalised ``(x, y, z, 1)`` as
    ``affine_grid`` builds its base grid (x along W; ``linspace(-1, 1)`` shrunk by ``(n-1)/n`` without
    ``align_corners``; a size-1 axis at 0); ``P`` (3×3) and ``offset`` take normalised ``(x, y, z)`` to the input
    index ``(d, h, w)`` as ``grid_sample`` unnormalises. ``K[i, j, r, c] = P[i, r] A[c, j]``."""
    A = [[0.0] * 4 for _ in range(4)]
    P = [[0.0] * 3 for _ in range(3)]
    offset = [[0.0] * 4 for _ in range(3)]
    for ax in range(3):  # 0 = D (z), 1 = H (y), 2 = W (x)
        row = 2 - ax  # row of (x, y, z) for this axis
        n_out, n_in = int(out_shape[ax]), int(in_shape[ax])
        if n_out > 1:
            A[row][ax], A[row][3] = (2.0 / (n_out - 1), -1.0) if align_corners else (2.0 / n_out, 1.0 / n_out - 1.0)
        P[ax][row] = (n_in - 1) / 2.0 if align_corners else n_in / 2.0
        offset[ax][3] = (n_in - 1) / 2.0
    A[3][3] = 1.0
    A_, P_ = torch.tensor(A, dtype=torch.float64), torch.tensor(P, dtype=torch.float64)
    # Broadcast products, not matmul: on a GPU matmul goes through cuBLAS, which
    # torch.use_deterministic_algorithms(True) refuses without CUBLAS_WORKSPACE_CONFIG.
    K = P_.reshape(3, 1, 3, 1) * A_.T.reshape(1, 4, 1, 4)
    return K.to(device), torch.tensor(offset, dtype=torch.float64, device=device)


def affine_theta_maps(theta: torch.Tensor, in_shape: Sequence[int], out_shape: Sequence[int],
                      align_corners: bool) -> torch.Tensor:
    """``F.affine_grid`` ``theta`` ``(N, 3, 4)`` (normalised coordinates, rows x, y, z) → index-space maps
    ``(N, 3, 4)``: ``grid_sample(volume, affine_grid(theta, size, align_corners), align_corners=...)`` reads
    ``volume[n]`` at input index ``(d, h, w) = M[n] @ (d_o, h_o, w_o, 1)``. ``in_shape`` and ``out_shape`` are
    the ``(D, H, W)`` of the volume and of the output. Computed in float64, returned in ``theta``'s dtype,
    contiguous; differentiable."""
    K, offset = _affine_fold(in_shape, out_shape, align_corners, theta.device)
    M = (theta.to(torch.float64).reshape(-1, 1, 1, 3, 4) * K).sum((3, 4)) + offset
    return M.to(theta.dtype).contiguous()


def affine_theta_grad(maps_grad: torch.Tensor, in_shape: Sequence[int], out_shape: Sequence[int],
                      align_corners: bool, dtype: torch.dtype) -> torch.Tensor:
    """The gradient with respect to ``theta`` ``(N, 3, 4)`` from the gradient with respect to the maps of
    :func:`affine_theta_maps` (the transpose of its linear fold), in ``dtype``."""
    K, _ = _affine_fold(in_shape, out_shape, align_corners, maps_grad.device)
    return (maps_grad.to(torch.float64).reshape(-1, 3, 4, 1, 1) * K).sum((1, 2)).to(dtype)


__all__ += ["rotate_frames_in_plane", "ShiftedGeometry", "shift_offsets", "affine_theta_maps", "affine_theta_grad"]
