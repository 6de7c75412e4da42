"""NIfTI files as they come from scanners and archives: oblique, flipped and LPS affines, 4D series,
scaled int16, NaNs, truncated archives, and atomic writes (an interrupted save never leaves a partial file).

Bad-file error messages are catalogued in tests/test_bad_inputs.py; this file checks what is *accepted*.
"""
import os
import re
import stat

import nibabel as nib
import numpy as np
import pytest
import torch

import tonno_fast
from tonno_fast.io import nifti as nifti_mod

RNG = np.random.default_rng(0)


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(linear, origin=(-40.0, 12.5, 7.0)):
    a = np.eye(4)
    a[:3, :3] = linear
    a[:3, 3] = origin
    return a


ZOOMS = (0.7, 1.3, 3.0)  # along the file's voxel axes i, j, k
AFFINES = {
    "ras_axis_aligned": _affine(np.diag(ZOOMS)),
    "lps": _affine(np.diag(ZOOMS) * np.array([-1, -1, 1])),  # DICOM-style LPS: x and y flipped
    "flipped_k": _affine(np.diag(ZOOMS) * np.array([1, 1, -1])),  # left-handed: a flipped slice order
    "oblique": _affine(_rotation(0.3, -0.5, 1.1) @ np.diag(ZOOMS)),
    "oblique_flipped": _affine(_rotation(-0.2, 0.7, 0.4) @ np.diag(ZOOMS) @ np.diag([1, -1, 1])),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_affines_load_with_positive_spacing_and_round_trip(tmp_path, name, suffix):
    """Any invertible affine: spacing = column norms (z, y, x order), data kept in file voxel order (no
    resampling), and the saved heatmap carries the source affine so it overlays the scan in any viewer."""
    affine = AFFINES[name]
    data = RNG.normal(size=(9, 8, 5)).astype(np.float32)
    src = tmp_path / f"scan{suffix}"
    nib.save(nib.Nifti1Image(data, affine), str(src))
    vol = tonno_fast.load_nifti(src)
    assert vol.spacing == pytest.approx(ZOOMS[::-1], rel=1e-6)
    np.testing.assert_array_equal(vol.data.numpy(), data.transpose(2, 1, 0))
    np.testing.assert_allclose(vol.affine, affine, rtol=0, atol=1e-6)
    out = tonno_fast.save_nifti(tmp_path / f"heat{suffix}", vol.data * 3, vol.affine, header=vol.header)
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, affine, rtol=0, atol=1e-5)
    np.testing.assert_allclose(back.header.get_sform(), affine, rtol=0, atol=1e-5)
    assert back.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(back.dataobj), data * 3)


def test_flipped_axis_gives_flipped_heatmap(tmp_path):
    """Flipping a file's voxel axis (and its affine column) flips the heatmap the same way: the heatmap
    is computed in voxel space, so it stays registered to the scan whatever the orientation."""
    data = RNG.random((7, 6, 5)).astype(np.float32)
    a = AFFINES["ras_axis_aligned"]
    flip = a.copy()
    flip[:3, 0] = -a[:3, 0]
    flip[:3, 3] = a[:3, 3] + a[:3, 0] * (data.shape[0] - 1)
    nib.save(nib.Nifti1Image(data, a), str(tmp_path / "a.nii"))
    nib.save(nib.Nifti1Image(data[::-1].copy(), flip), str(tmp_path / "b.nii"))
    va, vb = tonno_fast.load_nifti(tmp_path / "a.nii"), tonno_fast.load_nifti(tmp_path / "b.nii")
    assert va.spacing == vb.spacing
    # The x axis (tensor axis W) is flipped; directions mirrored in x give the mirrored heatmap.
    dirs = np.array([[0.3, 0.2, 0.9], [0.0, 0.6, 0.8], [0.5, -0.5, 0.7]])
    mirrored = dirs * np.array([-1, 1, 1])
    kw = dict(spacing=va.spacing, slice_size=9, n_slices=9, filter="laplacian")
    enc = lambda x: x.sum(dim=(1, 2, 3))  # noqa: E731
    ha = tonno_fast.tomographic_heatmap(va.data.double(), enc, directions=dirs, **kw)
    hb = tonno_fast.tomographic_heatmap(vb.data.double(), enc, directions=mirrored, **kw)
    torch.testing.assert_close(hb.flip(-1), ha, rtol=1e-9, atol=1e-9)


