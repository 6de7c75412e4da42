"""Few-view reconstruction study: FBP against the iterative solvers of tonno_fast.reconstruct.

    .venv/bin/python benchmarks/reconstruction_study.py             # everything (about 20 min on 1 busy core)
    .venv/bin/python benchmarks/reconstruction_study.py identity    # error vs directions on the identity phantom
    .venv/bin/python benchmarks/reconstruction_study.py settings    # FISTA's tv / iterations / start at 16 dirs
    .venv/bin/python benchmarks/reconstruction_study.py cost        # loop cost vs one encoder pass, 64³
    .venv/bin/python benchmarks/reconstruction_study.py solvers     # FISTA against a Chambolle–Pock prototype
    .venv/bin/python benchmarks/reconstruction_study.py demo --encoder ENCODER.pt  # Dice on the demo's subjects (40 min)

Every part prints a Markdown table (and ``--json FILE`` saves the numbers). Runs single-threaded by default
(``--threads``): on a shared 2-core machine two OpenMP threads contending with other jobs made elementwise
torch ops 400× slower, and the demo's encoder runs on one thread too.

:func:`dice_study` is the same comparison on real encoder scores with ground-truth masks: give it, per
subject, the sinograms of the same volume at several direction counts with their geometries, and the masks.

The ``demo`` part runs it on the demo's subjects and a trained encoder bundle (``make demo`` writes them;
nilearn needed): the reconstruction settings are chosen on *selection* subjects (the demo's generator, indices
7000–7015, disjoint from its training, validation and test subjects), at 16 directions, by mean Dice at the
best threshold; then every method is reported on the demo's held-out *test* subjects with lesions at 8, 16, 32
and 64 directions. Each subject is scored once per direction count; all methods reconstruct those sinograms.
``demo`` is not part of the default run (it needs ``--encoder``; on a busy 2-core machine the selection and the test
took about 20 min each; ``--chosen`` skips the selection, ``--selection-only`` the test).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

import tonno_fast as tf
from tonno_fast import reconstruction as R
from tonno_fast.evaluation import evaluate_heatmaps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import PHANTOM_BLOBS, gaussian_blobs  # noqa: E402  (the master-identity phantom of the tests)

DIRECTIONS = (8, 16, 32, 64)

# name -> (method, keyword arguments of tonno_fast.reconstruct). The iterative rows use 50 iterations.
METHODS: Dict[str, tuple] = {
    "FBP ramp2": ("fbp", {}),
    "FBP ramp2 + Hann": ("fbp", dict(window="hann")),
    "SIRT (nonneg)": ("sirt", {}),
    "CGLS": ("cgls", {}),
    "FISTA (nonneg), tv 0": ("fista", dict(tv=0.0)),
    "FISTA (nonneg, tv 1e-3: the defaults)": ("fista", {}),
    "FISTA defaults, backproject adjoint": ("fista", dict(adjoint="backproject")),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def sum_encoder(pixel_area: float):
    """The identity encoder: a slice's pixel sum times the pixel area is its plane integral."""
    return lambda x: x.sum(dim=(-3, -2, -1)) * pixel_area


def identity_sinograms(directions: Sequence[int] = DIRECTIONS, size: int = 48):
    """The master-identity phantom (three Gaussian blobs, ``size``³ at 1 mm) and, per direction count, its
    sinogram scored by the sum encoder: ``{n: (sinogram, geometry, slices scored, seconds)}``."""
    vol = gaussian_blobs((size,) * 3, blobs=PHANTOM_BLOBS).float()[None, None]
    out = {}
    for n in directions:
        g = tf.make_geometry(vol.shape[2:], n_directions=n)
        sino, secs = _timed(lambda: tf.encode_slices(vol, g, sum_encoder(g.pixel_area)))
        out[n] = (sino, g, n * g.n_slices, secs)
    return vol, out


