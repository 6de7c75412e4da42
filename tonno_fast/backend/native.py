"""The compiled backends ``cpu`` and ``cuda``: the ``torch.ops.tonno_fast`` custom operators of ``tonno_fast._C``.

Importing ``tonno_fast._C`` registers the op schemas (``csrc/ops/registration.cpp``) and the CPU kernels
(``csrc/ops/cpu/``; CUDA kernels in ``csrc/ops/cuda/`` when built with CUDA). This module adds, as in
pytorch/extension-cpp, everything that lives on the Python side of a custom op:

* fake (meta) kernels (``torch.library.register_fake``): output shapes and dtypes, so the ops trace under
  ``torch.compile(fullgraph=True)`` and run on meta tensors;
* autograd (``torch.library.register_autograd``): the backward of every forward op calls its adjoint op
  (``*_backward``), and the backward of each linear adjoint op calls the forward op again (the adjoint of
  the adjoint), so double backward works too. Only the main tensor input is differentiable, plus ``theta``
  of ``affine_grid_sample``; ``maps`` and ``weights`` are geometry and asking for their gradient is an error.

The five functions below have the signatures of :mod:`tonno_fast.backend.reference` (see its docstring
for the exact definitions, shapes and axis orders) and dispatch on the tensors' device: the same module
serves backend ``"cpu"`` and ``"cuda"``.

If ``tonno_fast._C`` is missing (not built) or fails to load, this module still imports;
:func:`unavailable_reason` then says why and the registry falls back to the reference backend.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

__all__ = ["slice_volume", "radon", "backproject", "backproject_slices", "affine_grid_sample",
           "unavailable_reason", "build_info"]

name = "native"

try:
    from .._extension import cuda_missing_reason, load_compiled
    _C = load_compiled()  # loading it registers the ops and their kernels; never loaded if built for another torch
    _IMPORT_ERROR: Optional[str] = None
except (ImportError, OSError) as exc:  # not built, built against another torch, or fails to load: one line why
    _C = None
    _IMPORT_ERROR = str(exc)


def build_info() -> Optional[Dict]:
    """What ``tonno_fast._C`` was built with (``cuda``, ``cuda_arch``, ``openmp``, ``omp_max_threads``,
    ``torch_version``), or None when the extension is unavailable."""
    return None if _C is None else dict(_C.build_info())


def unavailable_reason(backend: str) -> Optional[str]:
    """None if compiled backend ``backend`` ("cpu" or "cuda") can run here, else a one-line reason."""
    if _C is None:
        return _IMPORT_ERROR
    if backend == "cpu":
        return None
    if backend == "cuda":
        if not _C.build_info()["cuda"]:
            return f"tonno_fast._C was built without CUDA kernels ({cuda_missing_reason()})"
        if not torch.cuda.is_available():
            return "no CUDA device available (torch.cuda.is_available() is False)"
        return None
    return f"unknown compiled backend {backend!r} (expected 'cpu' or 'cuda')"


# ---------------------------------------------------------------------------------------------------------
# Python-facing functions (signatures of the reference backend).

def _like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Geometry tensors (maps, weights) in the dtype and on the device of the main tensor."""
    return t.to(device=like.device, dtype=like.dtype)


