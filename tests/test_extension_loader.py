"""The compiled extension is used only with the torch it was built for (tonno_fast/_extension.py), and the build
finds a usable CUDA toolkit or none (setup.py). No second torch install and no compiler are needed: fake
extensions are small Python modules with a build record beside them, and fake toolkits are folders with an
`nvcc` script."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tonno_fast import _extension as ext

ROOT = Path(__file__).resolve().parents[1]


def _fake_package(tmp_path, monkeypatch, name, record=None, module_src=None):
    """Package ``name`` in tmp_path with a ``_C`` module (Python source, which imports by writing a marker file)
    and, if given, a build record beside it. Returns (module name, marker path)."""
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    marker = tmp_path / f"{name}.loaded"
    if module_src is not None:
        src = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n" + textwrap.dedent(module_src)
        (pkg / "_C.py").write_text(src)
        if record is not None:
            (pkg / ext.RECORD_NAME).write_text(json.dumps(record))
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}._C", marker


def _record(**over):
    rec = ext.build_record(cuda_kernels=False, cuda_missing="TONNO_FAST_NO_CUDA=1")
    rec.update(over)
    return rec


def test_mismatch_reason():
    running = {"torch_version": "2.14.1+cu130", "torch_cuda": "13.0"}
    assert ext.mismatch_reason({"torch_version": "2.14.1+cu130", "torch_cuda": "13.0"}, running) is None
    r = ext.mismatch_reason({"torch_version": "2.13.0+cpu", "torch_cuda": None}, running)
    assert r == "built for torch 2.13.0+cpu, running torch 2.14.1+cu130"
    r = ext.mismatch_reason({"torch_version": "2.14.1+cu130", "torch_cuda": "12.8"}, running)
    assert "CUDA 12.8" in r and "CUDA 13.0" in r
    # the default compares with the torch imported here
    assert ext.mismatch_reason(ext.build_record(cuda_kernels=False)) is None


def test_matching_record_loads(tmp_path, monkeypatch):
    name, marker = _fake_package(tmp_path, monkeypatch, "tf_ok", _record(), "def build_info(): return {}\n")
    mod = ext.load_compiled(name)
    assert marker.exists() and mod.__name__ == name


def test_mismatched_record_is_never_loaded(tmp_path, monkeypatch):
    name, marker = _fake_package(tmp_path, monkeypatch, "tf_old", _record(torch_version="2.0.0+cpu"),
                                 "raise SystemExit('a library built for another torch must not even be loaded')\n")
    with pytest.raises(ImportError) as e:
        ext.load_compiled(name)
    msg = str(e.value)
    assert f"built for torch 2.0.0+cpu, running torch {torch.__version__}" in msg, msg
    assert "--no-build-isolation" in msg and "\n" not in msg, msg
    assert not marker.exists() and name not in sys.modules


def test_not_built(tmp_path, monkeypatch):
    name, _ = _fake_package(tmp_path, monkeypatch, "tf_none")
    with pytest.raises(ImportError, match=r"tf_none\._C is not built .*--no-build-isolation"):
        ext.load_compiled(name)


def test_load_failure_is_one_line(tmp_path, monkeypatch):
    name, _ = _fake_package(tmp_path, monkeypatch, "tf_broken", _record(),
                            "raise OSError('libtorch_cuda.so: cannot open shared object file\\nsecond line')\n")
    with pytest.raises(ImportError) as e:
        ext.load_compiled(name)
    msg = str(e.value)
    assert "failed to load (OSError: libtorch_cuda.so: cannot open shared object file)" in msg and "\n" not in msg


@pytest.mark.parametrize("built, ok", [(torch.__version__.split("+")[0], True), ("1.0.0", False)])
def test_without_record_the_library_reports_its_torch(tmp_path, monkeypatch, built, ok):
    """A library built by other means (no record, or a record of another file) is checked after loading."""
    name, marker = _fake_package(tmp_path, monkeypatch, f"tf_norec_{ok}", None,
                                 f"def build_info(): return {{'torch_version': {built!r}}}\n")
    if ok:
        assert ext.load_compiled(name).build_info()["torch_version"] == built
    else:
        with pytest.raises(ImportError, match=f"built for torch 1.0.0, running torch {torch.__version__.split('+')[0]}"):
            ext.load_compiled(name)
    assert marker.exists()


def test_record_of_another_file_is_ignored(tmp_path):
    so = tmp_path / "_C.so"
    so.write_bytes(b"x" * 10)
    ext.write_build_record(tmp_path / ext.RECORD_NAME, cuda_kernels=False, extension=str(so))
    assert ext.read_build_record(so)["extension_size"] == 10
    so.write_bytes(b"x" * 11)  # rebuilt or copied without its record
    assert ext.read_build_record(so) is None
    (tmp_path / ext.RECORD_NAME).write_text("{not json")
    assert ext.read_build_record(so) is None


def test_record_script_for_cmake(tmp_path):
    """CMakeLists.txt runs tonno_fast/_extension.py as a script to write the record."""
    so = tmp_path / "_C.so"
    so.write_bytes(b"\0" * 7)
    out = tmp_path / ext.RECORD_NAME
    subprocess.run([sys.executable, str(ROOT / "tonno_fast" / "_extension.py"), "--write-record", str(out),
                    "--extension", str(so), "--cuda-arch=8.0,9.0"], check=True, timeout=300)
    rec = json.loads(out.read_text())
    assert rec["torch_version"] == torch.__version__ and rec["torch_cuda"] == torch.version.cuda
    assert rec["cuda_kernels"] is True and rec["cuda_arch"] == ["8.0", "9.0"] and rec["extension_size"] == 7


def test_backends_report_a_mismatch_and_fall_back(tmp_path):
    """The real extension under a torch that differs from its record: not loaded, backends() says why, the
    auto backend warns once in one line and the reference backend computes the heatmap."""
    spec = importlib.util.find_spec("tonno_fast._C")
    if spec is None or ext.read_build_record(spec.origin) is None:
        pytest.skip("tonno_fast._C is not built by setup.py here (no build record)")
    code = textwrap.dedent("""
        import sys, warnings, torch
        import tonno_fast._extension as e
        e.running_torch = lambda: {"torch_version": "9.9.9+other", "torch_cuda": None}
        import tonno_fast
        b = tonno_fast.backends()
        assert b["cpu"] == b["cuda"] and b["cpu"].startswith("tonno_fast._C was built for torch "), b
        assert "running torch 9.9.9+other" in b["cpu"] and "--no-build-isolation" in b["cpu"], b
        assert "tonno_fast._C" not in sys.modules
        vol = torch.rand(12, 12, 12, dtype=torch.float64)
        enc = lambda s: s.flatten(1).sum(1)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            h = tonno_fast.tomographic_heatmap(vol, enc, n_directions=6, slice_size=16)
            h2 = tonno_fast.tomographic_heatmap(vol, enc, n_directions=6, slice_size=16)
        msgs = [str(x.message) for x in w if "tonno_fast" in str(x.message)]
        assert len(msgs) == 1 and "\\n" not in msgs[0] and "rebuild" in msgs[0], msgs
        ref = tonno_fast.tomographic_heatmap(vol, enc, n_directions=6, slice_size=16, backend="reference")
        assert torch.equal(h, ref) and torch.equal(h2, ref)
        print(msgs[0])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "built for torch" in out.stdout


