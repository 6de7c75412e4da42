"""Run by tests/test_distributed.py under ``torchrun --nproc-per-node 2`` (gloo, CPU): every rank computes the
pipelines with ``process_group`` (each a share of the directions) and in one process (all directions), and rank
0 writes what it measured to ``argv[1]`` (JSON). ``--hang FOLDER``: each rank writes ``FOLDER/rank<r>.pid`` once
the process group is up, then rank 1 waits in a barrier rank 0 never reaches (the timeout guard's test). Not a
test module itself (no ``test_`` prefix)."""
import json
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

import tonno_fast as tf
from tonno_fast import distributed as du


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class TinyCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.head = torch.nn.Linear(3, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def main(out_path):
    with du.session("cpu") as (ctx, device):
        assert ctx.world_size == 2 and torch.distributed.get_backend() == "gloo", ctx
        group = ctx.group
        result = {"world_size": ctx.world_size}
        g = torch.Generator().manual_seed(1)
        vol = torch.rand(9, 10, 8, generator=g, dtype=torch.float64)
        spacing = (1.5, 1.0, 1.2)
        mean = lambda x: x.mean(dim=(1, 2, 3))  # noqa: E731
        # 7 directions over 2 ranks: shares of 4 and 3.
        base = dict(n_directions=7, spacing=spacing, backend="reference")
        for name, kw in [("fbp_ramp2", {}), ("fbp_none", {"filter": "none"}),
                         ("fbp_ramp_hann_baseline", {"filter": "ramp", "window": "hann", "score_baseline": "median"}),
                         ("sirt", {"reconstruction": "sirt", "reconstruction_options": {"iterations": 5}}),
                         ("cgls", {"reconstruction": "cgls", "reconstruction_options": {"iterations": 5}}),
                         ("fista", {"reconstruction": "fista", "reconstruction_options": {"iterations": 5}})]:
            split = tf.tomographic_heatmap(vol, mean, process_group=group, **base, **kw)
            whole = tf.tomographic_heatmap(vol, mean, **base, **kw)
            result[name] = rel(split, whole)
        vol32 = vol.float()
        result["fbp_ramp2_float32"] = rel(tf.tomographic_heatmap(vol32, mean, process_group=group, **base),
                                          tf.tomographic_heatmap(vol32, mean, **base))
        # Partial sinograms: this rank's share only.
        res = tf.tomographic_heatmap(vol, mean, process_group=group, return_sinogram=True, **base)
        result[f"sinogram_directions_rank{ctx.rank}"] = int(res.sinogram.shape[2])
        assert res.geometry.n_directions == res.sinogram.shape[2]

        cnn = TinyCNN().double().eval()
        for name, fn in [("averaged_cam", tf.averaged_cam), ("tomographic_cam", tf.tomographic_cam)]:
            kw = dict(target_layers=[cnn.conv], method="gradcam", n_directions=5, spacing=spacing, slice_size=12,
                      backend="reference")
            split = fn(vol, cnn, process_group=group, **kw)
            whole = fn(vol, cnn, **kw)
            result[name] = rel(split, whole)

        # A failure on one rank only: every rank raises instead of waiting in a collective.
        def fails_on_rank1(x):
            if ctx.rank == 1:
                raise RuntimeError("rank 1 encoder failure")
            return x.mean(dim=(1, 2, 3))
        try:
            tf.tomographic_heatmap(vol, fails_on_rank1, process_group=group, **base)
            result[f"failure_rank{ctx.rank}"] = "no error"
        except RuntimeError as exc:
            result[f"failure_rank{ctx.rank}"] = str(exc)

        # Rows of unequal length gathered in rank order.
        rows = torch.full((1, 1, 2 + ctx.rank, 3), float(ctx.rank))
        whole = du.all_gather_rows(rows, 2, group)
        result["gathered"] = whole[0, 0, :, 0].tolist()

        # DDP building blocks: rank-seeded data, equal weights after a step.
        torch.manual_seed(1234)  # the same initial weights everywhere (DDP would broadcast rank 0's anyway)
        model = du.wrap_ddp(torch.nn.Linear(4, 1, dtype=torch.float64), device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = du.rank_generator(7)
        x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        batches = du.gather_objects(x.sum().item(), group)
        weights = du.gather_objects(flat.tolist(), group)
        result["ddp_batches_differ"] = batches[0] != batches[1]
        result["ddp_weights_equal"] = weights[0] == weights[1]

        # The cohort API under torchrun: a broken scan larger than the others (so the size-balanced shards give it
        # to rank 0 first), with and without fail_fast. Every rank gets the same report.
        folder = Path(out_path).parent / "scans"
        if ctx.is_main:
            folder.mkdir()
            rng = np.random.default_rng(0)
            for k in range(3):
                nib.save(nib.Nifti1Image(rng.random((8, 9, 7)).astype(np.float32), np.eye(4)),
                         str(folder / f"s{k}.nii.gz"))
            (folder / "s3.nii.gz").write_bytes(os.urandom(100_000))
        du.barrier(ctx)
        fast = tf.heatmap_files(folder, folder.parent / "fast", mean, fail_fast=True, n_directions=3)
        full = tf.heatmap_files(folder, folder.parent / "full", mean, n_directions=3)
        result[f"cohort_rank{ctx.rank}"] = [fast.summary().split(" in ")[0], full.summary().split(" in ")[0]]
        if ctx.is_main:
            result["cohort_fast_files"] = sorted(os.listdir(folder.parent / "fast"))

        gathered = du.gather_objects(result, group)
        if ctx.is_main:
            merged = {}
            for r in gathered:
                merged.update(r)
            with open(out_path, "w") as fh:
                json.dump(merged, fh)


def hang(folder):
    with du.session("cpu") as (ctx, _):
        Path(folder, f"rank{ctx.rank}.pid").write_text(str(os.getpid()))
        if ctx.rank == 1:
            du.barrier(ctx)
        else:
            time.sleep(3600)


if __name__ == "__main__":
    if sys.argv[1] == "--hang":
        hang(sys.argv[2])
    else:
        main(sys.argv[1])