def test_4d_series_selects_volume_and_squeezes_singletons(tmp_path):
    data = RNG.random((4, 5, 6, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "series.nii.gz"))
    for t in range(3):
        vol = tonno_fast.load_nifti(tmp_path / "series.nii.gz", volume_index=t)
        np.testing.assert_array_equal(vol.data.numpy(), data[..., t].transpose(2, 1, 0))
    single = data[..., :1, None]  # (4, 5, 6, 1, 1): trailing singleton axes are not a series
    nib.save(nib.Nifti1Image(single, np.eye(4)), str(tmp_path / "single.nii"))
    vol = tonno_fast.load_nifti(tmp_path / "single.nii")
    assert vol.data.shape == (6, 5, 4)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.int32])
def test_scaled_integer_data_gives_float32_values(tmp_path, dtype):
    """scl_slope/scl_inter are applied (CT in int16 with slope 1 and intercept -1024 is the usual case)."""
    raw = RNG.integers(0, 120, size=(6, 5, 4)).astype(dtype)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(2.5, -1024.0)
    nib.save(img, str(tmp_path / "ct.nii.gz"))
    assert nib.load(str(tmp_path / "ct.nii.gz")).get_data_dtype() == dtype
    vol = tonno_fast.load_nifti(tmp_path / "ct.nii.gz")
    assert vol.data.dtype == torch.float32
    np.testing.assert_allclose(vol.data.numpy(), raw.transpose(2, 1, 0).astype(np.float64) * 2.5 - 1024.0)


def test_big_endian_file(tmp_path):
    data = RNG.normal(size=(5, 4, 3)).astype(">f4")
    img = nib.Nifti1Image(data, np.eye(4))
    nib.save(img, str(tmp_path / "be.nii"))
    vol = tonno_fast.load_nifti(tmp_path / "be.nii")
    assert vol.data.dtype == torch.float32
    np.testing.assert_array_equal(vol.data.numpy(), data.astype(np.float32).transpose(2, 1, 0))


