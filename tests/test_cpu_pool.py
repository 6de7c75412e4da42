"""tonno_fast.allocator.reuse_cpu_memory: the compiled extension's scoped pool for PyTorch's CPU tensors.

The pool, once installed, stays PyTorch's CPU allocator for the rest of the process and forwards every request
outside a scope; these tests run in the pytest process, where other tests allocate before and after."""
import resource
import threading

import pytest
import torch

import tonno_fast as tf
from tonno_fast import allocator

from conftest import gaussian_blobs

pytestmark = pytest.mark.skipif(allocator._compiled() is None, reason="the pool is part of tonno_fast._C")

MIB = 1 << 20


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _churn(n: int = 10, numel: int = 16 << 20) -> int:
    """Page faults of n tensors of ``numel`` float32 allocated, written and freed one after the other."""
    f0 = _faults()
    for _ in range(n):
        t = torch.empty(numel).fill_(1.0)
        del t
    return _faults() - f0


def test_freed_memory_is_reused_in_a_scope_and_returned_after():
    before = allocator.cpu_pool_stats()
    with allocator.reuse_cpu_memory() as active:
        assert active
        faults = _churn()  # ten 64 MiB tensors
        inside = allocator.cpu_pool_stats()
    after = allocator.cpu_pool_stats()
    # The first tensor is faulted in (32 huge pages, or 16,384 small ones where THP is off); the nine others
    # reuse its block. With glibc's defaults each of the ten costs 16,384 faults (measured: 163,889 in all).
    assert faults < 2 * (64 * MIB // 4096), faults
    assert inside["hits"] - before["hits"] >= 9
    assert inside["cached_bytes"] >= 64 * MIB and inside["depth"] == before["depth"] + 1
    # The last scope closed: nothing kept, the pool holds only what live tensors use.
    assert after["cached_bytes"] == 0 and after["depth"] == before["depth"]
    assert after["pooled_bytes"] <= before["pooled_bytes"]


def test_tensors_that_outlive_the_scope_are_freed_later():
    base = allocator.cpu_pool_stats()["pooled_bytes"]
    with allocator.reuse_cpu_memory():
        kept = torch.full((4 * MIB,), 2.0)  # 16 MiB from the pool
    assert allocator.cpu_pool_stats()["pooled_bytes"] >= base + 16 * MIB
    assert float(kept.sum()) == 2.0 * 4 * MIB
    kept.resize_(8 * MIB)  # resizing outside the scope: a fresh allocation from the fallback, data copied
    assert float(kept[:4 * MIB].sum()) == 2.0 * 4 * MIB
    del kept
    assert allocator.cpu_pool_stats()["pooled_bytes"] == base


def test_limit_bounds_the_kept_memory_and_scopes_nest():
    with allocator.reuse_cpu_memory(limit=0):
        _churn(3, 4 * MIB)
        assert allocator.cpu_pool_stats()["cached_bytes"] == 0  # nothing may be kept
        with allocator.reuse_cpu_memory(limit=64 * MIB):  # the larger limit holds while both are open
            assert allocator.cpu_pool_stats()["limit"] == 64 * MIB
            _churn(3, 4 * MIB)
            assert 0 < allocator.cpu_pool_stats()["cached_bytes"] <= 64 * MIB
        assert allocator.cpu_pool_stats()["cached_bytes"] > 0  # still kept: the outer scope is open
    assert allocator.cpu_pool_stats()["cached_bytes"] == 0


def test_small_requests_and_other_sizes():
    with allocator.reuse_cpu_memory():
        h0 = allocator.cpu_pool_stats()["hits"]
        for _ in range(5):
            torch.ones(1000)  # 4 KB: from the fallback allocator, never pooled
        assert allocator.cpu_pool_stats()["hits"] == h0
        a = torch.ones(3 * MIB)  # 12 MiB
        del a
        b = torch.zeros(2 * MIB)  # 8 MiB: the 12 MiB block is more than 1.25x larger, so not reused
        c = torch.zeros(3 * MIB - 1000)  # just under 12 MiB: reuses it, and reads zeros (no stale data)
        assert float(b.abs().sum()) == 0.0 and float(c.abs().sum()) == 0.0
        assert allocator.cpu_pool_stats()["hits"] == h0 + 1


def test_threads_allocate_and_free_concurrently():
    errors = []

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            for _ in range(20):
                x = torch.rand(1 << 18, generator=g)  # 1 MiB
                y = (x * 2).cumsum(0)
                torch.testing.assert_close(y[-1], 2 * x.double().sum().float(), rtol=1e-4, atol=0)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with allocator.reuse_cpu_memory(limit=32 * MIB):
        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert allocator.cpu_pool_stats()["cached_bytes"] == 0


def test_pipelines_open_a_scope_and_give_the_same_result(monkeypatch):
    vol = gaussian_blobs((24, 25, 26))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 1)).eval()
    kw = dict(n_directions=8, spacing=(1.0, 1.0, 1.0), slice_size=32, batch_size=16, backend="cpu")
    monkeypatch.setenv(allocator.POOL_ENV_SWITCH, "0")
    h0 = allocator.cpu_pool_stats()["hits"]
    off = tf.tomographic_heatmap(vol, net, **kw)
    assert allocator.cpu_pool_stats()["hits"] == h0  # switched off: no scope
    monkeypatch.setenv(allocator.POOL_ENV_SWITCH, "1")
    on = tf.tomographic_heatmap(vol, net, **kw)
    assert allocator.cpu_pool_stats()["hits"] > h0
    assert torch.equal(on, off)  # only where the memory comes from differs
    assert allocator.cpu_pool_stats()["cached_bytes"] == 0


