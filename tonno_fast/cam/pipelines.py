"""Averaged CAM, Tomographic CAM and the slice-wise 2D baseline (docs/design.md, "The method"), streamed
("Streaming").

For every chunk of directions the loop of :func:`tonno_fast.pipeline.encode_chunks` produces the CAM stacks
``(B, K, n, S, h, w)`` (one 2D CAM per slice, in each direction's own frame); they are then

* **Averaged CAM**: backprojected with ``backproject_slices`` (trilinear in the stack) with weights
  ``w_k / Σ w`` — the weighted average over orientations (``reconstruction_scale("none", w)``);
* **Tomographic CAM**: first filtered along the slice axis ``S`` with the reconstruction filter (the same
  ``apply_filter`` as the scores, with edge replication, applied as its exact ``S × S`` matrix, see
  :func:`tonno_fast.filters.filter_matrix`), then backprojected with
  ``reconstruction_scale(filter, w) = w_k / 4π²``, exactly as ToNNO treats a sinogram. With a CAM that is
  constant over each slice it *is* ToNNO.

The native CAMs (GradCAM, LayerCAM: ``CAMMethod.deferred_upsampling``) end with a bilinear upsampling of the
target layer's map to the slice; the stacks keep the maps at the layer's resolution and are filtered there, then
upsampled (:class:`~tonno_fast.cam.upsample.BilinearUpsampler`, a few directions at a time) just before the
backprojection. Both maps are linear and act on different axes (across slices, within a slice), so they
commute: the same volume to float rounding, with ``h·w / h'·w'`` times less filtering.

Chunk results are summed into a float64 accumulator (for float32 volumes too), so results for different
chunk sizes and direction orders agree to float32 rounding of each chunk (≈1e-7 relative), not to the
rounding of a float32 running sum.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..distributed import all_or_none, all_reduce_sum, split_directions
from ..encoder import Encoder, as_encoder
from ..filters import check_filter, filter_matrix, reconstruction_scale
from ..geometry import Geometry, make_geometry, normalize_spacing
from ..memory import check_pipeline
from ..ops import backproject_slices
from ..pipeline import (AxialSlicer, GeometrySlicer, encode_chunks, plan_geometry, resolve_batch_size, resolve_geometry,
                        resolve_max_memory, resolve_slice_size)
from ..validation import as_volume5d, scan_and_spacing
from .adapter import PytorchGradCAM, is_pytorch_grad_cam
from .methods import CAM_METHODS, CAMMethod
from .upsample import BilinearUpsampler

__all__ = ["averaged_cam", "tomographic_cam", "slicewise_cam", "resolve_method", "NORMALIZATIONS"]

NORMALIZATIONS = (None, "minmax", "max")
#: Bytes of upsampled CAM stacks made at a time (see finish in _projected_cam): a buffer this small is reused
#: from the cache and the heap, where one of a whole chunk (116 MiB for 64 stacks of 111 × 64²) is page-faulted
#: in afresh by every call.
UPSAMPLE_BYTES = 16 << 20


class _CallableCAM(CAMMethod):
    """A user function ``slices (M, c, h, w) → (M, h', w')`` or ``(M, K, h', w')`` as a CAM method. It gets the
    slices as assembled for the model (window, z-score, context channels; before channel replication and
    ``mean``/``std``) on the volume's device; its maps are upsampled bilinearly to ``(h, w)``."""

    name = "callable"

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, encoder, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x)
        if not isinstance(out, torch.Tensor) or out.ndim not in (3, 4) or out.shape[0] != x.shape[0]:
            raise ValueError(f"a CAM method must return (M, h, w) or (M, K, h, w) maps for M = {x.shape[0]} "
                             f"slices, got {getattr(out, 'shape', type(out).__name__)}")
        if out.ndim == 3:
            out = out[:, None]
        # float64 slices (float64 volume) keep float64 maps; anything else is accumulated in float32.
        out = out.to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        if tuple(out.shape[-2:]) != tuple(x.shape[-2:]):
            out = F.interpolate(out, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return out


def resolve_method(method, target_layers=None, reshape_transform: Optional[Callable] = None) -> CAMMethod:
    """``method`` → a :class:`~tonno_fast.cam.methods.CAMMethod`.

    ``"gradcam"`` / ``"layercam"`` (native, need ``target_layers``); a ``CAMMethod`` instance; a
    ``pytorch_grad_cam`` CAM object (wrapped in :class:`~tonno_fast.cam.adapter.PytorchGradCAM`; it carries
    its own target layers); or a callable ``slices (M, c, h, w) → (M, [K,] h', w')``.
    """
    if isinstance(method, str):
        key = method.lower()
        if key not in CAM_METHODS:
            raise ValueError(f"method must be one of {tuple(CAM_METHODS)}, a pytorch_grad_cam object or a "
                             f"callable, got {method!r}")
        return CAM_METHODS[key](target_layers, reshape_transform)
    if isinstance(method, CAMMethod):
        return method
    if is_pytorch_grad_cam(method):
        return PytorchGradCAM(method)
    if callable(method):
        return _CallableCAM(method)
    raise TypeError(f"method must be a name, a CAMMethod, a pytorch_grad_cam object or a callable, "
                    f"got {type(method).__name__}")


def _cam_encoder(encoder, targets) -> Encoder:
    enc = as_encoder(encoder)
    return enc if targets is None else enc.with_output(targets, "targets")


def _check_normalize(normalize):
    if normalize is False:
        return None
    if normalize is True:
        return "minmax"
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS} (or a bool), got {normalize!r}")
    return normalize


