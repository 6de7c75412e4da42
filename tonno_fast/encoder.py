"""Wrap any 2D classifier so the pipelines can feed it slices (docs/design.md, "The method", "Streaming").

:class:`Encoder` holds everything between "a slice of the volume" and "the model's scores":

* intensity handling: a CT-style window ``[lo, hi] → [0, 1]`` applied to the *volume* before slicing (a clip
  is not linear, so it must act on voxels, as CT preprocessing does), and/or a per-volume z-score
  ``(x - mean) / std`` applied to the slices with the statistics of the whole (windowed) volume. An affine map
  commutes with trilinear interpolation, so z-scoring slices equals slicing the z-scored volume with the fill
  value mapped the same way, and it stays per batch item;
* adjacent-slice context: the model sees the slices at ``s - c Δs, …, s, …, s + c Δs`` as channels
  (``context = c``, ``context_step`` in slices). These are the *neighbouring slices of the same stack*
  (same direction, offsets ``k ± step``), sliced from the geometry itself, so they are exact planes of the
  volume, also at the ends of the stack (beyond the bounding sphere they read the fill value);
* channel replication (``1 → 3`` for ImageNet encoders; the model's channels read from its first 2D
  convolution, also in TorchScript) and per-channel ``mean``/``std`` (``normalize``: by default the given
  ``mean``/``std``, else timm's ``model.pretrained_cfg``, else none);
* the input size: ``input_size`` becomes the geometry's ``slice_size`` (``δ`` follows), never a resize, and
  ``pixel_spacing`` (the δ the model was trained at, e.g. from an encoder bundle) the default ``δ``;
* batching, device and dtype placement (slices are made on the volume's device and each batch is moved to the
  model's device and cast to its parameters' dtype; scores and CAMs come back to the volume's device),
  ``torch.autocast`` (bf16/fp16) with scores and CAMs accumulated in float32;
* output selection: all outputs, one logit index, several, or a callable on the model's raw output.

An :class:`Encoder` is itself a callable ``(M, C, h, w) → (M, K)``, so it can be passed to
:func:`tonno_fast.tomographic_heatmap` like any other encoder. A model passed to a pipeline as it is (an
``nn.Module``, a TorchScript module, a function) goes through the same path, ``Encoder(model)``
(:func:`as_encoder`): channels, normalisation, dtype, device and eval mode as above.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Mapping
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["Encoder", "as_encoder", "resolve_normalization", "model_in_channels", "error_line", "IMAGENET_MEAN",
           "IMAGENET_STD"]

Output = Union[None, int, Sequence[int], Callable]


def _check_output(output, name: str = "output"):
    """Validate an output selection: ``None``, an int, a tuple of ints or a callable."""
    if output is None or callable(output):
        return output
    if isinstance(output, bool) or isinstance(output, (str, bytes)):
        raise TypeError(f"{name} must be None, an int, a sequence of ints or a callable, got {output!r}")
    if isinstance(output, int):
        return int(output)
    if isinstance(output, torch.Tensor) and output.ndim == 0:
        return int(output)
    try:
        output = tuple(int(i) for i in output)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be None, an int, a sequence of ints or a callable, got {output!r}") from None
    if not output:
        raise ValueError(f"{name} must not be an empty sequence of indices")
    return output


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Normalize = Union[str, None, bool, Tuple[Sequence[float], Sequence[float]]]


def resolve_normalization(model, normalize: Normalize = "auto", mean: Optional[Sequence[float]] = None,
                          std: Optional[Sequence[float]] = None) -> Tuple[Optional[Sequence[float]],
                                                                          Optional[Sequence[float]]]:
    """The per-channel ``(mean, std)`` of a model's input (``None``: none), decided once here.

    ``normalize``:

    * ``"auto"`` (default): ``mean``/``std`` if given, else the model's ``pretrained_cfg["mean"/"std"]`` when it
      has one (timm models do), else none;
    * ``None``, ``False`` or ``"none"``: none, even for a model with a ``pretrained_cfg``;
    * ``"imagenet"``: ImageNet's ``(0.485, 0.456, 0.406)``, ``(0.229, 0.224, 0.225)``;
    * ``(mean, std)``: these.

    Values are applied to model inputs scaled to ``[0, 1]`` by whoever trained the model (e.g. an Encoder
    ``window``). ``mean``/``std`` together with a ``normalize`` other than ``"auto"`` is refused.
    """
    if isinstance(normalize, str) and normalize not in ("auto", "none", "imagenet"):
        raise ValueError(f"normalize must be 'auto', 'none', 'imagenet', None or a pair (mean, std), "
                         f"got {normalize!r}")
    if normalize == "auto":
        if mean is not None or std is not None:
            return mean, std
        cfg = getattr(model, "pretrained_cfg", None)
        if isinstance(cfg, Mapping) and cfg.get("mean") is not None and cfg.get("std") is not None:
            return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
        return None, None
    if mean is not None or std is not None:
        raise ValueError(f"give normalize={normalize!r} or mean/std, not both")
    if normalize is None or normalize is False or normalize == "none":
        return None, None
    if normalize == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if normalize is True or isinstance(normalize, (bytes, torch.Tensor)):
        raise TypeError(f"normalize must be 'auto', 'none', 'imagenet', None or a pair (mean, std), "
                        f"got {normalize!r}")
    try:
        m, sd = normalize
    except (TypeError, ValueError):
        raise TypeError(f"normalize must be 'auto', 'none', 'imagenet', None or a pair (mean, std), "
                        f"got {normalize!r}") from None
    return m, sd


def model_in_channels(model) -> Optional[int]:
    """Input channels of the first 2D convolution of ``model`` (an ``nn.Module`` or a TorchScript module, whose
    submodules keep their ``original_name``), ``None`` for a model without one or a plain callable."""
    if not isinstance(model, nn.Module):
        return None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
        if isinstance(m, torch.jit.ScriptModule) and getattr(m, "original_name", None) == "Conv2d":
            weight = getattr(m, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.ndim == 4:
                return int(weight.shape[1]) * int(getattr(m, "groups", 1))
    return None


_TORCHSCRIPT_PREAMBLE = "The following operation failed in the TorchScript interpreter."
_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception)): (.*)$")


def error_line(exc: BaseException) -> str:
    """What went wrong in ``exc``, on one line: its message's first line, except for an error raised inside
    TorchScript, whose message starts with the interpreter's traceback and ends with the error that caused it
    (``RuntimeError: ... expected input[...] to have 3 channels, but got 1 channels instead``)."""
    lines = [line.rstrip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].strip() == _TORCHSCRIPT_PREAMBLE:
        for i in range(len(lines) - 1, 0, -1):
            m = _ERROR_LINE.match(lines[i])
            if m:
                return " ".join([m.group(2)] + [line.strip() for line in lines[i + 1:]])
        return lines[-1].strip()
    return lines[0].strip()


def _pair(x, name: str) -> Optional[Tuple[int, int]]:
    if x is None:
        return None
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an int or a pair (h, w) of pixels, got {x!r}")
    if isinstance(x, int):
        x = (x, x)
    try:
        h, w = (int(v) for v in x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a pair (h, w) of pixels, got {x!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {(h, w)}")
    return h, w


class Encoder:
    """A 2D classifier plus the input adaptation and batching the slicing pipelines need.

    Args:
        model: an ``nn.Module`` or any callable ``(M, C_in, h, w) → (M,)``/``(M, K)`` (or an object that
            ``output`` turns into scores). An ``nn.Module`` is put in eval mode unless ``eval_mode=False``
            (BatchNorm in train mode would couple the slices of a batch).
        output: which scores to keep: ``None`` (all outputs), a logit index ``i`` (``K = 1``), a sequence of
            indices (``K = len``), or a callable ``raw_output → (M,)`` or ``(M, K)`` (e.g. ``lambda o: o.logits``
            or a softmax probability).
        in_channels: channels the model expects; the slices' channels (volume channels times
            ``2 context + 1``) are repeated to reach it (``1 → 3``). ``"auto"`` reads the first 2D convolution of
            the model, also of a TorchScript module (:func:`model_in_channels`; ``None`` for a plain callable);
            ``None`` passes slices unchanged.
        context: number ``c`` of neighbouring slices on each side given as extra channels, ordered
            ``s - c step Δs, …, s, …, s + c step Δs`` (volume channels innermost).
        context_step: distance between neighbouring context slices, in slices (``Δs`` each).
        window: ``(lo, hi)`` intensity window (e.g. a CT window in HU) mapped to ``[0, 1]`` with clipping,
            applied to the volume (and to the fill value) before slicing.
        zscore: standardise each volume with its own mean and std (after the window).
        mean, std: per-channel normalisation of the model input (after replication), e.g. ImageNet's
            ``(0.485, 0.456, 0.406)``, ``(0.229, 0.224, 0.225)``.
        normalize: where ``mean``/``std`` come from (:func:`resolve_normalization`): ``"auto"`` (default: the
            ``mean``/``std`` given, else timm's ``model.pretrained_cfg`` mean/std when the model has one, else
            none), ``None``/``"none"`` (none), ``"imagenet"``, or a pair ``(mean, std)``.
        input_size: ``int`` or ``(h, w)``: the slice size the model expects; used as the geometry's
            ``slice_size`` so the slicing itself delivers it (pixel spacing ``δ`` follows).
        pixel_spacing: in-plane pixel spacing δ (mm) the model was trained at: the pipelines' default δ
            (a ``pixel_spacing=`` or ``geometry=`` given to a pipeline wins). With ``input_size`` it fixes the
            field of view, as :func:`tonno_fast.load_encoder` sets it from a bundle.
        batch_size: slices per model call (default: the pipeline's ``batch_size``).
        device: where the model runs (default: the device of its first parameter, else the volume's). Each
            batch is cast to the dtype of the model's floating-point parameters (unless ``autocast`` is set).
        autocast: ``None``, ``torch.bfloat16`` or ``torch.float16``: run the model under ``torch.autocast``;
            scores and CAMs are converted to float32 before they are accumulated.
        slice_dtype: dtype in which slices are written (e.g. ``torch.bfloat16`` to halve the slice memory;
            ``None``: the volume's dtype).
        eval_mode: call ``model.eval()`` once here.
    """

    def __init__(self, model, *, output: Output = None, in_channels: Union[str, int, None] = "auto",
                 context: int = 0, context_step: int = 1, window: Optional[Tuple[float, float]] = None,
                 zscore: bool = False, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, normalize: Normalize = "auto", input_size=None,
                 pixel_spacing: Optional[float] = None,
                 batch_size: Optional[int] = None,
                 device=None, autocast: Optional[torch.dtype] = None,
                 slice_dtype: Optional[torch.dtype] = None, eval_mode: bool = True):
        if isinstance(model, Encoder):
            raise TypeError("model is already an Encoder; pass its .model or use it directly")
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
        self.model = model
        if isinstance(model, nn.Module) and eval_mode:
            model.eval()
        self.output = _check_output(output)
        if in_channels == "auto":
            in_channels = model_in_channels(model)
        elif in_channels is not None and (isinstance(in_channels, bool) or not isinstance(in_channels, int)
                                          or in_channels < 1):
            raise ValueError(f"in_channels must be 'auto', None or a positive int, got {in_channels!r}")
        self.in_channels = in_channels
        for name, val in (("context", context), ("context_step", context_step)):
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"{name} must be an int, got {val!r}")
        if context < 0 or context_step < 1:
            raise ValueError(f"context must be ≥ 0 and context_step ≥ 1, got {context} and {context_step}")
        self.context = context
        self.context_step = context_step
        if window is not None:
            try:
                lo, hi = (float(v) for v in window)
            except (TypeError, ValueError):
                raise TypeError(f"window must be a pair (lo, hi), got {window!r}") from None
            if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
                raise ValueError(f"window must be finite with hi > lo, got {(lo, hi)}")
            window = (lo, hi)
        self.window = window
        self.zscore = bool(zscore)
        self._set_normalization(*resolve_normalization(model, normalize, mean, std))
        self.input_size = _pair(input_size, "input_size")
        if pixel_spacing is not None:
            try:
                pixel_spacing = float(pixel_spacing)
            except (TypeError, ValueError):
                raise TypeError(f"pixel_spacing must be a number of mm, got {pixel_spacing!r}") from None
            if not (pixel_spacing > 0 and math.isfinite(pixel_spacing)):
                raise ValueError(f"pixel_spacing must be a positive number of mm, got {pixel_spacing!r}")
        self.pixel_spacing = pixel_spacing
        self.bundle = None  # what tonno_fast.load_encoder read (geometry, normalisation, metadata)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be None or a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self._device = None if device is None else torch.device(device)
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
        self.autocast = autocast
        if slice_dtype not in (None, torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise ValueError(f"slice_dtype must be None or a floating dtype, got {slice_dtype!r}")
        self.slice_dtype = slice_dtype

    def __repr__(self) -> str:
        norm = None if self.mean is None and self.std is None else (
            None if self.mean is None else self.mean.tolist(), None if self.std is None else self.std.tolist())
        return (f"Encoder({type(self.model).__name__}, output={self.output!r}, in_channels={self.in_channels}, "
                f"context={self.context}, window={self.window}, zscore={self.zscore}, mean/std={norm}, "
                f"input_size={self.input_size}, pixel_spacing={self.pixel_spacing}, autocast={self.autocast})")

    def _set_normalization(self, mean, std) -> None:
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        for name, t in (("mean", self.mean), ("std", self.std)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} must be finite, got {t.tolist()}")
        if self.std is not None and not bool((self.std > 0).all()):
            raise ValueError(f"std must be positive, got {self.std.tolist()}")

    def with_normalize(self, normalize: Normalize) -> "Encoder":
        """A copy of this encoder (same model, same adaptation) with its ``mean``/``std`` replaced as
        ``normalize`` says (see :func:`resolve_normalization`; ``"auto"`` reads the model's ``pretrained_cfg``)."""
        new = copy.copy(self)
        new._set_normalization(*resolve_normalization(self.model, normalize))
        return new

    def with_output(self, output: Output, name: str = "output") -> "Encoder":
        """A copy of this encoder (same model, same adaptation) selecting ``output`` instead."""
        new = copy.copy(self)
        new.output = _check_output(output, name)
        return new

    # -- placement -------------------------------------------------------------------------------------------
    def device(self, default: torch.device) -> torch.device:
        """Where the model runs: ``device`` if given, else its first parameter's device, else ``default``."""
        if self._device is not None:
            return self._device
        if isinstance(self.model, nn.Module):
            p = next(self.model.parameters(), None)
            if p is not None:
                return p.device
        return torch.device(default)

    def dtype(self) -> Optional[torch.dtype]:
        """The dtype of the model's first floating-point parameter (batches are cast to it unless ``autocast``
        is set), ``None`` for a model without parameters or a plain callable."""
        if isinstance(self.model, nn.Module):
            p = next((p for p in self.model.parameters() if p.is_floating_point()), None)
            if p is not None:
                return p.dtype
        return None

    def autocast_context(self, device: torch.device):
        """``torch.autocast`` for the model's device when ``autocast`` is set, else a no-op context."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.autocast)

    # -- volume-level adaptation -----------------------------------------------------------------------------
    @property
    def halo(self) -> int:
        """Extra slices needed on each side of a slice range for the context channels."""
        return self.context * self.context_step

    def prepare_volume(self, volume: torch.Tensor, fill: float):
        """Window ``volume`` ``(B, C, D, H, W)`` and compute its z-score statistics.

        Returns ``(volume, fill, stats)``: the windowed volume (a new tensor when windowed), the fill value
        mapped through the same window, and ``stats`` = ``None`` or ``(mean, std)`` of shape ``(B,)``.
        """
        try:
            fill = float(fill)
        except (TypeError, ValueError):
            raise TypeError(f"fill must be a number, got {type(fill).__name__}") from None
        if not math.isfinite(fill):
            raise ValueError(f"fill must be finite, got {fill}")
        if self.window is not None:
            lo, hi = self.window
            volume = ((volume - lo) / (hi - lo)).clamp_(0.0, 1.0)
            fill = min(1.0, max(0.0, (fill - lo) / (hi - lo)))
        stats = None
        if self.zscore:
            flat = volume.reshape(volume.shape[0], -1)
            mean = flat.mean(dim=1)
            std = flat.std(dim=1)
            # A constant volume has std 0: keep it finite (all zeros after centring) instead of NaN.
            std = torch.where(std > 0, std, torch.ones_like(std))
            stats = (mean, std)
        return volume, fill, stats

    def assemble(self, raw: torch.Tensor, stats) -> torch.Tensor:
        """Slices ``(B, n, L + 2 halo, C, h, w)`` → model-channel slices ``(B, n, L, C (2c+1), h, w)``.

        Applies the z-score (``stats`` from :meth:`prepare_volume`) and stacks the context neighbours.
        """
        x = raw
        if stats is not None:
            mean, std = stats
            shape = (-1,) + (1,) * (raw.ndim - 1)
            x = ((x - mean.to(x).reshape(shape)) / std.to(x).reshape(shape)).to(raw.dtype)
        if self.context == 0:
            return x
        h, L = self.halo, raw.shape[2] - 2 * self.halo
        parts = [x[:, :, h + j * self.context_step:h + j * self.context_step + L]
                 for j in range(-self.context, self.context + 1)]
        return torch.cat(parts, dim=3)

    def model_input(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Batch ``(M, c, h, w)`` → the model's input on ``device``: channels repeated to ``in_channels``,
        per-channel ``mean``/``std`` applied, cast to the model's dtype (:meth:`dtype`) unless ``autocast``."""
        x = x.to(device, non_blocking=True)
        c = x.shape[1]
        if self.in_channels is not None and c != self.in_channels:
            if self.in_channels % c:
                raise ValueError(f"the model expects in_channels={self.in_channels} but slices have {c} channels "
                                 f"(volume channels × (2·context+1)); {self.in_channels} is not a multiple of {c}")
            x = x.repeat(1, self.in_channels // c, 1, 1)
        if self.mean is not None or self.std is not None:
            C = x.shape[1]
            for name, t in (("mean", self.mean), ("std", self.std)):
                if t is not None and t.numel() not in (1, C):
                    raise ValueError(f"{name} has {t.numel()} entries but the model input has {C} channels")
            if self.mean is not None:
                x = x - self.mean.to(device=device, dtype=x.dtype).reshape(1, -1, 1, 1)
            if self.std is not None:
                x = x / self.std.to(device=device, dtype=x.dtype).reshape(1, -1, 1, 1)
        dtype = self.dtype() if self.autocast is None else None
        if dtype is not None and x.dtype != dtype:
            x = x.to(dtype)
        return x

    # -- outputs -----------------------------------------------------------------------------------------------
    def select(self, raw_output, n_samples: int) -> torch.Tensor:
        """The model's raw output → scores ``(M, K)`` (differentiable; dtype as produced)."""
        out = self.output(raw_output) if callable(self.output) else raw_output
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"encoder must return a torch.Tensor of scores (or use output=callable to extract "
                            f"them), got {type(out).__name__}")
        if out.ndim == 1 and out.shape[0] == n_samples:
            out = out[:, None]
        if out.ndim != 2 or out.shape[0] != n_samples or out.shape[1] < 1:
            raise ValueError(f"encoder must return scores of shape (M,) or (M, K) with K >= 1 for M = {n_samples} "
                             f"slices, got {tuple(out.shape)}")
        if not out.is_floating_point():
            raise TypeError(f"encoder must return floating-point scores, got dtype {out.dtype}")
        if out.device.type == "meta":  # shapes only: there are no values to move to the volume's device
            raise TypeError("encoder returned a tensor on the meta device (no values); it must return real scores")
        if isinstance(self.output, int):
            if not -out.shape[1] <= self.output < out.shape[1]:
                raise IndexError(f"output={self.output} is out of range for a model with {out.shape[1]} outputs")
            out = out[:, self.output:self.output + 1]
        elif isinstance(self.output, tuple):
            bad = [i for i in self.output if not -out.shape[1] <= i < out.shape[1]]
            if bad:
                raise IndexError(f"output indices {bad} are out of range for a model with {out.shape[1]} outputs")
            out = out[:, list(self.output)]
        return out

    def run_model(self, x: torch.Tensor):
        """Call the model on a prepared batch, turning its exceptions into one clear error."""
        try:
            return self.model(x)
        except Exception as exc:
            raise RuntimeError(f"encoder raised {type(exc).__name__} on a batch of slices of shape "
                               f"{tuple(x.shape)}: {error_line(exc)}") from exc

    def scores(self, batch: torch.Tensor) -> torch.Tensor:
        """Scores ``(M, K)`` float32 (float64 for a float64 batch) of slices ``(M, c, h, w)``, on the
        batch's device. Runs under ``torch.no_grad()`` (and autocast when set)."""
        device = self.device(batch.device)
        acc_dtype = torch.float64 if batch.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            x = self.model_input(batch, device)
            with self.autocast_context(device):
                out = self.select(self.run_model(x), x.shape[0])
            out = out.to(device=batch.device, dtype=acc_dtype)
        if not bool(torch.isfinite(out).all()):
            raise ValueError("encoder returned NaN or inf scores")
        return out

    __call__ = scores


def as_encoder(encoder, *, batch_size: Optional[int] = None) -> Encoder:
    """``encoder`` itself when it is an :class:`Encoder`, else ``Encoder(encoder)`` with its defaults, so that a
    model passed as it is behaves as the same model wrapped: an ``nn.Module`` (TorchScript too) is put in eval
    mode, gets its channels replicated to its first convolution's, timm's ``pretrained_cfg`` normalisation when
    it has one, batches in its parameters' dtype on its device; a plain function sees the slices as sliced."""
    if isinstance(encoder, Encoder):
        return encoder
    if not callable(encoder):
        raise TypeError(f"encoder must be an Encoder, an nn.Module or a callable, got {type(encoder).__name__}")
    return Encoder(encoder, batch_size=batch_size)
