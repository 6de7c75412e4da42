"""The contract of every operator, written once for both op namespaces.

Each op exists twice: ``torch.ops.tonno_fast.<op>`` (C++ kernels in ``csrc/ops/cpu/<op>.cpp`` and
``csrc/ops/cuda/<op>.cu``) and ``torch.ops.tonno_fast_triton.<op>`` (Triton kernels and launchers in
``tonno_fast/ops/triton/<op>.py``). What does not depend on the kernels is stated here, once per op, in a
:class:`Contract`:

* ``schema``: the op's signature, defined here for both namespaces (the Triton one adds the Triton-only
  ``fusions``); the dispatcher checks the C++ kernels' signatures against it;
* ``check``: the argument checks, the Python twin of ``csrc/include/tonno_fast/checks.h`` with the same
  messages (``RuntimeError``, as ``TORCH_CHECK``). They run in every fake kernel and before every Triton launch;
  the C++ kernels run checks.h;
* ``output``: the output's shape and dtype, from which the fake (meta) kernel of both namespaces is made, so
  the ops trace under ``torch.compile(fullgraph=True)`` and run on meta tensors;
* the autograd formula. Every op but ``affine_grid_sample`` is linear in its first argument, and its
  vector-Jacobian product is another op, ``adjoint``, applied to the incoming gradient with the same geometry
  tensors (``n_geometry`` of them after the input: maps, weights) and the arguments ``adjoint_args`` computes
  from the op's inputs. The adjoint of each adjoint op is the forward op, so double backward is exact too.
  Geometry tensors are constants: asking for their gradient is an error. ``affine_grid_sample`` (also
  differentiable in ``theta``) has its own formula below.

Triton-only arguments (``fusions``: ``window`` and ``replicate_channels`` of ``slice_volume``, the fused
``laplacian_spacing`` of the backprojection of slices) follow the common ones in the Triton schema; the contract
holds their defaults, so both namespaces share every line below. ``affine_sample`` and its backward exist in
the C++ namespace only: the C++ kernels of ``affine_grid_sample`` (see :mod:`tonno_fast.ops.native`).

:func:`register_native` and :func:`define_triton` are the only callers of ``torch.library``'s fake, autograd
and op-definition functions in the project; :mod:`tonno_fast.ops.native` and :mod:`tonno_fast.ops.triton.backend`
call them when their kernels load. docs/adding-an-op.md says how to add an op.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["FLOAT_DTYPES", "OUT_DTYPES", "Contract", "CONTRACTS", "register_native", "define_triton"]

#: dtypes every kernel computes in.
FLOAT_DTYPES = (torch.float32, torch.float64)
#: dtypes ``slice_volume`` may write (``out_dtype``).
OUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------
# The checks of checks.h. torch._check raises RuntimeError, as TORCH_CHECK does, and works on fake tensors.

def _check(cond, *message) -> None:
    torch._check(cond, lambda: "tonno_fast: " + "".join(str(m) for m in message))


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


def check_input(t: torch.Tensor, dim: int, name: str, layout: str) -> None:
    """The op's main tensor: float32/float64 with ``dim`` dimensions (``layout``) and no empty dimension."""
    _check(isinstance(t, torch.Tensor), name, " must be a defined tensor, got ", type(t).__name__)
    _check(t.dtype in FLOAT_DTYPES, name, " must be float32 or float64, got ", t.dtype)
    _check(t.dim() == dim, name, " must have ", dim, " dimensions ", layout, ", got shape ", _shape(t))
    _check(all(s > 0 for s in t.shape), name, " must have positive sizes, got shape ", _shape(t))


def check_like(t: torch.Tensor, like: torch.Tensor, name: str, like_name: str) -> None:
    """``t`` has the dtype and device of ``like`` (the op's main tensor, named ``like_name``)."""
    _check(t.dtype == like.dtype, name, " must have the dtype of ", like_name, " (", like.dtype, "), got ", t.dtype)
    _check(t.device == like.device, name, " must be on the device of ", like_name, " (", like.device, "), got ",
           t.device)


def check_maps(maps: torch.Tensor, like: torch.Tensor, like_name: str) -> int:
    """Index-space maps ``(N, 3, 4)``, ``N > 0``, with ``like``'s dtype and device; returns N."""
    _check(isinstance(maps, torch.Tensor) and maps.dim() == 3 and maps.shape[0] > 0
           and tuple(maps.shape[1:]) == (3, 4), "maps must have shape (N, 3, 4) with N > 0, got ", _shape(maps))
    check_like(maps, like, "maps", like_name)
    return maps.shape[0]


