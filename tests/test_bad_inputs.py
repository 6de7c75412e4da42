"""Catalogue of bad inputs (issue 8): every case gets one specific exception type and a message that names the
argument and says what was expected. Nothing here may crash the interpreter or return garbage.

Sections: the pipeline (``tomographic_heatmap``, encoders), ``make_geometry``, the geometry-level operators of
``tonno_fast.ops``, NIfTI files, direct ``torch.ops.tonno_fast.*`` calls (skipped when the extension is not
built) and sizes whose index arithmetic would overflow 32 bits (must work or refuse, never wrap).

Policy decided here and documented in ``tonno_fast/validation.py``: bool volumes are refused (``TypeError``),
integer volumes are converted to float32, non-finite volumes are refused unless ``allow_nonfinite=True``,
non-unit direction vectors are normalised, empty tensors are refused by every operator.
"""
import gzip
import math
import re

import numpy as np
import pytest
import torch

import tonno_fast
from tonno_fast import ops
from tonno_fast.geometry import make_geometry

SHAPE = (5, 6, 7)
VOL = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))
GEOM = make_geometry(SHAPE, n_directions=3, slice_size=5, n_slices=5)
N, S, HH, WW = GEOM.n_directions, GEOM.n_slices, GEOM.height, GEOM.width


def sum_encoder(x):
    """``(M, C, h, w)`` → ``(M,)``: the ideal encoder of the master identity."""
    return x.sum(dim=(1, 2, 3))


def heat(volume=VOL, encoder=sum_encoder, **kw):
    kw.setdefault("n_directions", 2)
    kw.setdefault("slice_size", 5)
    kw.setdefault("n_slices", 5)
    kw.setdefault("spacing", (1.0, 1.0, 1.0))
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


