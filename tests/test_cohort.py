"""Folder-scale heatmaps (tonno_fast.cohort and ``tonno-fast heatmap -i INPUT -o OUTPUT``): inputs from folders,
globs and lists; outputs that never overwrite an input; atomic writes; skipping existing outputs; one failing
scan among good ones; memory estimated before allocating (tonno_fast.memory)."""
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import tonno_fast as tf
from tonno_fast import cohort, memory
from tonno_fast.cli import main


class _Mean(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(1, 2, 3))


def _affine(k):
    """A different affine per scan (voxel sizes, flips, origin), to check each heatmap keeps its own."""
    return np.array([[-2.0 + 0.1 * k, 0, 0, 10 + k], [0, 2.0, 0, -5], [0, 0, 2.5 - 0.2 * k, 3 * k], [0, 0, 0, 1]])


def _write_scan(path, k, shape=(10, 12, 8), data=None):
    rng = np.random.default_rng(k)
    if data is None:
        data = rng.random(shape).astype(np.float32)
        data[3:6, 4:8, 2:5] += 2.0
    nib.save(nib.Nifti1Image(data, _affine(k)), str(path))
    return path


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "scans"
    src.mkdir()
    for k, name in enumerate(["a.nii.gz", "b.nii", "c.nii.gz"]):
        _write_scan(src / name, k)
    return src


@pytest.fixture
def torchscript(tmp_path):
    path = tmp_path / "mean.pt"
    torch.jit.script(_Mean()).save(str(path))
    return path


