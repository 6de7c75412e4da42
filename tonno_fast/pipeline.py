"""ToNNO end to end: slice a volume, score every slice with a 2D encoder, invert the Radon transform.

All pipelines (ToNNO scores here, Averaged/Tomographic/slice-wise CAM in :mod:`tonno_fast.cam.pipelines`) run
through ONE streaming loop, :func:`encode_chunks` (docs/design.md, "Streaming"). It walks the directions in
*chunks*; within a chunk it makes the slices of a few directions (or of a range of slices of one direction) at a
time, sends them through the encoder in batches of ``batch_size``, writes the per-slice results (scores ``(K,)`` or CAMs
``(K, h, w)``) into the chunk's buffer ``(B, K, n, S, ...)`` and hands the full buffer to a ``finish``
callback (store the scores; or filter and backproject the CAM stacks into an accumulator), then frees it.

Peak memory is set by ``max_memory`` (bytes), never by ``N × S``:

* at most ``max_memory / 2`` of chunk buffers (CAM stacks; the score buffers are tiny),
* at most ``max_memory / 4`` of slices in flight (as sliced, plus their context/z-scored copy),
* at most ``max_memory / 4`` of filter work (the CAM stacks are filtered a few pixel rows at a time),

plus what does not depend on the geometry's size: the volume, the output accumulator, the encoder's
activations for one batch (``batch_size``), and the backend's own temporaries (the reference backend's
coordinate grids, ≤ 256 MiB). On the CPU, memory freed during the loop is kept for reuse, up to
``max_memory / 4`` (:func:`tonno_fast.allocator.reuse_cpu_memory`), so that each batch does not page-fault its
memory in afresh; it mostly holds what the next item or batch takes again. A CAM buffer always holds at least
one whole direction (``K × S × h × w``), because the filter and the trilinear backprojection need every slice of
a stack.

Slice ranges of a direction are the geometry's own stacks moved along their normals
(:meth:`~tonno_fast.geometry.Geometry.with_slices`), which is also how the context slices at ``k ± step`` beyond
the ends of a stack are obtained.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .allocator import reuse_cpu_memory
from .distributed import all_or_none, reconstruct_split, split_directions
from .encoder import Encoder, as_encoder
from .geometry import Geometry, make_geometry
from .memory import check_pipeline, geometry_dims
from .ops import slice_volume
from .reconstruction import check_reconstruction, reconstruct
from .validation import as_volume5d, finite_float, scan_and_spacing

__all__ = ["tomographic_heatmap", "encode_slices", "encode_chunks", "HeatmapResult", "plan_geometry", "resolve_geometry",
           "GeometrySlicer", "AxialSlicer", "DEFAULT_MAX_MEMORY", "resolve_batch_size", "resolve_max_memory",
           "resolve_slice_size"]

DEFAULT_MAX_MEMORY = 1 << 30  # 1 GiB: a few directions of CAM stacks of a 256³ volume
DEFAULT_BATCH_SIZE = 256


def resolve_batch_size(batch_size: Optional[int], encoder: Encoder) -> int:
    """``batch_size`` if given, else the encoder's, else ``DEFAULT_BATCH_SIZE``."""
    if batch_size is None:
        batch_size = encoder.batch_size or DEFAULT_BATCH_SIZE
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def resolve_max_memory(max_memory) -> int:
    """``max_memory`` in bytes if given, else ``DEFAULT_MAX_MEMORY``."""
    if max_memory is None:
        return DEFAULT_MAX_MEMORY
    if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1:
        raise ValueError(f"max_memory must be None or a positive number of bytes, got {max_memory!r}")
    return max_memory


# ---------------------------------------------------------------------------------------------------------
# Slicers: where the slices of the loop come from.
# ---------------------------------------------------------------------------------------------------------
class GeometrySlicer:
    """Oblique slices of ``volume`` ``(B, C, D, H, W)`` for ``geometry``; ``self(n0, n1, k0, k1)`` →
    ``(B, n1 - n0, k1 - k0, C, h, w)``: slices ``k0 ≤ k < k1`` of directions ``n0 ≤ n < n1``. ``k`` may lie
    outside ``[0, S)``: those are the parallel planes ``Δs`` further out (used for context channels)."""

    def __init__(self, volume: torch.Tensor, geometry: Geometry, *, fill: float = 0.0, backend: str = "auto",
                 out_dtype: Optional[torch.dtype] = None):
        self.volume, self.geometry, self.fill, self.out_dtype = volume, geometry, float(fill), out_dtype
        self.backend = backend
        self.n_directions, self.n_slices = geometry.n_directions, geometry.n_slices
        self.height, self.width = geometry.height, geometry.width

    def __call__(self, n0: int, n1: int, k0: int, k1: int) -> torch.Tensor:
        part = self.geometry.with_directions(slice(n0, n1)).with_slices(k0, k1)
        return slice_volume(self.volume, part, fill=self.fill, out_dtype=self.out_dtype, backend=self.backend)


