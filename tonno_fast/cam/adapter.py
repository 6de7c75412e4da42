"""Use any ``pytorch_grad_cam`` CAM object (ScoreCAM, EigenCAM, GradCAM++, …) as a slice CAM method.

``pytorch_grad_cam`` returns each image's CAM min-max normalised to ``[0, 1]`` (``scale_cam_image``) as a
NumPy array; that per-slice normalisation cannot be undone, so adapted methods give relative maps per
slice, unlike the native :mod:`tonno_fast.cam.methods` which keep raw values. The package is optional:
it is imported only when an adapter is built.
"""
from __future__ import annotations

from typing import Optional

import torch

from .methods import CAMMethod

__all__ = ["PytorchGradCAM", "is_pytorch_grad_cam"]


def is_pytorch_grad_cam(obj) -> bool:
    """Whether ``obj`` is a ``pytorch_grad_cam`` CAM object (without importing the package if absent)."""
    try:
        from pytorch_grad_cam.base_cam import BaseCAM
    except ImportError:
        return False
    return isinstance(obj, BaseCAM)


class _SelectedOutput:
    """A ``pytorch_grad_cam`` target (a callable on one sample's output) for column ``k`` of
    ``encoder.select`` — the same scores the native methods differentiate."""

    def __init__(self, encoder, k: int):
        self.encoder, self.k = encoder, k

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return self.encoder.select(model_output[None], 1)[0, self.k]


class PytorchGradCAM(CAMMethod):
    """Adapter: ``PytorchGradCAM(ScoreCAM(model, target_layers=[model.layer4]))``.

    The CAM object must be built on the encoder's model. The targets are the encoder's selected outputs
    (``Encoder(output=...)``), one call of the CAM object per selected output.
    """

    name = "pytorch_grad_cam"

    def __init__(self, cam, *, aug_smooth: bool = False, eigen_smooth: bool = False):
        if not is_pytorch_grad_cam(cam):
            raise TypeError(f"cam must be a pytorch_grad_cam CAM object (e.g. pytorch_grad_cam.ScoreCAM), "
                            f"got {type(cam).__name__}")
        self.cam = cam
        self.aug_smooth = aug_smooth
        self.eigen_smooth = eigen_smooth

    def __call__(self, encoder, x: torch.Tensor, n_outputs: Optional[int] = None) -> torch.Tensor:
        if self.cam.model is not encoder.model:
            raise ValueError("the pytorch_grad_cam object was built on a different model than the encoder's")
        device = encoder.device(x.device)
        xin = encoder.model_input(x, device)
        if n_outputs is None:
            with torch.no_grad(), encoder.autocast_context(device):
                n_outputs = encoder.select(encoder.run_model(xin[:1]), 1).shape[1]
        maps = []
        for k in range(n_outputs):
            targets = [_SelectedOutput(encoder, k)] * xin.shape[0]
            with encoder.autocast_context(device):
                cam = self.cam(input_tensor=xin, targets=targets, aug_smooth=self.aug_smooth,
                               eigen_smooth=self.eigen_smooth)
            maps.append(torch.as_tensor(cam, dtype=torch.float32))
        return torch.stack(maps, dim=1).to(x.device)
