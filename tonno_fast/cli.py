"""The ``tonno-fast`` command line: heatmaps of NIfTI scans, the demo, and an operator benchmark.

    tonno-fast heatmap -i scan.nii.gz -o heat.nii.gz --encoder model.pt
    tonno-fast heatmap -i scan.nii.gz -o heat.nii.gz --encoder bundle.pt   # from tonno_fast.save_encoder
    tonno-fast heatmap -i scan.nii.gz -o heat.nii.gz --encoder mypkg.models:make_net --weights net.pt \\
        --method tomographic-cam --target-layer features.3 --png overlay.png
    tonno-fast heatmap -i scan.nii.gz -o heat.nii.gz --encoder model.pt --directions 16 --reconstruction fista
    tonno-fast heatmap -i scans/ -o heatmaps/ --encoder model.pt            # a folder, a glob or a list file
    torchrun --nproc-per-node 4 -m tonno_fast heatmap -i scans/ -o heatmaps/ --encoder model.pt
    tonno-fast demo [--quick] [--out DIR]
    tonno-fast bench

Errors a user can cause (missing or unreadable file, a 2D image, an encoder that cannot be loaded, a bad
option, a run too large for the memory) print one line ``tonno-fast: error: ...`` on stderr and exit with status
2; nothing else prints a traceback unless ``--debug`` is given. With several scans, a failing scan prints
``tonno-fast: failed: SCAN: ...``, the others go on, and the exit status is 1 if any failed.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, List, Optional

from .allocator import retain_freed_memory_unless_disabled
from .cohort import PIPELINES as METHODS

__all__ = ["main", "build_parser", "load_encoder", "CLIError"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------- encoder loading
def load_encoder(spec: str, weights: Optional[str] = None, device: str = "cpu"):
    """Load a 2D encoder from ``spec``: an encoder bundle (:func:`tonno_fast.save_encoder`; returned as a
    :class:`tonno_fast.Encoder` carrying its training slice geometry), a TorchScript file, or
    ``package.module:factory`` (a callable returning an ``nn.Module``) plus an optional state-dict file
    ``weights``. Returns the Encoder or the module in eval mode on ``device``. Raises :class:`CLIError` with
    one clear line when it cannot."""
    import torch

    from .bundle import is_encoder_bundle, resolve_factory
    from .bundle import load_encoder as load_bundle

    path = Path(spec)
    if path.is_file() and is_encoder_bundle(path):
        if weights is not None:
            raise CLIError("--weights is not used with an encoder bundle (the bundle holds its weights)")
        try:
            return load_bundle(path, device=device)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise CLIError(f"--encoder {path}: cannot load this bundle ({text[0] if text else type(exc).__name__})"
                           ) from None
    if ":" in spec and not path.exists():
        attr = spec.partition(":")[2]
        try:
            factory = resolve_factory(spec)
        except ValueError as exc:
            raise CLIError(f"--encoder {spec!r}: {exc}") from None
        try:
            model = factory()
        except Exception as exc:
            raise CLIError(f"--encoder {spec!r}: calling {attr}() failed ({type(exc).__name__}: {exc})") from None
        if not isinstance(model, torch.nn.Module):
            raise CLIError(f"--encoder {spec!r}: {attr}() returned {type(model).__name__}, expected a torch.nn.Module")
        if weights is not None:
            wp = Path(weights)
            if not wp.is_file():
                raise CLIError(f"--weights: no such file: {wp}")
            try:
                state = torch.load(str(wp), map_location="cpu", weights_only=True)
                if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                    state = state["state_dict"]
                model.load_state_dict(state)
            except Exception as exc:
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CLIError(f"--weights {wp}: cannot load this state dict into {attr}(): {msg}") from None
    else:
        if weights is not None:
            raise CLIError("--weights is only used with --encoder package.module:factory, not with a TorchScript file")
        if not path.exists():
            raise CLIError(f"--encoder: no such file: {path} (give a TorchScript file or package.module:factory)")
        try:
            with warnings.catch_warnings():  # torch >= 2.9 flags TorchScript as deprecated; still the format to load
                warnings.simplefilter("ignore", FutureWarning)
                model = torch.jit.load(str(path), map_location="cpu")
        except Exception:
            raise CLIError(f"--encoder {path}: not an encoder bundle, and not a TorchScript file (save a bundle "
                           f"with tonno_fast.save_encoder, TorchScript with torch.jit.script(model).save(path), "
                           f"or use --encoder package.module:factory --weights state.pt)") from None
    model.eval()
    return model.to(device)


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return name


def _as_encoder(model, normalize):
    """The loaded model as the API would take it (:func:`tonno_fast.encoder.as_encoder`: channels replicated to
    its first convolution's, its dtype and device, eval mode), with ``--normalize`` when given (else a bundle's
    stored normalisation, or timm's ``pretrained_cfg`` of a factory's model)."""
    from .encoder import as_encoder

    enc = as_encoder(model)
    return enc if normalize in (None, "auto") else enc.with_normalize(normalize)


def _single_score(encoder, class_index: Optional[int]) -> Callable:
    """``encoder`` (an :class:`~tonno_fast.Encoder`) selecting one score per slice: column ``class_index`` of a
    multi-output model; its slice geometry and input adaptation are kept."""

    def select(out):
        if out.ndim == 2 and out.shape[1] > 1:
            if class_index is None:
                raise CLIError(f"the encoder returns {out.shape[1]} scores per slice; choose one with --class-index")
            if not 0 <= class_index < out.shape[1]:
                raise CLIError(f"--class-index {class_index} is out of range for {out.shape[1]} scores")
            return out[:, class_index]
        if class_index not in (None, 0):
            raise CLIError(f"--class-index {class_index}: the encoder returns a single score per slice")
        return out.reshape(out.shape[0], -1)[:, 0] if out.ndim == 2 else out

    return encoder.with_output(select)


# ------------------------------------------------------------------------------------------------- subcommands
def cmd_heatmap(args) -> int:
    """One scan, or a cohort (a folder, a glob, a list): see :mod:`tonno_fast.cohort`. Under ``torchrun`` the
    ranks share the scans (``--split files``) or each scan's directions (``--split directions``)."""
    from .cohort import CohortError, shared_plan
    from .distributed import session

    if args.png is not None and not str(args.png).lower().endswith(".png"):
        raise CLIError(f"--png {args.png}: must end in .png")
    if args.directions < 1:
        raise CLIError(f"--directions must be a positive integer, got {args.directions}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.method != "tonno" and args.target_layer is None:
        raise CLIError(f"--method {args.method} needs --target-layer (the name of a conv layer, e.g. features.3; "
                       f"see model.named_modules())")
    recon = _reconstruction_args(args)
    with session(_resolve_device(args.device)) as (ctx, device):
        try:
            plan = shared_plan(args.input, args.output, overwrite=args.overwrite, ctx=ctx)
        except CohortError as exc:
            raise CLIError(str(exc)) from None
        if args.png is not None and len(plan.jobs) > 1:
            raise CLIError(f"--png draws one scan; {len(plan.jobs)} inputs were given (run the scan you want to "
                           f"draw on its own)")
        split = args.split or ("directions" if len(plan.jobs) == 1 else "files")
        group = ctx.group if ctx.distributed and split == "directions" else None
        model = _as_encoder(load_encoder(args.encoder, args.weights, device), args.normalize)
        common = dict(n_directions=args.directions, batch_size=args.batch_size,
                      progress=plan.single and ctx.is_main and not args.quiet)
        if args.allow_nonfinite:
            common["allow_nonfinite"] = True
        if args.slice_size is not None:
            if model.input_size is not None:  # a bundle: the user overrides its training size
                model = copy.copy(model)
                model.input_size = (args.slice_size, args.slice_size)
            common["slice_size"] = args.slice_size
        if args.pixel_spacing is not None:
            common["pixel_spacing"] = args.pixel_spacing
        if args.max_memory is not None:
            common["max_memory"] = args.max_memory
        if group is not None:
            common["process_group"] = group
        if args.method == "tonno":
            from .pipeline import tomographic_heatmap
            score = _single_score(model, args.class_index)

            def compute(volume, spacing):
                return tomographic_heatmap(volume, score, spacing=spacing, filter=args.filter, window=args.window,
                                           **recon, **common)
        else:
            compute = _cam_heatmap(args, model, common)
        one = _scan_runner(args, compute, device, write=group is None or ctx.is_main)
        if plan.single:
            if ctx.distributed and group is None and not ctx.is_main:
                return 0  # --split files with one scan: rank 0 maps it
            return _heatmap_single(args, plan, one, ctx)
        return _heatmap_cohort(args, plan, one, ctx, split)


def _scan_runner(args, compute, device, write: bool) -> Callable:
    """The single-scan body: read, compute, write atomically (``write``: this rank writes), overlay, report."""
    from .cohort import ScanError, process_scan
    from .memory import MemoryBudgetError
    from .validation import NonFiniteError

    def one(job) -> None:
        t0 = time.perf_counter()
        try:
            scan, heat = process_scan(job, compute, device=device, write=write)
        except MemoryBudgetError as exc:
            flag = _MEMORY_FLAGS.get(exc.parameter)
            hint = f" (on the command line: {flag})" if flag else ""
            raise MemoryBudgetError(f"{exc}{hint}", exc.estimate, exc.available, exc.parameter) from None
        except NonFiniteError as exc:
            raise ScanError(f"{job.input} contains {exc.count} NaN or inf voxels; clean it, or pass "
                            f"--allow-nonfinite to give them to the encoder as they are (it must then return "
                            f"finite scores)") from None
        if not write:
            return
        msg = f"wrote {job.output} ({args.method}, {args.directions} directions, {time.perf_counter() - t0:.1f} s)"
        if args.png is not None:
            from .viz import overlay_png
            overlay_png(args.png, scan.data, {args.method: heat.cpu()}, spacing=scan.spacing,
                        title=f"{Path(job.input).name}: {args.method}")
            msg += f" and {args.png}"
        if not args.quiet:
            print(msg, flush=True)
    return one


#: The option that lowers each part of a memory estimate (see tonno_fast.memory).
_MEMORY_FLAGS = {"n_directions": "lower --directions", "max_memory": "lower --max-memory",
                 "batch_size": "lower --batch-size", "slice_size": "lower --slice-size or raise --pixel-spacing",
                 "reconstruction": "--reconstruction fbp", "outputs": "choose one output with --class-index"}


def _heatmap_single(args, plan, one, ctx) -> int:
    """One scan named directly: errors are the command's errors (one line, exit 2 for a bad scan)."""
    from .cohort import ScanError

    if not plan.pending:
        if ctx.is_main:
            print(f"tonno-fast: skipped {plan.jobs[0].output}: it exists (--overwrite recomputes it)",
                  file=sys.stderr)
        return 0
    try:
        one(plan.pending[0])
    except ScanError as exc:
        raise CLIError(f"--input: {exc}") from None
    return 0


def _heatmap_cohort(args, plan, one, ctx, split: str) -> int:
    """Many scans: a failing scan is reported and the others go on; rank 0 prints the summary."""
    from .cohort import Fatal, run_jobs

    def guarded(job) -> None:
        try:
            one(job)
        except CLIError as exc:  # an option that fails every scan: stop the run
            raise Fatal(str(exc)) from exc

    def report_failure(res) -> None:
        if res.status == "failed":
            print(f"tonno-fast: failed: {res.input}: {res.error}", file=sys.stderr, flush=True)

    try:
        report = run_jobs(plan, guarded, fail_fast=args.fail_fast, split=split, ctx=ctx, on_result=report_failure)
    except Fatal as exc:
        raise CLIError(str(exc)) from None
    if ctx.is_main and (not args.quiet or not report.ok):
        print(f"tonno-fast: {report.summary()}", file=sys.stdout if report.ok else sys.stderr, flush=True)
    # Rank 0 alone carries the failure in its status: a rank that exits non-zero first makes torchrun stop the
    # others, which could cut rank 0 off before its summary.
    return 0 if report.ok or not ctx.is_main else 1


def _reconstruction_args(args) -> dict:
    """The reconstruction keywords of tomographic_heatmap from the heatmap options, checked before the scan is
    read (a bad combination is one error line, not a traceback after minutes of encoding)."""
    from .reconstruction import check_reconstruction

    iterative = {"iterations": args.iterations, "tv": args.tv, "nonneg": args.nonneg, "adjoint": args.adjoint}
    given = {k: v for k, v in iterative.items() if v is not None}
    calibration = {"score_transform": args.score_transform, "score_baseline": args.score_baseline}
    if args.method != "tonno" and (args.reconstruction != "fbp" or given or args.window is not None
                                   or any(v is not None for v in calibration.values())):
        raise CLIError(f"--reconstruction, --window and the iterative and score options apply to --method tonno, "
                       f"not to --method {args.method}")
    if args.reconstruction == "fbp" and given:
        raise CLIError(f"--{next(iter(given)).replace('_', '-')} applies to an iterative --reconstruction "
                       f"(sirt, cgls, fista), not to fbp")
    try:
        check_reconstruction(args.reconstruction, given, filter=args.filter, window=args.window, **calibration)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--reconstruction {args.reconstruction}: {exc}") from None
    return dict(reconstruction=args.reconstruction, reconstruction_options=given or None, **calibration)


def _byte_size(text: str) -> int:
    """argparse type of --max-memory: a size such as 512M or 2G."""
    from .memory import parse_bytes
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _normalize(text: str):
    """argparse type of --normalize: auto, none, imagenet, or MEAN/STD with comma-separated values per channel."""
    if text in ("auto", "none", "imagenet"):
        return text
    try:
        mean, std = text.split("/")
        return tuple(float(v) for v in mean.split(",")), tuple(float(v) for v in std.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none, imagenet or MEAN/STD (e.g. 0.5/0.25 or "
                                         f"0.485,0.456,0.406/0.229,0.224,0.225), got {text!r}") from None


def _score_baseline(text: str):
    """argparse type of --score-baseline: 'median' or a quantile in [0, 1]."""
    if text == "median":
        return text
    try:
        q = float(text)
    except ValueError:
        q = float("nan")
    if not 0.0 <= q <= 1.0:
        raise argparse.ArgumentTypeError(f"expected 'median' or a quantile in [0, 1], got {text!r}")
    return q


def _cam_heatmap(args, model, common) -> Callable:
    """Averaged / Tomographic CAM through the library's CAM functions (tonno_fast.cam): the options are checked
    here, once; returns ``compute(volume, spacing) -> heatmap``."""
    import torch

    try:
        import tonno_fast as tf
        fn = tf.averaged_cam if args.method == "averaged-cam" else tf.tomographic_cam
    except AttributeError:
        raise CLIError(f"--method {args.method} is not available in this installation of tonno_fast") from None
    module = getattr(model, "model", model)  # an Encoder from a bundle wraps the module
    if isinstance(module, torch.jit.ScriptModule):
        raise CLIError(f"--method {args.method} needs gradients through a named layer, which a TorchScript file "
                       f"cannot give; use a state-dict bundle or --encoder package.module:factory --weights state.pt")
    names = dict(module.named_modules())
    if args.target_layer not in names:
        some = ", ".join(n for n in list(names)[1:12])
        raise CLIError(f"--target-layer {args.target_layer!r} is not a layer of the encoder (layers: {some}, ...)")
    kwargs = dict(common)
    progress = kwargs.pop("progress", False)
    if args.cam is not None:
        kwargs["method"] = args.cam

    def compute(volume, spacing):
        return fn(volume, model, target_layers=[names[args.target_layer]], targets=args.class_index,
                  spacing=spacing, progress=progress, **kwargs)
    return compute


def cmd_demo(args) -> int:
    from .demo.run import main as demo_main

    argv: List[str] = ["--out", str(args.out)]
    if args.quick:
        argv.append("--quick")
    if args.seed is not None:
        argv += ["--seed", str(args.seed)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.workers is not None:
        argv += ["--workers", str(args.workers)]
    return demo_main(argv)


def _median_time(fn: Callable, repeats: int, sync: Callable) -> float:
    fn()
    sync()  # warm-up (allocations, lazy initialisation, kernel compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cmd_bench(args) -> int:
    import torch

    from .ops import backends
    from .ops.problems import make_problems
    from .ops.registry import get_backend

    device = _resolve_device(args.device)
    avail = [name for name, state in backends().items() if state == "available"]
    usable = [b for b in avail if b in (("reference", "cpu") if device == "cpu" else ("reference", "cuda", "triton"))]
    n = args.size
    if n < 4:
        raise CLIError(f"--size must be at least 4, got {n}")
    # The operators' benchmark problems (tonno_fast/ops/problems.py) at the size asked for: default slicing of
    # an n³ volume, the CAM stacks of the same directions, 4 volumes for affine_grid_sample.
    problems = make_problems(n, args.directions, stack_directions=args.directions, affine_batch=4)
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    g = problems[0]
    print(f"tonno-fast bench on {device} ({torch.get_num_threads()} threads): volume {n}³, {args.directions} "
          f"directions ({g.label}); median of {args.repeats} runs (time.perf_counter)")
    print(f"backends: {', '.join(usable)}" + (f" (unavailable here: {', '.join(sorted(set(backends()) - set(avail)))})"
                                            if set(backends()) - set(avail) else ""))
    print()
    print(f"| {'op':<20} | {'backend':<9} | {'median ms':>10} | {'throughput':>19} | {'vs reference':>12} |")
    print(f"|{'-' * 22}|{'-' * 11}|{'-' * 12}|{'-' * 21}|{'-' * 14}|")
    for problem in problems:
        inputs = problem.make_inputs(torch.device(device))
        ref = None
        for name in usable:
            be = get_backend(name, device)
            try:
                t = _median_time(lambda: problem.call(be, inputs), args.repeats, sync)
            except Exception as exc:  # one failing backend must not hide the others
                print(f"| {problem.op:<20} | {name:<9} | {'failed':>10} | {type(exc).__name__:>19} | {'':>12} |")
                continue
            if name == "reference":
                ref = t
            speed = f"{ref / t:.1f}x" if ref is not None and name != "reference" else ("1.0x" if name == "reference"
                                                                                     else "-")
            rate = f"{problem.work / t / 1e9:.3f} G {problem.unit}/s"
            print(f"| {problem.op:<20} | {name:<9} | {t * 1e3:>10.2f} | {rate:>19} | {speed:>12} |")
    sys.stdout.flush()
    return 0


# ----------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tonno-fast",
        description="ToNNO: turn a 2D image classifier into a 3D heatmap. Slices the scan at many orientations, "
                    "scores every slice with the 2D encoder and inverts the 3D Radon transform of the scores.",
        epilog="Run 'tonno-fast COMMAND --help' for the options of each command.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    h = sub.add_parser(
        "heatmap", help="compute a 3D heatmap of a NIfTI scan with a 2D encoder",
        description="Compute a 3D heatmap of a NIfTI scan (.nii/.nii.gz), or of every scan of a folder, glob or "
                    "list, with a 2D encoder and save each as NIfTI with its scan's affine, so it overlays the scan "
                    "in any viewer. Outputs are written atomically and never over an input; existing outputs are "
                    "skipped unless --overwrite. Under torchrun the processes share the work.",
        epilog="Examples:\n"
               "  tonno-fast heatmap -i scan.nii.gz -o heat.nii.gz --encoder model.pt\n"
               "  tonno-fast heatmap -i scan.nii.gz -o heat.nii.gz --encoder mypkg.nets:make_net "
               "--weights net.pt --method tomographic-cam --target-layer features.3 --png overlay.png\n"
               "  tonno-fast heatmap -i scans/ -o heatmaps/ --encoder model.pt\n"
               "  torchrun --nproc-per-node 4 -m tonno_fast heatmap -i 'scans/*.nii.gz' -o heatmaps/ "
               "--encoder model.pt\n\n"
               "The encoder gets (M, C, h, w) slices of the scan with the scan's intensities: C = 1, repeated to "
               "the channels of the model's first convolution (3 for ImageNet models), normalised as --normalize "
               "says and cast to the model's dtype, as the Python API does; it must return one score (logit) per "
               "slice, or several with --class-index.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    h.add_argument("-i", "--input", required=True, metavar="INPUT",
                   help="input scan (.nii or .nii.gz, 3D), a folder of scans, a glob pattern in quotes "
                        "('data/*/t1.nii.gz'), or a text file listing scans one a line")
    h.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                   help="output heatmap (.nii or .nii.gz) for one scan, or a folder: each heatmap is written as "
                        "OUTPUT/<the scan's file name>; never an input or an input's folder")
    h.add_argument("--overwrite", action="store_true",
                   help="recompute scans whose output exists (default: skip them, so rerunning a command after an "
                        "interruption finishes the rest)")
    h.add_argument("--fail-fast", action="store_true", help="stop at the first scan that fails (default: report "
                   "it and go on with the others)")
    h.add_argument("--split", choices=("files", "directions"),
                   help="under torchrun: give each process a share of the scans (files, the default for several "
                        "scans) or of every scan's slicing directions (directions, the default for one scan)")
    h.add_argument("--encoder", required=True, metavar="MODEL",
                   help="an encoder bundle (tonno_fast.save_encoder: weights plus the slice size, pixel spacing "
                        "and normalisation it was trained with, used unless --slice-size/--pixel-spacing say "
                        "otherwise), a TorchScript file (torch.jit.script(model).save('model.pt')), or "
                        "package.module:factory, a function that builds the nn.Module (use with --weights)")
    h.add_argument("--weights", metavar="STATE", help="state-dict file (torch.save(model.state_dict(), ...)) "
                   "loaded into the module built by package.module:factory")
    h.add_argument("--method", choices=METHODS, default="tonno",
                   help="tonno: reconstruct the per-slice scores (default, works with any encoder); "
                        "averaged-cam / tomographic-cam: backproject per-slice 2D GradCAMs (needs --target-layer "
                        "and a package.module:factory encoder)")
    h.add_argument("--target-layer", metavar="NAME", help="layer whose activations make the CAMs, as named by "
                   "model.named_modules() (e.g. features.3 or layer4)")
    h.add_argument("--cam", choices=("gradcam", "layercam"),
                   help="2D CAM used by the CAM methods (default: gradcam)")
    h.add_argument("--class-index", type=int, metavar="K", help="which output of a multi-output encoder to map")
    h.add_argument("--directions", type=int, default=64, metavar="N",
                   help="number of slicing orientations (default 64; more is sharper and slower)")
    h.add_argument("--slice-size", type=int, metavar="PX",
                   help="slice size in pixels, the encoder's input size (default: a bundle's training size, else "
                        "covers the whole scan at its finest voxel spacing)")
    h.add_argument("--pixel-spacing", type=float, metavar="MM", help="in-plane pixel spacing of the slices in mm "
                   "(default: a bundle's training pixel spacing, else the scan's finest spacing, or what makes "
                   "--slice-size cover the scan)")
    h.add_argument("--filter", default="ramp2", choices=("ramp2", "laplacian", "ramp", "none"),
                   help="reconstruction filter for tonno (default ramp2, the exact 3D inverse)")
    h.add_argument("--window", choices=("shepp-logan", "cosine", "hamming", "hann"),
                   help="window on the ramp2/ramp filter (FBP, and the start of the iterative methods)")
    h.add_argument("--reconstruction", default="fbp", choices=("fbp", "sirt", "cgls", "fista"),
                   help="fbp: filtered backprojection (default); sirt, cgls, fista: iterative least squares, "
                        "fista with non-negativity and --tv; good from fewer --directions")
    h.add_argument("--iterations", type=int, metavar="N", help="iterations of an iterative reconstruction "
                   "(default 50)")
    h.add_argument("--tv", type=float, metavar="W", help="total-variation weight of --reconstruction fista "
                   "(dimensionless; default 1e-3)")
    h.add_argument("--nonneg", action=argparse.BooleanOptionalAction, default=None,
                   help="constrain the heatmap to >= 0 (default: on for sirt and fista)")
    h.add_argument("--adjoint", choices=("exact", "backproject"),
                   help="adjoint of the plane transform in sirt/fista: exact (default) or backproject "
                        "(3-4x faster on the CPU, approximate)")
    h.add_argument("--score-transform", choices=("sigmoid", "softplus"),
                   help="monotone map of the encoder's logits before the reconstruction")
    h.add_argument("--score-baseline", type=_score_baseline, metavar="Q",
                   help="subtract each direction's median ('median') or Q-quantile of the slice scores, so "
                        "slices without lesion score about 0")
    h.add_argument("--normalize", type=_normalize, metavar="NORM",
                   help="per-channel normalisation of the encoder's input (after the 1 -> 3 channel replication a "
                        "3-channel model gets): auto (the default: a bundle's stored mean/std, else the model's timm "
                        "pretrained_cfg mean/std when it has one, else none), none, imagenet, or MEAN/STD with one "
                        "value or one per channel, e.g. 0.485,0.456,0.406/0.229,0.224,0.225")
    h.add_argument("--allow-nonfinite", action="store_true",
                   help="give NaN/inf voxels to the encoder as they are (default: such a scan is refused); the "
                        "encoder must then return finite scores")
    h.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run (default auto: the GPU when there is one)")
    h.add_argument("--batch-size", type=int, default=256, metavar="M", help="slices per encoder call (default 256)")
    h.add_argument("--max-memory", type=_byte_size, metavar="SIZE",
                   help="memory for slices and CAM stacks in flight, e.g. 512M or 2G (default 1G); runs that cannot "
                        "fit in the available memory stop before they allocate, naming the option to lower")
    h.add_argument("--png", metavar="FILE", help="also write an overlay picture (three orthogonal views)")
    h.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary line")
    h.set_defaults(func=cmd_heatmap)

    d = sub.add_parser(
        "demo", help="train an encoder on synthetic brain scans from volume labels only and compare heatmaps",
        description="The weakly-supervised demo: subjects made from the MNI152 template bundled with nilearn "
                    "(half with synthetic lesions), a small 2D CNN trained on random oblique slices with volume "
                    "labels only, then ToNNO, Averaged/Tomographic CAM and slice-wise 2D CAMs on held-out "
                    "subjects, scored with Dice. Writes NIfTI heatmaps, PNG overlays and results.md/json.")
    d.add_argument("--quick", action="store_true", help="a tiny smoke version (under a minute)")
    d.add_argument("--out", default="demo_output", metavar="DIR", help="output folder (default demo_output)")
    d.add_argument("--seed", type=int, help="random seed (default 0)")
    d.add_argument("--threads", type=int, metavar="T", help="CPU threads (default 1: reproducible, and fastest on "
                   "a busy 2-core machine)")
    d.add_argument("--workers", type=int, metavar="P", help="processes sharing the training runs (default: one per "
                   "available CPU core; the results do not depend on it)")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="time every operator on each available backend against the reference",
                       description="Print a throughput table: each operator on every available backend against "
                                   "the plain-PyTorch reference, median wall time of several runs.")
    b.add_argument("--size", type=int, default=48, metavar="N", help="volume size N³ (default 48)")
    b.add_argument("--directions", type=int, default=16, metavar="N", help="slicing orientations (default 16)")
    b.add_argument("--repeats", type=int, default=5, metavar="R", help="timed runs per case (default 5)")
    b.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (default auto)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``tonno-fast`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    retain_freed_memory_unless_disabled()  # an application's choice (tonno_fast.allocator): ~2x on the CPU
    try:
        return int(args.func(args) or 0)
    except (CLIError, MemoryError) as exc:  # MemoryBudgetError: raised before allocating, names what to lower
        text = str(exc).strip().splitlines()
        print(f"tonno-fast: error: {text[0] if text else type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tonno-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a traceback for a user; --debug shows it
        if args.debug:
            raise
        from .encoder import error_line
        print(f"tonno-fast: error: {type(exc).__name__}: {error_line(exc)} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