V5 = VOL[None, None].clone()  # (1, 1, D, H, W) float32
SINO = torch.rand(1, 1, N, S)
STACKS = torch.rand(1, 1, N, S, HH, WW)
THETA = torch.eye(3, 4).expand(2, 3, 4).clone()
VAGS = torch.rand(2, 1, 3, 4, 5)

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
    # --- tonno_fast.ops -------------------------------------------------------------------------------
    ("slice_volume_int", lambda: ops.slice_volume(V5.int(), GEOM), TypeError,
     r"volume must be float32 or float64, got torch.int32"),
    ("slice_volume_half", lambda: ops.slice_volume(V5.half(), GEOM), TypeError,
     r"volume must be float32 or float64, got torch.float16"),
    ("slice_volume_rank_3", lambda: ops.slice_volume(VOL, GEOM), ValueError,
     r"volume must have shape \(B, C, D, H, W\)"),
    ("slice_volume_shape_mismatch", lambda: ops.slice_volume(torch.rand(1, 1, 5, 6, 8), GEOM), ValueError,
     r"volume has spatial shape \(5, 6, 8\) but the geometry was made for \(5, 6, 7\)"),
    ("slice_volume_empty_batch", lambda: ops.slice_volume(torch.rand(0, 1, *SHAPE), GEOM), ValueError,
     r"volume must not be empty"),
    ("slice_volume_out_dtype_int", lambda: ops.slice_volume(V5, GEOM, out_dtype=torch.int32), TypeError,
     r"out_dtype must be None or one of"),
    ("slice_volume_fill_inf", lambda: ops.slice_volume(V5, GEOM, fill=float("inf")), ValueError,
     r"fill must be finite"),
    ("slice_volume_not_geometry", lambda: ops.slice_volume(V5, "geometry"), TypeError,
     r"geometry must be a tonno_fast.Geometry"),
    ("slice_volume_not_tensor", lambda: ops.slice_volume(VOL.numpy()[None, None], GEOM), TypeError,
     r"volume must be a torch.Tensor"),
    ("radon_rank_4", lambda: ops.radon(V5[0], GEOM), ValueError, r"volume must have shape \(B, C, D, H, W\)"),
    ("radon_bool", lambda: ops.radon(V5 > 0, GEOM), TypeError, r"volume must be float32 or float64, got torch.bool"),
    ("backproject_wrong_n", lambda: ops.backproject(SINO[:, :, :2], GEOM), ValueError,
     r"sinogram must have \(N, S\) = \(3, 5\)"),
    ("backproject_rank_3", lambda: ops.backproject(SINO[0], GEOM), ValueError,
     r"sinogram must have shape \(B, K, N, S\)"),
    ("backproject_int", lambda: ops.backproject(SINO.long(), GEOM), TypeError,
     r"sinogram must be float32 or float64, got torch.int64"),
    ("backproject_half", lambda: ops.backproject(SINO.half(), GEOM), TypeError,
     r"sinogram must be float32 or float64, got torch.float16"),
    ("backproject_weights_count", lambda: ops.backproject(SINO, GEOM, weights=torch.ones(2)), ValueError,
     r"weights must have shape \(N,\) = \(3,\)"),
    ("backproject_weights_2d", lambda: ops.backproject(SINO, GEOM, weights=torch.ones(3, 1)), ValueError,
     r"weights must have shape \(N,\)"),
    ("backproject_weights_other_device", lambda: ops.backproject(SINO, GEOM, weights=torch.ones(3, device="meta")),
     ValueError, r"weights is on meta but sinogram is on cpu"),
    ("backproject_weights_nan", lambda: ops.backproject(SINO, GEOM, weights=torch.full((3,), float("nan"))),
     ValueError, r"weights must be finite"),
    ("backproject_weights_bool", lambda: ops.backproject(SINO, GEOM, weights=torch.ones(3, dtype=torch.bool)),
     TypeError, r"weights must be real numbers"),
    ("backproject_not_tensor", lambda: ops.backproject(SINO.numpy(), GEOM), TypeError,
     r"sinogram must be a torch.Tensor"),
    ("backproject_slices_wrong_size", lambda: ops.backproject_slices(STACKS[..., :2, :2], GEOM), ValueError,
     r"stacks must have \(N, S, h, w\) = \(3, 5, 5, 5\)"),
    ("backproject_slices_rank_5", lambda: ops.backproject_slices(STACKS[0], GEOM), ValueError,
     r"stacks must have shape \(B, K, N, S, h, w\)"),
    ("backproject_slices_int", lambda: ops.backproject_slices(STACKS.int(), GEOM), TypeError,
     r"stacks must be float32 or float64"),
    ("backproject_slices_empty_k", lambda: ops.backproject_slices(STACKS[:, :0], GEOM), ValueError,
     r"stacks must not be empty"),
    ("filtered_backprojection_filter", lambda: ops.filtered_backprojection(SINO, GEOM, filter="hilbert"), ValueError,
     r"filter must be one of"),
    ("affine_theta_dtype", lambda: ops.affine_grid_sample(VAGS, THETA.double(), (2, 1, 3, 3, 3)), TypeError,
     r"theta must have the volume's dtype torch.float32, got torch.float64"),
    ("affine_theta_device", lambda: ops.affine_grid_sample(VAGS, THETA.to("meta"), (2, 1, 3, 3, 3)), ValueError,
     r"theta is on meta but volume is on cpu"),
    ("affine_theta_shape", lambda: ops.affine_grid_sample(VAGS, THETA[:, :, :3], (2, 1, 3, 3, 3)), ValueError,
     r"theta must have shape \(N, 3, 4\)"),
    ("affine_theta_batch", lambda: ops.affine_grid_sample(VAGS, THETA[:1], (2, 1, 3, 3, 3)), ValueError,
     r"theta must have shape \(N, 3, 4\) with N = volume.shape\[0\] = 2"),
    ("affine_theta_list", lambda: ops.affine_grid_sample(VAGS, THETA.tolist(), (2, 1, 3, 3, 3)), TypeError,
     r"theta must be a torch.Tensor"),
    ("affine_size_negative", lambda: ops.affine_grid_sample(VAGS, THETA, (2, 1, -3, 3, 3)), ValueError,
     r"size must be .*positive output sizes, got \(2, 1, -3, 3, 3\)"),
    ("affine_size_zero", lambda: ops.affine_grid_sample(VAGS, THETA, (2, 1, 0, 3, 3)), ValueError,
     r"size must be .*positive output sizes"),
    ("affine_size_float", lambda: ops.affine_grid_sample(VAGS, THETA, (2, 1, 2.5, 3, 3)), ValueError,
     r"size must be 5 integers"),
    ("affine_size_length", lambda: ops.affine_grid_sample(VAGS, THETA, (2, 1, 3, 3)), ValueError,
     r"size must be 5 integers"),
    ("affine_size_channels", lambda: ops.affine_grid_sample(VAGS, THETA, (2, 3, 3, 3, 3)), ValueError,
     r"size must be \(N, C, D_out, H_out, W_out\) with volume's N = 2, C = 1"),
    ("affine_volume_rank", lambda: ops.affine_grid_sample(VAGS[0], THETA, (2, 1, 3, 3, 3)), ValueError,
     r"volume must be 5-D"),
    ("affine_volume_int", lambda: ops.affine_grid_sample(VAGS.int(), THETA, (2, 1, 3, 3, 3)), TypeError,
     r"volume must be float32 or float64"),
    ("affine_align_corners_int", lambda: ops.affine_grid_sample(VAGS, THETA, (2, 1, 3, 3, 3), 1), TypeError,
     r"align_corners must be a bool"),
]


