"""Loading the compiled extension ``tonno_fast._C`` only when it was built for the torch that is running.

A C++/CUDA extension built against one torch release is bound to that release's C++ ABI: loaded under another
torch it may fail with undefined symbols, or load and then crash or compute garbage. Which torch it was built
for must therefore be known *without* loading it. The build (``setup.py``, or ``CMakeLists.txt``) writes a
small JSON *build record*, ``_C.build.json``, beside the shared library; :func:`load_compiled` compares it
with the running torch before importing ``tonno_fast._C`` and raises :class:`ImportError` with a one-line
reason and the command that rebuilds it when they differ. ``tonno_fast.ops.native`` calls it; the
backend registry then reports that reason in ``tonno_fast.backends()`` and falls back to the reference
backend with a one-line warning.

This module imports nothing from ``tonno_fast`` (``setup.py`` loads it by file path, ``CMakeLists.txt`` runs it
as a script) and imports torch only inside functions.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional, Sequence

__all__ = ["RECORD_NAME", "load_compiled", "build_record", "read_build_record", "write_build_record",
           "mismatch_reason", "running_torch", "cuda_missing_reason"]

RECORD_NAME = "_C.build.json"
# The part of the record that must equal the running torch; the rest is informative.
_MATCH_KEYS = ("torch_version", "torch_cuda")


def running_torch() -> Dict[str, Optional[str]]:
    """The ABI-relevant identity of the torch imported in this process: ``torch_version`` (``torch.__version__``,
    local tag included, e.g. ``2.14.1+cu130``) and ``torch_cuda`` (``torch.version.cuda``, None for CPU builds)."""
    import torch
    return {"torch_version": str(torch.__version__), "torch_cuda": torch.version.cuda}


def build_record(cuda_kernels: bool, cuda_arch: Sequence[str] = (), cuda_missing: Optional[str] = None,
                 extension: Optional[str] = None) -> Dict:
    """The build record of an extension built now, against the torch imported in this process.

    ``cuda_kernels``: whether the CUDA kernels were compiled in; ``cuda_arch``: their architectures
    (``"8.0"``, ...); ``cuda_missing``: why they were not (one line), else None; ``extension``: file name of the
    shared library, whose size the loader checks to notice a record left behind by an older build."""
    import torch
    rec = dict(running_torch())
    rec.update(torch_git_version=getattr(torch.version, "git_version", None),
               cxx11_abi=bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
               python=".".join(map(str, sys.version_info[:2])),
               cuda_kernels=bool(cuda_kernels), cuda_arch=list(cuda_arch),
               cuda_missing=None if cuda_kernels else (cuda_missing or "not requested"))
    if extension is not None:
        rec["extension"] = os.path.basename(extension)
        if os.path.exists(extension):
            rec["extension_size"] = os.path.getsize(extension)
    return rec


def write_build_record(path, **kwargs) -> Dict:
    """Write :func:`build_record` (``kwargs``) as JSON to ``path``; return the record."""
    rec = build_record(**kwargs)
    Path(path).write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    return rec


def read_build_record(extension_path) -> Optional[Dict]:
    """The build record beside the shared library ``extension_path``, or None when there is none, it cannot
    be parsed, or it describes another file (a library rebuilt or copied without its record)."""
    path = Path(extension_path).with_name(RECORD_NAME)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or any(k not in rec for k in _MATCH_KEYS):
        return None
    if "extension_size" in rec:
        try:
            if os.path.getsize(extension_path) != rec["extension_size"]:
                return None
        except OSError:
            return None
    return rec


def mismatch_reason(record: Dict, running: Optional[Dict] = None) -> Optional[str]:
    """None when the extension described by ``record`` was built for the ``running`` torch (default: the one
    imported here), else what differs, e.g. ``"built for torch 2.13.0+cpu, running torch 2.14.1+cu130"``."""
    running = running_torch() if running is None else running
    if record.get("torch_version") != running["torch_version"]:
        return f"built for torch {record.get('torch_version')}, running torch {running['torch_version']}"
    if record.get("torch_cuda") != running["torch_cuda"]:
        return (f"built for torch {record.get('torch_version')} with CUDA {record.get('torch_cuda')}, running a torch "
                f"{running['torch_version']} with CUDA {running['torch_cuda']}")
    return None


def _rebuild_hint(extension_path: Optional[str]) -> str:
    """How to rebuild the extension against the running torch, for a source checkout or an installed copy."""
    here = Path(extension_path).parent if extension_path else Path(__file__).resolve().parent
    root = here.parent
    if (root / "setup.py").is_file() and (root / "csrc").is_dir():  # an in-place (editable) build
        return f"rebuild it in {root} with `pip install --no-build-isolation -e .` (or `make build`)"
    return ("rebuild it against this torch with `pip install --no-build-isolation --no-deps --force-reinstall "
            "<tonno_fast sdist or source folder>`")


def load_compiled(name: str = f"{__package__ or 'tonno_fast'}._C") -> ModuleType:
    """Import the compiled extension ``name`` if it was built for the running torch, else raise ImportError.

    The build record beside the library is checked before the library is loaded. Without a record (a build
    made by other means), the library is loaded and its own ``build_info()["torch_version"]`` (major.minor.patch)
    is compared instead. Every failure, including a library that does not load (undefined symbols), raises
    ImportError whose message is one line: what is wrong and how to rebuild."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ImportError(f"{name} is not built (this install has no compiled kernels); {_rebuild_hint(None)}")
    origin = spec.origin
    record = read_build_record(origin)
    if record is not None:
        reason = mismatch_reason(record)
        if reason is not None:  # never load it: a library built for another torch may crash in dlopen
            raise ImportError(f"{name} was {reason}; {_rebuild_hint(origin)}")
    try:
        mod = importlib.import_module(name)
    except (ImportError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ImportError(f"{name} failed to load ({type(exc).__name__}: {first}); {_rebuild_hint(origin)}") from exc
    if record is None and hasattr(mod, "build_info"):
        built = str(mod.build_info().get("torch_version", ""))
        running = running_torch()["torch_version"].split("+")[0]
        if built and built != running:
            raise ImportError(f"{name} was built for torch {built}, running torch {running}; {_rebuild_hint(origin)}")
    return mod


def cuda_missing_reason(name: str = f"{__package__ or 'tonno_fast'}._C") -> str:
    """Why the extension ``name`` has no CUDA kernels, as recorded by its build (one line)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    record = read_build_record(spec.origin) if spec is not None and spec.origin else None
    if record is None or not record.get("cuda_missing"):
        return "TONNO_FAST_NO_CUDA=1, no usable CUDA toolkit or a CPU-only torch at build time"
    return str(record["cuda_missing"])


def main(argv: Sequence[str]) -> int:
    """``python tonno_fast/_extension.py --write-record PATH --extension SO [--cuda-arch 8.0,9.0]``: write
    the build record of a library just built against the torch of this interpreter (used by CMakeLists.txt)."""
    import argparse
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--write-record", required=True, metavar="PATH")
    p.add_argument("--extension", required=True, metavar="SO")
    p.add_argument("--cuda-arch", default="", help="',' or ';'-separated; empty: built without CUDA kernels")
    args = p.parse_args(argv)
    archs = [a for a in args.cuda_arch.replace(";", ",").split(",") if a]
    write_build_record(args.write_record, cuda_kernels=bool(archs), cuda_arch=archs,
                       cuda_missing=None if archs else "configured without -DTONNO_FAST_CUDA=ON",
                       extension=args.extension)
    return 0


if __name__ == "__main__":
    # Run as a script the package folder is sys.path[0]; its `triton` and `io` packages must not shadow the real ones.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.exit(main(sys.argv[1:]))
