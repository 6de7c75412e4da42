"""Several processes on torch.distributed (gloo on the CPU, as CI has no GPU): the helpers of
tonno_fast.distributed in one process, then real ``torchrun --nproc-per-node 2`` runs: the cohort CLI sharding
scans (same heatmaps as one process, resuming), and the direction split of the pipelines (tests/dist_worker.py).

The multi-process runs (marked ``distributed``; ``-m "not distributed"`` leaves them out) use torchrun's
``--standalone`` rendezvous (a free port chosen by the OS), tiny volumes, one thread per process and a timeout
after which the agent and its workers are killed, so a hang fails the test and leaves no process behind."""
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tonno_fast import distributed as du
from tonno_fast.cli import main

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


# --- one process -----------------------------------------------------------------------------------------------
def test_direction_shares_cover_the_range():
    for n in (1, 2, 7, 64, 65):
        for world in (1, 2, 3, 8):
            if n < world:
                continue
            shares = [du.direction_share(n, r, world) for r in range(world)]
            assert shares[0].start == 0 and shares[-1].stop == n
            assert all(a.stop == b.start for a, b in zip(shares, shares[1:]))
            sizes = [s.stop - s.start for s in shares]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank"):
        du.direction_share(4, 2, 2)


def test_shards_are_disjoint_cover_and_balance():
    items = [f"s{i}" for i in range(11)]
    sizes = [5, 1, 1, 1, 1, 1, 9, 2, 2, 3, 1]
    for world in (1, 2, 3, 4):
        for by_size in (None, sizes):
            shards = [du.shard(items, r, world, by_size) for r in range(world)]
            assert sorted(x for s in shards for x in s) == sorted(items)
            for s in shards:  # order within a shard follows the input
                assert s == [x for x in items if x in s]
    loads = [sum(sizes[items.index(x)] for x in du.shard(items, r, 3, sizes)) for r in range(3)]
    assert max(loads) - min(loads) <= max(sizes) and max(loads) <= 10  # total 27 over 3 ranks


def test_single_process_context_and_collectives(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with du.session("cpu") as (ctx, device):
        assert ctx == du.DistContext(0, 1, 0, 1, None) and not ctx.distributed and ctx.is_main
        assert device == torch.device("cpu")
        t = torch.arange(3.0)
        assert du.all_reduce_sum(t) is t and du.all_gather_rows(t[None], 1) is not None
        assert du.gather_objects({"a": 1}) == [{"a": 1}] and du.broadcast_object(5) == 5
        with du.all_or_none(None):
            pass
        model = torch.nn.Linear(2, 1)
        assert du.wrap_ddp(model, device) is model
    monkeypatch.setenv("LOCAL_RANK", "3")
    if torch.cuda.device_count() < 4:
        with pytest.raises(ValueError, match="LOCAL_RANK 3 has no GPU"):
            du.device_for_rank("cuda")
    assert du.device_for_rank("cpu") == torch.device("cpu")
    assert du.default_backend("cpu") == "gloo" and du.default_backend("cuda:0") == "nccl"


def test_rank_generators_differ_by_rank_and_repeat():
    a0 = torch.rand(4, generator=du.rank_generator(3, 0))
    a1 = torch.rand(4, generator=du.rank_generator(3, 1))
    b1 = torch.rand(4, generator=du.rank_generator(4, 0))
    assert not torch.equal(a0, a1) and not torch.equal(a1, b1)
    assert torch.equal(a0, torch.rand(4, generator=du.rank_generator(3, 0)))


# --- torchrun --------------------------------------------------------------------------------------------------
# Safe under pytest-xdist: each run has its own tmp_path, torchrun --standalone binds its rendezvous to a port the
# OS picks (port 0), and a run that hangs is killed, agent and workers, after `timeout` seconds so the test fails
# instead of blocking CI. The workers live in sessions of their own (torchrun starts them so), so killing the
# agent's process group alone would leave them running: they are found under the agent first.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
distributed = pytest.mark.distributed


def _descendants(pid):
    """Process ids below ``pid`` (Linux /proc; empty elsewhere)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(proc):
    """SIGKILL the agent's process group and every process below it (collected before the agent dies, after
    which its workers would be re-parented)."""
    below = _descendants(proc.pid)
    for kill, target in [(os.killpg, proc.pid)] + [(os.kill, pid) for pid in below]:
        try:
            kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid):
    """True while ``pid`` runs (a zombie left for a parent that does not reap counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _torchrun(args, cwd, timeout=300):
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS``: one thread per worker, gloo on
    the loopback interface (no host name to resolve), no torchrun variables inherited from the caller; agent and
    workers are killed and the test fails when it does not finish within ``timeout`` seconds."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC")}
    # PYTHONFAULTHANDLER: a worker killed by a signal (an abort in C++) prints every thread's Python stack.
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] + args
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        try:  # a worker that survived would hold the pipes open: never wait for it
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out, err = "", "(a worker survived the kill and holds the output pipes)"
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")
    finally:
        if proc.poll() is None:  # pragma: no cover  (an exception other than the timeout)
            _kill(proc)
    return proc.returncode, out, err


