"""The tonno-fast command line on a tiny NIfTI made here: heatmap (TorchScript and factory encoders), bench,
and one-line errors."""
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from tonno_fast.cli import main
from tonno_fast.demo.model import SliceCNN

AFFINE = np.array([[-2.0, 0, 0, 10], [0, 2.0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])


@pytest.fixture
def scan(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((10, 12, 8)).astype(np.float32)  # file axes (i, j, k)
    data[3:6, 4:8, 2:5] += 2.0
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return path


class _Mean(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(1, 2, 3))


@pytest.fixture
def torchscript(tmp_path):
    path = tmp_path / "model.pt"
    torch.jit.script(_Mean()).save(str(path))
    return path


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("tonno-fast: error:"), err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_heatmap_torchscript(tmp_path, scan, torchscript, capsys):
    out = tmp_path / "heat.nii.gz"
    png = tmp_path / "overlay.png"
    rc = main(["heatmap", "-i", str(scan), "-o", str(out), "--encoder", str(torchscript), "--directions", "6",
               "--device", "cpu", "--png", str(png), "--batch-size", "64", "-q"])
    assert rc == 0
    img = nib.load(str(out))
    assert img.shape == (10, 12, 8)
    np.testing.assert_allclose(img.affine, AFFINE)
    heat = np.asarray(img.dataobj)
    assert np.isfinite(heat).all() and heat.std() > 0
    # The mean encoder is a plane integral up to a constant: the bright box must stand out.
    assert heat[3:6, 4:8, 2:5].mean() > heat.mean()
    assert png.stat().st_size > 1000


def test_heatmap_factory_weights_and_cam(tmp_path, scan, capsys):
    weights = tmp_path / "w.pt"
    torch.save(SliceCNN().state_dict(), str(weights))
    spec = "tonno_fast.demo.model:make_encoder"
    for method in ("tonno", "tomographic-cam"):
        out = tmp_path / f"{method}.nii"
        rc = main(["heatmap", "-i", str(scan), "-o", str(out), "--encoder", spec, "--weights", str(weights),
                   "--method", method, "--target-layer", "features.3", "--directions", "3", "--slice-size", "16",
                   "--device", "cpu", "-q"])
        assert rc == 0, capsys.readouterr().err
        assert nib.load(str(out)).shape == (10, 12, 8)


def test_errors_are_one_line(tmp_path, scan, torchscript, capsys):
    out = str(tmp_path / "h.nii.gz")
    base = ["--encoder", str(torchscript), "--device", "cpu", "-q"]
    assert main(["heatmap", "-i", str(tmp_path / "missing.nii.gz"), "-o", out] + base) == 2
    assert "no such file" in _one_error_line(capsys)

    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    assert main(["heatmap", "-i", str(txt), "-o", out] + base) == 2
    assert "not a NIfTI" in _one_error_line(capsys)

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"definitely not gzip")
    assert main(["heatmap", "-i", str(broken), "-o", out] + base) == 2
    assert "cannot read" in _one_error_line(capsys)

    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 12), dtype=np.float32), np.eye(4)), str(flat))
    assert main(["heatmap", "-i", str(flat), "-o", out] + base) == 2
    assert "2D" in _one_error_line(capsys)

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 64)
    assert main(["heatmap", "-i", str(scan), "-o", out, "--encoder", str(junk), "-q"]) == 2
    assert "not a TorchScript file" in _one_error_line(capsys)

    assert main(["heatmap", "-i", str(scan), "-o", out, "--encoder", "no_such_pkg.mod:make", "-q"]) == 2
    assert "cannot import" in _one_error_line(capsys)

    weights = tmp_path / "wrong.pt"
    torch.save({"bogus": torch.zeros(1)}, str(weights))
    assert main(["heatmap", "-i", str(scan), "-o", out, "--encoder", "tonno_fast.demo.model:make_encoder",
                 "--weights", str(weights), "-q"]) == 2
    assert "cannot load this state dict" in _one_error_line(capsys)

    assert main(["heatmap", "-i", str(scan), "-o", out, "--method", "averaged-cam"] + base) == 2
    assert "--target-layer" in _one_error_line(capsys)

    assert main(["heatmap", "-i", str(scan), "-o", str(tmp_path / "h.png")] + base) == 2
    assert ".nii" in _one_error_line(capsys)


def test_bench_prints_a_table(capsys):
    assert main(["bench", "--size", "8", "--directions", "2", "--repeats", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for op in ("slice_volume", "radon", "backproject", "backproject_slices", "affine_grid_sample"):
        assert f"| {op}" in out
    assert "reference" in out


def test_console_help_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "tonno_fast", "heatmap", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0
    assert "--encoder" in r.stdout and "TorchScript" in r.stdout and "--directions" in r.stdout


def test_heatmap_with_an_encoder_bundle(tmp_path, scan, capsys):
    import tonno_fast

    torch.manual_seed(0)
    bundle = tonno_fast.save_encoder(tmp_path / "bundle.pt", SliceCNN(norm="group").eval(), slice_size=16,
                                     pixel_spacing=2.0, factory_kwargs={"norm": "group"})
    outs = {}
    for method in ("tonno", "tomographic-cam"):
        out = tmp_path / f"{method}.nii.gz"
        rc = main(["heatmap", "-i", str(scan), "-o", str(out), "--encoder", bundle, "--method", method,
                   "--target-layer", "features.3", "--directions", "3", "--device", "cpu", "-q"])
        assert rc == 0, capsys.readouterr().err
        outs[method] = np.asarray(nib.load(str(out)).dataobj)
    # The bundle's geometry (16 px at 2 mm) is what the CLI used: the same as giving it by hand.
    by_hand = tmp_path / "by_hand.nii.gz"
    weights = tmp_path / "w.pt"
    torch.save(tonno_fast.load_encoder(bundle).model.state_dict(), str(weights))
    assert main(["heatmap", "-i", str(scan), "-o", str(by_hand), "--encoder", bundle, "--directions", "3",
                 "--slice-size", "16", "--pixel-spacing", "2.0", "--device", "cpu", "-q"]) == 0
    np.testing.assert_allclose(np.asarray(nib.load(str(by_hand)).dataobj), outs["tonno"], rtol=1e-6, atol=1e-6)
    assert main(["heatmap", "-i", str(scan), "-o", str(by_hand), "--encoder", bundle, "--weights", str(weights),
                 "-q"]) == 2
    assert "--weights is not used with an encoder bundle" in _one_error_line(capsys)
