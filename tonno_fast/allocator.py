"""Process-wide settings of the C allocator for runs on the CPU.

PyTorch's CPU tensors come straight from ``malloc``, with no caching allocator as on a GPU. glibc's ``malloc``
serves a large request (above a threshold that adapts between 128 KiB and 32 MiB) with a fresh ``mmap`` and
returns it to the system on ``free``, so every such tensor is page-faulted in afresh, one 4 KiB page at a time,
zeroed by the kernel. An encoder called on batches of slices allocates the same large activations batch after
batch: measured on a 2-core machine (``benchmarks/RESULTS.md``, item 22), ToNNO with a small CNN on 64³, 64
directions, took 143,000 page faults and 0.63 s per call with the default settings, under 100 faults and
0.29–0.33 s after :func:`retain_freed_memory` (Tomographic CAM: 0.59–0.92 → 0.44–0.48 s), for at most 60 MB more
peak resident memory.

:func:`retain_freed_memory` asks ``malloc`` to serve requests below ``mmap_threshold`` from its heap and to keep
up to ``trim_threshold`` of freed memory there for the next request. It is process-wide and cannot be undone (it
turns off glibc's adaptive threshold), so the library's functions never call it; the applications do (the
``tonno-fast`` command line and the demo, unless ``TONNO_FAST_RETAIN_FREED_MEMORY=0``), and a script can call it
first thing. It does nothing outside glibc (macOS, Windows, musl) and when ``GLIBC_TUNABLES`` already sets
``malloc`` options (the user's own choice wins). Other remedies with the same aim: jemalloc or tcmalloc through
``LD_PRELOAD``, as PyTorch's CPU performance guide suggests.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Optional

__all__ = ["retain_freed_memory", "retain_freed_memory_unless_disabled", "DEFAULT_MMAP_THRESHOLD",
           "DEFAULT_TRIM_THRESHOLD", "ENV_SWITCH"]

#: Requests below this are served from malloc's heap (256 MiB: the slices in flight of the default
#: ``max_memory`` are at most a quarter of 1 GiB; a larger request gets its own ``mmap``, whose faults are then
#: small next to the work done on so much memory).
DEFAULT_MMAP_THRESHOLD = 256 << 20
#: Freed memory kept in the heap before any is returned to the system.
DEFAULT_TRIM_THRESHOLD = 1 << 30
#: Environment variable: ``0`` stops the applications from calling :func:`retain_freed_memory`.
ENV_SWITCH = "TONNO_FAST_RETAIN_FREED_MEMORY"

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_INT_MAX = 2 ** 31 - 1


def _glibc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc (``gnu_get_libc_version`` exists), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def retain_freed_memory(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
                        trim_threshold: int = DEFAULT_TRIM_THRESHOLD) -> bool:
    """Keep freed memory in glibc's heap for the next request instead of page-faulting fresh memory in (see the
    module docstring). Process-wide; call it once, early. Returns True when glibc took both settings, False
    where it does nothing (not glibc, or ``GLIBC_TUNABLES`` already sets ``malloc`` options).

    Args:
        mmap_threshold: bytes; requests of at least this size still get their own ``mmap`` (1 to 2³¹ − 1).
        trim_threshold: bytes of free memory at the top of the heap before it is returned (1 to 2³¹ − 1).
    """
    for value, name in ((mmap_threshold, "mmap_threshold"), (trim_threshold, "trim_threshold")):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _INT_MAX:
            raise ValueError(f"{name} must be a number of bytes between 1 and {_INT_MAX}, got {value!r}")
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    return libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and ok


def retain_freed_memory_unless_disabled() -> bool:
    """:func:`retain_freed_memory` with its defaults unless ``TONNO_FAST_RETAIN_FREED_MEMORY=0``: what the
    applications call at start. Returns whether the settings were applied."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    return retain_freed_memory()