def _output(out, err):
    """What a failed run printed: the end of stderr (tracebacks, the faulthandler's stacks) and of stdout."""
    return f"{err[-8000:]}\n--- stdout ---\n{out[-2000:]}"


def _worker_report(args, tmp_path):
    """Run tests/dist_worker.py ``ARGS... REPORT`` under torchrun and return the JSON report rank 0 writes at the
    very end of the run. One more run, in a fresh folder, only when the first failed *after* the report was
    complete, i.e. in the teardown at exit: once in CI a rank aborted there ("terminate called without an active
    exception", torch 2.14.1, gloo) while 55 runs here under load were clean. The first failure's output goes to
    a warning so that it is seen; a failure before the report is written, or twice, fails the test."""
    for attempt in (1, 2):
        folder = tmp_path / f"run{attempt}"
        folder.mkdir()
        report = folder / "report.json"
        rc, out, err = _torchrun([str(HERE / "dist_worker.py")] + args + [str(report)], folder)
        if rc == 0 or attempt == 2 or not report.exists():
            break
        warnings.warn(f"torchrun failed after its report was complete (teardown); running once more:\n"
                      f"{_output(out, err)}")
    assert rc == 0, _output(out, err)
    return json.loads(report.read_text())


class _Mean(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(1, 2, 3))


@distributed
def test_torchrun_two_processes_write_the_same_heatmaps_as_one(tmp_path):
    src = tmp_path / "scans"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        data = rng.random((9 + k, 10, 8)).astype(np.float32)
        affine = np.diag([1.5 + 0.1 * k, 1.0, 1.2, 1.0])
        nib.save(nib.Nifti1Image(data, affine), str(src / f"s{k}.nii.gz"))
    enc = tmp_path / "mean.pt"
    torch.jit.script(_Mean()).save(str(enc))
    opts = ["--encoder", str(enc), "--directions", "6", "--device", "cpu", "--batch-size", "64"]
    assert main(["heatmap", "-i", str(src), "-o", str(tmp_path / "one"), "-q"] + opts) == 0

    # Resuming: s2 exists already (from an earlier, interrupted run) and must be left as it is.
    out = tmp_path / "two"
    out.mkdir()
    (out / "s2.nii.gz").write_bytes((tmp_path / "one" / "s2.nii.gz").read_bytes())
    stamp = (out / "s2.nii.gz").stat().st_mtime_ns
    rc, stdout, err = _torchrun(["-m", "tonno_fast", "heatmap", "-i", str(src), "-o", str(out)] + opts, tmp_path)
    assert rc == 0, _output(stdout, err)
    assert stdout.count("3 written, 1 skipped (output exists), 0 failed, of 4 scans") == 1  # rank 0 only
    assert "on 2 processes" in stdout
    assert sorted(stdout.count(f"wrote {out / f's{k}.nii.gz'}") for k in (0, 1, 3)) == [1, 1, 1]
    assert (out / "s2.nii.gz").stat().st_mtime_ns == stamp
    for k in range(4):
        a, b = nib.load(str(tmp_path / "one" / f"s{k}.nii.gz")), nib.load(str(out / f"s{k}.nii.gz"))
        np.testing.assert_allclose(b.affine, a.affine)
        x, y = np.asarray(a.dataobj, dtype=np.float64), np.asarray(b.dataobj, dtype=np.float64)
        assert np.linalg.norm(y - x) <= 1e-5 * np.linalg.norm(x)

    # One scan under torchrun: split by directions, rank 0 writes; the same heatmap within float tolerance.
    single = tmp_path / "split.nii.gz"
    rc, stdout, err = _torchrun(["-m", "tonno_fast", "heatmap", "-i", str(src / "s1.nii.gz"), "-o", str(single)]
                                + opts, tmp_path)
    assert rc == 0, _output(stdout, err)
    x = np.asarray(nib.load(str(tmp_path / "one" / "s1.nii.gz")).dataobj, dtype=np.float64)
    y = np.asarray(nib.load(str(single)).dataobj, dtype=np.float64)
    assert np.linalg.norm(y - x) <= 1e-5 * np.linalg.norm(x)


