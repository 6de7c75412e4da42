"""tonno_fast: fast, exact ToNNO (tomographic reconstruction of a neural network's output).

Turn a 2D image encoder into a 3D heatmap: slice the volume at many orientations, score each slice, and
invert the 3D Radon transform of the scores. docs/design.md has the maths and conventions:
volumes are ``(B, C, D, H, W)`` with axes z, y, x and spacing in mm.
"""
from .filters import apply_filter
from .geometry import Geometry, fibonacci_directions, make_geometry, parse_directions
from .io import load_nifti, save_nifti
from .ops import (BackendUnavailable, affine_grid_sample, backends, backproject, backproject_slices,
                  filtered_backprojection, radon, slice_volume)
from .pipeline import encode_slices, tomographic_heatmap
from .encoder import Encoder
from .cam import averaged_cam, slicewise_cam, tomographic_cam

__version__ = "0.1.0"

__all__ = [
    "Encoder", "averaged_cam", "tomographic_cam", "slicewise_cam",
    "tomographic_heatmap", "encode_slices",
    "slice_volume", "radon", "backproject", "backproject_slices", "affine_grid_sample",
    "filtered_backprojection", "apply_filter",
    "Geometry", "make_geometry", "fibonacci_directions", "parse_directions",
    "load_nifti", "save_nifti", "backends", "BackendUnavailable",
]

# Weak supervision and evaluation: training slices, a BCE helper, Dice/IoU and thresholds.
from .sampler import ObliqueSliceSampler, SliceBatch, sample_directions
from .training import evaluate_encoder, train_encoder
from .evaluation import dice, evaluate_heatmap, evaluate_heatmaps, iou, threshold_sweep

__all__ += ["ObliqueSliceSampler", "SliceBatch", "sample_directions", "train_encoder", "evaluate_encoder",
            "dice", "iou", "threshold_sweep", "evaluate_heatmap", "evaluate_heatmaps"]

# Iterative few-view reconstruction and score calibration.
from .reconstruction import calibrate_scores, reconstruct

__all__ += ["reconstruct", "calibrate_scores"]