@pytest.mark.parametrize("call, exc, pattern", [pytest.param(c, e, p, id=i) for i, c, e, p in PUBLIC_CASES])
def test_public_api_rejects(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_catalogue_ids_unique():
    ids = [c[0] for c in PUBLIC_CASES + NIFTI_CASES + CUSTOM_OP_CASES]
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


# --- direct torch.ops.tonno_fast.* calls ---------------------------------------------------------------------

def _custom_ops_available():
    try:
        import tonno_fast._C  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch.ops.tonno_fast, "slice_volume")


needs_ext = pytest.mark.skipif(not _custom_ops_available(), reason="tonno_fast._C is not built")


def _op(name):
    return getattr(torch.ops.tonno_fast, name)


MAPS = GEOM.slice_maps(dtype=torch.float32)
VMAPS = GEOM.volume_maps(dtype=torch.float32)
W3 = torch.ones(3)
GRAD_SLICES = torch.rand(1, N, S, 1, HH, WW)

# Direct calls bypass every Python check: each is refused by the kernel's own TORCH_CHECK (RuntimeError).
CUSTOM_OP_CASES = [
    ("op_slice_volume_rank", lambda: _op("slice_volume")(V5[0], MAPS, S, HH, WW, 0.0, None), r"volume"),
    ("op_slice_volume_maps_shape", lambda: _op("slice_volume")(V5, MAPS[:, :, :3], S, HH, WW, 0.0, None), r"maps"),
    ("op_slice_volume_maps_empty", lambda: _op("slice_volume")(V5, MAPS[:0], S, HH, WW, 0.0, None), r"maps"),
    ("op_slice_volume_maps_dtype", lambda: _op("slice_volume")(V5, MAPS.double(), S, HH, WW, 0.0, None), r"maps"),
    ("op_slice_volume_int_volume", lambda: _op("slice_volume")(V5.int(), MAPS, S, HH, WW, 0.0, None), r"volume"),
    ("op_slice_volume_n_slices_zero", lambda: _op("slice_volume")(V5, MAPS, 0, HH, WW, 0.0, None), r"n_slices"),
    ("op_slice_volume_height_negative", lambda: _op("slice_volume")(V5, MAPS, S, -2, WW, 0.0, None), r"height"),
    ("op_slice_volume_width_zero", lambda: _op("slice_volume")(V5, MAPS, S, HH, 0, 0.0, None), r"width"),
    ("op_slice_volume_out_dtype_int", lambda: _op("slice_volume")(V5, MAPS, S, HH, WW, 0.0, torch.int32),
     r"out_dtype"),
    ("op_slice_volume_empty_batch", lambda: _op("slice_volume")(V5[:0], MAPS, S, HH, WW, 0.0, None), r"volume"),
    ("op_slice_volume_backward_rank", lambda: _op("slice_volume_backward")(GRAD_SLICES[0], MAPS, list(SHAPE)),
     r"grad"),
    ("op_slice_volume_backward_n", lambda: _op("slice_volume_backward")(GRAD_SLICES, MAPS[:2], list(SHAPE)),
     r"grad|maps"),
    ("op_slice_volume_backward_shape_len", lambda: _op("slice_volume_backward")(GRAD_SLICES, MAPS, [5, 6]),
     r"volume_shape"),
    ("op_slice_volume_backward_shape_negative", lambda: _op("slice_volume_backward")(GRAD_SLICES, MAPS, [5, -6, 7]),
     r"volume_shape"),
    ("op_radon_maps_dtype", lambda: _op("radon")(V5, MAPS.double(), S, HH, WW, 1.0), r"maps"),
    ("op_radon_height_zero", lambda: _op("radon")(V5, MAPS, S, 0, WW, 1.0), r"height"),
    ("op_radon_backward_n", lambda: _op("radon_backward")(torch.rand(1, 1, 2, S), MAPS, HH, WW, 1.0, list(SHAPE)),
     r"grad|maps"),
    ("op_radon_backward_shape_len", lambda: _op("radon_backward")(torch.rand(1, 1, N, S), MAPS, HH, WW, 1.0, [5]),
     r"volume_shape"),
    ("op_backproject_weights_count", lambda: _op("backproject")(SINO, VMAPS, W3[:2], list(SHAPE)), r"weights"),
    ("op_backproject_weights_dtype", lambda: _op("backproject")(SINO, VMAPS, W3.double(), list(SHAPE)), r"weights"),
    ("op_backproject_sinogram_n", lambda: _op("backproject")(SINO[:, :, :2], VMAPS, W3, list(SHAPE)),
     r"sinogram|maps"),
    ("op_backproject_shape_len", lambda: _op("backproject")(SINO, VMAPS, W3, [5, 6]), r"volume_shape"),
    ("op_backproject_shape_zero", lambda: _op("backproject")(SINO, VMAPS, W3, [5, 0, 7]), r"volume_shape"),
    ("op_backproject_int", lambda: _op("backproject")(SINO.int(), VMAPS, W3, list(SHAPE)), r"sinogram"),
    ("op_backproject_backward_n_slices", lambda: _op("backproject_backward")(torch.rand(1, 1, *SHAPE), VMAPS, W3, 0),
     r"n_slices"),
    ("op_backproject_backward_rank", lambda: _op("backproject_backward")(torch.rand(1, *SHAPE), VMAPS, W3, S),
     r"grad"),
    ("op_backproject_slices_rank", lambda: _op("backproject_slices")(STACKS[0], VMAPS, W3, list(SHAPE)), r"stacks"),
    ("op_backproject_slices_n", lambda: _op("backproject_slices")(STACKS[:, :, :2], VMAPS, W3, list(SHAPE)),
     r"stacks|maps|weights"),
    ("op_backproject_slices_backward_stack_shape",
     lambda: _op("backproject_slices_backward")(torch.rand(1, 1, *SHAPE), VMAPS, W3, [S, HH]), r"stack_shape"),
    ("op_backproject_slices_backward_stack_negative",
     lambda: _op("backproject_slices_backward")(torch.rand(1, 1, *SHAPE), VMAPS, W3, [S, -1, WW]), r"stack_shape"),
    ("op_affine_theta_shape", lambda: _op("affine_grid_sample")(VAGS, THETA[:, :, :3], [2, 1, 3, 3, 3], False),
     r"theta"),
    ("op_affine_theta_batch", lambda: _op("affine_grid_sample")(VAGS, THETA[:1], [2, 1, 3, 3, 3], False), r"theta"),
    ("op_affine_theta_dtype", lambda: _op("affine_grid_sample")(VAGS, THETA.double(), [2, 1, 3, 3, 3], False),
     r"theta"),
    ("op_affine_size_len", lambda: _op("affine_grid_sample")(VAGS, THETA, [2, 1, 3, 3], False), r"size"),
    ("op_affine_size_negative", lambda: _op("affine_grid_sample")(VAGS, THETA, [2, 1, 3, -3, 3], False), r"size"),
    ("op_affine_size_channels", lambda: _op("affine_grid_sample")(VAGS, THETA, [2, 4, 3, 3, 3], False), r"size"),
    ("op_affine_backward_grad_shape",
     lambda: _op("affine_grid_sample_backward")(torch.rand(2, 1, 2, 2, 2), VAGS, THETA[:1], False, True, True),
     r"theta|grad"),
]