def check_directions(t: torch.Tensor, dim: int, n: int, name: str, layout: str) -> None:
    """Dimension ``dim`` of ``t`` (shape ``layout``) counts the N directions of maps."""
    _check(t.shape[dim] == n, name, " must have N = maps.size(0) = ", n, " directions (dim ", dim, " of ", layout,
           "), got shape ", _shape(t))


def check_weights(weights: torch.Tensor, n: int, like: torch.Tensor, like_name: str) -> None:
    _check(isinstance(weights, torch.Tensor) and weights.dim() == 1 and weights.shape[0] == n,
           "weights must have shape (N,) = (", n, ",) (one per direction of maps), got ", _shape(weights))
    check_like(weights, like, "weights", like_name)


def check_shape3(s: Sequence[int], name: str, layout: str) -> None:
    """A list of three positive sizes, e.g. ``volume_shape = [D, H, W]``."""
    _check(len(s) == 3, name, " must have 3 entries ", layout, ", got ", list(s))
    _check(all(v > 0 for v in s), name, " must be positive ", layout, ", got ", list(s))


def check_positive(v: int, name: str) -> None:
    _check(v > 0, name, " must be positive, got ", v)


def check_theta(volume: torch.Tensor, theta: torch.Tensor) -> None:
    """``theta`` ``(N, 3, 4)``: one affine_grid matrix per batch item of ``volume`` ``(N, C, D, H, W)``."""
    _check(isinstance(theta, torch.Tensor) and theta.dim() == 3 and tuple(theta.shape[1:]) == (3, 4)
           and theta.shape[0] == volume.shape[0],
           "theta must have shape (N, 3, 4) with N = volume.size(0) = ", volume.shape[0], ", got ", _shape(theta))
    check_like(theta, volume, "theta", "volume")


def check_size(size: Sequence[int], volume: torch.Tensor) -> None:
    """``size = [N, C, D_out, H_out, W_out]`` of an affine resampling of ``volume``."""
    _check(len(size) == 5 and size[0] == volume.shape[0] and size[1] == volume.shape[1],
           "size must be [N, C, D_out, H_out, W_out] with N, C = ", volume.shape[0], ", ", volume.shape[1],
           " (those of volume), got ", list(size))
    _check(all(s > 0 for s in size[2:]), "size must have positive D_out, H_out, W_out, got ", list(size))


def check_grad_of(grad: torch.Tensor, volume: torch.Tensor) -> None:
    """``grad`` ``(N, C, D_out, H_out, W_out)`` of an affine resampling of ``volume``."""
    check_input(grad, 5, "grad", "(N, C, D_out, H_out, W_out)")
    check_like(grad, volume, "grad", "volume")
    _check(grad.shape[0] == volume.shape[0] and grad.shape[1] == volume.shape[1],
           "grad must have the N, C of volume (", volume.shape[0], ", ", volume.shape[1], "), got ", _shape(grad))


# ---------------------------------------------------------------------------------------------------------
# The contracts.

@dataclass(frozen=True)
class Contract:
    """What one op promises, whatever its kernel (see the module docstring).

    ``schema`` is the op's signature in the ``tonno_fast`` namespace; in ``tonno_fast_triton`` integers are
    ``SymInt`` and the ``fusions`` follow. ``check(*args, **fusions)`` raises ``RuntimeError`` on bad
    arguments; ``output(*args, **fusions)`` returns empty output tensors of the right shapes and dtypes;
    ``adjoint`` names the op computing the vector-Jacobian
    product with respect to the first argument, called as
    ``adjoint(prepare_grad(grad), *args[1:1 + n_geometry], *adjoint_args(*args))`` (plus, in the Triton
    namespace, the adjoint's fusions, taken from this op's when they share a name, else their defaults);
    ``geometry`` names the ``n_geometry`` constant tensors in the error raised when their gradient is asked for.
    """

    schema: str
    check: Callable[..., None]
    output: Callable[..., object]
    adjoint: Optional[str] = None
    adjoint_args: Callable[..., tuple] = lambda *args, **fusions: ()
    n_geometry: int = 0
    geometry: str = ""
    fusions: Dict[str, Tuple[str, object]] = field(default_factory=dict)  # name -> (schema type, default)
    prepare_grad: Callable[..., torch.Tensor] = lambda grad, **fusions: grad
    triton: bool = True  # also defined in the tonno_fast_triton namespace


