"""Cohort scaling: wall time of ``tonno-fast heatmap -i FOLDER -o FOLDER`` on 1 process and under
``torchrun --nproc-per-node 2`` (the scans shared between the ranks), and how far the direction split
(``--split directions``: every scan's directions shared, the partial heatmaps summed by an ``all_reduce``) and
the file split are from the one-process heatmaps.

    .venv/bin/python benchmarks/cohort_scaling.py                       # 8 scans of 40³, 32 directions
    .venv/bin/python benchmarks/cohort_scaling.py --scans 8 --size 48 --directions 64 --repeat 3 --json out.json

Every process runs one thread (``OMP_NUM_THREADS=1``; ``--threads`` changes the one-process run), on the CPU,
so the two runs use 1 and 2 cores. The times are whole commands, start-up (Python, torch, the process group)
included; the scans are random volumes with a bright box, the encoder a small TorchScript CNN. Prints a Markdown
table; the machine's load average is printed with it, as other jobs slow both runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch


class SmallCNN(torch.nn.Module):
    """Two 3×3 convolutions, a global mean and a linear head: about the cost of a light 2D classifier per pixel."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.head = torch.nn.Linear(8, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).mean(dim=(2, 3)))


def make_cohort(folder: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for k in range(n):
        data = rng.random((size, size + 2, size - 2)).astype(np.float32)
        a = size // 4 + k % 3
        data[a:a + size // 4, a:a + size // 3, a:a + size // 5] += 2.0
        nib.save(nib.Nifti1Image(data, np.diag([1.0 + 0.1 * k, 1.0, 1.2, 1.0])), str(folder / f"scan{k}.nii.gz"))


def timed(cmd, env) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return seconds


def differences(reference: Path, other: Path):
    """Per scan: max |other - reference| / max |reference| and ||other - reference|| / ||reference||."""
    worst_max, worst_norm = 0.0, 0.0
    for path in sorted(reference.iterdir()):
        a = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
        b = np.asarray(nib.load(str(other / path.name)).dataobj, dtype=np.float64)
        worst_max = max(worst_max, float(np.abs(b - a).max() / np.abs(a).max()))
        worst_norm = max(worst_norm, float(np.linalg.norm(b - a) / np.linalg.norm(a)))
    return worst_max, worst_norm


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scans", type=int, default=8)
    ap.add_argument("--size", type=int, default=40, help="scan edge in voxels (about size³)")
    ap.add_argument("--directions", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each command (the median is reported)")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads of the one-process run")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="cohort_scaling_"))
    try:
        scans = work / "scans"
        scans.mkdir()
        make_cohort(scans, args.scans, args.size)
        encoder = work / "cnn.pt"
        torch.jit.script(SmallCNN().eval()).save(str(encoder))
        opts = ["--encoder", str(encoder), "--directions", str(args.directions), "--device", "cpu", "-q",
                "--overwrite"]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        one_env = dict(env, OMP_NUM_THREADS=str(args.threads))
        two_env = dict(env, OMP_NUM_THREADS="1")
        one = [sys.executable, "-m", "tonno_fast", "heatmap", "-i", str(scans)]
        two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "tonno_fast", "heatmap", "-i", str(scans)]
        runs = {"1 process": [], "2 processes (files)": [], "2 processes (directions)": []}
        for _ in range(args.repeat):
            runs["1 process"].append(timed(one + ["-o", str(work / "one")] + opts, one_env))
            runs["2 processes (files)"].append(timed(two + ["-o", str(work / "files")] + opts, two_env))
            runs["2 processes (directions)"].append(
                timed(two + ["-o", str(work / "directions"), "--split", "directions"] + opts, two_env))
        files = differences(work / "one", work / "files")
        directions = differences(work / "one", work / "directions")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(runs["1 process"])
    result = {"scans": args.scans, "shape": [args.size, args.size + 2, args.size - 2],
              "directions": args.directions, "threads_one_process": args.threads, "load_average": os.getloadavg(),
              "seconds": runs, "max_rel_files": files[0], "norm_rel_files": files[1],
              "max_rel_directions": directions[0], "norm_rel_directions": directions[1]}
    print(f"{args.scans} scans of {args.size}x{args.size + 2}x{args.size - 2}, {args.directions} directions, "
          f"small TorchScript CNN, CPU; load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print("| run | wall time (s), median of " + f"{args.repeat} | speed-up | vs 1 process: max rel | norm rel |")
    print("|---|---|---|---|---|")
    for name, times in runs.items():
        diff = {"1 process": ("—", "—"), "2 processes (files)": tuple(f"{x:.1e}" for x in files),
                "2 processes (directions)": tuple(f"{x:.1e}" for x in directions)}[name]
        med = statistics.median(times)
        print(f"| {name} | {med:.1f} ({', '.join(f'{t:.1f}' for t in times)}) | {base / med:.2f}x | "
              f"{diff[0]} | {diff[1]} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