# ---------------------------------------------------------------------------------------------------------
# setup.py: which CUDA toolkit the build uses.

@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("tonno_fast_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines the helpers; setup() runs only as __main__
    return mod


def _fake_toolkit(root: Path, version="13.0", cudart=True):
    """A toolkit folder whose bin/nvcc answers --version and -v --dryrun like the real one."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "lib64").mkdir()
    if cudart:
        (root / "lib64" / "libcudart.so").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case "$*" in
          *--version*) echo "Cuda compilation tools, release {version}, V{version}.1" ;;
          *--dryrun*) echo "#\\$ _HERE_=$(dirname "$0")" >&2; echo "#\\$ TOP=$(dirname "$0")/.." >&2 ;;
        esac
        """))
    nvcc.chmod(0o755)
    return root


def _wrapper(bindir: Path, target: Path):
    """An nvcc on PATH that is a wrapper script, as in /usr/local/bin/nvcc -> exec /usr/local/cuda-X/bin/nvcc."""
    bindir.mkdir(parents=True)
    w = bindir / "nvcc"
    w.write_text(f'#!/bin/sh\nexec {target / "bin" / "nvcc"} "$@"\n')
    w.chmod(0o755)


def test_toolkit_behind_wrapper_script_on_path(setup_py, tmp_path, monkeypatch):
    real = _fake_toolkit(tmp_path / "cuda-13.0").resolve()
    _wrapper(tmp_path / "usr" / "bin", real)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'usr' / 'bin'}:{os.environ['PATH']}")
    # the folder above the wrapper's bin/ (what torch guesses) has no CUDA libraries; nvcc's own TOP does
    assert setup_py.toolkit_problem(tmp_path / "usr") is not None
    assert setup_py.find_cuda_toolkit("13.0") == (real, None)


def test_toolkit_problems_mean_cpu_only(setup_py, tmp_path, monkeypatch):
    nolib = _fake_toolkit(tmp_path / "nolib", cudart=False)
    monkeypatch.setenv("CUDA_HOME", str(nolib))
    home, why = setup_py.find_cuda_toolkit("13.0")
    assert home is None and f"CUDA_HOME={nolib}" in why and "libcudart" in why, why

    old = _fake_toolkit(tmp_path / "cuda-12.4", version="12.4")
    monkeypatch.setenv("CUDA_HOME", str(old))
    home, why = setup_py.find_cuda_toolkit("13.0")
    assert home is None and "CUDA 12.4" in why and "CUDA 13.0" in why, why

    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "missing"))
    home, why = setup_py.find_cuda_toolkit("13.0")
    assert home is None and "no bin/nvcc" in why, why

    good = _fake_toolkit(tmp_path / "good", version="13.2")
    monkeypatch.setenv("CUDA_HOME", str(good))
    assert setup_py.find_cuda_toolkit("13.0") == (good, None)


def test_plan_cuda_respects_no_cuda_and_cpu_torch(setup_py, monkeypatch):
    monkeypatch.setenv("TONNO_FAST_NO_CUDA", "1")
    assert setup_py.plan_cuda(torch) == (None, "TONNO_FAST_NO_CUDA=1")
    monkeypatch.setenv("TONNO_FAST_NO_CUDA", "0")

    class CpuTorch:
        __version__ = "2.14.1+cpu"

        class version:
            cuda = None

    assert setup_py.plan_cuda(CpuTorch) == (None, "torch 2.14.1+cpu is a CPU-only build")
