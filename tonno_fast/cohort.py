"""Heatmaps of many scans: inputs from a file, a folder, a glob or a list; outputs that never overwrite data.

:func:`heatmap_files` (and ``tonno-fast heatmap -i INPUT -o OUTPUT``) runs one of the library's pipelines
(:func:`~tonno_fast.tomographic_heatmap`, :func:`~tonno_fast.averaged_cam`, :func:`~tonno_fast.tomographic_cam`) on
every scan of a study and writes each heatmap as NIfTI with its scan's affine and header.

Inputs (:func:`collect_inputs`): a ``.nii``/``.nii.gz`` file; a folder (its NIfTI files, not recursive, hidden
files skipped); a glob pattern (``'data/*/scan.nii.gz'``, ``**`` recursive); a text file listing paths one a
line (blank lines and ``#`` comments skipped; relative paths are relative to the list's folder); or, in Python,
a list of any of those.

Outputs (:func:`plan_jobs`): for one input, ``OUTPUT`` may be a file name ending in ``.nii``/``.nii.gz``;
otherwise ``OUTPUT`` is a folder and each heatmap is ``OUTPUT/<the input's file name>`` (two inputs with the
same file name are refused, as one would overwrite the other).

Never losing data (:func:`check_outputs`, before anything runs): an output that resolves to any input (through
symbolic links, ``..``, letter case on case-insensitive file systems, or a hard link: compared by device and
inode as well as by resolved path) or an output folder that is an input's folder is refused. Heatmaps are
written to a temporary file and renamed (:func:`~tonno_fast.save_nifti`), so a crash never leaves a partial file
under a final name. Existing outputs are skipped unless ``overwrite``, so rerunning the same command after an
interruption finishes the rest. One failing scan (unreadable, not 3D, NaN voxels, too large for the memory) is
reported and the others go on, unless ``fail_fast``.

Several processes (``torchrun``, see :mod:`tonno_fast.distributed`): rank 0 makes the plan (inputs, outputs,
what is left to do) and sends it to every rank, so all ranks work from one list even while outputs appear; with
``split="files"`` each rank takes a share of the scans (balanced by file size); with ``split="directions"``
every rank works on every scan, each on a share of the slicing directions, and rank 0 writes the sum.
"""
from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import distributed as dist_util
from .encoder import error_line
from .io import load_nifti, save_nifti

__all__ = ["heatmap_files", "heatmap_file", "collect_inputs", "plan_jobs", "check_outputs", "run_jobs", "read_scan",
           "process_scan", "Job", "ScanResult", "CohortReport", "CohortError", "ScanError", "PIPELINES"]

PathLike = Union[str, os.PathLike]
PIPELINES = ("tonno", "averaged-cam", "tomographic-cam")
_GLOB_CHARS = set("*?[")


class CohortError(ValueError):
    """The inputs or outputs as given cannot be used (nothing was run)."""


class ScanError(ValueError):
    """One scan cannot be used (missing, unreadable, not a 3D volume)."""


def _is_nifti(path: Union[str, Path]) -> bool:
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


# ---------------------------------------------------------------------------------------------------------
# Inputs and outputs
# ---------------------------------------------------------------------------------------------------------
def _read_list(path: Path) -> List[Path]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CohortError(f"{path} is not a NIfTI file (expected .nii or .nii.gz), nor a text file listing NIfTI "
                          f"paths one a line") from None
    except OSError as exc:
        raise CohortError(f"cannot read {path}: {exc.strerror or exc}") from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if not _is_nifti(entry):
            raise CohortError(f"{path} is not a NIfTI file (expected .nii or .nii.gz), nor a list of NIfTI paths "
                              f"(line {number}: {entry[:60]!r})")
        p = Path(entry).expanduser()
        out.append(p if p.is_absolute() else path.parent / p)
    if not out:
        raise CohortError(f"the list {path} names no scans")
    return out


def _expand(spec: PathLike) -> Tuple[List[Path], bool]:
    """One input spec → (paths, single) with ``single`` True when it named one file directly."""
    text = os.fspath(spec)
    p = Path(text).expanduser()
    if p.is_dir():
        found = sorted(q for q in p.iterdir() if _is_nifti(q) and not q.name.startswith(".") and q.is_file())
        if not found:
            raise CohortError(f"the folder {p} holds no .nii or .nii.gz files")
        return found, False
    if p.exists():
        if _is_nifti(p):
            return [p], True
        return _read_list(p), False
    if _GLOB_CHARS & set(text):
        found = sorted(Path(q) for q in glob.glob(os.path.expanduser(text), recursive=True)
                       if _is_nifti(q) and not Path(q).name.startswith(".") and Path(q).is_file())
        if not found:
            raise CohortError(f"the pattern {text!r} matches no .nii or .nii.gz files")
        return found, False
    raise CohortError(f"no such file or folder: {p}")


