"""Shared benchmark machinery: peak-memory measurement and a summary table with ratios against the reference.

Run with ``pytest benchmarks/`` (or ``make bench``). Every benchmark records, in ``benchmark.extra_info``:
``backend``, ``op``, ``work`` (samples or updates per call), ``throughput_G_per_s`` (work / median),
``peak_extra_MiB`` (peak resident memory added by one call, output included) and ``output_MiB``. At the end
of the session a table gives each op's median per backend and the ratio reference / compiled, measured in
the same run (machines here are noisy: only same-run ratios are meaningful).
"""
from __future__ import annotations

import ctypes
import gc
import os
from collections import defaultdict

import pytest
import torch

_RESULTS = defaultdict(dict)  # case -> backend -> info


def _read_status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM), or -1 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def _release_freed_memory() -> None:
    gc.collect()
    try:  # glibc keeps freed heap memory; give it back so RSS reflects live memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_bytes(fn) -> tuple:
    """(peak resident bytes added while ``fn()`` runs, its result). Resets the kernel's high-water mark
    (``echo 5 > /proc/self/clear_refs``) so the peak is this call's; -1 where Linux procfs is unavailable."""
    _release_freed_memory()
    base = _read_status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return -1, fn()
    out = fn()
    peak = _read_status("VmHWM")
    return (peak - base if base >= 0 and peak >= 0 else -1), out


def _nbytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_nbytes(o) for o in out)
    return 0


@pytest.fixture
def run_case(benchmark):
    """``run_case(case, backend, fn, work, unit, rounds)``: time ``fn`` (medians over ``rounds``), measure its
    peak memory once (one more call, before the timed ones), and record everything for the summary. Returns the
    record (a dict; its ``ops_fraction``, if the caller sets one, is printed in the summary), or None when
    timing is disabled."""

    def run(case: str, backend: str, fn, work: float, unit: str, rounds: int = 3):
        peak, out = peak_extra_bytes(fn)
        out_bytes = _nbytes(out)
        del out
        benchmark.group = case
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
        if benchmark.disabled:  # --benchmark-disable: the call ran once as a smoke test, nothing was timed
            return None
        median = benchmark.stats.stats.median
        info = {
            "backend": backend, "op": case, "work": work, "unit": unit,
            "throughput_G_per_s": work / median / 1e9,
            "peak_extra_MiB": peak / 2 ** 20, "output_MiB": out_bytes / 2 ** 20,
            "threads": torch.get_num_threads(),
        }
        benchmark.extra_info.update(info)
        _RESULTS[case][backend] = dict(info, median_s=median)
        return _RESULTS[case][backend]

    return run


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("tonno_fast: compiled vs reference (same run)")
    tr.write_line(f"{'case':<44} {'backend':<10} {'median':>10} {'throughput':>16} {'ratio':>7} "
                  f"{'peak+':>9} {'output':>9}")
    for case, by_backend in _RESULTS.items():
        ref = by_backend.get("reference")
        for backend, r in by_backend.items():
            ratio = f"{ref['median_s'] / r['median_s']:.1f}x" if ref and backend != "reference" else ""
            tr.write_line(f"{case:<44} {backend:<10} {r['median_s'] * 1e3:>8.1f}ms "
                          f"{r['throughput_G_per_s']:>7.3f} G {r['unit']:<6} {ratio:>7} "
                          f"{r['peak_extra_MiB']:>7.0f}Mi {r['output_MiB']:>7.0f}Mi"
                          + (f"  ops {100 * r['ops_fraction']:.0f} %" if "ops_fraction" in r else ""))
    tr.write_line(f"threads: {torch.get_num_threads()}, cpu: {os.cpu_count()} logical, "
                  f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