def _normalize(out: torch.Tensor, how: Optional[str]) -> torch.Tensor:
    """Per volume and output, over ``(D, H, W)``: ``"minmax"`` → ``[0, 1]``, ``"max"`` → ``x / max|x|``."""
    if how is None:
        return out
    flat = out.reshape(*out.shape[:2], -1)
    if how == "minmax":
        lo = flat.amin(dim=-1, keepdim=True)
        span = flat.amax(dim=-1, keepdim=True) - lo
        flat = (flat - lo) / torch.where(span > 0, span, torch.ones_like(span))
    else:
        peak = flat.abs().amax(dim=-1, keepdim=True)
        flat = flat / torch.where(peak > 0, peak, torch.ones_like(peak))
    return flat.reshape(out.shape)


def _probe(compute, encoder: Encoder, slicer, dtype) -> int:
    """Number of CAMs per slice ``K``: the method run on one blank slice."""
    c = slicer.volume.shape[1] * (2 * encoder.context + 1)
    blank = torch.zeros(1, c, slicer.height, slicer.width, dtype=dtype, device=slicer.volume.device)
    return int(compute(blank).shape[1])


def _finish_output(acc: torch.Tensor, dtype, ndim: int, normalize) -> torch.Tensor:
    out = _normalize(acc.to(dtype), normalize)
    if ndim == 3 and out.shape[1] == 1:
        return out[0, 0]
    return out


class _Start(NamedTuple):
    """The arguments every pipeline checks and resolves first (see :func:`_start`)."""
    normalize: Optional[str]  # None, "minmax" or "max"
    budget: int  # max_memory in bytes
    vol: torch.Tensor  # (B, C, D, H, W)
    ndim: int  # dimensions of the caller's volume (3: return (D, H, W) for a single output)
    enc: Encoder  # with the targets applied
    batch_size: int  # slices per model call
    compute: Callable[[torch.Tensor], torch.Tensor]  # slices (n, C', h, w) -> CAMs (n, K, h, w)
    method: CAMMethod  # the resolved CAM method


def _start(volume, encoder, *, target_layers, method, targets, reshape_transform, normalize, batch_size,
           max_memory, allow_nonfinite) -> _Start:
    normalize = _check_normalize(normalize)
    budget = resolve_max_memory(max_memory)
    vol, ndim = as_volume5d(volume, "volume", allow_nonfinite=allow_nonfinite)
    enc = _cam_encoder(encoder, targets)
    bs = resolve_batch_size(batch_size, enc)
    cam = resolve_method(method, target_layers, reshape_transform)
    return _Start(normalize, budget, vol, ndim, enc, bs, lambda x: cam(enc, x), cam)


