"""GradCAM and LayerCAM on batches of 2D slices, natively in torch (no NumPy round trip, any device).

Definitions (the same as ``pytorch_grad_cam``, before its per-image min-max normalisation), for a target
score ``y`` and the activation ``A`` ``(M, C, h', w')`` of a target layer, ``G = ∂y/∂A``:

* GradCAM  (Selvaraju et al. 2017): ``cam = ReLU(Σ_c mean_ij(G_c) A_c)``;
* LayerCAM (Jiang et al. 2021):     ``cam = ReLU(Σ_c ReLU(G_c) ⊙ A_c)``.

Each layer's CAM is upsampled to the slice size with ``F.interpolate(mode="bilinear",
align_corners=False)`` (the same half-pixel convention as OpenCV's ``resize``), and several target layers
are averaged. Values are kept raw (no per-image normalisation: a per-slice rescaling would destroy the
relation between slices that the reconstruction relies on); the pipelines offer an optional per-volume
normalisation instead.

Samples are independent (the model must be in eval mode), so the gradient of ``Σ_m y_m`` with respect to
the batch's activations gives every sample's own gradient in one backward pass per target.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CAMMethod", "GradCAM", "LayerCAM", "gradcam", "layercam", "resolve_target_layers",
           "make_score_fn", "vit_reshape_transform", "CAM_METHODS"]


def resolve_target_layers(model: nn.Module, target_layers) -> List[nn.Module]:
    """``target_layers`` (a module, a dotted name such as ``"layer4.1"`` / ``"blocks.-1.norm1"``, or a list of
    them) → list of submodules of ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"CAM methods hook into layers: the model must be an nn.Module, got {type(model).__name__}")
    if target_layers is None:
        raise ValueError("target_layers is required for GradCAM/LayerCAM: a module, a dotted module name "
                         "(e.g. 'layer4') or a list of them")
    if isinstance(target_layers, (str, nn.Module)):
        target_layers = [target_layers]
    layers = []
    for t in target_layers:
        if isinstance(t, nn.Module):
            if not any(t is m for m in model.modules()):
                raise ValueError(f"target layer {type(t).__name__} is not a submodule of the model")
            layers.append(t)
        elif isinstance(t, str):
            mod = model
            for part in t.split("."):
                try:
                    if part.lstrip("-").isdigit() and isinstance(mod, (nn.Sequential, nn.ModuleList)):
                        mod = mod[int(part)]
                    else:
                        mod = getattr(mod, part)
                except (AttributeError, IndexError):
                    raise ValueError(f"target layer {t!r}: the model has no submodule {part!r} on that path") from None
            if not isinstance(mod, nn.Module):
                raise ValueError(f"target layer {t!r} is not a module but a {type(mod).__name__}")
            layers.append(mod)
        else:
            raise TypeError(f"target_layers entries must be modules or dotted names, got {type(t).__name__}")
    if not layers:
        raise ValueError("target_layers must not be empty")
    return layers


