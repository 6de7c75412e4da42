"""The weakly-supervised demo, end to end (``make demo``, ``python -m tonno_fast.demo``, ``tonno-fast demo``).

1. Subjects from nilearn's bundled MNI152 template (:mod:`tonno_fast.demo.data`): a training population, a
   validation split of it (to watch training and keep the best weights; never the test subjects), and held-out
   test subjects. Half of the subjects have lesions, of two sizes (radius 6–10 mm and 12–18 mm) and two
   polarities (half brighter, half darker than white matter); their masks are never shown to the encoder.
2. A small 2D CNN (:mod:`tonno_fast.demo.model`) trained on random oblique slices labelled with their
   volume's label only, with both objectives of :func:`~tonno_fast.train_encoder` — per-slice BCE and
   multiple-instance (bag) BCE — each with several training seeds, on the CPU. Each encoder is saved as an
   encoder bundle (weights + the slice geometry it was trained on) and the heatmaps are computed from the
   bundle, as a user would.
3. The encoders' held-out slice AUC, overall and for lesion-crossing slices, and the training curves.
4. On held-out subjects with lesions, heatmaps by every method: two no-model baselines on the raw intensities,
   slice-wise 2D GradCAM and LayerCAM (the baselines of the ToNNO paper), ToNNO, Averaged CAM, Tomographic CAM,
   and the oracle (ToNNO of the plane integrals of the true lesion mask: the ceiling of the reconstruction).
5. Dice inside the brain mask at the best threshold (needs the ground truth; an upper bound) and at a
   ground-truth-free threshold (top 1% of brain voxels), as mean ± std over the training seeds; NIfTI heatmaps
   with the subject's affine and PNG overlays (first seed of the bag objective), ``results.md`` /
   ``results.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..allocator import retain_freed_memory_unless_disabled
from ..bundle import load_encoder, save_encoder
from ..evaluation import evaluate_heatmaps
from ..geometry import Geometry, make_geometry
from ..io import save_nifti
from ..ops import filtered_backprojection, radon
from ..pipeline import encode_slices
from ..sampler import ObliqueSliceSampler
from ..training import evaluate_encoder, train_encoder
from .data import Subject, Template, load_template, make_population
from .model import TARGET_LAYER, SliceCNN

__all__ = ["DemoConfig", "FULL", "QUICK", "run_demo", "main", "population", "subject_geometry", "STARTS",
           "SELECTION"]


@dataclass(frozen=True)
class DemoConfig:
    """Everything that sets the demo's size. Lengths in mm."""

    resolution: int = 3            # template resolution (mm): 54×65×52 voxels at 3 mm
    n_train: int = 128             # training subjects (half positive; fewer let the bag objective overfit)
    n_val: int = 8                 # validation subjects (training population, not test): curves, best weights
    n_test: int = 12               # held-out test subjects
    test_positive_fraction: float = 2 / 3  # 8 positives of 12: the Dice table is over these
    lesion_radius: Tuple[Tuple[float, float], ...] = ((6.0, 10.0), (12.0, 18.0))  # dealt in turn to positives
    hypointense_fraction: float = 0.5
    slice_size: int = 64           # encoder input (pixels) ...
    pixel_spacing: float = 3.0     # ... at this spacing: a 192 mm field of view covers every brain slice
    n_slices: int = 64             # slices per direction for the heatmaps (Δs = pixel_spacing)
    n_directions: int = 32         # ToNNO directions
    cam_directions: int = 16       # Averaged / Tomographic CAM directions (each slice needs a backward pass)
    widths: Sequence[int] = (8, 16, 32, 64)
    norm: str = "batch"            # the CNN's normalisation layers (see docs/training.md)
    objectives: Tuple[str, ...] = ("bag", "slice")
    seeds: int = 3                 # training seeds per objective
    steps: int = 400               # optimiser steps per training run
    batch_size: int = 64           # slices per step, for both objectives
    lr: float = 1e-3
    # mm between the slices of a bag. What decides whether the bag objective learns is how many bags (volume labels)
    # a step of 64 slices sees: at 9 mm (~19 slices, 3 bags per step) the loss stayed at ln 2 for 200 steps in 3 of
    # 3 seeds; at 12 mm (~4.5 bags) it left it in 3 of 3; at 15 mm (~6 bags) with r = 2 below, 400 steps reached a
    # lesion-crossing AUC of 0.90 / 0.92 / 0.90 (seeds 0 / 1 / 2, subjects of the training population;
    # docs/training.md). Lesions of radius >= 6 mm are
    # >= 12 mm thick: now and then a bag of a positive volume misses a thin one (a wrong bag label).
    bag_spacing: float = 15.0
    pooling: str = "lse"
    # Bag pooling sharpness: r = 2 measured better than 5 (seed 2, 300 steps: 0.85 against 0.83, and a validation
    # loss of 0.16 at step 200 against 0.30): a softer maximum passes gradient to more slices of a bag.
    pooling_r: float = 2.0
    flip: float = 0.0              # share of training slices shown with inverted intensities (x → -x)
    in_plane_rotation: float = 0.0  # radians; 0: the heatmap geometry's own slice frames (see _sampler)
    # Validation number that picks the weights kept, per objective. Bag objective: the validation bag loss; the
    # bag AUC of 32 bags saturates near 0.97 within 100 steps and then picks early weights (docs/training.md).
    monitor: Tuple[Tuple[str, str], ...] = (("bag", "loss"), ("slice", "auc"))
    volumes_per_batch: int = 8
    validate_every: int = 100
    validation_bags: int = 32
    eval_slices: int = 2048
    quantile: float = 0.99         # ground-truth-free threshold: keep the top 1% of brain voxels
    seed: int = 0                  # subjects; training seeds are seed, seed + 1, ...
    png_subjects: int = 3          # overlays for the first few held-out positives