def collect_inputs(inputs) -> Tuple[List[Path], bool]:
    """The scans named by ``inputs`` (see the module docstring), in order, each once.

    Returns ``(paths, single)``: ``single`` is True when ``inputs`` named exactly one file directly (then the
    output may be a file name). Paths listed but missing are kept (they fail as scans, the others still run).
    Raises :class:`CohortError` when nothing usable is named.
    """
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not specs:
        raise CohortError("no inputs given")
    paths: List[Path] = []
    single = len(specs) == 1
    for spec in specs:
        found, one = _expand(spec)
        single = single and one
        paths += found
    seen, unique = set(), []
    for p in paths:
        key = os.path.normcase(os.path.realpath(p))
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, single


@dataclass(frozen=True)
class Job:
    """One scan to map: ``input`` → ``output``."""

    input: Path
    output: Path


def _output_is_folder(output: Path, text: str) -> bool:
    if _is_nifti(output):
        return False
    if output.is_dir() or text.endswith(("/", os.sep)) or output.suffix == "":
        return True
    raise CohortError(f"-o/--output {text}: must end in .nii or .nii.gz (a heatmap file), or be a folder (an "
                      f"existing one, or a name without a file extension)")


def plan_jobs(inputs: Sequence[Path], output: PathLike, *, single: bool = False) -> List[Job]:
    """Pair every input with its output path: ``output`` itself for a single input and a NIfTI file name,
    else ``output/<input file name>``. Raises :class:`CohortError` for a file name with several inputs, or
    two inputs with the same file name."""
    text = os.fspath(output)
    out = Path(text).expanduser()
    if not _output_is_folder(out, text):
        if len(inputs) != 1:
            raise CohortError(f"-o/--output {text}: {len(inputs)} inputs need an output folder, not a file name")
        return [Job(Path(inputs[0]), out)]
    if out.exists() and not out.is_dir():
        raise CohortError(f"-o/--output {text}: exists and is not a folder")
    by_name: Dict[str, Path] = {}
    jobs = []
    for p in inputs:
        p = Path(p)
        other = by_name.get(p.name.lower())
        if other is not None:
            raise CohortError(f"two inputs have the file name {p.name!r} ({other} and {p}): their heatmaps would "
                              f"overwrite each other in {out}; give them different names or run them separately")
        by_name[p.name.lower()] = p
        jobs.append(Job(p, out / p.name))
    return jobs


def _identity(path: Path) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _real(path: Path) -> str:
    return os.path.normcase(os.path.realpath(path))


def check_outputs(jobs: Sequence[Job], *, folder_mode: bool) -> None:
    """Refuse (:class:`CohortError`) any output that is one of the inputs, or an output folder that holds an
    input. Files are compared by resolved path and, when both exist, by device and inode (hard links, symbolic
    links, letter case on case-insensitive file systems)."""
    in_real = {_real(j.input): j.input for j in jobs}
    in_ids = {}
    in_dirs = {}
    for j in jobs:
        ident = _identity(j.input)
        if ident is not None:
            in_ids[ident] = j.input
        folder = _identity(j.input.parent)
        if folder is not None:
            in_dirs[folder] = j.input
    in_dir_real = {_real(j.input.parent): j.input for j in jobs}
    for j in jobs:
        if folder_mode:
            folder = _identity(j.output.parent)
            hit = in_dirs.get(folder) if folder is not None else None
            hit = hit or in_dir_real.get(_real(j.output.parent))
            if hit is not None:
                raise CohortError(f"refusing to write into {j.output.parent}: it is the folder of the input scan "
                                  f"{hit}; choose another output folder")
        hit = in_real.get(_real(j.output))
        ident = _identity(j.output)
        if hit is None and ident is not None:
            hit = in_ids.get(ident)
        if hit is not None:
            raise CohortError(f"refusing to write {j.output}: it is the input scan {hit}; choose another output")


@dataclass
class Plan:
    """What a run will do: every job, and those whose output does not exist yet (or all with ``overwrite``)."""

    jobs: List[Job]
    pending: List[Job]
    single: bool
    sizes: List[int] = field(default_factory=list)  # bytes of each pending input (0 when missing)


