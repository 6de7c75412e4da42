"""File input and output (NIfTI)."""
from .nifti import load_nifti, save_nifti, NiftiVolume, is_nibabel_image, spacing_from_affine

__all__ = ["load_nifti", "save_nifti", "NiftiVolume", "is_nibabel_image", "spacing_from_affine"]
