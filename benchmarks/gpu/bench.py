"""GPU benchmark of the five tonno_fast operators: every available backend against the reference backend.

The problems are the operators' benchmark problems (``tonno_fast/ops/problems.py``) at the sizes of the GPU
targets (docs/performance.md):

* ``slice_volume``: a 128³ float32 volume into 64 directions × 128 slices × 128² pixels (134 M samples),
  output in float32 and in bfloat16;
* ``radon``: the same geometry, plane sums only (no slice is written);
* ``backproject``: a 64 × 128 sinogram into 128³ (134 M updates);
* ``backproject_slices``: 16 stacks (the default geometry of 64³) into 64³;
* ``affine_grid_sample``: 4 volumes of 128³ resampled by 4 random rotations onto 128³ grids.

Timing: CUDA events around each call, warm-up calls first, the median of several calls; each call reads
another copy of its input, the copies together being larger than the L2 cache (``--l2-mb``, 50 MB on
H100/H200), so no call finds its input in L2 (at most 64 copies: the 32 KB sinogram of ``backproject``
stays in L2, as it does in the pipeline, where it was just written). For every row the table gives the median time, the
throughput (G samples/s for gathers, G updates/s for backprojections: one update = one (voxel, direction)
pair), the achieved bandwidth over the compulsory traffic (inputs read once, output written once) and
the speed-up over the reference backend measured in the same run.

``--backward`` adds the adjoints: ``torch.autograd.grad`` on a graph built once per input copy (``retain_graph``),
for each backend twice — as it runs by default (the GPU scatters use atomic adds) and under
``torch.use_deterministic_algorithms(True)`` (their deterministic path: contributions written to slots and summed
in a fixed order), so the cost of reproducible gradients is measured in the same run. A backend without a
deterministic path (the reference's ``grid_sample`` backward on CUDA) reports that it failed and the others go on.

``--dry-run`` only builds and prints the problem list (no GPU needed). ``--device cpu --scale 0.125`` runs
the whole harness on tiny problems on the CPU (wall-clock timer instead of CUDA events), to test it
without a GPU; such numbers mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tonno_fast.ops.problems import OPS, Problem, make_problems  # noqa: E402


def build_problems(scale: float = 1.0, ops=OPS) -> List[Problem]:
    """The problem list; ``scale`` shrinks every linear size (for CPU smoke runs)."""

    def sz(n: int) -> int:
        return max(2, int(round(n * scale)))

    return make_problems(sz(128), 64, slices=sz(128), stack_volume=sz(64), affine_batch=4,
                         out_dtypes=(torch.float32, torch.bfloat16), ops=ops)


class Timer:
    """Median time (ms) of ``fn(i)`` over calls, with warm-up; CUDA events on a GPU, wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[int], object], warmup: int, repeats: int, budget_s: float) -> List[float]:
        for i in range(warmup):
            fn(i)
        self._sync()
        times = []
        t_start = time.perf_counter()
        for i in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(warmup + i)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn(warmup + i)
                times.append((time.perf_counter() - t0) * 1e3)
            # Slow backends (the reference) stop early, with at least 3 calls.
            if i >= 2 and time.perf_counter() - t_start > budget_s:
                break
        return times

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def available(device: torch.device, wanted: Optional[List[str]]) -> Dict[str, object]:
    """Backend modules to time: ``reference`` always; ``cuda``/``triton`` (GPU) or ``cpu`` when available."""
    from tonno_fast.ops.registry import backends as status, get_backend

    names = ["reference"] + (["cuda", "triton"] if device.type == "cuda" else ["cpu"])
    if wanted:
        names = [n for n in names if n in wanted]
    st = status()
    out = {}
    for n in names:
        if st.get(n) == "available":
            out[n] = get_backend(n, device)
        else:
            print(f"# backend {n}: not benchmarked ({st.get(n)})")
    return out


