"""Build script: the Python package plus the compiled extension ``tonno_fast._C``.

``tonno_fast._C`` holds the schemas of the ``torch.ops.tonno_fast`` custom ops, their CPU kernels
(C++/OpenMP) and, in CUDA builds, their CUDA kernels. The sources are listed once, in
``csrc/sources.txt``, which ``CMakeLists.txt`` reads too.

The extension is compiled against the torch installed in the build environment and works only with that torch
(its C++ ABI changes between releases). Build it with the torch you will run, without build isolation:
``pip install --no-build-isolation .`` (``pyproject.toml`` does not list torch as a build requirement, so an
isolated build cannot silently compile against whatever torch the index offers that day). The build writes
``tonno_fast/_C.build.json`` (the torch it was built for, CUDA or not and why) beside the library;
``tonno_fast/_extension.py`` reads it at run time and leaves a library built for another torch unloaded.

Why not PyTorch's stable ABI (``torch/csrc/stable``, ``STABLE_TORCH_LIBRARY``, ``torch::stable::Tensor``), with
which one binary would serve several torch releases: the host code of the kernels is written against ATen
(``at::Tensor`` in about 190 places, ``AT_DISPATCH_*``, ``TensorOptions``, ``c10::cuda`` guards and streams,
``at::in_parallel_region``, ``at::globalContext().deterministicAlgorithms()`` and ``index_put_`` for the CUDA
adjoints' deterministic path) and ``build_info`` is a pybind11 function. torch 2.14's stable API covers most of
it (``empty``, ``zeros``, ``contiguous``, ``to``, ``sum``, ``view``, ``parallel_for``, ``get_num_threads``, a
device guard, the current CUDA stream, ``int[]`` and ``ScalarType?`` arguments) but has no
deterministic-algorithms query, no ``index_put_`` and no ``in_parallel_region``, and its pieces are gated on
torch 2.10 to 2.14 (our floor is 2.4). Moving means rewriting every host function and re-proving it bitwise
against today's; until then the build is tied to the installed torch and checked at run time.

Environment:

* ``CUDA_HOME`` (or ``CUDA_PATH``): the CUDA toolkit. Without it, the toolkit of the ``nvcc`` on ``PATH`` (its
  real location, through symlinks and wrapper scripts, as nvcc itself reports it), else ``/usr/local/cuda``.
  CUDA kernels are compiled only when torch is a CUDA build and that toolkit is usable: ``bin/nvcc``,
  ``include/cuda_runtime.h`` and ``libcudart`` in ``lib64`` (or ``lib``) present, and the same CUDA major
  version as torch's. Otherwise the CPU kernels are built alone, with a one-line message. No GPU is needed.
* ``TONNO_FAST_NO_CUDA=1``: build the CPU kernels only.
* ``TONNO_FAST_REQUIRE_CUDA=1``: fail instead of falling back to a CPU-only build (CI, GPU clusters).
  Without it, a CUDA compile or link that fails is followed by a CPU-only build, so the CPU kernels are
  never lost to a broken CUDA toolchain.
* ``TONNO_FAST_CUDA_ARCH``: CUDA architectures, ``;``-separated (default ``8.0;9.0``: A100, H100/H200).
  There may be no GPU on the build machine, so they are never auto-detected.
* ``TONNO_FAST_CPU_ARCH``: value of ``-march`` for the CPU kernels (default ``x86-64-v3`` on x86-64: AVX2 +
  FMA, which every x86-64 server of the last decade runs, including the AMD EPYC Zen 4 of CI; ``native``
  would tie the binary to the build machine). Set it to ``""`` to add no ``-march`` flag.
* ``TONNO_FAST_NO_EXTENSION=1``: no compiled extension at all (a pure-Python install: reference and Triton
  backends only). Without it, a build that cannot import torch stops with an error saying how to proceed.
* ``MAX_JOBS``: parallel compile jobs (ninja; without ninja the sources compile one at a time).

If the extension is missing or unusable at run time, ``import tonno_fast`` still works, ``tonno_fast.backends()``
says why, and the ``auto`` backend falls back to the reference backend with a one-line warning.
"""
import glob
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import setuptools
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