def slice_volume(volume: torch.Tensor, slice_maps: torch.Tensor, n_slices: int, height: int, width: int,
                 fill: float = 0.0, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """volume ``(B,C,D,H,W)`` → slices ``(B,N,S,C,h,w)`` (see reference.slice_volume)."""
    return torch.ops.tonno_fast.slice_volume(volume, _like(slice_maps, volume), int(n_slices), int(height),
                                             int(width), float(fill), out_dtype)


def radon(volume: torch.Tensor, slice_maps: torch.Tensor, n_slices: int, height: int, width: int,
          scale: float = 1.0) -> torch.Tensor:
    """volume ``(B,C,D,H,W)`` → plane sums ``(B,C,N,S)`` times ``scale`` (see reference.radon)."""
    return torch.ops.tonno_fast.radon(volume, _like(slice_maps, volume), int(n_slices), int(height), int(width),
                                      float(scale))


def backproject(sinogram: torch.Tensor, volume_maps: torch.Tensor, weights: torch.Tensor,
                volume_shape: Sequence[int]) -> torch.Tensor:
    """sinogram ``(B,K,N,S)`` → volume ``(B,K,D,H,W)`` (see reference.backproject)."""
    return torch.ops.tonno_fast.backproject(sinogram, _like(volume_maps, sinogram), _like(weights, sinogram),
                                            [int(s) for s in volume_shape])


def backproject_slices(stacks: torch.Tensor, volume_maps: torch.Tensor, weights: torch.Tensor,
                       volume_shape: Sequence[int]) -> torch.Tensor:
    """stacks ``(B,K,N,S,h,w)`` → volume ``(B,K,D,H,W)`` (see reference.backproject_slices)."""
    return torch.ops.tonno_fast.backproject_slices(stacks, _like(volume_maps, stacks), _like(weights, stacks),
                                                   [int(s) for s in volume_shape])


def affine_grid_sample(volume: torch.Tensor, theta: torch.Tensor, size: Sequence[int],
                       align_corners: bool = False) -> torch.Tensor:
    """``grid_sample(volume, affine_grid(theta, size, align_corners), "bilinear", "zeros", align_corners)``
    for volume ``(N,C,D,H,W)`` and theta ``(N,3,4)``, without the grid. ``theta`` is differentiable."""
    return torch.ops.tonno_fast.affine_grid_sample(volume, theta, [int(s) for s in size], bool(align_corners))


# ---------------------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only (the C++ kernels check values, devices and everything else).

def _check_maps(maps: torch.Tensor, n: Optional[int] = None) -> None:
    torch._check(maps.dim() == 3 and maps.shape[1] == 3 and maps.shape[2] == 4,
                 lambda: f"tonno_fast: maps must have shape (N, 3, 4), got {tuple(maps.shape)}")
    if n is not None:
        torch._check(maps.shape[0] == n, lambda: f"tonno_fast: maps must have N = {n} directions, "
                                                 f"got {tuple(maps.shape)}")


def _check_dim(t: torch.Tensor, dim: int, arg: str, layout: str) -> None:
    torch._check(t.dim() == dim, lambda: f"tonno_fast: {arg} must have {dim} dimensions {layout}, "
                                         f"got shape {tuple(t.shape)}")


def _register() -> None:
    lib = "tonno_fast::"
    ops = torch.ops.tonno_fast

    @torch.library.register_fake(lib + "slice_volume")
    def _(volume, maps, n_slices, height, width, fill, out_dtype):
        _check_dim(volume, 5, "volume", "(B, C, D, H, W)")
        _check_maps(maps)
        B, C = volume.shape[:2]
        return volume.new_empty((B, maps.shape[0], n_slices, C, height, width),
                                dtype=volume.dtype if out_dtype is None else out_dtype)

    @torch.library.register_fake(lib + "slice_volume_backward")
    def _(grad, maps, volume_shape):
        _check_dim(grad, 6, "grad", "(B, N, S, C, h, w)")
        _check_maps(maps, grad.shape[1])
        return grad.new_empty((grad.shape[0], grad.shape[3], *volume_shape))

    @torch.library.register_fake(lib + "radon")
    def _(volume, maps, n_slices, height, width, scale):
        _check_dim(volume, 5, "volume", "(B, C, D, H, W)")
        _check_maps(maps)
        return volume.new_empty((volume.shape[0], volume.shape[1], maps.shape[0], n_slices))

    @torch.library.register_fake(lib + "radon_backward")
    def _(grad, maps, height, width, scale, volume_shape):
        _check_dim(grad, 4, "grad", "(B, C, N, S)")
        _check_maps(maps, grad.shape[2])
        return grad.new_empty((grad.shape[0], grad.shape[1], *volume_shape))

    @torch.library.register_fake(lib + "backproject")
    def _(sinogram, maps, weights, volume_shape):
        _check_dim(sinogram, 4, "sinogram", "(B, K, N, S)")
        _check_maps(maps, sinogram.shape[2])
        return sinogram.new_empty((sinogram.shape[0], sinogram.shape[1], *volume_shape))

    @torch.library.register_fake(lib + "backproject_backward")
    def _(grad, maps, weights, n_slices):
        _check_dim(grad, 5, "grad", "(B, K, D, H, W)")
        _check_maps(maps)
        return grad.new_empty((grad.shape[0], grad.shape[1], maps.shape[0], n_slices))

    @torch.library.register_fake(lib + "backproject_slices")
    def _(stacks, maps, weights, volume_shape):
        _check_dim(stacks, 6, "stacks", "(B, K, N, S, h, w)")
        _check_maps(maps, stacks.shape[2])
        return stacks.new_empty((stacks.shape[0], stacks.shape[1], *volume_shape))

    @torch.library.register_fake(lib + "backproject_slices_backward")
    def _(grad, maps, weights, stack_shape):
        _check_dim(grad, 5, "grad", "(B, K, D, H, W)")
        _check_maps(maps)
        return grad.new_empty((grad.shape[0], grad.shape[1], maps.shape[0], *stack_shape))

    @torch.library.register_fake(lib + "affine_grid_sample")
    def _(volume, theta, size, align_corners):
        _check_dim(volume, 5, "volume", "(N, C, D, H, W)")
        torch._check(len(size) == 5, lambda: f"tonno_fast: size must be [N, C, D_out, H_out, W_out], got {size}")
        return volume.new_empty(tuple(size))

    @torch.library.register_fake(lib + "affine_grid_sample_backward")
    def _(grad, volume, theta, align_corners, volume_grad, theta_grad):
        gv = volume.new_empty(volume.shape) if volume_grad else volume.new_empty((0,))
        gt = theta.new_empty(theta.shape) if theta_grad else theta.new_empty((0,))
        return gv, gt

    # --- autograd: forward -> adjoint op, adjoint op -> forward op -------------------------------------

    def _no_geometry_grad(ctx, indices, what):
        if any(ctx.needs_input_grad[i] for i in indices):
            raise RuntimeError(f"tonno_fast: {what} are not differentiable; pass them detached")

    def register_linear(name, adjoint, n_geometry, what, adjoint_args):
        """Autograd of linear op ``name``: its inputs are ``(x, *geometry, *params)`` with ``n_geometry``
        geometry tensors (``what``, not differentiable), and its gradient is
        ``adjoint(grad, *geometry, *adjoint_args(*inputs))``."""

        def setup(ctx, inputs, output):
            ctx.n_inputs = len(inputs)
            # slice_volume may write bf16/fp16 (out_dtype), so its grad arrives in that dtype: the adjoint
            # runs in the input's dtype (a no-op cast for every other op, whose output dtype is the input's).
            ctx.x_dtype = inputs[0].dtype
            ctx.adjoint_args = adjoint_args(*inputs)
            ctx.save_for_backward(*inputs[1:1 + n_geometry])

        def backward(ctx, grad):
            _no_geometry_grad(ctx, range(1, 1 + n_geometry), what)
            gx = None
            if ctx.needs_input_grad[0]:
                gx = adjoint(grad.to(ctx.x_dtype), *ctx.saved_tensors, *ctx.adjoint_args)
            return (gx,) + (None,) * (ctx.n_inputs - 1)

        torch.library.register_autograd(lib + name, backward, setup_context=setup)

    # Each linear op and its adjoint op, with the adjoint's non-geometry arguments taken from the op's inputs
    # (shapes the adjoint cannot infer from its own input). The adjoint of an adjoint op is the forward op.
    slice_maps, volume_geometry = "slice maps", "volume maps and weights"
    linear_ops = [
        ("slice_volume", ops.slice_volume_backward, 1, slice_maps,
         lambda volume, maps, n_slices, height, width, fill, out_dtype: (list(volume.shape[2:]),)),
        ("slice_volume_backward", ops.slice_volume, 1, slice_maps,
         lambda grad, maps, volume_shape: (grad.shape[2], grad.shape[4], grad.shape[5], 0.0, None)),
        ("radon", ops.radon_backward, 1, slice_maps,
         lambda volume, maps, n_slices, height, width, scale: (height, width, scale, list(volume.shape[2:]))),
        ("radon_backward", ops.radon, 1, slice_maps,
         lambda grad, maps, height, width, scale, volume_shape: (grad.shape[3], height, width, scale)),
        ("backproject", ops.backproject_backward, 2, volume_geometry,
         lambda sinogram, maps, weights, volume_shape: (sinogram.shape[3],)),
        ("backproject_backward", ops.backproject, 2, volume_geometry,
         lambda grad, maps, weights, n_slices: (list(grad.shape[2:]),)),
        ("backproject_slices", ops.backproject_slices_backward, 2, volume_geometry,
         lambda stacks, maps, weights, volume_shape: (list(stacks.shape[3:]),)),
        ("backproject_slices_backward", ops.backproject_slices, 2, volume_geometry,
         lambda grad, maps, weights, stack_shape: (list(grad.shape[2:]),)),
    ]
    for entry in linear_ops:
        register_linear(*entry)

    def setup_affine(ctx, inputs, output):
        volume, theta, size, align_corners = inputs
        ctx.align_corners = align_corners
        # theta defines the sampling points; the volume gives the shape of its gradient and, for the
        # theta gradient, the values (a saved reference, not a copy).
        ctx.save_for_backward(volume, theta)

    def backward_affine(ctx, grad):
        volume, theta = ctx.saved_tensors
        need_v, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gv, gt = ops.affine_grid_sample_backward(grad, volume, theta, ctx.align_corners, need_v, need_t)
        return (gv if need_v else None), (gt if need_t else None), None, None

    torch.library.register_autograd(lib + "affine_grid_sample", backward_affine, setup_context=setup_affine)


if _C is not None:
    _register()