def make_plan(inputs, output, *, overwrite: bool = False) -> Plan:
    """:func:`collect_inputs`, :func:`plan_jobs`, :func:`check_outputs`, and the list of jobs still to run."""
    paths, single = collect_inputs(inputs)
    jobs = plan_jobs(paths, output, single=single)
    folder_mode = not (len(jobs) == 1 and _is_nifti(os.fspath(output)))
    check_outputs(jobs, folder_mode=folder_mode)
    pending = [j for j in jobs if overwrite or not os.path.lexists(j.output)]
    sizes = []
    for j in pending:
        try:
            sizes.append(j.input.stat().st_size)
        except OSError:
            sizes.append(0)
    return Plan(jobs, pending, single and len(jobs) == 1, sizes)


def shared_plan(inputs, output, *, overwrite: bool = False, ctx: Optional[dist_util.DistContext] = None) -> Plan:
    """:func:`make_plan` on rank 0, sent to every rank (one list for all, even while outputs appear). A
    :class:`CohortError` on rank 0 is raised on every rank."""
    ctx = ctx or dist_util.context()
    if not ctx.distributed:
        return make_plan(inputs, output, overwrite=overwrite)
    answer = None
    if ctx.is_main:
        try:
            answer = make_plan(inputs, output, overwrite=overwrite)
        except CohortError as exc:
            answer = exc
    answer = dist_util.broadcast_object(answer, 0, ctx.group)
    if isinstance(answer, CohortError):
        raise answer
    return answer


# ---------------------------------------------------------------------------------------------------------
# One scan
# ---------------------------------------------------------------------------------------------------------
def read_scan(path: PathLike):
    """:func:`~tonno_fast.load_nifti` with one :class:`ScanError` for every way a scan can be unusable
    (missing, unreadable, not NIfTI, not a 3D volume)."""
    try:
        scan = load_nifti(path)
    except FileNotFoundError:
        raise ScanError(f"no such file: {path}") from None
    except (ValueError, TypeError) as exc:
        raise ScanError(str(exc)) from None
    if min(scan.data.shape) < 2:
        raise ScanError(f"{path}: a 3D volume is needed, got shape {tuple(scan.data.shape)} (a 2D image or a "
                        f"single slice)")
    return scan


def _as_3d(heat: torch.Tensor) -> torch.Tensor:
    if heat.ndim > 3 and heat.numel() == heat.shape[-3:].numel():
        heat = heat.reshape(heat.shape[-3:])
    if heat.ndim != 3:
        raise ValueError(f"the method returned a heatmap of shape {tuple(heat.shape)}; expected one 3D map "
                         f"(select one encoder output)")
    return heat


def process_scan(job: Job, compute: Callable[[torch.Tensor, Tuple[float, float, float]], torch.Tensor], *,
                 device="cpu", write: bool = True):
    """Read ``job.input``, ``heat = compute(volume (D, H, W) on device, spacing (sz, sy, sx) mm)``, check it is
    one finite 3D map and (if ``write``) save it atomically to ``job.output`` with the scan's affine and header.
    Returns ``(scan, heat)``."""
    scan = read_scan(job.input)
    heat = _as_3d(compute(scan.data.to(device), scan.spacing))
    if not bool(torch.isfinite(heat).all()):
        raise ValueError(f"the heatmap of {job.input} has NaN or inf values (not written)")
    if write:
        save_nifti(job.output, heat.float().cpu(), scan.affine, header=scan.header)
    return scan, heat


# ---------------------------------------------------------------------------------------------------------
# Running a plan
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ScanResult:
    """The outcome of one scan: ``status`` is ``"written"``, ``"skipped"`` (output existed), ``"failed"``
    (``error`` says why) or ``"not run"`` (after a failure with ``fail_fast``)."""

    input: str
    output: str
    status: str
    seconds: float = 0.0
    error: Optional[str] = None
    rank: int = 0


@dataclass
class CohortReport:
    """Every scan's :class:`ScanResult` and the run's wall time; ``ok`` when none failed."""

    results: List[ScanResult]
    seconds: float
    processes: int = 1

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0

    @property
    def failed(self) -> List[ScanResult]:
        return [r for r in self.results if r.status == "failed"]

    def summary(self) -> str:
        parts = [f"{self.count('written')} written"]
        if self.count("skipped"):
            parts.append(f"{self.count('skipped')} skipped (output exists)")
        parts.append(f"{self.count('failed')} failed")
        if self.count("not run"):
            parts.append(f"{self.count('not run')} not run (fail fast)")
        procs = f" on {self.processes} processes" if self.processes > 1 else ""
        return f"{', '.join(parts)}, of {len(self.results)} scans in {self.seconds:.1f} s{procs}"