def test_nan_voxels_load_and_are_refused_by_the_pipeline_unless_allowed(tmp_path):
    data = RNG.random((6, 6, 6)).astype(np.float32)
    data[2, 3, 1] = np.nan
    data[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    vol = tonno_fast.load_nifti(tmp_path / "nan.nii.gz")
    assert int(torch.isnan(vol.data).sum()) == 1 and int(torch.isinf(vol.data).sum()) == 1
    enc = lambda x: torch.nan_to_num(x, nan=0.0, posinf=0.0).sum(dim=(1, 2, 3))  # noqa: E731
    with pytest.raises(ValueError, match=r"volume contains 2 NaN or inf values.*allow_nonfinite=True"):
        tonno_fast.tomographic_heatmap(vol.data, enc, n_directions=2, slice_size=7, n_slices=7)
    out = tonno_fast.tomographic_heatmap(vol.data, enc, n_directions=2, slice_size=7, n_slices=7,
                                         allow_nonfinite=True)
    assert torch.isfinite(out).all()


def test_truncated_uncompressed_file_is_a_clear_error(tmp_path):
    p = tmp_path / "full.nii"
    nib.save(nib.Nifti1Image(RNG.random((8, 8, 8)).astype(np.float32), np.eye(4)), str(p))
    raw = p.read_bytes()
    cut = tmp_path / "cut.nii"
    cut.write_bytes(raw[: 352 + 100])  # header plus a fraction of the data
    with pytest.raises(ValueError, match=r"cannot read .*cut.nii as NIfTI"):
        tonno_fast.load_nifti(cut)


def test_header_only_file_is_a_clear_error(tmp_path):
    p = tmp_path / "full.nii"
    nib.save(nib.Nifti1Image(RNG.random((4, 4, 4)).astype(np.float32), np.eye(4)), str(p))
    cut = tmp_path / "hdr.nii"
    cut.write_bytes(p.read_bytes()[:100])  # not even a whole header
    with pytest.raises(ValueError, match=r"cannot read .*hdr.nii as NIfTI"):
        tonno_fast.load_nifti(cut)


def test_saved_tensor_dtypes_and_layouts(tmp_path):
    base = torch.rand(4, 5, 6, dtype=torch.float64)
    strided = base.permute(2, 1, 0).contiguous().permute(2, 1, 0)  # same values, non-contiguous
    for i, t in enumerate([base, base.float(), base.to(torch.bfloat16), strided]):
        out = tonno_fast.save_nifti(tmp_path / f"h{i}.nii", t, np.eye(4))
        back = np.asarray(nib.load(str(out)).dataobj)
        assert back.dtype == np.float32 and back.shape == (6, 5, 4)
        np.testing.assert_allclose(back.transpose(2, 1, 0), t.double().numpy(), rtol=0, atol=1e-7)


# --- atomic writes --------------------------------------------------------------------------------------------

def _files(folder):
    return sorted(p.name for p in folder.iterdir())


class _WriterDied(Exception):
    pass


def _dying_save(exc):
    """A replacement for nibabel.save that writes part of the file and then fails (a full disk, Ctrl-C)."""
    def save(img, filename):
        with open(filename, "wb") as fh:
            fh.write(b"\x5c\x01\x00\x00" + b"\x00" * 200)  # a plausible start of a NIfTI header
        raise exc
    return save


@pytest.mark.parametrize("exc", [_WriterDied("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_interrupted_save_leaves_no_partial_file(tmp_path, monkeypatch, exc, suffix):
    monkeypatch.setattr(nib, "save", _dying_save(exc))
    target = tmp_path / f"heat{suffix}"
    with pytest.raises(type(exc)):
        tonno_fast.save_nifti(target, torch.rand(3, 4, 5), np.eye(4))
    assert _files(tmp_path) == []  # neither the target nor a temporary file


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "heat.nii.gz"
    first = torch.rand(3, 4, 5)
    tonno_fast.save_nifti(target, first, np.eye(4))
    before = target.read_bytes()
    monkeypatch.setattr(nib, "save", _dying_save(_WriterDied("killed")))
    with pytest.raises(_WriterDied):
        tonno_fast.save_nifti(target, torch.rand(3, 4, 5), np.eye(4))
    assert target.read_bytes() == before and _files(tmp_path) == ["heat.nii.gz"]


def test_failed_rename_cleans_up(tmp_path, monkeypatch):
    def no_replace(src, dst):
        raise PermissionError("read-only target")
    monkeypatch.setattr(nifti_mod.os, "replace", no_replace)
    with pytest.raises(PermissionError):
        tonno_fast.save_nifti(tmp_path / "heat.nii", torch.rand(3, 4, 5), np.eye(4))
    assert _files(tmp_path) == []


def test_encoder_error_writes_nothing(tmp_path):
    """The heatmap is computed before anything is opened for writing: an encoder that fails midway leaves
    the output folder untouched."""
    target = tmp_path / "heat.nii.gz"
    calls = []

    def flaky(x):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return x.sum(dim=(1, 2, 3))

    with pytest.raises(RuntimeError, match=r"encoder raised RuntimeError.*simulated"):
        heat = tonno_fast.tomographic_heatmap(torch.rand(5, 5, 5), flaky, n_directions=4, slice_size=5,
                                              n_slices=5, batch_size=5)
        tonno_fast.save_nifti(target, heat, np.eye(4))
    assert _files(tmp_path) == []


def test_saved_file_has_normal_permissions(tmp_path):
    """mkstemp creates 0o600 files; the heatmap must get 0o666 minus the umask like any other output."""
    old = os.umask(0o022)
    try:
        out = tonno_fast.save_nifti(tmp_path / "heat.nii", torch.rand(2, 3, 4), np.eye(4))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_save_into_new_folder_and_overwrite(tmp_path):
    target = tmp_path / "a" / "b" / "heat.nii.gz"
    tonno_fast.save_nifti(target, torch.zeros(2, 3, 4), np.eye(4))
    tonno_fast.save_nifti(target, torch.ones(2, 3, 4), np.eye(4))
    assert np.asarray(nib.load(str(target)).dataobj).min() == 1.0
    assert _files(target.parent) == ["heat.nii.gz"]


# --- the command line: one clear line, a non-zero status, no output file ---------------------------------------

class _FailsOnSecondBatch(torch.nn.Module):
    """Scores slices, then fails on its second call (as a GPU running out of memory would)."""

    def __init__(self, exc):
        super().__init__()
        self.exc, self.calls = exc, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise self.exc
        return x.mean(dim=(1, 2, 3))


def _cli_run(tmp_path, monkeypatch, capsys, data, encoder=None):
    cli = pytest.importorskip("tonno_fast.cli")
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(scan))
    if encoder is not None:
        monkeypatch.setattr(cli, "load_encoder", lambda *a, **k: encoder)
    out = tmp_path / "out" / "heat.nii.gz"
    rc = cli.main(["heatmap", "-i", str(scan), "-o", str(out), "--encoder", "unused.pt", "--directions", "4",
                   "--slice-size", "8", "--batch-size", "4", "--device", "cpu", "-q"])
    err = capsys.readouterr().err.strip()
    return rc, err, out


@pytest.mark.parametrize("exc, status, pattern", [
    (RuntimeError("CUDA out of memory (simulated)"), 1,
     r"^tonno-fast: error: RuntimeError: encoder raised .*simulated"),
    (KeyboardInterrupt(), 130, r"^tonno-fast: interrupted$"),
])
def test_cli_encoder_failure_midway_leaves_no_output(tmp_path, monkeypatch, capsys, exc, status, pattern):
    data = RNG.random((8, 8, 8)).astype(np.float32)
    rc, err, out = _cli_run(tmp_path, monkeypatch, capsys, data, _FailsOnSecondBatch(exc))
    assert rc == status
    assert len(err.splitlines()) == 1 and "Traceback" not in err and re.search(pattern, err), err
    assert not out.exists() and (not out.parent.exists() or _files(out.parent) == [])


def test_cli_nan_scan_is_one_line_error(tmp_path, monkeypatch, capsys):
    data = RNG.random((8, 8, 8)).astype(np.float32)
    data[1, 2, 3] = np.nan
    rc, err, out = _cli_run(tmp_path, monkeypatch, capsys, data, _FailsOnSecondBatch(RuntimeError("unused")))
    assert rc != 0 and len(err.splitlines()) == 1 and "NaN" in err, err
    assert not out.exists()


def test_tiny_voxels_and_sheared_affines_are_accepted(tmp_path):
    """Micro-CT in mm (1e-4 mm voxels) and a sheared (gantry-tilt) affine are valid; only degenerate ones
    (a zero or repeated voxel axis) are refused."""
    sheared = np.array([[0.8, 0.0, 0.0], [0.0, 0.8, 0.6], [0.0, 0.0, 2.5]])
    for i, lin in enumerate([np.diag([1e-4, 1e-4, 2e-4]), sheared]):
        p = tonno_fast.save_nifti(tmp_path / f"a{i}.nii", np.zeros((2, 3, 4), np.float32), _affine(lin))
        vol = tonno_fast.load_nifti(p)
        assert vol.spacing == pytest.approx(tuple(np.linalg.norm(lin, axis=0))[::-1], rel=1e-6)
    degenerate = _affine(np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"affine must be invertible"):
        tonno_fast.save_nifti(tmp_path / "bad.nii", np.zeros((2, 3, 4), np.float32), degenerate)