def run(problems: List[Problem], backends: Dict[str, object], device: torch.device, l2_mb: float,
        warmup: int, repeats: int, budget_s: float, backward: bool = False) -> List[dict]:
    timer = Timer(device)
    rows = []
    for p in problems:
        in_bytes = max(p.in_bytes, 1.0)
        n_copies = max(2, min(64, math.ceil(2 * l2_mb * 2 ** 20 / in_bytes)))
        copies = [p.make_inputs(device) for _ in range(n_copies)]
        ref_ms = None
        for name, be in backends.items():
            row = _time(timer, p, name, lambda i: p.call(be, copies[i % n_copies]), warmup, repeats, budget_s,
                        ref_ms, "forward")
            if row is not None:
                ref_ms = row["ms"] if name == "reference" else ref_ms
                rows.append(row)
        del copies
        if backward and p.differentiable:
            rows += _backward_rows(timer, p, backends, device, warmup, repeats, budget_s)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _time(timer, p: Problem, name: str, fn, warmup, repeats, budget_s, ref_ms, mode: str) -> Optional[dict]:
    """One row: the median time of ``fn(i)``, or None (with a line saying why) when it raises."""
    try:
        times = timer(fn, warmup, repeats, budget_s)
    except Exception as exc:  # one failing backend must not hide the others
        print(f"# {p.op} [{p.label}] {name} {mode}: failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return None
    ms = statistics.median(times)
    return dict(op=p.op if mode == "forward" else f"{p.op} ({mode})", size=p.label, backend=name, ms=ms,
                calls=len(times), rate=p.work / (ms * 1e-3) / 1e9, unit=p.unit,
                gbs=(p.in_bytes + p.out_bytes) / (ms * 1e-3) / 1e9,
                speedup=(ref_ms / ms) if ref_ms is not None else float("nan"))


def _backward_rows(timer, p: Problem, backends: Dict[str, object], device: torch.device, warmup, repeats,
                   budget_s) -> List[dict]:
    """The adjoint of ``p`` on every backend, by default and in deterministic mode: ``torch.autograd.grad`` with
    ``retain_graph`` on two graphs (input copies) built once, so each call runs the backward pass only."""
    rows = []
    ref_ms = {}
    for name, be in backends.items():
        try:
            graphs = [p.backward(be, device, seed=3 + k) for k in range(2)]
        except Exception as exc:
            print(f"# {p.op} [{p.label}] {name} backward: the forward pass failed: {type(exc).__name__}: {exc}")
            continue

        def fn(i, graphs=graphs):
            return graphs[i % 2]()

        for mode in ("backward", "backward, deterministic"):
            before = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(mode != "backward")
            try:
                row = _time(timer, p, name, fn, warmup, repeats, budget_s, ref_ms.get(mode), mode)
            finally:
                torch.use_deterministic_algorithms(before)
            if row is not None:
                if name == "reference":
                    ref_ms[mode] = row["ms"]
                rows.append(row)
        del graphs
    return rows


def table(rows: List[dict], markdown: bool) -> str:
    head = ["op", "size", "backend", "ms (median)", "calls", "throughput", "GB/s", "× reference"]
    lines = []
    for r in rows:
        unit = "G samples/s" if r["unit"] == "samples" else "G updates/s"
        lines.append([r["op"], r["size"], r["backend"], f"{r['ms']:.4g}", str(r["calls"]),
                      f"{r['rate']:.3g} {unit}", f"{r['gbs']:.3g}",
                      "—" if math.isnan(r["speedup"]) else f"{r['speedup']:.3g}"])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(l) + " |" for l in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*l) for l in lines])


def describe(device: torch.device) -> str:
    parts = [f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}", f"torch {torch.__version__}"]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        parts.insert(0, f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2 ** 30:.0f} GiB)")
        parts.append(f"CUDA {torch.version.cuda}")
    else:
        parts.insert(0, "CPU (harness smoke run: numbers are meaningless)")
    try:
        import tonno_fast._C as C

        parts.append(f"build {C.build_info()}")
    except Exception as exc:
        parts.append(f"tonno_fast._C unavailable ({type(exc).__name__})")
    return "; ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--backends", default=None, help="comma-separated subset of reference,cuda,triton,cpu")
    ap.add_argument("--quick", action="store_true", help="fewer calls per measurement (2 warm-up, 5 timed)")
    ap.add_argument("--backward", action="store_true",
                    help="also time every adjoint, as by default (atomics on a GPU) and in deterministic mode")
    ap.add_argument("--dry-run", action="store_true", help="print the problem list and exit (no device needed)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (harness smoke test only)")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every linear size by this factor")
    ap.add_argument("--l2-mb", type=float, default=50.0, help="L2 cache size to defeat (MB), default 50")
    ap.add_argument("--budget-s", type=float, default=3.0, help="stop timing one backend after this many seconds")
    ap.add_argument("--markdown", default=None, help="also write the table as Markdown to this file")
    args = ap.parse_args(argv)

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        ap.error(f"unknown op(s) {bad}; choose from {OPS}")
    if not (0 < args.scale <= 1):
        ap.error(f"--scale must be in (0, 1], got {args.scale}")
    problems = build_problems(args.scale, ops)
    if args.dry_run:
        for p in problems:
            print(f"{p.op:20s} {p.label:32s} {p.work / 1e6:9.1f} M {p.unit:8s} "
                  f"in {p.in_bytes / 2 ** 20:8.1f} MiB  out {p.out_bytes / 2 ** 20:8.1f} MiB")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run, or --device cpu --scale 0.125 for a smoke run", file=sys.stderr)
        return 2
    wanted = [b.strip() for b in args.backends.split(",")] if args.backends else None
    backends = available(device, wanted)
    warmup, repeats = (2, 5) if args.quick else (3, 15)
    header = describe(device)
    print(f"# {header}")
    rows = run(problems, backends, device, args.l2_mb, warmup, repeats, args.budget_s, backward=args.backward)
    print(table(rows, markdown=False))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"# tonno_fast GPU benchmark\n\n{header}\n\n{table(rows, markdown=True)}\n\n"
                    "Throughput: samples (gathers) or updates (voxel × direction) per second. GB/s: compulsory "
                    "traffic (inputs read once, output written once) / time. × reference: reference time / "
                    "this backend's time, same run. Inputs rotate among copies larger than L2.\n")
        print(f"# wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
