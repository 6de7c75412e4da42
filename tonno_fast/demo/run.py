"""The weakly-supervised demo, end to end (``make demo``, ``python -m tonno_fast.demo``, ``tonno-fast demo``).

1. Subjects from nilearn's bundled MNI152 template (:mod:`tonno_fast.demo.data`): a training population
   and held-out subjects, half of them with tumour-sized synthetic lesions whose masks are never shown to
   the encoder.
2. A small 2D CNN (:mod:`tonno_fast.demo.model`) trained on random oblique slices labelled with their
   volume's label only (:class:`~tonno_fast.sampler.ObliqueSliceSampler`, BCE), on the CPU, seeded.
3. The encoder's held-out slice accuracy / AUC, and the share of positive-volume slices that cross a lesion
   (the label noise of weak supervision).
4. On held-out positive subjects, heatmaps by every method: slice-wise 2D GradCAM and LayerCAM (the
   baselines of the ToNNO paper), ToNNO, Averaged CAM, Tomographic CAM, and the oracle (ToNNO of the plane
   integrals of the true lesion mask: the ceiling the reconstruction allows).
5. Dice inside the brain mask at the best threshold (needs the ground truth; an upper bound) and at a
   ground-truth-free threshold (top 1% of brain voxels), NIfTI heatmaps with the subject's affine, PNG
   overlays, and ``results.md`` / ``results.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..evaluation import evaluate_heatmaps
from ..io import save_nifti
from ..pipeline import encode_slices
from ..geometry import make_geometry
from ..ops import filtered_backprojection, radon
from ..sampler import ObliqueSliceSampler
from ..training import evaluate_encoder, roc_auc, train_encoder
from .data import Subject, load_template, make_population
from .model import TARGET_LAYER, SliceCNN

__all__ = ["DemoConfig", "FULL", "QUICK", "run_demo", "main"]


@dataclass(frozen=True)
class DemoConfig:
    """Everything that sets the demo's size. Lengths in mm."""

    resolution: int = 3            # template resolution (mm): 54×65×52 voxels at 3 mm
    n_train: int = 32              # training subjects (half positive)
    n_test: int = 12               # held-out subjects
    test_positive_fraction: float = 2 / 3  # 8 positives of 12: the Dice table is over these
    slice_size: int = 64           # encoder input (pixels) ...
    pixel_spacing: float = 3.0     # ... at this spacing: a 192 mm field of view covers every brain slice
    n_slices: int = 64             # slices per direction for the heatmaps (Δs = pixel_spacing)
    n_directions: int = 64         # ToNNO directions
    cam_directions: int = 64       # Averaged / Tomographic CAM directions (each slice needs a backward pass)
    widths: Sequence[int] = (8, 16, 32, 64)
    steps: int = 300               # optimiser steps
    batch_size: int = 64
    lr: float = 1e-3
    volumes_per_batch: int = 8
    eval_slices: int = 2048
    quantile: float = 0.99         # ground-truth-free threshold: keep the top 1% of brain voxels
    seed: int = 0
    png_subjects: int = 3          # overlays for the first few held-out positives


FULL = DemoConfig()
# The smoke version: 6 mm, 32-pixel slices, few directions; still trains an encoder that finds the lesions.
QUICK = DemoConfig(resolution=6, n_train=16, n_test=4, test_positive_fraction=0.5, slice_size=32,
                   pixel_spacing=6.0, n_slices=32, n_directions=16, cam_directions=8, steps=150, batch_size=32,
                   volumes_per_batch=4, eval_slices=256, quantile=0.95, png_subjects=1)

ORACLE = "Oracle (true plane integrals)"
# Rows of the table: (name, file name, directions field of the config or None for axial slices).
ROWS = (
    ("2D GradCAM (axial)", "gradcam2d", None),
    ("2D LayerCAM (axial)", "layercam2d", None),
    ("ToNNO (ramp2, exact inverse)", "tonno", "n_directions"),
    ("ToNNO (ramp2 + Hann window)", "tonno_hann", "n_directions"),
    ("Averaged CAM (GradCAM)", "averaged_gradcam", "cam_directions"),
    ("Tomographic CAM (GradCAM)", "tomographic_gradcam", "cam_directions"),
    ("Tomographic CAM (LayerCAM)", "tomographic_layercam", "cam_directions"),
    (ORACLE, "oracle", "n_directions"),
)
METHODS = tuple(r[0] for r in ROWS)
_FILE_NAMES = {r[0]: r[1] for r in ROWS}
# The filter study: ToNNO's sinogram reconstructed with every filter (cheap: the encoder runs once).
FILTER_STUDY = (("ramp2", None), ("ramp2", "hann"), ("ramp2", "shepp-logan"), ("laplacian", None), ("ramp", None),
                ("ramp", "hann"), ("none", None))