@needs_ext
@pytest.mark.parametrize("call, pattern", [pytest.param(c, p, id=i) for i, c, p in CUSTOM_OP_CASES])
def test_custom_op_rejects(call, pattern):
    """A direct call with bad arguments raises (never crashes) and names the offending argument."""
    with pytest.raises(RuntimeError, match=pattern):
        call()


@needs_ext
def test_custom_op_mixed_devices_rejected():
    """maps on another device than the volume (meta stands in for a GPU on CPU-only machines)."""
    with pytest.raises(RuntimeError, match=r"maps|device"):
        _op("slice_volume")(V5, MAPS.to("meta"), S, HH, WW, 0.0, None)
        # A fake kernel that accepts the mix still must not return a CPU result computed from meta maps.
        raise RuntimeError("maps on meta with a CPU volume was accepted")


# --- 32-bit overflow: must work or refuse, never wrap ---------------------------------------------------------

def _compiled_backends():
    avail = tonno_fast.backends()
    out = [b for b in ("cpu", "cuda") if avail.get(b) == "available"]
    if avail.get("triton") == "available" and torch.cuda.is_available():
        out.append("triton")  # the interpreter cannot run 2^31 points in a test
    return out


def test_shapes_beyond_int32_are_exact_on_meta():
    """Shape arithmetic for outputs with more than 2^31 elements (meta tensors: nothing is allocated)."""
    geom = make_geometry((8, 8, 8), n_directions=2, n_slices=2 ** 11, slice_size=2 ** 10)
    vol = torch.empty(1, 2, 8, 8, 8, device="meta")
    out = ops.slice_volume(vol, geom, backend="reference")
    assert out.shape == (1, 2, 2 ** 11, 2, 2 ** 10, 2 ** 10) and out.numel() == 2 ** 33
    big = make_geometry((2 ** 11, 2 ** 10, 2 ** 10), n_directions=2, n_slices=3, slice_size=3)
    bp = ops.backproject(torch.empty(1, 1, 2, 3, device="meta"), big, backend="reference")
    assert bp.shape == (1, 1, 2 ** 11, 2 ** 10, 2 ** 10) and bp.numel() == 2 ** 31


