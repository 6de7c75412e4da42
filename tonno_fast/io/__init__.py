"""File input and output (NIfTI)."""
from .nifti import load_nifti, save_nifti, NiftiVolume

__all__ = ["load_nifti", "save_nifti", "NiftiVolume"]
