"""Encoder bundles: a trained 2D encoder saved together with the slice geometry it was trained on.

A slice encoder only means something at the geometry it was trained with: the same field of view
(``slice_size`` pixels at ``pixel_spacing`` mm), the same channels and the same intensity normalisation. A
64-pixel slice at 3 mm and a 64-pixel slice spanning a 360 mm bounding sphere (5.7 mm pixels) are different
images to the network. :func:`save_encoder` writes one file with

* the model: its ``state_dict`` plus the factory that rebuilds it (``"package.module:callable"`` and keyword
  arguments; needed for the CAM methods, which hook named layers), or TorchScript (needs no code to load);
* the slice geometry: ``slice_size`` ``(h, w)`` pixels, ``pixel_spacing`` mm, input ``channels``;
* the intensity normalisation: ``window``, ``zscore``, ``mean``, ``std`` (as :class:`~tonno_fast.Encoder`
  applies them);
* free-form ``metadata`` (e.g. the training objective, steps, validation AUC).

:func:`load_encoder` gives back a :class:`~tonno_fast.Encoder` that carries all of it: the pipelines
(:func:`~tonno_fast.tomographic_heatmap`, the CAM functions) and ``tonno-fast heatmap --encoder bundle.pt``
then slice at the training geometry unless told otherwise (``pixel_spacing=``, ``geometry=``). The file is a
``torch.save`` dictionary of plain Python values and tensors, read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import importlib
import io
import math
import os
import warnings
import zipfile
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .encoder import Encoder, resolve_normalization

__all__ = ["save_encoder", "load_encoder", "is_encoder_bundle", "resolve_factory", "BUNDLE_FORMAT"]

BUNDLE_FORMAT = "tonno_fast.encoder_bundle"
_VERSION = 1


def _factory_path(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_factory(spec: str):
    """The callable named by ``"package.module:callable"`` (``callable`` may be dotted, e.g. ``Class.build``).
    Raises ``ValueError`` saying what is wrong with ``spec``."""
    module_name, _, attr = str(spec).partition(":")
    if not module_name or not attr:
        raise ValueError(f"factory must be 'package.module:callable', got {spec!r}")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"factory {spec!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"factory {spec!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(obj):
        raise ValueError(f"factory {spec!r} is not callable")
    return obj


def save_encoder(path, encoder, *, slice_size=None, pixel_spacing: Optional[float] = None,
                 channels: Optional[int] = None, window: Optional[Tuple[float, float]] = None,
                 zscore: Optional[bool] = None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, factory: Optional[str] = None,
                 factory_kwargs: Optional[Dict[str, Any]] = None, torchscript: bool = False,
                 metadata: Optional[Dict[str, Any]] = None) -> str:
    """Write ``encoder`` and the slice geometry it was trained on to ``path`` (one file).

    Args:
        path: output file (conventionally ``.pt``); written to a temporary file and renamed.
        encoder: an ``nn.Module``, or a :class:`~tonno_fast.Encoder` whose ``input_size``, ``pixel_spacing``,
            ``in_channels``, ``window``, ``zscore``, ``mean``, ``std`` are the defaults of the arguments below.
        slice_size: ``int`` or ``(h, w)`` pixels of the training slices (required, here or in the Encoder).
        pixel_spacing: in-plane pixel spacing δ (mm) of the training slices (required, here or in the Encoder).
        channels: input channels of the model (default: its first ``Conv2d``'s, else 1).
        window, zscore, mean, std: the intensity normalisation the model expects (see :class:`Encoder`);
            ``None`` = none. Slices given to :class:`~tonno_fast.ObliqueSliceSampler` are raw voxel values,
            so leave these unset for an encoder trained with it on raw volumes.
        factory, factory_kwargs: how to rebuild the module for a ``state_dict`` bundle: ``"package.module:
            callable"`` (default: the module's class) called with ``factory_kwargs`` (plain values; default:
            ``model.factory_kwargs()`` when the module has that method and ``factory`` is not given, as the demo's
            ``SliceCNN`` does, else none). It must be importable where the bundle is loaded.
        torchscript: store TorchScript (``torch.jit.script``, or the module itself when already scripted)
            instead of a ``state_dict``: loads without the model's code, but the CAM methods cannot use it.
        metadata: JSON-like dictionary stored as is (e.g. training objective, steps, validation AUC).

    Returns:
        The path written, as a string.
    """
    enc = encoder if isinstance(encoder, Encoder) else None
    model = enc.model if enc is not None else encoder
    if not isinstance(model, nn.Module):
        raise TypeError(f"encoder must be an nn.Module or an Encoder wrapping one, got {type(model).__name__}")
    if slice_size is None and enc is not None:
        slice_size = enc.input_size
    if slice_size is None:
        raise ValueError("slice_size is required: the (h, w) pixels the encoder was trained on")
    size = (int(slice_size), int(slice_size)) if isinstance(slice_size, int) else tuple(int(s) for s in slice_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"slice_size must be a positive int or a pair (h, w), got {slice_size!r}")
    if pixel_spacing is None and enc is not None:
        pixel_spacing = enc.pixel_spacing
    if pixel_spacing is None:
        raise ValueError("pixel_spacing is required: the in-plane pixel spacing (mm) the encoder was trained on")
    pixel_spacing = float(pixel_spacing)
    if not (pixel_spacing > 0 and math.isfinite(pixel_spacing)):
        raise ValueError(f"pixel_spacing must be a positive number of mm, got {pixel_spacing!r}")
    if channels is None:
        channels = enc.in_channels if enc is not None and enc.in_channels is not None else None
    if channels is None:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        channels = 1 if conv is None else int(conv.in_channels)
    # A bare module's normalisation is what Encoder(module) would apply (timm's pretrained_cfg when it has one).
    own_mean, own_std = (enc.mean, enc.std) if enc is not None else resolve_normalization(model)
    norm = {"window": window if window is not None else (enc.window if enc is not None else None),
            "zscore": bool(zscore) if zscore is not None else (enc.zscore if enc is not None else False),
            "mean": mean if mean is not None else own_mean,
            "std": std if std is not None else own_std}
    for key in ("mean", "std"):
        if norm[key] is not None:
            norm[key] = [float(v) for v in torch.as_tensor(norm[key]).reshape(-1).tolist()]
    if norm["window"] is not None:
        norm["window"] = [float(v) for v in norm["window"]]
    Encoder(nn.Identity(), window=norm["window"], zscore=norm["zscore"], mean=norm["mean"], std=norm["std"],
            in_channels=None)  # validates the normalisation with Encoder's own checks
    if torchscript:
        buf = io.BytesIO()
        with warnings.catch_warnings():  # torch >= 2.9 flags TorchScript as deprecated; it still loads
            warnings.simplefilter("ignore", FutureWarning)
            scripted = model if isinstance(model, torch.jit.ScriptModule) else torch.jit.script(model)
            torch.jit.save(scripted, buf)
        stored = {"kind": "torchscript", "torchscript": buf.getvalue()}
    else:
        if isinstance(model, torch.jit.ScriptModule):
            raise ValueError("a TorchScript module can only be saved with torchscript=True")
        spec = factory or _factory_path(model)
        if factory_kwargs is None and factory is None and callable(getattr(model, "factory_kwargs", None)):
            factory_kwargs = model.factory_kwargs()  # a module that knows its own constructor arguments
        kwargs = dict(factory_kwargs or {})
        resolve_factory(spec)  # fail now, not when the bundle is loaded elsewhere
        stored = {"kind": "state_dict", "factory": spec, "factory_kwargs": kwargs,
                  "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    bundle = {"format": BUNDLE_FORMAT, "version": _VERSION, "model": stored,
              "geometry": {"slice_size": list(size), "pixel_spacing": pixel_spacing, "channels": int(channels)},
              "normalization": norm, "metadata": dict(metadata or {})}
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(bundle, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _read(path) -> Dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such encoder bundle: {path}")
    try:
        with zipfile.ZipFile(path) as z:  # torch.load would hand a TorchScript archive to torch.jit.load
            if any(name.endswith("/constants.pkl") for name in z.namelist()):
                raise ValueError(f"{path} is a TorchScript file, not an encoder bundle")
    except zipfile.BadZipFile:
        pass  # not a zip: let torch.load say what it is
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not an encoder bundle (torch.load failed: {type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path} is not an encoder bundle (no {BUNDLE_FORMAT!r} marker; write one with "
                         f"tonno_fast.save_encoder)")
    if int(data.get("version", 0)) > _VERSION:
        raise ValueError(f"{path} is an encoder bundle of version {data['version']}; this tonno_fast reads "
                         f"up to version {_VERSION}")
    return data


def is_encoder_bundle(path) -> bool:
    """Whether ``path`` is a file written by :func:`save_encoder`."""
    try:
        _read(path)
    except (OSError, ValueError):
        return False
    return True


def load_encoder(path, *, device: Union[str, torch.device, None] = None, **encoder_kwargs) -> Encoder:
    """Read a bundle written by :func:`save_encoder` into an :class:`~tonno_fast.Encoder`.

    The Encoder's ``input_size`` and ``pixel_spacing`` are the training slice geometry, its ``in_channels``
    the model's channels, and ``window``/``zscore``/``mean``/``std`` the stored normalisation, so the
    pipelines slice as in training. ``device``: where the model goes (default CPU). ``encoder_kwargs`` are
    passed on to :class:`Encoder` and override the stored values (e.g. ``batch_size``, ``autocast``,
    ``pixel_spacing``; ``normalize``, ``mean`` or ``std`` replace the stored ``mean``/``std``). The bundle's contents are in ``encoder.bundle`` (``geometry``, ``normalization``,
    ``metadata``).
    """
    data = _read(path)
    stored = data["model"]
    if stored.get("kind") == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(io.BytesIO(stored["torchscript"]), map_location="cpu")
    elif stored.get("kind") == "state_dict":
        factory = resolve_factory(stored["factory"])
        model = factory(**stored.get("factory_kwargs", {}))
        if not isinstance(model, nn.Module):
            raise ValueError(f"{path}: factory {stored['factory']!r} returned {type(model).__name__}, "
                             f"not an nn.Module")
        try:
            model.load_state_dict(stored["state_dict"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ValueError(f"{path}: the stored weights do not fit {stored['factory']}"
                             f"(**{stored.get('factory_kwargs', {})}): {first}") from None
    else:
        raise ValueError(f"{path}: unknown model kind {stored.get('kind')!r}")
    model.eval()
    if device is not None:
        model = model.to(device)
    geo, norm = data["geometry"], data["normalization"]
    kwargs = dict(input_size=tuple(geo["slice_size"]), pixel_spacing=geo["pixel_spacing"],
                  in_channels=geo["channels"], window=norm.get("window"), zscore=norm.get("zscore", False))
    if not {"normalize", "mean", "std"} & set(encoder_kwargs):
        # The stored normalisation, also when it is none (a model's pretrained_cfg does not replace it).
        stored_norm = (norm.get("mean"), norm.get("std"))
        kwargs["normalize"] = None if stored_norm == (None, None) else stored_norm
    kwargs.update(encoder_kwargs)
    enc = Encoder(model, **kwargs)
    enc.bundle = {"path": os.fspath(path), "geometry": dict(geo), "normalization": dict(norm),
                  "metadata": dict(data.get("metadata", {}))}
    return enc