def _new(like: torch.Tensor, shape, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return like.new_empty(tuple(shape), dtype=dtype or like.dtype)


SLICE_MAPS, VOLUME_GEOMETRY = "slice maps", "volume maps and weights"
VOLUME, SLICES, PLANE_SUMS = "(B, C, D, H, W)", "(B, N, S, C, h, w)", "(B, C, N, S)"
SINOGRAM, STACKS, VOLUME_GRAD = "(B, K, N, S)", "(B, K, N, S, h, w)", "(B, K, D, H, W)"

CONTRACTS: Dict[str, Contract] = {}


# --- slice_volume: volume (B, C, D, H, W) -> slices (B, N, S, C, h, w) ------------------------------------

def _slice_volume_check(volume, maps, n_slices, height, width, fill, out_dtype, **fusions):
    check_input(volume, 5, "volume", VOLUME)
    check_maps(maps, volume, "volume")
    for v, name in ((n_slices, "n_slices"), (height, "height"), (width, "width")):
        check_positive(v, name)
    _check(out_dtype is None or out_dtype in OUT_DTYPES,
           "out_dtype must be None, float32, float64, float16 or bfloat16, got ", out_dtype)


def _slice_volume_output(volume, maps, n_slices, height, width, fill, out_dtype, window=None,
                         replicate_channels=1):
    B, C = volume.shape[:2]
    return _new(volume, (B, maps.shape[0], n_slices, C * replicate_channels, height, width), out_dtype)


def _slice_volume_grad(grad, window=None, replicate_channels=1):
    if window is not None:
        raise RuntimeError("slice_volume: window= is an inference-only fusion (clamping is not differentiated); "
                           "slice without it and window afterwards to get gradients")
    if replicate_channels > 1:  # the copies of a channel were all read from the same samples
        grad = grad.unflatten(3, (-1, replicate_channels)).sum(4)
    return grad


def _slice_volume_backward_check(grad, maps, volume_shape):
    check_input(grad, 6, "grad", SLICES)
    check_directions(grad, 1, check_maps(maps, grad, "grad"), "grad", SLICES)
    check_shape3(volume_shape, "volume_shape", "(D, H, W)")


CONTRACTS["slice_volume"] = Contract(
    "(Tensor volume, Tensor maps, int n_slices, int height, int width, float fill, ScalarType? out_dtype) -> Tensor",
    check=_slice_volume_check, output=_slice_volume_output,
    adjoint="slice_volume_backward", adjoint_args=lambda volume, *args, **fusions: (list(volume.shape[2:]),),
    n_geometry=1, geometry=SLICE_MAPS, fusions={"window": ("float[]?", None), "replicate_channels": ("int", 1)},
    prepare_grad=_slice_volume_grad)
CONTRACTS["slice_volume_backward"] = Contract(
    "(Tensor grad, Tensor maps, int[] volume_shape) -> Tensor",
    check=_slice_volume_backward_check,
    output=lambda grad, maps, volume_shape: _new(grad, (grad.shape[0], grad.shape[3], *volume_shape)),
    adjoint="slice_volume",
    adjoint_args=lambda grad, maps, volume_shape: (grad.shape[2], grad.shape[4], grad.shape[5], 0.0, None),
    n_geometry=1, geometry=SLICE_MAPS)


# --- radon: volume (B, C, D, H, W) -> plane sums (B, C, N, S) times scale ----------------------------------

def _radon_backward_check(grad, maps, height, width, scale, volume_shape):
    check_input(grad, 4, "grad", PLANE_SUMS)
    check_directions(grad, 2, check_maps(maps, grad, "grad"), "grad", PLANE_SUMS)
    check_positive(height, "height")
    check_positive(width, "width")
    check_shape3(volume_shape, "volume_shape", "(D, H, W)")


CONTRACTS["radon"] = Contract(
    "(Tensor volume, Tensor maps, int n_slices, int height, int width, float scale) -> Tensor",
    check=lambda volume, maps, n_slices, height, width, scale: _slice_volume_check(volume, maps, n_slices, height,
                                                                                   width, 0.0, None),
    output=lambda volume, maps, n_slices, height, width, scale: _new(volume, (*volume.shape[:2], maps.shape[0],
                                                                               n_slices)),
    adjoint="radon_backward",
    adjoint_args=lambda volume, maps, n_slices, height, width, scale: (height, width, scale, list(volume.shape[2:])),
    n_geometry=1, geometry=SLICE_MAPS)
CONTRACTS["radon_backward"] = Contract(
    "(Tensor grad, Tensor maps, int height, int width, float scale, int[] volume_shape) -> Tensor",
    check=_radon_backward_check,
    output=lambda grad, maps, height, width, scale, volume_shape: _new(grad, (*grad.shape[:2], *volume_shape)),
    adjoint="radon",
    adjoint_args=lambda grad, maps, height, width, scale, volume_shape: (grad.shape[3], height, width, scale),
    n_geometry=1, geometry=SLICE_MAPS)


# --- backproject: sinogram (B, K, N, S) -> volume (B, K, D, H, W); backproject_slices: stacks -> volume ------

def _backprojection_check(x, name, layout, maps, weights, volume_shape):
    check_input(x, layout.count(",") + 1, name, layout)
    n = check_maps(maps, x, name)
    check_directions(x, 2, n, name, layout)
    check_weights(weights, n, x, name)
    check_shape3(volume_shape, "volume_shape", "(D, H, W)")


def _backprojection_backward_check(grad, maps, weights):
    check_input(grad, 5, "grad", VOLUME_GRAD)
    check_weights(weights, check_maps(maps, grad, "grad"), grad, "grad")


def _backprojection_output(x, maps, weights, volume_shape, **fusions):
    return _new(x, (*x.shape[:2], *volume_shape))


def _backprojection_backward_output(grad, maps, weights, projection_shape, **fusions):
    """``projection_shape``: ``n_slices`` (backproject) or ``[S, h, w]`` (backproject_slices)."""
    shape = list(projection_shape) if isinstance(projection_shape, (list, tuple)) else [projection_shape]
    return _new(grad, (*grad.shape[:2], maps.shape[0], *shape))


CONTRACTS["backproject"] = Contract(
    "(Tensor sinogram, Tensor maps, Tensor weights, int[] volume_shape) -> Tensor",
    check=lambda sinogram, maps, weights, volume_shape: _backprojection_check(
        sinogram, "sinogram", SINOGRAM, maps, weights, volume_shape),
    output=_backprojection_output,
    adjoint="backproject_backward", adjoint_args=lambda sinogram, *args: (sinogram.shape[3],),
    n_geometry=2, geometry=VOLUME_GEOMETRY)
CONTRACTS["backproject_backward"] = Contract(
    "(Tensor grad, Tensor maps, Tensor weights, int n_slices) -> Tensor",
    check=lambda grad, maps, weights, n_slices: (_backprojection_backward_check(grad, maps, weights),
                                                 check_positive(n_slices, "n_slices")),
    output=_backprojection_backward_output,
    adjoint="backproject", adjoint_args=lambda grad, *args: (list(grad.shape[2:]),),
    n_geometry=2, geometry=VOLUME_GEOMETRY)
CONTRACTS["backproject_slices"] = Contract(
    "(Tensor stacks, Tensor maps, Tensor weights, int[] volume_shape) -> Tensor",
    check=lambda stacks, maps, weights, volume_shape, **fusions: _backprojection_check(
        stacks, "stacks", STACKS, maps, weights, volume_shape),
    output=_backprojection_output,
    adjoint="backproject_slices_backward", adjoint_args=lambda stacks, *args, **fusions: (list(stacks.shape[3:]),),
    n_geometry=2, geometry=VOLUME_GEOMETRY, fusions={"laplacian_spacing": ("float?", None)})
CONTRACTS["backproject_slices_backward"] = Contract(
    "(Tensor grad, Tensor maps, Tensor weights, int[] stack_shape) -> Tensor",
    check=lambda grad, maps, weights, stack_shape, **fusions: (_backprojection_backward_check(grad, maps, weights),
                                                               check_shape3(stack_shape, "stack_shape", "(S, h, w)")),
    output=_backprojection_backward_output,
    adjoint="backproject_slices", adjoint_args=lambda grad, *args, **fusions: (list(grad.shape[2:]),),
    n_geometry=2, geometry=VOLUME_GEOMETRY, fusions={"laplacian_spacing": ("float?", None)})


# --- affine_grid_sample: volume (N, C, D, H, W), theta (N, 3, 4) -> (N, C, D_out, H_out, W_out) -------------
# Differentiable in volume and theta: autograd below. affine_sample is the same resampling with theta already
# folded into index-space maps (geometry.affine_theta_maps): the C++ kernels.

def _affine_check(volume, theta, size, align_corners):
    check_input(volume, 5, "volume", "(N, C, D, H, W)")
    check_theta(volume, theta)
    check_size(size, volume)


def _affine_backward_check(grad, volume, theta, align_corners, volume_grad, theta_grad):
    check_input(volume, 5, "volume", "(N, C, D, H, W)")
    check_theta(volume, theta)
    check_grad_of(grad, volume)


def _affine_backward_output(grad, volume, theta, *flags):
    """The two gradients; one not asked for (``flags[-2:]``: volume_grad, theta_grad) is an empty tensor."""
    volume_grad, theta_grad = flags[-2:]
    return _new(volume, volume.shape if volume_grad else (0,)), _new(theta, theta.shape if theta_grad else (0,))


def check_affine_volume(volume: torch.Tensor, maps: torch.Tensor) -> None:
    """``volume`` ``(N, C, D, H, W)`` with one map per batch item (affine_sample)."""
    check_input(volume, 5, "volume", "(N, C, D, H, W)")
    _check(check_maps(maps, volume, "volume") == volume.shape[0],
           "maps must have one map per batch item, N = volume.size(0) = ", volume.shape[0], ", got shape ",
           _shape(maps))


def _affine_sample_backward_check(grad, volume, maps, volume_grad, maps_grad):
    check_affine_volume(volume, maps)
    check_grad_of(grad, volume)


def _affine_sample_backward_output(grad, volume, maps, volume_grad, maps_grad):
    """The volume gradient and the map gradient (float64: sums over every output point); one not asked for is
    an empty tensor."""
    return (_new(volume, volume.shape if volume_grad else (0,)),
            _new(maps, maps.shape if maps_grad else (0,), torch.float64))


CONTRACTS["affine_grid_sample"] = Contract(
    "(Tensor volume, Tensor theta, int[] size, bool align_corners) -> Tensor",
    check=_affine_check, output=lambda volume, theta, size, align_corners: _new(volume, size))
CONTRACTS["affine_grid_sample_backward"] = Contract(
    "(Tensor grad, Tensor volume, Tensor theta, bool align_corners, bool volume_grad, bool theta_grad) "
    "-> (Tensor, Tensor)",
    check=_affine_backward_check, output=_affine_backward_output)
CONTRACTS["affine_sample"] = Contract(
    "(Tensor volume, Tensor maps, int[] size) -> Tensor",
    check=lambda volume, maps, size: (check_affine_volume(volume, maps), check_size(size, volume)),
    output=lambda volume, maps, size: _new(volume, size), triton=False)
CONTRACTS["affine_sample_backward"] = Contract(
    "(Tensor grad, Tensor volume, Tensor maps, bool volume_grad, bool maps_grad) -> (Tensor, Tensor)",
    check=_affine_sample_backward_check, output=_affine_sample_backward_output, triton=False)


def _affine_setup(ctx, inputs, output):
    volume, theta, size, align_corners = inputs
    # theta places the samples; the volume gives the shape of its gradient and, for theta's gradient, the
    # values (a saved reference, not a copy).
    ctx.save_for_backward(volume, theta)
    ctx.align_corners = align_corners


def _affine_backward(namespace: str):
    def backward(ctx, grad):
        volume, theta = ctx.saved_tensors
        need_v, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_v or need_t):
            return None, None, None, None
        gv, gt = getattr(torch.ops, namespace).affine_grid_sample_backward(grad, volume, theta, ctx.align_corners,
                                                                           need_v, need_t)
        return (gv if need_v else None), (gt if need_t else None), None, None
    return backward