def test_switched_off_or_without_the_extension(monkeypatch):
    with allocator.reuse_cpu_memory(enabled=False) as active:
        assert active is False and allocator.cpu_pool_stats()["depth"] == 0
    monkeypatch.setattr(allocator, "_compiled", lambda: None)
    with allocator.reuse_cpu_memory() as active:
        assert active is False
    assert allocator.cpu_pool_stats() is None


@pytest.mark.parametrize("limit", [-1, 1.5, True, "1"])
def test_rejects_bad_limits(limit):
    with pytest.raises(ValueError, match="limit must be a number of bytes"):
        with allocator.reuse_cpu_memory(limit):
            pass


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_process_forked_in_a_scope_can_allocate():
    """The pool's lock is held across fork (pthread_atfork), so the child finds it free. The child's tensors
    stay under PyTorch's grain size (32,768 elements): a forked child must not start an OpenMP parallel region
    after its parent has used one (GNU OpenMP deadlocks), whatever the allocator."""
    import os
    import time
    n = 20_000  # 80 KB: pooled (>= 64 KiB), filled serially
    with allocator.reuse_cpu_memory():
        a = torch.ones(n)  # a pooled block, alive across the fork
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                b = torch.ones(n)
                b.add_(a)
                del a
                code = 0 if float(b[:100].sum()) == 200.0 else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if not done:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        assert done and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        del a


def test_training_and_evaluation_open_a_scope_and_give_the_same_result(monkeypatch):
    g = torch.Generator().manual_seed(0)
    vols = [torch.rand(20, 21, 22, generator=g) for _ in range(4)]

    def run():
        sampler = tf.ObliqueSliceSampler(vols, [0, 1, 0, 1], spacing=(1.0, 1.0, 1.0), slice_size=32, seed=0)
        net = lambda: torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),  # noqa: E731
                                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 1))
        h = tf.train_encoder(net, sampler, steps=4, batch_size=32, seed=3)
        return h.encoder.state_dict(), tf.evaluate_encoder(h.encoder, sampler, n_slices=64, batch_size=32)

    monkeypatch.setenv(allocator.POOL_ENV_SWITCH, "0")
    h0 = allocator.cpu_pool_stats()["hits"]
    off = run()
    assert allocator.cpu_pool_stats()["hits"] == h0
    monkeypatch.setenv(allocator.POOL_ENV_SWITCH, "1")
    on = run()
    assert allocator.cpu_pool_stats()["hits"] > h0
    assert all(torch.equal(on[0][k], off[0][k]) for k in off[0])  # the same weights, bit for bit
    assert on[1] == off[1]
