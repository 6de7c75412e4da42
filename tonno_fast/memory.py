"""Memory estimates made before a pipeline allocates, so a run that cannot fit stops with a clear error instead
of being killed by the kernel's out-of-memory killer.

:func:`pipeline_memory` is the one estimate every pipeline uses (ToNNO scores, Averaged/Tomographic CAM, the
slice-wise baseline): it lists the large allocations of a run by name, each with the parameter that makes it
smaller. :func:`check_memory` compares the total with what the device has available (:func:`available_memory`)
and raises :class:`MemoryBudgetError` naming the parameter to lower. The pipelines call it twice: before the
geometry is built (``N``-sized tables: one hundred million directions are 10 GB of float64 frames before a
single slice is cut), and once the number of encoder outputs ``K`` is known, before the sinogram or the output
accumulator is allocated.

What is counted (bytes; ``e`` the element size of the volume's dtype, ``c`` the channels the model sees):

* ``geometry``: the direction tables, :data:`GEOMETRY_BYTES_PER_DIRECTION` per direction;
* ``volume``: one prepared copy of the volume (the encoder's window makes one), ``B·C·D·H·W·e``;
* ``slices``: slices in flight, as the streaming loop bounds them: at most ``max_memory / 4`` and at most all of
  them, at least one slice position with its context halo;
* ``batch``: one encoder input batch, ``batch_size·c·h·w·4`` (channel replication and normalisation copy it);
* ``sinogram`` (scores): ``B·K·N·S·e`` twice (the chunk buffers and their concatenation), plus the filter's
  work: the FFT filters pad every row to ``L`` = a power of two ≥ ``2S`` and hold about four such rows;
* ``stacks`` (CAM): chunk buffers, at most ``max_memory / 2`` but at least one direction (``B·K·S·h·w·e``),
  and the filter work (``max_memory / 4``);
* ``output``: the heatmap ``B·K·D·H·W`` (a float64 accumulator plus a chunk's part for the CAMs; the iterative
  solvers hold about :data:`ITERATIVE_VOLUMES` volumes and :data:`ITERATIVE_SINOGRAMS` sinograms).

Not counted: the model's own weights and activations for one batch (unknown here; ``batch_size`` bounds them),
and small constant-size buffers. The available memory is the device's free memory: on the CPU the kernel's
``MemAvailable`` (or ``psutil`` when installed), lowered to the cgroup's limit when there is one, and shared by
the processes of this node under ``torchrun`` (``LOCAL_WORLD_SIZE``); on a GPU ``torch.cuda.mem_get_info`` plus
what PyTorch's caching allocator holds unused.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

__all__ = ["MemoryBudgetError", "MemoryEstimate", "available_memory", "pipeline_memory", "check_memory",
           "check_pipeline", "geometry_dims", "parse_bytes", "format_bytes", "GEOMETRY_BYTES_PER_DIRECTION"]

#: Bytes per direction of the geometry tables, measured as the peak RSS growth of
#: ``make_geometry((64, 64, 64), n_directions=N)`` plus the streaming loop's ``slice_maps`` at N = 10⁶ and
#: 4·10⁶: 426 and 419 bytes (Fibonacci points, frames, weights and their float64 temporaries). Rounded up.
GEOMETRY_BYTES_PER_DIRECTION = 512
#: Volumes and sinograms an iterative solver holds at once (FISTA-TV: iterate, previous iterate, extrapolated
#: point, gradient, three TV dual fields, the SIRT diagonal or the recorded radon input; residual, forward
#: projection, weighted residual, calibrated scores, the recorded radon output), counted from
#: tonno_fast/reconstruction.py.
ITERATIVE_VOLUMES = 9
ITERATIVE_SINOGRAMS = 6
#: The check refuses a run whose estimate exceeds this fraction of the available memory: the estimate leaves out
#: the model's activations and allocator fragmentation.
HEADROOM = 0.9


class MemoryBudgetError(MemoryError):
    """A run would need more memory than the device has available; raised before the large allocations.

    Attributes:
        estimate: the :class:`MemoryEstimate`.
        available: bytes available (after dividing between the processes of a node).
        parameter: the argument that lowers the largest part (e.g. ``"n_directions"``).
    """

    def __init__(self, message: str, estimate: "MemoryEstimate", available: int, parameter: str):
        super().__init__(message)
        self.estimate, self.available, self.parameter = estimate, available, parameter


@dataclass
class MemoryEstimate:
    """Named parts of a run's memory: ``parts[name] = (bytes, parameter that lowers it, detail)``."""

    device: torch.device
    parts: Dict[str, Tuple[int, str, str]] = field(default_factory=dict)

    def add(self, name: str, nbytes: int, parameter: str, detail: str = "") -> None:
        self.parts[name] = (int(nbytes), parameter, detail)

    @property
    def total(self) -> int:
        return sum(b for b, _, _ in self.parts.values())

    def largest(self) -> Tuple[str, int, str, str]:
        name = max(self.parts, key=lambda k: self.parts[k][0])
        return (name,) + self.parts[name]

    def describe(self, n: int = 3) -> str:
        items = sorted(self.parts.items(), key=lambda kv: -kv[1][0])[:n]
        return ", ".join(f"{name} {format_bytes(b)}" + (f" ({detail})" if detail else "")
                         for name, (b, _, detail) in items if b > 0)


