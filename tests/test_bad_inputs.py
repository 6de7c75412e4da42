"""Catalogue of bad inputs: every case gets one specific exception type and a message that names the
argument and says what was expected. Nothing here may crash the interpreter or return garbage.

Sections: the pipeline (``tomographic_heatmap``, encoders), ``make_geometry`` and NIfTI files. The operators'
bad inputs (``tonno_fast.ops``, direct calls of both op namespaces, sizes whose index arithmetic would overflow
32 bits) are catalogued with each op, in ``tests/ops/test_<op>.py``.

Policy decided here and documented in ``tonno_fast/validation.py``: bool volumes are refused (``TypeError``),
integer volumes are converted to float32, non-finite volumes are refused unless ``allow_nonfinite=True``,
non-unit direction vectors are normalised, empty tensors are refused by every operator.
"""
import gzip

import numpy as np
import pytest
import torch

import tonno_fast
from tonno_fast.geometry import make_geometry

SHAPE = (5, 6, 7)
VOL = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))


def sum_encoder(x):
    """``(M, C, h, w)`` → ``(M,)``: the ideal encoder of the master identity."""
    return x.sum(dim=(1, 2, 3))


def heat(volume=VOL, encoder=sum_encoder, **kw):
    kw.setdefault("n_directions", 2)
    kw.setdefault("slice_size", 5)
    kw.setdefault("n_slices", 5)
    return tonno_fast.tomographic_heatmap(volume, encoder, **kw)


def _raise(exc):
    raise exc