class Fatal(Exception):
    """Raised by a scan's function for an error that would fail every scan (a bad option): the run stops on
    this rank and the error is raised on every rank once they meet."""


def _one_line(exc: BaseException) -> str:
    body = error_line(exc) if str(exc).strip() else ""
    if isinstance(exc, (ScanError, CohortError, MemoryError)) or type(exc).__name__ == "CLIError":
        return body or type(exc).__name__
    return f"{type(exc).__name__}: {body}" if body else type(exc).__name__


def run_jobs(plan: Plan, process: Callable[[Job], None], *, fail_fast: bool = False, split: str = "files",
             ctx: Optional[dist_util.DistContext] = None,
             on_result: Optional[Callable[[ScanResult], None]] = None) -> CohortReport:
    """Run ``process(job)`` for the pending jobs of ``plan`` and collect a :class:`CohortReport` (on every rank).

    ``split="files"``: each rank runs its :func:`~tonno_fast.distributed.shard` of the pending jobs (balanced by
    input size). ``split="directions"``: every rank runs every job (``process`` splits the work inside and
    must then raise on every rank or on none, as the pipelines' ``process_group`` mode does). A failing job is
    recorded and the others go on; with ``fail_fast`` the run stops after the first failure on any rank (the
    ranks meet after every scan to agree on that). ``process`` may raise :class:`Fatal` to stop everything.
    ``on_result`` is called on the rank that ran a scan, right after it.
    """
    if split not in ("files", "directions"):
        raise ValueError(f"split must be 'files' or 'directions', got {split!r}")
    ctx = ctx or dist_util.context()
    t0 = time.perf_counter()
    pending = set(plan.pending)
    results: List[ScanResult] = []
    if ctx.is_main:
        results += [ScanResult(str(j.input), str(j.output), "skipped") for j in plan.jobs if j not in pending]
    if split == "files":
        mine = dist_util.shard(plan.pending, ctx.rank, ctx.world_size, plan.sizes)
    else:
        mine = list(plan.pending)
    # With fail_fast and a share per rank, the ranks meet after every scan to agree whether to stop: every rank
    # runs as many rounds as the largest share, idle when its own share is done.
    sync = fail_fast and ctx.distributed and split == "files"
    rounds = max(dist_util.gather_objects(len(mine), ctx.group)) if sync else len(mine)
    record = ctx.is_main or split == "files"
    fatal: Optional[BaseException] = None
    for i in range(rounds):
        failed = False
        if i < len(mine):
            job = mine[i]
            t = time.perf_counter()
            try:
                process(job)
                res = ScanResult(str(job.input), str(job.output), "written", time.perf_counter() - t, rank=ctx.rank)
            except Fatal as exc:
                fatal = exc.__cause__ or exc
                res = ScanResult(str(job.input), str(job.output), "failed", time.perf_counter() - t,
                                 _one_line(fatal), ctx.rank)
                failed = True
            except Exception as exc:  # one scan's failure must not stop the cohort
                res = ScanResult(str(job.input), str(job.output), "failed", time.perf_counter() - t,
                                 _one_line(exc), ctx.rank)
                failed = True
            if record:
                results.append(res)
                if on_result is not None:
                    on_result(res)
        if sync:
            flag = torch.tensor([1.0 if failed or fatal is not None else 0.0])
            if dist_util.all_reduce_sum(flag, ctx.group).item() > 0:
                break
        elif fatal is not None or (failed and fail_fast):
            break
    if record:
        done = {r.input for r in results}
        results += [ScanResult(str(j.input), str(j.output), "not run", rank=ctx.rank)
                    for j in mine if str(j.input) not in done]
    fatal_any = dist_util.gather_objects(None if fatal is None else _one_line(fatal), ctx.group)
    gathered = dist_util.gather_objects(results, ctx.group)
    merged = [r for part in gathered for r in part]
    order = {str(j.input): k for k, j in enumerate(plan.jobs)}
    merged.sort(key=lambda r: order.get(r.input, len(order)))
    report = CohortReport(merged, time.perf_counter() - t0, ctx.world_size)
    first_fatal = next((f for f in fatal_any if f is not None), None)
    if fatal is not None:
        raise fatal
    if first_fatal is not None:
        raise Fatal(first_fatal)
    return report


