"""Class activation maps on slices and their 3D reconstructions (docs/design.md, "The method").

* :mod:`.methods`: native GradCAM / LayerCAM in torch (hooks on ``target_layers``, batched, any device).
* :mod:`.adapter`: any ``pytorch_grad_cam`` CAM object as a slice CAM method.
* :mod:`.pipelines`: :func:`averaged_cam`, :func:`tomographic_cam` and the 2D baseline :func:`slicewise_cam`.
"""
from .adapter import PytorchGradCAM
from .methods import CAMMethod, GradCAM, LayerCAM, gradcam, layercam, vit_reshape_transform
from .pipelines import averaged_cam, resolve_method, slicewise_cam, tomographic_cam

__all__ = ["averaged_cam", "tomographic_cam", "slicewise_cam", "gradcam", "layercam", "GradCAM", "LayerCAM",
           "CAMMethod", "PytorchGradCAM", "vit_reshape_transform", "resolve_method"]