FULL = DemoConfig()
# The smoke version: 6 mm, 32-pixel slices, few directions, two seeds of few steps; only the larger lesions (at
# 6 mm a lesion of 6 mm radius is a voxel or two).
QUICK = DemoConfig(resolution=6, n_train=16, n_val=4, n_test=4, test_positive_fraction=0.5, slice_size=32,
                   lesion_radius=((12.0, 18.0),),
                   pixel_spacing=6.0, n_slices=32, n_directions=16, cam_directions=8, steps=150, batch_size=32,
                   bag_spacing=12.0, seeds=2, validate_every=50, validation_bags=8, volumes_per_batch=4,
                   eval_slices=256, quantile=0.95, png_subjects=1)


#: Where each part of the demo's subjects starts in the generator (``make_population(start=...)``); the parts are
#: disjoint. "selection" (16 subjects from 7000) is for choosing settings (ToNNO's filter, the few-view study's
#: reconstruction) on the training population, never on the test subjects.
STARTS = {"train": 0, "validation": 5_000, "selection": 7_000, "test": 10_000}
SELECTION = 16


def population(template: Template, cfg: DemoConfig, part: str) -> List[Subject]:
    """The demo's subjects of ``part``: ``"train"`` (``cfg.n_train``), ``"validation"`` (``cfg.n_val``),
    ``"selection"`` (:data:`SELECTION`) or ``"test"`` (``cfg.n_test``, a ``cfg.test_positive_fraction`` of them
    with lesions), made from ``template`` (:func:`load_template` at ``cfg.resolution``) with ``cfg.seed``."""
    if part not in STARTS:
        raise ValueError(f"part must be one of {tuple(STARTS)}, got {part!r}")
    n = {"train": cfg.n_train, "validation": cfg.n_val, "selection": SELECTION, "test": cfg.n_test}[part]
    extra = dict(positive_fraction=cfg.test_positive_fraction) if part == "test" else {}
    return make_population(template, n, cfg.seed, start=STARTS[part], lesion_radius=cfg.lesion_radius,
                           hypointense_fraction=cfg.hypointense_fraction, **extra)


def subject_geometry(subject: Subject, cfg: DemoConfig, n_directions: int) -> Geometry:
    """How the demo slices ``subject`` for its heatmaps: ``n_directions`` directions, ``cfg.n_slices`` slices of
    ``cfg.slice_size`` pixels, pixels and slices ``cfg.pixel_spacing`` mm apart (the encoder's training
    geometry)."""
    return make_geometry(tuple(subject.image.shape), spacing=subject.spacing, n_directions=n_directions,
                         slice_size=cfg.slice_size, pixel_spacing=cfg.pixel_spacing,
                         slice_spacing=cfg.pixel_spacing, n_slices=cfg.n_slices)


ORACLE = "Oracle (true plane integrals)"
RAW = "Raw intensity (no model)"
RAW_ABS = "Raw |intensity − brain median| (no model)"
GRADCAM_2D, LAYERCAM_2D = "2D GradCAM (axial)", "2D LayerCAM (axial)"
AVERAGED_CAM = "Averaged CAM (GradCAM)"
TOMOGRAPHIC_GRADCAM, TOMOGRAPHIC_LAYERCAM = "Tomographic CAM (GradCAM)", "Tomographic CAM (LayerCAM)"
# ToNNO rows: name -> (filter, window) of filtered_backprojection, all from one sinogram. The last one was chosen on
# subjects of the training population (16 subjects from index 7,000, 8 with lesions; never the test subjects), with
# the demo's encoders at 32 directions: Dice at the best threshold, bag seeds 0 / 1 / 2 and slice seed 0:
# ramp + Hann 0.714 / 0.718 / 0.777 / 0.705, ramp + Hamming the same within 0.002, plain backprojection 0.698 /
# 0.706 / 0.706 / 0.684, ramp2 + Hann 0.581 / 0.574 / 0.651 / 0.607, ramp2 (the exact inverse) 0.38–0.42. A
# classifier's score saturates with the lesion's cross-section instead of growing with it, and the exact inverse's
# second derivative turns that into rims; the first-order ramp sharpens less (docs/training.md).
TONNO_FILTERS = {
    "ToNNO (ramp2, exact inverse)": ("ramp2", None),
    "ToNNO (ramp2 + Hann window)": ("ramp2", "hann"),
    "ToNNO (ramp + Hann window, chosen on training subjects)": ("ramp", "hann"),
}
_TONNO_FILES = ("tonno", "tonno_hann", "tonno_ramp_hann")
# Rows of the table: (name, file name, directions field of the config, or None for axial / no slicing).
ROWS = (
    (RAW, "raw", None),
    (RAW_ABS, "raw_abs", None),
    (GRADCAM_2D, "gradcam2d", None),
    (LAYERCAM_2D, "layercam2d", None),
    *((name, file, "n_directions") for name, file in zip(TONNO_FILTERS, _TONNO_FILES)),
    (AVERAGED_CAM, "averaged_gradcam", "cam_directions"),
    (TOMOGRAPHIC_GRADCAM, "tomographic_gradcam", "cam_directions"),
    (TOMOGRAPHIC_LAYERCAM, "tomographic_layercam", "cam_directions"),
    (ORACLE, "oracle", "n_directions"),
)
METHODS = tuple(r[0] for r in ROWS)
BASELINES = (RAW, RAW_ABS)
TOMOGRAPHIC = tuple(TONNO_FILTERS) + (AVERAGED_CAM, TOMOGRAPHIC_GRADCAM, TOMOGRAPHIC_LAYERCAM)
_FILE_NAMES = {r[0]: r[1] for r in ROWS}
# The filter study: ToNNO's sinogram reconstructed with every filter (cheap: the encoder runs once).
FILTER_STUDY = (("ramp2", None), ("ramp2", "hann"), ("ramp2", "shepp-logan"), ("laplacian", None), ("ramp", None),
                ("ramp", "hann"), ("none", None))