def _log(msg: str) -> None:
    print(msg, flush=True)


def _sampler(subjects: List[Subject], cfg: DemoConfig, seed: int) -> ObliqueSliceSampler:
    return ObliqueSliceSampler(
        [torch.from_numpy(s.image) for s in subjects], [s.label for s in subjects],
        spacing=subjects[0].spacing, slice_size=cfg.slice_size, pixel_spacing=cfg.pixel_spacing,
        body_masks=[s.brain for s in subjects], aux=[torch.from_numpy(s.lesion).float()[None] for s in subjects],
        volumes_per_batch=cfg.volumes_per_batch, balance=True, seed=seed)


def _centred(n: int, size: int):
    """``(src, dst)`` slices that put an axis of length ``n`` centred into one of length ``size`` (cropping
    the ends when ``n > size``, padding when ``n < size``)."""
    o = (size - n) // 2
    k = min(n, size)
    return slice(max(0, -o), max(0, -o) + k), slice(max(0, o), max(0, o) + k)


def _pad_in_plane(vol: torch.Tensor, size: int) -> torch.Tensor:
    """Centre ``(D, H, W)`` in a ``(D, size, size)`` box (zero padding, or cropping of background margin), so
    an axial image shows the encoder what it was trained on: ``size`` pixels at the volume's own spacing."""
    D, H, W = vol.shape
    (sh, dh), (sw, dw) = _centred(H, size), _centred(W, size)
    out = torch.zeros(D, size, size, dtype=vol.dtype)
    out[:, dh, dw] = vol[:, sh, sw]
    return out


def _unpad_in_plane(cam: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`_pad_in_plane` (zeros where the volume was cropped)."""
    D, H, W = shape
    size = cam.shape[-1]
    (sh, dh), (sw, dw) = _centred(H, size), _centred(W, size)
    out = torch.zeros(D, H, W, dtype=cam.dtype)
    out[:, sh, sw] = cam[:, dh, dw]
    return out


def _heatmaps(subject: Subject, model: SliceCNN, cfg: DemoConfig, timings: Dict[str, float]) -> Dict[str, torch.Tensor]:
    """All methods' heatmaps ``(D, H, W)`` for one subject with lesions; only ToNNO for one without (its
    sinogram gives the volume-level score). ``"_sinogram"`` holds ToNNO's slice logits ``(N, S)``."""
    from .. import averaged_cam, slicewise_cam, tomographic_cam

    vol = torch.from_numpy(subject.image)
    sp = subject.spacing
    geo_kw = dict(slice_size=cfg.slice_size, pixel_spacing=cfg.pixel_spacing, slice_spacing=cfg.pixel_spacing,
                  n_slices=cfg.n_slices, spacing=sp)
    layer = [dict(model.named_modules())[TARGET_LAYER]]
    out: Dict[str, torch.Tensor] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out[name] = fn().float()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0

    # ToNNO through its two public steps (encode_slices + filtered_backprojection): the sinogram is reused
    # for the filter study and gives a volume-level score.
    geom = make_geometry(tuple(vol.shape), n_directions=cfg.n_directions, **geo_kw)
    t0 = time.perf_counter()
    sino = encode_slices(vol[None, None], geom, model)
    t_enc = time.perf_counter() - t0
    for name, window in ((METHODS[2], None), (METHODS[3], "hann")):
        t0 = time.perf_counter()
        out[name] = filtered_backprojection(sino, geom, filter="ramp2", window=window)[0, 0].float()
        timings[name] = timings.get(name, 0.0) + t_enc + time.perf_counter() - t0
    out["_sinogram"] = sino[0, 0]
    if not subject.label:
        return out
    for filt, window in FILTER_STUDY:
        out[f"_filter:{filt}:{window}"] = filtered_backprojection(sino, geom, filter=filt, window=window)[0, 0].float()

    # Baselines: the 2D CAM of every axial slice, shown at the training pixel size (no resizing).
    if abs(sp[1] - cfg.pixel_spacing) < 1e-6 and abs(sp[2] - cfg.pixel_spacing) < 1e-6:
        padded = _pad_in_plane(vol, cfg.slice_size)
        for name, method in (("2D GradCAM (axial)", "gradcam"), ("2D LayerCAM (axial)", "layercam")):
            timed(name, lambda: _unpad_in_plane(slicewise_cam(padded, model, target_layers=layer, method=method,
                                                              slice_size=cfg.slice_size), vol.shape))
    else:  # a grid whose spacing differs from the encoder's: let slicewise_cam resize each axial image
        for name, method in (("2D GradCAM (axial)", "gradcam"), ("2D LayerCAM (axial)", "layercam")):
            timed(name, lambda: slicewise_cam(vol, model, target_layers=layer, method=method,
                                              slice_size=cfg.slice_size))

    timed(METHODS[4], lambda: averaged_cam(vol, model, target_layers=layer, method="gradcam",
                                           n_directions=cfg.cam_directions, **geo_kw))
    for name, method in ((METHODS[5], "gradcam"), (METHODS[6], "layercam")):
        timed(name, lambda: tomographic_cam(vol, model, target_layers=layer, method=method,
                                            n_directions=cfg.cam_directions, **geo_kw))
    # The ceiling: an oracle "encoder" whose score is the plane integral of the true lesion mask.
    t0 = time.perf_counter()
    lesion = torch.from_numpy(subject.lesion.astype(np.float32))[None, None]
    oracle_sino = radon(lesion, geom)
    out[ORACLE] = filtered_backprojection(oracle_sino, geom)[0, 0].float()
    # How plane-integral-like is the encoder? ToNNO's exact inverse assumes score = a · integral + b.
    out["_plane_integral_r"] = torch.corrcoef(torch.stack([sino.reshape(-1), oracle_sino.reshape(-1)]))[0, 1]
    timings[ORACLE] = timings.get(ORACLE, 0.0) + time.perf_counter() - t0
    return out