def identity_study(directions: Sequence[int] = DIRECTIONS, methods: Dict[str, tuple] = METHODS) -> List[Dict]:
    """Relative L2 error of every method against the phantom, wall time and encoder calls, per direction count."""
    vol, sinos = identity_sinograms(directions)
    rows = []
    for n, (sino, g, calls, enc_s) in sinos.items():
        for name, (method, kw) in methods.items():
            heat, secs = _timed(lambda: tf.reconstruct(sino, g, method, **kw))
            rows.append(dict(directions=n, method=name, rel_error=_rel(heat, vol), seconds=secs,
                             encoder_calls=calls, encoding_seconds=enc_s))
            print(f"  {n:3d} dirs  {name:38s} error {rows[-1]['rel_error']:.3f}  {secs:6.2f} s", flush=True)
    return rows


def settings_study(n_directions: int = 16) -> List[Dict]:
    """FISTA's settings at one direction count: TV weight, iterations, start, adjoint, inner TV iterations."""
    vol, sinos = identity_sinograms((n_directions,))
    sino, g, _, _ = sinos[n_directions]
    grid = [dict(tv=tv) for tv in (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2)]
    grid += [dict(iterations=it) for it in (10, 25, 100)]  # with the default tv from here on
    grid += [dict(x0="zeros"), dict(window="hann"), dict(tv_iterations=5), dict(tv_iterations=10),
             dict(adjoint="backproject")]
    rows = []
    for kw in grid:
        heat, secs = _timed(lambda: tf.reconstruct(sino, g, "fista", **kw))
        rows.append(dict(directions=n_directions, settings=kw, rel_error=_rel(heat, vol), seconds=secs))
        print(f"  fista {kw}: error {rows[-1]['rel_error']:.3f}  {secs:.2f} s", flush=True)
    return rows