def make_score_fn(targets, n_samples: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Turn ``targets`` into ``raw_output (M, ...) → scores (M, K)``.

    ``None``: the predicted class of each sample (argmax, as ``pytorch_grad_cam``); an ``int``: that class for
    every sample (broadcast); a sequence or 1-D tensor of ``M`` ints: one class per sample; an ``(M, K)``
    integer tensor: ``K`` classes per sample; a callable: applied to the raw output, returning ``(M,)`` or
    ``(M, K)`` scores.
    """
    if callable(targets) and not isinstance(targets, torch.Tensor):
        def fn(out):
            s = targets(out)
            return s[:, None] if s.ndim == 1 else s
        return fn
    if targets is None:
        return lambda out: out.gather(1, out.detach().argmax(dim=1, keepdim=True))
    if isinstance(targets, int) and not isinstance(targets, bool):
        return lambda out: out[:, targets:targets + 1]
    idx = torch.as_tensor(targets)
    if idx.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise TypeError(f"targets must be class indices (integers) or a callable, got dtype {idx.dtype}")
    if idx.ndim == 1:
        idx = idx[:, None]
    if idx.ndim != 2 or idx.shape[0] != n_samples:
        raise ValueError(f"per-sample targets must have M = {n_samples} rows, got shape {tuple(idx.shape)}")
    return lambda out: out.gather(1, idx.to(out.device).long())


def _combine_gradcam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    return torch.relu((G.mean(dim=(2, 3), keepdim=True) * A).sum(dim=1))


def _combine_layercam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    return torch.relu((torch.relu(G) * A).sum(dim=1))


def compute_cams(model: nn.Module, x: torch.Tensor, target_layers, score_fn: Callable, *, combine: Callable,
                 reshape_transform: Optional[Callable] = None, size: Optional[Tuple[int, int]] = None,
                 autocast=None, upsample: bool = True) -> torch.Tensor:
    """Core of every native CAM: one forward pass, one backward per target, CAMs ``(M, K, H, W)`` float32.

    ``combine(A, G)`` maps float32 activations and gradients ``(M, C, h', w')`` to a CAM ``(M, h', w')``.
    ``size`` ``(H, W)`` defaults to the input's size; ``autocast`` is a context manager factory or ``None``.
    ``upsample=False`` returns the maps at the target layers' resolution ``(M, K, h', w')`` when every layer
    has the same one (the caller upsamples them bilinearly, ``align_corners=False``, to ``size``: the last,
    linear step of the CAM, which commutes with any linear map across slices); layers of different
    resolutions are upsampled to ``size`` as usual.
    """
    layers = resolve_target_layers(model, target_layers)
    if x.ndim != 4:
        raise ValueError(f"CAM input must be a batch of images (M, C, h, w), got shape {tuple(x.shape)}")
    size = tuple(x.shape[-2:]) if size is None else tuple(int(s) for s in size)
    acts: List[List[torch.Tensor]] = [[] for _ in layers]

    def hook(i):
        def store(module, inputs, output):
            acts[i].append(output)
        return store

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.enable_grad():
            # A leaf that requires grad makes every activation part of the graph even when the model's
            # parameters are frozen (requires_grad=False), which is common for pretrained encoders.
            xin = x.detach().requires_grad_(True)
            ctx = autocast() if autocast is not None else contextlib.nullcontext()
            with ctx:
                out = model(xin)
                scores = score_fn(out)
    finally:
        for h in handles:
            h.remove()
    for layer, a in zip(layers, acts):
        if len(a) != 1:
            raise ValueError(f"target layer {type(layer).__name__} ran {len(a)} times in one forward pass; "
                             "pick a module that runs exactly once (e.g. a block rather than a shared ReLU)")
        if not isinstance(a[0], torch.Tensor):
            raise TypeError(f"target layer {type(layer).__name__} returned {type(a[0]).__name__}, not a tensor")
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or scores.shape[0] != x.shape[0]:
        raise ValueError(f"target scores must be (M, K) with M = {x.shape[0]}, got "
                         f"{getattr(scores, 'shape', type(scores).__name__)}")
    acts_t = [a[0] for a in acts]
    K = scores.shape[1]
    cams = []
    for k in range(K):
        grads = torch.autograd.grad(scores[:, k].sum(), acts_t, retain_graph=k < K - 1, allow_unused=True)
        per_layer = []
        for layer, A, G in zip(layers, acts_t, grads):
            if G is None:
                raise ValueError(f"the target score does not depend on target layer {type(layer).__name__}")
            A, G = A.detach(), G.detach()
            if reshape_transform is not None:
                A, G = reshape_transform(A), reshape_transform(G)
            if A.ndim != 4:
                raise ValueError(f"target layer activations must be (M, C, h', w') (use reshape_transform for "
                                 f"token outputs), got shape {tuple(A.shape)}")
            per_layer.append(combine(A.float(), G.float()))
        if upsample or len({tuple(c.shape[-2:]) for c in per_layer}) > 1:
            per_layer = [c if tuple(c.shape[-2:]) == size else
                         F.interpolate(c[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
                         for c in per_layer]
        cams.append(torch.stack(per_layer).mean(dim=0) if len(per_layer) > 1 else per_layer[0])
    return torch.stack(cams, dim=1)


def gradcam(model: nn.Module, x: torch.Tensor, target_layers, targets=None, *,
            reshape_transform: Optional[Callable] = None, size=None) -> torch.Tensor:
    """GradCAM of images ``x`` ``(M, C, h, w)`` → ``(M, K, H, W)`` float32 (``(H, W)`` = ``size`` or ``(h, w)``).

    ``target_layers``: module(s) or dotted name(s); ``targets``: see :func:`make_score_fn`;
    ``reshape_transform``: token tensor → ``(M, C, h', w')`` (see :func:`vit_reshape_transform`).
    """
    return compute_cams(model, x, target_layers, make_score_fn(targets, x.shape[0]), combine=_combine_gradcam,
                        reshape_transform=reshape_transform, size=size)


def layercam(model: nn.Module, x: torch.Tensor, target_layers, targets=None, *,
             reshape_transform: Optional[Callable] = None, size=None) -> torch.Tensor:
    """LayerCAM of images ``x`` ``(M, C, h, w)`` → ``(M, K, H, W)`` float32. Arguments as :func:`gradcam`."""
    return compute_cams(model, x, target_layers, make_score_fn(targets, x.shape[0]), combine=_combine_layercam,
                        reshape_transform=reshape_transform, size=size)


def vit_reshape_transform(height: int, width: int, n_prefix_tokens: int = 1) -> Callable:
    """``reshape_transform`` for ViT token outputs ``(M, n_prefix + h'·w', E)`` → ``(M, E, h', w')``:
    drops the class/register tokens and lays the patch tokens out on their ``h' × w'`` grid."""
    def transform(t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 3 or t.shape[1] != n_prefix_tokens + height * width:
            raise ValueError(f"expected tokens (M, {n_prefix_tokens} + {height}·{width}, E), got {tuple(t.shape)}")
        return t[:, n_prefix_tokens:].reshape(t.shape[0], height, width, t.shape[2]).permute(0, 3, 1, 2)
    return transform


class CAMMethod:
    """A CAM method as the pipelines call it: ``method(encoder, x) → (M, K, h, w)`` float32 on ``x``'s device,
    for model-ready slices ``x`` ``(M, C_in, h, w)`` and the targets selected by ``encoder.output``.

    A method whose last step is a bilinear upsampling (``align_corners=False``) sets ``deferred_upsampling``
    and accepts ``upsample=False``: it may then return its maps at their own resolution ``(M, K, h', w')``,
    and the caller upsamples them. Tomographic CAM uses it to filter the stacks across slices before
    upsampling (the two linear maps act on different axes and commute: the same result, with ``h·w / h'·w'``
    times less filtering work)."""

    name = "cam"
    deferred_upsampling = False

    def __call__(self, encoder, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class _NativeCAM(CAMMethod):
    combine: Callable = None
    deferred_upsampling = True

    def __init__(self, target_layers, reshape_transform: Optional[Callable] = None):
        self.target_layers = target_layers
        self.reshape_transform = reshape_transform

    def __call__(self, encoder, x: torch.Tensor, upsample: bool = True) -> torch.Tensor:
        device = encoder.device(x.device)
        xin = encoder.model_input(x, device)
        cams = compute_cams(encoder.model, xin, self.target_layers,
                            lambda out: encoder.select(out, xin.shape[0]),
                            combine=type(self).combine, reshape_transform=self.reshape_transform,
                            size=tuple(x.shape[-2:]),
                            autocast=(lambda: encoder.autocast_context(device)) if encoder.autocast else None,
                            upsample=upsample)
        return cams.to(x.device)


class GradCAM(_NativeCAM):
    """Native GradCAM bound to ``target_layers`` (see :func:`gradcam`)."""
    name = "gradcam"
    combine = staticmethod(_combine_gradcam)


class LayerCAM(_NativeCAM):
    """Native LayerCAM bound to ``target_layers`` (see :func:`layercam`)."""
    name = "layercam"
    combine = staticmethod(_combine_layercam)


CAM_METHODS = {"gradcam": GradCAM, "layercam": LayerCAM}