ROOT = Path(__file__).resolve().parent
# PEP 639 licence metadata (`license = "MIT"` in pyproject.toml) needs setuptools 77; older ones fail with an
# unreadable validation error, so say it plainly (pip does not check build requirements without isolation).
if tuple(int(x) for x in re.findall(r"\d+", setuptools.__version__)[:2]) < (77, 0):
    sys.exit(f"tonno_fast: building needs setuptools>=77 (found {setuptools.__version__}): "
             "pip install -U 'setuptools>=77'")


def note(msg: str) -> None:
    """A one-line build message (pip shows build output with -v, or when the build fails)."""
    print(f"tonno_fast: {msg}", file=sys.stderr, flush=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def _load_extension_helpers():
    """tonno_fast/_extension.py (build record writer) loaded by path: importing the package would need its
    runtime dependencies in the build environment."""
    spec = importlib.util.spec_from_file_location("_tonno_fast_extension", ROOT / "tonno_fast" / "_extension.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_sources(kind: str):
    """Source files of ``kind`` ("cpu" or "cuda") from csrc/sources.txt, relative to the repository root."""
    files = []
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        k, pattern = line.split(None, 1)
        if k == kind:
            files += sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / pattern)))
    return files


# ---------------------------------------------------------------------------------------------------------
# The CUDA toolkit: where it is, and whether it can build and link the kernels.