def format_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10 ** 3, "kib": 1 << 10, "m": 1 << 20, "mb": 10 ** 6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10 ** 9, "gib": 1 << 30, "t": 1 << 40, "tb": 10 ** 12, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """``'512M'``, ``'2GiB'``, ``'1.5G'``, ``'1000000'`` → bytes (K/M/G/T and KiB/MiB/GiB/TiB are powers of
    1024, KB/MB/GB/TB powers of 1000). Raises ``ValueError`` for anything else or a value below one byte."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size such as 512M, 2G or 1000000 (bytes), got {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise ValueError(f"expected a size of at least one byte, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------------------
# What is available
# ---------------------------------------------------------------------------------------------------------
def _meminfo_available() -> Optional[int]:
    try:
        import psutil  # optional: a more portable answer where it is installed
        return int(psutil.virtual_memory().available)
    except Exception:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _cgroup_available() -> Optional[int]:
    """Bytes left under this process's cgroup memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``),
    counting reclaimable page cache as free; ``None`` without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    root = Path("/sys/fs/cgroup")
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":  # cgroup v2
            folders, limit_name, usage_name, cache_key = [root / rel, root], "memory.max", "memory.current", \
                "inactive_file"
        elif "memory" in controllers.split(","):
            folders, limit_name, usage_name, cache_key = [root / "memory" / rel, root / "memory"], \
                "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
        else:
            continue
        for folder in folders:
            limit = _read_int(folder / limit_name)
            usage = _read_int(folder / usage_name)
            if limit is None or usage is None:
                continue
            if limit >= 1 << 60:  # cgroup v1 spells "no limit" as a huge number
                return None
            cache = 0
            try:
                for stat in (folder / "memory.stat").read_text().splitlines():
                    key, _, value = stat.partition(" ")
                    if key == cache_key:
                        cache = int(value)
            except (OSError, ValueError):
                pass
            return max(0, limit - usage + cache)
    return None