class _KChanging:
    """An encoder whose number of outputs K changes between calls (1, then 2)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return x.sum(dim=(1, 2, 3))[:, None].expand(-1, self.calls)



# (id, callable, exception type, regex that must match the message). The regex names the argument.
PUBLIC_CASES = [
    # --- volume -----------------------------------------------------------------------------------------
    ("volume_rank_2", lambda: heat(torch.rand(5, 6)), ValueError, r"volume must have 3 .*got 2"),
    ("volume_rank_6", lambda: heat(torch.rand(1, 1, 1, 5, 6, 7)), ValueError, r"volume must have 3 .*got 6"),
    ("volume_zero_axis", lambda: heat(torch.rand(0, 6, 7)), ValueError, r"volume must not be empty"),
    ("volume_zero_channels", lambda: heat(torch.rand(1, 0, 5, 6, 7)), ValueError, r"volume must not be empty"),
    ("volume_nan", lambda: heat(VOL.masked_fill(VOL > 0.9, float("nan"))), ValueError,
     r"volume contains \d+ NaN or inf.*allow_nonfinite=True"),
    ("volume_inf", lambda: heat(VOL.masked_fill(VOL > 0.9, float("inf"))), ValueError,
     r"volume contains \d+ NaN or inf"),
    ("volume_nan_numpy", lambda: heat(np.full(SHAPE, np.nan)), ValueError, r"volume contains 210 NaN"),
    ("volume_bool", lambda: heat(VOL > 0.5), TypeError, r"volume must be a real-valued tensor, got dtype torch.bool"),
    ("volume_complex", lambda: heat(VOL.to(torch.complex64)), TypeError, r"volume must be real-valued"),
    ("volume_list", lambda: heat(VOL.tolist()), TypeError, r"volume must be a torch.Tensor or numpy array"),
    ("allow_nonfinite_not_bool", lambda: heat(allow_nonfinite="yes"), TypeError, r"allow_nonfinite must be a bool"),
    ("nonfinite_allowed_but_scores_nan", lambda: heat(VOL.masked_fill(VOL > 0.9, float("nan")),
                                                      allow_nonfinite=True),
     ValueError, r"encoder returned NaN or inf scores"),
    # --- directions and weights ------------------------------------------------------------------------
    ("directions_zero", lambda: heat(directions=[[0, 0, 0], [0, 0, 1]]), ValueError,
     r"directions must be non-zero vectors; direction 0"),
    ("directions_nan", lambda: heat(directions=[[float("nan"), 0, 1]]), ValueError, r"directions must be finite"),
    ("directions_inf", lambda: heat(directions=[[float("inf"), 0, 1]]), ValueError, r"directions must be finite"),
    ("directions_denormal", lambda: heat(directions=[[1e-300, 0, 1e-300]]), ValueError,
     r"directions must be non-zero"),
    ("directions_shape", lambda: heat(directions=[[0, 0, 1, 0]]), ValueError, r"directions must have shape \(N, 3\)"),
    ("directions_empty", lambda: heat(directions=np.zeros((0, 3))), ValueError, r"directions must have shape"),
    ("directions_strings", lambda: heat(directions=[["a", "b", "c"]]), TypeError, r"directions must be an array"),
    ("directions_not_rotation", lambda: heat(directions=torch.ones(1, 3, 3)), ValueError,
     r"directions given as \(N, 3, 3\) matrices must be rotation matrices"),
    ("directions_reflection", lambda: heat(directions=-torch.eye(3)[None]), ValueError, r"det \+1"),
    ("weights_count", lambda: heat(n_directions=4, weights=[1.0, 2.0, 3.0]), ValueError,
     r"weights must have one entry per direction: got 3 weights for 4 directions"),
    ("weights_nan", lambda: heat(weights=[1.0, float("nan")]), ValueError, r"weights must be finite"),
    # --- spacing and counts ----------------------------------------------------------------------------
    ("spacing_negative", lambda: heat(spacing=(-1, 1, 1)), ValueError, r"spacing must be positive and finite"),
    ("spacing_zero", lambda: heat(spacing=0), ValueError, r"spacing must be positive and finite"),
    ("spacing_nan", lambda: heat(spacing=float("nan")), ValueError, r"spacing must be positive and finite"),
    ("spacing_two_entries", lambda: heat(spacing=(1, 1)), ValueError, r"spacing must have 3 entries"),
    ("spacing_string", lambda: heat(spacing="1"), TypeError, r"spacing must be a number or a sequence"),
    ("n_directions_zero", lambda: heat(n_directions=0), ValueError, r"n_directions must be a positive integer"),
    ("n_directions_negative", lambda: heat(n_directions=-1), ValueError, r"n_directions must be a positive integer"),
    ("n_directions_float", lambda: heat(n_directions=2.5), ValueError, r"n_directions must be a positive integer"),
    ("n_slices_zero", lambda: heat(n_slices=0), ValueError, r"n_slices must be a positive integer"),
    ("n_slices_negative", lambda: heat(n_slices=-3), ValueError, r"n_slices must be a positive integer"),
    ("slice_size_zero", lambda: heat(slice_size=0), ValueError, r"slice_size must be a positive integer"),
    ("slice_size_pair_zero", lambda: heat(slice_size=(3, 0)), ValueError, r"slice_size\[1\] must be a positive"),
    ("slice_size_pair_float", lambda: heat(slice_size=(3, 2.5)), ValueError, r"slice_size\[1\] must be a positive"),
    ("slice_size_triple", lambda: heat(slice_size=(3, 4, 5)), ValueError, r"slice_size must be an int or a pair"),
    ("pixel_spacing_zero", lambda: heat(pixel_spacing=0), ValueError, r"pixel_spacing must be positive"),
    ("slice_spacing_negative", lambda: heat(slice_spacing=-1), ValueError, r"slice_spacing must be positive"),
    ("batch_size_zero", lambda: heat(batch_size=0), ValueError, r"batch_size must be a positive integer"),
    ("batch_size_float", lambda: heat(batch_size=2.0), ValueError, r"batch_size must be a positive integer"),
    ("filter_unknown", lambda: heat(filter="shepp"), ValueError, r"filter must be one of"),
    ("window_unknown", lambda: heat(window="blackman"), ValueError, r"window must be None or one of"),
    ("window_on_laplacian", lambda: heat(filter="laplacian", window="hann"), ValueError,
     r"window='hann' applies to the FFT filters"),
    ("backend_unknown", lambda: heat(backend="opencl"), ValueError, r"backend must be one of"),
    ("backend_cuda_for_cpu_tensors", lambda: heat(backend="cuda"), tonno_fast.BackendUnavailable,
     r"backend='cuda' needs CUDA tensors"),
    ("fill_nan", lambda: heat(fill=float("nan")), ValueError, r"fill must be finite"),
    ("fill_string", lambda: heat(fill="0"), TypeError, r"fill must be a real number"),
    # --- encoders -------------------------------------------------------------------------------------
    ("encoder_not_callable", lambda: heat(encoder=3), TypeError, r"encoder must be callable"),
    ("encoder_raises", lambda: heat(encoder=lambda x: _raise(ZeroDivisionError("boom"))), RuntimeError,
     r"encoder raised ZeroDivisionError on a batch of slices of shape \(\d+, 1, 5, 5\): boom"),
    ("encoder_transposed", lambda: heat(encoder=lambda x: x.sum(dim=(2, 3)).T), ValueError,
     r"encoder must return scores of shape \(M,\) or \(M, K\)"),
    ("encoder_returns_images", lambda: heat(encoder=lambda x: x), ValueError, r"encoder must return scores of shape"),
    ("encoder_returns_scalar", lambda: heat(encoder=lambda x: x.sum()), ValueError,
     r"encoder must return scores of shape .* got \(\)"),
    ("encoder_returns_no_scores", lambda: heat(encoder=lambda x: x.sum(dim=(1, 2, 3))[:, None][:, :0]), ValueError,
     r"encoder must return scores of shape .*K >= 1"),
    ("encoder_int_scores", lambda: heat(encoder=lambda x: x.sum(dim=(1, 2, 3)).long()), TypeError,
     r"encoder must return floating-point scores, got dtype torch.int64"),
    ("encoder_bool_scores", lambda: heat(encoder=lambda x: x.sum(dim=(1, 2, 3)) > 0), TypeError,
     r"encoder must return floating-point scores, got dtype torch.bool"),
    ("encoder_returns_list", lambda: heat(encoder=lambda x: x.sum(dim=(1, 2, 3)).tolist()), TypeError,
     r"encoder must return a torch.Tensor"),
    ("encoder_nan_scores", lambda: heat(encoder=lambda x: x.sum(dim=(1, 2, 3)) * float("nan")), ValueError,
     r"encoder returned NaN or inf scores"),
    ("encoder_meta_device", lambda: heat(encoder=lambda x: torch.zeros(x.shape[0], device="meta")), TypeError,
     r"encoder returned a tensor on the meta device"),
    ("encoder_changes_k", lambda: heat(encoder=_KChanging(), batch_size=5), ValueError,
     r"encoder returned 2 (scores|outputs) per slice, earlier 1"),
    # --- make_geometry --------------------------------------------------------------------------------
    ("geometry_shape_2d", lambda: make_geometry((5, 6)), ValueError, r"volume_shape must be a sequence of 3"),
    ("geometry_shape_string", lambda: make_geometry("abc"), ValueError, r"volume_shape must be a sequence of 3"),
    ("geometry_shape_negative", lambda: make_geometry((5, 6, -1)), ValueError,
     r"volume_shape must have at least one voxel"),
    ("geometry_shape_float", lambda: make_geometry((5, 6, 2.5)), TypeError, r"volume_shape must hold integers"),
]


@pytest.mark.parametrize("call, exc, pattern", [pytest.param(c, e, p, id=i) for i, c, e, p in PUBLIC_CASES])
def test_public_api_rejects(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_catalogue_ids_unique():
    ids = [c[0] for c in PUBLIC_CASES + NIFTI_CASES]
    assert len(ids) == len(set(ids))


def test_keyboard_interrupt_in_encoder_is_not_wrapped():
    """Ctrl-C inside the encoder must stop the run as KeyboardInterrupt, not become a RuntimeError."""
    with pytest.raises(KeyboardInterrupt):
        heat(encoder=lambda x: _raise(KeyboardInterrupt()))


# --- inputs that are accepted (the other half of the policy) -------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int32, torch.float16, torch.bfloat16])
def test_integer_and_half_volumes_are_converted_to_float32(dtype):
    """int16 CT (and other integer or half dtypes) give the float32 heatmap of the same values."""
    v = (VOL * 100).round()
    expect = heat(v)
    got = heat(v.to(dtype))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


def test_big_endian_numpy_volume_is_accepted():
    """NIfTI data often comes big-endian; torch only reads native byte order."""
    v = (VOL.numpy() * 100).round().astype(">i2")
    torch.testing.assert_close(heat(v), heat(torch.from_numpy(v.astype(np.int16))), rtol=0, atol=0)


def test_nonfinite_volume_allowed_reaches_the_encoder():
    v = VOL.clone()
    v[2, 3, 3] = float("nan")
    seen = []

    def nan_aware(x):
        seen.append(bool(torch.isnan(x).any()))
        return torch.nan_to_num(x).sum(dim=(1, 2, 3))

    out = heat(v, nan_aware, allow_nonfinite=True)
    assert any(seen) and torch.isfinite(out).all()


def test_nonunit_and_lower_hemisphere_directions_equal_their_unit_upper_form():
    d = torch.tensor([[0.3, -0.4, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    unit = d / d.norm(dim=1, keepdim=True)
    ref = heat(directions=unit)
    torch.testing.assert_close(heat(directions=d * 7.5), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(heat(directions=-unit), ref, rtol=1e-6, atol=1e-6)


def test_repeated_directions_are_accepted():
    d = [[0.0, 0.0, 1.0]] * 3
    out = heat(directions=d, weights=[1.0, 1.0, 1.0])
    single = heat(directions=d[:1], weights=[3.0])
    torch.testing.assert_close(out, single, rtol=1e-6, atol=1e-6)


# --- NIfTI -----------------------------------------------------------------------------------------------

def _write_nifti(path, data, affine=None):
    import nibabel as nib
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _truncated(tmp_path):
    p = _write_nifti(tmp_path / "full.nii.gz", np.random.default_rng(0).random((8, 8, 8)).astype(np.float32))
    raw = p.read_bytes()
    q = tmp_path / "cut.nii.gz"
    q.write_bytes(raw[: len(raw) // 2])
    return q


def _not_gzip(tmp_path):
    q = tmp_path / "plain.nii.gz"
    q.write_bytes(b"this is not a NIfTI file at all" * 20)
    return q


def _four_d(tmp_path):
    return _write_nifti(tmp_path / "4d.nii", np.zeros((4, 4, 4, 3), np.float32))


def _two_d(tmp_path):
    return _write_nifti(tmp_path / "2d.nii", np.zeros((4, 4), np.float32))


def _empty_gz(tmp_path):
    q = tmp_path / "empty.nii.gz"
    with gzip.open(q, "wb"):
        pass
    return q


def _renamed(tmp_path):
    """A valid NIfTI file under a name that is not .nii/.nii.gz."""
    return _write_nifti(tmp_path / "x.nii", np.zeros((2, 2, 2), np.float32)).rename(tmp_path / "x.png")


def _loader(make, **kw):
    return lambda tmp: tonno_fast.load_nifti(make(tmp), **kw)


# (id, callable taking tmp_path, exception type, regex)
NIFTI_CASES = [
    ("load_missing", lambda tmp: tonno_fast.load_nifti(tmp / "nope.nii.gz"), FileNotFoundError, r"no such file"),
    ("load_wrong_extension", lambda tmp: tonno_fast.load_nifti(_renamed(tmp)), ValueError,
     r"is not a NIfTI file \(expected a .nii or .nii.gz name\)"),
    ("load_truncated_gz", _loader(_truncated), ValueError, r"cannot read .*cut.nii.gz as NIfTI"),
    ("load_not_gzip", _loader(_not_gzip), ValueError, r"cannot read .*plain.nii.gz as NIfTI"),
    ("load_empty_gz", _loader(_empty_gz), ValueError, r"cannot read .*empty.nii.gz as NIfTI"),
    ("load_4d_without_index", _loader(_four_d), ValueError, r"4D NIfTI with 3 volumes; choose one with volume_index"),
    ("load_4d_index_out_of_range", _loader(_four_d, volume_index=3), ValueError,
     r"volume_index must be in \[0, 3\), got 3"),
    ("load_4d_index_negative", _loader(_four_d, volume_index=-1), ValueError, r"volume_index must be in \[0, 3\)"),
    ("load_2d", _loader(_two_d), ValueError, r"holds a 2D image .*a 3D volume is needed"),
    ("save_wrong_extension", lambda tmp: tonno_fast.save_nifti(tmp / "out.png", np.zeros((2, 2, 2)), np.eye(4)),
     ValueError, r"output .*out.png must end in .nii or .nii.gz"),
    ("save_not_3d", lambda tmp: tonno_fast.save_nifti(tmp / "o.nii", np.zeros((2, 2)), np.eye(4)), ValueError,
     r"heatmap must be 3D \(D, H, W\), got shape \(2, 2\)"),
    ("save_affine_shape", lambda tmp: tonno_fast.save_nifti(tmp / "o.nii", np.zeros((2, 2, 2)), np.eye(3)),
     ValueError, r"affine must be 4x4, got \(3, 3\)"),
    ("save_affine_nan", lambda tmp: tonno_fast.save_nifti(tmp / "o.nii", np.zeros((2, 2, 2)), np.full((4, 4), np.nan)),
     ValueError, r"affine must be finite"),
    ("save_affine_singular", lambda tmp: tonno_fast.save_nifti(tmp / "o.nii", np.zeros((2, 2, 2)), np.zeros((4, 4))),
     ValueError, r"affine must be invertible"),
]


@pytest.mark.parametrize("call, exc, pattern", [pytest.param(c, e, p, id=i) for i, c, e, p in NIFTI_CASES])
def test_nifti_rejects(tmp_path, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(tmp_path)
    # A refused save leaves nothing behind (no partial file, no temporary file).
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-") or p.name.startswith("o.")]
    assert leftovers == []