def _volume_score(sinogram: torch.Tensor) -> float:
    """Volume-level score from ToNNO's slice logits: the mean of the top 5% (a lesion lights up a few slices
    of every direction; the mean over all slices would dilute it)."""
    s = sinogram.reshape(-1)
    k = max(1, int(0.05 * s.numel()))
    return float(s.topk(k).values.mean())


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def _table(results: Dict, cfg: DemoConfig, enc: Dict, extra: Dict) -> str:
    q = f"q{cfg.quantile:g}"
    lines = [
        f"Held-out subjects: {extra['n_test_positive']} with lesions (Dice is over these), "
        f"{extra['n_test'] - extra['n_test_positive']} without. Encoder trained on {cfg.n_train} subjects "
        f"({cfg.steps} steps × {cfg.batch_size} random oblique slices, volume labels only, "
        f"{extra['train_seconds']:.0f} s on {extra['threads']} CPU threads).",
        "",
        f"Encoder on {enc['n_slices']} held-out random oblique slices: accuracy {enc['accuracy']:.3f}, "
        f"AUC {enc['auc']:.3f} (AUC {enc['auc_lesion_slices']:.3f} for slices that cross a lesion vs "
        f"slices of lesion-free subjects); {100 * enc['lesion_fraction']:.0f}% of the slices of a positive "
        f"subject cross a lesion (the rest carry a wrong label). Volume-level AUC (top-5% ToNNO slice "
        f"logits): {extra['volume_auc']:.3f}. Pearson correlation of the encoder's slice logits with the true "
        f"plane integrals of the lesions (what ToNNO's exact inverse assumes, up to an affine map): "
        f"r = {extra['plane_integral_r']:.2f} (mean over the subjects with lesions).",
        "",
        f"| method | directions | Dice, best threshold | Dice, top {100 * (1 - cfg.quantile):g}% of brain | "
        f"Dice, Otsu | IoU, best | s / subject |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in METHODS:
        if name not in results:
            continue
        r = results[name]
        m, s = r["mean"], r["std"]
        field = next(r[2] for r in ROWS if r[0] == name)
        dirs = "axial" if field is None else getattr(cfg, field)
        lines.append(f"| {name} | {dirs} | {_fmt(m['best']['dice'], s['best']['dice'])} | "
                     f"{_fmt(m[q]['dice'], s[q]['dice'])} | {_fmt(m['otsu']['dice'], s['otsu']['dice'])} | "
                     f"{m['best']['iou']:.3f} | {r['seconds']:.2f} |")
    lines += ["", "Dice is computed inside the brain mask. The best threshold is chosen with the ground truth (an "
              "upper bound on what a heatmap gives); the other two columns choose it from the heatmap alone. "
              "s / subject: wall time of the method on this machine (ToNNO rows include scoring the slices)."]
    if "filters" in extra:
        lines += ["", f"ToNNO's sinogram ({cfg.n_directions} directions) reconstructed with each filter "
                      "(one encoder pass; chosen after seeing these held-out subjects, so read it as a study, "
                      "not as a tuned result):", "",
                  "| filter | window | Dice, best threshold | Dice, top "
                  f"{100 * (1 - cfg.quantile):g}% of brain |", "|---|---|---|---|"]
        for (filt, window), r in extra["filters"].items():
            lines.append(f"| {filt} | {window or '-'} | {_fmt(r['mean']['best']['dice'], r['std']['best']['dice'])} "
                         f"| {_fmt(r['mean'][q]['dice'], r['std'][q]['dice'])} |")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig = FULL, out_dir: Path = Path("demo_output"), progress: bool = True) -> Dict:
    """Run the whole demo with ``cfg``, write everything under ``out_dir`` and return the results dict.

    Seeds torch's and NumPy's global generators with ``cfg.seed`` and runs with deterministic algorithms
    (the previous setting is restored afterwards)."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _run_demo(cfg, Path(out_dir), progress)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _run_demo(cfg: DemoConfig, out_dir: Path, progress: bool) -> Dict:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)

    _log(f"[1/5] subjects from the MNI152 template bundled with nilearn, {cfg.resolution} mm")
    t0 = time.perf_counter()
    template = load_template(cfg.resolution)
    train = make_population(template, cfg.n_train, cfg.seed)
    test = make_population(template, cfg.n_test, cfg.seed, start=10_000,
                           positive_fraction=cfg.test_positive_fraction)
    _log(f"      {cfg.n_train} training + {cfg.n_test} held-out subjects of {template.shape} voxels "
         f"({time.perf_counter() - t0:.1f} s)")

    _log("[2/5] training the slice encoder on random oblique slices (volume labels only)")
    model = SliceCNN(widths=cfg.widths)
    train_sampler = _sampler(train, cfg, cfg.seed + 1)
    t0 = time.perf_counter()
    history = train_encoder(model, train_sampler, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                            progress=progress, log_every=max(1, cfg.steps // 10))
    train_seconds = time.perf_counter() - t0
    torch.save(model.state_dict(), out_dir / "encoder.pt")
    with warnings.catch_warnings():  # TorchScript is flagged deprecated in recent torch; still what the CLI loads
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(str(out_dir / "encoder_torchscript.pt"))

    _log("[3/5] held-out slice accuracy")
    enc = evaluate_encoder(model, _sampler(test, cfg, cfg.seed + 2), n_slices=cfg.eval_slices)
    _log(f"      accuracy {enc['accuracy']:.3f}, AUC {enc['auc']:.3f}, "
         f"{100 * enc['lesion_fraction']:.0f}% of positive-subject slices cross a lesion")

    _log("[4/5] heatmaps of held-out subjects")
    heat_dir, png_dir = out_dir / "heatmaps", out_dir / "png"
    per_method: Dict[str, List[torch.Tensor]] = {m: [] for m in METHODS}
    per_filter: Dict[tuple, List[torch.Tensor]] = {f: [] for f in FILTER_STUDY}
    masks, brains, positives, vol_scores, vol_labels, corr = [], [], [], [], [], []
    timings: Dict[str, float] = {}
    items = test
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(test, desc="held-out subjects", unit="subject")
    for i, subj in enumerate(items):
        maps = _heatmaps(subj, model, cfg, timings)
        vol_scores.append(_volume_score(maps.pop("_sinogram")))
        vol_labels.append(subj.label)
        if "_plane_integral_r" in maps:
            corr.append(float(maps.pop("_plane_integral_r")))
        for filt, window in FILTER_STUDY:
            key = f"_filter:{filt}:{window}"
            if key in maps:
                per_filter[(filt, window)].append(maps.pop(key))
        save_nifti(heat_dir / f"subject{i:02d}_image.nii.gz", subj.image, subj.affine)
        for name, h in maps.items():
            save_nifti(heat_dir / f"subject{i:02d}_{_FILE_NAMES[name]}.nii.gz", h, subj.affine)
        if subj.label:
            save_nifti(heat_dir / f"subject{i:02d}_lesion_mask.nii.gz", subj.lesion.astype(np.float32), subj.affine)
            for name in METHODS:
                per_method[name].append(maps[name])
            masks.append(subj.lesion)
            brains.append(subj.brain)
            positives.append(i)
            if len(positives) <= cfg.png_subjects:
                from ..viz import overlay_png
                # Through the centre of the largest lesion.
                c = subj.lesion_centres[int(np.argmax(subj.lesion_radii))]
                D, H, W = subj.image.shape
                sz, sy, sx = subj.spacing
                centre = (int(round(c[2] / sz + (D - 1) / 2)), int(round(c[1] / sy + (H - 1) / 2)),
                          int(round(c[0] / sx + (W - 1) / 2)))
                centre = tuple(int(np.clip(v, 0, n - 1)) for v, n in zip(centre, (D, H, W)))
                overlay_png(png_dir / f"subject{i:02d}.png", subj.image, {m: maps[m] for m in METHODS},
                            spacing=subj.spacing, centre=centre, mask=subj.lesion, body_mask=subj.brain,
                            title=f"held-out subject {i}: heatmaps (red = high), true lesion in green")

    _log("[5/5] Dice against the lesion masks (inside the brain)")
    results = {}
    n_pos = len(positives)
    for name in METHODS:
        ev = evaluate_heatmaps(per_method[name], masks, body_masks=brains, quantiles=(cfg.quantile,))
        ev["seconds"] = timings.get(name, 0.0) / max(1, len(test) if name.startswith("ToNNO") else n_pos)
        results[name] = ev
    filters = {f: evaluate_heatmaps(per_filter[f], masks, body_masks=brains, quantiles=(cfg.quantile,), otsu=False)
               for f in FILTER_STUDY}
    volume_auc = roc_auc(vol_scores, vol_labels) if 0 < sum(vol_labels) < len(vol_labels) else float("nan")
    extra = {"n_test": len(test), "n_test_positive": n_pos, "train_seconds": train_seconds,
             "threads": torch.get_num_threads(), "volume_auc": volume_auc, "filters": filters,
             "plane_integral_r": float(np.mean(corr)) if corr else float("nan")}
    table = _table(results, cfg, enc, extra)
    total = time.perf_counter() - t_start
    md = ["# tonno_fast demo: weakly-supervised lesion heatmaps on MNI152-derived subjects", "", table, "",
          f"Total run time {total:.0f} s ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"seed {cfg.seed}).", ""]
    (out_dir / "results.md").write_text("\n".join(md))
    payload = {"config": dataclasses.asdict(cfg), "encoder": enc, "training_history": history,
               "volume_auc": volume_auc, "plane_integral_r": extra["plane_integral_r"],
               "train_seconds": train_seconds, "total_seconds": total,
               "test_positive_subjects": positives,
               "methods": {name: {"mean": r["mean"], "std": r["std"], "seconds_per_subject": r["seconds"],
                                  "per_subject": r["per_volume"]} for name, r in results.items()},
               "tonno_filter_study": [{"filter": f, "window": w, "mean": r["mean"], "std": r["std"]}
                                      for (f, w), r in filters.items()]}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2, default=float))
    print()
    print(table)
    print(f"\nwrote {out_dir}/results.md, results.json, heatmaps/*.nii.gz, png/*.png, encoder.pt, encoder_torchscript.pt "
          f"({total:.0f} s in all)")
    return payload


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tonno_fast.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke version (under a minute)")
    p.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: the same numbers on every machine, and on a shared "
                        "2-core machine 1 thread measured 3-4x faster than 2 for these small convolutions)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be a positive integer, got {args.threads}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    try:
        run_demo(cfg, Path(args.out), progress=not args.no_progress)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (tests, the CLI)
    return 0


if __name__ == "__main__":
    sys.exit(main())
