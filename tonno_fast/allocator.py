"""How CPU runs get their memory: a scoped pool for PyTorch's CPU tensors, and process-wide glibc settings.

PyTorch's CPU tensors come straight from ``malloc``, with no caching allocator as on a GPU. glibc's ``malloc``
serves a large request (above a threshold that adapts between 128 KiB and 32 MiB) with a fresh ``mmap`` and
returns it to the system on ``free``, so every such tensor is page-faulted in afresh, one 4 KiB page at a time,
zeroed by the kernel. An encoder called on batches of slices allocates the same large activations batch after
batch: measured on a 2-core machine (``benchmarks/RESULTS.md``, item 22), ToNNO with a small CNN on 64³, 64
directions, took 143,000 page faults and 0.63 s per call with the default settings, under 100 faults and
0.29–0.33 s after :func:`retain_freed_memory` (Tomographic CAM: 0.59–0.92 → 0.44–0.48 s), for at most 60 MB more
peak resident memory.

Two remedies:

* :func:`reuse_cpu_memory`, a scope (``with`` block) in which memory freed by CPU tensors is kept by the
  compiled extension's pool (``csrc/memory/cpu_pool.cpp``) for the next tensor of about its size, and returned
  to the system when the scope closes. Nothing outside the scope changes, so the library's pipelines,
  ``train_encoder`` and ``evaluate_encoder`` open one for the length of each call (``TONNO_FAST_CPU_POOL=0``
  turns that off). It needs the compiled extension; without it the scope does nothing.
* :func:`retain_freed_memory` asks ``malloc`` to serve requests below ``mmap_threshold`` from its heap and to
  keep up to ``trim_threshold`` of freed memory there for the next request. It is process-wide and cannot be
  undone (it turns off glibc's adaptive threshold), so the library's functions never call it; the applications
  do (the ``tonno-fast`` command line and the demo, unless ``TONNO_FAST_RETAIN_FREED_MEMORY=0``), and a script
  can call it first thing: it also covers the caller's own loops and keeps memory across calls. It does nothing
  outside glibc (macOS, Windows, musl) and when ``GLIBC_TUNABLES`` already sets ``malloc`` options (the user's
  own choice wins). Other remedies with the same aim: jemalloc or tcmalloc through ``LD_PRELOAD``, as
  PyTorch's CPU performance guide suggests.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from typing import Dict, Iterator, Optional

__all__ = ["reuse_cpu_memory", "cpu_pool_stats", "retain_freed_memory", "retain_freed_memory_unless_disabled",
           "DEFAULT_POOL_LIMIT", "DEFAULT_MMAP_THRESHOLD", "DEFAULT_TRIM_THRESHOLD", "ENV_SWITCH", "POOL_ENV_SWITCH"]

#: Freed memory :func:`reuse_cpu_memory` keeps at most, by default.
DEFAULT_POOL_LIMIT = 1 << 30
#: Environment variable: ``0`` stops the pipelines, ``train_encoder`` and ``evaluate_encoder`` from opening a
#: :func:`reuse_cpu_memory` scope.
POOL_ENV_SWITCH = "TONNO_FAST_CPU_POOL"

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


def _compiled():
    """``tonno_fast._C`` when it loaded, else None."""
    from .ops import native
    return native._C


@contextlib.contextmanager
def reuse_cpu_memory(limit: int = DEFAULT_POOL_LIMIT, *, enabled: Optional[bool] = None) -> Iterator[bool]:
    """A scope in which memory freed by PyTorch's CPU tensors is kept for the next tensor instead of being
    returned to the system, so that work repeated batch after batch page-faults its memory in once.

    The first scope installs the extension's pool as PyTorch's CPU allocator (``c10::SetCPUAllocator``); outside
    every scope the pool forwards each request to the allocator it replaced, unchanged. In a scope, requests of
    64 KiB or more get blocks of the pool (2 MiB-aligned and advised to transparent huge pages from 2 MiB on); a
    freed block is kept, up to ``limit`` bytes in all, and given to the next request of its size up to 1.25 times
    smaller. When the outermost scope closes, the kept blocks are returned to the system; tensors that outlive
    it (e.g. the result of a call) return theirs when they are freed. Scopes nest (the largest limit holds) and
    cover every thread. Results are unchanged: only where memory comes from differs. Tensors from the pool are
    not counted by ``torch.profiler``'s CPU memory profile.

    Args:
        limit: bytes of freed memory kept at most (≥ 0); the pool's memory in a scope is at most the memory in
            use plus ``limit``.
        enabled: ``False`` makes the scope do nothing; ``None`` (default) reads ``TONNO_FAST_CPU_POOL``
            (``0``: off).

    Yields:
        True when the pool is active in the scope; False when it is off, the extension is not built, or another
        allocator with a higher priority was installed first.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a number of bytes >= 0, got {limit!r}")
    if enabled is None:
        enabled = os.environ.get(POOL_ENV_SWITCH, "1").strip() != "0"
    C = _compiled() if enabled else None
    if C is None:
        yield False
        return
    active = C.cpu_pool_enter(limit)
    try:
        yield bool(active)
    finally:
        C.cpu_pool_exit()


def cpu_pool_stats() -> Optional[Dict[str, int]]:
    """The pool's counters (``installed``, ``depth``: scopes open, ``limit``, ``cached_bytes``: freed memory kept
    now, ``pooled_bytes``: the pool's memory in use or kept, ``hits`` and ``misses``: allocations in scopes
    served from kept memory or made afresh, since the process started), or None without the extension."""
    C = _compiled()
    return None if C is None else dict(C.cpu_pool_stats())
