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

# Weak supervision and evaluation: training slices and bags, per-slice and multiple-instance training, encoder
# bundles that carry their slice geometry, Dice/IoU/ROC AUC and thresholds.
from .sampler import BagBatch, ObliqueSliceSampler, SliceBatch, sample_directions
from .training import TrainingHistory, evaluate_encoder, pool_bags, train_encoder
from .bundle import load_encoder, save_encoder
from .evaluation import dice, evaluate_heatmap, evaluate_heatmaps, iou, roc_auc, threshold_sweep

__all__ += ["ObliqueSliceSampler", "SliceBatch", "BagBatch", "sample_directions", "train_encoder",
            "evaluate_encoder", "pool_bags", "TrainingHistory", "save_encoder", "load_encoder",
            "dice", "iou", "roc_auc", "threshold_sweep", "evaluate_heatmap", "evaluate_heatmaps"]

# Iterative few-view reconstruction and score calibration.
from .reconstruction import calibrate_scores, reconstruct

__all__ += ["reconstruct", "calibrate_scores"]

# Cohorts (folders, globs, lists of scans; never over an input; resumable) and several processes (torchrun).
from .cohort import CohortReport, heatmap_file, heatmap_files
from .memory import MemoryBudgetError

__all__ += ["heatmap_files", "heatmap_file", "CohortReport", "MemoryBudgetError"]

# Process-wide C allocator settings for CPU runs (never applied by the library's functions).
from .allocator import retain_freed_memory

__all__ += ["retain_freed_memory"]
