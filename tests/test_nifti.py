"""NIfTI in and out: axis order (z, y, x), spacing, the source affine kept, float32 output."""
import nibabel as nib
import numpy as np
import pytest
import torch

import tonno_fast as tf


def test_round_trip_keeps_affine_axes_and_values(tmp_path):
    data = np.random.default_rng(0).normal(size=(11, 9, 7)).astype(np.float32)  # file axes i, j, k
    affine = np.array([[0.8, 0, 0, -10], [0, 0.9, 0, 5], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    src = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(src))
    vol = tf.load_nifti(src)
    assert vol.data.shape == (7, 9, 11)  # (D, H, W) = (k, j, i)
    assert vol.spacing == pytest.approx((2.5, 0.9, 0.8))
    torch.testing.assert_close(vol.data, torch.from_numpy(data.transpose(2, 1, 0).copy()))
    out = tmp_path / "heat.nii.gz"
    tf.save_nifti(out, vol.data * 2, vol.affine)
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.float32
    np.testing.assert_allclose(back.affine, affine)
    np.testing.assert_allclose(np.asarray(back.dataobj), data * 2)


def test_int16_with_scaling_is_float(tmp_path):
    data = (np.arange(60).reshape(3, 4, 5) - 30).astype(np.int16)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.5, -1000)
    p = tmp_path / "ct.nii"
    nib.save(img, str(p))
    vol = tf.load_nifti(p)
    assert vol.data.dtype == torch.float32
    np.testing.assert_allclose(vol.data.numpy(), data.transpose(2, 1, 0) * 0.5 - 1000)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        tf.load_nifti(tmp_path / "missing.nii.gz")
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a NIfTI"):
        tf.load_nifti(bad)
    p = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)), str(p))
    with pytest.raises(ValueError, match="3D"):
        tf.load_nifti(p)
    with pytest.raises(ValueError, match="nii"):
        tf.save_nifti(tmp_path / "x.png", torch.zeros(2, 2, 2), np.eye(4))
