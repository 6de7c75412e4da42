"""End-to-end time of the three pipelines (ToNNO scores, Averaged CAM, Tomographic CAM) and the slice-wise
baseline, split into slicing / encoder / reconstruction (filter + backprojection), so that one sees how
little the ops cost next to the encoder (target: ops < 10% of the total).

CPU (pytest-benchmark, ``make bench``): a 64³ float32 volume, 64 directions, 64×64 slices (δ follows,
111 slices per direction: 7,104 slices), a small CNN (two strided 3×3 convolutions, 8 and 16 channels).
Each pipeline runs on the compiled ``cpu`` backend and on the ``reference`` backend in the same run (the
summary table of ``conftest.py`` gives the ratio); the split is in ``benchmark.extra_info`` (seconds per
round and fractions). The slice-wise baseline uses no op and runs once.

GPU (``python benchmarks/test_bench_pipeline.py --device cuda --model resnet18 --autocast bf16``): the same
pipelines with a torchvision ResNet-18 (random weights, 1 → 3 channel replication, 224×224 slices), the
volume and the model on the GPU; prints one line per pipeline with the split. Meant to be called from
``benchmarks/gpu/run.sh``.

Measured numbers: ``benchmarks/RESULTS.md``, "Pipelines end to end (CPU)".
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Callable, Dict

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import tonno_fast as tf  # noqa: E402

STAGES = ("slicing", "encoder", "reconstruction")


def small_cnn() -> nn.Module:
    """~0.4 M multiply-adds per 64×64 slice; target layer for CAMs: ``"2"`` (16 channels at 16×16)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 1)).eval()


def phantom(n: int, device="cpu") -> torch.Tensor:
    """A smooth ``n³`` float32 volume (two Gaussian blobs) so that CAMs are not all zero."""
    ax = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    r1 = (x - n / 8) ** 2 + (y + n / 10) ** 2 + z ** 2
    r2 = (x + n / 6) ** 2 + (y - n / 8) ** 2 + (z - n / 10) ** 2
    return torch.exp(-r1 / (2 * (n / 10) ** 2)) + 0.7 * torch.exp(-r2 / (2 * (n / 14) ** 2))


def pipelines(encoder, target_layer: str, backend: str = "auto", **geometry) -> Dict[str, Callable]:
    """``name → fn(volume, timings)`` for every pipeline, all with the same geometry and ops ``backend``."""
    return {
        "tonno": lambda v, t: tf.tomographic_heatmap(v, encoder, timings=t, backend=backend, **geometry),
        "averaged_cam": lambda v, t: tf.averaged_cam(v, encoder, target_layers=target_layer, method="gradcam",
                                                     timings=t, backend=backend, **geometry),
        "tomographic_cam": lambda v, t: tf.tomographic_cam(v, encoder, target_layers=target_layer,
                                                           method="layercam", timings=t, backend=backend,
                                                           **geometry),
        "slicewise_cam": lambda v, t: tf.slicewise_cam(v, encoder, target_layers=target_layer, method="gradcam",
                                                       timings=t, slice_size=geometry.get("slice_size"),
                                                       batch_size=geometry.get("batch_size")),
    }


def split(timings: Dict[str, float], rounds: int) -> Dict[str, float]:
    """Seconds per round of each stage, their fractions of the staged total, and ``ops_fraction``."""
    per = {s: timings.get(s, 0.0) / rounds for s in STAGES}
    total = sum(per.values()) or 1.0
    out = {f"{s}_s": round(per[s], 4) for s in STAGES}
    out.update({f"{s}_fraction": round(per[s] / total, 4) for s in STAGES})
    out["ops_fraction"] = round((per["slicing"] + per["reconstruction"]) / total, 4)
    return out


# ---------------------------------------------------------------------------------------------------------
# pytest-benchmark (CPU)
# ---------------------------------------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # the GPU script runs without pytest
    pytest = None

if pytest is not None:
    CPU_GEOMETRY = dict(n_directions=64, slice_size=64, batch_size=512, spacing=(1.0, 1.0, 1.0))

    CPU_SLICES = 64 * 111  # slices scored per call (the work unit of the summary table)

    @pytest.mark.parametrize("backend", ["cpu", "reference"])
    @pytest.mark.parametrize("name", ["tonno", "averaged_cam", "tomographic_cam"])
    def test_pipeline_cpu_64(run_case, benchmark, name, backend):
        if backend == "cpu" and tf.backends()["cpu"] != "available":
            pytest.skip(f"compiled CPU kernels unavailable: {tf.backends()['cpu']}")
        vol = phantom(64)
        fn = pipelines(tf.Encoder(small_cnn()), "2", backend=backend, **CPU_GEOMETRY)[name]
        timings: Dict[str, float] = {}
        rounds = 3 if backend == "cpu" else 2
        record = run_case(f"pipeline {name}", backend, lambda: fn(vol, timings), CPU_SLICES, "slices",
                          rounds=rounds)
        shares = split(timings, rounds + 1)  # run_case's memory call and the timed rounds
        benchmark.extra_info.update(shares)
        if record is not None:
            record.update(shares)

    @pytest.mark.filterwarnings("ignore:tonno_fast. compiled CPU kernels unavailable")
    def test_pipeline_cpu_64_slicewise(benchmark):
        vol = phantom(64)
        fn = pipelines(tf.Encoder(small_cnn()), "2", **CPU_GEOMETRY)["slicewise_cam"]
        benchmark.pedantic(fn, args=(vol, {}), rounds=3, iterations=1, warmup_rounds=0)


# ---------------------------------------------------------------------------------------------------------
# Script (GPU or CPU)
# ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=("resnet18", "small"), default="resnet18")
    p.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="bf16")
    p.add_argument("--size", type=int, default=128, help="volume side (voxels)")
    p.add_argument("--directions", type=int, default=64)
    p.add_argument("--slice-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated pipeline names")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if args.model == "resnet18":
        import torchvision
        model, layer = torchvision.models.resnet18(weights=None, num_classes=2).eval(), "layer4"
    else:
        model, layer = small_cnn(), "2"
    model = model.to(dev)
    ac = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    enc = tf.Encoder(model, output=1 if args.model == "resnet18" else None, autocast=ac)
    vol = phantom(args.size, dev)
    fns = pipelines(enc, layer, n_directions=args.directions, slice_size=args.slice_size,
                    batch_size=args.batch_size, spacing=(1.0, 1.0, 1.0))
    names = list(fns) if args.only is None else args.only.split(",")
    name_dev = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# {datetime.date.today()} {name_dev}; {args.size}³ volume, {args.directions} directions, "
          f"{args.slice_size}² slices, {args.model}, autocast {args.autocast}, batch {args.batch_size}")
    print(f"{'pipeline':16s} {'median s':>9s} {'slicing':>8s} {'encoder':>8s} {'recon':>8s} {'ops %':>6s}")
    for name in names:
        fns[name](vol, {})  # warm-up (kernels, cuDNN autotuning, allocator)
        totals, timings = [], {}
        for _ in range(args.rounds):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            fns[name](vol, timings)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            totals.append(time.perf_counter() - t0)
        s = split(timings, args.rounds)
        print(f"{name:16s} {statistics.median(totals):9.3f} {s['slicing_s']:8.3f} {s['encoder_s']:8.3f} "
              f"{s['reconstruction_s']:8.3f} {100 * s['ops_fraction']:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