def nvcc_toolkit_root(nvcc: str) -> Path:
    """The toolkit folder of the ``nvcc`` command ``nvcc``, which may be a symlink or a wrapper script.

    ``nvcc -v --dryrun`` prints the variables of its nvcc.profile, among them ``TOP``, the real toolkit
    folder (``/usr/local/cuda-13.0/bin/..`` for a ``/usr/local/bin/nvcc`` script that execs it); without it,
    the folder above the symlink-resolved ``bin/``."""
    try:
        out = subprocess.run([nvcc, "-v", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.+)$", out.stderr + out.stdout, re.M)
        if m:
            return Path(os.path.realpath(m.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return Path(os.path.realpath(nvcc)).parent.parent


def toolkit_problem(home: Path):
    """None if ``home`` holds what the build uses (nvcc, cuda_runtime.h, libcudart), else what is missing."""
    if not os.access(home / "bin" / "nvcc", os.X_OK):
        return f"no bin/nvcc in {home}"
    if not (home / "include" / "cuda_runtime.h").is_file():
        return f"no include/cuda_runtime.h in {home}"
    # The library folder torch.utils.cpp_extension links with (-L<home>/lib64 -lcudart, else <home>/lib).
    libdir = home / "lib64" if (home / "lib64").is_dir() else home / "lib"
    if not glob.glob(str(libdir / "libcudart.so*")):
        return f"no libcudart.so in {libdir}"
    return None


def nvcc_version(home: Path):
    """``(major, minor)`` of ``home/bin/nvcc``, or None if it does not say."""
    try:
        out = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_cuda_toolkit(torch_cuda: str):
    """``(home, None)`` for a usable toolkit matching torch's CUDA ``torch_cuda`` ("13.0"), else
    ``(None, reason)``. Looks at CUDA_HOME / CUDA_PATH, then nvcc on PATH, then /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            home, origin = Path(os.environ[var]), f"{var}={os.environ[var]}"
            break
    else:
        nvcc = shutil.which("nvcc")
        if nvcc:
            home = nvcc_toolkit_root(nvcc)
            origin = f"nvcc on PATH ({nvcc} -> {home})"
        elif Path("/usr/local/cuda").is_dir():
            home, origin = Path("/usr/local/cuda"), "/usr/local/cuda"
        else:
            return None, "no CUDA toolkit found (set CUDA_HOME to it, or put its nvcc on PATH)"
    problem = toolkit_problem(home)
    if problem:
        return None, f"the CUDA toolkit of {origin} is unusable: {problem}"
    version = nvcc_version(home)
    want = int(torch_cuda.split(".")[0])
    if version is None or version[0] != want:  # torch.utils.cpp_extension refuses a major mismatch
        found = "an unknown version" if version is None else f"CUDA {version[0]}.{version[1]}"
        return None, f"the CUDA toolkit of {origin} is {found}, torch was built with CUDA {torch_cuda}"
    return home, None


# ---------------------------------------------------------------------------------------------------------
# The extension.

CPU_ARCH = os.environ.get("TONNO_FAST_CPU_ARCH",
                          "x86-64-v3" if platform.machine().lower() in ("x86_64", "amd64") else "")
# -O3 and OpenMP; no -ffast-math: results must match the float64 reference to ~1e-10.
CXX_FLAGS = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"] + ([f"-march={CPU_ARCH}"] if CPU_ARCH else [])


def cuda_archs():
    archs = [a.strip() for a in os.environ.get("TONNO_FAST_CUDA_ARCH", "8.0;9.0").split(";") if a.strip()]
    for a in archs:
        if not re.fullmatch(r"[0-9]+\.[0-9]+[a-z]?(\+PTX)?", a):
            raise ValueError(f"TONNO_FAST_CUDA_ARCH entries must look like 8.0, 9.0a or 9.0+PTX, got {a!r}")
    return archs


def make_extension(cuda_home=None, cuda_missing=None):
    """``tonno_fast._C`` with the CUDA kernels (``cuda_home``: the toolkit) or without them (``cuda_missing``:
    why, recorded in the build record). Sets the attributes ``cuda_archs`` and ``cuda_missing`` on it."""
    from torch.utils import cpp_extension

    kwargs = dict(name="tonno_fast._C", include_dirs=[str(ROOT / "csrc" / "include")], extra_link_args=["-fopenmp"])
    if cuda_home is not None:
        archs = cuda_archs()
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
        # torch.utils.cpp_extension reads its CUDA_HOME global (guessed at import from the nvcc on PATH) for
        # nvcc, the include and the library folders; point it at the toolkit checked above.
        os.environ["CUDA_HOME"] = str(cuda_home)
        cpp_extension.CUDA_HOME = str(cuda_home)
        # Reported by tonno_fast._C.build_info(); '_' because ';' cannot travel through a -D flag.
        macros = [("TONNO_FAST_WITH_CUDA", None), ("TONNO_FAST_CUDA_ARCH", "_".join(archs))]
        ext = cpp_extension.CUDAExtension(sources=read_sources("cpu") + read_sources("cuda"), define_macros=macros,
                                          extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-lineinfo"]},
                                          **kwargs)
        ext.cuda_archs, ext.cuda_missing = archs, None
    else:
        ext = cpp_extension.CppExtension(sources=read_sources("cpu"), extra_compile_args={"cxx": CXX_FLAGS}, **kwargs)
        ext.cuda_archs, ext.cuda_missing = [], cuda_missing
    return ext


def plan_cuda(torch):
    """``(cuda_home, None)`` to compile the CUDA kernels, or ``(None, why not)``."""
    if env_flag("TONNO_FAST_NO_CUDA"):
        return None, "TONNO_FAST_NO_CUDA=1"
    if not read_sources("cuda"):
        return None, "csrc/sources.txt lists no CUDA sources"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    return find_cuda_toolkit(torch.version.cuda)


def build_ext_class(record_helpers):
    from torch.utils import cpp_extension

    class BuildExt(cpp_extension.BuildExtension):
        """torch's BuildExtension (ninja) that falls back to a CPU-only build when the CUDA build fails, and
        writes the build record (``_C.build.json``) beside the library, wherever the library goes."""

        def build_extensions(self):
            saved = (self.compiler.compile, self.compiler._compile)  # BuildExtension wraps these; undo for a retry
            try:
                super().build_extensions()
            except Exception as exc:  # a compile or link error, or torch refusing the toolchain
                if not any(getattr(e, "cuda_archs", None) for e in self.extensions) or env_flag("TONNO_FAST_REQUIRE_CUDA"):
                    raise
                first = (str(exc).strip().splitlines() or [""])[0]
                reason = f"the CUDA build failed ({type(exc).__name__}: {first}; its log is in the build output)"
                note(f"{reason}; building the CPU kernels only (TONNO_FAST_REQUIRE_CUDA=1 makes this an error)")
                self.compiler.compile, self.compiler._compile = saved
                # Turn the extension into the CPU-only one in place: setuptools keeps private attributes on it
                # (set when the command was finalized) that a new Extension object would lack.
                cpu = make_extension(cuda_missing=reason)
                for ext in self.extensions:
                    ext.__dict__.update({k: v for k, v in vars(cpu).items() if not k.startswith("_")})
                super().build_extensions()

        def _record_path(self, ext_path):
            return os.path.join(os.path.dirname(ext_path), record_helpers.RECORD_NAME)

        def build_extension(self, ext):
            path = self.get_ext_fullpath(ext.name)
            old = record_helpers.read_build_record(path)
            if (old is None or record_helpers.mismatch_reason(old) is not None
                    or old.get("cuda_kernels") != bool(ext.cuda_archs)):
                self.force = True  # setuptools' up-to-date check looks at our sources only, not at torch
            super().build_extension(ext)
            record_helpers.write_build_record(self._record_path(path), cuda_kernels=bool(ext.cuda_archs),
                                              cuda_arch=ext.cuda_archs, cuda_missing=ext.cuda_missing,
                                              extension=path)

        def copy_extensions_to_source(self):  # in-place and editable builds
            super().copy_extensions_to_source()
            for regular, inplace in self.get_output_mapping().items():
                if regular.endswith(record_helpers.RECORD_NAME):
                    self.copy_file(regular, inplace, level=self.verbose)

        def get_output_mapping(self):
            mapping = super().get_output_mapping()
            for regular, inplace in list(mapping.items()):
                if os.path.basename(regular).startswith("_C."):
                    mapping[self._record_path(regular)] = self._record_path(inplace)
            return mapping

        def get_outputs(self):
            outputs = super().get_outputs()
            if not self.inplace:
                outputs += [self._record_path(self.get_ext_fullpath(e.name)) for e in self.extensions]
            return outputs

    return BuildExt.with_options(use_ninja=True)


class NoTorchBuildExt(_setuptools_build_ext):
    """Stops a build that cannot import torch with the commands that work (an sdist needs no torch)."""

    def run(self):
        raise SystemExit(
            "tonno_fast: torch is not importable in this build environment, and tonno_fast compiles its kernels "
            "against the torch you run. Install torch first, then build without isolation: `pip install "
            "--no-build-isolation <tonno_fast sdist or folder>` (or `python -m build --no-isolation`); "
            "TONNO_FAST_NO_EXTENSION=1 installs without compiled kernels (reference and Triton backends only).")


def extension_modules():
    if env_flag("TONNO_FAST_NO_EXTENSION"):
        note("TONNO_FAST_NO_EXTENSION=1: no compiled extension (reference and Triton backends only)")
        return [], {}
    try:
        import torch
    except ImportError:  # an isolated build: fine for an sdist, refused at build_ext
        return [Extension("tonno_fast._C", sources=[])], {"build_ext": NoTorchBuildExt}
    cuda_home, why_not = plan_cuda(torch)
    if cuda_home is None:
        if env_flag("TONNO_FAST_REQUIRE_CUDA"):
            raise SystemExit(f"tonno_fast: TONNO_FAST_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
        note(f"compiling the CPU kernels only: {why_not}")
    else:
        note(f"compiling the CPU and CUDA kernels (CUDA toolkit {cuda_home}, architectures {';'.join(cuda_archs())})")
    ext = make_extension(cuda_home, why_not)
    return [ext], {"build_ext": build_ext_class(_load_extension_helpers())}


if __name__ == "__main__":  # as pip (setuptools.build_meta) and `python setup.py` run it; tests import the helpers
    ext_modules, cmdclass = extension_modules()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