def cost_study(size: int = 64, n_directions: int = 16, iterations: int = 50, repeats: int = 3) -> Dict:
    """One encoder pass of the demo's SliceCNN over every slice against the reconstructions (median of
    ``repeats``, interleaved so that load changes hit all alike)."""
    from tonno_fast.demo.model import SliceCNN

    torch.manual_seed(0)
    vol = torch.rand(1, 1, size, size, size)
    g = tf.make_geometry((size,) * 3, n_directions=n_directions)
    model = SliceCNN().eval()
    sino = tf.encode_slices(vol, g, model)  # warm-up, and the scores the solvers reconstruct
    R.plane_transform_norm(g)  # the cached step size (a second heatmap of the same geometry reuses it)
    cases = {
        "encoder pass (SliceCNN, slicing included)": lambda: tf.encode_slices(vol, g, model),
        "FBP ramp2": lambda: tf.reconstruct(sino, g),
        "SIRT": lambda: tf.reconstruct(sino, g, "sirt", iterations=iterations),
        "CGLS": lambda: tf.reconstruct(sino, g, "cgls", iterations=iterations),
        "FISTA, tv 0": lambda: tf.reconstruct(sino, g, "fista", iterations=iterations, tv=0.0),
        "FISTA (defaults: nonneg, tv 1e-3)": lambda: tf.reconstruct(sino, g, "fista", iterations=iterations),
        "FISTA, backproject adjoint": lambda: tf.reconstruct(sino, g, "fista", iterations=iterations,
                                                             adjoint="backproject"),
        "SIRT, backproject adjoint": lambda: tf.reconstruct(sino, g, "sirt", iterations=iterations,
                                                            adjoint="backproject"),
    }
    times = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(_timed(fn)[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    enc = med["encoder pass (SliceCNN, slicing included)"]
    for k, v in med.items():
        print(f"  {k:45s} {v:7.2f} s   {v / enc:5.2f} × encoder pass", flush=True)
    # One operator pair, to split an iteration's cost.
    op = R.PlaneTransform(g, (1, 1))
    x = torch.rand(op.shape)
    pair = {"radon": lambda: op.forward(x), "radon adjoint (exact)": lambda: op.weighted_adjoint(sino),
            "backproject": lambda: tf.backproject(sino, g)}
    pair_t = {k: statistics.median(_timed(f)[1] for _ in range(repeats)) for k, f in pair.items()}
    for k, v in pair_t.items():
        print(f"  {k:45s} {v * 1e3:7.1f} ms", flush=True)
    return dict(size=size, directions=n_directions, slices=n_directions * g.n_slices, iterations=iterations,
                threads=torch.get_num_threads(), median_seconds=med, operator_ms={k: v * 1e3 for k, v in pair_t.items()})


def chambolle_pock(op: R.PlaneTransform, p: torch.Tensor, lam: float, iterations: int, balance: float):
    """Prototype Chambolle–Pock (PDHG) for ``½‖Ax − p‖²_W + λ TV(x)``, ``x ≥ 0``: used only to measure the choice
    of FISTA. ``balance`` sets the primal step ``τ = balance / √L``; dual steps ``σ_A = 1/(2τL)``,
    ``σ_∇ = 1/(2τ‖∇‖²)``, so that ``τ(σ_A L + σ_∇ ‖∇‖²) ≤ 1``."""
    sp = op.geometry.spacing
    L = float(R.plane_transform_norm(op.geometry, dtype=p.dtype)) * 1.01
    G = 4.0 * sum(1.0 / h ** 2 for h in sp)
    tau = balance / math.sqrt(L)
    s_a, s_g = 1.0 / (2 * tau * L), 1.0 / (2 * tau * G)
    x = torch.zeros(op.shape, dtype=p.dtype)
    xb, y = x.clone(), torch.zeros_like(p)
    z = torch.zeros(op.shape[:2] + (3,) + op.shape[2:], dtype=p.dtype)
    for _ in range(iterations):
        y = (y + s_a * (op.forward(xb) - p)) / (1 + s_a / op.weights)
        z = z + s_g * R._grad(xb, sp)
        z = z / ((z * z).sum(-4, keepdim=True).sqrt() / lam).clamp_min(1.0)
        xn = (x - tau * (op.weighted_adjoint(y / op.weights) + R._grad_adjoint(z, sp))).clamp_min(0)
        xb, x = 2 * xn - x, xn
    return x


def solver_study(n_directions: int = 16, tv: float = 1e-3, iterations: int = 50) -> List[Dict]:
    """FISTA against Chambolle–Pock on the same objective, same number of operator-pair applications."""
    vol, sinos = identity_sinograms((n_directions,))
    sino, g, _, _ = sinos[n_directions]
    op = R.PlaneTransform(g, dtype=sino.dtype)
    lam = tv * min(g.spacing) * float(op.weighted_adjoint(sino).abs().max())

    def objective(x):
        r = op.forward(x) - sino
        tvx = (R._grad(x, g.spacing) ** 2).sum(-4).sqrt().sum()
        return float(0.5 * (op.weights * r * r).sum() + lam * tvx)

    rows = []
    for tvi in (2, 5, 10):
        x, secs = _timed(lambda: tf.reconstruct(sino, g, "fista", x0="zeros", tv=tv, tv_iterations=tvi,
                                                iterations=iterations))
        rows.append(dict(solver=f"FISTA, {tvi} inner TV iterations", objective=objective(x),
                         rel_error=_rel(x, vol), seconds=secs))
    for balance in (0.1, 1.0, 10.0, 100.0):
        x, secs = _timed(lambda: chambolle_pock(op, sino, lam, iterations, balance))
        rows.append(dict(solver=f"Chambolle–Pock, τ√L = {balance:g}", objective=objective(x),
                         rel_error=_rel(x, vol), seconds=secs))
    for r in rows:
        print(f"  {r['solver']:38s} objective {r['objective']:10.1f}  error {r['rel_error']:.3f}  "
              f"{r['seconds']:.1f} s", flush=True)
    return rows


def dice_study(cases: Sequence[Dict], methods: Dict[str, tuple] = METHODS, *,
               quantiles: Sequence[float] = (0.99,)) -> List[Dict]:
    """Dice of every method at every direction count on encoder scores with ground truth.

    Args:
        cases: one dict per subject: ``{"sinograms": {n_directions: (sinogram (1, 1, N, S), geometry)},
            "mask": (D, H, W) bool lesion mask, "body_mask": (D, H, W) bool or None}``. Every subject must
            have the same direction counts.
        methods: ``name -> (method, reconstruct keyword arguments)``, e.g. with ``score_baseline``.
        quantiles: ground-truth-free thresholds (top ``1 - q`` of the body's voxels) besides the best one.

    Returns:
        One row per (direction count, method): mean, std and per-subject list of Dice at the best threshold and
        at each quantile threshold, the encoder calls (slices per subject) and the median reconstruction time
        per subject.
    """
    counts = sorted(cases[0]["sinograms"])
    rows = []
    for n in counts:
        for name, (method, kw) in methods.items():
            heats, secs = [], []
            for c in cases:
                sino, g = c["sinograms"][n]
                heat, s = _timed(lambda: tf.reconstruct(sino, g, method, **kw))
                heats.append(heat[0, 0])
                secs.append(s)
            bodies = [c.get("body_mask") for c in cases]
            ev = evaluate_heatmaps(heats, [c["mask"] for c in cases], quantiles=quantiles, otsu=False,
                                   body_masks=None if any(b is None for b in bodies) else bodies)
            g = cases[0]["sinograms"][n][1]
            row = dict(directions=n, method=name, encoder_calls=n * g.n_slices,
                       seconds=statistics.median(secs))
            for rule, v in ev["mean"].items():
                row[f"dice_{rule}"] = v["dice"]
                row[f"dice_{rule}_std"] = ev["std"][rule]["dice"]
                row[f"dice_{rule}_per_subject"] = [r[rule]["dice"] for r in ev["per_volume"]]
            rows.append(row)
            print(f"  {n:3d} dirs  {name:38s} Dice best {row['dice_best']:.3f} ± {row['dice_best_std']:.3f}",
                  flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------
# The demo's encoder: settings chosen on selection subjects, Dice reported on the held-out test subjects
# ---------------------------------------------------------------------------------------------------------
# Stage 1 of the selection: score calibration (FISTA with its default tv 1e-3, 50 iterations).
CALIBRATIONS: Dict[str, dict] = {
    "none": {},
    "baseline median": dict(score_baseline="median"),
    "baseline q0.1": dict(score_baseline=0.1),
    "sigmoid, baseline median": dict(score_transform="sigmoid", score_baseline="median"),
    "softplus": dict(score_transform="softplus"),
    "softplus, baseline median": dict(score_transform="softplus", score_baseline="median"),
}
# Stage 2: FISTA's tv with the best calibration of stage 1 (its default 1e-3 was measured in stage 1). Stage 3:
# iterations with the best calibration and tv; SIRT and CGLS with the calibration, for comparison.
TV_GRID = (0.0, 1e-2, 3e-2, 1e-1, 3e-1)
ITERATION_GRID = (25, 100)

def demo_subjects(which: str, cfg=None, template=None) -> list:
    """The demo's subjects with lesions, made as the demo makes them.

    Args:
        which: ``"selection"`` (the demo's selection subjects, indices 7000–7015, the positives among them) or
            ``"test"`` (the demo's held-out test subjects, the positives among them); see
            :func:`tonno_fast.demo.run.population`.
        cfg: a :class:`tonno_fast.demo.run.DemoConfig` (default ``FULL``).
        template: the template of ``cfg.resolution`` (loaded if not given).

    Returns:
        The :class:`tonno_fast.demo.data.Subject` objects with ``label == 1``.
    """
    from tonno_fast.demo.data import load_template
    from tonno_fast.demo.run import FULL, population

    if which not in ("selection", "test"):
        raise ValueError(f"which must be 'selection' or 'test', got {which!r}")
    cfg = FULL if cfg is None else cfg
    template = load_template(cfg.resolution) if template is None else template
    return [s for s in population(template, cfg, which) if s.label == 1]


def demo_cases(subjects: Sequence, encoder, cfg=None, directions: Sequence[int] = DIRECTIONS) -> List[Dict]:
    """Cases for :func:`dice_study`: each subject scored once per direction count, as the demo's ToNNO rows
    score it (:func:`tonno_fast.demo.run.subject_geometry`).

    Args:
        subjects: demo subjects (:func:`demo_subjects`), volumes ``(D, H, W)`` (z, y, x) with spacing in mm.
        encoder: an :class:`~tonno_fast.Encoder` (e.g. from :func:`tonno_fast.load_encoder`) or any callable
            ``(M, C, h, w) → (M,)``.
        cfg: the :class:`~tonno_fast.demo.run.DemoConfig` whose geometry is used (default ``FULL``).
        directions: direction counts.

    Returns:
        One dict per subject: ``"sinograms"`` ``{n: (sinogram (1, 1, n, S), geometry)}``, ``"mask"`` (lesion,
        bool ``(D, H, W)``), ``"body_mask"`` (brain), ``"encoding_seconds"`` ``{n: seconds}``.
    """
    from tonno_fast.demo.run import FULL, subject_geometry

    cfg = FULL if cfg is None else cfg
    cases = []
    for s in subjects:
        vol = torch.from_numpy(s.image)
        sinos, enc_s = {}, {}
        for n in directions:
            g = subject_geometry(s, cfg, n)
            sino, enc_s[n] = _timed(lambda: tf.encode_slices(vol[None, None], g, encoder))
            sinos[n] = (sino, g)
        cases.append(dict(sinograms=sinos, mask=torch.from_numpy(s.lesion), body_mask=torch.from_numpy(s.brain),
                          encoding_seconds=enc_s))
    return cases


def _at(cases: Sequence[Dict], directions: Sequence[int]) -> List[Dict]:
    """The cases restricted to some direction counts."""
    return [dict(c, sinograms={n: c["sinograms"][n] for n in directions}) for c in cases]


def _best(rows: List[Dict], names: Sequence[str]) -> str:
    """The method among ``names`` with the highest mean Dice at the best threshold (first on ties)."""
    by_name = {r["method"]: r["dice_best"] for r in rows}
    return max(names, key=lambda name: (by_name[name], -list(names).index(name)))


def select_settings(cases: Sequence[Dict], n_directions: int = 16) -> Dict:
    """Choose FISTA's settings on selection ``cases`` at ``n_directions``, by mean Dice at the best threshold, in
    three stages: the score calibration (:data:`CALIBRATIONS`, default tv), then ``tv`` (:data:`TV_GRID`) with
    that calibration, then ``iterations`` (:data:`ITERATION_GRID`, against the default 50) with both; SIRT and
    CGLS with the chosen calibration are measured alongside.

    Returns ``{"rows": dice_study rows, "calibration": name, "chosen": row name, "fista": reconstruct kwargs}``.
    """
    at = _at(cases, (n_directions,))
    fbp = {"FBP ramp2": ("fbp", {}), "FBP ramp2 + Hann": ("fbp", dict(window="hann"))}
    fista = {f"FISTA, {name}": ("fista", dict(kw, tv=R.DEFAULT_TV)) for name, kw in CALIBRATIONS.items()}
    rows = dice_study(at, {**fbp, **fista})
    best = _best(rows, list(fista))
    calibration = best[len("FISTA, "):]
    cal = CALIBRATIONS[calibration]
    stage2 = {f"FISTA, {calibration}, tv {tv:g}": ("fista", dict(cal, tv=tv)) for tv in TV_GRID}
    rows += dice_study(at, stage2)
    fista.update(stage2)
    best = _best(rows, [best] + list(stage2))
    kw = fista[best][1]
    stage3 = {f"{best}, {it} iterations": ("fista", dict(kw, iterations=it)) for it in ITERATION_GRID}
    rows += dice_study(at, {**stage3, f"SIRT, {calibration}": ("sirt", dict(cal)),
                            f"CGLS, {calibration}": ("cgls", dict(cal))})
    fista.update(stage3)
    chosen = _best(rows, [best] + list(stage3))
    kw = dict(fista[chosen][1])
    print(f"  chosen: {chosen} -> reconstruct(..., 'fista', **{kw})", flush=True)
    return dict(rows=rows, calibration=calibration, chosen=chosen, fista=kw)


def _label(kw: dict) -> str:
    return ", ".join(f"{k.replace('score_', '')} {v}" for k, v in kw.items()) or "no calibration"


def reported_methods(fista: dict) -> Dict[str, tuple]:
    """The rows reported on the test subjects: FBP, FBP + Hann, FISTA with the library's defaults (no score
    calibration, tv 1e-3) and the chosen FISTA (``reconstruct`` kwargs ``fista``), with the exact and the
    ``backproject`` adjoint. (SIRT and CGLS, below FBP + Hann on the selection subjects at the same cost as
    FISTA, are left out.)"""
    return {
        "FBP ramp2": ("fbp", {}),
        "FBP ramp2 + Hann": ("fbp", dict(window="hann")),
        "FISTA, library defaults": ("fista", {}),
        f"FISTA, {_label(fista)}": ("fista", dict(fista)),
        "same FISTA, backproject adjoint": ("fista", dict(fista, adjoint="backproject")),
    }


def demo_study(encoder_path: str, *, chosen: Optional[dict] = None, directions: Sequence[int] = DIRECTIONS,
               selection_only: bool = False) -> Dict:
    """The ``demo`` part: selection (unless ``chosen`` gives FISTA's reconstruct kwargs), then the test table."""
    from tonno_fast.demo.data import load_template
    from tonno_fast.demo.run import FULL, SELECTION, STARTS

    encoder = tf.load_encoder(encoder_path, batch_size=64)
    template = load_template(FULL.resolution)
    out: Dict = {"encoder": str(encoder_path)}
    if chosen is None:
        subjects = demo_subjects("selection", template=template)
        first = STARTS["selection"]
        print(f"## selection: {len(subjects)} subjects with lesions (indices {first}–{first + SELECTION - 1}), "
              f"16 directions", flush=True)
        sel = select_settings(demo_cases(subjects, encoder, directions=(16,)))
        print(_table(sel["rows"], ["method", "dice_best", "dice_best_std", "dice_q0.99", "dice_q0.99_std",
                                   "seconds"]))
        out["selection"] = sel
        chosen = sel["fista"]
        if selection_only:
            return out
    subjects = demo_subjects("test", template=template)
    print(f"## test: the demo's {len(subjects)} held-out subjects with lesions; FISTA {chosen}", flush=True)
    cases = demo_cases(subjects, encoder, directions=directions)
    rows = dice_study(cases, reported_methods(chosen))
    for r in rows:
        r["encoding_seconds"] = statistics.median(c["encoding_seconds"][r["directions"]] for c in cases)
    print(_table(rows, ["directions", "method", "dice_best", "dice_best_std", "dice_q0.99", "dice_q0.99_std",
                        "seconds", "encoding_seconds", "encoder_calls"]))
    out["test"] = dict(fista=chosen, rows=rows, subjects=len(cases))
    return out


def _table(rows: List[Dict], cols: Sequence[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ["identity", "settings", "cost", "solvers", "demo"]
    ap.add_argument("parts", nargs="*", metavar="PART", help=f"any of {parts} (default: all but demo)")
    ap.add_argument("--encoder", metavar="BUNDLE", help="demo: the encoder bundle (e.g. the demo's bag encoder)")
    ap.add_argument("--chosen", metavar="JSON", help="demo: FISTA's reconstruct kwargs, skipping the selection "
                                                     "(e.g. '{\"tv\": 0.001, \"score_baseline\": \"median\"}')")
    ap.add_argument("--selection-only", action="store_true", help="demo: stop after the selection")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    bad = sorted(set(args.parts) - set(parts))
    if bad:
        ap.error(f"unknown part(s) {bad}; choose from {parts}")
    args.parts = args.parts or parts[:-1]
    if "demo" in args.parts and not args.encoder:
        ap.error("the demo part needs --encoder BUNDLE")
    torch.set_num_threads(args.threads)
    results = {}
    if "identity" in args.parts:
        print("## identity phantom: relative error vs directions")
        results["identity"] = identity_study()
        print(_table(results["identity"], ["directions", "method", "rel_error", "seconds", "encoder_calls"]))
    if "settings" in args.parts:
        print("## FISTA settings, 16 directions")
        results["settings"] = settings_study()
        print(_table(results["settings"], ["settings", "rel_error", "seconds"]))
    if "cost" in args.parts:
        print("## cost: 64³, 16 directions, 50 iterations")
        results["cost"] = cost_study()
    if "solvers" in args.parts:
        print("## FISTA vs Chambolle–Pock, 16 directions, tv 1e-3, 50 iterations")
        results["solvers"] = solver_study()
        print(_table(results["solvers"], ["solver", "objective", "rel_error", "seconds"]))
    if "demo" in args.parts:
        results["demo"] = demo_study(args.encoder, chosen=None if args.chosen is None else json.loads(args.chosen),
                                     selection_only=args.selection_only)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