def available_memory(device) -> Tuple[Optional[int], str]:
    """``(bytes, where from)`` this process may still allocate on ``device``; ``(None, reason)`` when it cannot
    be known (then no check is made). Under ``torchrun`` the CPU memory of a node is divided by the number of
    processes on it (``LOCAL_WORLD_SIZE``)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(free + max(0, cached)), f"free memory of cuda:{index}"
    if dev.type != "cpu":
        return None, f"no memory query for {dev.type}"
    avail = _meminfo_available()
    source = "MemAvailable"
    limit = _cgroup_available()
    if limit is not None and (avail is None or limit < avail):
        avail, source = limit, "the cgroup memory limit"
    if avail is None:
        return None, "no /proc/meminfo"
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    if local > 1:
        return avail // local, f"{source} shared by {local} processes on this node"
    return avail, source


# ---------------------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------------------
def _padded_length(n: int) -> int:
    from .filters import _padded_length as padded
    return padded(n)


def pipeline_memory(volume_shape, *, device, dtype=torch.float32, kind: str = "scores", n_directions: int,
                    n_slices: int, height: int, width: int, outputs: int = 1, model_channels: Optional[int] = None,
                    halo: int = 0, batch_size: int = 256, max_memory: int = 1 << 30, filter: str = "ramp2",
                    reconstruction: Optional[str] = "fbp", share: Optional[int] = None) -> MemoryEstimate:
    """The memory a pipeline run will hold at its peak, by part (see the module docstring).

    Args:
        volume_shape: ``(B, C, D, H, W)``.
        device, dtype: the volume's device and dtype (float32 or float64).
        kind: ``"scores"`` (ToNNO: one score per slice), ``"stacks"`` (Averaged/Tomographic CAM: a 2D map per
            slice, filtered and backprojected chunk by chunk) or ``"axial"`` (the slice-wise baseline: one stack
            of ``D`` axial slices).
        n_directions, n_slices, height, width: the geometry ``N``, ``S``, ``h``, ``w``.
        outputs: encoder outputs ``K`` (scores or CAMs per slice).
        model_channels: channels of a slice as the model sees it (default ``C``: no context slices).
        halo: extra slices read on each side for context channels.
        batch_size: slices per encoder call.
        max_memory: the streaming budget in bytes.
        filter: the reconstruction filter (``"none"`` filters nothing).
        reconstruction: ``"fbp"``, an iterative method (``"sirt"``, ``"cgls"``, ``"fista"``), or ``None`` for
            scores alone (no output volume).
        share: directions this process handles when the directions are split over processes (default all).

    Returns:
        A :class:`MemoryEstimate`.
    """
    B, C, D, H, W = (int(s) for s in volume_shape)
    N, S, h, w, K = int(n_directions), int(n_slices), int(height), int(width), max(1, int(outputs))
    n_mine = N if share is None else int(share)
    e = torch.empty((), dtype=dtype).element_size()
    c = C if model_channels is None else int(model_channels)
    voxels = B * D * H * W
    est = MemoryEstimate(torch.device(device))
    if kind != "axial":
        est.add("geometry", N * GEOMETRY_BYTES_PER_DIRECTION, "n_directions", f"{N} directions")
    est.add("volume", voxels * C * e, "the scan's size")
    per_position = B * h * w * e * (C + (c if c != C else 0))
    in_flight = min(max_memory // 4, B * n_mine * (S + 2 * halo) * per_position)
    est.add("slices", max(in_flight, (1 + 2 * halo) * per_position), "max_memory",
            f"slices of {h}x{w} in flight")
    est.add("batch", min(batch_size, B * n_mine * S) * max(c, 3) * h * w * 4, "batch_size",
            f"{batch_size} slices per encoder call")
    if kind == "scores":
        sino = B * K * n_mine * S * e
        filt = 0 if filter == "none" else (3 * sino if filter == "laplacian" else
                                           4 * B * K * n_mine * _padded_length(S) * max(e, 4))
        detail = f"{K} output(s) x {n_mine} directions x {S} slices"
        if reconstruction is None:  # the scores alone: chunk buffers and their concatenation
            est.add("sinogram", 2 * sino, "n_directions", detail)
        elif reconstruction == "fbp":
            est.add("sinogram", 2 * sino + filt, "n_directions", detail)
            est.add("output", B * K * D * H * W * e, "the scan's size" if K == 1 else "outputs", f"{K} volume(s)")
        else:  # the solver runs on the whole sinogram, also when the scoring is split
            est.add("sinogram", 2 * sino + filt + ITERATIVE_SINOGRAMS * B * K * N * S * e, "n_directions", detail)
            est.add("output", ITERATIVE_VOLUMES * B * K * D * H * W * e, "reconstruction",
                    f"{ITERATIVE_VOLUMES} volumes of the iterative solver")
    else:
        held = B * K * S * h * w * e  # one direction's stack: the smallest chunk the loop can make
        chunk = min(max(max_memory // 2, held), n_mine * held)
        est.add("stacks", chunk, "max_memory" if chunk > held else "slice_size",
                f"CAM stacks of {S} slices of {h}x{w}")
        if filter != "none" and kind == "stacks":
            est.add("filter", min(max_memory // 4, chunk) + S * S * e, "max_memory", "filter work")
        acc = 8 if kind == "stacks" else e  # float64 accumulator for the projected CAMs
        est.add("output", B * K * D * H * W * (acc + e), "the scan's size" if K == 1 else "outputs",
                f"{K} volume(s)")
    return est


_HINTS = {
    "n_directions": "lower n_directions",
    "max_memory": "lower max_memory",
    "batch_size": "lower batch_size",
    "slice_size": "lower slice_size (or raise pixel_spacing)",
    "reconstruction": "use reconstruction='fbp'",
    "outputs": "select fewer encoder outputs",
    "the scan's size": "crop or downsample the scan",
}


def check_memory(estimate: MemoryEstimate, *, what: str = "this run") -> None:
    """Raise :class:`MemoryBudgetError` when ``estimate.total`` exceeds :data:`HEADROOM` of the memory available
    on ``estimate.device``; the message names the largest parts and the parameter that lowers the largest."""
    available, source = available_memory(estimate.device)
    if available is None:
        return
    total = estimate.total
    if total <= HEADROOM * available:
        return
    name, nbytes, parameter, detail = estimate.largest()
    raise MemoryBudgetError(
        f"{what} needs about {format_bytes(total)} on {estimate.device} ({estimate.describe()}) but "
        f"{format_bytes(available)} is available ({source}); {_HINTS.get(parameter, 'lower ' + parameter)}",
        estimate, available, parameter)


def geometry_dims(volume_shape, *, n_directions: int = 64, directions=None, **geometry_args) -> Tuple[int, ...]:
    """``(N, S, h, w)`` of ``make_geometry(volume_shape, n_directions=..., directions=..., **geometry_args)``
    without building its ``N``-sized tables: the slicing of one direction is built instead (the sizes do not
    depend on the directions). Invalid ``n_directions`` or ``directions`` count as 1 here; ``make_geometry``
    refuses them right after."""
    from .geometry import make_geometry

    probe = make_geometry(volume_shape, directions=[[0.0, 0.0, 1.0]], **geometry_args)
    n = 1  # for anything make_geometry refuses: it raises its own error next
    if directions is not None:
        try:
            n = max(1, len(directions))
        except TypeError:
            pass
    elif isinstance(n_directions, int) and not isinstance(n_directions, bool) and n_directions > 0:
        n = n_directions
    return n, probe.n_slices, probe.height, probe.width


def check_pipeline(what: str, volume: torch.Tensor, encoder, dims, *, kind: str, outputs: int = 1,
                   batch_size: int, max_memory: int, filter: str = "none", reconstruction: Optional[str] = None,
                   group=None) -> MemoryEstimate:
    """The check every pipeline makes before it allocates: :func:`pipeline_memory` for ``volume``
    ``(B, C, D, H, W)`` (its device and dtype), the :class:`~tonno_fast.Encoder` ``encoder`` (context channels),
    geometry sizes ``dims = (N, S, h, w)`` and ``outputs`` encoder outputs, then :func:`check_memory`.
    ``reconstruction=None`` counts no output volume (the sinogram alone, as :func:`~tonno_fast.encode_slices`
    makes). ``group``: the directions are split over this process group (each rank holds its share). Raises
    :class:`MemoryBudgetError`; returns the estimate."""
    N, S, h, w = dims
    share = None
    if group is not None:
        from .distributed import context, direction_share
        ctx = context(group)
        mine = direction_share(N, ctx.rank, ctx.world_size)
        share = mine.stop - mine.start
    est = pipeline_memory(volume.shape, device=volume.device, dtype=volume.dtype, kind=kind, n_directions=N,
                          n_slices=S, height=h, width=w, outputs=outputs,
                          model_channels=volume.shape[1] * (2 * encoder.context + 1), halo=encoder.halo,
                          batch_size=batch_size, max_memory=max_memory, filter=filter,
                          reconstruction=reconstruction, share=share)
    check_memory(est, what=what)
    return est
