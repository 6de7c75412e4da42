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


# ------------------------------------------------------- the options the API has, and encoders handled as the API
def _api(scan_path, model, **kw):
    import tonno_fast as tf

    s = tf.load_nifti(scan_path)
    return tf.tomographic_heatmap(s.data, model, spacing=s.spacing, **kw)


def _cli_heat(tmp_path, scan, encoder, *extra, name="heat.nii.gz"):
    import tonno_fast as tf

    out = tmp_path / name
    rc = main(["heatmap", "-i", str(scan), "-o", str(out), "--encoder", str(encoder), "--device", "cpu", "-q"]
              + list(extra))
    return rc, (tf.load_nifti(out).data if rc == 0 else None)


def test_window_hann_equals_the_api(tmp_path, scan, torchscript, capsys):
    rc, got = _cli_heat(tmp_path, scan, torchscript, "--directions", "6", "--window", "hann")
    assert rc == 0, capsys.readouterr().err
    api = _api(scan, torch.jit.load(str(torchscript)), n_directions=6, window="hann")
    torch.testing.assert_close(got, api, rtol=1e-6, atol=1e-6)
    plain = _api(scan, torch.jit.load(str(torchscript)), n_directions=6)
    assert (plain - api).abs().max() > 1e-3 * api.abs().max()  # the window changes the map


class _ThreeChannels(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 2, 3)
        self.head = torch.nn.Linear(2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_three_channel_torchscript_and_normalize_as_the_api(tmp_path, scan, capsys):
    from tonno_fast.encoder import Encoder

    path = tmp_path / "rgb.pt"
    model = _ThreeChannels().eval()
    torch.jit.script(model).save(str(path))
    rc, got = _cli_heat(tmp_path, scan, path, "--directions", "4")
    assert rc == 0, capsys.readouterr().err
    torch.testing.assert_close(got, _api(scan, model, n_directions=4), rtol=1e-5, atol=1e-6)
    rc, got = _cli_heat(tmp_path, scan, path, "--directions", "4", "--normalize", "0.2,0.3,0.4/0.5,0.5,0.5",
                        name="norm.nii.gz")
    assert rc == 0, capsys.readouterr().err
    api = _api(scan, Encoder(model, mean=(0.2, 0.3, 0.4), std=(0.5, 0.5, 0.5)), n_directions=4)
    torch.testing.assert_close(got, api, rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit) as info:  # argparse: usage and the error, status 2
        main(["heatmap", "-i", str(scan), "-o", str(tmp_path / "x.nii"), "--encoder", str(path),
              "--normalize", "0.1/0.2/0.3"])
    assert info.value.code == 2 and "argument --normalize" in capsys.readouterr().err


class _RawConv(torch.nn.Module):
    """A 3-channel convolution through F.conv2d: nothing tells the channels it takes."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2, 3, 3, 3))

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight).mean(dim=(1, 2, 3))


def test_channel_mismatch_names_the_mismatch(tmp_path, scan, capsys):
    path = tmp_path / "raw.pt"
    torch.jit.script(_RawConv()).save(str(path))
    args = ["heatmap", "-i", str(scan), "-o", str(tmp_path / "h.nii.gz"), "--encoder", str(path), "--directions", "2",
            "--device", "cpu", "-q"]
    assert main(args) == 1
    err = _one_error_line(capsys)
    assert "to have 3 channels, but got 1 channels" in err and "TorchScript interpreter" not in err, err
    with pytest.raises(RuntimeError, match="3 channels"):  # --debug: the exception itself, with its traceback
        main(["--debug"] + args)


class _NanSafe(torch.nn.Module):
    def forward(self, x):
        return torch.nan_to_num(x, nan=0.0).mean(dim=(1, 2, 3))


def test_allow_nonfinite(tmp_path, capsys):
    data = np.random.default_rng(1).random((10, 12, 8)).astype(np.float32)
    data[4, 5, 3] = np.nan
    scan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), str(scan))
    path = tmp_path / "safe.pt"
    torch.jit.script(_NanSafe()).save(str(path))
    rc, _ = _cli_heat(tmp_path, scan, path, "--directions", "4")
    assert rc == 2
    err = _one_error_line(capsys)
    assert "1 NaN or inf" in err and "--allow-nonfinite" in err
    rc, got = _cli_heat(tmp_path, scan, path, "--directions", "4", "--allow-nonfinite")
    assert rc == 0, capsys.readouterr().err
    api = _api(scan, _NanSafe(), n_directions=4, allow_nonfinite=True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, api, rtol=1e-6, atol=1e-6)


def test_normalize_with_a_bundle(tmp_path, scan, capsys):
    import tonno_fast as tf
    from tonno_fast.encoder import Encoder

    model = _ThreeChannels().eval()
    bundle = tf.save_encoder(tmp_path / "b.pt", model, slice_size=16, pixel_spacing=2.0, mean=(0.2, 0.3, 0.4),
                             std=(0.5, 0.5, 0.5), torchscript=True)
    rc, default = _cli_heat(tmp_path, scan, bundle, "--directions", "3", name="default.nii.gz")
    assert rc == 0, capsys.readouterr().err
    torch.testing.assert_close(default, _api(scan, tf.load_encoder(bundle), n_directions=3), rtol=1e-5, atol=1e-6)
    rc, auto = _cli_heat(tmp_path, scan, bundle, "--directions", "3", "--normalize", "auto", name="auto.nii.gz")
    assert rc == 0 and torch.equal(auto, default)  # auto keeps the bundle's stored normalisation
    rc, none = _cli_heat(tmp_path, scan, bundle, "--directions", "3", "--normalize", "none", name="none.nii.gz")
    assert rc == 0
    api = _api(scan, Encoder(model, input_size=16, pixel_spacing=2.0), n_directions=3)
    torch.testing.assert_close(none, api, rtol=1e-5, atol=1e-6)
    assert (none - default).abs().max() > 1e-3 * default.abs().max()