# ---------------------------------------------------------------------------------------------------------
# The Python API
# ---------------------------------------------------------------------------------------------------------
def _pipeline_function(pipeline: str):
    from . import averaged_cam, tomographic_cam, tomographic_heatmap
    table = {"tonno": tomographic_heatmap, "averaged-cam": averaged_cam, "tomographic-cam": tomographic_cam}
    if pipeline not in table:
        raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
    return table[pipeline]


def heatmap_file(input: PathLike, output: PathLike, encoder, *, pipeline: str = "tonno", device=None,
                 process_group=None, **options) -> torch.Tensor:
    """One scan: read the NIfTI ``input``, run ``pipeline`` with the scan's voxel spacing, write ``output``
    atomically with the scan's affine and header. Returns the heatmap ``(D, H, W)`` (float32).

    ``pipeline``: ``"tonno"`` (:func:`~tonno_fast.tomographic_heatmap`), ``"averaged-cam"`` or
    ``"tomographic-cam"`` (:func:`~tonno_fast.averaged_cam`, :func:`~tonno_fast.tomographic_cam`); ``options``
    are that function's keyword arguments (``n_directions``, ``filter``, ``target_layers``, the CAM ``method``,
    ...; not ``spacing``, which comes from the file). ``device``: where the volume goes (default: the CPU).
    ``process_group``: split the directions over its ranks (every rank returns the heatmap, rank 0 writes).
    Nothing checks here that ``output`` differs from ``input``; :func:`heatmap_files` does.
    """
    fn = _pipeline_function(pipeline)
    if "spacing" in options:
        raise TypeError("spacing comes from the NIfTI file; do not pass it to heatmap_file/heatmap_files")
    if process_group is not None:
        options = dict(options, process_group=process_group)
    rank0 = process_group is None or dist_util.context(process_group).is_main
    _, heat = process_scan(Job(Path(input), Path(output)),
                           lambda volume, spacing: fn(volume, encoder, spacing=spacing, **options),
                           device=device or "cpu", write=rank0)
    return heat


def heatmap_files(inputs, output: PathLike, encoder, *, pipeline: str = "tonno", overwrite: bool = False,
                  fail_fast: bool = False, device=None, split: Optional[str] = None, progress: bool = False,
                  **options) -> CohortReport:
    """Heatmaps of many scans (see the module docstring for what ``inputs`` and ``output`` may be).

    Args:
        inputs: a NIfTI file, a folder, a glob pattern, a text file listing paths, or a list of those.
        output: a folder (``output/<input file name>`` per scan), or a ``.nii``/``.nii.gz`` name for one input.
        encoder: as for the pipeline's function (an ``nn.Module``, a callable, a :class:`~tonno_fast.Encoder`).
        pipeline: ``"tonno"``, ``"averaged-cam"`` or ``"tomographic-cam"``.
        overwrite: recompute scans whose output exists (default: skip them, so a rerun resumes).
        fail_fast: stop after the first failing scan.
        device: where volumes go (default: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU).
        split: under ``torchrun`` (the process group is joined here when the caller has not, and left again
            at the end): ``"files"`` (each rank a share of the scans; the default for several scans) or
            ``"directions"`` (every scan split by directions over the ranks; the default for one scan).
        progress: print one line per scan (and the summary on rank 0).
        options: keyword arguments of the pipeline's function (``n_directions``, ``filter``, ``batch_size``,
            ``max_memory``, ``target_layers``, the CAM ``method``, ...).

    Returns:
        A :class:`CohortReport` (the same on every rank): ``report.ok``, ``report.failed``, ``report.summary()``.

    Raises:
        CohortError: nothing to run, an output that would overwrite an input, or outputs that collide; raised
        before any scan is read.
    """
    _pipeline_function(pipeline)
    with dist_util.session(device or "auto") as (ctx, dev):
        plan = shared_plan(inputs, output, overwrite=overwrite, ctx=ctx)
        if split is None:
            split = "directions" if len(plan.jobs) == 1 else "files"
        group = ctx.group if (split == "directions" and ctx.distributed) else None
        kwargs = dict(options, process_group=group) if group is not None else options

        def process(job: Job) -> None:
            heatmap_file(job.input, job.output, encoder, pipeline=pipeline, device=dev, **kwargs)

        def show(res: ScanResult) -> None:
            if progress:
                tail = f": {res.error}" if res.error else f" ({res.seconds:.1f} s)"
                print(f"{res.status} {res.output if res.status == 'written' else res.input}{tail}", flush=True)

        report = run_jobs(plan, process, fail_fast=fail_fast, split=split, ctx=ctx, on_result=show)
    if progress and ctx.is_main:
        print(report.summary(), flush=True)
    return report