def _log(msg: str) -> None:
    print(msg, flush=True)


def _sampler(subjects: List[Subject], cfg: DemoConfig, seed: int, lesions: bool = True) -> ObliqueSliceSampler:
    # No random in-plane rotation: each slice keeps the in-plane frame that the heatmap geometry gives its normal
    # (frames_from_directions), so the encoder learns the slices it will score, not every rotation of them.
    # Measured (bag objective, seed 0): lesion-crossing AUC 0.82 against 0.77 with rotations up to ±π, and on
    # hypointense lesions 0.78 against 0.60 (docs/training.md).
    # lesions: slice the lesion masks too (aux), for the lesion-crossing AUCs of validation and evaluation; the
    # training sampler does without (half of its slicing). The images' slices are the same either way: every
    # channel is sampled with the same taps.
    return ObliqueSliceSampler(
        [torch.from_numpy(s.image) for s in subjects], [s.label for s in subjects],
        spacing=subjects[0].spacing, slice_size=cfg.slice_size, pixel_spacing=cfg.pixel_spacing,
        body_masks=[s.brain for s in subjects],
        aux=[torch.from_numpy(s.lesion) for s in subjects] if lesions else None,
        volumes_per_batch=cfg.volumes_per_batch, balance=True, seed=seed, in_plane_rotation=cfg.in_plane_rotation)


def _model_kwargs(cfg: DemoConfig) -> Dict:
    return {"widths": tuple(int(w) for w in cfg.widths), "norm": cfg.norm}


def _flip(share: float):
    """Augmentation: show a random ``share`` of the slices with inverted intensities (``x → -x``), so that a
    lesion darker than its surroundings looks like one brighter than them (see docs/training.md)."""
    if share <= 0:
        return None

    def transform(x: torch.Tensor) -> torch.Tensor:
        sign = torch.where(torch.rand(x.shape[0], 1, 1, 1) < share, -1.0, 1.0).to(x)
        return x * sign
    return transform


def _train(cfg: DemoConfig, objective: str, seed: int, train_sampler, val_sampler, path: Path, progress: bool):
    """One training run; the encoder is written as a bundle to ``path``. Returns (history, seconds)."""
    kwargs = _model_kwargs(cfg)
    t0 = time.perf_counter()
    hist = train_encoder(lambda: SliceCNN(**kwargs), train_sampler, steps=cfg.steps, batch_size=cfg.batch_size,
                         objective=objective, bag_spacing=cfg.bag_spacing, pooling=cfg.pooling,
                         pooling_r=cfg.pooling_r, lr=cfg.lr, transform=_flip(cfg.flip), seed=seed,
                         validation=val_sampler, validate_every=cfg.validate_every,
                         validation_size=cfg.validation_bags, progress=progress,
                         log_every=cfg.validate_every, monitor=dict(cfg.monitor).get(objective))
    seconds = time.perf_counter() - t0
    save_encoder(path, hist.encoder, slice_size=cfg.slice_size, pixel_spacing=cfg.pixel_spacing,
                 factory="tonno_fast.demo.model:SliceCNN", factory_kwargs=kwargs,
                 metadata={"objective": objective, "seed": seed, "steps": hist.steps, "best": hist.best,
                           "train_seconds": seconds})
    return hist, seconds


def _no_model_heatmaps(subject: Subject) -> Dict[str, torch.Tensor]:
    """The baselines without a model: the image itself (bright lesions), and its distance from the brain's
    median intensity (bright or dark lesions, but also every tissue far from the median)."""
    img = torch.from_numpy(subject.image)
    median = float(np.median(subject.image[subject.brain]))
    return {RAW: img.clone(), RAW_ABS: (img - median).abs()}