class AxialSlicer:
    """The axial images ``volume[:, :, k]`` as a single "direction" of ``S = D`` slices (the 2D baseline),
    resized bilinearly to ``size`` ``(h, w)`` when that differs from ``(H, W)``; ``k`` outside ``[0, D)``
    reads ``fill``."""

    def __init__(self, volume: torch.Tensor, size: Optional[Tuple[int, int]] = None, *, fill: float = 0.0,
                 out_dtype: Optional[torch.dtype] = None):
        self.volume, self.fill, self.out_dtype = volume, float(fill), out_dtype
        B, C, D, H, W = volume.shape
        self.n_directions, self.n_slices = 1, D
        self.height, self.width = (H, W) if size is None else (int(size[0]), int(size[1]))

    def __call__(self, n0: int, n1: int, k0: int, k1: int) -> torch.Tensor:
        B, C, D, H, W = self.volume.shape
        lo, hi = max(k0, 0), min(k1, D)
        imgs = self.volume[:, :, lo:hi].permute(0, 2, 1, 3, 4)  # (B, L, C, H, W)
        if (H, W) != (self.height, self.width) and hi > lo:
            imgs = F.interpolate(imgs.reshape(-1, C, H, W), size=(self.height, self.width), mode="bilinear",
                                 align_corners=False).reshape(B, hi - lo, C, self.height, self.width)
        if lo > k0 or hi < k1:
            out = imgs.new_full((B, k1 - k0, C, self.height, self.width), self.fill)
            if hi > lo:
                out[:, lo - k0:hi - k0] = imgs
            imgs = out
        return imgs.unsqueeze(1).to(self.out_dtype or self.volume.dtype).contiguous()