# ---------------------------------------------------------------------------------------------------------
# Registration: the same schemas, fake kernels and autograd for both namespaces.

def triton_schema(contract: Contract) -> str:
    """The op's schema in ``tonno_fast_triton``: integers are ``SymInt`` (as ``torch.library.infer_schema`` gives
    Python ``int`` arguments) and the Triton-only fusions follow the common arguments."""
    schema = re.sub(r"\bint\b", "SymInt", contract.schema)
    extra = "".join(f", {re.sub(r'^int', 'SymInt', kind)} {name}" for name, (kind, _) in contract.fusions.items())
    head, tail = schema.split(") ->", 1)
    return f"{head}{extra}) ->{tail}"


def _split(contract: Contract, args: tuple, with_fusions: bool):
    """``args`` → (the common arguments, the fusions as keywords)."""
    if not (with_fusions and contract.fusions):
        return args, {}
    k = len(contract.fusions)
    return args[:-k], dict(zip(contract.fusions, args[-k:]))


def _fake(contract: Contract, with_fusions: bool):
    def fake(*args):
        common, fusions = _split(contract, args, with_fusions)
        contract.check(*common, **fusions)
        return contract.output(*common, **fusions)
    return fake


def _linear_autograd(namespace: str, contract: Contract, with_fusions: bool):
    """``(backward, setup_context)`` of a linear op: its gradient is its adjoint op (see :class:`Contract`)."""
    adjoint = CONTRACTS[contract.adjoint]
    geometry = slice(1, 1 + contract.n_geometry)

    def setup(ctx, inputs, output):
        common, fusions = _split(contract, inputs, with_fusions)
        ctx.n_inputs = len(inputs)
        # slice_volume may write bf16/fp16 (out_dtype), so its gradient arrives in that dtype: the adjoint runs
        # in the input's dtype (a no-op for every other op, whose output has its input's dtype).
        ctx.x_dtype = inputs[0].dtype
        ctx.fusions = fusions
        ctx.adjoint_args = contract.adjoint_args(*common, **fusions)
        if with_fusions:
            ctx.adjoint_args += tuple(fusions.get(k, default) for k, (_, default) in adjoint.fusions.items())
        ctx.save_for_backward(*inputs[geometry])

    def backward(ctx, grad):
        if any(ctx.needs_input_grad[geometry]):
            raise RuntimeError(f"tonno_fast: {contract.geometry} are not differentiable; pass them detached")
        gx = None
        if ctx.needs_input_grad[0]:
            gx = getattr(getattr(torch.ops, namespace), contract.adjoint)(
                contract.prepare_grad(grad, **ctx.fusions).to(ctx.x_dtype), *ctx.saved_tensors, *ctx.adjoint_args)
        return (gx,) + (None,) * (ctx.n_inputs - 1)

    return backward, setup