def _heatmaps(subject: Subject, encoder, cfg: DemoConfig, timings: Dict[str, float],
              oracle: bool) -> Dict[str, torch.Tensor]:
    """All learned methods' heatmaps ``(D, H, W)`` for one subject with lesions (``"_filter:..."``: ToNNO's
    sinogram through each filter of the study). ``encoder``: an :class:`~tonno_fast.Encoder` from a bundle:
    every pipeline slices at its training geometry (64 px at 3 mm) without being told."""
    from .. import averaged_cam, slicewise_cam, tomographic_cam

    vol = torch.from_numpy(subject.image)
    sp = subject.spacing
    geom = subject_geometry(subject, cfg, cfg.n_directions)
    cam_geom = subject_geometry(subject, cfg, cfg.cam_directions)
    layer = [dict(encoder.model.named_modules())[TARGET_LAYER]]
    out: Dict[str, torch.Tensor] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out[name] = fn().float()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0

    # ToNNO through its two public steps (encode_slices + filtered_backprojection): the sinogram is reused
    # for the filter study and gives a volume-level score.
    t0 = time.perf_counter()
    sino = encode_slices(vol[None, None], geom, encoder)
    t_enc = time.perf_counter() - t0
    for name, (filt, window) in TONNO_FILTERS.items():
        t0 = time.perf_counter()
        out[name] = filtered_backprojection(sino, geom, filter=filt, window=window)[0, 0].float()
        timings[name] = timings.get(name, 0.0) + t_enc + time.perf_counter() - t0
    for filt, window in FILTER_STUDY:
        out[f"_filter:{filt}:{window}"] = filtered_backprojection(sino, geom, filter=filt, window=window)[0, 0].float()

    # The 2D baselines: the CAM of every axial image, shown at the bundle's field of view (64 px at 3 mm).
    for name, method in ((GRADCAM_2D, "gradcam"), (LAYERCAM_2D, "layercam")):
        timed(name, lambda: slicewise_cam(vol, encoder, target_layers=layer, method=method, spacing=sp))
    timed(AVERAGED_CAM, lambda: averaged_cam(vol, encoder, target_layers=layer, geometry=cam_geom))
    for name, method in ((TOMOGRAPHIC_GRADCAM, "gradcam"), (TOMOGRAPHIC_LAYERCAM, "layercam")):
        timed(name, lambda: tomographic_cam(vol, encoder, target_layers=layer, method=method, geometry=cam_geom))
    lesion = torch.from_numpy(subject.lesion.astype(np.float32))[None, None]
    t0 = time.perf_counter()
    oracle_sino = radon(lesion, geom)
    if oracle:  # the ceiling: an "encoder" whose score is the plane integral of the true lesion mask
        out[ORACLE] = filtered_backprojection(oracle_sino, geom)[0, 0].float()
        timings[ORACLE] = timings.get(ORACLE, 0.0) + time.perf_counter() - t0
    # How plane-integral-like is the encoder? ToNNO's exact inverse assumes score = a · integral + b.
    out["_plane_integral_r"] = torch.corrcoef(torch.stack([sino.reshape(-1), oracle_sino.reshape(-1)]))[0, 1]
    return out


def _fmt(values: Sequence[float]) -> str:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 1:
        return f"{v[0]:.3f}"
    return f"{v.mean():.3f} ± {v.std():.3f}"