@distributed
def test_torchrun_direction_split_equals_one_process(tmp_path):
    """tests/dist_worker.py on 2 gloo ranks: every pipeline with process_group against the same call in one
    process (float64: rounding only), a failure on one rank raising on both, gathers of unequal shares, and the
    DistributedDataParallel building blocks (rank-seeded batches, equal weights after a step)."""
    r = _worker_report([], tmp_path)
    assert r["world_size"] == 2
    for name in ("fbp_ramp2", "fbp_none", "fbp_ramp_hann_baseline", "sirt", "cgls", "fista", "averaged_cam",
                 "tomographic_cam"):
        assert r[name] <= 1e-12, (name, r[name])
    assert r["fbp_ramp2_float32"] <= 1e-5
    assert (r["sinogram_directions_rank0"], r["sinogram_directions_rank1"]) == (4, 3)
    assert "rank 1 encoder failure" in r["failure_rank1"] and "other rank(s)" in r["failure_rank0"]
    assert r["gathered"] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert r["ddp_batches_differ"] and r["ddp_weights_equal"]
    # fail_fast across ranks: rank 0 fails on its first scan while rank 1 writes its first; both stop there.
    assert r["cohort_rank0"] == r["cohort_rank1"] == [
        "1 written, 1 failed, 2 not run (fail fast), of 4 scans", "3 written, 1 failed, of 4 scans"]
    assert r["cohort_fast_files"] == ["s0.nii.gz"]


@distributed
def test_a_hanging_torchrun_fails_and_leaves_no_process(tmp_path):
    """The guard of the runs above: rank 1 waits in a barrier that rank 0 never reaches. The run must fail at the
    timeout, and both workers must be gone afterwards (they run in sessions of their own)."""
    with pytest.raises(pytest.fail.Exception, match="torchrun did not finish in 60 s"):
        _torchrun([str(HERE / "dist_worker.py"), "--hang", str(tmp_path)], tmp_path, timeout=60)
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
    assert len(pids) == 2  # both workers had joined the process group before the timeout
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


@distributed
def test_torchrun_train_encoder_same_weights_different_slices(tmp_path):
    """train_encoder(process_group=...) under DistributedDataParallel on 2 gloo ranks (tests/dist_worker.py
    --train): the ranks draw different slices, end with bitwise the same weights and batch-norm statistics, agree
    on validation, the best step and where a time budget with early stopping ends; a failure on one rank and
    settings that differ between the ranks raise on both instead of hanging."""
    r = _worker_report(["--train"], tmp_path)
    assert r["world_size"] == 2
    assert r["first_batch_differs"] and r["first_batch_shape"] == [8, 1, 12, 12]
    assert r["weights_equal"] and r["bag_weights_equal"]
    assert any("running_mean" in k for k in r["state_keys"])  # buffers compared too
    for rank in (0, 1):
        assert len(r[f"loss_rank{rank}"]) == 3 and all(math.isfinite(x) for x in r[f"loss_rank{rank}"])
        assert r[f"bag_loss_rank{rank}"] and all(math.isfinite(x) for x in r[f"bag_loss_rank{rank}"])
    assert r["loss_rank0"] != r["loss_rank1"]  # each rank's loss on its own slices
    assert [v["step"] for v in r["validation_rank0"]] == [2, 4, 6]
    assert r["validation_rank0"] == r["validation_rank1"] and r["best_rank0"] == r["best_rank1"]
    assert r["bag_steps_rank0"] == r["bag_steps_rank1"] >= 1
    assert r["bag_stopped_rank0"] == r["bag_stopped_rank1"] and r["bag_best_rank0"] == r["bag_best_rank1"]
    assert "rank 1 transform failure" in r["failure_rank1"] and "other rank(s)" in r["failure_rank0"]
    assert "same steps on every rank" in r["mismatch_rank0"] and r["mismatch_rank0"] == r["mismatch_rank1"]
