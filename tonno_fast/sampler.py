"""Random oblique slices and bags of slices for weakly-supervised training of a 2D encoder (docs/design.md,
"The method").

The encoder of ToNNO is trained on slices cut at random orientations through volumes that carry only a
volume-level label. :class:`ObliqueSliceSampler` draws either single slices, each inheriting the label of its
volume (:meth:`~ObliqueSliceSampler.sample`), or *bags* (:meth:`~ObliqueSliceSampler.sample_bags`): stacks of
parallel slices of one volume along one random orientation that cross its body mask, for which the volume
label is right as a whole (multiple-instance learning, see :mod:`tonno_fast.training`). Slices are drawn with:

* orientation: uniform on the hemisphere (``orientation="hemisphere"``) or uniform inside a cone of
  half-angle ``cone_angle`` around ``axis`` (``orientation="cone"``; e.g. near-axial slices);
* offset: the plane passes through a uniformly random point of the volume, or of its body mask when one
  is given, so slices fall where the anatomy is (offsets are weighted by the body's cross-section);
* in-plane rotation: uniform in ``[-in_plane_rotation, in_plane_rotation]`` (radians; default ``π``);
* size: ``slice_size`` pixels at ``pixel_spacing`` mm, the encoder's input; the slice is centred on the
  projection of the volume centre onto its plane, so it shows the whole cross-section (make ``slice_size ×
  pixel_spacing`` cover the body, and use the same values when computing heatmaps).

Every batch is cut by the fused :func:`tonno_fast.ops.slice_volume` op, one call per volume drawn in the
batch (all its slices are the directions of one :class:`~tonno_fast.geometry.ShiftedGeometry` with one slice
each) or one call per bag (one direction, the bag's slices), on the volumes' device: no per-slice Python and
no sampling grid in memory, so a GPU stays fed. ``spacing`` is required (or read from scans that carry it):
offsets, pixel sizes and bag spacings are all in mm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import ops
from .geometry import (Geometry, bounding_radius, fibonacci_directions, frames_from_directions, normalize_spacing,
                       rotate_frames_in_plane, shift_offsets)
from .validation import scan_and_spacing

__all__ = ["ObliqueSliceSampler", "SliceBatch", "BagBatch", "sample_directions"]


@dataclass
class SliceBatch:
    """A batch of ``M`` random slices.

    Attributes:
        slices: ``(M, C, h, w)`` encoder input, on the sampler's device (``out_dtype`` if given).
        labels: ``(M,)`` or ``(M, K)`` float32: the label of the volume each slice was cut from.
        volume_index: ``(M,)`` int64 index of that volume in the sampler's list.
        normals: ``(M, 3)`` float64 unit normals (x, y, z) with ``n_z ≥ 0``.
        offsets: ``(M,)`` float64 signed distance (mm) of each plane from the volume centre along its normal.
        aux: ``(M, Ca, h, w)`` slices of the auxiliary volumes (e.g. lesion masks, for statistics only),
            or ``None``.
    """

    slices: torch.Tensor
    labels: torch.Tensor
    volume_index: torch.Tensor
    normals: torch.Tensor
    offsets: torch.Tensor
    aux: Optional[torch.Tensor] = None


@dataclass
class BagBatch:
    """``n_bags`` bags of parallel slices, ``M`` slices in all, grouped by bag (bag 0's slices first).

    Attributes:
        slices: ``(M, C, h, w)`` encoder input; the slices of a bag are in order along its normal.
        labels: ``(n_bags,)`` or ``(n_bags, K)`` float32: the label of each bag's volume.
        bag_index: ``(M,)`` int64: the bag of each slice (non-decreasing).
        sizes: ``(n_bags,)`` int64 number of slices of each bag.
        volume_index: ``(n_bags,)`` int64 index of each bag's volume in the sampler's list.
        normals: ``(n_bags, 3)`` float64 unit normal (x, y, z) of each bag.
        offsets: ``(M,)`` float64 offset (mm) of each slice's plane from the volume centre along its normal.
        aux: ``(M, Ca, h, w)`` slices of the auxiliary volumes, or ``None``.
    """

    slices: torch.Tensor
    labels: torch.Tensor
    bag_index: torch.Tensor
    sizes: torch.Tensor
    volume_index: torch.Tensor
    normals: torch.Tensor
    offsets: torch.Tensor
    aux: Optional[torch.Tensor] = None

    @property
    def n_bags(self) -> int:
        return int(self.sizes.numel())

    @property
    def slice_labels(self) -> torch.Tensor:
        """``(M,)`` or ``(M, K)``: each slice's volume label (what per-slice training uses)."""
        return self.labels[self.bag_index.to(self.labels.device)]


def sample_directions(n: int, *, orientation: str = "hemisphere", axis=(0.0, 0.0, 1.0),
                      cone_angle: float = math.pi / 6, generator: Optional[torch.Generator] = None
                      ) -> torch.Tensor:
    """``n`` random unit normals ``(n, 3)`` float64 (x, y, z), flipped to ``n_z ≥ 0`` (same planes).

    ``"hemisphere"``: uniform on the hemisphere (``n_z`` uniform in [0, 1], Archimedes). ``"cone"``: uniform
    on the spherical cap of half-angle ``cone_angle`` (radians) around ``axis``: ``cos θ`` uniform in
    ``[cos cone_angle, 1]``, so ``E|n·axis| = (1 + cos cone_angle) / 2`` for ``cone_angle ≤ π/2``.
    """
    if orientation not in ("hemisphere", "cone"):
        raise ValueError(f"orientation must be 'hemisphere' or 'cone', got {orientation!r}")
    phi = torch.rand(n, generator=generator, dtype=torch.float64) * (2 * math.pi)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if orientation == "hemisphere":
        cos_t = u
        a = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    else:
        if not (0.0 <= float(cone_angle) <= math.pi / 2):
            raise ValueError(f"cone_angle must be in [0, π/2] radians, got {cone_angle!r}")
        a = torch.as_tensor(np.asarray(axis, dtype=np.float64)).reshape(-1)
        if a.shape[0] != 3 or not bool(torch.isfinite(a).all()) or float(a.norm()) < 1e-12:
            raise ValueError(f"axis must be a non-zero 3-vector (x, y, z), got {axis!r}")
        a = a / a.norm()
        if a[2] < 0:  # a cone around -a holds the same planes; frames_from_directions needs a_z >= 0
            a = -a
        cos_t = 1.0 - u * (1.0 - math.cos(float(cone_angle)))
    sin_t = torch.sqrt(torch.clamp(1.0 - cos_t ** 2, min=0.0))
    local = torch.stack([sin_t * torch.cos(phi), sin_t * torch.sin(phi), cos_t], dim=1)
    basis = frames_from_directions(a[None])[0]  # rows u, v, a: local (x, y, z) -> x u + y v + z a
    vec = local @ basis
    vec = vec / vec.norm(dim=1, keepdim=True)
    return torch.where(vec[:, 2:3] < 0, -vec, vec)


def _as_volume4d(v, name: str, *, mask: bool = False) -> torch.Tensor:
    """``(D, H, W)`` or ``(C, D, H, W)`` tensor/array → ``(C, D, H, W)`` tensor. ``mask=True`` (aux volumes such
    as lesion masks) accepts bool and turns it into 0/1 float32."""
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(np.ascontiguousarray(v))
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or numpy array, got {type(v).__name__}")
    if v.ndim == 3:
        v = v[None]
    if v.ndim != 4:
        raise ValueError(f"{name} must be (D, H, W) or (C, D, H, W), got shape {tuple(v.shape)}")
    if v.dtype == torch.bool and mask:
        v = v.float()
    if v.dtype == torch.bool or v.is_complex():
        raise TypeError(f"{name} must be real-valued, got {v.dtype}")
    return v


def _to_mm(idx: torch.Tensor, shape, spacing) -> torch.Tensor:
    """Continuous voxel indices ``(P, 3)`` (d, h, w) → positions ``(P, 3)`` float64 mm (x, y, z), origin at the
    volume centre (the library's convention)."""
    centre = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
    return ((idx.double() - centre) * torch.tensor(spacing, dtype=torch.float64)).flip(1)


def _box_corners(shape, spacing) -> torch.Tensor:
    """The 8 corners (mm, (x, y, z)) of the volume's box (outer voxel faces)."""
    lo_hi = [(-0.5, n - 0.5) for n in shape]
    corners = torch.tensor([[a, b, c] for a in lo_hi[0] for b in lo_hi[1] for c in lo_hi[2]], dtype=torch.float64)
    return _to_mm(corners, shape, spacing)


def _boundary_mm(mask: torch.Tensor, spacing) -> torch.Tensor:
    """Centres (mm) of the voxels of ``mask`` with a 6-neighbour outside it. A plane's extreme offsets over
    the mask are reached at such voxels, so they bound the mask's extent along any normal with a fraction of
    the points (about a fifth of a brain's)."""
    m = mask[None, None].float()
    outside = F.max_pool3d(F.pad(1 - m, (1, 1, 1, 1, 1, 1), value=1.0), kernel_size=3, stride=1, padding=0)
    # max_pool3d of a 3x3x3 box also sees diagonal neighbours: a superset of the 6-neighbour boundary, fine.
    idx = torch.nonzero((m * outside)[0, 0] > 0)
    return _to_mm(idx, tuple(mask.shape), spacing)


class ObliqueSliceSampler:
    """Draw batches of random oblique slices labelled with their volume's label.

    Args:
        volumes: sequence of ``(D, H, W)`` or ``(C, D, H, W)`` tensors/arrays (z, y, x; shapes may differ,
            channel counts may not), or one ``(V, C, D, H, W)`` tensor; or of the scans the pipelines take
            (:func:`tonno_fast.load_nifti` results, nibabel images, MONAI ``MetaTensor`` volumes ``(X, Y, Z)`` or
            ``(C, X, Y, Z)``), read as :func:`tonno_fast.tomographic_heatmap` reads them.
        labels: ``(V,)`` or ``(V, K)`` volume-level labels (e.g. 0/1).
        spacing: voxel spacing ``(sz, sy, sx)`` mm for all volumes, or a list of one per volume. Required
            unless ``volumes`` are scans that carry it.
        slice_size: ``int`` or ``(h, w)``: the encoder's input size.
        pixel_spacing: in-plane pixel spacing δ (mm). Default: the slice spans each volume's bounding sphere
            (as in :func:`~tonno_fast.geometry.make_geometry`), which depends on the volume's shape.
        body_masks: optional ``(D, H, W)`` boolean masks, one per volume (``None`` entries allowed): planes
            pass through a random point of the mask instead of the whole box.
        aux: optional ``(Ca, D, H, W)`` or ``(D, H, W)`` volumes (bool masks become 0/1) cut with the same
            planes and returned in ``SliceBatch.aux`` (e.g. lesion masks, to measure how many slices cross a
            lesion; never shown to the encoder).
        orientation, axis, cone_angle: see :func:`sample_directions` (radians).
        in_plane_rotation: largest in-plane rotation (radians, in ``[0, π]``); ``True`` = ``π``, ``False`` = none.
        volumes_per_batch: draw each batch from this many random volumes (``None``: every slice picks its
            volume independently). Fewer volumes per batch means fewer ``slice_volume`` calls.
        balance: pick volumes so that each label value (``labels`` of shape ``(V,)``) is equally likely.
        fill: value read outside the volume; ``out_dtype``: dtype of the slices (e.g. ``torch.bfloat16``).
        device: where volumes live and slices are cut (default: the first volume's device).
        backend: operator backend (see :mod:`tonno_fast.ops.registry`).
        seed: seed of the sampler's own ``torch.Generator`` (reproducible batches).
    """

    def __init__(self, volumes, labels, *, spacing=None, slice_size=64, pixel_spacing=None, body_masks=None,
                 aux=None, orientation: str = "hemisphere", axis=(0.0, 0.0, 1.0), cone_angle=math.pi / 6,
                 in_plane_rotation: Union[float, bool] = math.pi, volumes_per_batch: Optional[int] = None,
                 balance: bool = False, fill: float = 0.0, out_dtype: Optional[torch.dtype] = None,
                 device=None, backend: str = "auto", seed: Optional[int] = None):
        if isinstance(volumes, torch.Tensor) and volumes.ndim == 5:
            volumes = list(volumes.unbind(0))
        pairs = [scan_and_spacing(v, None)[:2] for v in volumes]
        vols = [_as_volume4d(v, f"volumes[{i}]") for i, (v, _) in enumerate(pairs)]
        if not vols:
            raise ValueError("volumes must not be empty")
        if spacing is None:
            # No silent 1 mm: every geometric quantity (offsets, pixel size, bag spacing) is in mm.
            if any(sp is None for _, sp in pairs):
                raise ValueError("spacing is required: give the voxel spacing (sz, sy, sx) in mm (one for all "
                                 "volumes, or a list of one per volume), or pass scans that carry it "
                                 "(tonno_fast.load_nifti results)")
            spacing = [sp for _, sp in pairs]
        channels = {v.shape[0] for v in vols}
        if len(channels) != 1:
            raise ValueError(f"all volumes must have the same number of channels, got {sorted(channels)}")
        V = len(vols)
        lab = torch.as_tensor(np.asarray(labels, dtype=np.float32))
        if lab.ndim not in (1, 2) or lab.shape[0] != V:
            raise ValueError(f"labels must have shape (V,) or (V, K) with V = {V} volumes, got {tuple(lab.shape)}")
        self.device = torch.device(device) if device is not None else vols[0].device
        per_volume = isinstance(spacing, (list, tuple)) and len(spacing) > 0 and not isinstance(
            spacing[0], (int, float, np.integer, np.floating))
        if per_volume:
            if len(spacing) != V:
                raise ValueError(f"spacing given per volume must have {V} entries, got {len(spacing)}")
            self.spacings = [normalize_spacing(s, f"spacing[{i}]") for i, s in enumerate(spacing)]
        else:
            self.spacings = [normalize_spacing(spacing)] * V
        if aux is not None:
            if len(aux) != V:
                raise ValueError(f"aux must have one volume per volume: got {len(aux)} for {V}")
            auxs = [_as_volume4d(a, f"aux[{i}]", mask=True) for i, a in enumerate(aux)]
            for i, (v, a) in enumerate(zip(vols, auxs)):
                if a.shape[1:] != v.shape[1:]:
                    raise ValueError(f"aux[{i}] has spatial shape {tuple(a.shape[1:])}, volume {i} has "
                                     f"{tuple(v.shape[1:])}")
            self.n_aux = auxs[0].shape[0]
            vols = [torch.cat([v.float(), a.float()], 0) for v, a in zip(vols, auxs)]
        else:
            self.n_aux = 0
        self.n_channels = next(iter(channels))
        dtype = torch.float64 if all(v.dtype == torch.float64 for v in vols) else torch.float32
        # Volumes are kept as (1, C, D, H, W) on the device so each batch is one op call per volume.
        self.volumes: List[torch.Tensor] = [v.to(device=self.device, dtype=dtype)[None].contiguous() for v in vols]
        self.labels = lab
        self.points: List[torch.Tensor] = []  # candidate voxel indices (P, 3) (d, h, w), CPU int64
        self._outline: List[torch.Tensor] = []  # (Q, 3) mm (x, y, z) of the mask's boundary voxels / box corners
        if body_masks is not None and len(body_masks) != V:
            raise ValueError(f"body_masks must have one mask (or None) per volume: got {len(body_masks)} for {V}")
        for i, v in enumerate(vols):
            m = None if body_masks is None else body_masks[i]
            if m is None:
                self.points.append(None)
                self._outline.append(_box_corners(tuple(v.shape[1:]), self.spacings[i]))
                continue
            m = torch.as_tensor(np.asarray(m.cpu() if isinstance(m, torch.Tensor) else m)).bool()
            if tuple(m.shape) != tuple(v.shape[1:]):
                raise ValueError(f"body_masks[{i}] has shape {tuple(m.shape)}, volume {i} has {tuple(v.shape[1:])}")
            idx = torch.nonzero(m)
            if idx.shape[0] == 0:
                raise ValueError(f"body_masks[{i}] is empty: no voxel to put a slice through")
            self.points.append(idx)
            self._outline.append(_boundary_mm(m, self.spacings[i]))
        if isinstance(slice_size, (int, np.integer)):
            slice_size = (int(slice_size), int(slice_size))
        try:
            self.slice_size = tuple(int(s) for s in slice_size)
        except (TypeError, ValueError):
            raise ValueError(f"slice_size must be an int or a pair (h, w), got {slice_size!r}") from None
        if len(self.slice_size) != 2 or min(self.slice_size) < 1:
            raise ValueError(f"slice_size must be a positive int or pair (h, w), got {slice_size!r}")
        if pixel_spacing is not None and not (float(pixel_spacing) > 0 and math.isfinite(float(pixel_spacing))):
            raise ValueError(f"pixel_spacing must be a positive number of mm, got {pixel_spacing!r}")
        self.pixel_spacing = pixel_spacing
        self.orientation, self.axis, self.cone_angle = orientation, axis, cone_angle
        # Validate now, on a throwaway generator: building a sampler must not move torch's global random stream.
        sample_directions(1, orientation=orientation, axis=axis, cone_angle=cone_angle, generator=torch.Generator())
        if isinstance(in_plane_rotation, bool):  # True: any angle; False: none
            in_plane_rotation = math.pi if in_plane_rotation else 0.0
        self.in_plane_rotation = float(in_plane_rotation)
        if not (0.0 <= self.in_plane_rotation <= math.pi):
            raise ValueError(f"in_plane_rotation must be in [0, π] radians (or a bool), got {in_plane_rotation!r}")
        if volumes_per_batch is not None and (not isinstance(volumes_per_batch, int) or volumes_per_batch < 1):
            raise ValueError(f"volumes_per_batch must be None or a positive integer, got {volumes_per_batch!r}")
        self.volumes_per_batch = volumes_per_batch
        if balance and lab.ndim != 1:
            raise ValueError("balance=True needs labels of shape (V,)")
        self.balance = bool(balance)
        self.fill, self.out_dtype, self.backend = float(fill), out_dtype, backend
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2 ** 62, ()).item()))

    def __len__(self) -> int:
        return len(self.volumes)

    def _volume_probabilities(self) -> torch.Tensor:
        V = len(self.volumes)
        if not self.balance:
            return torch.full((V,), 1.0 / V, dtype=torch.float64)
        values, inverse, counts = torch.unique(self.labels, return_inverse=True, return_counts=True)
        return 1.0 / (counts[inverse].double() * values.numel())

    def _draw_volumes(self, batch_size: int) -> torch.Tensor:
        g = self.generator
        p = self._volume_probabilities()
        if self.volumes_per_batch is not None:
            k = min(self.volumes_per_batch, len(self.volumes))
            chosen = torch.multinomial(p, k, replacement=False, generator=g)
            return chosen[torch.randint(0, k, (batch_size,), generator=g)]
        return torch.multinomial(p, batch_size, replacement=True, generator=g)

    def _random_points(self, i: int, m: int) -> torch.Tensor:
        """``m`` uniform random points (mm, (x, y, z), origin at the volume centre) inside volume ``i``'s
        body mask (voxel cubes), or inside its box when it has none."""
        g = self.generator
        shape = self.volumes[i].shape[2:]
        if self.points[i] is None:
            idx = torch.rand(m, 3, generator=g, dtype=torch.float64) * torch.tensor(shape, dtype=torch.float64) - 0.5
        else:
            pts = self.points[i]
            pick = torch.randint(0, pts.shape[0], (m,), generator=g)
            idx = pts[pick].double() + torch.rand(m, 3, generator=g, dtype=torch.float64) - 0.5
        return _to_mm(idx, shape, self.spacings[i])

    def _geometry(self, i: int, frames: torch.Tensor, n_slices: int = 1, slice_spacing: Optional[float] = None
                  ) -> Geometry:
        """``n_slices`` parallel slices per frame, centred on volume ``i``'s centre, at the encoder's input size.

        Built directly rather than through ``make_geometry``: the frames are rotations by construction, and
        re-checking ``det`` of every frame costs more than cutting the slices at training batch sizes."""
        shape = tuple(int(n) for n in self.volumes[i].shape[2:])
        sp = self.spacings[i]
        h, w = self.slice_size
        if self.pixel_spacing is None:  # the slice spans the bounding sphere, as make_geometry's default
            delta = 2 * bounding_radius(shape, sp) / min(h, w)
        else:
            delta = float(self.pixel_spacing)
        weights = torch.full((frames.shape[0],), 2 * math.pi / frames.shape[0], dtype=torch.float64)
        ds = min(sp) if slice_spacing is None else float(slice_spacing)
        return Geometry(shape, sp, frames.contiguous(), weights, int(n_slices), h, w, delta, ds)

    def _random_frames(self, n: int):
        """``n`` random normals ``(n, 3)`` and their frames ``(n, 3, 3)`` with a random in-plane rotation."""
        g = self.generator
        normals = sample_directions(n, orientation=self.orientation, axis=self.axis, cone_angle=self.cone_angle,
                                    generator=g)
        frames = frames_from_directions(normals)
        if self.in_plane_rotation != 0.0:
            angles = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * self.in_plane_rotation
            frames = rotate_frames_in_plane(frames, angles)
        return normals, frames

    def sample(self, batch_size: int) -> SliceBatch:
        """One batch of ``batch_size`` random slices (see the class docstring)."""
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        g = self.generator
        vidx = self._draw_volumes(int(batch_size))
        order = torch.argsort(vidx, stable=True)
        vidx = vidx[order]
        normals, frames = self._random_frames(int(batch_size))
        offsets = torch.empty(int(batch_size), dtype=torch.float64)
        parts = []
        ids, counts = torch.unique_consecutive(vidx, return_counts=True)
        start = 0
        for i, m in zip(ids.tolist(), counts.tolist()):
            sl = slice(start, start + m)
            start += m
            offsets[sl] = (self._random_points(i, m) * normals[sl]).sum(1)
            vol = self.volumes[i]
            geom = shift_offsets(self._geometry(i, frames[sl]), offsets[sl])
            # One fused call for all of this volume's slices: (1, m, 1, C, h, w).
            parts.append(ops.slice_volume(vol, geom, fill=self.fill, out_dtype=self.out_dtype,
                                          backend=self.backend)[0, :, 0])
        cut = torch.cat(parts, 0)
        C = self.n_channels
        labels = self.labels[vidx].to(self.device)
        return SliceBatch(slices=cut[:, :C], labels=labels, volume_index=vidx, normals=normals, offsets=offsets,
                          aux=cut[:, C:] if self.n_aux else None)

    def _draw_bag_volumes(self, n_bags: int) -> torch.Tensor:
        """Volumes of ``n_bags`` bags. With ``balance``, each label value gets an equal share of the bags of
        every batch (the remainder goes to random values), not only in expectation: a step of few bags
        should not be all one label."""
        g = self.generator
        if not self.balance:
            return torch.multinomial(self._volume_probabilities(), n_bags, replacement=True, generator=g)
        values, inverse = torch.unique(self.labels, return_inverse=True)
        k = values.numel()
        per_value = torch.full((k,), n_bags // k, dtype=torch.int64)
        per_value[torch.randperm(k, generator=g)[:n_bags % k]] += 1
        out = []
        for j in range(k):
            members = torch.nonzero(inverse == j)[:, 0]
            pick = torch.randint(0, members.numel(), (int(per_value[j]),), generator=g)
            out.append(members[pick])
        vidx = torch.cat(out)
        return vidx[torch.randperm(n_bags, generator=g)]

    def body_extent(self, i: int, normal: torch.Tensor) -> tuple:
        """``(lo, hi)`` mm: the offsets along unit ``normal`` (x, y, z) between which a plane crosses volume
        ``i``'s body mask (its box without one), including each voxel's half-width along the normal."""
        t = self._outline[i] @ normal.double()
        sz, sy, sx = self.spacings[i]
        half = 0.0 if self.points[i] is None else 0.5 * float(abs(normal[0]) * sx + abs(normal[1]) * sy
                                                               + abs(normal[2]) * sz)
        return float(t.min()) - half, float(t.max()) + half

    def sample_bags(self, n_bags: int, *, bag_size: Optional[int] = None,
                    slice_spacing: Optional[float] = None) -> "BagBatch":
        """``n_bags`` bags for multiple-instance training: each bag is a stack of parallel slices of one volume
        along one random orientation (same distribution as :meth:`sample`, same in-plane rotation for the
        whole stack), ``slice_spacing`` mm apart (default: ``pixel_spacing``, else the finest voxel spacing),
        at a random phase, covering every plane that crosses the body mask (the volume's box without one).

        The volume label is right for the bag as a whole: a positive volume has a lesion in some slice of every
        orientation, as long as the lesion is thicker than ``slice_spacing`` along the normal. With
        ``bag_size=k`` a bag is a random run of ``k`` consecutive slices of that stack (all of them when fewer
        cross the body); such a run may miss the lesion, so its positive label can be wrong.

        One fused ``slice_volume`` call per bag. Returns a :class:`BagBatch` whose slices are grouped by bag.
        """
        if not isinstance(n_bags, (int, np.integer)) or isinstance(n_bags, bool) or n_bags < 1:
            raise ValueError(f"n_bags must be a positive integer, got {n_bags!r}")
        if bag_size is not None and (not isinstance(bag_size, (int, np.integer)) or isinstance(bag_size, bool)
                                     or bag_size < 1):
            raise ValueError(f"bag_size must be None (every slice crossing the body) or a positive integer, "
                             f"got {bag_size!r}")
        if slice_spacing is None:
            slice_spacing = self.pixel_spacing
        elif not (isinstance(slice_spacing, (int, float, np.integer, np.floating)) and float(slice_spacing) > 0
                  and math.isfinite(float(slice_spacing))):
            raise ValueError(f"slice_spacing must be a positive number of mm, got {slice_spacing!r}")
        g = self.generator
        vidx = self._draw_bag_volumes(int(n_bags))
        normals, frames = self._random_frames(int(n_bags))
        parts, offsets, sizes = [], [], []
        for b, i in enumerate(vidx.tolist()):
            ds = float(slice_spacing) if slice_spacing is not None else min(self.spacings[i])
            lo, hi = self.body_extent(i, normals[b])
            phase = float(torch.rand((), generator=g, dtype=torch.float64)) * ds
            k_all = max(1, int(math.floor((hi - lo - phase) / ds)) + 1)
            first = 0
            if bag_size is not None and k_all > bag_size:
                first = int(torch.randint(0, k_all - bag_size + 1, (), generator=g))
                k_all = int(bag_size)
            s0 = lo + phase + first * ds
            geom = shift_offsets(self._geometry(i, frames[b:b + 1], k_all, ds), [s0 + (k_all - 1) / 2 * ds])
            parts.append(ops.slice_volume(self.volumes[i], geom, fill=self.fill, out_dtype=self.out_dtype,
                                          backend=self.backend)[0, 0])  # (k, C, h, w)
            offsets.append(s0 + ds * torch.arange(k_all, dtype=torch.float64))
            sizes.append(k_all)
        cut = torch.cat(parts, 0)
        C = self.n_channels
        size_t = torch.tensor(sizes, dtype=torch.int64)
        return BagBatch(slices=cut[:, :C], labels=self.labels[vidx].to(self.device),
                        bag_index=torch.repeat_interleave(torch.arange(int(n_bags)), size_t),
                        volume_index=vidx, normals=normals, offsets=torch.cat(offsets), sizes=size_t,
                        aux=cut[:, C:] if self.n_aux else None)

    def mean_bag_size(self, *, bag_size: Optional[int] = None, slice_spacing: Optional[float] = None,
                      n_directions: int = 64) -> float:
        """Average number of slices in a bag of :meth:`sample_bags`, over every volume and ``n_directions``
        fixed near-uniform directions (deterministic; the sampler's random stream is not touched)."""
        dirs = fibonacci_directions(int(n_directions))
        total = 0.0
        for i in range(len(self.volumes)):
            ds = float(slice_spacing or self.pixel_spacing or min(self.spacings[i]))
            for n in dirs:
                lo, hi = self.body_extent(i, n)
                k = (hi - lo) / ds  # expected count over the random phase
                total += max(1.0, k) if bag_size is None else min(float(bag_size), max(1.0, k))
        return total / (len(self.volumes) * dirs.shape[0])

    def reseed(self, seed: int) -> None:
        """Restart the sampler's random stream from ``seed`` (what ``train_encoder(seed=...)`` does)."""
        self.generator.manual_seed(int(seed))

    def batches(self, batch_size: int, n_batches: Optional[int] = None) -> Iterator[SliceBatch]:
        """Yield ``n_batches`` batches (forever when ``None``)."""
        k = 0
        while n_batches is None or k < n_batches:
            yield self.sample(batch_size)
            k += 1
