"""tonno_fast.allocator: glibc's malloc keeps freed memory for the next request (each check in a fresh process:
the settings are process-wide and cannot be undone)."""
import os
import subprocess
import sys

import pytest

from tonno_fast import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="not glibc: retain_freed_memory does nothing")

# 64 MiB tensors allocated, written and freed one after the other: the minor page faults of ten of them, after
# five that let the heap grow to its working size.
_LOOP = """
import resource, sys, torch
from tonno_fast import allocator
print(allocator.{call})
for _ in range(5):
    t = torch.empty(16 << 20).fill_(1.0)
    del t
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    t = torch.empty(16 << 20).fill_(1.0)  # 64 MiB
    del t
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _run(call: str, **env) -> tuple:
    out = subprocess.run([sys.executable, "-c", _LOOP.format(call=call)], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def test_freed_memory_is_reused_without_page_faults():
    pages = (64 << 20) // 4096
    applied, faults = _run("retain_freed_memory()")
    assert applied
    # With glibc's defaults each of the ten is faulted in afresh (10 x 16,384 pages of 4 KiB, measured); retained,
    # they reuse the heap's memory (0 faults in 8 runs; during the first five the heap grows 2 or 3 times).
    assert faults < pages, faults


def test_the_users_own_malloc_tunables_win():
    applied, _ = _run("retain_freed_memory()", GLIBC_TUNABLES="glibc.malloc.trim_threshold=100000")
    assert not applied


def test_the_applications_switch():
    assert _run("retain_freed_memory_unless_disabled()", **{allocator.ENV_SWITCH: "0"})[0] is False
    assert _run("retain_freed_memory_unless_disabled()", **{allocator.ENV_SWITCH: "1"})[0] is True


@pytest.mark.parametrize("kw", [dict(mmap_threshold=0), dict(trim_threshold=-5), dict(mmap_threshold=True),
                                dict(trim_threshold=2 ** 31), dict(mmap_threshold=1.5e6)])
def test_rejects_bad_thresholds(kw):
    with pytest.raises(ValueError, match="between 1 and"):
        allocator.retain_freed_memory(**kw)
