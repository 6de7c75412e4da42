"""Synthetic subjects made from the MNI152 template that ships inside nilearn's wheel (no download).

:func:`load_template` reads nilearn's bundled ICBM152 2009a T1 template and its grey/white-matter maps at a
coarse resolution, crops them to the brain, and reorders the axes to the library's ``(D, H, W) = (z, y, x)``.
:func:`make_subject` turns the template into one "subject":

* anatomy: a random affine (rotation, anisotropic scale, translation) composed with a smooth elastic
  displacement field, applied by one trilinear resampling;
* lesions (positive subjects only): 1–3 irregular blobs (unions of 2–4 overlapping balls) centred in white
  matter, of radius ``lesion_radius`` mm, hyperintense (``lesion_contrast`` times the white matter intensity
  above it) or hypointense (``hypo_contrast`` below it: between grey matter and CSF), with a 1 mm soft edge;
  their masks are kept for evaluation only;
* acquisition: gamma contrast change, global gain, smooth multiplicative bias field, Gaussian noise, and
  for a share of subjects thick slices along a random axis (blur + decimate + linear upsample by 2),
  which mimics an anisotropic acquisition on the common grid.

The size matters for weak supervision: the smaller the lesions, the fewer oblique slices of a positive volume
cross one (with 3–9 mm lesions under a tenth), so the fewer slice labels are right; the demo mixes lesions of
6–10 mm and 12–18 mm radius, half of them darker than white matter (:func:`make_population`). Every subject
is drawn from ``numpy.random.default_rng((seed, index))``, so a subject does not depend on how many others
are made or in which order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Template", "Subject", "load_template", "make_subject", "make_population"]


@dataclass
class Template:
    """The MNI152 template on a cropped grid: arrays ``(D, H, W)`` float32 (z, y, x).

    Attributes:
        t1: T1 intensities (skull-stripped, 0 outside the brain).
        gm, wm: grey / white matter probability maps in [0, 1].
        brain: boolean brain mask (the T1 support, holes filled).
        affine: 4x4 voxel (i, j, k) → MNI mm matrix of the cropped grid, in NIfTI axis order (for ``save_nifti``).
        spacing: ``(sz, sy, sx)`` mm.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    spacing: Tuple[float, float, float]

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.t1.shape)


@dataclass
class Subject:
    """One synthetic subject on the template's grid.

    Attributes:
        image: ``(D, H, W)`` float32 T1-like image, brain median scaled to 1, background 0 + noise.
        lesion: ``(D, H, W)`` bool lesion mask (all False for a negative subject). Evaluation only.
        brain: ``(D, H, W)`` bool brain mask of this subject (after deformation).
        label: 1 with lesions, 0 without.
        affine, spacing: as the template's.
        lesion_centres: ``(L, 3)`` centres (mm, (x, y, z) from the volume centre), one per lesion.
        lesion_radii: ``(L,)`` radii (mm) of the blobs' main balls.
        thick_axis: axis (0 = z, 1 = y, 2 = x) along which thick slices were simulated, or ``None``.
        polarity: ``"hyper"`` or ``"hypo"`` (lesions brighter or darker than white matter), ``"none"`` for a
            negative subject.
    """

    image: np.ndarray
    lesion: np.ndarray
    brain: np.ndarray
    label: int
    affine: np.ndarray
    spacing: Tuple[float, float, float]
    lesion_centres: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    lesion_radii: np.ndarray = field(default_factory=lambda: np.zeros(0))
    thick_axis: Optional[int] = None
    polarity: str = "none"


def load_template(resolution: int = 3, margin: int = 2) -> Template:
    """nilearn's bundled MNI152 template, grey and white matter at ``resolution`` mm, cropped to the brain.

    The files are part of nilearn's wheel (``nilearn/datasets/data``); nothing is downloaded. ``margin``
    voxels of background are kept around the brain's bounding box.
    """
    try:
        from nilearn import datasets
    except ImportError as exc:  # the demo's only extra dependency
        raise ImportError("the demo needs nilearn (pip install nilearn), which ships the MNI152 template") from exc
    from scipy import ndimage

    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer number of mm, got {resolution!r}")
    imgs = [datasets.load_mni152_template(resolution=int(resolution)),
            datasets.load_mni152_gm_template(resolution=int(resolution)),
            datasets.load_mni152_wm_template(resolution=int(resolution))]
    # nibabel arrays are [i, j, k]; the library's (D, H, W) is [k, j, i] (as tonno_fast.load_nifti does).
    t1, gm, wm = (np.asarray(im.get_fdata(), dtype=np.float32).transpose(2, 1, 0) for im in imgs)
    affine = np.asarray(imgs[0].affine, dtype=np.float64)
    brain = ndimage.binary_fill_holes(t1 > 0.02 * t1.max())
    idx = np.argwhere(brain)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, brain.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    shift = np.eye(4)
    shift[:3, 3] = lo[::-1]  # (k, j, i) start → (i, j, k) translation in voxels
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
    return Template(t1[crop].copy(), np.clip(gm[crop], 0, 1), np.clip(wm[crop], 0, 1), brain[crop].copy(),
                    affine @ shift, spacing)