def _evaluate_run(cfg: DemoConfig, encoder, test: List[Subject], heat_dir: Optional[Path], png_dir: Optional[Path],
                  progress: bool, label: str) -> Dict:
    """Heatmaps of every test subject with lesions with one encoder; Dice per method, per lesion group, the
    filter study and the plane-integral correlation. Writes NIfTI/PNG when the dirs are given."""
    per_method: Dict[str, List[torch.Tensor]] = {m: [] for m in METHODS}
    per_filter: Dict[tuple, List[torch.Tensor]] = {f: [] for f in FILTER_STUDY}
    masks, brains, groups, corr = [], [], [], []
    timings: Dict[str, float] = {}
    items = [(i, s) for i, s in enumerate(test) if s.label]
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc=f"held-out subjects with lesions ({label})", unit="subject")
    for i, subj in items:
        maps = _heatmaps(subj, encoder, cfg, timings, oracle=heat_dir is not None)
        if "_plane_integral_r" in maps:
            corr.append(float(maps.pop("_plane_integral_r")))
        for filt, window in FILTER_STUDY:
            key = f"_filter:{filt}:{window}"
            if key in maps:
                per_filter[(filt, window)].append(maps.pop(key))
        maps.update(_no_model_heatmaps(subj))
        for name in METHODS:
            if name in maps:
                per_method[name].append(maps[name])
        masks.append(subj.lesion)
        brains.append(subj.brain)
        size = "small" if float(np.max(subj.lesion_radii)) < 11 else "large"
        groups.append((subj.polarity, size))
        if heat_dir is not None:
            save_nifti(heat_dir / f"subject{i:02d}_image.nii.gz", subj.image, subj.affine)
            save_nifti(heat_dir / f"subject{i:02d}_lesion_mask.nii.gz", subj.lesion.astype(np.float32), subj.affine)
            for name, h in maps.items():
                save_nifti(heat_dir / f"subject{i:02d}_{_FILE_NAMES[name]}.nii.gz", h, subj.affine)
        if png_dir is not None and len(masks) <= cfg.png_subjects:
            from ..viz import overlay_png
            c = subj.lesion_centres[int(np.argmax(subj.lesion_radii))]  # through the largest lesion's centre
            D, H, W = subj.image.shape
            sz, sy, sx = subj.spacing
            centre = (int(round(c[2] / sz + (D - 1) / 2)), int(round(c[1] / sy + (H - 1) / 2)),
                      int(round(c[0] / sx + (W - 1) / 2)))
            centre = tuple(int(np.clip(v, 0, n - 1)) for v, n in zip(centre, (D, H, W)))
            shown = {m: maps[m] for m in METHODS if m in maps and m not in BASELINES}
            overlay_png(png_dir / f"subject{i:02d}.png", subj.image, shown, spacing=subj.spacing, centre=centre,
                        mask=subj.lesion, body_mask=subj.brain,
                        title=f"held-out subject {i} ({subj.polarity}intense lesions): heatmaps (red = high), "
                              f"true lesion in green")
    n_pos = len(masks)
    methods = {}
    for name in METHODS:
        if not per_method[name]:
            continue
        ev = evaluate_heatmaps(per_method[name], masks, body_masks=brains, quantiles=(cfg.quantile,))
        ev["seconds"] = timings.get(name, 0.0) / max(1, n_pos)
        ev["groups"] = {f"{p}/{s}": float(np.mean([r["best"]["dice"] for r, g in zip(ev["per_volume"], groups)
                                                   if g == (p, s)]))
                        for p in ("hyper", "hypo") for s in ("small", "large") if (p, s) in groups}
        methods[name] = ev
    filters = {f: evaluate_heatmaps(per_filter[f], masks, body_masks=brains, quantiles=(cfg.quantile,), otsu=False)
               for f in FILTER_STUDY}
    return {"methods": methods, "filters": filters, "groups": groups,
            "plane_integral_r": float(np.mean(corr)) if corr else float("nan")}


def _curves(histories: Dict[str, List], cfg: DemoConfig) -> List[str]:
    """Markdown table of the training curves: per validation step, the training loss (running mean) and the
    validation AUCs, mean ± std over seeds, for each objective."""
    lines = ["| step | " + " | ".join(f"{o}: train loss | {o}: val slice AUC | {o}: val bag AUC | "
                                      f"{o}: val lesion AUC" for o in histories) + " |",
             "|---|" + "---|---|---|---|" * len(histories)]
    steps = sorted({v["step"] for hs in histories.values() for h in hs for v in h.validation})
    for step in steps:
        cells = []
        for obj, hs in histories.items():
            loss = [h2["loss"] for h in hs for h2 in h if h2["step"] == step]
            vals = [v for h in hs for v in h.validation if v["step"] == step]
            cells.append(_fmt(loss) if loss else "-")
            for key in ("auc", "bag_auc", "lesion_auc"):
                got = [v[key] for v in vals if key in v and np.isfinite(v[key])]
                cells.append(_fmt(got) if got else "-")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


_MONITOR_NAMES = {"loss": "(lowest) validation bag loss", "bag_auc": "validation bag AUC",
                  "auc": "validation slice AUC"}