def _run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _snapshot(folder):
    """Bytes and mtime (ns) of every file in ``folder``."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


BASE = ["--directions", "5", "--device", "cpu", "--batch-size", "64"]


def test_folder_in_folder_out_keeps_names_and_affines(tmp_path, folder, torchscript, capsys):
    out = tmp_path / "heat"
    rc, stdout, err = _run(["heatmap", "-i", str(folder), "-o", str(out), "--encoder", str(torchscript)] + BASE,
                           capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii", "c.nii.gz"]
    for k, name in enumerate(["a.nii.gz", "b.nii", "c.nii.gz"]):
        img = nib.load(str(out / name))
        np.testing.assert_allclose(img.affine, _affine(k))
        assert img.shape == (10, 12, 8) and img.get_data_dtype() == np.float32
        # The same heatmap as the single-scan command.
        single = tmp_path / f"single_{name}"
        assert main(["heatmap", "-i", str(folder / name), "-o", str(single), "--encoder", str(torchscript), "-q"]
                    + BASE) == 0
        np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(nib.load(str(single)).dataobj))
    assert "3 written, 0 failed, of 3 scans" in stdout
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_rerun_skips_existing_outputs_untouched(tmp_path, folder, torchscript, capsys):
    out = tmp_path / "heat"
    argv = ["heatmap", "-i", str(folder), "-o", str(out), "--encoder", str(torchscript)] + BASE
    assert _run(argv, capsys)[0] == 0
    before = _snapshot(out)
    # The same command again: nothing to do, every file as it was (bytes and modification time).
    rc, stdout, _ = _run(argv, capsys)
    assert rc == 0 and "0 written, 3 skipped (output exists), 0 failed, of 3 scans" in stdout
    assert _snapshot(out) == before
    (out / "b.nii").unlink()  # as if the run had been interrupted before b
    rc, stdout, _ = _run(argv, capsys)
    assert rc == 0 and "1 written, 2 skipped" in stdout
    after = _snapshot(out)
    assert after["a.nii.gz"] == before["a.nii.gz"] and after["c.nii.gz"] == before["c.nii.gz"]
    assert after["b.nii"][0] == before["b.nii"][0]  # recomputed: the same bytes
    # --overwrite recomputes them all.
    rc, stdout, _ = _run(argv + ["--overwrite"], capsys)
    assert rc == 0 and "3 written" in stdout
    # A single scan whose output exists is skipped too.
    single = out / "a.nii.gz"
    stamp = single.stat().st_mtime_ns
    rc, _, err = _run(["heatmap", "-i", str(folder / "a.nii.gz"), "-o", str(single), "--encoder", str(torchscript)]
                      + BASE, capsys)
    assert rc == 0 and "skipped" in err and single.stat().st_mtime_ns == stamp


def _assert_refused(argv, capsys, folder, pattern="refusing"):
    before = _snapshot(folder)
    rc, _, err = _run(argv, capsys)
    assert rc == 2, err
    err = err.strip()
    assert err.startswith("tonno-fast: error:") and len(err.splitlines()) == 1 and pattern in err, err
    assert _snapshot(folder) == before  # same bytes, same mtimes, no new files


def test_output_equal_to_input_is_refused(tmp_path, folder, torchscript, capsys, monkeypatch):
    enc = ["--encoder", str(torchscript)] + BASE
    scan = folder / "a.nii.gz"
    # The same path, relative with "..", through a symbolic link, through a hard link.
    _assert_refused(["heatmap", "-i", str(scan), "-o", str(scan)] + enc, capsys, folder)
    monkeypatch.chdir(folder)
    _assert_refused(["heatmap", "-i", "a.nii.gz", "-o", "../scans/./a.nii.gz"] + enc, capsys, folder)
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link.nii.gz"
    link.symlink_to(scan)
    _assert_refused(["heatmap", "-i", str(scan), "-o", str(link)] + enc, capsys, folder)
    _assert_refused(["heatmap", "-i", str(link), "-o", str(scan)] + enc, capsys, folder)
    hard = tmp_path / "hard.nii.gz"
    os.link(scan, hard)
    _assert_refused(["heatmap", "-i", str(scan), "-o", str(hard)] + enc, capsys, folder)
    # An output folder that is the input folder, also through a link to the folder.
    _assert_refused(["heatmap", "-i", str(folder), "-o", str(folder)] + enc, capsys, folder, "folder")
    (tmp_path / "same").symlink_to(folder, target_is_directory=True)
    _assert_refused(["heatmap", "-i", str(folder), "-o", str(tmp_path / "same")] + enc, capsys, folder, "folder")
    # In Python: the same refusal, before anything is read.
    with pytest.raises(cohort.CohortError, match="refusing"):
        tf.heatmap_files(folder, folder, _Mean(), n_directions=3)


def test_output_names_must_not_collide(tmp_path, torchscript, capsys):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        _write_scan(tmp_path / sub / "t1.nii.gz", 0)
    listing = tmp_path / "list.txt"
    listing.write_text("x/t1.nii.gz\ny/t1.nii.gz\n")
    rc, _, err = _run(["heatmap", "-i", str(listing), "-o", str(tmp_path / "out"), "--encoder", str(torchscript)]
                      + BASE, capsys)
    assert rc == 2 and "two inputs have the file name 't1.nii.gz'" in err and not (tmp_path / "out").exists()
    rc, _, err = _run(["heatmap", "-i", str(tmp_path / "*" / "t1.nii.gz"), "-o", str(tmp_path / "h.nii.gz"),
                       "--encoder", str(torchscript)] + BASE, capsys)
    assert rc == 2 and "2 inputs need an output folder" in err


def test_corrupt_and_bad_scans_among_good_ones(tmp_path, folder, torchscript, capsys):
    (folder / "broken.nii.gz").write_bytes(b"definitely not gzip")
    nan = np.random.default_rng(5).random((10, 12, 8)).astype(np.float32)
    nan[2, 3, 4] = np.nan
    _write_scan(folder / "nan.nii.gz", 5, data=nan)
    _write_scan(folder / "flat.nii.gz", 6, data=np.zeros((10, 12), np.float32))  # a 2D image
    _write_scan(folder / "four_d.nii.gz", 7, data=np.zeros((6, 6, 6, 3), np.float32))
    out = tmp_path / "heat"
    rc, stdout, err = _run(["heatmap", "-i", str(folder), "-o", str(out), "--encoder", str(torchscript)] + BASE,
                           capsys)
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii", "c.nii.gz"]
    lines = err.strip().splitlines()
    failed = {line.split(": ")[2] for line in lines if line.startswith("tonno-fast: failed:")}
    assert failed == {str(folder / n) for n in ("broken.nii.gz", "nan.nii.gz", "flat.nii.gz", "four_d.nii.gz")}
    assert "Traceback" not in err
    assert lines[-1] == lines[-1].strip() and "3 written, 4 failed, of 7 scans" in lines[-1]
    assert "NaN" in err and "cannot read" in err and "2D" in err and "4D" in err
    # --fail-fast: stops at the first failure (broken.nii.gz sorts before the good ones after it).
    out2 = tmp_path / "heat2"
    rc, _, err = _run(["heatmap", "-i", str(folder), "-o", str(out2), "--encoder", str(torchscript), "--fail-fast"]
                      + BASE, capsys)
    assert rc == 1 and "not run (fail fast)" in err
    assert sorted(p.name for p in out2.iterdir()) == ["a.nii.gz", "b.nii"]  # a, b before broken; none after


def test_inputs_from_glob_list_and_python_api(tmp_path, folder, capsys):
    listing = tmp_path / "scans.txt"
    listing.write_text("# the study\n\nscans/a.nii.gz\n" + str(folder / "c.nii.gz") + "\n")
    paths, single = cohort.collect_inputs(listing)
    assert [p.name for p in paths] == ["a.nii.gz", "c.nii.gz"] and not single
    paths, _ = cohort.collect_inputs(str(folder / "*.nii.gz"))
    assert [p.name for p in paths] == ["a.nii.gz", "c.nii.gz"]
    assert cohort.collect_inputs(folder / "b.nii") == ([folder / "b.nii"], True)
    with pytest.raises(cohort.CohortError, match="no such file"):
        cohort.collect_inputs(tmp_path / "missing.nii.gz")
    with pytest.raises(cohort.CohortError, match="matches no"):
        cohort.collect_inputs(str(tmp_path / "*.nii"))

    report = tf.heatmap_files(listing, tmp_path / "api", _Mean(), n_directions=4, batch_size=64)
    assert report.ok and report.count("written") == 2
    for k, name in [(0, "a.nii.gz"), (2, "c.nii.gz")]:
        np.testing.assert_allclose(nib.load(str(tmp_path / "api" / name)).affine, _affine(k))
    again = tf.heatmap_files(listing, tmp_path / "api", _Mean(), n_directions=4)
    assert again.count("skipped") == 2 and again.count("written") == 0
    # A list naming a missing scan: that scan fails, the other is written.
    listing.write_text("scans/a.nii.gz\nscans/missing.nii.gz\n")
    report = tf.heatmap_files(listing, tmp_path / "api2", _Mean(), n_directions=4, pipeline="averaged-cam",
                              method=lambda x: x[:, 0])
    assert report.count("written") == 1 and len(report.failed) == 1 and "no such file" in report.failed[0].error
    cam = nib.load(str(tmp_path / "api2" / "a.nii.gz"))
    assert cam.shape == (10, 12, 8) and float(np.asarray(cam.dataobj).std()) > 0
    # CAM methods through the same function, and the heatmap of one scan equals the library call.
    heat = cohort.heatmap_file(folder / "a.nii.gz", tmp_path / "one.nii.gz", _Mean(), n_directions=4)
    scan = tf.load_nifti(folder / "a.nii.gz")
    np.testing.assert_array_equal(heat.numpy(), tf.tomographic_heatmap(scan.data, _Mean(), n_directions=4,
                                                                       spacing=scan.spacing).numpy())


def test_output_kinds(tmp_path, folder):
    jobs = cohort.plan_jobs([folder / "a.nii.gz"], tmp_path / "h.nii.gz")
    assert jobs == [cohort.Job(folder / "a.nii.gz", tmp_path / "h.nii.gz")]
    jobs = cohort.plan_jobs([folder / "a.nii.gz"], str(tmp_path / "outdir") + "/")
    assert jobs[0].output == tmp_path / "outdir" / "a.nii.gz"
    with pytest.raises(cohort.CohortError, match=r"\.nii or \.nii\.gz"):
        cohort.plan_jobs([folder / "a.nii.gz"], tmp_path / "h.png")


# --- memory ----------------------------------------------------------------------------------------------------
def _tiny_memory(monkeypatch, nbytes=1 << 30):
    monkeypatch.setattr(memory, "available_memory", lambda device: (nbytes, "mocked"))


def test_too_many_directions_is_refused_before_allocating(tmp_path, folder, torchscript, capsys, monkeypatch):
    """The issue's `--directions 100000000` (killed by the OOM killer with exit 137 before): with 1 GiB available
    (mocked), one line and exit 2, and the N-sized geometry is never built."""
    _tiny_memory(monkeypatch)
    built = []
    real = tf.geometry.fibonacci_directions

    def spy(n, *a, **k):
        built.append(n)
        return real(n, *a, **k)
    monkeypatch.setattr(tf.geometry, "fibonacci_directions", spy)
    out = tmp_path / "h.nii.gz"
    rc, _, err = _run(["heatmap", "-i", str(folder / "a.nii.gz"), "-o", str(out), "--encoder", str(torchscript),
                       "--directions", "100000000", "--device", "cpu"], capsys)
    err = err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("tonno-fast: error: tomographic_heatmap needs about") and "--directions" in err, err
    assert "GiB is available (mocked)" in err
    assert built == [] and not out.exists()
    # Among other scans: that scan fails with the same message, the rest of the cohort is not affected.
    report = tf.heatmap_files(folder, tmp_path / "coh", _Mean(), n_directions=100_000_000)
    assert report.count("failed") == 3 and "lower n_directions" in report.failed[0].error


@pytest.mark.parametrize("fn", ["tomographic_heatmap", "averaged_cam", "tomographic_cam"])
def test_every_pipeline_checks_memory_first(monkeypatch, fn):
    _tiny_memory(monkeypatch, 1 << 20)
    made = []
    monkeypatch.setattr(tf.geometry, "fibonacci_directions",
                        lambda n, *a, **k: made.append(n) or torch.zeros(n, 3))
    vol = torch.rand(12, 12, 12)
    kw = {} if fn == "tomographic_heatmap" else {"method": lambda x: x[:, 0]}
    with pytest.raises(memory.MemoryBudgetError) as info:
        getattr(tf, fn)(vol, lambda x: x.mean((1, 2, 3)), n_directions=10_000, spacing=1.0, max_memory=1 << 20,
                         **kw)
    assert info.value.parameter == "n_directions" and made == []


def test_many_encoder_outputs_are_checked_before_the_sinogram(monkeypatch):
    """K is known only after the first batch: the check runs then, before the (B, K, N, S) buffer."""
    _tiny_memory(monkeypatch, 64 << 20)
    vol = torch.rand(16, 16, 16)
    wide = lambda x: x.mean((1, 2, 3))[:, None].expand(-1, 200_000)  # noqa: E731  (an unselected classifier)
    with pytest.raises(memory.MemoryBudgetError, match="select fewer encoder outputs|lower n_directions") as info:
        tf.tomographic_heatmap(vol, wide, n_directions=8, spacing=1.0)
    assert "200000 output(s)" in str(info.value)
    # The CAM pipelines know K from their probe: checked before the accumulator.
    with pytest.raises(memory.MemoryBudgetError):
        tf.averaged_cam(vol, lambda x: x.mean((1, 2, 3)), method=lambda x: x[:, :1].expand(-1, 5000, -1, -1),
                        n_directions=2, spacing=1.0)


def test_slicewise_and_max_memory_hints(monkeypatch):
    _tiny_memory(monkeypatch, 1 << 20)
    with pytest.raises(memory.MemoryBudgetError):
        tf.slicewise_cam(torch.rand(64, 64, 64), lambda x: x.mean((1, 2, 3)), method=lambda x: x[:, 0])
    est = memory.pipeline_memory((1, 1, 32, 32, 32), device="cpu", kind="stacks", n_directions=40_000,
                                 n_slices=60, height=60, width=60, max_memory=8 << 30)
    assert est.largest()[:3] == ("stacks", 4 << 30, "max_memory")  # the budget is the largest part: lower it
    small = memory.pipeline_memory((1, 1, 32, 32, 32), device="cpu", n_directions=4, n_slices=60, height=60,
                                   width=60)
    big = memory.pipeline_memory((1, 1, 32, 32, 32), device="cpu", n_directions=4000, n_slices=60, height=60,
                                 width=60)
    assert big.parts["sinogram"][0] == 1000 * small.parts["sinogram"][0]
    assert big.parts["geometry"][0] == 4000 * memory.GEOMETRY_BYTES_PER_DIRECTION


def test_available_memory_and_sizes(monkeypatch):
    avail, source = memory.available_memory("cpu")
    assert avail is not None and avail > 0 and source
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    shared, source = memory.available_memory("cpu")
    assert shared <= avail // 4 * 1.2 and "4 processes" in source  # (the machine's free memory moves a little)
    assert memory.parse_bytes("512M") == 512 << 20 and memory.parse_bytes("1.5G") == 3 << 29
    assert memory.parse_bytes("2GB") == 2 * 10 ** 9 and memory.parse_bytes("1000") == 1000
    for bad in ("", "lots", "0", "-1G", "3X"):
        with pytest.raises(ValueError):
            memory.parse_bytes(bad)
    assert memory.format_bytes(1536) == "1.5 KiB"


@pytest.mark.parametrize("shape, directions", [((128, 128, 128), 10 ** 8), ((10, 12, 8), 10 ** 12)])
def test_real_memory_check_in_a_fresh_process(tmp_path, torchscript, shape, directions):
    """Without mocking, in a fresh process: the issue's command (`--directions 100000000`, killed by the OOM
    killer before) on a 128³ scan needs about 977 GiB, and 10¹² directions fit on no machine; the command says so
    at once, one line, exit 2, nothing written."""
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(scan))
    out = tmp_path / "h.nii.gz"
    r = subprocess.run([sys.executable, "-m", "tonno_fast", "heatmap", "-i", str(scan), "-o", str(out), "--encoder",
                        str(torchscript), "--directions", str(directions), "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "lower --directions" in err, err
    assert err.startswith("tonno-fast: error: tomographic_heatmap needs about") and "Traceback" not in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mean.pt", "scan.nii.gz"]