@needs_ext
@pytest.mark.parametrize("name, args, shape", [
    ("slice_volume", lambda v, m: (v, m, 2 ** 11, 2 ** 10, 2 ** 10, 0.0, None), (1, 2, 2 ** 11, 3, 2 ** 10, 2 ** 10)),
    ("radon", lambda v, m: (v, m, 2 ** 11, 2 ** 10, 2 ** 10, 1.0), (1, 3, 2, 2 ** 11)),
])
def test_custom_op_fake_kernels_beyond_int32(name, args, shape):
    vol = torch.empty(1, 3, 4, 4, 4, device="meta")
    maps = torch.empty(2, 3, 4, device="meta")
    out = _op(name)(*args(vol, maps))
    assert tuple(out.shape) == shape and out.device.type == "meta"


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
def test_radon_with_more_than_2_31_samples_per_plane(backend):
    """h*w = 46341^2 > 2^31 - 1 pixels per plane on a 3x3x3 volume: the plane sum must equal that of a 3x3
    slice with the same pixel grid (every other pixel is outside the volume) or be refused with a clear
    message; a wrapped 32-bit index would read the wrong voxels or crash."""
    if backend not in _compiled_backends():
        pytest.skip(f"backend {backend} unavailable (or only interpreted)")
    device = "cuda" if backend in ("cuda", "triton") else "cpu"
    vol = torch.rand(1, 1, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    dirs = [[0.0, 0.0, 1.0], [0.2, 0.3, 0.9]]
    big_side = 46341  # odd, so the small grid is centred inside the big one
    assert big_side ** 2 > 2 ** 31 - 1
    big = make_geometry((3, 3, 3), directions=dirs, n_slices=3, slice_size=big_side, pixel_spacing=1.0)
    small = make_geometry((3, 3, 3), directions=dirs, n_slices=3, slice_size=9, pixel_spacing=1.0)
    expect = ops.radon(vol, small, backend="reference")
    try:
        got = ops.radon(vol, big, backend=backend)
    except RuntimeError as exc:
        assert re.search(r"2\^31|too large|overflow", str(exc)), str(exc)
        return
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
    assert math.isfinite(float(got.sum()))