def _grid_mm(shape, spacing) -> torch.Tensor:
    """Physical coordinates ``(D, H, W, 3)`` (x, y, z) mm of every voxel, origin at the volume centre."""
    axes = [(torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def _smooth_field(rng: np.random.Generator, shape, control: int, channels: int) -> torch.Tensor:
    """A smooth random field ``(channels, D, H, W)``: standard normal values on a ``control³`` grid of control
    points, upsampled trilinearly (cubic-like smoothness is not needed at this resolution)."""
    coarse = torch.from_numpy(rng.standard_normal((1, channels, control, control, control)).astype(np.float32))
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0]


def _rotation(angles) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _thick_slices(img: torch.Tensor, axis: int, factor: int = 2) -> torch.Tensor:
    """Average ``factor`` neighbouring planes along ``axis`` and interpolate back: a thick-slice acquisition."""
    x = img[None, None]
    kernel = [1, 1, 1]
    kernel[axis] = factor
    low = F.avg_pool3d(x, kernel_size=kernel, stride=kernel, ceil_mode=True)
    return F.interpolate(low, size=tuple(img.shape), mode="trilinear", align_corners=False)[0, 0]


def make_subject(template: Template, seed: int, index: int, *, positive: bool,
                 n_lesions: Tuple[int, int] = (1, 3), lesion_radius: Tuple[float, float] = (12.0, 18.0),
                 lesion_contrast: Tuple[float, float] = (0.35, 0.6),
                 hypo_contrast: Tuple[float, float] = (0.6, 0.8), polarity: str = "hyper",
                 rotation_deg: float = 8.0,
                 scale: float = 0.06, translation_mm: float = 4.0, elastic_mm: float = 3.0,
                 bias: float = 0.15, noise: Tuple[float, float] = (0.02, 0.05), gamma: float = 0.2,
                 thick_prob: float = 0.3) -> Subject:
    """One subject (see the module docstring). Deterministic in ``(seed, index)``.

    Args:
        template: from :func:`load_template`.
        positive: add ``n_lesions`` (inclusive range) lesions.
        lesion_radius: range (mm) of each blob's main ball radius.
        lesion_contrast: range of a hyperintense lesion's intensity above white matter (0.5 = 50% brighter).
        hypo_contrast: range of a hypointense lesion's intensity below white matter (0.7 = 70% darker: between
            grey matter and CSF, like the T1 "black holes" of multiple sclerosis; intensity alone does not tell it
            from the sulci and ventricles). At 35–60% darker a lesion has the intensity of grey matter; the demo's
            CNN then stayed at chance on those lesions however long it trained (docs/training.md).
        polarity: ``"hyper"`` (brighter than white matter) or ``"hypo"`` (darker).
        rotation_deg, scale, translation_mm: ranges (±) of the random affine.
        elastic_mm: standard deviation of the elastic displacement at its control points (mm).
        bias: standard deviation of the log bias field; noise: range of the noise std (in white-matter units).
        gamma: range (±, in log) of the gamma contrast change; thick_prob: chance of thick slices.
    """
    if polarity not in ("hyper", "hypo"):
        raise ValueError(f"polarity must be 'hyper' or 'hypo', got {polarity!r}")
    rng = np.random.default_rng((int(seed), int(index)))
    shape, spacing = template.shape, template.spacing
    grid = _grid_mm(shape, spacing)  # (D, H, W, 3) x, y, z
    # Where each subject voxel reads the template: q = A p + t + u(p).
    A = _rotation(np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3))) @ np.diag(1 + rng.uniform(-scale, scale, 3))
    t = rng.uniform(-translation_mm, translation_mm, 3)
    q = grid @ torch.from_numpy(A.T.astype(np.float32)) + torch.from_numpy(t.astype(np.float32))
    q = q + elastic_mm * _smooth_field(rng, shape, 5, 3).permute(1, 2, 3, 0)
    # mm → grid_sample's normalised coordinates (align_corners=True: -1 and 1 are the first/last voxel centres).
    half = torch.tensor([(n - 1) / 2 * s for n, s in zip(shape[::-1], spacing[::-1])], dtype=torch.float32)
    norm = (q / half)[None]
    stack = torch.from_numpy(np.stack([template.t1, template.gm, template.wm,
                                       template.brain.astype(np.float32)]))[None]
    warped = F.grid_sample(stack, norm, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    t1, gm, wm, brain = warped[0], warped[1], warped[2], warped[3] > 0.5
    wm_level = float(torch.median(t1[wm > 0.9])) if bool((wm > 0.9).any()) else float(t1.max())

    lesion_occ = torch.zeros(shape)
    centres, radii = [], []
    if positive:
        k = int(rng.integers(n_lesions[0], n_lesions[1] + 1))
        cand = torch.nonzero((wm > 0.9) & brain)
        for _ in range(k):
            c = grid[tuple(cand[int(rng.integers(cand.shape[0]))])]
            r = float(rng.uniform(*lesion_radius))
            occ = torch.zeros(shape)
            for j in range(int(rng.integers(2, 5))):  # irregular: a union of overlapping balls
                cj = c if j == 0 else c + torch.from_numpy(rng.normal(0, r / 2.5, 3).astype(np.float32))
                rj = r if j == 0 else r * float(rng.uniform(0.45, 0.8))
                dist = (grid - cj).norm(dim=-1)
                occ = torch.maximum(occ, torch.sigmoid((rj - dist) / 1.0))
            contrast = float(rng.uniform(*(lesion_contrast if polarity == "hyper" else hypo_contrast)))
            lesion_occ = torch.maximum(lesion_occ, occ * brain)
            # Hyper- or hypointense lesion with a faint texture; replaces the tissue it occupies.
            texture = 1 + 0.08 * _smooth_field(rng, shape, 9, 1)[0]
            level = 1 + contrast if polarity == "hyper" else 1 - contrast
            t1 = t1 * (1 - occ * brain) + (occ * brain) * wm_level * level * texture
            centres.append(c.numpy())
            radii.append(r)
    lesion = (lesion_occ > 0.5) & brain

    img = t1 / max(wm_level, 1e-6)
    img = img.clamp(min=0) ** float(math.exp(rng.uniform(-gamma, gamma)))
    img = img * float(rng.uniform(0.85, 1.15)) * torch.exp(bias * _smooth_field(rng, shape, 3, 1)[0])
    thick = None
    if rng.uniform() < thick_prob:
        thick = int(rng.integers(3))
        img = _thick_slices(img, thick)
    img = img + float(rng.uniform(*noise)) * torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    # Scale by the brain's median, not a high percentile: lesions are the brightest voxels, so a percentile
    # would darken every positive subject as a whole and hand the encoder a global, non-local cue.
    level = float(torch.median(img[brain])) if bool(brain.any()) else 1.0
    img = img / max(level, 1e-6)
    return Subject(img.numpy().astype(np.float32), lesion.numpy(), brain.numpy(), int(positive),
                   template.affine.copy(), spacing, np.asarray(centres).reshape(-1, 3), np.asarray(radii), thick,
                   polarity if positive else "none")


def make_population(template: Template, n_subjects: int, seed: int, *, start: int = 0,
                    positive_fraction: float = 0.5, lesion_radius=(12.0, 18.0), hypointense_fraction: float = 0.0,
                    **kwargs) -> List[Subject]:
    """``n_subjects`` subjects with indices ``start, start+1, …``; the first ``round(n · fraction)`` of a
    seeded permutation are positive (so a population always has exactly that many positives).

    ``lesion_radius``: one range ``(lo, hi)`` mm, or several (e.g. ``((6, 10), (12, 18))``): the positives are
    dealt the ranges in turn (in a seeded order), so each range gets an equal share. ``hypointense_fraction``:
    share of the positives whose lesions are darker than white matter, taken within each size range (about
    ``round(n · fraction)`` of the ``n`` positives of a range), so that size and polarity are balanced.
    """
    n_pos = int(round(n_subjects * positive_fraction))
    rng = np.random.default_rng((int(seed), 10 ** 6 + int(start)))
    perm = rng.permutation(n_subjects)
    positive = np.zeros(n_subjects, dtype=bool)
    positive[perm[:n_pos]] = True
    ranges = [tuple(float(v) for v in lesion_radius)] if np.ndim(lesion_radius) == 1 else \
        [tuple(float(v) for v in r) for r in lesion_radius]
    if not ranges or any(len(r) != 2 or not 0 < r[0] <= r[1] for r in ranges):
        raise ValueError(f"lesion_radius must be a range (lo, hi) of mm or a sequence of them, got {lesion_radius!r}")
    if not 0.0 <= float(hypointense_fraction) <= 1.0:
        raise ValueError(f"hypointense_fraction must be in [0, 1], got {hypointense_fraction!r}")
    pos_idx = rng.permutation(np.flatnonzero(positive))
    size_of = {int(i): ranges[k % len(ranges)] for k, i in enumerate(pos_idx)}
    hypo = set()
    for r in range(len(ranges)):
        members = pos_idx[r::len(ranges)]
        hypo |= {int(i) for i in members[:int(round(len(members) * float(hypointense_fraction)))]}
    return [make_subject(template, seed, start + i, positive=bool(positive[i]),
                         lesion_radius=size_of.get(i, ranges[0]), polarity="hypo" if i in hypo else "hyper",
                         **kwargs)
            for i in range(n_subjects)]