def _projected_cam(volume, encoder, *, target_layers, method, targets, reshape_transform, filter, window,
                   n_directions, directions, weights, spacing, slice_size, slice_spacing, pixel_spacing, n_slices,
                   geometry, normalize, batch_size, max_memory, backend, progress, fill, allow_nonfinite, timings,
                   process_group=None):
    """Averaged (``filter="none"``) and Tomographic CAM share everything but the filter. With a
    ``process_group`` each rank streams its share of the directions into its own accumulator (weights from all
    directions) and an ``all_reduce`` sums the accumulators before the normalisation."""
    check_filter(filter, window)
    volume, spacing, restore = scan_and_spacing(volume, spacing)
    normalize, budget, vol, ndim, enc, bs, compute, cam = _start(
        volume, encoder, target_layers=target_layers, method=method, targets=targets,
        reshape_transform=reshape_transform, normalize=normalize, batch_size=batch_size, max_memory=max_memory,
        allow_nonfinite=allow_nonfinite)
    if cam.deferred_upsampling:
        # The CAMs stay at the target layer's resolution in the chunk buffer and are upsampled in finish, as
        # matrix products (BilinearUpsampler: 7x faster than F.interpolate here) and, for Tomographic CAM, after
        # the filter across slices (the two linear maps act on different axes and commute): 16x less filtering
        # work for 16² maps in 64² slices. The same result to float rounding.
        compute = lambda x: cam(enc, x, upsample=False)  # noqa: E731
    dims, build = plan_geometry(vol.shape[2:], enc, geometry=geometry, spacing=spacing, n_directions=n_directions,
                                directions=directions, weights=weights, slice_size=slice_size,
                                pixel_spacing=pixel_spacing, slice_spacing=slice_spacing, n_slices=n_slices)
    what = "averaged_cam" if filter == "none" else "tomographic_cam"
    mem = dict(kind="stacks", batch_size=bs, max_memory=budget, filter=filter, group=process_group)
    with all_or_none(process_group):  # a failure on one rank stops all, none waits in a collective
        check_pipeline(what, vol, enc, dims, **mem)
        geometry = build()
        part, share = split_directions(geometry, process_group)
        prepared, fill, stats = enc.prepare_volume(vol, fill)
        slicer = GeometrySlicer(prepared, part, fill=fill, backend=backend, out_dtype=enc.slice_dtype)

        B = vol.shape[0]
        S, h, w = geometry.n_slices, geometry.height, geometry.width
        K = _probe(compute, enc, slicer, enc.slice_dtype or vol.dtype)
        check_pipeline(what, vol, enc, dims, outputs=K, **mem)
        elem = vol.element_size()
        scale = reconstruction_scale(filter, geometry.weights)[share]  # over ALL directions: w/Σw needs the full sum
        acc_dtype = torch.float64
        acc = torch.zeros((B, K) + tuple(geometry.volume_shape), dtype=acc_dtype, device=vol.device)

    matrix = None if filter == "none" else filter_matrix(filter, window, S, geometry.slice_spacing, vol.dtype,
                                                         vol.device)

    upsample, work = BilinearUpsampler((h, w)), None

    def finish(n0: int, n1: int, stack: torch.Tensor) -> None:  # stack (B, K, n, S, h', w'), h' = h unless deferred
        nonlocal work
        n = n1 - n0
        if matrix is not None:
            # Filter along S as one matmul per column piece, in the stack's own layout (no transposition); the
            # temporary (one piece) stays under a quarter of the budget. When one piece holds every column, the
            # product itself is the filtered stack (no copy back into the buffer).
            hw = stack.shape[-2] * stack.shape[-1]
            flat = stack.view(B * K, n, S, hw)
            cols = max(1, min(hw, (budget // 4) // max(1, B * K * n * S * elem)))
            if cols == hw:
                stack = torch.matmul(matrix, flat).view(stack.shape)
            else:
                for c0 in range(0, hw, cols):
                    flat[..., c0:c0 + cols] = torch.matmul(matrix, flat[..., c0:c0 + cols])
        if tuple(stack.shape[-2:]) == (h, w):
            acc.add_(backproject_slices(stack, part.with_directions(slice(n0, n1)), weights=scale[n0:n1],
                                        backend=backend))
            return
        # Maps at their own resolution: upsampled a few directions at a time into one buffer reused for the whole
        # call (at most UPSAMPLE_BYTES, or one direction), each piece backprojected as it is made.
        p = max(1, min(n, UPSAMPLE_BYTES // (B * K * S * h * w * elem)))
        if work is None:
            work = torch.empty(B * K * p * S * h * w, dtype=stack.dtype, device=stack.device)
        for a in range(0, n, p):
            b = min(n, a + p)
            up = upsample(stack[:, :, a:b], out=work[:B * K * (b - a) * S * h * w].view(B, K, b - a, S, h, w))
            acc.add_(backproject_slices(up, part.with_directions(slice(n0 + a, n0 + b)),
                                        weights=scale[n0 + a:n0 + b], backend=backend))

    with all_or_none(process_group):
        encode_chunks(slicer, enc, compute, finish, stats=stats, batch_size=bs, max_memory=budget,
                      held_bytes_per_direction=B * K * S * h * w * elem, buffer_dtype=vol.dtype,
                      progress=progress, timings=timings)
    acc = all_reduce_sum(acc, process_group) if process_group is not None else acc
    return restore(_finish_output(acc, vol.dtype, ndim, normalize))


def averaged_cam(volume, encoder, *, target_layers=None, method="gradcam", targets=None, reshape_transform=None,
                 n_directions: Optional[int] = None, directions=None, weights=None, spacing=None, slice_size=None,
                 slice_spacing=None, pixel_spacing=None, n_slices: Optional[int] = None,
                 geometry: Optional[Geometry] = None, normalize=None,
                 batch_size: Optional[int] = None, max_memory: Optional[int] = None, backend: str = "auto",
                 progress: bool = False, fill: float = 0.0, allow_nonfinite: bool = False,
                 timings: Optional[Dict[str, float]] = None, process_group=None) -> torch.Tensor:
    """Averaged CAM (docs/design.md, "The method"): 2D CAMs of every oblique slice, mapped back into the volume
    and averaged over orientations with weights ``w_k / Σ w``.

    Args:
        volume: ``(D, H, W)``, ``(C, D, H, W)`` or ``(B, C, D, H, W)`` tensor or NumPy array (axes z, y, x); any
            real dtype; or a scan that carries its spacing: a :func:`tonno_fast.load_nifti` scan, a nibabel image,
            a MONAI ``MetaTensor`` (the map then comes back as a ``MetaTensor``), as for
            :func:`tonno_fast.tomographic_heatmap`.
        encoder: a :class:`tonno_fast.Encoder` (input adaptation, device, autocast, output selection = the CAM
            targets) or an ``nn.Module``, which runs as ``Encoder(module)`` (eval mode, channels repeated to its
            first convolution's, timm's ``pretrained_cfg`` normalisation, its dtype), as in
            :func:`tonno_fast.tomographic_heatmap`.
        target_layers: module(s) or dotted name(s) hooked by ``"gradcam"``/``"layercam"``.
        method: ``"gradcam"``, ``"layercam"``, a ``pytorch_grad_cam`` CAM object, a
            :class:`~tonno_fast.cam.methods.CAMMethod` or a callable ``slices (M, c, h, w) → (M, [K,] h', w')``.
        targets: what the CAMs explain, overriding the Encoder's ``output``: a class index, a sequence of
            indices (``K`` maps) or a callable ``raw_output → (M,)``/``(M, K)``. Default: the Encoder's
            ``output`` (all outputs of a plain model).
        reshape_transform: token tensor → ``(M, C, h', w')`` for ViTs (see ``vit_reshape_transform``).
        n_directions, directions, weights, spacing, slice_size, slice_spacing, pixel_spacing, n_slices,
            geometry: the geometry, as in :func:`tonno_fast.tomographic_heatmap` (``spacing`` required unless
            the volume or ``geometry`` carries it; ``slice_size`` and ``pixel_spacing`` default to the
            Encoder's ``input_size`` and ``pixel_spacing``).
        normalize: ``None`` (raw CAM values), ``"minmax"`` or ``"max"``, per volume and target.
        batch_size: slices per encoder call (default: the Encoder's, else 256).
        max_memory: bytes for slices, CAM stacks and filter work (default 1 GiB; see
            :func:`tonno_fast.pipeline.encode_chunks`); peak memory does not grow with the number of directions.
        backend: backend of the slicing and backprojection ops.
        progress: progress bar over the slices.
        fill: value read outside the volume (before the Encoder's window).
        allow_nonfinite: accept NaN/inf voxels.
        timings: if a dict, receives seconds spent in ``"slicing"``, ``"encoder"`` and ``"reconstruction"``.
        process_group: a ``torch.distributed`` process group whose ranks share the directions (contiguous
            shares, weights over all directions); an ``all_reduce`` sums their parts, so every rank calling with
            the same arguments gets the whole map. ``None``: one process.

    Returns:
        float32 (float64 for a float64 volume) on the volume's device: ``(D, H, W)`` for a 3D volume and one
        target, else ``(B, K, D, H, W)``. A run that cannot fit in the device's available memory raises
        :class:`~tonno_fast.memory.MemoryBudgetError` before its large allocations.
    """
    return _projected_cam(volume, encoder, target_layers=target_layers, method=method, targets=targets,
                          reshape_transform=reshape_transform, filter="none", window=None,
                          n_directions=n_directions, directions=directions, weights=weights, spacing=spacing,
                          slice_size=slice_size, slice_spacing=slice_spacing, pixel_spacing=pixel_spacing,
                          n_slices=n_slices, geometry=geometry, normalize=normalize, batch_size=batch_size,
                          max_memory=max_memory, backend=backend, progress=progress, fill=fill,
                          allow_nonfinite=allow_nonfinite, timings=timings, process_group=process_group)


def tomographic_cam(volume, encoder, *, target_layers=None, method="gradcam", filter: str = "ramp2",
                    window: Optional[str] = None, targets=None, reshape_transform=None,
                    n_directions: Optional[int] = None, directions=None, weights=None, spacing=None,
                    slice_size=None, slice_spacing=None, pixel_spacing=None, n_slices: Optional[int] = None,
                    geometry: Optional[Geometry] = None, normalize=None, batch_size: Optional[int] = None,
                    max_memory: Optional[int] = None, backend: str = "auto", progress: bool = False,
                    fill: float = 0.0, allow_nonfinite: bool = False,
                    timings: Optional[Dict[str, float]] = None, process_group=None) -> torch.Tensor:
    """Tomographic CAM (docs/design.md, "The method"): every orientation's CAM stack is filtered along the slice
    normal with the reconstruction ``filter`` (and ``window``) and backprojected with the quadrature weights
    ``w_k / 4π²`` — ToNNO with per-pixel maps instead of per-slice scores. With a CAM constant over each slice
    it equals :func:`tonno_fast.tomographic_heatmap` with those scores. ``filter="none"`` is
    :func:`averaged_cam`.

    Arguments and return value as :func:`averaged_cam`, plus ``filter`` (``"ramp2"``, ``"laplacian"``,
    ``"ramp"``, ``"none"``) and ``window`` (``None``, ``"shepp-logan"``, ``"cosine"``, ``"hamming"``,
    ``"hann"``). The default CAM is GradCAM, as for the other CAM pipelines.
    """
    return _projected_cam(volume, encoder, target_layers=target_layers, method=method, targets=targets,
                          reshape_transform=reshape_transform, filter=filter, window=window,
                          n_directions=n_directions, directions=directions, weights=weights, spacing=spacing,
                          slice_size=slice_size, slice_spacing=slice_spacing, pixel_spacing=pixel_spacing,
                          n_slices=n_slices, geometry=geometry, normalize=normalize, batch_size=batch_size,
                          max_memory=max_memory, backend=backend, progress=progress, fill=fill,
                          allow_nonfinite=allow_nonfinite, timings=timings, process_group=process_group)


def slicewise_cam(volume, encoder, *, target_layers=None, method="gradcam", targets=None, reshape_transform=None,
                  slice_size=None, pixel_spacing=None, spacing=None, geometry: Optional[Geometry] = None,
                  normalize=None, batch_size: Optional[int] = None, max_memory: Optional[int] = None,
                  backend: str = "auto", progress: bool = False, fill: float = 0.0, allow_nonfinite: bool = False,
                  timings: Optional[Dict[str, float]] = None) -> torch.Tensor:
    """The 2D baseline: the CAM of every axial slice ``volume[k]`` (normal ``e_z``, rows y, columns x) stacked
    into a volume. No reorientation and no resampling across slices, so anisotropic spacing is irrelevant.

    How each axial image is shown to the model:

    * with a pixel spacing (``pixel_spacing`` mm, else the Encoder's ``pixel_spacing``, e.g. from an encoder
      bundle, else ``geometry``'s): the axial plane is resampled at that spacing on a ``slice_size`` grid
      centred on the volume's axis (default size: the Encoder's ``input_size``, else what covers the plane),
      exactly as the oblique pipelines cut an axial slice, and the CAM is interpolated back onto the voxels
      (zero outside the grid). This shows the encoder the field of view it was trained on and needs
      ``spacing`` (or a scan that carries it). ``geometry``: only its in-plane part (slice size, pixel
      spacing, spacing) is used; the slices are the axial planes of the volume whatever its directions;
    * without one: each axial image is resized bilinearly to ``slice_size`` (default: the Encoder's
      ``input_size``, else ``(H, W)``, no resizing) and the CAM is resized back to ``(H, W)``.

    Adjacent-slice context takes the axial neighbours ``volume[k ± step]`` (``fill`` beyond the ends). Other
    arguments and the return value as :func:`averaged_cam`.
    """
    volume, spacing, restore = scan_and_spacing(volume, spacing)
    normalize, budget, vol, ndim, enc, bs, compute, _ = _start(
        volume, encoder, target_layers=target_layers, method=method, targets=targets,
        reshape_transform=reshape_transform, normalize=normalize, batch_size=batch_size, max_memory=max_memory,
        allow_nonfinite=allow_nonfinite)
    B, _, D, H, W = vol.shape
    if geometry is not None:
        if slice_size is not None or pixel_spacing is not None:
            raise ValueError("give geometry= or slice_size/pixel_spacing, not both")
        ref = resolve_geometry(vol.shape[2:], enc, geometry=geometry, spacing=spacing)
        spacing, slice_size, pixel_spacing = ref.spacing, (ref.height, ref.width), ref.pixel_spacing
    size = resolve_slice_size(slice_size, enc)
    if isinstance(size, int):
        size = (size, size)
    if pixel_spacing is None:
        pixel_spacing = enc.pixel_spacing
    prepared, fill, stats = enc.prepare_volume(vol, fill)
    axial = None
    if pixel_spacing is not None:
        if spacing is None:
            raise ValueError("spacing is required with a pixel spacing: give the voxel spacing (sz, sy, sx) in mm "
                             "(or pass a scan that carries it), so the axial planes can be resampled in mm")
        # The axial planes as one direction e_z with S = D slices at Δs = sz: slice k is exactly plane d = k.
        spacing = normalize_spacing(spacing)
        axial = make_geometry((D, H, W), spacing=spacing, directions=[[0.0, 0.0, 1.0]], slice_size=size,
                              pixel_spacing=pixel_spacing, slice_spacing=spacing[0], n_slices=D)
        slicer = GeometrySlicer(prepared, axial, fill=fill, backend=backend, out_dtype=enc.slice_dtype)
    else:
        slicer = AxialSlicer(prepared, size, fill=fill, out_dtype=enc.slice_dtype)

    K = _probe(compute, enc, slicer, enc.slice_dtype or vol.dtype)
    check_pipeline("slicewise_cam", vol, enc, (1, D, slicer.height, slicer.width), kind="axial", outputs=K,
                   batch_size=bs, max_memory=budget)
    out = {}

    def finish(n0: int, n1: int, stack: torch.Tensor) -> None:  # (B, K, 1, D, h, w)
        if axial is not None:  # back onto the voxels: weight 1 for the only direction is plain interpolation
            one = torch.ones(1, dtype=torch.float64, device=vol.device)
            out["cam"] = backproject_slices(stack, axial, weights=one, backend=backend)
            return
        maps = stack[:, :, 0]
        if tuple(maps.shape[-2:]) != (H, W):
            maps = F.interpolate(maps.reshape(B * K * D, 1, *maps.shape[-2:]), size=(H, W), mode="bilinear",
                                 align_corners=False).reshape(B, K, D, H, W)
        out["cam"] = maps

    encode_chunks(slicer, enc, compute, finish, stats=stats, batch_size=bs, max_memory=budget,
                  held_bytes_per_direction=B * K * D * slicer.height * slicer.width * vol.element_size(),
                  buffer_dtype=vol.dtype, progress=progress, timings=timings)
    return restore(_finish_output(out["cam"], vol.dtype, ndim, normalize))
