"""Build script: the Python package plus the compiled extension ``tonno_fast._C``.

``tonno_fast._C`` holds the schemas of the ``torch.ops.tonno_fast`` custom ops, their CPU kernels
(C++/OpenMP) and, in CUDA builds, their CUDA kernels. The sources are listed once, in
``csrc/sources.txt``, which ``CMakeLists.txt`` reads too.

Environment:

* ``TONNO_FAST_NO_CUDA=1``: build the CPU kernels only, even where nvcc and a CUDA build of torch exist.
  Otherwise CUDA kernels are compiled when ``CUDA_HOME`` (or ``/usr/local/cuda``) exists, torch was built
  with CUDA and ``csrc/ops/cuda`` has sources; no GPU is needed to compile them.
* ``TONNO_FAST_CUDA_ARCH``: CUDA architectures, ``;``-separated (default ``8.0;9.0``: A100, H100/H200).
  There may be no GPU on the build machine, so they are never auto-detected.
* ``TONNO_FAST_CPU_ARCH``: value of ``-march`` for the CPU kernels (default ``x86-64-v3`` on x86-64: AVX2 +
  FMA, which every x86-64 server of the last decade runs, including the AMD EPYC Zen 4 of CI; ``native``
  would tie the binary to the build machine). Set it to ``""`` to add no ``-march`` flag.
* ``MAX_JOBS``: parallel compile jobs (ninja).

If the extension is missing at run time, ``import tonno_fast`` still works and the ``auto`` backend falls
back to the reference backend with a one-line warning.
"""
import glob
import os
import platform
import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


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


def extension_modules():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # building the pure-Python package without torch: no extension
        return [], {}

    cpu_sources = read_sources("cpu")
    cuda_sources = read_sources("cuda")
    cuda_home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME or "/usr/local/cuda"
    with_cuda = (os.environ.get("TONNO_FAST_NO_CUDA", "0") != "1" and torch.version.cuda is not None
                 and os.path.isdir(cuda_home) and len(cuda_sources) > 0)

    march = os.environ.get("TONNO_FAST_CPU_ARCH",
                           "x86-64-v3" if platform.machine().lower() in ("x86_64", "amd64") else "")
    # -O3 and OpenMP; no -ffast-math: results must match the float64 reference to ~1e-10.
    cxx = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"]
    if march:
        cxx.append(f"-march={march}")
    define_macros = []
    kwargs = dict(name="tonno_fast._C", include_dirs=[str(ROOT / "csrc" / "include")],
                  extra_link_args=["-fopenmp"])
    if with_cuda:
        archs = [a.strip() for a in os.environ.get("TONNO_FAST_CUDA_ARCH", "8.0;9.0").split(";") if a.strip()]
        for a in archs:
            if not re.fullmatch(r"[0-9]+\.[0-9]+[a-z]?(\+PTX)?", a):
                raise ValueError(f"TONNO_FAST_CUDA_ARCH entries must look like 8.0, 9.0a or 9.0+PTX, got {a!r}")
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
        os.environ["CUDA_HOME"] = cuda_home
        # Reported by tonno_fast._C.build_info(); '_' because ';' cannot travel through a -D flag.
        define_macros += [("TONNO_FAST_WITH_CUDA", None), ("TONNO_FAST_CUDA_ARCH", "_".join(archs))]
        nvcc = ["-O3", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(sources=cpu_sources + cuda_sources, define_macros=define_macros,
                                          extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    else:
        ext = cpp_extension.CppExtension(sources=cpu_sources, define_macros=define_macros,
                                         extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