def _report(cfg: DemoConfig, runs: Dict, extra: Dict) -> str:
    q = f"q{cfg.quantile:g}"
    objs = list(runs)
    first = runs[objs[0]][0]
    n_pos = len(first["eval"]["groups"])
    lines = [
        f"Held-out test subjects: {n_pos} with lesions (Dice is over these; lesion radius "
        f"{' and '.join(f'{a:g}–{b:g}' for a, b in cfg.lesion_radius)} mm, "
        f"{100 * cfg.hypointense_fraction:.0f}% of them darker than white matter), {extra['n_test'] - n_pos} "
        f"without. Encoders trained on {cfg.n_train} subjects with volume labels only, validated on {cfg.n_val} "
        f"others of the training population; {cfg.steps} steps × {cfg.batch_size} oblique slices "
        f"(bag objective: bags of parallel slices {cfg.bag_spacing:g} mm apart, {cfg.pooling} pooling, "
        f"r = {cfg.pooling_r:g}), {cfg.seeds} training seeds per objective, {extra['threads']} CPU thread(s).",
        "",
        "## Encoders on held-out test slices",
        "",
        "| objective | seed | train s | best step | slice AUC | lesion-crossing slice AUC | hyperintense | "
        "hypointense | plane-integral r |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for obj in objs:
        for run in runs[obj]:
            e = run["encoder"]
            lines.append(f"| {obj} | {run['seed']} | {run['train_seconds']:.0f} | {run['best_step']} | "
                         f"{e['auc']:.3f} | {e['auc_lesion_slices']:.3f} | {e['auc_hyper']:.3f} | "
                         f"{e['auc_hypo']:.3f} | {run['eval']['plane_integral_r']:.2f} |")
    lines += ["", f"Lesion-crossing slice AUC: slices that cross a lesion against slices of lesion-free subjects "
                  f"({extra['lesion_fraction'] * 100:.0f}% of the slices of a subject with lesions cross one; the "
                  f"rest carry a wrong label for the per-slice objective). Hyper/hypointense: the same AUC with the "
                  f"positives restricted to subjects whose lesions are brighter / darker than white matter. "
                  f"Plane-integral r: correlation of ToNNO's slice logits with the true plane integrals of the "
                  f"lesion masks (ToNNO's exact inverse assumes an affine relation).", ""]
    for obj in objs:
        lines += [f"## Dice, {obj} objective (mean ± std over {len(runs[obj])} seeds)", "",
                  f"| method | directions | Dice, best threshold | per seed | Dice, top "
                  f"{100 * (1 - cfg.quantile):g}% of brain | Dice, Otsu | hyper small / large | hypo small / large |"
                  f" s / subject |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, _, field in ROWS:
            res = [run["eval"]["methods"].get(name) or runs[objs[0]][0]["eval"]["methods"].get(name)
                   for run in runs[obj]]
            if res[0] is None:
                continue
            best = [r["mean"]["best"]["dice"] for r in res]
            g = res[0]["groups"]
            grp = lambda p: " / ".join(f"{np.mean([r['groups'][f'{p}/{s}'] for r in res]):.2f}"  # noqa: E731
                                       if f"{p}/{s}" in g else "-" for s in ("small", "large"))
            dirs = "axial" if name in (GRADCAM_2D, LAYERCAM_2D) else ("-" if field is None else getattr(cfg, field))
            lines.append(f"| {name} | {dirs} | {_fmt(best)} | {', '.join(f'{b:.2f}' for b in best)} | "
                         f"{_fmt([r['mean'][q]['dice'] for r in res])} | "
                         f"{_fmt([r['mean']['otsu']['dice'] for r in res])} | {grp('hyper')} | {grp('hypo')} | "
                         f"{np.mean([r['seconds'] for r in res]):.2f} |")
        lines += [""]
        checks = []
        for run in runs[obj]:
            m = run["eval"]["methods"]
            dice = {n: m[n]["mean"]["best"]["dice"] for n in m}
            raw = max(runs[objs[0]][0]["eval"]["methods"][n]["mean"]["best"]["dice"] for n in BASELINES)
            top = max(TOMOGRAPHIC, key=lambda n: dice[n])
            checks.append(f"seed {run['seed']}: best tomographic {top} {dice[top]:.3f} = "
                          f"{dice[top] / max(dice[GRADCAM_2D], 1e-9):.2f}× 2D GradCAM ({dice[GRADCAM_2D]:.3f}), "
                          f"{dice[top] - raw:+.3f} against the best no-model baseline ({raw:.3f})")
        lines += ["Per seed: " + "; ".join(checks) + ".", ""]
    lines += ["Dice is computed inside the brain mask. The best threshold is chosen with the ground truth (an upper "
              "bound on what a heatmap gives); the other columns choose it from the heatmap alone. The no-model and "
              "oracle rows do not depend on the encoder. s / subject: wall time of the method here (ToNNO rows "
              "include scoring the slices).", "", "## Training curves (validation subjects)", ""]
    lines += _curves({obj: [run["history"] for run in runs[obj]] for obj in objs}, cfg)
    lines += ["", "Train loss: running mean of the last steps' loss (bag objective: bag BCE; slice objective: slice "
                  "BCE; both ln 2 = 0.693 at chance). Validation on bags of the validation subjects: slice AUC "
                  "(every slice against its volume label), bag AUC (pooled bag logits), lesion AUC (lesion-crossing "
                  "slices against slices of lesion-free subjects; reported only, never used to choose weights). "
                  "The weights kept are those of the best " + " / ".join(
                      f"{_MONITOR_NAMES.get(m, m)} ({o} objective)" for o, m in cfg.monitor if o in objs) + "."]
    filt = runs[objs[0]]
    lines += ["", f"ToNNO's sinogram ({cfg.n_directions} directions, {objs[0]} objective) reconstructed with each "
                  "filter (one encoder pass; a study on the test subjects, not a tuned result):", "",
              f"| filter | window | Dice, best threshold | Dice, top {100 * (1 - cfg.quantile):g}% of brain |",
              "|---|---|---|---|"]
    for f in FILTER_STUDY:
        rs = [run["eval"]["filters"][f] for run in filt]
        lines.append(f"| {f[0]} | {f[1] or '-'} | {_fmt([r['mean']['best']['dice'] for r in rs])} | "
                     f"{_fmt([r['mean'][q]['dice'] for r in rs])} |")
    return "\n".join(lines)


def _one_run(cfg: DemoConfig, obj: str, k: int, pops, out_dir: Path, progress: bool) -> Dict:
    """Training run ``k`` of objective ``obj`` (seed ``cfg.seed + k``), its bundle, its encoder's held-out AUCs and
    the heatmaps of the test subjects with lesions. Depends only on its arguments (not on the runs before it),
    so the runs can go to worker processes in any order and give the same numbers."""
    train, val, test = pops
    seed = cfg.seed + k
    torch.manual_seed(cfg.seed * 1000 + 100 * cfg.objectives.index(obj) + k)
    tag = f"{obj}, seed {seed}"
    path = out_dir / "encoders" / f"{obj}_seed{seed}.pt"
    hist, seconds = _train(cfg, obj, seed, _sampler(train, cfg, cfg.seed + 1, lesions=False),
                           _sampler(val, cfg, cfg.seed + 2), path, progress)
    # The heatmaps use the bundle, as a user would (64 slices per call: measured faster than 256 on one CPU
    # thread for this CNN, 1.03 s against 1.28 s for 512 slices).
    encoder = load_encoder(path, batch_size=64)
    hyper = [s for s in test if s.polarity in ("hyper", "none")]
    hypo = [s for s in test if s.polarity in ("hypo", "none")]
    enc = evaluate_encoder(encoder.model, _sampler(test, cfg, cfg.seed + 3), n_slices=cfg.eval_slices)
    for key, group in (("auc_hyper", hyper), ("auc_hypo", hypo)):  # NaN when the test set has no such lesions
        enc[key] = evaluate_encoder(encoder.model, _sampler(group, cfg, cfg.seed + 4),
                                    n_slices=cfg.eval_slices // 2)["auc_lesion_slices"] \
            if any(s.label for s in group) else float("nan")
    _log(f"      ({tag}) trained in {seconds:.0f} s; held-out slice AUC {enc['auc']:.3f}, lesion-crossing slices "
         f"{enc['auc_lesion_slices']:.3f} (hyperintense {enc['auc_hyper']:.3f}, hypointense "
         f"{enc['auc_hypo']:.3f}); best validation step {hist.best['step'] if hist.best else '-'}")
    first = obj == cfg.objectives[0] and k == 0
    t0 = time.perf_counter()
    ev = _evaluate_run(cfg, encoder, test, out_dir / "heatmaps" if first else None,
                       out_dir / "png" if first else None, progress, tag)
    _log(f"      ({tag}) heatmaps of {len(ev['groups'])} held-out subjects in {time.perf_counter() - t0:.0f} s")
    return {"seed": seed, "history": hist, "train_seconds": seconds, "encoder": enc, "eval": ev,
            "best_step": hist.best["step"] if hist.best else hist.steps}


_WORKER_POPULATIONS = None


def _worker_start(path: str, threads: int) -> None:
    global _WORKER_POPULATIONS
    retain_freed_memory_unless_disabled()  # a spawned process starts with glibc's defaults
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    _WORKER_POPULATIONS = torch.load(path, weights_only=False)  # the demo's own file, written just before


def _worker_run(cfg: DemoConfig, obj: str, k: int, out_dir: str) -> Dict:
    run = _one_run(cfg, obj, k, _WORKER_POPULATIONS, Path(out_dir), False)
    # The trained encoder is in its bundle on disk; send back plain numbers only (a module's tensors would travel
    # as shared-memory handles passed over a local socket).
    run["history"].encoder = None
    return run


def _run_parallel(cfg: DemoConfig, jobs, pops, out_dir: Path, workers: int) -> Dict:
    """The runs on ``workers`` processes (spawned: no threads are forked), each with as many torch threads as
    this process. The subjects travel once per worker through a file in ``out_dir`` (removed afterwards)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    path = out_dir / ".subjects.pt"
    torch.save(pops, path)
    try:
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_start,
                                    initargs=(str(path), torch.get_num_threads())) as pool:
            futures = {job: pool.submit(_worker_run, cfg, job[0], job[1], str(out_dir)) for job in jobs}
            return {job: f.result() for job, f in futures.items()}
    finally:
        path.unlink(missing_ok=True)


def run_demo(cfg: DemoConfig = FULL, out_dir: Path = Path("demo_output"), progress: bool = True,
             workers: int = 1) -> Dict:
    """Run the whole demo with ``cfg``, write everything under ``out_dir`` and return the results dict.

    ``workers``: processes that share the training runs (each run, with its heatmaps, in one process; the numbers
    do not depend on how many). Each uses ``torch.get_num_threads()`` threads.

    Seeds torch's and NumPy's global generators with ``cfg.seed`` and runs with deterministic algorithms
    (the previous setting is restored afterwards)."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _run_demo(cfg, Path(out_dir), progress, workers)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _run_demo(cfg: DemoConfig, out_dir: Path, progress: bool, workers: int) -> Dict:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "encoders").mkdir(exist_ok=True)

    _log(f"[1/4] subjects from the MNI152 template bundled with nilearn, {cfg.resolution} mm")
    t0 = time.perf_counter()
    template = load_template(cfg.resolution)
    train, val, test = (population(template, cfg, part) for part in ("train", "validation", "test"))
    _log(f"      {cfg.n_train} training + {cfg.n_val} validation + {cfg.n_test} test subjects of "
         f"{template.shape} voxels ({time.perf_counter() - t0:.1f} s)")

    jobs = [(obj, k) for obj in cfg.objectives for k in range(cfg.seeds)]
    workers = max(1, min(int(workers), len(jobs)))
    _log(f"[2/4] {len(jobs)} training runs ({', '.join(cfg.objectives)} objectives × {cfg.seeds} seeds), each "
         f"followed by [3/4] heatmaps of the held-out subjects; {workers} worker process(es) × "
         f"{torch.get_num_threads()} thread(s)")
    pops = (train, val, test)
    done: Dict[Tuple[str, int], Dict] = {}
    if workers == 1:
        for obj, k in jobs:
            done[(obj, k)] = _one_run(cfg, obj, k, pops, out_dir, progress)
    else:
        done = _run_parallel(cfg, jobs, pops, out_dir, workers)
    runs: Dict[str, List[Dict]] = {obj: [done[(obj, k)] for k in range(cfg.seeds)] for obj in cfg.objectives}
    lesion_fraction = runs[cfg.objectives[0]][0]["encoder"]["lesion_fraction"]
    # encoder.pt: the first bag-objective bundle, for `tonno-fast heatmap --encoder demo_output/encoder.pt`.
    first_obj = cfg.objectives[0]
    (out_dir / "encoder.pt").write_bytes((out_dir / "encoders" / f"{first_obj}_seed{cfg.seed}.pt").read_bytes())

    _log("[4/4] Dice against the lesion masks (inside the brain)")
    extra = {"n_test": len(test), "threads": torch.get_num_threads(), "lesion_fraction": lesion_fraction}
    report = _report(cfg, runs, extra)
    total = time.perf_counter() - t_start
    md = ["# tonno_fast demo: weakly-supervised lesion heatmaps on MNI152-derived subjects", "", report, "",
          f"Total run time {total:.0f} s ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"seed {cfg.seed}).", ""]
    (out_dir / "results.md").write_text("\n".join(md))
    _plot_curves(runs, out_dir / "training_curves.png")
    first_eval = runs[first_obj][0]["eval"]
    payload = {"config": dataclasses.asdict(cfg), "total_seconds": total,
               "encoder": runs[first_obj][0]["encoder"], "plane_integral_r": first_eval["plane_integral_r"],
               "methods": {name: {"mean": r["mean"], "std": r["std"], "seconds_per_subject": r["seconds"],
                                  "per_subject": r["per_volume"], "groups": r["groups"]}
                           for name, r in first_eval["methods"].items()},
               "runs": {obj: [{"seed": run["seed"], "train_seconds": run["train_seconds"],
                               "best_step": run["best_step"], "encoder": run["encoder"],
                               "plane_integral_r": run["eval"]["plane_integral_r"],
                               "dice_best": {n: r["mean"]["best"]["dice"] for n, r in run["eval"]["methods"].items()},
                               "dice_groups": {n: r["groups"] for n, r in run["eval"]["methods"].items()},
                               "training_history": list(run["history"]), "validation": run["history"].validation,
                               "warnings": run["history"].warnings}
                              for run in rs] for obj, rs in runs.items()},
               "tonno_filter_study": [{"filter": f, "window": w, "mean": r["mean"], "std": r["std"]}
                                      for (f, w), r in first_eval["filters"].items()]}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2, default=float))
    print()
    print(report)
    print(f"\nwrote {out_dir}/results.md, results.json, training_curves.png, heatmaps/*.nii.gz, png/*.png, "
          f"encoder.pt and encoders/*.pt (bundles) ({total:.0f} s in all)")
    return payload


def _plot_curves(runs: Dict, path: Path) -> None:
    """Training loss and validation AUCs against steps, one colour per objective, one line per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for c, (obj, rs) in zip(("tab:red", "tab:blue", "tab:green"), runs.items()):
        for i, run in enumerate(rs):
            h, v = run["history"], run["history"].validation
            kw = dict(color=c, alpha=0.8, label=obj if i == 0 else None)
            axes[0].plot([r["step"] for r in h], [r["loss"] for r in h], **kw)
            axes[1].plot([r["step"] for r in v], [r["auc"] for r in v], **kw)
            axes[2].plot([r["step"] for r in v], [r.get("lesion_auc", np.nan) for r in v], **kw)
    axes[0].axhline(np.log(2), color="grey", ls=":", lw=1)
    for ax, title in zip(axes, ("training loss (ln 2 dotted)", "validation slice AUC (volume labels)",
                                "validation lesion-crossing AUC")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    import os
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tonno_fast.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke version (under a minute)")
    p.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the subjects and the first training "
                   "run (default 0)")
    p.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    p.add_argument("--seeds", type=int, default=None, help="override the number of training seeds per objective")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: the same numbers on every machine, and on a shared "
                        "2-core machine 1 thread measured 3-4x faster than 2 for these small convolutions)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes sharing the training runs (default: one per CPU core available, at most one per "
                        "run; each with --threads threads). The results do not depend on it.")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be a positive integer, got {args.threads}")
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be a positive integer, got {args.workers}")
    workers = args.workers or max(1, _cpu_count() // args.threads)
    retain_freed_memory_unless_disabled()  # tonno_fast.allocator: training and heatmaps allocate batch after batch
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.seeds is not None:
        cfg = dataclasses.replace(cfg, seeds=args.seeds)
    try:
        run_demo(cfg, Path(args.out), progress=not args.no_progress, workers=workers)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (tests, the CLI)
    return 0


if __name__ == "__main__":
    sys.exit(main())