def _register(namespace: str, with_fusions: bool) -> None:
    """Fake kernels and autograd of every op of ``namespace`` (its ops already defined)."""
    for name, contract in CONTRACTS.items():
        if with_fusions and not contract.triton:
            continue
        qualname = f"{namespace}::{name}"
        torch.library.register_fake(qualname, _fake(contract, with_fusions))
        if contract.adjoint is not None:
            backward, setup = _linear_autograd(namespace, contract, with_fusions)
            torch.library.register_autograd(qualname, backward, setup_context=setup)
    torch.library.register_autograd(f"{namespace}::affine_grid_sample", _affine_backward(namespace),
                                    setup_context=_affine_setup)


_NATIVE: Dict[str, torch.library.Library] = {}  # keeps the definitions alive


def register_native() -> None:
    """Define ``torch.ops.tonno_fast.*`` (the C++ kernels of ``tonno_fast._C`` registered themselves for these
    names when it loaded) with their fake kernels and autograd."""
    lib = _NATIVE.setdefault("tonno_fast", torch.library.Library("tonno_fast", "DEF"))
    for name, contract in CONTRACTS.items():
        lib.define(name + contract.schema)
    _register("tonno_fast", with_fusions=False)


def define_triton(launchers: Dict[str, Callable], interpreted: bool) -> None:
    """Define ``torch.ops.tonno_fast_triton.<op>`` for every launcher (it runs after the op's checks), with its
    fake kernel and autograd.

    On a GPU the ops are ``torch.library.triton_op`` s, so ``torch.compile``/Inductor sees the Triton kernels
    through ``wrap_triton``. Under ``TRITON_INTERPRET=1`` (CPU CI) they are plain ``custom_op`` s: there
    ``wrap_triton`` returns the interpreted kernel unchanged, and ``triton_op``'s functional decomposition (used
    by ``opcheck``'s AOT tests and by ``torch.compile``) would run the interpreter on fake tensors ("Attempted to
    access the data pointer on an invalid python storage"). The op bodies are the same either way, so the
    interpreter tests exercise the code that runs on a GPU."""
    define = torch.library.custom_op if interpreted else torch.library.triton_op
    for name, launcher in launchers.items():
        contract = CONTRACTS[name]

        def checked(*args, _contract=contract, _launcher=launcher):
            common, fusions = _split(_contract, args, True)
            _contract.check(*common, **fusions)
            return _launcher(*args)

        define(f"tonno_fast_triton::{name}", checked, mutates_args=(), schema=triton_schema(contract))
    _register("tonno_fast_triton", with_fusions=True)