# ---------------------------------------------------------------------------------------------------------
# The streaming loop.
# ---------------------------------------------------------------------------------------------------------
class _Timer:
    """Accumulates wall time per stage into ``timings`` (seconds); synchronises CUDA so GPU work is
    charged to the stage that launched it."""

    def __init__(self, timings: Optional[Dict[str, float]], devices):
        self.timings = timings
        self.cuda = [d for d in devices if torch.device(d).type == "cuda"]

    def __call__(self, stage: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                if timer.timings is not None:
                    for d in timer.cuda:
                        torch.cuda.synchronize(d)
                    self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if timer.timings is not None:
                    for d in timer.cuda:
                        torch.cuda.synchronize(d)
                    timer.timings[stage] = timer.timings.get(stage, 0.0) + time.perf_counter() - self.t0
        return _Ctx()


def _store_batch(buffer: torch.Tensor, res: torch.Tensor, m0: int, a: int, n: int, k0: int, L: int) -> None:
    """Write the results ``res`` ``(M, K, ...)`` of the flat slices ``m0 ≤ m < m0 + M`` of an item (``m`` runs
    over ``(b, a + i, k0 + l)``, ``i < n``, ``l < L``, ``b`` slowest) into ``buffer`` ``(B, K, n_chunk, S, ...)``:
    one copy per run of consecutive slices of one direction, straight from the encoder's output."""
    m, end = m0, m0 + res.shape[0]
    while m < end:
        b, i, l = m // (n * L), (m // L) % n, m % L
        run = min(end - m, L - l)
        buffer[b, :, a + i, k0 + l:k0 + l + run] = res[m - m0:m - m0 + run].movedim(0, 1)
        m += run


def encode_chunks(slicer, encoder: Encoder, compute: Callable[[torch.Tensor], torch.Tensor],
                  finish: Callable[[int, int, torch.Tensor], None], *, stats=None,
                  batch_size: int = DEFAULT_BATCH_SIZE, max_memory: Optional[int] = None,
                  held_bytes_per_direction: int = 0, buffer_dtype: torch.dtype = torch.float32,
                  progress: bool = False, timings: Optional[Dict[str, float]] = None,
                  on_outputs: Optional[Callable[[int], None]] = None) -> None:
    """The one streaming loop of every pipeline (see the module docstring).

    Args:
        slicer: :class:`GeometrySlicer` or :class:`AxialSlicer` (attributes ``n_directions``, ``n_slices``,
            ``height``, ``width``; ``slicer(n0, n1, k0, k1)`` → ``(B, n, k1 - k0, C, h, w)``).
        encoder: the :class:`~tonno_fast.encoder.Encoder` (its context/z-score are applied here).
        compute: model-channel slices ``(M, c, h, w)`` → ``(M, K)`` scores or ``(M, K, h, w)`` CAMs, on the
            slices' device.
        finish: ``finish(n0, n1, buffer)`` with ``buffer`` ``(B, K, n1 - n0, S, ...)`` of ``buffer_dtype``:
            the results of directions ``n0 ≤ n < n1``; it may modify the buffer in place. The buffers of all
            chunks share one allocation (fresh pages are faulted in once per call, not once per chunk), so
            ``finish`` must not keep a reference to ``buffer`` when there is more than one chunk (with
            ``held_bytes_per_direction=0`` there is one).
        stats: z-score statistics from ``encoder.prepare_volume``.
        batch_size: slices per ``compute`` call.
        max_memory: bytes (default :data:`DEFAULT_MAX_MEMORY`) shared as in the module docstring.
        held_bytes_per_direction: size of one direction of the chunk buffer (0 for scores).
        timings: if a dict, receives seconds spent in ``"slicing"``, ``"encoder"`` and ``"reconstruction"``.
        on_outputs: called with ``K`` once the first batch shows it, before the first chunk buffer is
            allocated (the pipelines check their memory estimate there).
    """
    budget = resolve_max_memory(max_memory)
    N, S, h, w = slicer.n_directions, slicer.n_slices, slicer.height, slicer.width
    vol = slicer.volume
    B, C = vol.shape[:2]
    elem = torch.empty((), dtype=getattr(slicer, "out_dtype", None) or vol.dtype).element_size()
    halo = encoder.halo
    c_model = C * (2 * encoder.context + 1)
    copies = 1 + int(stats is not None or encoder.context > 0)  # raw slices + assembled copy
    per_position = B * h * w * elem * (C + (c_model if copies > 1 else 0))
    n_chunk = N if held_bytes_per_direction <= 0 else max(1, min(N, (budget // 2) // held_bytes_per_direction))
    slice_budget = budget // 4
    if (S + 2 * halo) * per_position <= slice_budget:
        n_item, L = max(1, min(n_chunk, slice_budget // ((S + 2 * halo) * per_position))), S
    else:
        n_item, L = 1, max(1, slice_budget // per_position - 2 * halo)
    timer = _Timer(timings, [vol.device, encoder.device(vol.device)])
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=B * N * S, desc="encoding slices", unit="slice")
    K = None
    storage = None  # the chunk buffers' memory, allocated once per call (fresh pages are faulted in once)
    # Slices, their assembled copies and the encoder's activations are freed and allocated again item after
    # item and batch after batch: on the CPU the pool keeps the freed memory for them, so it is faulted in once
    # per call (tonno_fast.allocator.reuse_cpu_memory).
    with reuse_cpu_memory(budget // 4):
        try:
            for n0 in range(0, N, n_chunk):
                n1 = min(N, n0 + n_chunk)
                buffer = None
                for a0 in range(n0, n1, n_item):
                    a1 = min(n1, a0 + n_item)
                    for k0 in range(0, S, L):
                        k1 = min(S, k0 + L)
                        with timer("slicing"):
                            x = encoder.assemble(slicer(a0, a1, k0 - halo, k1 + halo), stats)
                            flat = x.reshape(-1, *x.shape[3:])  # (B·n·L, c, h, w), b slowest
                        for m0 in range(0, flat.shape[0], batch_size):
                            batch = flat[m0:m0 + batch_size]
                            with timer("encoder"):
                                res = compute(batch)  # (M, K, ...)
                            # Per batch: a mismatch would otherwise fail below with a message about tensors.
                            if res.ndim < 2 or res.shape[0] != batch.shape[0]:
                                raise ValueError(f"encoder returned shape {tuple(res.shape)} for {batch.shape[0]} "
                                                 f"slices, expected ({batch.shape[0]}, K, ...)")
                            if K is None:
                                K = res.shape[1]
                            elif res.shape[1] != K:
                                raise ValueError(f"encoder returned {res.shape[1]} outputs per slice, earlier {K}")
                            if bar is not None:
                                bar.update(res.shape[0])
                            if buffer is None:
                                if on_outputs is not None and n0 == 0:
                                    on_outputs(K)
                                shape = (B, K, n1 - n0, S) + tuple(res.shape[2:])
                                if storage is None:
                                    storage = torch.empty(math.prod((B, K, n_chunk) + shape[3:]), dtype=buffer_dtype,
                                                          device=vol.device)
                                buffer = storage[:math.prod(shape)].view(shape)
                            _store_batch(buffer, res, m0, a0 - n0, a1 - a0, k0, k1 - k0)
                            del batch, res
                        del x, flat
                with timer("reconstruction"):
                    finish(n0, n1, buffer)
                del buffer
        finally:
            if bar is not None:
                bar.close()


def encode_slices(volume, geometry: Geometry, encoder: Callable, *, batch_size: Optional[int] = None,
                  backend: str = "auto", fill: float = 0.0, progress: bool = False,
                  max_memory: Optional[int] = None, timings: Optional[Dict[str, float]] = None,
                  allow_nonfinite: bool = False) -> torch.Tensor:
    """Score every slice of ``geometry``: volume ``(B, C, D, H, W)`` → sinogram ``(B, K, N, S)``.

    ``volume``: a tensor or NumPy array ``(D, H, W)``, ``(C, D, H, W)`` or ``(B, C, D, H, W)`` (axes z, y, x), or
    any object :func:`tomographic_heatmap` takes (a MONAI ``MetaTensor``, a nibabel image, a scan from
    :func:`tonno_fast.load_nifti`), whose spacing must then be ``geometry``'s. ``allow_nonfinite``: accept NaN/inf
    voxels.

    ``encoder``: an :class:`~tonno_fast.encoder.Encoder` (its window, z-score, context, channels, device and
    autocast apply) or any callable ``(M, C, h, w) → (M,)``/``(M, K)``, called under ``torch.no_grad()`` in
    batches of at most ``batch_size`` slices (default: the Encoder's, else 256). Scores come back in the
    volume's dtype on its device; slices are streamed under ``max_memory`` bytes (see :func:`encode_chunks`).
    Raises :class:`~tonno_fast.memory.MemoryBudgetError` before the sinogram is allocated when it cannot fit.
    """
    volume, spacing, _ = scan_and_spacing(volume, None)
    volume, _ = as_volume5d(volume, "volume", allow_nonfinite=allow_nonfinite)
    check_geometry_spacing(geometry, spacing)
    enc = as_encoder(encoder)
    batch_size = resolve_batch_size(batch_size, enc)
    fill = finite_float(fill, "fill")
    vol, fill, stats = enc.prepare_volume(volume, fill)
    slicer = GeometrySlicer(vol, geometry, fill=fill, backend=backend, out_dtype=enc.slice_dtype)
    sino = {}

    def finish(n0, n1, buf):  # buf (B, K, n, S)
        sino[n0] = buf

    def check(K):  # before the sinogram is allocated
        dims = (geometry.n_directions, geometry.n_slices, geometry.height, geometry.width)
        check_pipeline("encode_slices", vol, enc, dims, kind="scores", outputs=K, batch_size=batch_size,
                       max_memory=resolve_max_memory(max_memory))

    encode_chunks(slicer, enc, enc.scores, finish, stats=stats, batch_size=batch_size, max_memory=max_memory,
                  buffer_dtype=volume.dtype, progress=progress, timings=timings, on_outputs=check)
    return torch.cat([sino[n0] for n0 in sorted(sino)], dim=2)


def tomographic_heatmap(volume, encoder: Callable, *, n_directions: Optional[int] = None, directions=None,
                        weights=None, spacing=None, slice_size=None, slice_spacing=None, pixel_spacing=None,
                        n_slices: Optional[int] = None, geometry: Optional[Geometry] = None,
                        filter: str = "ramp2", window: Optional[str] = None,
                        batch_size: Optional[int] = None, backend: str = "auto", progress: bool = False,
                        fill: float = 0.0, allow_nonfinite: bool = False, max_memory: Optional[int] = None,
                        timings: Optional[Dict[str, float]] = None, reconstruction: str = "fbp",
                        reconstruction_options: Optional[Dict] = None, score_transform=None, score_baseline=None,
                        return_sinogram: bool = False, process_group=None):
    """ToNNO heatmap of ``volume`` for a 2D ``encoder`` (docs/design.md, "The method", "Reconstruction").

    Args:
        volume: ``(D, H, W)``, ``(C, D, H, W)`` or ``(B, C, D, H, W)`` tensor or NumPy array (axes z, y, x), any
            real dtype (int16 CT is converted to float32); or an object that carries its spacing, read by
            :func:`tonno_fast.validation.scan_and_spacing`: a :func:`tonno_fast.load_nifti` scan, a nibabel image
            (read as ``load_nifti`` reads a file), a MONAI ``MetaTensor`` ``(X, Y, Z)``, ``(C, X, Y, Z)`` or
            ``(B, C, X, Y, Z)`` in its affine's voxel order (the heatmap then comes back as a ``MetaTensor`` in
            that order and rank, with its affine: ``(X, Y, Z)`` or ``(K, X, Y, Z)``, ``(B, K, X, Y, Z)``).
        encoder: callable ``(M, C, h, w)`` slices → ``(M,)`` or ``(M, K)`` scores (an ``nn.Module``, a function,
            a TorchScript module), or a :class:`tonno_fast.Encoder` carrying input adaptation (window, z-score,
            context slices, channel replication, normalisation, ``input_size``, ``pixel_spacing``, device,
            autocast, output selection), e.g. from an encoder bundle (:func:`tonno_fast.load_encoder`). A model
            given as it is runs as ``Encoder(model)`` (:func:`tonno_fast.encoder.as_encoder`): eval mode, slices
            repeated to its first convolution's channels, timm's ``pretrained_cfg`` mean/std, its dtype and device.
            Called under ``torch.no_grad()`` in chunks of at most ``batch_size`` slices.
        n_directions: number of Fibonacci directions on the hemisphere (default 64; ignored when ``directions``
            given).
        directions: ``(N, 3)`` unit vectors (x, y, z), ``(N, 2)`` angles (θ, φ) or ``(N, 3, 3)`` rotations.
        weights: ``(N,)`` quadrature weights (default ``2π/N``).
        spacing: voxel spacing ``(sz, sy, sx)`` mm. Required, unless ``volume`` carries it or ``geometry`` is
            given (there is no default: a wrong spacing silently changes every slice); one that contradicts the
            volume's own is refused.
        slice_size: ``int`` or ``(h, w)`` pixels of each slice (default: the Encoder's ``input_size``, else
            covers the bounding sphere).
        slice_spacing: Δs mm between slices (default ``min(spacing)``).
        pixel_spacing: δ mm between pixels (default: the Encoder's ``pixel_spacing``, else ``min(spacing)``,
            or follows ``slice_size``).
        n_slices: slices per direction (default: covers the bounding sphere).
        geometry: a complete :class:`~tonno_fast.Geometry` instead of the geometry keywords above (its volume
            shape and spacing must match the volume).
        filter: ``"ramp2"`` (exact 3D inverse), ``"laplacian"``, ``"ramp"`` or ``"none"``.
        window: ``None``, ``"shepp-logan"``, ``"cosine"``, ``"hamming"`` or ``"hann"`` (FFT filters).
        batch_size: slices per encoder call (default: the Encoder's ``batch_size``, else 256).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        progress: show a progress bar over the slices.
        fill: value read outside the volume.
        allow_nonfinite: accept NaN/inf voxels instead of raising.
        max_memory: bytes of slices in flight (default 1 GiB; see :func:`encode_chunks`).
        timings: if a dict, receives the seconds spent in ``"slicing"``, ``"encoder"`` and
            ``"reconstruction"`` (filter + backprojection, or the iterative solver).
        reconstruction: ``"fbp"`` (filtered backprojection with ``filter``/``window``, the default), or an
            iterative solver ``"sirt"``, ``"cgls"``, ``"fista"`` (see :func:`tonno_fast.reconstruct`).
        reconstruction_options: keyword arguments of :func:`tonno_fast.reconstruct` for the iterative
            solvers: ``iterations``, ``tol``, ``x0``, ``nonneg``, ``tv``, ``tv_iterations``, ``relaxation``,
            ``adjoint``, ``check_every``, ``info``.
        score_transform, score_baseline: score calibration before the reconstruction (``"sigmoid"`` /
            ``"softplus"``; ``"median"`` or a quantile: see :func:`tonno_fast.calibrate_scores`).
        return_sinogram: also return the raw scores and the geometry, to reconstruct again (other method,
            options or calibration) without scoring the slices again:
            ``tonno_fast.reconstruct(result.sinogram, result.geometry, "fista", ...)``.
        process_group: a ``torch.distributed`` process group whose ranks share the work: each slices, scores,
            filters and backprojects a contiguous share of the directions and an ``all_reduce`` sums the
            heatmaps (iterative methods gather the scores instead; see
            :func:`tonno_fast.distributed.reconstruct_split`). Every rank calls with the same arguments and
            gets the whole heatmap; ``sinogram`` and ``geometry`` then hold this rank's share. ``None``: one
            process.

    Memory: the run's peak is estimated before the geometry is built and again once the encoder's number of
    outputs is known, against the memory available on the volume's device; a run that cannot fit raises
    :class:`~tonno_fast.memory.MemoryBudgetError` (a ``MemoryError``) naming the parameter to lower.

    Returns:
        Heatmap on the volume's device, float32 (float64 for a float64 volume): ``(D, H, W)`` for a 3D volume
        and a single-score encoder, else ``(B, K, D, H, W)`` (a ``MetaTensor`` volume: see ``volume``). With ``return_sinogram=True``, a
        :class:`HeatmapResult` ``(heatmap, sinogram, geometry)``: ``sinogram`` ``(B, K, N, S)`` holds the
        encoder's scores before calibration.
    """
    check_reconstruction(reconstruction, reconstruction_options, filter=filter, window=window,
                         score_transform=score_transform, score_baseline=score_baseline)
    if not isinstance(return_sinogram, bool):
        raise TypeError(f"return_sinogram must be a bool, got {type(return_sinogram).__name__}")
    volume, spacing, restore = scan_and_spacing(volume, spacing)
    vol, ndim = as_volume5d(volume, "volume", allow_nonfinite=allow_nonfinite)
    if not callable(encoder):
        raise TypeError(f"encoder must be callable (an nn.Module or a function), got {type(encoder).__name__}")
    enc = as_encoder(encoder)
    dims, build = plan_geometry(vol.shape[2:], enc, geometry=geometry, spacing=spacing, n_directions=n_directions,
                                directions=directions, weights=weights, slice_size=slice_size,
                                pixel_spacing=pixel_spacing, slice_spacing=slice_spacing, n_slices=n_slices)
    mem = dict(kind="scores", batch_size=resolve_batch_size(batch_size, enc),
               max_memory=resolve_max_memory(max_memory), filter=filter, reconstruction=reconstruction,
               group=process_group)
    with all_or_none(process_group):  # a failure on one rank stops all, none waits in a collective
        check_pipeline("tomographic_heatmap", vol, enc, dims, **mem)
        geometry = build()
        part, share = split_directions(geometry, process_group)
        scores = encode_slices(vol, part, enc, batch_size=batch_size, backend=backend, fill=fill,
                               progress=progress, max_memory=max_memory, timings=timings,
                               allow_nonfinite=True)  # checked above
        check_pipeline("tomographic_heatmap", vol, enc, dims, outputs=scores.shape[1], **mem)
    timer = _Timer(timings, [vol.device])
    recon = dict(filter=filter, window=window, score_transform=score_transform, score_baseline=score_baseline,
                 backend=backend, **(reconstruction_options or {}))
    with timer("reconstruction"):
        if process_group is None:
            heat = reconstruct(scores, geometry, reconstruction, **recon)
        else:
            heat = reconstruct_split(scores, geometry, share, process_group, reconstruction, **recon)
    if ndim == 3 and heat.shape[1] == 1:
        heat = heat[0, 0]
    heat = restore(heat)
    return HeatmapResult(heat, scores, part) if return_sinogram else heat


class HeatmapResult(NamedTuple):
    """What :func:`tomographic_heatmap` returns with ``return_sinogram=True``.

    Attributes:
        heatmap: as returned without ``return_sinogram``.
        sinogram: ``(B, K, N, S)`` the encoder's scores, before calibration.
        geometry: the :class:`~tonno_fast.Geometry` the slices were cut with.
    """

    heatmap: torch.Tensor
    sinogram: torch.Tensor
    geometry: Geometry


def plan_geometry(volume_shape, encoder: Encoder, *, geometry: Optional[Geometry] = None, spacing=None,
                  n_directions: Optional[int] = None, directions=None, weights=None, slice_size=None,
                  pixel_spacing=None, slice_spacing=None, n_slices=None) -> Tuple[Tuple[int, int, int, int],
                                                                                  Callable[[], Geometry]]:
    """The pipelines' geometry, planned before it is built: ``(dims, build)`` where ``dims = (N, S, h, w)``
    are its sizes (directions, slices per direction, slice pixels), known without building its ``N``-sized
    tables so that the memory check comes first, and ``build()`` returns it.

    The geometry is ``geometry`` itself (checked against the volume and the encoder), else
    :func:`~tonno_fast.make_geometry` of the keywords with ``spacing`` (mm, axes z, y, x) required and the
    Encoder's ``input_size`` / ``pixel_spacing`` as defaults for ``slice_size`` / ``pixel_spacing``."""
    shape = tuple(int(n) for n in volume_shape)
    if geometry is not None:
        if not isinstance(geometry, Geometry):
            raise TypeError(f"geometry must be a tonno_fast.Geometry (see make_geometry), got "
                            f"{type(geometry).__name__}")
        given = [k for k, v in (("n_directions", n_directions), ("directions", directions), ("weights", weights),
                                ("slice_size", slice_size), ("pixel_spacing", pixel_spacing),
                                ("slice_spacing", slice_spacing), ("n_slices", n_slices)) if v is not None]
        if given:
            raise ValueError(f"give geometry= or the geometry keywords, not both (also given: {', '.join(given)})")
        if tuple(geometry.volume_shape) != shape:
            raise ValueError(f"geometry was made for volumes of shape {tuple(geometry.volume_shape)}, the volume "
                             f"has {shape}")
        check_geometry_spacing(geometry, spacing)
        if encoder.input_size is not None and (geometry.height, geometry.width) != encoder.input_size:
            raise ValueError(f"geometry slices are {(geometry.height, geometry.width)} pixels but the encoder's "
                             f"input_size is {encoder.input_size}")
        return (geometry.n_directions, geometry.n_slices, geometry.height, geometry.width), lambda: geometry
    if spacing is None:
        raise ValueError("spacing is required: give the voxel spacing (sz, sy, sx) in mm (e.g. spacing=scan.spacing "
                         "of tonno_fast.load_nifti), pass the scan itself, or give geometry=")
    sizes = dict(spacing=spacing, slice_size=resolve_slice_size(slice_size, encoder),
                 pixel_spacing=encoder.pixel_spacing if pixel_spacing is None else pixel_spacing,
                 slice_spacing=slice_spacing, n_slices=n_slices)
    n_directions = 64 if n_directions is None else n_directions
    dims = geometry_dims(shape, n_directions=n_directions, directions=directions, **sizes)
    return dims, lambda: make_geometry(shape, n_directions=n_directions, directions=directions, weights=weights,
                                       **sizes)


def check_geometry_spacing(geometry: Geometry, spacing) -> None:
    """A ``spacing`` (mm, z y x) given with, or carried by the volume given with, ``geometry`` must be its own."""
    if spacing is None:
        return
    from .geometry import normalize_spacing
    sp = normalize_spacing(spacing)
    if any(abs(a - b) > 1e-6 * max(a, b) for a, b in zip(sp, geometry.spacing)):
        raise ValueError(f"spacing={sp} contradicts the geometry's spacing {tuple(geometry.spacing)} (mm)")


def resolve_geometry(volume_shape, encoder: Encoder, **kwargs) -> Geometry:
    """The geometry :func:`plan_geometry` plans (same keywords), built."""
    return plan_geometry(volume_shape, encoder, **kwargs)[1]()


def resolve_slice_size(slice_size, encoder: Encoder):
    """The geometry's slice size: the user's, else the encoder's ``input_size``; both must agree."""
    if encoder.input_size is None:
        return slice_size
    if slice_size is None:
        return encoder.input_size
    given = (slice_size, slice_size) if isinstance(slice_size, int) else tuple(int(s) for s in slice_size)
    if given != encoder.input_size:
        raise ValueError(f"slice_size={given} contradicts the encoder's input_size={encoder.input_size}; "
                         "give one of them")
    return slice_size
